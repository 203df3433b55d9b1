"""Bit packing of small unsigned codes into uint8 along the last dim.

Layout (interleaved, little-endian within a byte): with ``k = 8 // bits`` codes
per byte, codes ``c[..., k*j : k*j + k]`` share byte ``j``, code ``i`` of the run
in bits ``[i*bits, (i+1)*bits)``; so for 4 bits ``byte = c0 | c1 << 4`` and for
2 bits ``byte = c0 | c1 << 2 | c2 << 4 | c3 << 6``. Packing is local to the last
dim, so leading dims (batch, heads, tokens) can be sliced, selected and
concatenated on the packed tensor exactly as on the codes.
"""

from __future__ import annotations

import sys

import torch

BITS = (2, 4, 8)
_LITTLE_ENDIAN = sys.byteorder == "little"


def _per_byte(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed: {BITS}")
    return 8 // bits


def _check_uint8(t: torch.Tensor, name: str) -> None:
    if t.dtype != torch.uint8:
        raise TypeError(f"{name} must be torch.uint8, got {t.dtype}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` in ``[0, 2**bits)`` into ``D * bits // 8`` bytes along the last dim.

    Codes must be in range (higher bits would bleed into the neighbour code);
    the quantizer guarantees it, so no masking pass is spent here.
    """
    k = _per_byte(bits)
    _check_uint8(codes, "codes")
    if k == 1:
        return codes
    d = codes.shape[-1]
    if d % k:
        raise ValueError(f"last dim D={d} must be divisible by {k} to pack bits={bits}")
    runs = codes.reshape(*codes.shape[:-1], d // k, k)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    # The bit fields are disjoint, so the uint8 sum is an OR and cannot overflow.
    return (runs << shifts).sum(-1, dtype=torch.uint8)


def _split(packed: torch.Tensor, field: int) -> torch.Tensor:
    """Split every byte into its low and next ``field`` bits, as two adjacent bytes.

    Widening to int16 and OR-ing a shifted copy lands the high field in the high
    byte; viewing back as uint8 (little-endian) interleaves them for free. This
    avoids ``torch.stack`` whose strided uint8 copy dominates unpack on CPU.
    """
    mask = ((1 << field) - 1) * 0x0101
    wide = packed.to(torch.int16)
    return wide.bitwise_or_(wide << (8 - field)).bitwise_and_(mask).view(torch.uint8)


def _unpack_reference(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Straightforward unpack (endianness-free); the spec the fast path is tested against."""
    mask = (1 << bits) - 1
    return torch.stack([(packed >> s) & mask for s in range(0, 8, bits)], -1).flatten(-2)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 codes with last dim ``packed.shape[-1] * 8 // bits``.

    Hot path (every decode step reads the whole cache): 4 bits is one byte split,
    2 bits two (nibbles, then 2-bit fields), each a handful of vectorized int16 ops.
    """
    k = _per_byte(bits)
    _check_uint8(packed, "packed")
    if k == 1:
        return packed
    if not _LITTLE_ENDIAN:
        return _unpack_reference(packed, bits)
    codes = _split(packed, 4)
    return codes if bits == 4 else _split(codes, 2)
