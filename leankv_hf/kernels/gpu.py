"""Triton decode kernels: attention reads a ragged store's rows where they lie, on the GPU.

The padded view (`store.PaddedLayout.view`) gathers every stored row into a ``[B, H, W, D]`` body at every decode
step, then dequantizes it: a dozen small launches per layer whose cost, at decode sizes, is the launches themselves
and the copies. Here one kernel per product reads each (batch, KV head) segment's rows in place, from one or two
stores (a layer's tiers): packed int8/int4/int2 codes with a scale and zero per row group (applied on load), or
16-bit rows as they are. The query rows of one KV head (its GQA group) go together, and long heads are split across
programs (``ROWS`` rows each), so one long head does not serialise a layer. `scores` writes each row's logit at its
slot (the softmax and the policies' running scores need them); `weigh` writes one partial output per program,
summed in one pass (deterministic, no atomics); `fold` updates each row's running score in place. A decode step
(`DecodeStep`) does all of it with the exact window in three launches per layer: each program scores its share of a
head's rows (or the window) and keeps a partial softmax of them, one pass per head combines those into the output
(flash-decoding), and one more folds the attention every row received into its score.

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
def _fold_into(score, ages, where, valid, seen, n, PEAK: tl.constexpr):
    """Entries ``where`` of a running score (fp16 for a store's rows, float32 for the window) and its uint8 ages
    received ``seen`` over ``n`` queries (their sum, or with ``PEAK`` their maximum): the score becomes the running
    mean (or the maximum), the age saturates at 255 (`store.fold_scores`' arithmetic, in place)."""
    old = tl.load(score + where, mask=valid, other=0.0).to(tl.float32)
    weight = tl.load(ages + where, mask=valid, other=0).to(tl.float32)
    if PEAK:
        new = tl.maximum(old, seen)
    else:
        new = (old * weight + seen) / (weight + n)
    tl.store(score + where, new.to(score.dtype.element_ty), mask=valid)
    tl.store(ages + where, tl.minimum(weight + n, MAX_AGE).to(tl.uint8), mask=valid)


@triton.jit
def _fold_kernel(observed, row_stride, score, ages, segs, segments, n, PEAK: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``start(s) + j`` received ``observed[s, offset(s) + j]`` over ``n`` queries (`_fold_into`)."""
    s = tl.program_id(0)
    start, offset, lo, hi = _span(segs, segments, s, tl.program_id(1), BLOCK)
    j = lo + tl.arange(0, BLOCK)
    valid = j < hi
    seen = tl.load(observed + s * row_stride + offset + j, mask=valid, other=0.0).to(tl.float32)
    _fold_into(score, ages, start + j, valid, seen, n, PEAK)


@triton.jit
def _online(z, m, total, acc, v):
    """Logits ``z[Q, N]`` and their value rows ``v[N, D]`` into a running softmax: the maximum ``m[Q]`` so far, the
    sum ``total[Q]`` of exponentials against it, and the weighted values ``acc[Q, D]`` (flash attention's update; a
    row of -inf adds nothing)."""
    new = tl.maximum(m, tl.max(z, axis=1))
    safe = tl.where(new == float("-inf"), 0.0, new)
    p = tl.exp(z - safe[:, None])
    rescale = tl.exp(m - safe)
    total = total * rescale + tl.sum(p, axis=1)
    acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    return new, total, acc


@triton.jit
def _attend_part(
    qr, q_ok, cols_k, cols, scale, keys, k_scale, k_zero, values, v_scale, v_zero, segs, segments, s, program,
    per_program, logits, logit_rows, m, total, acc,
    DK: tl.constexpr, D: tl.constexpr, BITS_K: tl.constexpr, GROUP_K: tl.constexpr, BITS_V: tl.constexpr,
    GROUP_V: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """A program's rows of one store: their logits written at their slots, and folded into the running softmax."""
    start, offset, lo, hi = _span(segs, segments, s, program, per_program)
    for first in range(lo, hi, BLOCK_N):
        j = first + tl.arange(0, BLOCK_N)
        valid = j < hi
        x = _rows(keys, k_scale, k_zero, start + j, valid, cols_k, DK, BITS_K, GROUP_K)
        z = tl.where(valid[None, :], tl.sum(qr[:, None, :] * x[None, :, :], axis=2) * scale, float("-inf"))
        tl.store(logits + logit_rows[:, None] + (offset + j)[None, :], z, mask=q_ok[:, None] & valid[None, :])
        v = _rows(values, v_scale, v_zero, start + j, valid, cols, D, BITS_V, GROUP_V)
        m, total, acc = _online(z, m, total, acc, v)
    return m, total, acc


@triton.jit
def _step_kernel(
    query, reduced, window_keys, window_values, visible, scale,
    keys_a, k_scale_a, k_zero_a, values_a, v_scale_a, v_zero_a, segs_a,
    keys_b, k_scale_b, k_zero_b, values_b, v_scale_b, v_zero_b, segs_b,
    logits, most, totals, partial, query_rows, heads, span, width, segments, programs, per_program,
    DK: tl.constexpr, D: tl.constexpr, BITS_KA: tl.constexpr, GROUP_KA: tl.constexpr, BITS_VA: tl.constexpr,
    GROUP_VA: tl.constexpr, BITS_KB: tl.constexpr, GROUP_KB: tl.constexpr, BITS_VB: tl.constexpr,
    GROUP_VB: tl.constexpr, TWO: tl.constexpr, VISIBLE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program ``p`` of segment ``s`` attends its share of the stores' rows (part a for ``p < programs``, then part b)
    or, the last program, the exact window: the query heads of the segment's KV head together, their logits
    written at their slots (stored rows at ``offset(s) + j``, window token ``r`` at ``width + r``), and its partial
    softmax (maximum, sum, weighted values) written for `_combine_kernel`."""
    s, program = tl.program_id(0), tl.program_id(1)
    q = tl.arange(0, BLOCK_Q)
    q_ok, cols_k, cols = q < query_rows, tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_D)
    logit_rows = (s * query_rows + q) * (width + span)
    m = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    window = tl.num_programs(1) - 1
    if program == window:
        qv = tl.load(
            query + (s * query_rows + q)[:, None] * D + cols[None, :],
            mask=q_ok[:, None] & (cols < D)[None, :],
            other=0.0,
        ).to(tl.float32)
        for first in range(0, span, BLOCK_N):
            r = first + tl.arange(0, BLOCK_N)
            valid = r < span
            tile = (s * span + r)[:, None] * D + cols[None, :]
            tile_ok = valid[:, None] & (cols < D)[None, :]
            x = tl.load(window_keys + tile, mask=tile_ok, other=0.0).to(tl.float32)
            seen = valid
            if VISIBLE:
                seen = valid & (tl.load(visible + (s // heads) * span + r, mask=valid, other=0) != 0)
            z = tl.where(seen[None, :], tl.sum(qv[:, None, :] * x[None, :, :], axis=2) * scale, float("-inf"))
            tl.store(logits + logit_rows[:, None] + (width + r)[None, :], z, mask=q_ok[:, None] & valid[None, :])
            v = tl.load(window_values + tile, mask=tile_ok, other=0.0).to(tl.float32)
            m, total, acc = _online(z, m, total, acc, v)
    else:
        qr = tl.load(
            reduced + (s * query_rows + q)[:, None] * DK + cols_k[None, :],
            mask=q_ok[:, None] & (cols_k < DK)[None, :],
            other=0.0,
        ).to(tl.float32)
        if TWO and program >= programs:
            m, total, acc = _attend_part(
                qr, q_ok, cols_k, cols, scale, keys_b, k_scale_b, k_zero_b, values_b, v_scale_b, v_zero_b, segs_b,
                segments, s, program - programs, per_program, logits, logit_rows, m, total, acc,
                DK, D, BITS_KB, GROUP_KB, BITS_VB, GROUP_VB, BLOCK_N,
            )  # fmt: skip
        else:
            m, total, acc = _attend_part(
                qr, q_ok, cols_k, cols, scale, keys_a, k_scale_a, k_zero_a, values_a, v_scale_a, v_zero_a, segs_a,
                segments, s, program, per_program, logits, logit_rows, m, total, acc,
                DK, D, BITS_KA, GROUP_KA, BITS_VA, GROUP_VA, BLOCK_N,
            )  # fmt: skip
    at = (s * tl.num_programs(1) + program) * query_rows + q
    tl.store(most + at, m, mask=q_ok)
    tl.store(totals + at, total, mask=q_ok)
    tl.store(partial + at[:, None] * D + cols[None, :], acc, mask=q_ok[:, None] & (cols < D)[None, :])


@triton.jit
def _combine_kernel(
    most, totals, partial, out, query_rows, programs,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Segment ``s``'s programs' partial softmaxes (`_step_kernel`) rescaled to their common maximum, in program order
    (the same sum on every run): ``out[s, q]``, and each query head's maximum and sum over the segment written back
    in program 0's place for `_fold_step_kernel`."""
    s = tl.program_id(0)
    q = tl.arange(0, BLOCK_Q)
    q_ok, cols = q < query_rows, tl.arange(0, BLOCK_D)
    first = s * programs * query_rows + q
    m = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    for program in range(0, programs):
        m = tl.maximum(m, tl.load(most + first + program * query_rows, mask=q_ok, other=float("-inf")))
    safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    for program in range(0, programs):
        at = first + program * query_rows
        factor = tl.exp(tl.load(most + at, mask=q_ok, other=float("-inf")) - safe)
        total += factor * tl.load(totals + at, mask=q_ok, other=0.0)
        part = tl.load(partial + at[:, None] * D + cols[None, :], mask=q_ok[:, None] & (cols < D)[None, :], other=0.0)
        acc += factor[:, None] * part
    tl.store(
        out + (s * query_rows + q)[:, None] * D + cols[None, :],
        acc / total[:, None],
        mask=q_ok[:, None] & (cols < D)[None, :],
    )
    tl.store(most + first, safe, mask=q_ok)
    tl.store(totals + first, total, mask=q_ok)


@triton.jit
def _received(logits, logit_rows, slots, valid, m, total, q_ok, query_rows, BY_MAX: tl.constexpr):
    """What the segment's query heads gave each slot, ``exp(logit - m) / total`` per head: their maximum, or mean."""
    z = tl.load(logits + logit_rows[:, None] + slots[None, :], mask=q_ok[:, None] & valid[None, :], other=float("-inf"))
    p = tl.where(q_ok[:, None], tl.exp(z - m[:, None]) / total[:, None], 0.0)
    if BY_MAX:
        return tl.max(p, axis=0)
    return tl.sum(p, axis=0) / query_rows


@triton.jit
def _fold_step_kernel(
    logits, most, totals, score_a, ages_a, segs_a, score_b, ages_b, segs_b, recent, recent_ages,
    query_rows, span, width, segments, programs, per_program,
    TWO: tl.constexpr, BY_MAX: tl.constexpr, PEAK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The rows `_step_kernel`'s program ``p`` attended (its share of a store's rows, or the window) each fold the
    attention they received (`_received`, against the segment's maximum and sum from `_combine_kernel`) into their
    running score and age (`_fold_into`)."""
    s, program = tl.program_id(0), tl.program_id(1)
    q = tl.arange(0, BLOCK_Q)
    q_ok = q < query_rows
    logit_rows = (s * query_rows + q) * (width + span)
    stats = s * tl.num_programs(1) * query_rows + q
    m = tl.load(most + stats, mask=q_ok, other=0.0)
    total = tl.load(totals + stats, mask=q_ok, other=1.0)
    if program == tl.num_programs(1) - 1:
        for token in range(0, span, BLOCK_N):  # (a name of its own: the other branch's rows count in int64)
            r = token + tl.arange(0, BLOCK_N)
            valid = r < span
            seen = _received(logits, logit_rows, width + r, valid, m, total, q_ok, query_rows, BY_MAX)
            _fold_into(recent, recent_ages, s * span + r, valid, seen, 1, PEAK)
    else:
        part = program
        score, ages, segs = score_a, ages_a, segs_a
        if TWO and program >= programs:
            part = program - programs
            score, ages, segs = score_b, ages_b, segs_b
        start, offset, lo, hi = _span(segs, segments, s, part, per_program)
        for first in range(lo, hi, BLOCK_N):
            j = first + tl.arange(0, BLOCK_N)
            valid = j < hi
            seen = _received(logits, logit_rows, offset + j, valid, m, total, q_ok, query_rows, BY_MAX)
            _fold_into(score, ages, start + j, valid, seen, 1, PEAK)


def _part(rows: QuantizedTensor | torch.Tensor) -> tuple[tuple, int, int]:
    """A part's tensors (codes or rows, scale, zero: the rows again for 16-bit rows, never read), bits, group."""
    if isinstance(rows, QuantizedTensor):
        return (rows.payload, rows.scale, rows.zero), rows.bits, rows.group_size
    return (rows, rows, rows), 16, 1


def _blocks(query_rows: int, dim: int, every_row: bool = False) -> tuple[int, int, int]:
    """Query rows, stored rows and columns one program holds: the query rows of a KV head together (up to 16, the
    rest in more programs; ``every_row``: all of them, as a decode step's softmax is not combined across programs
    of query rows), as many stored rows as `TILE` allows (16 to `ROWS`)."""
    block_q = triton.next_power_of_2(query_rows)
    block_q = block_q if every_row else min(block_q, 16)
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


class DecodeStep:
    """One decode query per query head over the rows of one or two stores, read in place, and the exact window, in
    three launches per layer: `_step_kernel` (each program a share of a head's rows, or its window: logits, and a
    partial softmax over them, flash-decoding), `_combine_kernel` (the output) and `_fold_step_kernel` (the attention
    each row and window token received, folded into its running score). The same call as `cpu.DecodeStep`; no
    host sync: every size is known when the stores' layout is made."""

    def __init__(self, keys: CodedRows, values: CodedRows, stores: list):
        if keys.two != values.two or keys.programs != values.programs:
            raise ValueError("keys and values must read the same stores")
        self.keys, self.values = keys, values
        self.stores = stores

    def __call__(
        self,
        query: torch.Tensor,
        reduced: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        visible: torch.Tensor | None,
        scale: float,
        by_max: bool,
        peak: bool,
        recent: torch.Tensor,
        recent_ages: torch.Tensor,
    ) -> torch.Tensor:
        """As `cpu.DecodeStep.__call__`: ``query[B, H, G, D]``, ``reduced`` what scores the stored keys, the window
        ``keys``/``values`` ``[B, H, R, D]``, ``visible[B, R]`` (None: all); ``recent``/``recent_ages`` ``[B, H, R]``
        and the stores' scores and ages are updated in place. Returns the output ``[B, H, G, D]``."""
        batch, heads, groups, dim = query.shape
        segments, span, width = batch * heads, keys.shape[2], self.keys.shape[2]
        k, v = self.keys, self.values
        parts = 2 if k.two else 1
        programs = k.programs * parts + 1  # and the window's
        device = query.device
        logits = torch.empty(segments, groups, width + span, device=device)
        most, totals = (torch.empty(segments, programs, groups, device=device) for _ in range(2))
        partial = torch.empty(segments, programs, groups, dim, device=device)
        out = torch.empty(segments, groups, dim, device=device)
        block_q, block_n, block_d = _blocks(groups, dim, every_row=True)
        block_dk = max(triton.next_power_of_2(k.dim), 16)  # low-rank keys: fewer columns than the values
        tensors_a, tensors_b = ((*k.args[i : i + 3], *v.args[i : i + 3], k.args[i + 3]) for i in (0, 4))
        _step_kernel[(segments, programs)](
            query.contiguous(), reduced.contiguous(), keys.contiguous(), values.contiguous(),
            keys if visible is None else visible.contiguous(), scale, *tensors_a, *tensors_b,
            logits, most, totals, partial, groups, heads, span, width, segments, k.programs, k.per_program,
            DK=k.dim, D=dim, BITS_KA=k.bits_a, GROUP_KA=k.group_a, BITS_VA=v.bits_a, GROUP_VA=v.group_a,
            BITS_KB=k.bits_b, GROUP_KB=k.group_b, BITS_VB=v.bits_b, GROUP_VB=v.group_b, TWO=k.two,
            VISIBLE=visible is not None, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_DK=block_dk, BLOCK_D=block_d,
        )  # fmt: skip
        _combine_kernel[(segments,)](
            most, totals, partial, out, groups, programs, D=dim, BLOCK_Q=block_q, BLOCK_D=block_d
        )
        held = [(store.scores, store.ages) for store in self.stores]
        (score_a, ages_a), (score_b, ages_b) = held[0], held[-1]
        _fold_step_kernel[(segments, programs)](
            logits, most, totals, score_a, ages_a, k.args[3], score_b, ages_b, k.args[7],
            recent.view(segments, span), recent_ages.view(segments, span),  # in place: a copy would be lost
            groups, span, width, segments, k.programs, k.per_program,
            TWO=k.two, BY_MAX=by_max, PEAK=peak, BLOCK_Q=block_q, BLOCK_N=ROWS,
        )  # fmt: skip
        return out.view(batch, heads, groups, dim).to(query.dtype)


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
