"""``leankv bench``: what each cache costs in bytes and time as the context grows.

For each method and context length: prefill ``batch`` seeded passkey-style prompts of exactly that many tokens
(seeded random token ids for a model without a tokenizer, ``random:<name>``) into a fresh cache, decode greedily one
token at a time, and measure the stored bytes after the prefill and after the
decode steps (against a 16-bit dense cache of the same tokens), and the peak memory the prefill and decode take
above what the same method takes for a 64-token prompt (so one-time costs, such as kernel compilation, cancel): on
CUDA the allocator's peak, on CPU (``peak_rss``) the peak resident set of a fresh process per method and length.
Times are medians over repeats and are also given relative to ``full`` (a ``DynamicCache``) measured in the same
run at the same length, which is always included. Every output file starts with how and where it was measured.

Capacity (`run_capacity`): under a memory budget, the largest batch each method decodes at a context length, and
its tokens/s there.
"""

from __future__ import annotations

import copy
import csv
import datetime
import gc
import io
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..prefill import prefill
from .methods import Spec, make_cache, method_label, parse_method
from .report import markdown_table, pyplot, save_png
from .results import write_atomic
from .tasks.base import encode, fit_length
from .tasks.passkey import passkey_example
from .timing import clock


@dataclass(frozen=True)
class BenchRow:
    method: str
    length: int
    batch: int
    cache_bytes: int  # stored, after the decode steps
    dense_bytes: int  # a 16-bit DynamicCache of the same tokens
    ratio: float  # cache_bytes / dense_bytes
    prefill_cache_bytes: int  # stored right after the prefill (before any deferred compaction)
    prefill_s: float  # median over repeats
    decode_ms_per_token: float  # median over repeats; one step (a token for every batch row)
    tokens_per_s: float  # batch tokens per second of decode
    prefill_vs_full: float
    decode_vs_full: float
    peak_memory_bytes: int | None  # prefill + decode, above the 64-token peak; CPU: only with ``peak_rss``
    prefill_chunk: int | None  # tokens per prefill forward (None: the whole prompt in one)


def bench_prompt(tokenizer: PreTrainedTokenizerBase | None, length: int, seed: int = 0, vocab: int = 0) -> list[int]:
    """Exactly ``length`` token ids of passkey-style text (a seeded key in the middle of the filler); without a
    tokenizer (a random-weight model), seeded random ids below ``vocab``."""
    if tokenizer is None:
        return torch.randint(vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    key = str(random.Random(f"bench:{seed}").randint(10000, 99999))
    example, _ = fit_length(lambda n: passkey_example(n, 0.5, key), tokenizer, length + 64, start=max(length // 8, 1))
    ids = encode(tokenizer, example)[0]
    if len(ids) < length:
        raise ValueError(f"could not build a {length}-token prompt (got {len(ids)})")
    return ids[:length]


SMALL = 64  # tokens of the prompt whose peak memory is each method's baseline
WARM = 512  # tokens of a warm-up prompt: enough for rows to leave the exact window into every tier


def _prefill(model: PreTrainedModel, tokens: torch.Tensor, cache, prefill_chunk: int | None) -> torch.Tensor:
    """Prefill ``tokens`` into ``cache`` (``prefill_chunk`` tokens per forward); the first greedy token per row."""
    if prefill_chunk is not None and tokens.shape[1] > 1:  # all but the last token in chunks; it gives the logits
        prefill(model, cache, tokens[:, :-1], chunk_size=prefill_chunk)
        tokens = tokens[:, -1:]
    logits = model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def _decode(model: PreTrainedModel, cache, token: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` greedy decode steps from ``token``."""
    start = clock(model.device)
    for _ in range(steps):
        logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
    return clock(model.device) - start


@torch.inference_mode()
def _measure(
    model: PreTrainedModel, ids: list[list[int]], spec: Spec, decode_tokens: int, prefill_chunk: int | None = None
) -> dict:
    """One repeat: prefill the rows of ``ids`` into a fresh cache (``prefill_chunk`` tokens per forward), read its
    bytes, decode ``decode_tokens`` greedy tokens."""
    from leankv_hf.monitor import cache_nbytes, dense_nbytes

    device = model.device
    cuda = device.type == "cuda"
    cache = make_cache(spec, model)
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = clock(device)
    token = _prefill(model, torch.tensor(ids, device=device), cache, prefill_chunk)
    prefill_s = clock(device) - start
    after_prompt = cache_nbytes(cache)
    decode_s = _decode(model, cache, token, decode_tokens)
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    return {
        "prefill_s": prefill_s,
        "decode_ms": 1000 * decode_s / decode_tokens,
        "after_prompt": after_prompt,
        "stored": cache_nbytes(cache),
        "dense": dense_nbytes(cache),
        "peak": peak,
    }


def _warm_length(length: int, prefill_chunk: int | None) -> int:
    """Tokens of a warm-up prompt that takes every path a ``length``-token one does (with a chunked prefill, chunks
    that meet a compressed body, and decode steps that read every tier), so one-time costs such as kernel compilation
    fall outside the measurements."""
    return min(length, WARM if prefill_chunk is None else 2 * prefill_chunk + WARM)


def _resident_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in KiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _resident_peak(run) -> int:
    """Bytes the resident set grows by at its highest while ``run()`` runs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _resident_kib("VmRSS")
    run()
    return 1024 * (_resident_kib("VmHWM") - before)


def peak_rss(
    model_name: str, dtype: str | None, spec: Spec, ids: list[list[int]], decode_tokens: int, prefill_chunk: int | None
) -> int:
    """Peak resident memory of one ``_measure`` of ``ids`` above that of a ``SMALL``-token prompt, both in one fresh
    process (CPU; Linux). The allocator returns every large buffer at once (a fixed mmap threshold), so the
    resident set follows the live tensors rather than what malloc keeps."""
    job = dict(model=model_name, dtype=dtype, spec=spec, ids=ids, decode=decode_tokens, chunk=prefill_chunk)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "leankv_hf.eval.bench"], input=json.dumps(job), env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory process for {method_label(spec)} failed:\n{done.stderr[-3000:]}")
    return int(done.stdout.strip().splitlines()[-1])


def _peak_rss_job() -> None:
    """The process `peak_rss` starts: the job as JSON on stdin, the peak in bytes on the last line of stdout."""
    from leankv_hf.models import load_model

    job = json.loads(sys.stdin.read())
    model, _ = load_model(job["model"], dtype=job["dtype"])
    ids, spec = job["ids"], job["spec"]

    def measure(length: int):
        return lambda: _measure(model, [row[:length] for row in ids], spec, job["decode"], job["chunk"])

    length = len(ids[0])
    measure(_warm_length(length, job["chunk"]))()  # compile every path first: outside both measurements
    small = _resident_peak(measure(SMALL))
    print(_resident_peak(measure(length)) - small)


def run_bench(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: Sequence[Spec],
    lengths: Sequence[int] = (1024, 2048, 4096, 8192),
    decode_tokens: int = 32,
    repeats: int = 3,
    seed: int = 0,
    prefill_chunk: int | None = None,
    rss_of: str | None = None,
    batch: int = 1,
) -> list[BenchRow]:
    """Measure every method (``full`` added first when missing) at every length, ``batch`` prompts at once. Repeats
    go round the methods (full, a, b, full, a, b, ...), so a slow spell of a shared machine lands on every method
    alike. ``rss_of``: the model's name or path, to measure peak memory on CPU (`peak_rss`, one process per method
    and length)."""
    for spec in methods:
        parse_method(spec)
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk={prefill_chunk!r} must be an int >= 1, or None (one forward)")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} must be an int >= 1")
    if rss_of is not None and (model.device.type != "cpu" or not os.path.exists("/proc/self/clear_refs")):
        raise ValueError(f"peak resident memory is measured on CPU under Linux; the model is on {model.device}")
    methods = list(methods) if "full" in [method_label(m) for m in methods] else ["full", *methods]

    def prompts(length: int) -> list[list[int]]:
        return [bench_prompt(tokenizer, length, seed + row, model.config.vocab_size) for row in range(batch)]

    warm = prompts(_warm_length(max(lengths), prefill_chunk))
    small_peak = {}
    for spec in methods:  # first calls pay for allocations and lazy imports: keep them out of every measurement
        _measure(model, warm, spec, 2, prefill_chunk)
        small = [row[:SMALL] for row in warm]
        small_peak[method_label(spec)] = _measure(model, small, spec, decode_tokens, prefill_chunk)["peak"]
    rows = []
    for length in lengths:
        ids = prompts(length)
        runs_of = {method_label(spec): [] for spec in methods}
        for _ in range(repeats):
            for spec in methods:
                runs_of[method_label(spec)].append(_measure(model, ids, spec, decode_tokens, prefill_chunk))
        measured = {}
        for spec in methods:
            label, runs = method_label(spec), runs_of[method_label(spec)]
            if rss_of is not None:
                peak = peak_rss(
                    rss_of, str(model.dtype).removeprefix("torch."), spec, ids, decode_tokens, prefill_chunk
                )
            else:
                peak = None if runs[-1]["peak"] is None else max(r["peak"] for r in runs) - small_peak[label]
            measured[label] = {
                "prefill_s": statistics.median(r["prefill_s"] for r in runs),
                "decode_ms": statistics.median(r["decode_ms"] for r in runs),
                "stored": runs[-1]["stored"],
                "dense": runs[-1]["dense"],
                "after_prompt": runs[-1]["after_prompt"],
                "peak": peak,
            }
        full = measured["full"]
        for label, m in measured.items():
            rows.append(
                BenchRow(
                    method=label,
                    length=length,
                    batch=batch,
                    cache_bytes=m["stored"],
                    dense_bytes=m["dense"],
                    ratio=m["stored"] / m["dense"] if m["dense"] else float("nan"),
                    prefill_cache_bytes=m["after_prompt"],
                    prefill_s=m["prefill_s"],
                    decode_ms_per_token=m["decode_ms"],
                    tokens_per_s=1000 * batch / m["decode_ms"],
                    prefill_vs_full=m["prefill_s"] / full["prefill_s"],
                    decode_vs_full=m["decode_ms"] / full["decode_ms"],
                    peak_memory_bytes=m["peak"],
                    prefill_chunk=prefill_chunk,
                )
            )
    return rows


@dataclass(frozen=True)
class CapacityRow:
    method: str
    length: int
    budget_bytes: int
    batch: int  # the largest batch that decodes within the budget (0: not one row)
    memory_bytes: int  # what that batch took: CUDA peak above what was allocated before it; CPU: its stored cache
    tokens_per_s: float  # decode throughput at that batch
    batch_vs_full: float
    tokens_per_s_vs_full: float


MAX_BATCH = 4096


@torch.inference_mode()
def _capacity(model, ids: list[int], spec: Spec, budget: int, decode_tokens: int, prefill_chunk: int | None):
    """(batch, memory, tokens/s) of the largest batch of ``ids``' context that ``spec`` decodes within ``budget``
    bytes. One context is prefilled, then its cache repeated to each candidate batch (requests sharing a prompt, or
    prefilled one at a time and decoded together, as a server does); a batch fits when decoding two steps peaks
    within the budget (CUDA: the allocator's peak above what was allocated before the batch; CPU: the stored
    cache) and runs out of no memory. Doubling, then bisection."""
    from leankv_hf.monitor import cache_nbytes

    device = model.device
    cuda = device.type == "cuda"
    cache = make_cache(spec, model)
    token = _prefill(model, torch.tensor([ids], device=device), cache, prefill_chunk)

    def trial(batch: int, steps: int) -> tuple[int, float] | None:
        """(memory, seconds for ``steps`` decode steps) at ``batch``, or None when it does not fit."""
        gc.collect()  # what earlier trials left: a cache held in a reference cycle would count against this one
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        try:
            batched = copy.deepcopy(cache)
            batched.batch_repeat_interleave(batch)
            seconds = _decode(model, batched, token.repeat_interleave(batch, 0), steps)
            memory = torch.cuda.max_memory_allocated(device) - base if cuda else cache_nbytes(batched)
        except torch.OutOfMemoryError:
            return None
        finally:
            batched = None
        return (memory, seconds) if memory <= budget else None

    fits, fails = 0, None
    while fails is None and fits < MAX_BATCH:
        candidate = max(1, 2 * fits)
        if trial(candidate, 2) is None:
            fails = candidate
        else:
            fits = candidate
    while fails is not None and fails - fits > 1:
        middle = (fits + fails) // 2
        if trial(middle, 2) is None:
            fails = middle
        else:
            fits = middle
    while fits:  # the full measurement; a batch that fitted two steps but not more (the cache grew): one row fewer
        measured = trial(fits, decode_tokens)
        if measured is not None:
            memory, seconds = measured
            return fits, memory, fits * decode_tokens / seconds
        fits -= 1
    return 0, 0, 0.0


def run_capacity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    methods: Sequence[Spec],
    lengths: Sequence[int],
    budget_gb: float,
    decode_tokens: int = 16,
    seed: int = 0,
    prefill_chunk: int | None = None,
) -> list[CapacityRow]:
    """Per method (``full`` first) and length: the largest batch that decodes within ``budget_gb`` GiB, and its
    tokens/s (`_capacity`), also as ratios to ``full``'s."""
    for spec in methods:
        parse_method(spec)
    if not budget_gb > 0:
        raise ValueError(f"budget_gb={budget_gb!r} must be > 0")
    methods = list(methods) if "full" in [method_label(m) for m in methods] else ["full", *methods]
    budget = int(budget_gb * 2**30)
    _capacity(model, bench_prompt(tokenizer, SMALL, seed, model.config.vocab_size), methods[0], budget, 2, None)
    rows = []
    for length in lengths:
        ids = bench_prompt(tokenizer, length, seed, model.config.vocab_size)
        found = {
            method_label(spec): _capacity(model, ids, spec, budget, decode_tokens, prefill_chunk) for spec in methods
        }
        full_batch, _, full_speed = found["full"]
        for label, (batch, memory, speed) in found.items():
            rows.append(
                CapacityRow(
                    method=label,
                    length=length,
                    budget_bytes=budget,
                    batch=batch,
                    memory_bytes=memory,
                    tokens_per_s=speed,
                    batch_vs_full=batch / full_batch if full_batch else float("nan"),
                    tokens_per_s_vs_full=speed / full_speed if full_speed else float("nan"),
                )
            )
    return rows


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(model: PreTrainedModel, command: str | None = None) -> dict[str, str]:
    """How and where a measurement was taken, for the header of every output file."""
    device = model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "command": command if command is not None else shlex.join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": f"{device} ({name})",
        "threads": str(torch.get_num_threads()),
        "dtype": str(model.dtype),
    }


def _write_tables(rows: Sequence, out_dir: Path, name: str, env: dict[str, str]) -> list[Path]:
    """``{name}.csv`` (``#`` header lines saying how it was measured) and ``{name}.md`` of dataclass ``rows``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(rows[0])]
    buffer = io.StringIO()
    buffer.writelines(f"# {key}: {value}\n" for key, value in env.items())
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    write_atomic(out_dir / f"{name}.csv", buffer.getvalue())
    header = "".join(f"- {key}: `{value}`\n" for key, value in env.items())
    table = markdown_table(tuple(names), [tuple(asdict(r).values()) for r in rows])
    write_atomic(out_dir / f"{name}.md", f"# leankv bench ({name})\n\n{header}\n{table}\n")
    return [out_dir / f"{name}.csv", out_dir / f"{name}.md"]


def write_capacity(rows: Sequence[CapacityRow], out_dir: str | Path, env: dict[str, str]) -> list[Path]:
    """``capacity.csv`` and ``capacity.md`` in ``out_dir``."""
    return _write_tables(rows, Path(out_dir), "capacity", env)


def write_bench(rows: Sequence[BenchRow], out_dir: str | Path, env: dict[str, str]) -> list[Path]:
    """``bench.csv`` (``#`` header lines), ``bench.md`` and ``bench.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    tables = _write_tables(rows, out_dir, "bench", env)

    plt = pyplot()
    peaks = all(r.peak_memory_bytes is not None for r in rows)
    figure, panels = plt.subplots(1, 3 if peaks else 2, figsize=(16 if peaks else 11, 4))
    speed, size = panels[:2]
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        speed.plot([r.length for r in mine], [r.decode_ms_per_token for r in mine], marker="o", label=method)
        size.plot([r.length for r in mine], [r.cache_bytes / 2**20 for r in mine], marker="o", label=method)
        if peaks:
            panels[2].plot([r.length for r in mine], [r.peak_memory_bytes / 2**20 for r in mine], marker="o")
    speed.set(xlabel="context length (tokens)", ylabel="decode ms / token", title="decode speed")
    size.set(xlabel="context length (tokens)", ylabel="KV cache MiB (stored)", title="cache size")
    if peaks:
        chunk = rows[0].prefill_chunk
        panels[2].set(
            xlabel="context length (tokens)",
            ylabel=f"MiB above a {SMALL}-token prompt's peak",
            title="peak memory" + (f" (prefill chunk {chunk})" if chunk else ""),
        )
    for axes in panels:
        axes.grid(alpha=0.3)
    size.legend(fontsize=8)
    figure.suptitle(
        f"{env['device']}, {env['threads']} threads, torch {env['torch']}, transformers {env['transformers']}, {env['date']}",
        fontsize=8,
    )
    figure.text(0.01, -0.02, env["command"], fontsize=7, family="monospace")
    plot = save_png(figure, out_dir / "bench.png")
    plt.close(figure)
    return [*tables, plot]


if __name__ == "__main__":
    _peak_rss_job()
