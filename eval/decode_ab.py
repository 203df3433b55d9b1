"""Decode step time of some caches as a multiple of the full cache's, interleaved in one process.

    OMP_NUM_THREADS=1 taskset -c 0 python eval/decode_ab.py --length 1024 --methods full,unified:leankv-m
    PYTHONPATH=<an older checkout> python eval/decode_ab.py ...      # the same for another commit (an A/B)
    python eval/decode_ab.py --length 2048 --methods full,hetero:k8v4 --hetero-dequantized
    python eval/decode_ab.py --length 2048 --methods full,unified:leankv --torch-compaction

For differences smaller than the drift between `leankv bench` runs on a shared machine: every method's cache is
prefilled once, then each round decodes ``--steps`` tokens with every method in turn, so the methods of one round
meet the same machine; a method's ratio is the median over rounds of its time over the full cache's in that round.
``--hetero-dequantized`` adds, for each hetero method, the same cache dequantizing its store into a buffer at every
step (the path any attention function can read); ``--torch-compaction`` adds, for each sparse or unified method, the
same cache compacting through torch operations instead of the CPU kernel that moves the rows
(`kernels.compaction_moves`): two paths compared in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from compact_bench import torch_compaction  # a script beside this one

from leankv_hf.caches import hetero
from leankv_hf.eval.bench import _decode, _prefill, bench_prompt
from leankv_hf.eval.methods import make_cache, split_methods
from leankv_hf.models import load_model


@contextlib.contextmanager
def dequantized():
    before = hetero.IN_PLACE_DEVICES
    hetero.IN_PLACE_DEVICES = ()
    try:
        yield
    finally:
        hetero.IN_PLACE_DEVICES = before


VARIANTS = {"": contextlib.nullcontext, "dequantized": dequantized, "torch compaction": torch_compaction}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="full,unified:leankv-m,unified:leankv")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hetero-dequantized", action="store_true")
    parser.add_argument("--torch-compaction", action="store_true")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    ids = torch.tensor([bench_prompt(tokenizer, args.length, 0, model.config.vocab_size)])
    methods = split_methods(args.methods)
    entries = [(m, "") for m in ([] if "full" in methods else ["full"]) + methods]  # full: the reference
    if args.hetero_dequantized:
        entries += [(m, "dequantized") for m, _ in entries if m.startswith("hetero:")]
    if args.torch_compaction:
        entries += [(m, "torch compaction") for m, _ in entries if m.startswith(("sparse:", "unified:"))]
    times = {entry: [] for entry in entries}
    with torch.inference_mode():
        state = {}
        for method, variant in entries:
            with VARIANTS[variant]():
                cache = make_cache(method, model)
                token = _prefill(model, ids, cache, None)
                _decode(model, cache, token, 2)
            state[method, variant] = cache, token
        for _ in range(args.repeats):
            for entry, (cache, token) in state.items():
                with VARIANTS[entry[1]]():
                    times[entry].append(1000 * _decode(model, cache, token, args.steps) / args.steps)
    full = times["full", ""]
    print(
        f"{args.model}, {args.length} tokens, {torch.get_num_threads()} threads, {args.repeats} rounds of "
        f"{args.steps} steps at {time.ctime()}"
    )
    for (method, variant), measured in times.items():
        ratio = statistics.median(m / f for m, f in zip(measured, full, strict=True))
        label = method + (f" ({variant})" if variant else "")
        print(f"{label}: {statistics.median(measured):.1f} ms/step (median), {ratio:.3f}x full (median of rounds)")
        if variant:
            ratio = statistics.median(m / f for m, f in zip(measured, times[method, ""], strict=True))
            print(f"  {method} over {label}: {1 / ratio:.3f}x (median of rounds)")


if __name__ == "__main__":
    main()
