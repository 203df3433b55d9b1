"""From rows to answers: a summary per task x method x setting (JSON + markdown) and PNG plots.

Sizes are relative to a 16-bit ``DynamicCache`` holding the same tokens (``ratio`` = stored / dense bytes at the
end of each example, so 0.25 means 4x smaller; a float32 model's full cache reads 2.0); tables and plots show
its inverse, the compression factor (4x). "After prompt" is the stored size right after the prefill, before any
deferred compaction. Scores are means over examples, x 100.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from operator import attrgetter
from pathlib import Path

from .results import write_atomic

REFERENCE = "full"


@dataclass(frozen=True)
class Entry:
    """One summary line. ``score`` is None for perplexity, whose quality is ``ppl``/``delta_nll``/``kl``."""

    task: str
    method: str
    setting: str
    n: int
    score: float | None
    ratio: float
    cache_bytes: float
    dense_bytes: float
    prefill_cache_bytes: float
    prefill_s: float
    decode_ms_per_token: float | None
    nll: float | None = None
    ppl: float | None = None
    kl: float | None = None
    delta_nll: float | None = None

    @property
    def compression(self) -> float:
        """How many times smaller than a 16-bit dense cache (``1 / ratio``)."""
        return self.dense_bytes / self.cache_bytes if self.cache_bytes else math.inf


def _columns(*quality: tuple[str, Callable[[Entry], object]]) -> tuple[tuple[str, Callable[[Entry], object]], ...]:
    """Summary table columns: which example set, the quality columns, then size and speed."""
    return (
        ("task", attrgetter("task")),
        ("method", attrgetter("method")),
        ("setting", attrgetter("setting")),
        ("n", attrgetter("n")),
        *quality,
        ("compression ×", attrgetter("compression")),
        ("KV MiB", lambda e: e.cache_bytes / 2**20),
        ("KV MiB after prompt", lambda e: e.prefill_cache_bytes / 2**20),
        ("prefill s", attrgetter("prefill_s")),
        ("decode ms/tok", attrgetter("decode_ms_per_token")),
    )


GENERATION_COLUMNS = _columns(("score", attrgetter("score")))
TEACHER_FORCED_COLUMNS = _columns(
    ("ppl", attrgetter("ppl")), ("Δnll vs full", attrgetter("delta_nll")), ("KL(full‖method)", attrgetter("kl"))
)


@dataclass(frozen=True)
class Summary:
    entries: list[Entry]

    def to_dict(self) -> dict:
        return {"entries": [asdict(e) for e in self.entries]}

    def to_markdown(self) -> str:
        parts = []
        for columns, entries in (
            (GENERATION_COLUMNS, [e for e in self.entries if e.score is not None]),
            (TEACHER_FORCED_COLUMNS, [e for e in self.entries if e.score is None]),
        ):
            if entries:
                rows = [tuple(get(e) for _, get in columns) for e in entries]
                parts.append(markdown_table(tuple(name for name, _ in columns), rows))
        return "\n\n".join(parts) + "\n"


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(header: tuple[str, ...], rows: Iterable[tuple]) -> str:
    """A GitHub markdown table; floats to 4 significant digits, None as a dash."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def summarize(rows: Iterable[dict]) -> Summary:
    """Aggregate rows per (task, method, setting), in order of first appearance."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["task"], row["method"], row["setting"]].append(row)
    entries = []
    for (task, method, setting), group in groups.items():
        decode_tokens = sum(r["decode_tokens"] for r in group)
        perplexity = "nll" in group[0]
        tokens = sum(r["tokens"] for r in group) if perplexity else 0
        nll = sum(r["nll"] for r in group) / tokens if perplexity else None
        entries.append(
            Entry(
                task=task,
                method=method,
                setting=setting,
                n=len(group),
                score=None if perplexity else 100 * _mean(r["score"] for r in group),
                ratio=_mean(r["ratio"] for r in group),
                cache_bytes=_mean(r["cache_bytes"] for r in group),
                dense_bytes=_mean(r["dense_bytes"] for r in group),
                prefill_cache_bytes=_mean(r["prefill_cache_bytes"] for r in group),
                prefill_s=_mean(r["prefill_s"] for r in group),
                decode_ms_per_token=1000 * sum(r["decode_s"] for r in group) / decode_tokens if decode_tokens else None,
                nll=nll,
                ppl=math.exp(nll) if perplexity else None,
                kl=sum(r["kl"] for r in group) / tokens if perplexity else None,
            )
        )
    reference = {(e.task, e.setting): e.nll for e in entries if e.method == REFERENCE and e.nll is not None}
    return Summary(
        [
            e if e.nll is None or (e.task, e.setting) not in reference else _with_delta(e, reference[e.task, e.setting])
            for e in entries
        ]
    )


def _with_delta(entry: Entry, reference_nll: float) -> Entry:
    return Entry(**{**asdict(entry), "delta_nll": entry.nll - reference_nll})


def slug(text: str) -> str:
    """A file-name-safe version of a task or method name."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


def save_png(figure, path: Path) -> Path:
    """Save a matplotlib figure as a PNG, atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    write_atomic(path, buffer.getvalue())
    return path


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (imported lazily: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_score_vs_ratio(summary: Summary, out_dir: str | Path) -> list[Path]:
    """One PNG per task: quality against compression vs 16-bit dense, one labelled point per method (and setting,
    when several were run). Quality is the score, or for perplexity the KL to the full cache (log scale; the
    full cache itself, at KL 0, is left out)."""
    plt = pyplot()
    by_task: dict[str, list[Entry]] = defaultdict(list)
    for entry in summary.entries:
        by_task[entry.task].append(entry)
    paths = []
    for task, entries in by_task.items():
        several_settings = len({e.setting for e in entries}) > 1
        scored = entries[0].score is not None
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for e in entries:
            y = e.score if scored else e.kl
            if not scored and not y:
                continue
            axes.scatter(e.compression, y)
            label = f"{e.method} ({e.setting})" if several_settings else e.method
            axes.annotate(label, (e.compression, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        axes.set_xlabel("compression vs 16-bit dense (x, real bytes, higher is smaller)")
        if scored:
            axes.set_ylim(-5, 105)
            axes.set_ylabel("score (0-100)")
        else:
            axes.set_yscale("log")
            axes.set_ylabel("mean KL(full || method) per token (lower is better)")
        axes.margins(x=0.2)
        axes.set_title(task)
        axes.grid(alpha=0.3)
        paths.append(save_png(figure, Path(out_dir) / f"score_vs_ratio_{slug(task)}.png"))
        plt.close(figure)
    return paths


def _tokens(length: int | str) -> float:
    """Sort key for lengths given as token counts or as buckets such as "6.5k"."""
    text = str(length).lower()
    return float(text[:-1]) * 1024 if text.endswith("k") else float(text)


def plot_passkey_heatmaps(rows: Iterable[dict], out_dir: str | Path) -> list[Path]:
    """One PNG per passkey method x setting: accuracy over context length (rows) x needle depth (columns)."""
    plt = pyplot()
    cells: dict[tuple[str, str], dict[tuple[float, float], list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["task"] == "passkey":
            cells[row["method"], row["setting"]][row["metadata"]["length"], row["metadata"]["depth"]].append(
                row["score"]
            )
    paths = []
    for (method, setting), grid in cells.items():
        lengths = sorted({length for length, _ in grid}, key=_tokens)
        depths = sorted({depth for _, depth in grid})
        matrix = [
            [_mean(grid[length, depth]) if (length, depth) in grid else math.nan for depth in depths]
            for length in lengths
        ]
        figure, axes = plt.subplots(figsize=(1.2 + 0.9 * len(depths), 1.0 + 0.6 * len(lengths)))
        image = axes.imshow(matrix, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, line in enumerate(matrix):
            for j, value in enumerate(line):
                axes.text(j, i, "" if math.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8)
        axes.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        axes.set_yticks(range(len(lengths)), [str(length) for length in lengths])
        axes.set_xlabel("needle depth")
        axes.set_ylabel("context length (tokens)")
        axes.set_title(f"passkey: {method} ({setting})")
        figure.colorbar(image, ax=axes, label="accuracy")
        paths.append(save_png(figure, Path(out_dir) / f"passkey_heatmap_{slug(method)}_{setting}.png"))
        plt.close(figure)
    return paths


def write_report(rows: list[dict], out_dir: str | Path) -> Summary:
    """Write ``summary.json``, ``summary.md`` and the plots for all ``rows``; returns the summary."""
    out_dir = Path(out_dir)
    summary = summarize(rows)
    write_atomic(out_dir / "summary.json", json.dumps(summary.to_dict(), indent=2) + "\n")
    write_atomic(out_dir / "summary.md", summary.to_markdown())
    plot_score_vs_ratio(summary, out_dir)
    plot_passkey_heatmaps(rows, out_dir)
    return summary
