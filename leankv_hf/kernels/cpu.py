"""Fused CPU decode kernels: attention reads int-coded ragged rows where they lie (numba).

The padded view (`store.PaddedLayout.view`) copies every stored row into a ``[B, H, W, D]`` float body at every
decode step: concatenate the stores, gather the rows, convert the codes, then two matmuls read the floats again.
On CPU those passes cost more than the arithmetic. These kernels walk each head's rows in the stores themselves,
read the packed bytes as they are (no unpacked copy) and apply each row's scale and zero on the fly, so a code is
read once and no float body exists. Only the logits ``[B, H, Q, W]`` (the softmax needs them) and the outputs are
written. Long heads are split into tasks so that a few heads still use every thread, on numba's OpenMP layer
where it loads (a parallel region starts in microseconds there).

Used for stores on CPU whose rows are int codes with per-token groups or 16-bit floats, when numba is installed
(the ``cpu`` extra); everything else takes the padded view. Both give the same products up to float summation order.
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

QUERY_BLOCK = 4  # query rows a kernel scores together (one code read feeds four accumulators)
CHUNK = 256  # stored rows one parallel task reads: a long head is split, so a few heads still fill every thread


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


@functools.cache
def _kernels(bits: int, groups: int):
    """The two kernels for packed ``bits``-bit codes in ``groups`` quantization groups per row. Both are compile-time
    constants: with runtime counts LLVM leaves the inner loops scalar (about 4x slower). Work comes as tasks, a
    ``(segment, first row, rows, first slot)`` each (`_tasks`), run in parallel; each kernel is one call per store
    (its small set-up and the sums of tasks done inside), since at decode sizes the calls cost as much as the work.

    A byte holds ``per = 8 // bits`` codes (`quant.packing`): dim ``per * b + p`` sits in bits ``[p * bits, (p + 1) *
    bits)`` of byte ``b``. The kernels hold queries and outputs in that order, ``[per, D / per]`` planes, so each
    packed byte is read once and every plane is walked contiguously. ``bits=16``: rows of 16-bit floats (their bits
    as uint16, no scale or zero), each converted once into a float32 row (`_row16`)."""
    f32 = np.float32
    per = max(8 // bits, 1)
    mask = (1 << bits) - 1

    @numba.njit(fastmath=True, boundscheck=False, parallel=True)
    def scores(query, codes, scale, zero, powers, mantissa, tasks, out):  # pragma: no cover (jit)
        """``out[s, r, slot] = query[s, r] . row`` for ``query[S, R, D]``, a row being ``codes * scale + zero`` per
        group (16-bit scale and zero read by `_float16`). Query rows go in blocks of four, so each code
        read feeds four accumulators."""
        segments, rows, dim = query.shape
        padded = -(-rows // QUERY_BLOCK) * QUERY_BLOCK
        width = dim // per // groups  # bytes per group
        q = np.zeros((segments, padded, per, dim // per), np.float32)  # the queries in planes, zero rows to a block
        sums = np.zeros((segments, padded, groups), np.float32)  # per query row and group: what the zeros multiply
        for s in range(segments):
            for r in range(rows):
                for d in range(dim):
                    q[s, r, d % per, d // per] = query[s, r, d]
                    sums[s, r, d // per // width] += query[s, r, d]
        for t in numba.prange(tasks.shape[0]):
            s, first, count, slot = tasks[t, 0], tasks[t, 1], tasks[t, 2], tasks[t, 3]
            qs = q[s]
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
                                a0 += qs[r, p, b] * x
                                a1 += qs[r + 1, p, b] * x
                                a2 += qs[r + 2, p, b] * x
                                a3 += qs[r + 3, p, b] * x
                        sc = f32(1) if bits == 16 else _float16(scale[i, g], powers, mantissa)
                        ze = f32(0) if bits == 16 else _float16(zero[i, g], powers, mantissa)
                        t0 += a0 * sc + ze * sums[s, r, g]
                        t1 += a1 * sc + ze * sums[s, r + 1, g]
                        t2 += a2 * sc + ze * sums[s, r + 2, g]
                        t3 += a3 * sc + ze * sums[s, r + 3, g]
                    for k, total in enumerate((t0, t1, t2, t3)):
                        if r + k < rows:
                            out[s, r + k, slot + j] = total

    @numba.njit(fastmath=True, boundscheck=False, parallel=True)
    def weigh(probs, codes, scale, zero, powers, mantissa, tasks, out):  # pragma: no cover (jit)
        """``out[s, r] += sum_j probs[s, r, slot + j] * row`` for ``out[S, R, D]``. Each task sums its rows' codes
        times scale into its own planes, and the zeros times the probabilities per group; then, in task order (so
        the sum does not depend on the thread count), they are added to their segment's output."""
        rows, dim = out.shape[1], out.shape[2]
        width = dim // per // groups
        n_tasks = tasks.shape[0]
        partial = np.zeros((n_tasks, rows, per, dim // per), np.float32)
        zeros = np.zeros((n_tasks, rows, groups), np.float32)
        for t in numba.prange(n_tasks):
            s, first, count, slot = tasks[t, 0], tasks[t, 1], tasks[t, 2], tasks[t, 3]
            acc = partial[t]
            wide, x16 = np.empty(dim, np.uint32), np.empty(dim, np.float32)
            for j in range(count):
                i = first + j
                row = codes[i]
                if bits == 16:
                    _row16(row, mantissa, wide, x16)
                for r in range(rows):
                    w = probs[s, r, slot + j]
                    for g in range(groups):
                        ws = w if bits == 16 else w * _float16(scale[i, g], powers, mantissa)
                        if bits != 16:
                            zeros[t, r, g] += w * _float16(zero[i, g], powers, mantissa)
                        for p in range(per):
                            for b in range(g * width, g * width + width):
                                acc[r, p, b] += ws * (x16[b] if bits == 16 else f32((row[b] >> (p * bits)) & mask))
        for t in range(n_tasks):
            s = tasks[t, 0]
            for r in range(rows):
                for d in range(dim):
                    out[s, r, d] += partial[t, r, d % per, d // per] + zeros[t, r, d // per // width]

    return scores, weigh


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

    @numba.njit(parallel=True)
    def _noop(x):  # pragma: no cover (jit)
        """A parallel region: the first one starts numba's thread pool."""
        for i in numba.prange(x.shape[0]):
            x[i] = 0

    @numba.njit(boundscheck=False, cache=True)
    def _fold(scores, starts, counts, offsets, n, peak, score, powers, mantissa, ages, out):  # pragma: no cover (jit)
        """Row ``i = starts[s] + j`` received ``scores[s, offsets[s] + j]`` over ``n`` queries (their sum, or with
        ``peak`` their maximum): its new score goes to ``out[i]`` (the old one read from its fp16 bits),
        its age saturates at 255. The arithmetic is `store.fold_scores`'s, in the same order (no fastmath)."""
        for s in range(counts.shape[0]):
            for j in range(counts[s]):
                i = starts[s] + j
                weight = np.float32(ages[i])
                total = weight + np.float32(n)
                seen = scores[s, offsets[s] + j]
                old = _float16(score[i], powers, mantissa)
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
    half = _powers(torch.float16)
    folded = []
    for segments, score, ages in stores:
        out = torch.empty(score.shape[0])
        _fold(flat, *(t.numpy() for t in segments), n, reduce == "max", _bits(score), *half, ages.numpy(), out.numpy())
        folded.append(out)
    return folded


_compiled = [False]  # whether a kernel was compiled since the last call (`_run`)


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
    numba's OpenMP pool sets it to every core). numba's OpenMP runtime is not torch's (numba links libgomp by another
    name), and by default an idle OpenMP worker spins for a while: two spinning pools would take the cores from
    torch's next operation and from Python between the kernels. The runtime reads the variable when it loads, so it
    is set for that moment only (a user's own ``OMP_WAIT_POLICY`` holds)."""
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
    counts = counts.numpy()
    chunks = -(-counts // CHUNK)
    segment = np.repeat(np.arange(counts.shape[0]), chunks)
    index = np.arange(segment.shape[0]) - np.repeat(np.cumsum(chunks) - chunks, chunks)  # chunk within its segment
    done = index * CHUNK
    rows = np.minimum(counts[segment] - done, CHUNK)
    return np.stack([segment, starts.numpy()[segment] + done, rows, offsets.numpy()[segment] + done], 1)


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
