"""Fused CPU decode kernels: attention reads int-coded ragged rows where they lie (numba).

The padded view (`store.PaddedLayout.view`) copies every stored row into a ``[B, H, W, D]`` float body at every
decode step: concatenate the stores, gather the rows, convert the codes, then two matmuls read the floats again.
On CPU those passes cost more than the arithmetic. These kernels walk each head's rows in the stores themselves,
read the packed bytes as they are (no unpacked copy) and apply each row's scale and zero on the fly, so a code is
read once and no float body exists. Only the logits ``[B, H, Q, W]`` (the softmax needs them) and the outputs are
written. Long heads are split into tasks so that a few heads still use every thread, on numba's OpenMP layer
where it loads (a parallel region starts in microseconds there).

Two forms: the products alone (`CodedRows`: ``scores``, ``weigh``), and a whole decode step of a compressing layer in
one call (`DecodeStep`: the stored rows of one or two tiers and the exact window, the softmax, the output, and the
attention each row received folded into its running score). At decode sizes the torch operations between separate
kernels cost more than the kernels; the one-call step removes them.

Used for stores on CPU whose rows are int codes with per-token groups or 16-bit floats, when numba is installed
(the ``cpu`` extra); everything else takes the padded view. Both give the same products up to float summation order.
A kernel compiles at its first call for each mix of precisions (tens of seconds) and numba caches it on disk, so
later processes load it (`_named`); every variant has a name of its own, so that no two cached kernels hold different
routines under one name (`_variant`).
"""

from __future__ import annotations

import functools
import gc
import os
import threading
from dataclasses import dataclass

import torch

from ..quant import QuantizedTensor

try:
    import numba
    import numpy as np

    # A kernel call is a parallel region: OpenMP starts one in microseconds, the workqueue layer in ~100 us (as much
    # as a decode step's kernel work). Where OpenMP is missing, numba takes the next layer that loads.
    if "NUMBA_THREADING_LAYER" not in os.environ and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
except ImportError:  # the padded view serves instead
    numba = None


def _prange_only() -> dict:
    """numba's ``parallel`` option that runs the prange loops alone in parallel. ``parallel=True`` also turns each
    ``np.zeros`` or array fill in a kernel into a parallel region of its own, and a decode step's kernel call then
    started a dozen, each costing more than the few bytes it fills. A new dict per kernel: numba empties the one it
    is given."""
    return {
        "prange": True,
        **dict.fromkeys(
            ("comprehension", "reduction", "inplace_binop", "setitem", "numpy", "stencil", "fusion"), False
        ),
    }


QUERY_BLOCK = 4  # query rows a kernel scores together (one code read feeds four accumulators)
CHUNK = 256  # stored rows one parallel task reads: a long head is split, so a few heads still fill every thread
QUANTIZE_CHUNK = 64  # rows one task quantizes: a compaction's few hundred still split evenly over the threads
MOVE_CHUNK = 1024  # rows one task of a compaction's move writes (most are copied, in blocks)


def fusable(parts: list) -> bool:
    """Whether every part is what the kernels read, on CPU: int codes with per-token groups and 16-bit scales, each
    group a whole number of bytes, or contiguous 16-bit rows."""
    return all(
        p.device.type == "cpu"
        and (
            (
                isinstance(p, QuantizedTensor)
                and p.fmt == "int"
                and p.axis == "token"
                and p.scale.dtype in _SIXTEEN_BIT
                and p.group_size % (8 // p.bits) == 0
            )
            or (isinstance(p, torch.Tensor) and p.dtype in _SIXTEEN_BIT and p.is_contiguous())
        )
        for p in parts
    )


_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


@functools.cache
def _powers(dtype: torch.dtype):
    """How the kernels read a 16-bit float (numba has none) from its bits: ``(powers, mantissa bits)``, ``powers``
    the power of two (with its sign) for each sign and exponent pattern, so that a value is its integer significand
    times one of them (`_float16`). A few hundred bytes that stay in cache, where a table of every pattern (256 KB)
    costs a cache miss per read. Exact for finite values."""
    mantissa = 7 if dtype == torch.bfloat16 else 10
    exponent = 15 - mantissa
    bias = 2 ** (exponent - 1) - 1
    top = np.arange(2 ** (exponent + 1))
    biased = np.maximum(top % 2**exponent, 1)  # a subnormal has the smallest normal exponent
    sign = np.where(top >> exponent, -1.0, 1.0)
    return (sign * np.exp2(biased - bias - mantissa)).astype(np.float32), mantissa


def _bits(t: torch.Tensor):
    """A 16-bit float tensor's bit patterns as a uint16 array (no copy)."""
    return t.view(torch.int16).numpy().view(np.uint16)


def _named(dispatchers: tuple, family: str) -> tuple:
    """``dispatchers``, given identities that are the same in every process. numba keys a cached kernel by the
    pickled values its closure holds (here: the routines it calls), and a dispatcher pickles with an identity drawn
    at random per process; so named, a kernel compiled once loads from numba's cache (``cache=True``) in every later
    process instead of compiling again (tens of seconds before a first decode step)."""
    for i, dispatcher in enumerate(dispatchers):
        # numba's own hook, a private one: should a numba lack it, kernels still run, each process compiling its own
        name = getattr(dispatcher, "_set_uuid", None)
        if name is not None:
            name(f"leankv_hf.kernels.cpu:{family}:{i}")
    return dispatchers


def _variant(name: str, cache: bool = False, **options):
    """``numba.njit(cache=cache, **options)`` of a function named ``name``: one name per variant of a closure. numba
    names a function's machine code by its name and a number counted per process, and a cached kernel carries the code
    of the routines it calls under those names; so two kernels compiled in two processes could each hold a different
    variant of a routine under one name, and a process loading both would link one for both (wrong products, reads
    and writes out of bounds). numba also keeps one cache index per name, rewritten without a lock: per variant,
    processes saving at once save the same kernel."""

    def jit(function):
        function.__qualname__ = name
        return numba.njit(cache=cache, **options)(function)

    return jit


@functools.cache
def _routines(bits: int, groups: int):
    """What the kernels do with one store's rows, for packed ``bits``-bit codes in ``groups`` quantization groups per
    row. Both are compile-time constants: with runtime counts LLVM leaves the inner loops scalar (about 4x slower).

    A byte holds ``per = 8 // bits`` codes (`quant.packing`): dim ``per * b + p`` sits in bits ``[p * bits, (p + 1) *
    bits)`` of byte ``b``. Queries and outputs are held in that order, ``[per, D / per]`` planes, so each packed byte
    is read once and every plane is walked contiguously. ``bits=16``: rows of 16-bit floats (their bits as uint16, no
    scale or zero), each converted once into a float32 row (`_row16`). Returns ``(planes, score, weigh, unplane)``, the
    score reading its query rows' count at run time (`_score`)."""
    f32 = np.float32
    per = max(8 // bits, 1)
    mask = (1 << bits) - 1

    @_variant(f"planes_{bits}_{groups}", fastmath=True, boundscheck=False)
    def planes(query, q, sums):  # pragma: no cover (jit)
        """``q[r, p, b] = query[r, per * b + p]`` for ``query[R, D]``, and ``sums[r, g]`` its sum over each group (what
        the zeros multiply); rows of ``q`` past ``R`` are left as they are (zero: a block of four reads them)."""
        rows, dim = query.shape
        width = dim // per // groups  # bytes per group
        for r in range(rows):
            for d in range(dim):
                q[r, d % per, d // per] = query[r, d]
                sums[r, d // per // width] += query[r, d]

    @_variant(f"weigh_{bits}_{groups}", fastmath=True, boundscheck=False)
    def weigh(probs, rows, codes, scale, zero, powers, mantissa, first, count, slot, acc, zeros):  # pragma: no cover
        """``acc[r]`` (planes) ``+= sum_j probs[r, slot + j] * codes * scale`` over rows ``first + j``, and ``zeros[r,
        g] += probs * zero`` per group: `unplane` adds them up. Each row's codes are converted once, into float
        planes, and every query row adds them in a loop LLVM vectorizes."""
        planes = acc.shape[2]
        width = planes // groups
        wide, x = np.empty(planes * per, np.uint32), np.empty((per, planes), np.float32)
        flat_x, flat_acc = x.reshape(per * planes), acc.reshape(acc.shape[0], per * planes)
        sc, ze = np.ones(groups, np.float32), np.zeros(groups, np.float32)
        for j in range(count):
            i = first + j
            row = codes[i]
            if bits == 16:
                _row16(row, mantissa, wide, x[0])
            else:
                for p in range(per):
                    for b in range(planes):
                        x[p, b] = f32((row[b] >> (p * bits)) & mask)
                for g in range(groups):
                    sc[g] = _float16(scale[i, g], powers, mantissa)
                    ze[g] = _float16(zero[i, g], powers, mantissa)
            for r in range(rows):
                w = probs[r, slot + j]
                if groups == 1:  # one loop over the whole row: short per-plane loops vectorize poorly (2-bit: 16)
                    zeros[r, 0] += w * ze[0]
                    ws = w * sc[0]
                    for k in range(per * planes):
                        flat_acc[r, k] += ws * flat_x[k]
                    continue
                for g in range(groups):
                    ws = w * sc[g]
                    zeros[r, g] += w * ze[g]
                    for p in range(per):
                        for b in range(g * width, g * width + width):
                            acc[r, p, b] += ws * x[p, b]

    @_variant(f"unplane_{bits}_{groups}", fastmath=True, boundscheck=False)
    def unplane(acc, zeros, out):  # pragma: no cover (jit)
        """``out[r, d] +=`` what `weigh` summed for dim ``d`` of query row ``r``."""
        rows, dim = out.shape
        width = acc.shape[2] // groups
        for r in range(rows):
            for d in range(dim):
                out[r, d] += acc[r, d % per, d // per] + zeros[r, d // per // width]

    planes, weigh, unplane = _named((planes, weigh, unplane), f"routines-{bits}-{groups}")
    return planes, _score(bits, groups, 0), weigh, unplane


@functools.cache
def _score(bits: int, groups: int, blocks: int):
    """`_routines`' ``score`` for query rows in ``blocks`` blocks of `QUERY_BLOCK`, a compile-time count (a decode
    step's query heads per KV head): LLVM then unrolls the loop over blocks, which at one block scores a row 9-22%
    faster than with the count read at run time (``blocks=0``, for queries of any length; eval/RESULTS.md)."""
    f32 = np.float32
    per = max(8 // bits, 1)
    mask = (1 << bits) - 1

    @_variant(f"score_{bits}_{groups}_{blocks}", fastmath=True, boundscheck=False)
    def score(q, sums, rows, codes, scale, zero, powers, mantissa, first, count, out, slot):  # pragma: no cover (jit)
        """``out[r, slot + j] = query[r] . row`` for row ``first + j`` (``j < count``) and the ``rows`` real query rows
        in planes (`planes`), a row being ``codes * scale + zero`` per group (16-bit scale and zero read by
        `_float16`). Query rows go in blocks of four, so each code read feeds four accumulators."""
        padded, width = q.shape[0] if blocks == 0 else QUERY_BLOCK * blocks, q.shape[2] // groups
        dim = q.shape[2] * per
        wide, x16 = np.empty(dim, np.uint32), np.empty(dim, np.float32)  # a 16-bit row, converted
        for j in range(count):
            i = first + j
            row = codes[i]
            if bits == 16:
                _row16(row, mantissa, wide, x16)
            for r in range(0, padded, 4):
                t0 = f32(0)
                t1 = f32(0)
                t2 = f32(0)
                t3 = f32(0)
                for g in range(groups):
                    a0 = f32(0)
                    a1 = f32(0)
                    a2 = f32(0)
                    a3 = f32(0)
                    for p in range(per):
                        for b in range(g * width, g * width + width):
                            x = x16[b] if bits == 16 else f32((row[b] >> (p * bits)) & mask)
                            a0 += q[r, p, b] * x
                            a1 += q[r + 1, p, b] * x
                            a2 += q[r + 2, p, b] * x
                            a3 += q[r + 3, p, b] * x
                    sc = f32(1) if bits == 16 else _float16(scale[i, g], powers, mantissa)
                    ze = f32(0) if bits == 16 else _float16(zero[i, g], powers, mantissa)
                    t0 += a0 * sc + ze * sums[r, g]
                    t1 += a1 * sc + ze * sums[r + 1, g]
                    t2 += a2 * sc + ze * sums[r + 2, g]
                    t3 += a3 * sc + ze * sums[r + 3, g]
                for k, total in enumerate((t0, t1, t2, t3)):
                    if r + k < rows:
                        out[r + k, slot + j] = total

    return _named((score,), f"score-{bits}-{groups}-{blocks}")[0]


@functools.cache
def _kernels(bits: int, groups: int):
    """The two product kernels over one store's rows (`_routines`). Work comes as tasks, a ``(segment, first row,
    rows, first slot)`` each (`_tasks`), run in parallel; each kernel is one call per store (its small set-up and the
    sums of tasks done inside), since at decode sizes the calls cost as much as the work."""
    planes, score, weigh, unplane = _routines(bits, groups)
    per = max(8 // bits, 1)

    @_variant(f"scores_{bits}_{groups}", cache=True, fastmath=True, boundscheck=False, parallel=_prange_only())
    def scores(query, codes, scale, zero, powers, mantissa, tasks, out):  # pragma: no cover (jit)
        """``out[s, r, slot] = query[s, r] . row`` for ``query[S, R, D]``."""
        segments, rows, dim = query.shape
        q = np.zeros((segments, -(-rows // QUERY_BLOCK) * QUERY_BLOCK, per, dim // per), np.float32)
        sums = np.zeros((segments, q.shape[1], groups), np.float32)
        for s in range(segments):
            planes(query[s], q[s], sums[s])
        for t in numba.prange(tasks.shape[0]):
            s = tasks[t, 0]
            score(
                q[s], sums[s], rows, codes, scale, zero, powers, mantissa, tasks[t, 1], tasks[t, 2], out[s], tasks[t, 3]
            )

    @_variant(f"weighed_{bits}_{groups}", cache=True, fastmath=True, boundscheck=False, parallel=_prange_only())
    def weighed(probs, codes, scale, zero, powers, mantissa, tasks, out):  # pragma: no cover (jit)
        """``out[s, r] += sum_j probs[s, r, slot + j] * row`` for ``out[S, R, D]``. Each task sums into its own planes;
        then, in task order (so the sum does not depend on the thread count), they are added to their segment's."""
        rows, dim = out.shape[1], out.shape[2]
        n_tasks = tasks.shape[0]
        partial = np.zeros((n_tasks, rows, per, dim // per), np.float32)
        zeros = np.zeros((n_tasks, rows, groups), np.float32)
        for t in numba.prange(n_tasks):
            s = tasks[t, 0]
            weigh(probs[s], rows, codes, scale, zero, powers, mantissa, tasks[t, 1], tasks[t, 2], tasks[t, 3],
                  partial[t], zeros[t])  # fmt: skip
        for t in range(n_tasks):
            unplane(partial[t], zeros[t], out[tasks[t, 0]])

    return _named((scores, weighed), f"kernels-{bits}-{groups}")


@functools.cache
def _step_kernel(first: tuple, second: tuple, blocks: int):
    """The decode step kernel (`DecodeStep`) for one or two stores, each ``(key bits, key groups, value bits, value
    groups)`` (`_routines`); ``second`` is ``first`` again where there is one store (it then has no tasks). The query
    heads of a KV head come in ``blocks`` blocks of `QUERY_BLOCK` (`_score`).

    Split as flash-decoding splits a long context: each task (a chunk of one head's rows, or a head's window) scores
    its rows, exponentiates them against its own maximum and weighs the values, all in one parallel pass; a short
    serial pass rescales the tasks' partial sums to their head's common maximum (in task order: the output does not
    depend on the thread count); a second parallel pass folds each row's share of the attention into its score. Two
    parallel regions per call, whatever the stores: waking the threads costs more than a short region's work."""
    planes_a, planes_b = _routines(*first[:2])[0], _routines(*second[:2])[0]
    score_a, score_b = _score(*first[:2], blocks), _score(*second[:2], blocks)
    _, _, weigh_a, unplane_a = _routines(*first[2:])
    _, _, weigh_b, unplane_b = _routines(*second[2:])
    per_ka, per_kb, per_va, per_vb = (max(8 // bits, 1) for bits in (first[0], second[0], first[2], second[2]))
    groups_ka, groups_kb, groups_va, groups_vb = first[1], second[1], first[3], second[3]

    @_variant(
        "step_" + "_".join(map(str, first + second + (blocks,))),
        cache=True,
        fastmath=True,
        boundscheck=False,
        parallel=_prange_only(),
    )
    def step(query, reduced, window_keys, window_values, visible, scale, stored_a, stored_b, tasks, rows_a, rows_b,
             half, peak, by_max, recent, recent_ages, out):  # fmt: skip  # pragma: no cover (jit)
        """One query per (segment, query head) attends the stores' rows and the exact window; the attention each row
        and window token receives (max or mean over a segment's query heads: ``by_max``) folds into its score.

        ``query[S, G, D]``, ``reduced[S, G, Dk]`` (what scores the stored keys: the query, or its low-rank
        coefficients), ``window_keys``/``window_values`` ``[S, R, D]`` float32, ``visible[S, R]`` (shape ``(0, 0)``: all
        visible). ``stored_*``: a store's key and value codes, scales, zeros and how to read them. ``tasks[T, 4]``:
        ``(store, segment, first row, rows)``; each segment's window is one more task after them. ``rows_*``: a
        store's running scores (fp16 bits) and ages, both updated here.
        ``recent``/``recent_ages`` ``[S, R]``: the window's, updated here. ``peak``: scores keep their maximum, else a
        running mean (`store.fold_scores`)."""
        segments, heads, dim = query.shape
        span = window_keys.shape[1]
        padded = QUERY_BLOCK * blocks  # at least ``heads``: `DecodeStep` picks the kernel by the head count
        kdim = reduced.shape[2]
        stored = tasks.shape[0]
        n_tasks = stored + segments
        longest = span
        for t in range(stored):
            longest = max(longest, tasks[t, 3])
        qa = np.zeros((segments, padded, per_ka, kdim // per_ka), np.float32)
        sums_a = np.zeros((segments, padded, groups_ka), np.float32)
        qb = np.zeros((segments, padded, per_kb, kdim // per_kb), np.float32)
        sums_b = np.zeros((segments, padded, groups_kb), np.float32)
        for s in range(segments):
            planes_a(reduced[s], qa[s], sums_a[s])
            planes_b(reduced[s], qb[s], sums_b[s])
        probs = np.empty((n_tasks, padded, longest), np.float32)  # each task's own: no two threads share a line
        powers = np.empty((n_tasks, longest), np.uint32)  # each task's powers of two for its exponentials (`_exp_less`)
        top = np.empty((n_tasks, heads), np.float32)
        mass = np.zeros((n_tasks, heads), np.float32)
        partial = np.zeros((n_tasks, heads, dim), np.float32)
        acc_a = np.zeros((stored, heads, per_va, dim // per_va), np.float32)
        zeros_a = np.zeros((stored, heads, groups_va), np.float32)
        acc_b = np.zeros((stored, heads, per_vb, dim // per_vb), np.float32)
        zeros_b = np.zeros((stored, heads, groups_vb), np.float32)
        for t in numba.prange(n_tasks):
            store, s, first_row, count = _task(tasks, t, span)
            if store == 0:
                score_a(qa[s], sums_a[s], heads, *stored_a[:5], first_row, count, probs[t], 0)
            elif store == 1:
                score_b(qb[s], sums_b[s], heads, *stored_b[:5], first_row, count, probs[t], 0)
            else:
                for h in range(heads):
                    for r in range(span):
                        x = np.float32(0)
                        for d in range(dim):
                            x += query[s, h, d] * window_keys[s, r, d]
                        probs[t, h, r] = x if visible.shape[0] == 0 or visible[s, r] else np.float32(-np.inf)
            for h in range(heads):
                row = probs[t, h, :count]
                most = np.float32(-np.inf)
                for j in range(count):
                    row[j] *= scale
                    most = max(most, row[j])
                if most > -np.inf:
                    mass[t, h] = _exp_less(row, most, powers[t])
                else:  # nothing visible (or not a number): this task adds nothing
                    row[:] = 0
                top[t, h] = most
            if store == 0:
                weigh_a(probs[t], heads, *stored_a[5:], first_row, count, 0, acc_a[t], zeros_a[t])
                unplane_a(acc_a[t], zeros_a[t], partial[t])
            elif store == 1:
                weigh_b(probs[t], heads, *stored_b[5:], first_row, count, 0, acc_b[t], zeros_b[t])
                unplane_b(acc_b[t], zeros_b[t], partial[t])
            else:
                for h in range(heads):
                    for r in range(span):
                        w = probs[t, h, r]
                        for d in range(dim):
                            partial[t, h, d] += w * window_values[s, r, d]
        # Each head's maximum over its tasks and its softmax's denominator; then each task's share, in task order.
        most = np.full((segments, heads), np.float32(-np.inf))
        for t in range(n_tasks):
            s = _task(tasks, t, span)[1]
            for h in range(heads):
                most[s, h] = max(most[s, h], top[t, h])
        total = np.zeros((segments, heads), np.float32)
        factor = np.empty((n_tasks, heads), np.float32)
        for t in range(n_tasks):
            s = _task(tasks, t, span)[1]
            for h in range(heads):
                factor[t, h] = np.exp(top[t, h] - most[s, h]) if top[t, h] > -np.inf else np.float32(0)
                total[s, h] += mass[t, h] * factor[t, h]
        out[:] = 0
        for t in range(n_tasks):
            s = _task(tasks, t, span)[1]
            for h in range(heads):
                factor[t, h] /= total[s, h]
                for d in range(dim):
                    out[s, h, d] += factor[t, h] * partial[t, h, d]
        seen = np.empty((n_tasks, longest), np.float32)
        for t in numba.prange(n_tasks):
            store, s, first_row, count = _task(tasks, t, span)
            _received(probs[t], factor[t], count, by_max, seen[t])
            if store == 0:
                _fold_rows(seen[t], count, 1, peak, rows_a, first_row, half)
            elif store == 1:
                _fold_rows(seen[t], count, 1, peak, rows_b, first_row, half)
            else:
                for j in range(count):
                    weight = np.float32(recent_ages[s, j])
                    recent[s, j] = _running(recent[s, j], seen[t, j], weight, np.float32(1), peak)
                    recent_ages[s, j] = min(weight + 1, 255.0)

    return _named((step,), f"step-{first}-{second}-{blocks}")[0]


if numba is not None:

    @numba.njit(inline="always")
    def _float16(bits, powers, mantissa):  # pragma: no cover (jit)
        """A 16-bit float's value from its bit pattern (`_powers`): the significand, with its implicit one where
        the exponent is not zero, times the power of two of its sign and exponent."""
        top = bits >> mantissa
        significand = (bits & ((1 << mantissa) - 1)) + (((top & ((1 << (15 - mantissa)) - 1)) != 0) << mantissa)
        return np.float32(significand) * powers[top]

    @numba.njit(inline="always")
    def _row16(row, mantissa, wide, out):  # pragma: no cover (jit)
        """``out[:] =`` a row of 16-bit floats (``row`` their bits; 7 mantissa bits: bfloat16, else float16) as
        float32, in loops LLVM vectorizes: bfloat16 is a float32's high half; float16's exponent is re-biased, and
        its zeros and subnormals (exponent 0) are computed as ``significand * 2**-24``. Exact for finite values."""
        if mantissa == 7:
            for d in range(row.shape[0]):
                wide[d] = np.uint32(row[d]) << 16
            out[:] = wide.view(np.float32)
            return
        for d in range(row.shape[0]):
            h = np.uint32(row[d])
            wide[d] = ((h & 0x8000) << 16) | (((h & 0x7FFF) << 13) + 0x38000000)
        normal = wide.view(np.float32)
        for d in range(row.shape[0]):
            magnitude = row[d] & 0x7FFF
            small = np.float32(magnitude) * np.float32(2.0**-24)
            small = -small if row[d] & 0x8000 else small
            out[d] = small if magnitude < 0x400 else normal[d]

    @numba.njit(inline="always", fastmath=True)
    def _exp_less(row, most, powers):  # pragma: no cover (jit)
        """``row[j] = exp(row[j] - most)`` in place (``most``: finite, at least every value), and their sum. numba calls
        libm once per value for ``np.exp`` (no SVML here), a loop LLVM cannot vectorize; this one it can: ``e**x =
        2**n * e**(f ln 2)`` with ``n`` the nearest integer to ``x / ln 2`` and ``|f| <= 1/2``, ``2**n`` built from its
        bits in ``powers`` (uint32, at least as long as ``row``), ``e**(f ln 2)`` by its Taylor series to degree 7 (error
        below 1e-8, under float32's rounding). Below ``e**-87`` (float32's smallest normal) is 0; a NaN stays NaN."""
        n = row.shape[0]
        for j in range(n):
            less = row[j] - most
            x = max(less, np.float32(-87.0)) * np.float32(1.4426950408889634)  # log2(e)
            whole = np.floor(x + np.float32(0.5))
            f = (x - whole) * np.float32(0.6931471805599453)  # ln 2: e**f = 2**(x - whole)
            series = np.float32(1 / 5040)
            for c in (1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0):
                series = series * f + np.float32(c)
            powers[j] = np.uint32((np.int32(whole) + 127) << 23)
            row[j] = (
                series if less >= np.float32(-87.0) else (np.float32(0) if less < np.float32(-87.0) else less)
            )  # NaN
        scaled = powers[:n].view(np.float32)
        total = np.float32(0)
        for j in range(n):
            row[j] *= scaled[j]
            total += row[j]
        return total

    @numba.njit(inline="always")
    def _task(tasks, t, span):  # pragma: no cover (jit)
        """Task ``t`` of a decode step as ``(store, segment, first row, rows)``: the ``tasks`` rows (a chunk of a store's
        rows), then one per segment for its window of ``span`` tokens (store 2)."""
        stored = tasks.shape[0]
        if t < stored:
            return tasks[t, 0], tasks[t, 1], tasks[t, 2], tasks[t, 3]
        return np.int64(2), np.int64(t - stored), np.int64(0), np.int64(span)

    @numba.njit(inline="always")
    def _received(probs, factor, count, by_max, out):  # pragma: no cover (jit)
        """``out[j]`` = what a KV head's query heads (``probs[h, j] * factor[h]``, ``h < len(factor)``) gave token ``j``:
        their maximum, or their mean. One pass per query head over every token, so that the loops vectorize."""
        heads = factor.shape[0]
        for j in range(count):
            out[j] = probs[0, j] * factor[0]
        for h in range(1, heads):
            for j in range(count):
                x = probs[h, j] * factor[h]
                out[j] = max(out[j], x) if by_max else out[j] + x
        if not by_max:
            for j in range(count):
                out[j] /= np.float32(heads)

    @numba.njit(inline="always")
    def _running(old, seen, weight, n, peak):  # pragma: no cover (jit)
        """A score after ``n`` more observations whose sum (with ``peak``: maximum) is ``seen``, ``weight`` earlier
        ones counted: `store.fold_scores`'s arithmetic, in its order."""
        return max(old, seen) if peak else (old * weight + seen) / (weight + n)

    @numba.njit(inline="always")
    def _half_bits(x):  # pragma: no cover (jit)
        """The float16 bit pattern of float32 ``x``, rounded to the nearest (ties to even) as torch rounds: past
        float16's range it is infinite, a NaN stays NaN, below its smallest normal it is a multiple of ``2**-24``."""
        u = np.float32(x).view(np.uint32)
        sign = (u >> 16) & 0x8000
        a = u & 0x7FFFFFFF
        if a > 0x7F800000:
            return np.uint16(sign | 0x7E00)
        if a >= 0x47800000:  # 2**16 or more: infinite (from 65520 on, rounding below carries into infinity too)
            return np.uint16(sign | 0x7C00)
        if a < 0x38800000:  # times 2**24 is exact, and rint rounds ties to even
            return np.uint16(sign | np.uint32(np.rint(abs(np.float32(x)) * np.float32(16777216.0))))
        h = (a >> 13) - 0x1C000  # exponent re-biased from 127 to 15, 10 mantissa bits
        rest = a & 0x1FFF
        h += (rest > 0x1000) | ((rest == 0x1000) & (h & 1))
        return np.uint16(sign | h)

    @numba.njit(inline="always")
    def _fold_rows(seen, count, n, peak, rows, first, half):  # pragma: no cover (jit)
        """Rows ``first + j`` of a store (``rows``: its fp16 score bits and ages, updated in place) each received
        ``seen[j]`` over ``n`` more observations (their sum, or with ``peak`` their maximum): the score becomes the
        new one (`_running`), the age saturates at 255."""
        for j in range(count):
            i = first + j
            weight = np.float32(rows[1][i])
            old = _float16(rows[0][i], half[0], half[1])
            rows[0][i] = _half_bits(_running(old, seen[j], weight, np.float32(n), peak))
            rows[1][i] = min(weight + np.float32(n), 255.0)

    _named((_float16, _row16, _exp_less, _task, _received, _running, _half_bits, _fold_rows), "helpers")

    @numba.njit(cache=True, boundscheck=False)
    def _chunked(starts, counts, offsets):  # pragma: no cover (jit)
        """`_tasks` in one call: a few numbers per head, which a dozen numpy calls cost more than."""
        n = 0
        for s in range(counts.shape[0]):
            n += -(-counts[s] // CHUNK)
        tasks = np.empty((n, 4), np.int64)
        t = 0
        for s in range(counts.shape[0]):
            for done in range(0, counts[s], CHUNK):
                tasks[t, 0], tasks[t, 1], tasks[t, 3] = s, starts[s] + done, offsets[s] + done
                tasks[t, 2] = min(counts[s] - done, CHUNK)
                t += 1
        return tasks

    @numba.njit(parallel=_prange_only())
    def _noop(x):  # pragma: no cover (jit)
        """A parallel region: the first one starts numba's thread pool."""
        for i in numba.prange(x.shape[0]):
            x[i] = 0

    @numba.njit(boundscheck=False, cache=True)
    def _fold(scores, starts, counts, offsets, n, peak, score, powers, mantissa, ages):  # pragma: no cover (jit)
        """Row ``i = starts[s] + j`` received ``scores[s, offsets[s] + j]`` over ``n`` queries (`_fold_rows`). The
        arithmetic is `store.fold_scores`'s, in the same order (no fastmath)."""
        for s in range(counts.shape[0]):
            seen = scores[s, offsets[s] : offsets[s] + counts[s]]
            _fold_rows(seen, counts[s], n, peak, (score, ages), starts[s], (powers, mantissa))

    @numba.njit(inline="always")
    def _half_outward(x, up, powers, mantissa):  # pragma: no cover (jit)
        """The float16 bits nearest ``x`` on one side: at least ``x`` (``up``) or at most, as `quant.groupwise`
        rounds a scale or zero (to nearest, then one step outward where that went the wrong way)."""
        h = _half_bits(x)
        if (h & 0x7C00) == 0x7C00:  # infinite (or NaN): no step
            return h
        back = _float16(h, powers, mantissa)
        if (back < x) if up else (back > x):
            if (h & 0x7FFF) == 0:  # a zero steps to the smallest subnormal of the side it goes to
                return np.uint16(0x0001 if up else 0x8001)
            return np.uint16(h + 1 if (h < 0x8000) == up else h - 1)
        return h

    def _extremes_of(fast: bool):
        """The least and the greatest of ``v``, compiled without fastmath (a loop that stays scalar: float minima and
        maxima keep NaNs and signed zeros apart) or with it (vectorized; exact for finite values but for which zero an
        extreme that is zero keeps, so `_quantize_row` takes such extremes again in order). Each its own name
        (`_variant`)."""

        @_variant("extremes_fast" if fast else "extremes", inline="always", fastmath=fast)
        def extremes(v):  # pragma: no cover (jit)
            lo, hi = v[0], v[0]
            for d in range(v.shape[0]):
                lo, hi = min(lo, v[d]), max(hi, v[d])
            return lo, hi

        return extremes

    _fast_extremes, _extremes = _extremes_of(True), _extremes_of(False)

    @numba.njit(inline="always")
    def _finite(v):  # pragma: no cover (jit)
        """Whether every value of float32 ``v`` is finite, from their exponent bits (a loop LLVM vectorizes)."""
        bits = v.view(np.uint32)
        bad = np.uint32(0)
        for d in range(bits.shape[0]):
            bad |= np.uint32((bits[d] & 0x7F800000) == 0x7F800000)
        return bad == 0

    @numba.njit(inline="always")
    def _quantize_row(row, i, bits, group, powers, mantissa, payload, scale, zero, codes):  # pragma: no cover (jit)
        """`quant.quantize` of float32 ``row[D]`` for per-token groups of ``group`` channels, int codes and float16
        scale/zero: the same arithmetic in the same order (no fastmath but for `_fast_extremes`), so the same bits.
        Row ``i`` of ``payload[N, D * bits / 8]`` (packed as `quant.packing` packs), ``scale``/``zero`` ``[N, D /
        group]`` (fp16 bits) is written; ``codes[D]`` is scratch. A group holding a NaN or an infinity, or whose
        scale overflows, gets NaN scale and zero and codes 0. The codes are computed first and packed after: loops LLVM
        vectorizes."""
        dim = row.shape[0]
        levels = (1 << bits) - 1
        top = np.float32(levels)
        per = 8 // bits
        for g in range(dim // group):
            v = row[g * group : (g + 1) * group]
            low = step = np.uint16(0x7C00)  # stay infinite where the group is not finite
            if _finite(v):
                lo, hi = _fast_extremes(v)
                if lo == 0 or hi == 0:  # which zero: as the ordered loop keeps it
                    lo, hi = _extremes(v)
                low = _half_outward(lo, False, powers, mantissa)
                z = _float16(low, powers, mantissa)
                step = _half_outward((hi - z) / top, True, powers, mantissa)
            if (low & 0x7C00) == 0x7C00 or (step & 0x7C00) == 0x7C00:
                scale[i, g], zero[i, g] = 0x7E00, 0x7E00
                codes[g * group : (g + 1) * group] = 0
                continue
            scale[i, g], zero[i, g] = step, low
            s = _float16(step, powers, mantissa)
            safe = s if s > 0 else np.float32(1)  # scale 0: a constant group, every code 0
            for d in range(group):
                c = np.rint((v[d] - z) / safe)
                c = c if c > 0 else np.float32(0)
                codes[g * group + d] = np.uint8(np.int32(c if c < top else top))
        for b in range(dim // per):
            byte = np.uint8(0)
            for p in range(per):
                byte |= codes[b * per + p] << (p * bits)
            payload[i, b] = byte

    @numba.njit(parallel=_prange_only(), boundscheck=False, cache=True)
    def _quantize(x, bits, group, powers, mantissa, payload, scale, zero):  # pragma: no cover (jit)
        """`_quantize_row` of every row, in tasks of `QUANTIZE_CHUNK` rows run in parallel."""
        for t in numba.prange(-(-x.shape[0] // QUANTIZE_CHUNK)):
            codes = np.empty(x.shape[1], np.uint8)
            for i in range(t * QUANTIZE_CHUNK, min((t + 1) * QUANTIZE_CHUNK, x.shape[0])):
                _quantize_row(x[i], i, bits, group, powers, mantissa, payload, scale, zero, codes)

    @numba.njit(inline="always")
    def _value16(bits, powers, mantissa):  # pragma: no cover (jit)
        """`_float16`, infinities and NaNs included (a compaction reads few rows: exactness over speed)."""
        ones = (1 << (15 - mantissa)) - 1
        if (bits >> mantissa) & ones == ones:
            if bits & ((1 << mantissa) - 1):
                return np.float32(np.nan)
            return np.float32(-np.inf) if bits & 0x8000 else np.float32(np.inf)
        return _float16(bits, powers, mantissa)

    @numba.njit(inline="always")
    def _bits16(x, mantissa):  # pragma: no cover (jit)
        """The bits of float32 ``x`` rounded to the nearest float16 (``mantissa`` 10) or bfloat16 (7), as torch
        rounds (a bfloat16 NaN is 0x7FC0)."""
        if mantissa == 10:
            return _half_bits(x)
        u = np.float32(x).view(np.uint32)
        if (u & 0x7FFFFFFF) > 0x7F800000:
            return np.uint16(0x7FC0)
        return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)

    @numba.njit(inline="always")
    def _nearest16(x, mantissa):  # pragma: no cover (jit)
        """float32 ``x`` rounded to the nearest float16 (``mantissa`` 10) or bfloat16 (7) value, ties to even, as a
        float32 (torch's rounding), in selects rather than branches, so that a row's loop vectorizes. float16: a
        normal result keeps 10 mantissa bits, one below float16's smallest normal is a multiple of ``2**-24``, one
        from 65520 on infinite."""
        u = np.float32(x).view(np.uint32)
        cut = 23 - mantissa
        kept = np.uint32((u + ((1 << (cut - 1)) - 1) + ((u >> cut) & 1)) & ~np.uint32((1 << cut) - 1))
        rounded = kept.view(np.float32)
        if mantissa == 7:
            return x if x != x else rounded
        a = u & 0x7FFFFFFF
        tiny = np.rint(x * np.float32(16777216.0)) * np.float32(2.0**-24)
        huge = np.float32(np.inf) if x > 0 else np.float32(-np.inf)
        return tiny if a < 0x38800000 else (rounded if a < 0x477FF000 else (x if x != x else huge))

    @numba.njit(inline="always")
    def _decoded(codes, scale, zero, r, bits, group, half, mantissa, out):  # pragma: no cover (jit)
        """``out[:] =`` row ``r`` of int codes (float16 ``scale``/``zero`` bits per group) dequantized to the 16-bit
        float type as `quant.dequantize` does on CPU: scale and zero cast to that type, the code times the scale
        rounded to it, plus the zero rounded again."""
        per, mask = 8 // bits, (1 << bits) - 1
        for d in range(out.shape[0]):
            out[d] = np.float32((codes[r, d // per] >> ((d % per) * bits)) & mask)
        for g in range(out.shape[0] // group):
            step = _nearest16(_value16(scale[r, g], half[0], half[1]), mantissa)
            low = _nearest16(_value16(zero[r, g], half[0], half[1]), mantissa)
            row = out[g * group : (g + 1) * group]
            for d in range(group):
                row[d] = _nearest16(_nearest16(row[d] * step, mantissa) + low, mantissa)

    @numba.njit(inline="always")
    def _copy_rows(source, first, out, at, count, width):  # pragma: no cover (jit)
        """``out[at : at + count] = source[first : first + count]`` for rows of ``width`` values (C order), a loop over
        two flat slices that LLVM vectorizes: numba copies a slice assignment through a temporary array, and a loop
        indexing the whole arrays at an offset stays scalar (50 and 60 times slower on a compaction's rows)."""
        rows = source.reshape(-1)[first * width : (first + count) * width]
        into = out.reshape(-1)[at * width : (at + count) * width]
        for x in range(rows.shape[0]):
            into[x] = rows[x]

    @numba.njit(boundscheck=False)
    def _move_span(
        j,
        stop,
        t,
        orders,
        incoming,
        first,
        exiting,
        start,
        mixes,
        codes,
        scales,
        zeros,
        positions,
        scores,
        ages,
        window,
        recent,
        recent_ages,
        powers,
        mantissa,
        half,
        out_codes,
        out_scales,
        out_zeros,
        out_positions,
        out_scores,
        out_ages,
    ):  # pragma: no cover (jit)
        """Rows ``j`` to ``stop`` of `_moved`: a function of its own, not inlined in the parallel loop (numba's
        parallel transform hoisted a conditional assignment out of such a body and wrote the wrong rows)."""
        tiers = mixes.shape[0]
        own = first[t + 1] - first[t]
        widest = max(window[0].shape[2], window[1].shape[2])  # low-rank keys: fewer coefficients than channels
        buffer, codes_buffer = np.empty(widest, np.float32), np.empty(widest, np.uint8)
        while j < stop:
            u, r, s, i = t, orders[j], 0, 0
            if r < own:  # staying, with the rows after it: copied as one block
                end = j + 1
                while end < stop and orders[end] == r + end - j and orders[end] < own:
                    end += 1
                for side in range(2):
                    _copy_rows(codes[2 * t + side], r, out_codes[side], j, end - j, out_codes[side].shape[1])
                    if mixes[t, 2 * side] != 16:
                        groups = out_scales[side].shape[1]
                        _copy_rows(scales[2 * t + side], r, out_scales[side], j, end - j, groups)
                        _copy_rows(zeros[2 * t + side], r, out_zeros[side], j, end - j, groups)
                _copy_rows(positions[t], r, out_positions, j, end - j, 1)
                _copy_rows(scores[t], r, out_scores, j, end - j, 1)
                _copy_rows(ages[t], r, out_ages, j, end - j, 1)
                j = end
                continue
            code = incoming[r - own]  # entering: from a higher tier, or from the window (u == tiers)
            u = 0
            while u < tiers and code >= first[u + 1]:
                u += 1
            r = code - first[u]
            if u == tiers:
                s, i = r // exiting, r % exiting
                out_positions[j] = start + i
                out_scores[j] = _half_bits(recent[s, i])
                out_ages[j] = recent_ages[s, i]
            else:
                out_positions[j], out_scores[j], out_ages[j] = positions[u][r], scores[u][r], ages[u][r]
            for side in range(2):
                bits, group, source = mixes[t, 2 * side], mixes[t, 2 * side + 1], 2 * u + side
                out, dim = out_codes[side], window[side].shape[2]
                values, scratch = buffer[:dim], codes_buffer[:dim]
                if u < tiers and mixes[u, 2 * side] != 16:  # coded: decoded as `RaggedStore.rows_at` does
                    _decoded(codes[source], scales[source], zeros[source], r, mixes[u, 2 * side],
                             mixes[u, 2 * side + 1], half, mantissa, values)  # fmt: skip
                    if bits == 16:
                        target = out[j].view(np.uint16)
                        for d in range(dim):
                            target[d] = _bits16(values[d], mantissa)
                        continue
                else:  # 16-bit rows
                    row = window[side][s, i] if u == tiers else codes[source][r].view(np.uint16)
                    if bits == 16:
                        out[j].view(np.uint16)[:] = row
                        continue
                    for d in range(dim):
                        values[d] = _value16(row[d], powers, mantissa)
                _quantize_row(values, j, bits, group, half[0], half[1], out, out_scales[side], out_zeros[side],
                              scratch)  # fmt: skip
            j += 1

    @numba.njit(parallel=_prange_only(), boundscheck=False, cache=True)
    def _moved(
        t,
        orders,
        incoming,
        first,
        exiting,
        start,
        mixes,
        codes,
        scales,
        zeros,
        positions,
        scores,
        ages,
        window,
        recent,
        recent_ages,
        powers,
        mantissa,
        half,
        out_codes,
        out_scales,
        out_zeros,
        out_positions,
        out_scores,
        out_ages,
    ):  # pragma: no cover (jit)
        """Tier ``t``'s rows after a compaction (`compaction.plan`, from `_plan`'s ``orders`` and ``incoming`` for
        it): its staying rows copied, rows of a higher tier decoded to the 16-bit type and encoded at its own
        precision, leaving window tokens encoded; the bits `store.RaggedStore.rebuild` gives. Per tier ``u``:
        ``mixes[u]`` its (key bits, key group, value bits, value group), 16 bits for 16-bit rows; ``codes[2u]`` its
        keys' codes (16-bit rows: their bits as bytes), ``codes[2u + 1]`` its values', ``scales``/``zeros`` alike
        (float16 bits); its rows' ``positions``, ``scores`` (float16 bits), ``ages``. ``window``: the leaving tokens'
        keys (as the stores hold them) and the window's values ``[S, R, D]`` (16-bit bits), ``recent``/``recent_ages``
        ``[S, R]`` its scores and ages, positions from ``start``; ``powers``/``mantissa`` read that 16-bit type, ``half``
        float16 (`_powers`). The ``out_`` arrays (keys, then values) are written. Spans of `MOVE_CHUNK` rows run in
        parallel (`_move_span`), every argument passed on by name: numba's parallel loop takes no tuple that holds
        tuples of arrays."""
        for task in numba.prange(-(-orders.shape[0] // MOVE_CHUNK)):
            _move_span(
                task * MOVE_CHUNK,
                min((task + 1) * MOVE_CHUNK, orders.shape[0]),
                t,
                orders,
                incoming,
                first,
                exiting,
                start,
                mixes,
                codes,
                scales,
                zeros,
                positions,
                scores,
                ages,
                window,
                recent,
                recent_ages,
                powers,
                mantissa,
                half,
                out_codes,
                out_scales,
                out_zeros,
                out_positions,
                out_scores,
                out_ages,
            )

    @numba.njit(cache=True, boundscheck=False)
    def _table(counts, scores, positions, recent, recent_valid, exiting, start):  # pragma: no cover (jit)
        """`compaction.candidate_table`: per segment, the tiers' rows in turn (``scores``/``positions``: every tier's
        rows one tier after the other), then its ``exiting`` window tokens (``recent[S, R]``, ``recent_valid[B, R]``,
        positions from ``start``)."""
        tiers, segments = counts.shape
        heads = segments // recent_valid.shape[0]
        width = exiting
        for s in range(segments):
            width = max(width, counts[:, s].sum() + exiting)
        table = np.zeros((segments, width), np.float32)
        at = np.zeros((segments, width), np.int64)
        valid = np.zeros((segments, width), np.bool_)
        row = np.zeros(tiers, np.int64)
        for u in range(1, tiers):
            row[u] = row[u - 1] + counts[u - 1].sum()
        for s in range(segments):
            slot = 0
            for u in range(tiers):
                for _ in range(counts[u, s]):
                    table[s, slot], at[s, slot], valid[s, slot] = scores[row[u]], positions[row[u]], True
                    row[u] += 1
                    slot += 1
            for i in range(exiting):
                table[s, slot + i], at[s, slot + i] = recent[s, i], start + i
                valid[s, slot + i] = recent_valid[s // heads, i]
        return table, at, valid

    @numba.njit(cache=True, boundscheck=False)
    def _pool(scores, order, width, out):  # pragma: no cover (jit)
        """`pooled` of each row of ``scores[S, W]`` whose slots in position order are ``order[S, W]``: the most any of
        the ``width`` slots around a slot in that order holds (clamped at 0; a -inf slot stays -inf)."""
        half = width // 2
        slots = scores.shape[1]
        line = np.empty(slots, np.float32)
        for s in range(scores.shape[0]):
            for i in range(slots):
                v = scores[s, order[s, i]]
                line[i] = v if v > 0 else np.float32(0)
            for i in range(slots):
                most = line[i]
                for j in range(max(i - half, 0), min(i + half + 1, slots)):
                    most = max(most, line[j])
                k = order[s, i]
                out[s, k] = scores[s, k] if scores[s, k] == -np.inf else most

    @numba.njit(cache=True, boundscheck=False)
    def _topk(scores, k, out):  # pragma: no cover (jit)
        """`topk_mask` of each row of float32 ``scores[R, W]``, keeping ``k[R]``: each slot's key as `policy.topk_mask`
        makes it, and the least key kept from a partial sort (the keys are unique: exactly ``k`` are at least it)."""
        slots = scores.shape[1]
        bits = scores.view(np.int32)
        key = np.empty(slots, np.int64)
        for r in range(scores.shape[0]):
            if k[r] <= 0 or k[r] >= slots:
                out[r] = k[r] > 0
                continue
            for i in range(slots):
                b = np.int64(0) if scores[r, i] == 0 else np.int64(bits[r, i])  # -0.0 ties with 0.0
                ordered = np.int64(2**31 - 1) if np.isnan(scores[r, i]) else b ^ ((b >> 31) & 0x7FFFFFFF)
                key[i] = (ordered << 32) + (slots - 1 - i)
            least = np.partition(key, slots - k[r])[slots - k[r]]
            for i in range(slots):
                out[r, i] = key[i] >= least

    @numba.njit(cache=True, boundscheck=False)
    def _plan(counts, target, exiting):  # pragma: no cover (jit)
        """`compaction.plan` as flat arrays: new counts ``[T, S]``; the tiers' orders and incoming codes one after the
        other, with where each tier's start (``[T + 1]`` each); whether each tier keeps its rows as they are; each
        tier's first code, then the leaving tokens' (``[T + 1]``)."""
        tiers, segments = counts.shape
        first = np.zeros(tiers + 1, np.int64)  # each tier's first code, then the leaving tokens'
        for u in range(tiers):
            first[u + 1] = first[u] + counts[u].sum()
        codes = first[tiers] + segments * exiting
        dest, segment, source = np.empty(codes, np.int64), np.empty(codes, np.int64), np.empty(codes, np.int64)
        stay, enter = np.zeros((tiers, segments), np.int64), np.zeros((tiers, segments), np.int64)
        row = first.copy()  # the next code of each tier in turn
        for s in range(segments):  # each candidate's tier, in slot order
            slot, row[tiers] = 0, first[tiers] + s * exiting
            for u in range(tiers + 1):
                for _ in range(counts[u, s] if u < tiers else exiting):
                    c, goal = row[u], np.int64(target[s, slot])
                    row[u] += 1
                    slot += 1
                    dest[c] = goal if goal > u or goal < 0 or u == tiers else u  # never up a tier
                    segment[c], source[c] = s, u
                    if dest[c] == u:
                        stay[u, s] += 1
                    elif dest[c] >= 0:
                        enter[dest[c], s] += 1
        new = stay + enter
        order_at, incoming_at = np.zeros(tiers + 1, np.int64), np.zeros(tiers + 1, np.int64)
        start = np.empty((tiers, segments), np.int64)  # where each (tier, segment)'s rows start in the orders
        for t in range(tiers):
            at = order_at[t]
            for s in range(segments):
                start[t, s] = at
                at += new[t, s]
            order_at[t + 1] = at
            incoming_at[t + 1] = incoming_at[t] + enter[t].sum()
        orders, incoming = np.empty(order_at[tiers], np.int64), np.empty(incoming_at[tiers], np.int64)
        staying, entering = np.zeros((tiers, segments), np.int64), np.zeros((tiers, segments), np.int64)
        received = np.zeros(tiers, np.int64)
        for c in range(codes):  # in code order: a segment's staying rows in their order, entering ones in code order
            t, s = dest[c], segment[c]
            if t < 0:
                continue
            if source[c] == t:
                orders[start[t, s] + staying[t, s]] = c - first[t]
                staying[t, s] += 1
            else:
                orders[start[t, s] + stay[t, s] + entering[t, s]] = first[t + 1] - first[t] + received[t]
                entering[t, s] += 1
                incoming[incoming_at[t] + received[t]] = c
                received[t] += 1
        same = np.empty(tiers, np.bool_)
        for t in range(tiers):
            same[t] = received[t] == 0 and (stay[t] == counts[t]).all()
        return new, orders, order_at, incoming, incoming_at, same, first


def fold(scores: torch.Tensor, n: int, stores: list[tuple], reduce: str = "mean") -> None:
    """`store.fold_scores` for the rows of several stores, reading ``scores[B, H, W]`` at their slots: per store
    ``(segments, score, ages)`` (``segments`` per `PaddedLayout.segments`, ``score`` fp16), both updated in place."""
    flat = scores.float().flatten(0, 1).contiguous().numpy()
    half = _powers(torch.float16)
    for segments, score, ages in stores:
        _fold(flat, *(t.numpy() for t in segments), n, reduce == "max", _bits(score), *half, ages.numpy())


def candidate_table(counts, scores, positions, recent, recent_valid, exiting: int, start: int):
    """`compaction.candidate_table` in one kernel call, for ``counts[T, S]`` int64, the tiers' ``scores`` (float32) and
    ``positions`` (int32), the window's ``recent[S, R]`` scores (float32) and ``recent_valid[B, R]``, on CPU."""
    arrays = (counts, scores, positions, recent.contiguous(), recent_valid.contiguous())
    return tuple(map(torch.from_numpy, _table(*(a.numpy() for a in arrays), exiting, start)))


def compaction_plan(counts: torch.Tensor, target: torch.Tensor, exiting: int):
    """`compaction.plan` in one kernel call (a few dozen small torch operations otherwise): ``counts[T, S]`` int64,
    ``target[S, W]`` int8 on CPU."""
    new, orders, order_at, incoming, incoming_at, same, first = _plan(counts.numpy(), target.numpy(), exiting)
    entering = []
    for t in range(counts.shape[0]):
        codes = incoming[incoming_at[t] : incoming_at[t + 1]]
        cuts = np.searchsorted(codes, first).tolist() + [codes.shape[0]]
        entering.append(
            [torch.from_numpy(codes[a:b] - start) for start, a, b in zip(first, cuts[:-1], cuts[1:], strict=True)]
        )
    return (
        [torch.from_numpy(row.copy()) for row in new],  # each store holds its own (a view would hold them all)
        [None if same[t] else torch.from_numpy(orders[order_at[t] : order_at[t + 1]]) for t in range(len(same))],
        entering,
    )


def movable(stores: list, window: torch.Tensor) -> bool:
    """Whether `compaction_moves` moves these stores' rows: each side 16-bit rows or int codes in per-token groups with
    float16 scales, a 16-bit ``window``, on CPU."""
    return (
        window.device.type == "cpu"
        and window.dtype in _SIXTEEN_BIT
        and all(
            not p.quantized
            or (p.fmt == "int" and p.axis == "token" and p.scale_dtype == torch.float16 and p.bits in (2, 4, 8))
            for store in stores
            for p in (store.key, store.value)
        )
    )


def compaction_moves(
    stores: list, counts: torch.Tensor, target: torch.Tensor, exiting: int, window: tuple, start: int
) -> list[tuple | None]:
    """`compaction.plan` in one kernel call and the `store.RaggedStore.rebuild` of each changed store in one more (the
    same bits; otherwise a hundred small torch operations a layer), for stores `movable` takes: ``counts[T, S]`` int64 and
    ``target[S, W]`` int8 as `compaction.plan` takes them; ``window``: the keys of the tokens leaving the layer's window
    as the stores hold them (coefficients where low rank) and its values ``[B, H, R, D]`` (16-bit; the keys of at
    least the ``exiting`` oldest tokens), its scores (float32) and ages (uint8) ``[B, H, R]``, the oldest at position
    ``start``. Per store, its new ``(counts, keys, values, positions, scores, ages)``, or None where its rows stay as
    they are."""
    new, orders, order_at, incoming, incoming_at, same, first = _plan(counts.numpy(), target.numpy(), exiting)
    keys, values, recent, recent_ages = window
    dtype, widths, flat = keys.dtype, (keys.shape[-1], values.shape[-1]), keys.shape[0] * keys.shape[1]
    mixes = _mixes(tuple((st.key, st.value) for st in stores))
    sides = [
        _side(x, p, w)
        for st in stores
        for x, p, w in zip((st.keys, st.values), (st.key, st.value), widths, strict=True)
    ]
    held = (
        *(tuple(side[i] for side in sides) for i in range(3)),
        tuple(st.positions.numpy() for st in stores),
        tuple(_bits(st.scores) for st in stores),
        tuple(st.ages.numpy() for st in stores),
        tuple(_bits(x.contiguous()).reshape(flat, -1, w) for x, w in zip((keys, values), widths, strict=True)),
        recent.contiguous().view(flat, -1).numpy(),
        recent_ages.contiguous().view(flat, -1).numpy(),
        *_powers(dtype),
        _HALF,
    )
    _use_torch_threads()
    moved = []
    for t, st in enumerate(stores):
        if same[t]:
            moved.append(None)
            continue
        rows = int(order_at[t + 1] - order_at[t])  # a numpy integer costs torch.empty twice the time
        made = [_empty_side(p, rows, w, dtype) for p, w in zip((st.key, st.value), widths, strict=True)]
        fields = (
            torch.empty(rows, dtype=torch.int32),
            torch.empty(rows, dtype=torch.float16),
            torch.empty(rows, dtype=torch.uint8),
        )
        _run(
            _moved, t, orders[order_at[t] : order_at[t + 1]], incoming[incoming_at[t] : incoming_at[t + 1]], first,
            exiting, start, mixes, *held, *(tuple(side[i] for side in made) for i in range(1, 4)), fields[0].numpy(),
            _bits(fields[1]), fields[2].numpy(),
        )  # fmt: skip
        moved.append((torch.from_numpy(new[t].copy()), made[0][0], made[1][0], *fields))
    return moved


@functools.cache
def _mixes(precisions: tuple) -> np.ndarray:
    """``[T, 4]`` each store's (key bits, key group, value bits, value group) as `_moved` reads them, from its
    (key, value) `store.Precision`: 16 bits for 16-bit rows."""
    sides = [(p.bits, p.group) if p.quantized else (16, 1) for pair in precisions for p in pair]
    return np.array(sides, np.int64).reshape(len(precisions), 4)


_NO_GROUPS = np.zeros((0, 1), np.uint16) if numba is not None else None  # 16-bit rows' scales and zeros


def _side(x, p, dim: int) -> tuple:
    """One side of a store as `_moved` reads it: ``(codes, scale bits, zero bits)``, 16-bit rows as bytes."""
    if x is None:  # no row yet
        return np.zeros((0, dim * p.bits // 8 if p.quantized else 2 * dim), np.uint8), _NO_GROUPS, _NO_GROUPS
    if isinstance(x, QuantizedTensor):
        return x.payload.contiguous().numpy(), _bits(x.scale.contiguous()), _bits(x.zero.contiguous())
    return x.contiguous().view(torch.uint8).numpy(), _NO_GROUPS, _NO_GROUPS


def _empty_side(p, rows: int, dim: int, dtype: torch.dtype) -> tuple:
    """``rows`` new rows of one side: the encoded tensor, and its codes, scale and zero bits as `_moved` writes them."""
    if not p.quantized:
        x = torch.empty(rows, dim, dtype=dtype)
        return x, x.view(torch.uint8).numpy(), _NO_GROUPS, _NO_GROUPS
    payload = torch.empty(rows, dim * p.bits // 8, dtype=torch.uint8)
    scale, zero = (torch.empty(rows, dim // p.group, dtype=torch.float16) for _ in range(2))
    x = QuantizedTensor(payload, scale, zero, p.bits, p.group, "token", "int", dim, dtype)
    return x, payload.numpy(), _bits(scale), _bits(zero)


def pooled(scores: torch.Tensor, positions: torch.Tensor, pooling: int) -> torch.Tensor:
    """`policy.Policy.pooled` of float32 ``scores`` at int64 ``positions`` ``[..., W]``: numpy's stable sort puts the
    slots in position order (a fraction of torch's time on a compaction's runs of sorted rows), one kernel pools."""
    rows = scores.reshape(-1, scores.shape[-1]).contiguous()
    order = np.argsort(positions.reshape(rows.shape).numpy(), axis=-1, kind="stable")
    out = torch.empty_like(rows)
    _pool(rows.numpy(), order, pooling, out.numpy())
    return out.view(scores.shape)


def topk_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`policy.topk_mask` in one kernel call: a partial sort per row (a fraction of torch's ``topk`` of the keys)."""
    rows = scores.float().reshape(-1, scores.shape[-1]).contiguous()
    keep = k.view(*k.shape, *([1] * (scores.dim() - 1 - k.dim()))).expand(scores.shape[:-1])
    out = torch.empty(rows.shape, dtype=torch.bool)
    _topk(rows.numpy(), keep.reshape(-1).long().contiguous().numpy(), out.numpy())
    return out.view(scores.shape)


def quantizable(x: torch.Tensor, bits: int, group: int, axis: str, fmt: str, scale_dtype: torch.dtype) -> bool:
    """Whether `quantize` does ``quant.quantize(x, bits, group, axis, fmt, scale_dtype)``: rows on CPU in a float type
    of at most 32 bits, int codes in per-token groups that tile a row, float16 scales."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, *_SIXTEEN_BIT)
        and x.dim() >= 2
        and fmt == "int"
        and axis == "token"
        and scale_dtype == torch.float16
        and bits in (2, 4, 8)
        and x.shape[-1] % group == 0
        and x.shape[-1] % (8 // bits) == 0
    )


def quantize(x: torch.Tensor, bits: int, group: int) -> QuantizedTensor:
    """`quant.quantize` of ``x[..., T, D]`` where `quantizable`, in one kernel call: a compaction's re-encoding is a
    few dozen torch operations on a few rows, which cost more than the arithmetic."""
    *lead, dim = x.shape
    rows = x.reshape(-1, dim).float().contiguous()
    payload = torch.empty(rows.shape[0], dim * bits // 8, dtype=torch.uint8)
    scale, zero = (torch.empty(rows.shape[0], dim // group, dtype=torch.float16) for _ in range(2))
    _use_torch_threads()
    _run(_quantize, rows.numpy(), bits, group, *_powers(torch.float16), payload.numpy(), _bits(scale), _bits(zero))
    return QuantizedTensor(
        payload.view(*lead, -1), scale.view(*lead, -1), zero.view(*lead, -1), bits, group, "token", "int", dim, x.dtype
    )


_compiled = [False]  # whether a kernel was compiled since the last call (`_run`)
_ALL_VISIBLE = np.zeros((0, 0), np.bool_) if numba is not None else None  # a decode step's ``visible``: every column
_HALF = _powers(torch.float16) if numba is not None else None  # how the kernels read float16 bits


def _run(kernel, *args) -> None:
    """Call ``kernel``. numba's compiler (a kernel's first call for its argument types) can leave a reference cycle
    through the calling frames, which hold the cache's layer: it is collected at the next kernel call, once those
    frames have returned, so that a dropped cache frees its memory without waiting for the garbage collector."""
    if _compiled[0]:
        _compiled[0] = False
        gc.collect()
    compiled = len(kernel.overloads)
    kernel(*args)
    _compiled[0] = len(kernel.overloads) != compiled


_threads = threading.local()  # per Python thread (numba's setting is per thread): the count last handed to numba


def _use_torch_threads() -> None:
    """Run the kernels on as many threads as torch is given (``torch.set_num_threads``, ``OMP_NUM_THREADS``)."""
    threads = torch.get_num_threads()
    if getattr(_threads, "count", 0) != threads:
        _start_pool()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        _threads.count = threads


@functools.cache  # once per process
def _start_pool() -> None:
    """Start numba's threads with idle workers that sleep at once, leaving torch's thread count as it was (starting
    numba's OpenMP pool sets it to every core). numba links libgomp by another name than torch's: with a pip torch on
    Linux, whose libgomp loads first, numba's OpenMP calls bind to torch's runtime (one pool, which this does not
    change); where numba's runtime is its own, an idle worker would by default spin for a while, and two spinning
    pools would take the cores from torch's next operation and from Python between the kernels. The runtime reads the
    variable when it loads, so it is set for that moment only (a user's own ``OMP_WAIT_POLICY`` holds)."""
    threads = torch.get_num_threads()
    policy = "OMP_WAIT_POLICY" not in os.environ
    if policy:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        _noop(np.zeros(1))
    finally:
        if policy:
            del os.environ["OMP_WAIT_POLICY"]
        torch.set_num_threads(threads)


def _tasks(starts: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor):
    """``[T, 4]`` int64 tasks ``(segment, first row, rows, first slot)``: each segment's rows in chunks of `CHUNK`.
    The split depends on the rows alone, never on the thread count, so products are the same on any number."""
    return _chunked(starts.numpy(), counts.numpy(), offsets.numpy())


@dataclass
class _Part:
    """One store's side as the kernels read it: packed codes ``[N, D * bits / 8]`` uint8, 16-bit scale/zero
    ``[N, groups]`` bits with how to read them (`_powers`), and its tasks (`_tasks`); 16-bit rows: their bits
    ``[N, D]`` as codes, no scale or zero (empty arrays)."""

    bits: int
    groups: int
    codes: object
    scale: object
    zero: object
    powers: object
    mantissa: int
    tasks: object


class CodedRows:
    """The rows of some stores' keys or values, read in place: the products of `store.PaddedRows` (``scores``,
    ``weigh``) without a padded copy, and without unpacking: the kernels read the packed bytes. ``segments`` holds,
    per store, ``(starts, counts, offsets)`` per (batch, head) as int64 tensors (`PaddedLayout.segments`). Made once
    per layout of the stores and kept while they do not change."""

    def __init__(self, parts: list, segments: list[tuple], shape: tuple[int, int, int]):
        self.shape = shape  # (batch, heads, width)
        self.parts = []
        for p, seg in zip(parts, segments, strict=True):
            if isinstance(p, QuantizedTensor):
                self.dim = p.last_dim
                read = _powers(p.scale.dtype)
                coded = (p.bits, p.scale.shape[1], p.payload.numpy(), _bits(p.scale), _bits(p.zero))
            else:  # 16-bit rows
                self.dim = p.shape[-1]
                read, none = _powers(p.dtype), np.zeros((0, 1), np.uint16)
                coded = (16, 1, _bits(p), none, none)
            self.parts.append(_Part(*coded, *read, _tasks(*seg)))

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """``query[B, H, Q, D] @ rows^T`` -> ``[B, H, Q, W]``, -inf in empty slots (so attention needs no mask)."""
        batch, heads, width = self.shape
        rows = query.shape[2]
        flat = query.reshape(batch * heads, rows, self.dim).float().contiguous().numpy()
        out = torch.full((batch * heads, rows, width), -torch.inf)
        self._each_part(0, flat, out)
        return out.view(batch, heads, rows, width).to(query.dtype)

    def weigh(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs[B, H, Q, W] @ rows`` -> ``[B, H, Q, D]``; ``probs`` may be a slice of wider rows."""
        batch, heads, rows, width = probs.shape
        flat = probs.float().reshape(batch * heads, rows, width).contiguous().numpy()
        out = torch.zeros(batch * heads, rows, self.dim)
        self._each_part(1, flat, out)
        return out.view(batch, heads, rows, self.dim).to(probs.dtype)

    def _each_part(self, kernel: int, flat, out: torch.Tensor) -> None:
        """Run `_kernels`' ``kernel`` (0: scores, 1: weigh) on every part, from ``flat`` into ``out``."""
        _use_torch_threads()
        for p in self.parts:
            run = _kernels(p.bits, p.groups)[kernel]
            _run(run, flat, p.codes, p.scale, p.zero, p.powers, p.mantissa, p.tasks, out.numpy())


class DecodeStep:
    """One decode query per query head over the rows of one or two stores, read in place, and the exact window, in
    one kernel call per layer: the output, with the attention each stored row and window token received folded into
    its running score. At decode sizes the torch operations between separate kernels (the scores, the softmax,
    weighing, folding) cost more than the kernels do. ``keys``/``values``: the stores' readers (`CodedRows`),
    ``stores``: the `store.RaggedStore`s they read (whose scores are folded)."""

    def __init__(self, keys: CodedRows, values: CodedRows, stores: list):
        parts = list(zip(keys.parts, values.parts, strict=True))
        self.mix = tuple((k.bits, k.groups, v.bits, v.groups) for k, v in (parts[0], parts[-1]))  # `_step_kernel`
        self.stored = [
            (k.codes, k.scale, k.zero, k.powers, k.mantissa, v.codes, v.scale, v.zero, v.powers, v.mantissa)
            for k, v in parts
        ]
        # The stores' tasks interleaved in proportion: numba splits the task list into equal runs, one per thread, and
        # a row of one store can cost twice a row of the other, so each run takes the same mix of both.
        tasks = [np.insert(k.tasks[:, :3], 0, i, axis=1) for i, (k, _) in enumerate(parts)]
        spread = np.concatenate([(np.arange(len(t)) + 0.5) / len(t) for t in tasks])
        self.tasks = np.concatenate(tasks)[np.argsort(spread, kind="stable")]
        self.stores = stores
        self._scores = None  # the stores' scores and ages as the kernel updates them, while they are the same tensors

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
        """``query[B, H, G, D]`` (one query per query head of each KV head), ``reduced`` the same scoring the stored
        keys (on their low-rank basis, or the query itself), ``keys``/``values`` ``[B, H, R, D]`` the window,
        ``visible[B, R]`` its columns the queries see (None: all). ``recent``/``recent_ages`` ``[B, H, R]`` (float32,
        uint8): the window's running scores, updated in place; the stores' scores and ages are updated too. ``by_max``:
        a KV head takes the most attention its query heads gave, else their mean; ``peak``: scores keep their maximum,
        else a running mean. Returns the output ``[B, H, G, D]``."""
        _use_torch_threads()
        batch, heads, groups, dim = query.shape
        flat = batch * heads
        queries = _segment_rows(query, flat)
        if visible is None:
            seen = _ALL_VISIBLE
        else:
            seen = np.ascontiguousarray(np.broadcast_to(visible.numpy()[:, None], (batch, heads, visible.shape[-1])))
            seen = seen.reshape(flat, -1)
        held = [store.scores for store in self.stores]
        if self._scores is None or any(a is not b for a, b in zip(self._scores[0], held, strict=True)):
            self._scores = held, [(_bits(store.scores), store.ages.numpy()) for store in self.stores]
        scores = self._scores[1]  # both updated in place
        out = np.empty((flat, groups, dim), np.float32)
        kernel = _step_kernel(*self.mix, -(-groups // QUERY_BLOCK))
        _run(
            kernel, queries, queries if reduced is query else _segment_rows(reduced, flat), _segment_rows(keys, flat),
            _segment_rows(values, flat), seen, np.float32(scale), self.stored[0], self.stored[-1], self.tasks,
            scores[0], scores[-1], _HALF, peak, by_max, recent.view(flat, -1).numpy(),
            recent_ages.view(flat, -1).numpy(), out,
        )  # fmt: skip
        out = torch.from_numpy(out.reshape(batch, heads, groups, dim))
        return out if query.dtype == torch.float32 else out.to(query.dtype)


def _segment_rows(t: torch.Tensor, flat: int) -> np.ndarray:
    """``t[B, H, ...]`` as a contiguous float32 ``[B * H, ...]`` array (numpy's reshape and copy cost less per call
    than torch's)."""
    t = t if t.dtype == torch.float32 else t.float()
    return np.ascontiguousarray(t.numpy().reshape(flat, *t.shape[2:]))
