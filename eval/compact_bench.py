"""One layer's compaction alone: microseconds to re-rank a 2K prompt's stored rows and the tokens leaving the exact
window, re-encode what moves and merge it (`LeanLayer.compact`), on smollm2-135m. Every ``interval`` decode steps each
layer compacts; end-to-end decode timings on a shared VM drift by more than a change to it moves them.

    OMP_NUM_THREADS=2 python eval/compact_bench.py --methods unified:leankv,unified:leankv-adakv
    PYTHONPATH=<an older checkout> OMP_NUM_THREADS=2 python eval/compact_bench.py ...   # an A/B

Prefills the prompt, decodes until the window is one token short of a compaction, then times ``compact()`` on
copies of one layer (each compacts once), the median over ``--repeats`` rounds (less the first three, a warm-up) of
``--copies`` copies.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from leankv_hf.eval.bench import _decode, _prefill, bench_prompt
from leankv_hf.eval.methods import make_cache, split_methods
from leankv_hf.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="unified:leankv,unified:leankv-adakv")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    if args.repeats < 4:
        parser.error(f"--repeats={args.repeats}: the first 3 rounds warm up, so at least 4")
    model, tokenizer = load_model("smollm2-135m")
    ids = torch.tensor([bench_prompt(tokenizer, args.length, 0, model.config.vocab_size)])
    with torch.inference_mode():
        for method in split_methods(args.methods):
            cache = make_cache(method, model)
            token = _prefill(model, ids, cache, None)
            layer = cache.layers[args.layer]
            due = layer.settings.recent + layer.settings.interval
            while layer.keys.shape[-2] < due - 1:
                _decode(model, cache, token, 1)
            times = []
            for _ in range(args.repeats):
                copies = [copy.deepcopy(layer) for _ in range(args.copies)]
                start = time.perf_counter()
                for twin in copies:
                    twin.compact()
                times.append((time.perf_counter() - start) / args.copies * 1e6)
            rows = "+".join(str(tier.rows) for tier in layer.tiers)
            print(
                f"{method}: {statistics.median(times[3:]):.0f} us per compaction (median of {args.repeats - 3} rounds), "
                f"{rows} stored rows, {torch.get_num_threads()} threads"
            )


if __name__ == "__main__":
    main()
