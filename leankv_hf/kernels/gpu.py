"""Triton decode kernels: attention reads a ragged store's rows where they lie, on the GPU.

The padded view (`store.PaddedLayout.view`) gathers every stored row into a ``[B, H, W, D]`` body at every decode
step, then dequantizes it: a dozen small launches per layer whose cost, at decode sizes, is the launches themselves
and the copies. Here one kernel per product reads each (batch, KV head) segment's rows in place, from one or two
stores (a layer's tiers): packed int8/int4/int2 codes with a scale and zero per row group (applied on load), or
16-bit rows as they are. The query rows of one KV head (its GQA group) go together, and long heads are split across
programs (``ROWS`` rows each), so one long head does not serialise a layer. `scores` writes each row's logit at its
slot (the softmax and the policies' running scores need them); `weigh` writes one partial output per program,
summed in one pass (deterministic, no atomics); `fold` updates each row's running score in place.

Written with the Triton API common to 3.6 (the lent GPUs) and 3.9, and tested on CPU under ``TRITON_INTERPRET=1``
(tests/test_triton.py): every value is converted to float32 right after its load (the interpreter holds bfloat16 as
integers), every load is masked, and products are broadcast sums rather than ``tl.dot`` (exact float32 on every
target, and no minimum block sizes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import QuantizedTensor

ROWS = 64  # fewest stored rows one program reads (a longer segment is split across programs)
PROGRAMS = 1024  # programs a product aims for in all: enough to fill a GPU, few partial outputs to sum
TILE = 8192  # float32 products one program holds per step (query rows x stored rows x head dim)
MAX_AGE = tl.constexpr(255)  # `store.MAX_AGE`


def fusable(parts: list) -> bool:
    """Whether the kernels read every part (at most two): contiguous int codes with per-token groups, or
    contiguous floating rows as they are."""
    return len(parts) <= 2 and all(
        (isinstance(p, QuantizedTensor) and p.fmt == "int" and p.axis == "token" and p.payload.is_contiguous())
        or (isinstance(p, torch.Tensor) and p.is_floating_point() and p.is_contiguous())
        for p in parts
    )


@triton.jit
def _rows(codes, scale, zero, rows, valid, cols, D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr):
    """Stored rows ``rows`` as float32 ``[len(rows), len(cols)]``; zero where not ``valid`` or beyond ``D``."""
    mask = valid[:, None] & (cols < D)[None, :]
    if BITS == 16:
        x = tl.load(codes + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        per_byte: tl.constexpr = 8 // BITS
        packed = tl.load(codes + rows[:, None] * (D // per_byte) + (cols // per_byte)[None, :], mask=mask, other=0)
        code = (packed.to(tl.int32) >> ((cols % per_byte) * BITS)[None, :]) & ((1 << BITS) - 1)
        group = rows[:, None] * (D // GROUP) + (cols // GROUP)[None, :]
        s = tl.load(scale + group, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(zero + group, mask=mask, other=0.0).to(tl.float32)
        x = code.to(tl.float32) * s + z
    return x


@triton.jit
def _span(segs, segments, s, program, per_program):
    """Segment ``s``'s first row and first slot, and the rows ``[lo, hi)`` of it that ``program`` reads
    (``segs``: starts, counts, offsets, ``segments`` each; ``per_program`` rows a program)."""
    start, count, offset = tl.load(segs + s), tl.load(segs + segments + s), tl.load(segs + 2 * segments + s)
    lo = program * per_program
    return start, offset, lo, tl.minimum(count, lo + per_program)


@triton.jit
def _scores_part(
    qv, q, q_ok, cols, codes, scale, zero, segs, segments, s, program, per_program, out, query_rows, width,
    D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    start, offset, lo, hi = _span(segs, segments, s, program, per_program)
    for first in range(lo, hi, BLOCK_N):
        j = first + tl.arange(0, BLOCK_N)
        valid = j < hi
        x = _rows(codes, scale, zero, start + j, valid, cols, D, BITS, GROUP)
        logits = tl.sum(qv[:, None, :] * x[None, :, :], axis=2)
        slots = (s * query_rows + q)[:, None] * width + (offset + j)[None, :]
        tl.store(out + slots, logits, mask=q_ok[:, None] & valid[None, :])


@triton.jit
def _scores_kernel(
    query, codes_a, scale_a, zero_a, segs_a, codes_b, scale_b, zero_b, segs_b, out,
    query_rows, width, segments, programs, per_program,
    D: tl.constexpr, BITS_A: tl.constexpr, GROUP_A: tl.constexpr, BITS_B: tl.constexpr, GROUP_B: tl.constexpr,
    TWO: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``out[s, r, offset(s) + j] = query[s, r] . row(start(s) + j)``, for the rows of part a (programs
    ``[0, programs)`` of axis 1) and of part b (the next ``programs``)."""
    s, program = tl.program_id(0), tl.program_id(1)
    q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok, cols = q < query_rows, tl.arange(0, BLOCK_D)
    qv = tl.load(
        query + (s * query_rows + q)[:, None] * D + cols[None, :], mask=q_ok[:, None] & (cols < D)[None, :], other=0.0
    ).to(tl.float32)
    if TWO and program >= programs:
        _scores_part(
            qv, q, q_ok, cols, codes_b, scale_b, zero_b, segs_b, segments, s, program - programs, per_program, out,
            query_rows, width, D, BITS_B, GROUP_B, BLOCK_N,
        )  # fmt: skip
    else:
        _scores_part(
            qv, q, q_ok, cols, codes_a, scale_a, zero_a, segs_a, segments, s, program, per_program, out,
            query_rows, width, D, BITS_A, GROUP_A, BLOCK_N,
        )  # fmt: skip


@triton.jit
def _weigh_part(
    q, q_ok, cols, probs, segment_stride, row_stride, codes, scale, zero, segs, segments, s, program, per_program,
    D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    start, offset, lo, hi = _span(segs, segments, s, program, per_program)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for first in range(lo, hi, BLOCK_N):
        j = first + tl.arange(0, BLOCK_N)
        valid = j < hi
        p = tl.load(
            probs + s * segment_stride + q[:, None] * row_stride + (offset + j)[None, :],
            mask=q_ok[:, None] & valid[None, :],
            other=0.0,
        ).to(tl.float32)
        x = _rows(codes, scale, zero, start + j, valid, cols, D, BITS, GROUP)
        acc += tl.sum(p[:, :, None] * x[None, :, :], axis=1)
    return acc


@triton.jit
def _weigh_kernel(
    probs, codes_a, scale_a, zero_a, segs_a, codes_b, scale_b, zero_b, segs_b, partial,
    query_rows, segment_stride, row_stride, segments, programs, per_program,
    D: tl.constexpr, BITS_A: tl.constexpr, GROUP_A: tl.constexpr, BITS_B: tl.constexpr, GROUP_B: tl.constexpr,
    TWO: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``partial[s, p, r] = sum_j probs[s, r, offset(s) + j] * row(start(s) + j)`` over program ``p``'s rows (part a
    for ``p < programs``, else part b)."""
    s, program = tl.program_id(0), tl.program_id(1)
    q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok, cols = q < query_rows, tl.arange(0, BLOCK_D)
    if TWO and program >= programs:
        acc = _weigh_part(
            q, q_ok, cols, probs, segment_stride, row_stride, codes_b, scale_b, zero_b, segs_b, segments, s,
            program - programs, per_program, D, BITS_B, GROUP_B, BLOCK_Q, BLOCK_N, BLOCK_D,
        )  # fmt: skip
    else:
        acc = _weigh_part(
            q, q_ok, cols, probs, segment_stride, row_stride, codes_a, scale_a, zero_a, segs_a, segments, s,
            program, per_program, D, BITS_A, GROUP_A, BLOCK_Q, BLOCK_N, BLOCK_D,
        )  # fmt: skip
    where = ((s * tl.num_programs(1) + program) * query_rows + q)[:, None] * D + cols[None, :]
    tl.store(partial + where, acc, mask=q_ok[:, None] & (cols < D)[None, :])


@triton.jit
def _fold_kernel(observed, row_stride, score, ages, segs, segments, n, PEAK: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``start(s) + j`` received ``observed[s, offset(s) + j]`` over ``n`` queries (their sum, or with ``PEAK``
    their maximum): its fp16 score becomes the running mean (or the maximum) and its uint8 age saturates at 255
    (`store.fold_scores`' arithmetic, in place)."""
    s = tl.program_id(0)
    start, offset, lo, hi = _span(segs, segments, s, tl.program_id(1), BLOCK)
    j = lo + tl.arange(0, BLOCK)
    valid = j < hi
    seen = tl.load(observed + s * row_stride + offset + j, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(score + start + j, mask=valid, other=0.0).to(tl.float32)
    weight = tl.load(ages + start + j, mask=valid, other=0).to(tl.float32)
    if PEAK:
        new = tl.maximum(old, seen)
    else:
        new = (old * weight + seen) / (weight + n)
    tl.store(score + start + j, new.to(tl.float16), mask=valid)
    tl.store(ages + start + j, tl.minimum(weight + n, MAX_AGE).to(tl.uint8), mask=valid)


def _part(rows: QuantizedTensor | torch.Tensor) -> tuple[tuple, int, int]:
    """A part's tensors (codes or rows, scale, zero: the rows again for 16-bit rows, never read), bits, group."""
    if isinstance(rows, QuantizedTensor):
        return (rows.payload, rows.scale, rows.zero), rows.bits, rows.group_size
    return (rows, rows, rows), 16, 1


def _blocks(query_rows: int, dim: int) -> tuple[int, int, int]:
    """Query rows, stored rows and columns one program holds: the query rows of a KV head together (up to 16),
    as many stored rows as `TILE` allows (16 to `ROWS`)."""
    block_q = min(triton.next_power_of_2(query_rows), 16)
    block_d = max(triton.next_power_of_2(dim), 16)
    return block_q, min(ROWS, max(16, TILE // (block_q * block_d))), block_d


class CodedRows:
    """The rows of one or two stores' keys or values, read in place on the GPU: the products of `store.PaddedRows`
    (``scores``, ``weigh``) without a padded copy. ``segments`` holds, per store, its starts, counts and offsets per
    (batch, head): a contiguous int64 ``[3, B * H]`` tensor on the rows' device (`PaddedLayout.segments`)."""

    def __init__(self, parts: list, segments: list[torch.Tensor], shape: tuple[int, int, int]):
        self.shape = shape  # (batch, heads, width)
        self.dim = parts[0].last_dim if isinstance(parts[0], QuantizedTensor) else parts[0].shape[-1]
        read = [(*_part(p), seg) for p, seg in zip(parts, segments, strict=True)]
        (tensors_a, self.bits_a, self.group_a, segs_a), *rest = read
        tensors_b, self.bits_b, self.group_b, segs_b = rest[0] if rest else read[0]
        self.two = bool(rest)
        self.args = (*tensors_a, segs_a, *tensors_b, segs_b)
        # Per segment and part: enough programs of whole row blocks for the longest head, about `PROGRAMS` in all.
        batch, heads, width = shape
        wanted = max(1, min(-(-width // ROWS), PROGRAMS // (batch * heads * len(read))))
        self.per_program = -(-width // (wanted * ROWS)) * ROWS
        self.programs = -(-width // self.per_program)

    def _launch(self, rows: int) -> tuple[tuple[int, int, int], dict]:
        """The grid and compile-time constants of a product for ``rows`` query rows per segment."""
        block_q, block_n, block_d = _blocks(rows, self.dim)
        batch, heads, _ = self.shape
        grid = batch * heads, self.programs * (2 if self.two else 1), triton.cdiv(rows, block_q)
        return grid, dict(
            D=self.dim, BITS_A=self.bits_a, GROUP_A=self.group_a, BITS_B=self.bits_b, GROUP_B=self.group_b,
            TWO=self.two, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
        )  # fmt: skip

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """``query[B, H, Q, D] @ rows^T`` -> ``[B, H, Q, W]``, -inf in empty slots (so attention needs no mask)."""
        batch, heads, width = self.shape
        rows = query.shape[2]
        flat = query.reshape(batch * heads, rows, self.dim).contiguous()
        out = torch.full((batch * heads, rows, width), -torch.inf, device=query.device)
        grid, constants = self._launch(rows)
        _scores_kernel[grid](
            flat, *self.args, out, rows, width, batch * heads, self.programs, self.per_program, **constants
        )
        return out.view(batch, heads, rows, width).to(query.dtype)

    def weigh(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs[B, H, Q, W] @ rows`` -> ``[B, H, Q, D]``; ``probs`` may be a slice of wider rows."""
        batch, heads, rows, _ = probs.shape
        probs = _by_segment(probs)
        grid, constants = self._launch(rows)
        partial = torch.empty(batch * heads, grid[1], rows, self.dim, device=probs.device)
        _weigh_kernel[grid](
            probs, *self.args, partial, rows, probs.stride(1), probs.stride(2), batch * heads, self.programs,
            self.per_program, **constants,
        )  # fmt: skip
        return partial.sum(1).view(batch, heads, rows, self.dim).to(probs.dtype)


def _by_segment(x: torch.Tensor) -> torch.Tensor:
    """``x[B, H, ...]`` as the kernels index it: unit stride in the last dim, and (batch, head) segment ``s`` at
    ``s * x.stride(1)`` (a slice of wider rows qualifies as it is; anything else is copied)."""
    if x.stride(-1) != 1 or x.stride(0) != x.shape[1] * x.stride(1):
        return x.contiguous()
    return x


def fold(observed: torch.Tensor, n: int, held: list[tuple], width: int, reduce: str = "mean") -> None:
    """`store.fold_scores` in place for the rows of some stores, each row reading ``observed[B, H, ...]`` at its
    slot; ``held``: per store ``(store, segment)`` (`PaddedLayout.segments`), ``width`` the longest head's rows."""
    batch, heads = observed.shape[:2]
    observed = _by_segment(observed)
    grid = (batch * heads, -(-width // ROWS))
    for store, segment in held:
        _fold_kernel[grid](
            observed, observed.stride(1), store.scores, store.ages, segment, batch * heads, n,
            PEAK=reduce == "max", BLOCK=ROWS,
        )  # fmt: skip
