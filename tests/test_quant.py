"""Tests for leankv_hf.quant: bit packing and group-wise KV quantization."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leankv_hf.quant import QuantizedTensor, dequantize, pack, quantize, unpack
from leankv_hf.quant.packing import _unpack_reference

FAST = settings(max_examples=25, deadline=None)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grouped(t: torch.Tensor, gs: int, axis: str) -> tuple[torch.Tensor, int]:
    """Independent re-statement of the grouping: view with a group dim, and that dim."""
    *lead, n, d = t.shape
    if axis == "token":
        return t.reshape(*lead, n, d // gs, gs), -1
    return t.reshape(*lead, n // gs, gs, d), -2


def _per_element(stat: torch.Tensor, gs: int, axis: str) -> torch.Tensor:
    """Broadcast a per-group statistic back to element positions."""
    return stat.repeat_interleave(gs, dim=-1 if axis == "token" else -2)


def _group_absmax(x: torch.Tensor, gs: int, axis: str) -> torch.Tensor:
    g, red = _grouped(x.double(), gs, axis)
    return _per_element(g.abs().amax(red), gs, axis)


def _assert_within_bound(x: torch.Tensor, q: QuantizedTensor, dq: torch.Tensor) -> None:
    """|dq - x| <= scale/2 + eps elementwise.

    eps = 4 * finfo(out dtype).eps * group absmax. Stored scale/zero are rounded
    outward to fp16, so fp16 storage adds nothing beyond scale/2; eps covers the
    output arithmetic: fp32 code/reconstruction rounding (tiny), or for bf16
    output the bf16 rounding of zero, scale, product and sum (<= 3 eps * absmax).
    """
    s = _per_element(q.scale.double(), q.group_size, q.axis)
    eps = 4 * torch.finfo(dq.dtype).eps * _group_absmax(x, q.group_size, q.axis)
    err = (dq.double() - x.double()).abs()
    excess = err - (s / 2 + eps)
    assert (excess <= 0).all(), f"max excess {excess.max().item():.3g}, max err {err.max().item():.3g}"


# --------------------------------------------------------------------------- packing


@FAST
@given(
    bits=st.sampled_from([2, 4, 8]),
    lead=st.lists(st.integers(1, 3), max_size=3),
    runs=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_roundtrip(bits: int, lead: list[int], runs: int, seed: int) -> None:
    d = runs * (8 // bits)
    codes = torch.randint(0, 2**bits, (*lead, d), dtype=torch.uint8, generator=_gen(seed))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, d * bits // 8)
    assert packed.numel() * packed.element_size() == codes.numel() * bits // 8
    assert torch.equal(unpack(packed, bits), codes)
    assert torch.equal(_unpack_reference(packed, bits), codes)  # fast path == endian-free spec


def test_pack_layout_is_little_endian_interleaved() -> None:
    assert pack(torch.tensor([1, 2, 15, 0], dtype=torch.uint8), 4).tolist() == [0x21, 0x0F]
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert unpack(torch.tensor([0xE4], dtype=torch.uint8), 2).tolist() == [0, 1, 2, 3]


def test_pack_unpack_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"bits=3.*\(2, 4, 8\)"):
        pack(torch.zeros(8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=r"bits=16"):
        unpack(torch.zeros(8, dtype=torch.uint8), 16)
    with pytest.raises(ValueError, match=r"D=6.*bits=2"):
        pack(torch.zeros(2, 6, dtype=torch.uint8), 2)
    with pytest.raises(TypeError, match="uint8"):
        pack(torch.zeros(8, dtype=torch.int32), 4)


# --------------------------------------------------------------------------- error bound


@FAST
@given(
    bits=st.sampled_from([2, 4, 8]),
    axis=st.sampled_from(["token", "channel"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    gs=st.sampled_from([8, 16, 32]),
    lead=st.lists(st.integers(1, 2), min_size=0, max_size=2),
    n=st.integers(1, 3),
    d=st.sampled_from([32, 64]),
    log_std=st.floats(-2, 2),
    offset=st.floats(-100, 100),
    seed=st.integers(0, 2**31 - 1),
)
def test_error_bound(bits, axis, dtype, gs, lead, n, d, log_std, offset, seed) -> None:
    t = n * gs if axis == "channel" else n + 4
    x = torch.randn(*lead, t, d, generator=_gen(seed)) * 10**log_std + offset
    x = x.to(dtype)
    x0 = x.clone()
    q = quantize(x, bits, gs, axis)
    assert torch.equal(x, x0)  # the input is never modified in place
    dq = q.dequantize()
    assert dq.dtype == dtype and dq.shape == x.shape == q.shape
    _assert_within_bound(x, q, dq)
    g, red = _grouped(x.double(), gs, axis)
    lo, hi, amax = g.amin(red), g.amax(red), g.abs().amax(red)
    levels = 2**bits - 1
    zero, top = q.zero.double(), q.zero.double() + levels * q.scale.double()
    # Outward rounding: the stored grid covers the group (top up to fp32 rounding).
    assert (zero <= lo).all() and (top >= hi - 2**-22 * amax).all()
    # ...without inflating the scale (else the bound above would be vacuous): the
    # grid overshoots only by the fp16 rounding of zero and scale (~3 * 2**-10 * amax).
    assert (top - zero <= hi - lo + 2**-8 * amax + (levels + 1) * 2**-23).all()


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_dequantize_dtype_override_and_noncontiguous_input(axis: str) -> None:
    # HF hands us [B, H, T, D] made by transposing [B, T, H, D]: not contiguous.
    x = torch.randn(2, 16, 3, 32, generator=_gen(0)).transpose(1, 2)
    assert not x.is_contiguous()
    q = quantize(x, 4, 8, axis)
    ref = quantize(x.contiguous(), 4, 8, axis)
    assert torch.equal(q.payload, ref.payload) and torch.equal(q.scale, ref.scale)
    d64 = dequantize(q, torch.float64)
    assert d64.dtype == torch.float64
    torch.testing.assert_close(d64.float(), q.dequantize(torch.float32))
    with pytest.raises(ValueError, match="int32"):
        q.dequantize(torch.int32)


@pytest.mark.parametrize("fmt,bits", [("int", 2), ("int", 4), ("int", 8), ("fp8", 8)])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_dequantize_into_a_slice_of_a_bigger_buffer(axis: str, fmt: str, bits: int) -> None:
    """``out=`` writes exactly what a fresh dequantize returns, only into its slice (the cache's hot path)."""
    x = torch.randn(2, 3, 16, 32, generator=_gen(1))
    q = quantize(x, bits, 8, axis, fmt)
    buffer = torch.full((2, 3, 20, 32), 7.0)
    dequantize(q, out=buffer[:, :, :16])
    assert torch.equal(buffer[:, :, :16], dequantize(q, torch.float32))
    assert (buffer[:, :, 16:] == 7.0).all()
    with pytest.raises(ValueError, match="shape"):
        dequantize(q, out=buffer)


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_groups(axis: str, bits: int) -> None:
    gs = 8
    x = torch.randn(2, 16, 32, generator=_gen(1))
    g, _ = _grouped(x, gs, axis)  # a view: writes land in x
    consts = [0.0, 1.5, -2.25, 3.3, 1e-4]  # 3.3 and 1e-4 are not fp16-representable
    for i, c in enumerate(consts):
        if axis == "token":
            g[0, i, 1] = c
        else:
            g[0, 1, :, i] = c
    dq = quantize(x, bits, gs, axis).dequantize()
    assert not dq.isnan().any()
    dg, _ = _grouped(dq, gs, axis)
    for i, c in enumerate(consts):
        got = dg[0, i, 1] if axis == "token" else dg[0, 1, :, i]
        c32 = torch.tensor(c)
        if c32.half().float() == c32:
            assert torch.equal(got, c32.expand_as(got)), (c, got)
        else:  # within one fp16 ulp of the zero point
            ulp = math.ulp(float(c32.half())) * 2 ** (52 - 10)
            assert (got - c32).abs().max() <= ulp, (c, got)


@pytest.mark.parametrize("fmt,bits", [("int", 2), ("int", 4), ("int", 8), ("fp8", 8)])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_nonfinite_stays_in_its_group(axis: str, fmt: str, bits: int) -> None:
    gs = 8
    x = torch.randn(3, 16, 32, generator=_gen(2))
    bad_group = torch.zeros((3, 16, 32 // gs) if axis == "token" else (3, 16 // gs, 32), dtype=torch.bool)
    bad_group[:, 1, 1] = True
    bad = _per_element(bad_group, gs, axis)
    # Poison one element of group (1, 1) in each batch: NaN, +Inf, -Inf.
    first = bad.flatten(1).int().argmax(1)
    x.flatten(1)[torch.arange(3), first] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    q = quantize(x, bits, gs, axis, fmt=fmt)
    assert torch.equal(q.scale.isnan(), bad_group)
    dq = q.dequantize()
    assert dq[bad].isnan().all()  # documented: the whole bad group reads back as NaN
    assert dq[~bad].isfinite().all()
    good = x.masked_fill(bad, 0.0)
    ref = quantize(good, bits, gs, axis, fmt=fmt)
    # Other groups are quantized exactly as if the bad values were never there...
    assert torch.equal(dq[~bad], ref.dequantize()[~bad])
    if fmt == "int":  # ...so they also meet the error bound.
        _assert_within_bound(good, ref, ref.dequantize())


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("fmt,bits", [("int", 2), ("int", 4), ("int", 8), ("fp8", 8)])
def test_nbytes(axis: str, fmt: str, bits: int) -> None:
    q = quantize(torch.randn(2, 3, 16, 64), bits, 16, axis, fmt=fmt)
    tensors = [t for t in (q.payload, q.scale, q.zero) if t is not None]
    assert q.nbytes == sum(t.element_size() * t.numel() for t in tensors)
    assert q.payload.element_size() * q.payload.numel() == 2 * 3 * 16 * 64 * bits // 8
    assert (q.zero is None) == (fmt == "fp8")


def test_nbytes_int4_row() -> None:
    rows = 2 * 3 * 10
    q = quantize(torch.randn(2, 3, 10, 64), 4, 64, scale_dtype=torch.float16)
    assert q.nbytes == rows * (32 + 4)  # 64 nibbles + fp16 scale + fp16 zero per token row


# --------------------------------------------------------------------------- row ops


@pytest.mark.parametrize("fmt,bits", [("int", 2), ("int", 4), ("fp8", 8)])
def test_token_axis_index_select_and_cat(fmt: str, bits: int) -> None:
    x = torch.randn(2, 3, 12, 32, generator=_gen(3))
    q = quantize(x, bits, 16, fmt=fmt)

    def same(a: QuantizedTensor, b: QuantizedTensor) -> None:
        assert a.shape == b.shape
        assert torch.equal(a.payload.view(torch.uint8), b.payload.view(torch.uint8))
        assert torch.equal(a.scale, b.scale)
        assert (a.zero is None and b.zero is None) or torch.equal(a.zero, b.zero)
        assert torch.equal(a.dequantize(), b.dequantize())

    keep = torch.tensor([0, 5, 6, 11])
    same(q.index_select(-2, keep), quantize(x.index_select(-2, keep), bits, 16, fmt=fmt))
    same(q.index_select(2, keep), quantize(x.index_select(2, keep), bits, 16, fmt=fmt))
    beams = torch.tensor([1, 1, 0])
    same(q.index_select(0, beams), quantize(x.index_select(0, beams), bits, 16, fmt=fmt))
    parts = [quantize(x[..., a:b, :], bits, 16, fmt=fmt) for a, b in [(0, 5), (5, 6), (6, 12)]]
    same(QuantizedTensor.cat(parts), q)
    head0 = q.index_select(1, torch.tensor([0]))
    same(QuantizedTensor.cat([head0, q], dim=1), quantize(torch.cat([x[:, :1], x], 1), bits, 16, fmt=fmt))


def test_channel_axis_row_ops() -> None:
    x = torch.randn(2, 3, 32, 16, generator=_gen(4))
    q = quantize(x, 4, 8, "channel")
    for dim in (2, -2):
        with pytest.raises(ValueError, match=r"channel-axis.*8 tokens"):
            q.index_select(dim, torch.tensor([0]))
    # Batch/head dims and whole token groups are fine.
    sel = q.index_select(0, torch.tensor([1]))
    assert torch.equal(sel.dequantize(), quantize(x[1:], 4, 8, "channel").dequantize())
    blocks = [quantize(x[..., a : a + 8, :], 4, 8, "channel") for a in range(0, 32, 8)]
    assert torch.equal(QuantizedTensor.cat(blocks).dequantize(), q.dequantize())


def test_row_ops_bad_arguments() -> None:
    q = quantize(torch.randn(2, 8, 16), 4, 8)
    for dim in (-1, 2, 3, -4):
        with pytest.raises(ValueError, match=f"dim={dim}"):
            q.index_select(dim, torch.tensor([0]))
    with pytest.raises(ValueError, match="at least one"):
        QuantizedTensor.cat([])
    with pytest.raises(ValueError, match="different layouts"):
        QuantizedTensor.cat([q, quantize(torch.randn(2, 8, 16), 2, 8)])
    with pytest.raises(ValueError, match="different layouts"):
        QuantizedTensor.cat([q, quantize(torch.randn(2, 8, 16), 4, 8, "channel")])


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=3), r"bits=3.*\(2, 4, 8\)"),
        (dict(bits=4.0), r"bits=4.0"),
        (dict(bits=4, fmt="fp8"), r"bits=4.*fp8.*\(8,\)"),
        (dict(fmt="int3"), r"fmt='int3'.*\('int', 'fp8'\)"),
        (dict(axis="head"), r"axis='head'.*\('token', 'channel'\)"),
        (dict(group_size=0), r"group_size=0"),
        (dict(group_size=-8), r"group_size=-8"),
        (dict(group_size=12), r"D=32.*group_size=12"),
        (dict(group_size=16, axis="channel"), r"T=24.*group_size=16"),
        (dict(scale_dtype=torch.int16), r"scale_dtype=torch.int16"),
    ],
)
def test_quantize_bad_arguments(kwargs: dict, match: str) -> None:
    args = dict(bits=4, group_size=8) | kwargs
    with pytest.raises(ValueError, match=match):
        quantize(torch.randn(2, 24, 32), **args)


def test_quantize_bad_input() -> None:
    with pytest.raises(ValueError, match="int64"):
        quantize(torch.zeros(4, 8, dtype=torch.int64), 4, 8)
    with pytest.raises(ValueError, match=r"\(8,\)"):
        quantize(torch.zeros(8), 4, 8)


# --------------------------------------------------------------------------- fp8


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_roundtrip(axis: str, dtype: torch.dtype) -> None:
    """e4m3 keeps 3 mantissa bits: relative error <= 2**-4 for normal values, plus
    half the smallest subnormal (2**-10 * scale) near 0, plus output rounding."""
    x = (torch.randn(2, 3, 32, 64, generator=_gen(5)) * torch.logspace(-2, 2, 64)).to(dtype)
    q = quantize(x, 8, 16, axis, fmt="fp8")
    assert q.payload.dtype == torch.float8_e4m3fn and q.zero is None
    dq = q.dequantize()
    err = (dq.double() - x.double()).abs()
    s = _per_element(q.scale.double(), 16, axis)
    xa = x.double().abs()
    assert (err <= xa * (2**-4 + 2 * torch.finfo(dtype).eps) + 2**-10 * s).all()
    rel = err / xa.clamp_min(1e-30)
    assert rel.median() < 0.03  # typical error ~1.5%; a wrong scale or rounding shows here


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", DEVICES)
def test_device_follows_input(device: str) -> None:
    x = torch.randn(1, 2, 16, 64, generator=_gen(6)).to(device)
    for axis in ("token", "channel"):
        for fmt, bits in (("int", 2), ("int", 4), ("fp8", 8)):
            q = quantize(x, bits, 16, axis, fmt=fmt)
            assert q.device == x.device and q.scale.device == x.device
            dq = q.dequantize()
            assert dq.device == x.device
            ref = quantize(x.cpu(), bits, 16, axis, fmt=fmt).dequantize()
            torch.testing.assert_close(dq.cpu(), ref, rtol=1e-6, atol=1e-6)
