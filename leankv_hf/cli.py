"""`leankv generate | compress | eval | bench | tune`: the command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .models import DEFAULT_MODEL


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, .gguf file, checkpoint dir or hub id")
    parser.add_argument("--dtype", default=None, help="torch dtype to load the model in (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")


def _generate(args: argparse.Namespace) -> int:
    from .models import load_model, no_random_weights

    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give exactly one of --prompt or --prompt-file")
    prompt = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text()
    saved = None if args.cache_dir is None else _saved_class(args.cache_dir)  # checked before the model loads
    no_random_weights(args.model)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if saved is not None:  # a compressed context: the prompt continues it
        start = time.perf_counter()
        cache = saved.from_pretrained(args.cache_dir, model=model)
        print(f"[{args.cache_dir}] loaded in {time.perf_counter() - start:.2f}s")
        if cache.input_ids is None:
            raise ValueError(f"{args.cache_dir} was saved without its token ids; save it with `leankv compress`")
        new = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        ids = torch.cat([cache.input_ids, new], 1).to(model.device)
        label = f"{args.cache_dir} ({type(cache).__name__})"
    else:
        from .eval.methods import make_cache

        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        cache, label = make_cache(args.cache, model), args.cache
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        past_key_values=cache,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        prefill_chunk_size=args.prefill_chunk,
    )
    seconds = time.perf_counter() - start
    print(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    print(
        f"[{label}] prompt {ids.shape[1]} tokens, {out.shape[1] - ids.shape[1]} new in {seconds:.1f}s | {_bytes(cache)}"
    )
    return 0


def _saved_class(directory: str) -> type:
    """The cache class a `leankv compress` directory holds."""
    import leankv_hf

    from .persist import read_config

    name = read_config(directory)["cache_class"]
    cls = getattr(leankv_hf, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"{directory} holds a {name!r}, which this leankv-hf cannot load")
    return cls


def _bytes(cache) -> str:
    from .monitor import cache_nbytes, dense_nbytes

    stored, dense = cache_nbytes(cache), dense_nbytes(cache)
    return f"cache {stored / 2**20:.2f} MiB stored vs {dense / 2**20:.2f} MiB 16-bit dense = {dense / stored:.2f}x"


def _compress(args: argparse.Namespace) -> int:
    from .eval.methods import make_cache
    from .models import load_model, no_random_weights
    from .prefill import prefill

    no_random_weights(args.model)
    text = Path(args.context).read_text()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    cache = make_cache(args.cache, model)
    if not hasattr(cache, "save_pretrained"):
        raise ValueError(f"--cache {args.cache} is not a leankv cache; only those can be saved")
    start = time.perf_counter()
    prefill(model, cache, ids, chunk_size=args.prefill_chunk)
    seconds = time.perf_counter() - start
    path = cache.save_pretrained(args.out, input_ids=ids)
    print(
        f"[{args.cache}] {ids.shape[1]} context tokens compressed in {seconds:.1f}s | {_bytes(cache)} | saved to {path}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leankv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text through a (compressed) cache and print its bytes")
    _add_model_arguments(gen)
    gen.add_argument("--prompt", help="the prompt text (with --cache-dir: what follows the saved context)")
    gen.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument("--cache", default="full", help="cache method, e.g. full, hetero:k8v4, sparse:adakv@0.2")
    gen.add_argument("--cache-dir", default=None, help="continue a context saved by `leankv compress` (not re-read)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--prefill-chunk", type=_positive, default=None, help="prefill the prompt N tokens at a time")
    gen.set_defaults(run=_generate)

    comp = sub.add_parser("compress", help="prefill a context into a cache once and save it for later questions")
    _add_model_arguments(comp)
    comp.add_argument("--context", required=True, help="text file holding the context (a document, a prefix)")
    comp.add_argument("--cache", default="unified:leankv-agnostic", help="cache method (a leankv cache)")
    comp.add_argument("--prefill-chunk", type=_positive, default=None, help="prefill N tokens at a time")
    comp.add_argument("--out", required=True, help="directory to save the compressed context to")
    comp.set_defaults(run=_compress)

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
