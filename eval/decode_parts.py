"""Where a compressing cache's CPU decode step goes beyond the full cache's, interleaved in one process.

    OMP_NUM_THREADS=2 python eval/decode_parts.py --length 2048 --method unified:leankv

Rounds of ``--steps`` decode steps with, in turn: the full cache; the method; the method with its fused kernel step
(`kernels.cpu.DecodeStep`) answering zeros instead (what the rest of the step costs; its scores then stop moving, so
only a few rounds stay comparable); and the method calling the kernel twice (what one more call costs with its data
just read). For both caches it gives the time inside the model's attention modules (projections, rotary, the cache
and attention), and for the method the time inside `LeanLayer.update`, `LeanLayer.compact` and the decode step's call
(the kernel and its wrapper). Medians of rounds, ms per step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from leankv_hf.caches.layer import LeanLayer
from leankv_hf.eval.bench import _decode, _prefill, bench_prompt
from leankv_hf.eval.methods import make_cache
from leankv_hf.kernels import cpu
from leankv_hf.models import load_model

inside = defaultdict(float)  # seconds spent in each timed method since the round began


def timed(function, label: str):
    """``function``, adding the seconds spent inside it to ``inside[label]``."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            inside[label] += time.perf_counter() - start

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="unified:leankv")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    ids = torch.tensor([bench_prompt(tokenizer, args.length, 0, model.config.vocab_size)])
    for name in ("update", "compact"):
        setattr(LeanLayer, name, timed(getattr(LeanLayer, name), name))
    attention = type(model.get_decoder().layers[0].self_attn)
    attention.forward = timed(attention.forward, "the attention modules")
    kernel = cpu.DecodeStep.__call__
    variants = {
        "full": ("full", kernel),
        args.method: (args.method, kernel),
        "kernel answers zeros": (args.method, lambda self, query, *rest: torch.zeros_like(query)),
        "kernel called twice": (args.method, lambda self, *a: (kernel(self, *a), kernel(self, *a))[1]),
    }
    times = defaultdict(list)
    with torch.inference_mode():
        caches = {}
        for method in ("full", args.method):
            cache = make_cache(method, model)
            token = _prefill(model, ids, cache, None)
            _decode(model, cache, token, args.steps)
            caches[method] = cache, token
        for _ in range(args.repeats):
            for label, (method, step) in variants.items():
                cpu.DecodeStep.__call__ = timed(step, "the decode step call")
                inside.clear()
                cache, token = caches[method]
                times[label].append(_decode(model, cache, token, args.steps) / args.steps * 1e3)
                if label in ("full", args.method):
                    for name, seconds in inside.items():
                        times[f"  {label}: inside {name}"].append(seconds / args.steps * 1e3)
        cpu.DecodeStep.__call__ = kernel
    print(
        f"{args.model}, {args.length} tokens, {torch.get_num_threads()} threads, {args.repeats} rounds of "
        f"{args.steps} steps at {time.ctime()}"
    )
    for label, measured in times.items():
        print(f"{label}: {statistics.median(measured):.1f} ms/step (median of rounds)")


if __name__ == "__main__":
    main()
