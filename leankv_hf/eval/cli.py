"""``leankv eval`` and ``leankv bench``: options, suites, and the glue from arguments to the harness.

Every option is declared once (``Option``) and serves three purposes: the argparse flag, the key a suite YAML
may set (``--suite FILE``, keys spelled like the flags, with ``-`` or ``_``), and the default. Precedence:
command line, then suite, then default. Paths inside a suite are relative to the working directory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..models import DEFAULT_MODEL
from .methods import Spec, is_method_file, make_cache, parse_method, split_methods
from .runner import SETTINGS
from .tasks import TASKS, Task


def _items(value: object) -> list:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _ints(value: object) -> list[int]:
    return [int(v) for v in _items(value)]


def _floats(value: object) -> list[float]:
    return [float(v) for v in _items(value)]


def _strs(value: object) -> list[str]:
    return [str(v) for v in _items(value)]


def _methods(value: object) -> list[Spec]:
    """A comma-separated list, a YAML file holding a list (of strings or dicts), or a YAML list from a suite."""
    specs = split_methods(value) if isinstance(value, str) else list(value)
    if len(specs) == 1 and isinstance(specs[0], str) and is_method_file(specs[0]):
        loaded = yaml.safe_load(Path(specs[0]).read_text())
        specs = loaded if isinstance(loaded, list) else specs  # a file holding one dict is itself a method
    for spec in specs:
        parse_method(spec)
    return specs


@dataclass(frozen=True)
class Option:
    flag: str
    default: object = None
    type: Callable[[object], object] = str
    choices: tuple[str, ...] | None = None
    help: str = ""

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


_MODEL = Option(
    "--model",
    DEFAULT_MODEL,
    help="embedded model name, .gguf file, checkpoint directory, hub id, or random:<name> (bench: random weights)",
)
_METHODS = Option("--methods", ["full"], _methods, help="comma-separated cache methods, or a YAML file listing them")
_SEED = Option("--seed", 0, int, help="seed for generated prompts")
_PREFILL_CHUNK = Option(
    "--prefill-chunk", None, int, help="prefill N tokens per forward (compressing caches compact after each)"
)
_DTYPE = Option(
    "--dtype",
    None,
    choices=("float32", "float16", "bfloat16"),
    help="load the model in this dtype (default: the checkpoint's)",
)
_DEVICE = Option("--device", None, help="cpu, cuda, cuda:1, ... (under accelerate: each process's own device)")

EVAL_OPTIONS = (
    _MODEL,
    Option("--task", "passkey", choices=tuple(TASKS), help="what to evaluate"),
    Option("--subtasks", None, _strs, help="ruler: comma-separated subtasks (default: all)"),
    Option("--datasets", None, _strs, help="longbench: comma-separated datasets (default: all 21 of v1)"),
    _METHODS,
    Option(
        "--lengths",
        None,
        _ints,
        help="passkey/needle/ruler: prompt lengths in tokens; perplexity: window lengths (default: the task's)",
    ),
    Option("--depths", None, _floats, help="passkey/needle: needle depths in [0, 1] (default: the task's)"),
    Option(
        "--n-per-cell",
        None,
        int,
        help="examples per length x depth (passkey), subtask x length (ruler), windows per length (perplexity) (default: the task's)",
    ),
    Option("--needles", None, int, help="needle: facts hidden per context, each asked (setting reuse: in turn)"),
    Option("--data", None, help="passkey: the shared set, JSONL with length_bucket, n_tokens, depth, key, text"),
    Option("--data-dir", None, help="longbench: directory holding {dataset}.jsonl (default: download)"),
    Option(
        "--text",
        None,
        help="perplexity: the text file to evaluate on; needle: the haystack text (default: shipped prose)",
    ),
    Option(
        "--setting",
        "query_aware",
        choices=SETTINGS,
        help="whether the question is in the prompt when the cache compresses; reuse: then every follow-up question "
        "asked in turn on the same cache",
    ),
    Option("--limit", None, int, help="only the first N examples (default: all)"),
    _PREFILL_CHUNK,
    _SEED,
    Option("--out", "results/eval", help="results directory (resumed if it holds rows)"),
    Option(
        "--max-new-tokens",
        None,
        int,
        help="override the task's generation length; perplexity: teacher-forced tokens per window (default 128)",
    ),
    _DTYPE,
    _DEVICE,
)
BENCH_OPTIONS = (
    _MODEL,
    _METHODS,
    Option("--lengths", [1024, 2048, 4096, 8192], _ints, help="context lengths in tokens"),
    Option("--decode-tokens", 32, int, help="tokens decoded per measurement"),
    Option("--repeats", 3, int, help="measurements per method and length (medians are reported)"),
    Option("--batch", 1, int, help="prompts decoded together (each its own seeded prompt)"),
    Option(
        "--capacity-gb",
        None,
        float,
        help="instead: the largest batch each method decodes within this many GiB (above the weights), and its tokens/s",
    ),
    _PREFILL_CHUNK,
    Option(
        "--peak-rss",
        "no",
        choices=("yes", "no"),
        help="CPU: measure each method's peak memory as the resident set of a fresh process per length (Linux)",
    ),
    _SEED,
    Option("--out", "results/bench", help="output directory"),
    _DTYPE,
    _DEVICE,
)

# task -> {option dest: task constructor argument}
_TASK_ARGUMENTS = {
    "passkey": {"lengths": "lengths", "depths": "depths", "n_per_cell": "n_per_cell", "data": "data"},
    "needle": {
        "lengths": "lengths",
        "depths": "depths",
        "n_per_cell": "n_per_cell",
        "text": "text",
        "needles": "needles",
    },
    "ruler": {"subtasks": "subtasks", "lengths": "lengths", "n_per_cell": "n_per_cell"},
    "longbench": {"datasets": "datasets", "data_dir": "data_dir"},
    "perplexity": {"text": "text", "lengths": "lengths", "n_per_cell": "n_per_cell", "max_new_tokens": "steps"},
}
_TASK_ONLY = {"subtasks", "datasets", "lengths", "depths", "n_per_cell", "data", "data_dir", "text", "needles"}


def _flag_type(convert: Callable[[object], object]) -> Callable[[str], object]:
    """argparse turns a ValueError into "invalid value"; keep its message, which lists the valid names."""

    def parse(text: str) -> object:
        try:
            return convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _add(parser: argparse.ArgumentParser, options: tuple[Option, ...]) -> None:
    parser.add_argument("--suite", help="YAML file setting any of these options (command-line flags win)")
    for option in options:
        parser.add_argument(
            option.flag,
            type=_flag_type(option.type),
            choices=option.choices,
            default=None,
            help=option.help if option.default is None else f"{option.help} (default: {option.default})",
        )


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Mount the ``leankv eval`` options on ``parser``."""
    _add(parser, EVAL_OPTIONS)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Mount the ``leankv bench`` options on ``parser``."""
    _add(parser, BENCH_OPTIONS)


def load_suite(path: str | Path, options: tuple[Option, ...]) -> dict:
    """A suite file's settings, keyed by option dest, converted and checked like the flags."""
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"suite {path} must hold a mapping of option: value")
    by_dest = {o.dest: o for o in options}
    suite = {}
    for key, value in loaded.items():
        option = by_dest.get(str(key).replace("-", "_"))
        if option is None:
            raise ValueError(f"suite {path}: unknown key {key!r}; valid keys: {', '.join(by_dest)}")
        if value is not None:
            value = option.type(value)
            if option.choices and value not in option.choices:
                raise ValueError(f"suite {path}: {key} must be one of {', '.join(option.choices)}, not {value!r}")
        suite[option.dest] = value
    return suite


def resolve(args: argparse.Namespace, options: tuple[Option, ...]) -> argparse.Namespace:
    """Fill every option left unset on the command line from the suite (if any), then from its default."""
    suite = load_suite(args.suite, options) if getattr(args, "suite", None) else {}
    for option in options:
        if getattr(args, option.dest, None) is None:
            setattr(args, option.dest, suite.get(option.dest, option.default))
    return args


def build_task(args: argparse.Namespace) -> Task:
    """The task named by ``args.task`` with the task options that were given (the task's defaults otherwise)."""
    accepted = _TASK_ARGUMENTS[args.task]
    stray = sorted(d for d in _TASK_ONLY - set(accepted) if getattr(args, d, None) is not None)
    if stray:
        flags = ", ".join("--" + d.replace("_", "-") for d in stray)
        raise ValueError(f"{flags} do(es) not apply to --task {args.task}")
    if args.task == "perplexity" and args.text is None:
        raise ValueError("--task perplexity needs --text FILE (a plain-text file to evaluate on)")
    kwargs = {name: getattr(args, dest) for dest, name in accepted.items() if getattr(args, dest, None) is not None}
    return TASKS[args.task](**kwargs)


def _load(args: argparse.Namespace, device: str | None, command: str):
    from ..models import load_model, no_random_weights

    if command != "bench":
        no_random_weights(args.model)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    for spec in args.methods:
        make_cache(spec, model)  # fail now, not after hours, when a backend is missing
    return model, tokenizer


def _error(command: str, error: Exception) -> int:
    print(f"leankv {command}: error: {error}", file=sys.stderr)
    return 2


def run_eval_command(args: argparse.Namespace) -> int:
    """``leankv eval``: run a task through the methods, print the summary; 2 on a usage error."""
    from accelerate import PartialState

    from .runner import run_eval

    try:
        resolve(args, EVAL_OPTIONS)
        task = build_task(args)
        # On CPU-only machines accelerate shards only when told so (gloo processes from torchrun / accelerate).
        state = PartialState(cpu=(args.device or "").startswith("cpu") or not torch.cuda.is_available())
        with state.main_process_first():  # the main process converts an embedded model once; the others then load it
            model, tokenizer = _load(
                args, args.device or (str(state.device) if state.num_processes > 1 else None), "eval"
            )
    except (ValueError, ImportError, FileNotFoundError) as error:
        return _error("eval", error)
    summary = run_eval(
        model,
        tokenizer,
        task,
        args.methods,
        args.out,
        limit=args.limit,
        seed=args.seed,
        setting=args.setting,
        max_new_tokens=args.max_new_tokens,
        state=state,
        prefill_chunk=args.prefill_chunk,
    )
    if state.is_main_process:
        print(summary.to_markdown())
        print(f"rows, summary and plots in {args.out}")
    return 0


def run_bench_command(args: argparse.Namespace) -> int:
    """``leankv bench``: bytes and speed per method and length (or, with ``--capacity-gb``, the largest batch each
    method decodes within a memory budget), written as CSV and markdown (and a plot)."""
    from .bench import environment, run_bench, run_capacity, write_bench, write_capacity

    try:
        resolve(args, BENCH_OPTIONS)
        if args.capacity_gb is not None and not args.capacity_gb > 0:
            raise ValueError(f"--capacity-gb {args.capacity_gb} must be > 0")
        if args.batch < 1:
            raise ValueError(f"--batch {args.batch} must be >= 1")
        model, tokenizer = _load(args, args.device, "bench")
    except (ValueError, ImportError, FileNotFoundError) as error:
        return _error("bench", error)
    if args.capacity_gb is not None:
        rows = run_capacity(
            model, tokenizer, args.methods, args.lengths, args.capacity_gb, args.decode_tokens, args.seed,
            args.prefill_chunk,
        )  # fmt: skip
        paths = write_capacity(rows, args.out, environment(model))
    else:
        rows = run_bench(
            model,
            tokenizer,
            args.methods,
            args.lengths,
            args.decode_tokens,
            args.repeats,
            args.seed,
            args.prefill_chunk,
            rss_of=args.model if args.peak_rss == "yes" else None,
            batch=args.batch,
        )
        paths = write_bench(rows, args.out, environment(model))
    print(Path(paths[1]).read_text())
    return 0
