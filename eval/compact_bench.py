"""One layer's compaction alone: microseconds to re-rank a 2K prompt's stored rows and the tokens leaving the exact
window, re-encode what moves and merge it (`LeanLayer.compact`), on smollm2-135m. Every ``interval`` decode steps each
layer compacts; end-to-end decode timings on a shared VM drift by more than a change to it moves them.

    OMP_NUM_THREADS=2 python eval/compact_bench.py --methods unified:leankv,unified:leankv-adakv
    PYTHONPATH=<an older checkout> OMP_NUM_THREADS=2 python eval/compact_bench.py ...   # an A/B
    OMP_NUM_THREADS=2 python eval/compact_bench.py --torch-compaction   # the CPU kernel moving the rows, or not

Prefills the prompt, decodes until the window is one token short of a compaction, then times ``compact()`` on
copies of one layer (each compacts once), the median over ``--repeats`` rounds (less the first three, a warm-up) of
``--copies`` copies. ``--torch-compaction``: each round also times the same copies compacting through torch operations
instead of the CPU kernel that moves the rows (`kernels.compaction_moves`), so the two compare in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch

from leankv_hf import kernels
from leankv_hf.eval.bench import _decode, _prefill, bench_prompt
from leankv_hf.eval.methods import make_cache, split_methods
from leankv_hf.models import load_model


@contextlib.contextmanager
def torch_compaction():
    """Compactions inside go through `compaction.plan` and `RaggedStore.rebuild`, not `kernels.compaction_moves`."""
    before = kernels.compaction_moves
    kernels.compaction_moves = lambda *args: None
    try:
        yield
    finally:
        kernels.compaction_moves = before


def timed(layer, copies: int) -> float:
    """Microseconds one compaction of ``layer`` takes, on average over ``copies`` copies."""
    twins = [copy.deepcopy(layer) for _ in range(copies)]
    start = time.perf_counter()
    for twin in twins:
        twin.compact()
    return (time.perf_counter() - start) / copies * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="unified:leankv,unified:leankv-adakv")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--torch-compaction", action="store_true")
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
            times, torch_times = [], []
            for _ in range(args.repeats):
                times.append(timed(layer, args.copies))
                if args.torch_compaction:
                    with torch_compaction():
                        torch_times.append(timed(layer, args.copies))
            rows = "+".join(str(tier.rows) for tier in layer.tiers)
            print(
                f"{method}: {statistics.median(times[3:]):.0f} us per compaction (median of {args.repeats - 3} rounds), "
                f"{rows} stored rows, {torch.get_num_threads()} threads"
            )
            if args.torch_compaction:
                ratio = statistics.median(a / b for a, b in zip(times[3:], torch_times[3:], strict=True))
                print(
                    f"  through torch operations: {statistics.median(torch_times[3:]):.0f} us; the kernel's time "
                    f"{ratio:.2f}x theirs (median of rounds)"
                )


if __name__ == "__main__":
    main()
