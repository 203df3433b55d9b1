"""Where one decode step's time goes, per cache: GPU kernel launches per step and the heaviest operations.

    python eval/profile_decode.py --model random:smollm2-135m --length 8192 --methods full,unified:leankv-adakv

Prefills a random prompt, decodes a few warm-up steps, then profiles ``--steps`` steps with torch.profiler and
prints, per method, the kernel launches per step and the top operations by device time (CPU time on CPU).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from leankv_hf.eval.bench import _decode, _prefill, bench_prompt
from leankv_hf.eval.methods import make_cache
from leankv_hf.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:smollm2-135m")
    parser.add_argument("--methods", default="full,hetero:k8v4,sparse:adakv@0.2,unified:leankv-adakv")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    ids = torch.tensor([bench_prompt(tokenizer, args.length, 0, model.config.vocab_size)], device=model.device)
    cuda = model.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for method in args.methods.split(","):
        with torch.inference_mode():
            cache = make_cache(method, model)
            token = _prefill(model, ids, cache, None)
            _decode(model, cache, token, 3)
            with profile(activities=activities) as prof:
                _decode(model, cache, token, args.steps)
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(f"\n### {method}: {launches / args.steps:.0f} kernel launches per decode step")
        print(events.table(sort_by=sort, row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
