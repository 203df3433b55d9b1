"""Decode step time of some caches as a multiple of the full cache's, interleaved in one process (median of repeats).

    OMP_NUM_THREADS=1 taskset -c 0 python eval/decode_ab.py --length 1024 --methods full,unified:leankv-m
    PYTHONPATH=<an older checkout> python eval/decode_ab.py ...      # the same for another commit (an A/B)
    python eval/decode_ab.py --length 2048 --methods full,hetero:k8v4 --hetero-in-place

For differences smaller than the drift between `leankv bench` runs on a shared machine: every repeat measures each
method once in turn. ``--hetero-in-place`` adds, for each hetero method, the same cache reading its store in place
on CPU (the path CUDA takes), so the two paths are compared in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from leankv_hf.caches import hetero
from leankv_hf.eval.bench import _decode, _prefill, bench_prompt
from leankv_hf.eval.methods import make_cache
from leankv_hf.models import load_model


@contextlib.contextmanager
def in_place_on_cpu(enabled: bool):
    before = hetero.IN_PLACE_DEVICES
    hetero.IN_PLACE_DEVICES = ("cuda", "cpu") if enabled else before
    try:
        yield
    finally:
        hetero.IN_PLACE_DEVICES = before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="full,unified:leankv-m,unified:leankv")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hetero-in-place", action="store_true")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    ids = torch.tensor([bench_prompt(tokenizer, args.length, 0, model.config.vocab_size)])
    entries = [(m, False) for m in args.methods.split(",")]
    if args.hetero_in_place:
        entries += [(m, True) for m, _ in entries if m.startswith("hetero:")]
    times = {entry: [] for entry in entries}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for method, in_place in entries:
                with in_place_on_cpu(in_place):
                    cache = make_cache(method, model)
                    token = _prefill(model, ids, cache, None)
                    _decode(model, cache, token, 2)
                    times[method, in_place].append(1000 * _decode(model, cache, token, args.steps) / args.steps)
    full = statistics.median(times["full", False])
    print(
        f"{args.model}, {args.length} tokens, {torch.get_num_threads()} threads, median of {args.repeats} at {time.ctime()}"
    )
    for (method, in_place), measured in times.items():
        median = statistics.median(measured)
        label = method + (" (in place on CPU)" if in_place else "")
        print(f"{label}: {median:.1f} ms/step, {median / full:.3f}x full")


if __name__ == "__main__":
    main()
