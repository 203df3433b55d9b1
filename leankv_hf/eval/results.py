"""The results directory: one JSON row per (method, setting, example), appended durably, so a run resumes.

Each row is written as one whole line, flushed and fsynced: a crash can leave at most one partial last line,
which readers ignore and ``drop_partial_line`` removes before appending. With several processes each writes its
own ``rows.rank{K}.jsonl``; the main process folds them into ``rows.jsonl``. Summaries are replaced atomically.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

ROWS = "rows.jsonl"
TEMPORARY = ".partial"  # the suffix of a file being written (`write_atomic`); a killed run can leave one behind

Key = tuple[str, str, str]


def row_key(row: dict) -> Key:
    """What identifies a row for resuming: (method, setting, example id)."""
    return row["method"], row["setting"], row["id"]


def shard_path(out_dir: str | Path, rank: int, world_size: int) -> Path:
    """``rows.jsonl`` for a single process, ``rows.rank{K}.jsonl`` for process K of several."""
    return Path(out_dir) / (ROWS if world_size == 1 else f"rows.rank{rank}.jsonl")


def read_rows(path: str | Path) -> list[dict]:
    """The complete rows of one file; a partial last line (an interrupted write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_bytes().split(b"\n")[:-1], start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: unreadable row ignored (it will be recomputed)", path, number)
    return rows


def remove_partial_files(out_dir: str | Path) -> None:
    """Delete what a run killed inside `write_atomic` left: its temporary files (never read)."""
    for path in Path(out_dir).glob(f".*{TEMPORARY}"):
        path.unlink(missing_ok=True)


def drop_partial_line(path: str | Path) -> None:
    """Cut an interrupted last line off ``path`` so that the next append starts on a fresh line."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        log.warning("%s: dropped a partial last line (%d bytes) from an interrupted run", path, len(data) - keep)
        os.truncate(path, keep)


def append_rows(path: str | Path, rows: list[dict]) -> None:
    """Append rows, each as a single line, in one durable write (flush + fsync). An interrupted write leaves
    whole lines and at most one partial last line; the rows of an example missing any of its lines are run again
    (the first copy of a row is the one read)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def all_rows(out_dir: str | Path) -> list[dict]:
    """Rows of ``rows.jsonl`` and of every per-process file, first occurrence of each key kept."""
    out_dir = Path(out_dir)
    rows: dict[Key, dict] = {}
    for path in [out_dir / ROWS, *sorted(out_dir.glob("rows.rank*.jsonl"))]:
        for row in read_rows(path):
            rows.setdefault(row_key(row), row)
    return list(rows.values())


def merge_shards(out_dir: str | Path) -> list[dict]:
    """Fold the per-process files into ``rows.jsonl`` (atomically) and remove them; returns all rows."""
    out_dir = Path(out_dir)
    shards = sorted(out_dir.glob("rows.rank*.jsonl"))
    rows = all_rows(out_dir)
    if shards:
        write_atomic(out_dir / ROWS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        for shard in shards:
            shard.unlink()
    return rows


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write through a temporary file in the same directory and ``os.replace`` it: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
