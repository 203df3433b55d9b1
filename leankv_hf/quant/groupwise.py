"""Group-wise quantization of KV tensors ``[..., T, D]`` (tokens, head_dim last).

Two grouping axes:

* ``axis="token"``: each token row is split into groups of ``group_size``
  consecutive channels; scale/zero are ``[..., T, D // group_size]``. Rows stay
  independent, so a cache can select, evict and append tokens.
* ``axis="channel"`` (KIVI keys): each channel is split into groups of
  ``group_size`` consecutive tokens; scale/zero are ``[..., T // group_size, D]``.
  Keys have per-channel outliers, so this keeps them in their own groups. Blocks
  of whole groups can still be concatenated along T; single tokens cannot be
  selected.

Two formats: ``fmt="int"`` is asymmetric min/max with ``x ~= code * scale + zero``
and codes bit-packed (:mod:`.packing`); ``fmt="fp8"`` stores ``x / scale`` as
``float8_e4m3fn`` with an absmax scale (``scale = absmax / 448``), no zero.

Stored scale/zero are rounded *outward* to ``scale_dtype``: ``zero <= min`` and
``zero + (2**bits - 1) * scale >= max`` (fp8: ``448 * scale >= absmax``; the
upper ends up to fp32 rounding, ~2**-24 relative), and the codes are computed
from the stored values. So every element is reconstructed within ``scale / 2``
of the *stored* scale, plus float rounding of the output arithmetic, and nothing
is clipped. (A round-to-nearest fp16 zero point could sit half an fp16 ulp of
``min`` inside the group, which dwarfs ``scale`` for a narrow group far from 0.)

Constant groups: a zero range needs no division (scale 0, all codes 0), so the
group dequantizes to the stored zero: exactly the constant when it is
representable in ``scale_dtype`` (e.g. any fp16 value with fp16 scales);
otherwise the zero is the value just below it and a tiny scale covers the gap,
so the error stays below one ``scale_dtype`` ulp of the constant.

Non-finite input: min/max are per group, so a NaN/Inf only touches its own
group. That group (and any group whose scale/zero overflow ``scale_dtype``) gets
NaN scale and zero and dequantizes to all-NaN: loudly wrong rather than silently
finite. Its int codes are set to 0, so packing never sees out-of-range codes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from .packing import BITS, pack, unpack

Axis = Literal["token", "channel"]
Fmt = Literal["int", "fp8"]
AXES = ("token", "channel")
FMTS = ("int", "fp8")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized ``[..., T, D]`` tensor; immutable, ops return new instances.

    ``payload`` is packed uint8 codes ``[..., T, D * bits // 8]`` (int) or
    ``float8_e4m3fn`` ``[..., T, D]`` (fp8). ``scale``/``zero`` are
    ``[..., T, D // group_size]`` (token axis) or ``[..., T // group_size, D]``
    (channel axis); ``zero`` is None for fp8. ``last_dim`` is the original D and
    ``dtype`` the original dtype (the default for :meth:`dequantize`).
    """

    payload: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    axis: Axis
    fmt: Fmt
    last_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.payload.shape[:-1], self.last_dim))

    @property
    def device(self) -> torch.device:
        return self.payload.device

    @property
    def nbytes(self) -> int:
        """Bytes actually held: payload + scale + zero."""
        return sum(t.element_size() * t.numel() for t in (self.payload, self.scale, self.zero) if t is not None)

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize(self, dtype, out)

    def _leading_dim(self, dim: int) -> int:
        nd = self.payload.dim()
        d = dim + nd if dim < 0 else dim
        if not 0 <= d < nd - 1:
            raise ValueError(
                f"dim={dim} must be a leading dim in [{-nd}, {nd - 2}] of shape {tuple(self.shape)}; "
                "the last (channel) dim is packed"
            )
        return d

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedTensor:
        zero = None if self.zero is None else fn(self.zero)
        return replace(self, payload=fn(self.payload), scale=fn(self.scale), zero=zero)

    def index_select(self, dim: int, index: torch.Tensor) -> QuantizedTensor:
        """Select rows along a leading dim (e.g. tokens to keep, beams to reorder).

        Channel-axis groups span ``group_size`` tokens, so the token dim (-2)
        cannot be selected there; batch/head dims can.
        """
        d = self._leading_dim(dim)
        if self.axis == "channel" and d == self.payload.dim() - 2:
            raise ValueError(
                f"cannot index_select tokens (dim={dim}) of a channel-axis QuantizedTensor: each scale group "
                f"spans {self.group_size} tokens; dequantize, select and re-quantize instead"
            )
        return self._map(lambda t: t.index_select(d, index))

    @classmethod
    def cat(cls, parts: Sequence[QuantizedTensor], dim: int = -2) -> QuantizedTensor:
        """Concatenate along a leading dim (default: tokens).

        Works for both axes: a channel-axis part always holds whole token groups,
        so its scale rows concatenate alongside the payload rows.
        """
        if not parts:
            raise ValueError("cat needs at least one QuantizedTensor")
        first = parts[0]
        meta = _meta(first)
        for p in parts[1:]:
            if _meta(p) != meta:
                raise ValueError(f"cannot cat QuantizedTensors with different layouts: {meta} vs {_meta(p)}")
        d = first._leading_dim(dim)
        zero = None if first.zero is None else torch.cat([p.zero for p in parts], d)
        return replace(
            first,
            payload=torch.cat([p.payload for p in parts], d),
            scale=torch.cat([p.scale for p in parts], d),
            zero=zero,
        )


def _meta(q: QuantizedTensor) -> tuple:
    return (q.bits, q.group_size, q.axis, q.fmt, q.last_dim, q.dtype, q.scale.dtype, q.payload.dim())


def _check_args(bits: int, group_size: int, axis: str, fmt: str, scale_dtype: torch.dtype) -> None:
    if fmt not in FMTS:
        raise ValueError(f"fmt={fmt!r} is not supported; allowed: {FMTS}")
    if axis not in AXES:
        raise ValueError(f"axis={axis!r} is not supported; allowed: {AXES}")
    allowed = BITS if fmt == "int" else (8,)
    if type(bits) is not int or bits not in allowed:
        raise ValueError(f"bits={bits!r} is not supported for fmt={fmt!r}; allowed: {allowed}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size={group_size!r} must be a positive int")
    if not scale_dtype.is_floating_point or scale_dtype.itemsize < 2:
        raise ValueError(f"scale_dtype={scale_dtype} must be a float dtype of at least 16 bits")


def _grouped_shape(shape: torch.Size, group_size: int, axis: str) -> tuple[list[int], int]:
    """Shape that exposes the groups as one dim, and that dim (reduced over)."""
    *lead, t, d = shape
    if axis == "token":
        if d % group_size:
            raise ValueError(f"axis='token' needs D={d} divisible by group_size={group_size}")
        return [*lead, t, d // group_size, group_size], -1
    if t % group_size:
        raise ValueError(
            f"axis='channel' needs T={t} divisible by group_size={group_size} (keep the remainder unquantized)"
        )
    return [*lead, t // group_size, group_size, d], -2


def _round_outward(v: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """Round ``v`` to ``dtype``, stepping one ulp so the result is >= v (up) or <= v."""
    r = v.to(dtype)
    back = r.to(v.dtype)
    wrong = back < v if up else back > v
    step = torch.full((), float("inf") if up else float("-inf"), dtype=dtype, device=r.device)
    return torch.where(wrong, r.nextafter(step), r)


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    axis: Axis = "token",
    fmt: Fmt = "int",
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedTensor:
    """Quantize ``x`` ``[..., T, D]`` group-wise (see module docstring for the scheme)."""
    _check_args(bits, group_size, axis, fmt, scale_dtype)
    if not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating tensor [..., T, D], got {x.dtype} of shape {tuple(x.shape)}")
    gshape, red = _grouped_shape(x.shape, group_size, axis)
    compute = torch.promote_types(x.dtype, torch.float32)
    xg = x.reshape(gshape).to(compute)

    if fmt == "fp8":
        amax = xg.abs().amax(red, keepdim=True)
        scale = _round_outward(amax / FP8_MAX, scale_dtype, up=True)
        scale = scale.masked_fill(~scale.isfinite(), float("nan"))
        s = scale.to(compute)
        safe = torch.where(s > 0, s, 1.0)
        payload = (xg / safe).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).reshape(x.shape)
        return QuantizedTensor(payload, scale.squeeze(red), None, bits, group_size, axis, fmt, x.shape[-1], x.dtype)

    levels = (1 << bits) - 1
    lo, hi = torch.aminmax(xg, dim=red, keepdim=True)
    zero = _round_outward(lo, scale_dtype, up=False)
    z = zero.to(compute)
    scale = _round_outward((hi - z) / levels, scale_dtype, up=True)
    bad = ~(zero.isfinite() & scale.isfinite())
    zero, scale = zero.masked_fill(bad, float("nan")), scale.masked_fill(bad, float("nan"))
    s = scale.to(compute)
    safe = torch.where(s > 0, s, 1.0)  # scale 0 <=> constant group: x - z == 0 there
    codes = (xg - z).div_(safe).round_().clamp_(0, levels).nan_to_num_(0.0).to(torch.uint8)
    payload = pack(codes.reshape(x.shape), bits)
    return QuantizedTensor(
        payload, scale.squeeze(red), zero.squeeze(red), bits, group_size, axis, fmt, x.shape[-1], x.dtype
    )


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reconstruct ``q`` as a ``dtype`` tensor (default: the original dtype), or into ``out``.

    Unpack once, then one affine pass into a fresh ``dtype`` buffer. Scale and
    zero are cast to ``dtype`` first, so 16-bit outputs carry a few ``dtype``
    ulps of extra error rather than round-tripping through fp32. ``out`` (a
    slice of a bigger buffer, say) saves the copy a later concatenation would make.
    """
    dtype = (q.dtype if out is None else out.dtype) if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype} must be a floating dtype")
    if out is not None and (out.shape != q.shape or out.dtype != dtype):
        raise ValueError(f"out must be a {dtype} tensor of shape {tuple(q.shape)}, got {out.dtype} {tuple(out.shape)}")
    gshape, red = _grouped_shape(q.shape, q.group_size, q.axis)
    scale = q.scale.to(dtype).unsqueeze(red)
    codes = q.payload if q.fmt == "fp8" else unpack(q.payload, q.bits)
    if out is None and codes.device.type != "cpu" and q.fmt == "int":
        # Accelerators: one fused kernel that reads uint8 codes and casts in-kernel.
        return torch.addcmul(q.zero.to(dtype).unsqueeze(red), codes.view(gshape), scale).view(q.shape)
    # CPU kernels vectorize at most one broadcast operand, so a fused addcmul (two: scale and zero) runs
    # scalar; convert + in-place passes is ~2.5x faster.
    target = torch.empty(q.shape, dtype=dtype, device=codes.device) if out is None else out
    grouped = target.view(gshape)
    grouped.copy_(codes.view(gshape)).mul_(scale)
    if q.zero is not None:
        grouped.add_(q.zero.to(dtype).unsqueeze(red))
    return target
