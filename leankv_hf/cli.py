"""`leankv generate | eval | bench | tune`: the command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .models import DEFAULT_MODEL


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, .gguf file, checkpoint dir or hub id")
    parser.add_argument("--dtype", default=None, help="torch dtype to load the model in (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")


def _generate(args: argparse.Namespace) -> int:
    from .eval.methods import make_cache
    from .models import load_model
    from .monitor import cache_nbytes, dense_nbytes

    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give exactly one of --prompt or --prompt-file")
    prompt = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    cache = make_cache(args.cache, model)
    start = time.perf_counter()
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=args.max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    text = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    stored, dense = cache_nbytes(cache), dense_nbytes(cache)
    print(text)
    print(
        f"[{args.cache}] prompt {inputs.input_ids.shape[1]} tokens, {out.shape[1] - inputs.input_ids.shape[1]} new "
        f"in {seconds:.1f}s | cache {stored / 2**20:.2f} MiB stored vs {dense / 2**20:.2f} MiB 16-bit dense "
        f"= {dense / stored:.2f}x"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leankv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text through a (compressed) cache and print its bytes")
    _add_model_arguments(gen)
    gen.add_argument("--prompt", help="the prompt text")
    gen.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument("--cache", default="full", help="cache method, e.g. full, hetero:k8v4, sparse:adakv@0.2")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.set_defaults(run=_generate)

    from .eval import cli as eval_cli

    ev = sub.add_parser("eval", help="run an eval task through caches and write results")
    eval_cli.add_eval_arguments(ev)
    ev.set_defaults(run=eval_cli.run_eval_command)
    bench = sub.add_parser("bench", help="bytes, prefill and decode speed vs context length")
    eval_cli.add_bench_arguments(bench)
    bench.set_defaults(run=eval_cli.run_bench_command)

    from .tune import run_tune_command

    tune = sub.add_parser("tune", help="search UnifiedLeanCache configs for the lowest KL within a memory budget")
    _add_model_arguments(tune)
    tune.add_argument("--budget-mb", type=float, required=True, help="hard cap on the stored KV cache, MiB")
    tune.add_argument("--context", type=int, default=2048, help="calibration prompt tokens (the context to plan for)")
    tune.add_argument("--steps", type=int, default=64, help="teacher-forced decode steps after the prompt")
    tune.add_argument("--max-latency-ms", type=float, default=None, help="reject candidates slower than this per token")
    tune.add_argument(
        "--text", default=None, help="calibration text file (default: the packaged Python reference prose)"
    )
    tune.add_argument("--candidates", default=None, help="YAML mapping candidate names to UnifiedLeanCache settings")
    tune.add_argument("--out", default="results/tune", help="where tune.md, tune.json and best.yaml go")
    tune.set_defaults(run=run_tune_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"leankv {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
