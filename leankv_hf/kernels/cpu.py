"""Fused CPU decode kernels: attention reads int-coded ragged rows where they lie (numba).

The padded view (`store.PaddedLayout.view`) copies every stored row into a ``[B, H, W, D]`` float body at every
decode step: concatenate the stores, gather the rows, convert the codes, then two matmuls read the floats again.
On CPU those passes cost more than the arithmetic. These kernels walk each head's rows in the stores themselves
and apply each row's scale and zero on the fly, so a code is read once and no float body exists. Only the
logits ``[B, H, Q, W]`` (the softmax needs them) and the outputs are written.

Used for stores on CPU whose rows are int codes with per-token groups, when numba is installed (the ``cpu``
extra); everything else takes the padded view. Both give the same products up to float summation order.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from ..quant import QuantizedTensor
from ..quant.packing import unpack

try:
    import numba
    import numpy as np

    if "NUMBA_THREADING_LAYER" not in os.environ:  # numba's OpenMP layer would reset torch's thread count
        numba.config.THREADING_LAYER = "workqueue"
except ImportError:  # the padded view serves instead
    numba = None

QUERY_BLOCK = 4  # query rows a kernel scores together (one code read feeds four accumulators)


def fusable(parts: list) -> bool:
    """Whether every part is CPU int codes with per-token groups and 16-bit scales (what the kernels read)."""
    return all(
        isinstance(p, QuantizedTensor)
        and p.fmt == "int"
        and p.axis == "token"
        and p.device.type == "cpu"
        and p.scale.dtype in _SIXTEEN_BIT
        for p in parts
    )


_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


@functools.cache
def _to_float32(dtype: torch.dtype):
    """Every 16-bit pattern of ``dtype`` as float32: the kernels read 16-bit scales and zeros through it (numba has
    no 16-bit floats), so they are never converted in a separate pass."""
    bits = np.arange(2**16, dtype=np.uint32)
    if dtype == torch.bfloat16:
        return (bits << 16).view(np.float32)
    return bits.astype(np.uint16).view(np.float16).astype(np.float32)


def _bits(t: torch.Tensor):
    """A 16-bit float tensor's bit patterns as a uint16 array (no copy)."""
    return t.view(torch.int16).numpy().view(np.uint16)


@functools.cache
def _kernels(groups: int):
    """The two kernels for rows of ``groups`` quantization groups. The count is a compile-time constant: with a
    runtime count LLVM leaves the inner loops scalar (about 4x slower)."""
    f32 = np.float32

    @numba.njit(fastmath=True, boundscheck=False, parallel=True)
    def scores(query, codes, scale, zero, lut, starts, counts, offsets, out):  # pragma: no cover (jit)
        """``out[s, r, offsets[s] + j] = query[s, r] . row(starts[s] + j)``, a row being ``codes * scale + zero``
        per group (``lut`` turns the 16-bit scale and zero into float32). Query rows come in blocks of four
        (padded with zeros): each code read feeds four accumulators. Segments (batch, head) run in parallel."""
        segments, rows, dim = query.shape
        size = dim // groups
        for s in numba.prange(segments):
            q = query[s]
            sums = np.empty((rows, groups), np.float32)  # per query row and group: what the zeros multiply
            for r in range(rows):
                for g in range(groups):
                    sums[r, g] = q[r, g * size : g * size + size].sum()
            for j in range(counts[s]):
                i = starts[s] + j
                row = codes[i]
                slot = offsets[s] + j
                for r in range(0, rows, 4):
                    t0 = f32(0)
                    t1 = f32(0)
                    t2 = f32(0)
                    t3 = f32(0)
                    for g in range(groups):
                        a0 = f32(0)
                        a1 = f32(0)
                        a2 = f32(0)
                        a3 = f32(0)
                        for d in range(g * size, g * size + size):
                            x = f32(row[d])
                            a0 += q[r, d] * x
                            a1 += q[r + 1, d] * x
                            a2 += q[r + 2, d] * x
                            a3 += q[r + 3, d] * x
                        sc = lut[scale[i, g]]
                        ze = lut[zero[i, g]]
                        t0 += a0 * sc + ze * sums[r, g]
                        t1 += a1 * sc + ze * sums[r + 1, g]
                        t2 += a2 * sc + ze * sums[r + 2, g]
                        t3 += a3 * sc + ze * sums[r + 3, g]
                    out[s, r, slot] = t0
                    out[s, r + 1, slot] = t1
                    out[s, r + 2, slot] = t2
                    out[s, r + 3, slot] = t3

    @numba.njit(fastmath=True, boundscheck=False, parallel=True)
    def weigh(probs, codes, scale, zero, lut, starts, counts, offsets, out):  # pragma: no cover (jit)
        """``out[s, r] += sum_j probs[s, r, offsets[s] + j] * row(starts[s] + j)``, segments in parallel."""
        segments, rows, dim = out.shape
        size = dim // groups
        for s in numba.prange(segments):
            for j in range(counts[s]):
                i = starts[s] + j
                row = codes[i]
                slot = offsets[s] + j
                for r in range(rows):
                    w = probs[s, r, slot]
                    for g in range(groups):
                        ws = w * lut[scale[i, g]]
                        wz = w * lut[zero[i, g]]
                        for d in range(g * size, g * size + size):
                            out[s, r, d] += ws * f32(row[d]) + wz

    return scores, weigh


if numba is not None:

    @numba.njit(boundscheck=False, cache=True)
    def _fold(scores, starts, counts, offsets, n, peak, score, lut, ages, out):  # pragma: no cover (jit)
        """Row ``i = starts[s] + j`` received ``scores[s, offsets[s] + j]`` over ``n`` queries (their sum, or with
        ``peak`` their maximum): its new score goes to ``out[i]`` (the old one read from fp16 bits through ``lut``),
        its age saturates at 255. The arithmetic is `store.fold_scores`'s, in the same order (no fastmath)."""
        for s in range(counts.shape[0]):
            for j in range(counts[s]):
                i = starts[s] + j
                weight = np.float32(ages[i])
                total = weight + np.float32(n)
                seen = scores[s, offsets[s] + j]
                old = lut[score[i]]
                if peak:
                    out[i] = max(old, seen)
                else:
                    out[i] = (old * weight + seen) / total
                ages[i] = min(total, 255.0)


def fold(scores: torch.Tensor, n: int, stores: list[tuple], reduce: str = "mean") -> list[torch.Tensor]:
    """`store.fold_scores` for the rows of several stores, reading ``scores[B, H, W]`` at their slots: per store
    ``(segments, score, ages)`` (``segments`` per `PaddedLayout.segments`, ``score`` fp16); returns each store's new
    float32 scores and updates its ``ages`` (uint8) in place."""
    flat = scores.float().flatten(0, 1).contiguous().numpy()
    lut = _to_float32(torch.float16)
    folded = []
    for segments, score, ages in stores:
        out = torch.empty(score.shape[0])
        _fold(flat, *(t.numpy() for t in segments), n, reduce == "max", _bits(score), lut, ages.numpy(), out.numpy())
        folded.append(out)
    return folded


def _use_torch_threads() -> None:
    """Run the kernels on as many threads as torch is given (``torch.set_num_threads``, ``OMP_NUM_THREADS``)."""
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


@dataclass
class _Part:
    """One store's side as the kernels read it: codes ``[N, D]`` uint8, 16-bit scale/zero ``[N, groups]`` bits
    with the table that reads them, and per (batch, head) segment its first row, row count and first slot."""

    codes: object
    scale: object
    zero: object
    lut: object
    starts: object
    counts: object
    offsets: object


class CodedRows:
    """The rows of some stores' keys or values, read in place: the products of `store.PaddedRows` (``scores``,
    ``weigh``) without a padded copy. ``segments`` holds, per store, ``(starts, counts, offsets)`` per (batch,
    head) as int64 tensors (`PaddedLayout.segments`)."""

    def __init__(self, parts: list[QuantizedTensor], segments: list[tuple], shape: tuple[int, int, int]):
        self.shape = shape  # (batch, heads, width)
        self.dim = parts[0].last_dim
        self.parts = [
            _Part(
                unpack(p.payload, p.bits).numpy(),
                _bits(p.scale),
                _bits(p.zero),
                _to_float32(p.scale.dtype),
                *(t.numpy() for t in seg),
            )
            for p, seg in zip(parts, segments, strict=True)
        ]

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """``query[B, H, Q, D] @ rows^T`` -> ``[B, H, Q, W]``, -inf in empty slots (so attention needs no mask)."""
        _use_torch_threads()
        batch, heads, width = self.shape
        rows = query.shape[2]
        padded = -(-rows // QUERY_BLOCK) * QUERY_BLOCK
        block = query.new_zeros(batch * heads, padded, self.dim, dtype=torch.float32)
        block[:, :rows] = query.reshape(batch * heads, rows, self.dim)
        out = torch.full((batch * heads, padded, width), -torch.inf)
        block_np, out_np = block.numpy(), out.numpy()
        for p in self.parts:
            scores = _kernels(p.scale.shape[1])[0]
            scores(block_np, p.codes, p.scale, p.zero, p.lut, p.starts, p.counts, p.offsets, out_np)
        return out[:, :rows].view(batch, heads, rows, width).to(query.dtype)

    def weigh(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs[B, H, Q, W] @ rows`` -> ``[B, H, Q, D]``."""
        _use_torch_threads()
        batch, heads, rows, width = probs.shape
        flat = probs.float().reshape(batch * heads, rows, width).contiguous()
        out = torch.zeros(batch * heads, rows, self.dim)
        flat_np, out_np = flat.numpy(), out.numpy()
        for part in self.parts:
            weigh = _kernels(part.scale.shape[1])[1]
            weigh(flat_np, part.codes, part.scale, part.zero, part.lut, part.starts, part.counts, part.offsets, out_np)
        return out.view(batch, heads, rows, self.dim).to(probs.dtype)
