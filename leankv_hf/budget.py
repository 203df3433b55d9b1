"""A hard memory cap (``budget_mb``): the bytes each KV head of each layer may hold, and how a policy's tier
choice is cut down to fit them.

The policy decides first (thresholds, scores); `fit_to_budget` only ever lowers its choice: the least important
tokens of a head over its share move down one tier at a time (cheaper rows), and only when the lowest tier
still does not fit are the least important of those pruned. Sink tokens are never pruned for the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .policy import PRUNED, topk_mask
from .quant import QuantizedTensor
from .store import Encoded, Precision

# Per stored row, besides keys and values: position int32, score fp16, age uint8 (see RaggedStore).
ROW_METADATA_BYTES = 4 + 2 + 1


def encoded_nbytes(x: Encoded) -> int:
    return x.nbytes if isinstance(x, QuantizedTensor) else x.numel() * x.element_size()


def row_nbytes(key: Precision, value: Precision, head_dim: int, dtype: torch.dtype) -> int:
    """What one stored token of one head costs in a tier: measured by encoding a row, metadata included."""
    row = torch.zeros(1, head_dim, dtype=dtype)
    return (
        encoded_nbytes(key.encode(row[:, : key.rank or head_dim]))
        + encoded_nbytes(value.encode(row))
        + ROW_METADATA_BYTES
    )


@dataclass
class BudgetReport:
    """What the cap did so far: token-heads moved down a tier, and pruned, to stay within the budget."""

    demoted: int = 0
    pruned: int = 0


def _lowest(scores: torch.Tensor, mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """True for the ``k[b, h]`` lowest-scored entries of ``mask`` in each row of the last dim."""
    return mask & topk_mask(-scores.masked_fill(~mask, float("inf")), k)


def fit_to_budget(
    tiers: torch.Tensor,
    scores: torch.Tensor,
    protected: torch.Tensor,
    row_bytes: Sequence[int],
    budget: torch.Tensor,
    report: BudgetReport | None = None,
) -> torch.Tensor:
    """Lower ``tiers[B, H, L]`` (0 = most precise, -1 pruned) until each head's rows cost at most ``budget[B, H]``
    bytes, with ``row_bytes[t]`` per row of tier ``t`` (decreasing). ``protected`` tokens are never pruned."""
    tiers = tiers.clone()
    costs = torch.tensor(row_bytes, device=tiers.device)

    def over() -> torch.Tensor:
        return ((tiers[..., None] == torch.arange(len(row_bytes), device=tiers.device)).sum(-2) * costs).sum(
            -1
        ) - budget

    for t in range(len(row_bytes) - 1):
        excess = over().clamp_min(0)
        saving = row_bytes[t] - row_bytes[t + 1]
        if saving <= 0:  # the next tier is no cheaper: moving down saves nothing
            continue
        moved = _lowest(scores, tiers == t, (excess + saving - 1) // saving)
        tiers[moved] = t + 1
        if report is not None:
            report.demoted += int(moved.sum())
    last = len(row_bytes) - 1
    excess = over().clamp_min(0)
    dropped = _lowest(scores, (tiers == last) & ~protected, (excess + row_bytes[last] - 1) // row_bytes[last])
    tiers[dropped] = PRUNED
    if report is not None:
        report.pruned += int(dropped.sum())
    return tiers
