"""The compression pipeline's stages as public building blocks on plain tensors — the code the caches run.

`Quantizer` (group-wise int/fp8, the caches' `Precision`), `Sparsifier` (a sparse policy choosing each head's
tokens), `LowRanker` (per-head SVD basis and coefficients) and `Reconstructor` (coefficients back to vectors).
Shapes follow transformers: ``[batch, kv_heads, tokens, head_dim]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .policy import PRUNED, Candidates, sparse_policy
from .store import Encoded, Precision, decode, fit_basis


@dataclass(frozen=True)
class Quantizer:
    """Group-wise quantization of ``[..., T, D]`` tensors; ``bits=16`` passes tensors through.

    Example:
        >>> x = torch.randn(1, 2, 8, 64)
        >>> q = Quantizer(bits=4, group_size=32)
        >>> packed = q.encode(x)
        >>> packed.payload.shape   # two 4-bit codes per byte
        torch.Size([1, 2, 8, 32])
        >>> bool(((q.decode(packed) - x).abs() <= packed.scale.float().repeat_interleave(32, -1)).all())
        True
    """

    bits: int = 8
    group_size: int = 64
    axis: str = "token"
    fmt: str = "int"
    precision: Precision = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "precision", Precision(self.bits, self.group_size, self.axis, self.fmt))  # validates

    def encode(self, x: torch.Tensor) -> Encoded:
        return self.precision.encode(x)

    def decode(self, x: Encoded, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Back to a tensor, in ``dtype`` (default: the dtype it was encoded from)."""
        return decode(x, dtype or x.dtype)


@dataclass(frozen=True)
class Sparsifier:
    """Per-head token selection: each head keeps its best ``1 - ratio`` of the tokens by importance, ranked by a
    sparse policy (`policy.sparse_policy`: ``method`` and its ``options``); the first ``sink`` tokens always stay.

    Example:
        >>> keys = values = torch.randn(1, 2, 8, 4)
        >>> scores = torch.rand(1, 2, 8)
        >>> kept_k, kept_v, counts = Sparsifier(ratio=0.5, method="snapkv", options={"pooling": 1})(keys, values, scores)
        >>> counts.tolist(), kept_k.shape   # rows of every head, one after the other
        ([[4, 4]], torch.Size([8, 4]))
    """

    ratio: float = 0.5
    method: str = "snapkv"
    sink: int = 0
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio={self.ratio!r} must be in [0, 1): the fraction of each head's tokens pruned")
        if not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"sink={self.sink!r} must be an int >= 0")
        sparse_policy(self.method, **self.options)  # unknown methods and options fail here

    def keep(self, scores: torch.Tensor) -> torch.Tensor:
        """``[B, H, T]`` True where a head keeps a token, from importance ``scores[B, H, T]``."""
        batch, heads, tokens = scores.shape
        positions = torch.arange(tokens, device=scores.device).expand(batch, heads, tokens)
        total = torch.full((batch,), tokens, device=scores.device)
        candidates = Candidates(
            scores=scores.float(),
            positions=positions,
            valid=torch.ones_like(positions, dtype=torch.bool),
            sink=positions < self.sink,
            budget=torch.full_like(total, math.ceil(tokens * (1 - self.ratio))),
            capacity=total,
            context=total,
            layer_idx=0,
            num_layers=1,
        )
        return sparse_policy(self.method, **self.options).assign(candidates) != PRUNED

    def __call__(
        self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept ``keys``/``values`` rows ``[N, D]`` (by head, then position) and ``counts[B, H]`` per head."""
        mask = self.keep(scores)
        return keys[mask], values[mask], mask.sum(-1)


@dataclass(frozen=True)
class LowRanker:
    """Per-head SVD: a basis ``[B, H, D, rank]`` of the ``rank`` strongest directions of keys ``[B, H, T, D]``
    and their coefficients ``[B, H, T, rank]`` (quantize them with a `Quantizer`; exact at ``rank == D``).

    Example:
        >>> keys = torch.randn(1, 2, 32, 16)
        >>> coefficients, basis = LowRanker(rank=16)(keys)
        >>> torch.allclose(Reconstructor()(coefficients, basis), keys, atol=1e-4)
        True
    """

    rank: int

    def __post_init__(self):
        Precision(rank=self.rank)  # validates

    def fit(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The basis, from the tokens where ``valid[B, H, T]`` (default: all)."""
        if self.rank > x.shape[-1]:
            raise ValueError(f"rank={self.rank} must be in 1..head_dim={x.shape[-1]}")
        return fit_basis(x, self.rank, valid)

    def project(self, x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        return x @ basis.to(x.dtype)

    def __call__(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(coefficients, basis)`` of ``x``."""
        basis = self.fit(x, valid)
        return self.project(x, basis), basis


@dataclass(frozen=True)
class Reconstructor:
    """Coefficients (plain, or encoded by a `Quantizer`) back to vectors: ``coefficients @ basis^T``, in
    ``dtype`` (default: the coefficients' own)."""

    dtype: torch.dtype | None = None

    def __call__(self, coefficients: Encoded, basis: torch.Tensor) -> torch.Tensor:
        c = decode(coefficients, self.dtype or coefficients.dtype)
        return c @ basis.to(c.dtype).mT
