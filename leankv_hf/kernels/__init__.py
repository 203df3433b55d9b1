"""Decode kernels that read a ragged store's rows where they lie, behind one dispatch by device: numba on CPU
(`cpu`, the ``cpu`` extra), Triton on CUDA (`gpu`, triton ships with CUDA builds of torch). Where neither applies
(another device, a missing package, rows they do not read, ``LEANKV_FUSED=0``) attention takes the padded view;
both give the same products up to float summation order.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..quant import QuantizedTensor
from . import cpu


def enabled(device: torch.device | str = "cpu") -> bool:
    """Whether the kernels for ``device`` may run: their package importable, not switched off (``LEANKV_FUSED=0``)."""
    if os.environ.get("LEANKV_FUSED", "1") == "0":
        return False
    kind = torch.device(device).type
    if kind == "cpu":
        return cpu.numba is not None
    return kind == "cuda" and _has_triton()


@functools.cache
def _has_triton() -> bool:  # asked at every decode step of every layer: look it up once
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _gpu():
    from . import gpu  # imports triton: only once a CUDA cache decodes

    return gpu


def in_place(parts: list, segments: list[torch.Tensor], shape: tuple[int, int, int]):
    """A reader of ``parts`` (one side of some stores) that gives `store.PaddedRows`' products in place, or None
    where no kernel reads them. ``segments``: per part, its ``[3, B * H]`` starts, counts and offsets."""
    device = parts[0].device
    if not enabled(device):
        return None
    backend = cpu if device.type == "cpu" else _gpu()
    return backend.CodedRows(parts, segments, shape) if backend.fusable(parts) else None


def quantize(
    x: torch.Tensor, bits: int, group: int, axis: str, fmt: str, scale_dtype: torch.dtype
) -> QuantizedTensor | None:
    """`quant.quantize` in one kernel call (`cpu.quantize`: the same bits), or None where no kernel does it."""
    if not enabled(x.device) or not cpu.quantizable(x, bits, group, axis, fmt, scale_dtype):
        return None
    return cpu.quantize(x, bits, group)


def decode_step(keys, values, stores: list):
    """A decode step over ``stores`` in one call (`cpu.DecodeStep`, or `gpu.DecodeStep`'s three launches), from their
    readers ``keys``/``values`` (`in_place`, one backend), where there are at most two stores; else None (attention
    combines the readers' products itself)."""
    if len(stores) > 2:
        return None
    backend = cpu if isinstance(keys, cpu.CodedRows) else _gpu()
    return backend.DecodeStep(keys, values, stores)


def fold(scores: torch.Tensor, n: int, held: list[tuple], width: int, reduce: str = "mean") -> None:
    """`store.fold_scores` for the rows of several stores at once, each row reading ``scores[B, H, ...]`` at its
    slot; ``held``: per store ``(store, segment)`` (`PaddedLayout.segments`), ``width`` the longest head's rows.
    Call where `enabled` for the scores' device."""
    if scores.device.type != "cpu":
        _gpu().fold(scores, n, held, width, reduce)
        return
    cpu.fold(scores, n, [(segment, store.scores, store.ages) for store, segment in held], reduce)


def _on_cpu(t: torch.Tensor) -> bool:
    """Whether the CPU-only kernels (compaction's) may run on ``t``: it is on CPU and they are `enabled` there."""
    return t.device.type == "cpu" and enabled(t.device)


def compaction_plan(counts: torch.Tensor, target: torch.Tensor, exiting: int) -> tuple | None:
    """`compaction.plan`'s fields in one CPU kernel call (`cpu.compaction_plan`), or None where it does not run."""
    if not _on_cpu(counts):
        return None
    return cpu.compaction_plan(counts, target.to(torch.int8).contiguous(), exiting)


def compaction_moves(
    stores: list, counts: torch.Tensor, target: torch.Tensor, exiting: int, window: tuple, start: int
) -> list[tuple | None] | None:
    """A compaction's plan in one CPU kernel call and each changed store's new rows in one more
    (`cpu.compaction_moves`), or None where it does not run."""
    if not _on_cpu(counts) or not cpu.movable(stores, window[0]):
        return None
    return cpu.compaction_moves(stores, counts, target.to(torch.int8).contiguous(), exiting, window, start)


def candidate_table(counts: torch.Tensor, scores, positions, recent, recent_valid, exiting: int, start: int):
    """`compaction.candidate_table` in one CPU kernel call (`cpu.candidate_table`), or None where it does not run."""
    if not _on_cpu(counts):
        return None
    return cpu.candidate_table(counts, scores, positions, recent, recent_valid, exiting, start)


def pooled(scores: torch.Tensor, positions: torch.Tensor, pooling: int) -> torch.Tensor | None:
    """`policy.Policy.pooled` in one CPU kernel call (`cpu.pooled`), or None where it does not run."""
    if not _on_cpu(scores):
        return None
    return cpu.pooled(scores, positions, pooling)


def topk_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """`policy.topk_mask` in one CPU kernel call (`cpu.topk_mask`), or None where it does not run."""
    if not _on_cpu(scores):
        return None
    return cpu.topk_mask(scores, k)
