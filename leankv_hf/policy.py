"""Policies: given the tokens a layer may keep and their importance, choose each one's tier (or prune it).

Every policy sees `Candidates` (padded per batch row and KV head) and returns ``[B, H, L]`` int8: the tier
index (0 = highest precision) or -1 for pruned. Sink tokens are always kept at tier 0 and padding always
pruned, by `assign`, so a policy only ranks the rest. One small class per method, one shared instance per cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PRUNED = -1


@dataclass
class Candidates:
    """Everything a policy decides from. Padded slots have ``valid=False``."""

    scores: torch.Tensor  # [B, H, L] float32: mean attention each token received per query
    positions: torch.Tensor  # [B, H, L] int64: absolute positions (for sinks, recency, chunks)
    valid: torch.Tensor  # [B, H, L] bool
    sink: torch.Tensor  # [B, H, L] bool: always kept
    budget: torch.Tensor  # [B] int64: tokens each head may keep among the candidates (sparsity policies)
    context: torch.Tensor  # [B] int64: real tokens seen (uniform attention is 1 / context)
    layer_idx: int
    num_layers: int


def _topk_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row of the last dim, True for the ``k[b]`` highest scores (``k`` broadcast over the middle dims)."""
    order = scores.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank < k.view(-1, *([1] * (scores.dim() - 1)))


class Policy:
    """Base: rank candidates; ``select`` returns True where a token is kept (single tier).

    ``pooling`` (odd kernel, 1 = off) max-pools scores over neighbouring positions first, as SnapKV does, so a
    multi-token fact (a number, a name) is kept or dropped whole.
    """

    name = "base"
    tiers = 1
    pooling = 1

    def pooled(self, scores: torch.Tensor) -> torch.Tensor:
        if self.pooling <= 1:
            return scores
        b, h, n = scores.shape
        flat = scores.reshape(b * h, 1, n).clamp_min(0)  # -inf slots pool as 0 and stay excluded by `valid`
        pooled = F.max_pool1d(flat, self.pooling, stride=1, padding=self.pooling // 2)
        return pooled.view(b, h, n).masked_fill(scores == float("-inf"), float("-inf"))

    def select(self, c: Candidates) -> torch.Tensor:
        raise NotImplementedError

    def assign(self, c: Candidates) -> torch.Tensor:
        free = c.valid & ~c.sink
        masked = Candidates(
            scores=self.pooled(c.scores.masked_fill(~free, float("-inf"))),
            positions=c.positions,
            valid=free,
            sink=c.sink,
            budget=(c.budget - (c.sink & c.valid).sum(-1).amax(-1)).clamp_min(0),
            context=c.context,
            layer_idx=c.layer_idx,
            num_layers=c.num_layers,
        )
        tier = self.tier_of(masked)
        tier = torch.where(free, tier, torch.full_like(tier, PRUNED))
        return torch.where(c.sink & c.valid, torch.zeros_like(tier), tier)

    def tier_of(self, c: Candidates) -> torch.Tensor:
        keep = self.select(c) & c.valid
        return torch.where(keep, 0, PRUNED).to(torch.int8)


@dataclass
class TopKPolicy(Policy):
    """SnapKV (pooled observation-window scores) and H2O (accumulated scores): each head keeps its best tokens."""

    name: str = "snapkv"
    pooling: int = 7

    def select(self, c: Candidates) -> torch.Tensor:
        return _topk_mask(c.scores, c.budget)


@dataclass
class AdaKVPolicy(TopKPolicy):
    """AdaKV: the layer's budget (heads x per-head budget) goes to the best tokens across heads, each head
    guaranteed a ``floor`` share of the uniform budget."""

    name: str = "adakv"
    floor: float = 0.2

    def select(self, c: Candidates) -> torch.Tensor:
        scores = c.scores
        b, h, n = scores.shape
        guaranteed = _topk_mask(scores, (c.budget.float() * self.floor).floor().long())
        rest = scores.masked_fill(guaranteed, float("-inf")).reshape(b, 1, h * n)
        extra = (c.budget * h - guaranteed.view(b, -1).sum(-1)).clamp_min(0)
        return guaranteed | _topk_mask(rest, extra).view(b, h, n)


@dataclass
class StreamingPolicy(Policy):
    """StreamingLLM: sinks plus the most recent tokens; importance is ignored."""

    name: str = "streaming"

    def select(self, c: Candidates) -> torch.Tensor:
        recency = c.positions.float().masked_fill(~c.valid, float("-inf"))
        return _topk_mask(recency, c.budget)


@dataclass
class PyramidPolicy(TopKPolicy):
    """PyramidKV: lower layers keep more, upper layers fewer (linear from ``(2 - beta)`` to ``beta`` times the
    mean budget), each layer ranking like SnapKV."""

    name: str = "pyramid"
    beta: float = 0.4

    def select(self, c: Candidates) -> torch.Tensor:
        frac = c.layer_idx / max(c.num_layers - 1, 1)
        scale = (2 - self.beta) - frac * 2 * (1 - self.beta)
        return _topk_mask(c.scores, (c.budget.float() * scale).round().long())


@dataclass
class ChunkKVPolicy(Policy):
    """ChunkKV: keep whole chunks of consecutive tokens, ranked by their summed importance; layers in groups of
    ``reuse`` take the first layer's choice (layer-wise index reuse)."""

    name: str = "chunkkv"
    chunk: int = 8
    reuse: int = 1

    def __post_init__(self):
        self._shared: dict[int, torch.Tensor] = {}

    def select(self, c: Candidates) -> torch.Tensor:
        chunk_id = c.positions // self.chunk
        span = int(chunk_id.max()) + 1 if chunk_id.numel() else 1
        group = c.layer_idx // self.reuse
        leader = c.layer_idx % self.reuse == 0 or group not in self._shared
        if leader:
            # Sum scores per (batch, head, chunk) via scatter over chunk ids, then keep the top chunks.
            sums = torch.zeros(*c.scores.shape[:2], span, device=c.scores.device)
            sums.scatter_add_(-1, chunk_id, c.scores.clamp_min(0).masked_fill(~c.valid, 0))
            kept_chunks = _topk_mask(sums, (c.budget + self.chunk - 1) // self.chunk)
            self._shared[group] = kept_chunks
        kept_chunks = self._shared[group]
        if kept_chunks.shape[-1] < span:  # tokens newer than the leader's choice: not kept
            kept_chunks = F.pad(kept_chunks, (0, span - kept_chunks.shape[-1]))
        return kept_chunks.gather(-1, chunk_id)


@dataclass
class ThresholdPolicy(Policy):
    """LeanKV's pruning rule: drop a token when its mean attention is below ``alpha / context``; the survivors
    are also capped at the budget (best first)."""

    name: str = "threshold"
    alpha: float = 0.02
    pooling: int = 7

    def select(self, c: Candidates) -> torch.Tensor:
        return (c.scores >= self.alpha / c.context.view(-1, 1, 1).float()) & _topk_mask(c.scores, c.budget)


@dataclass
class LeanKVPolicy(Policy):
    """LeanKV tiers: mean attention >= ``alpha_quant / context`` -> high tier (0); >= ``alpha_prune / context``
    -> low tier (1); else pruned. ``tighten`` (>= 1) scales both thresholds when a memory budget presses."""

    name: str = "leankv"
    alpha_prune: float = 0.02
    alpha_quant: float = 1.0
    tiers: int = 2
    tighten: float = 1.0
    pooling: int = 7

    def tier_of(self, c: Candidates) -> torch.Tensor:
        uniform = 1.0 / c.context.view(-1, 1, 1).float()
        high = c.scores >= self.alpha_quant * self.tighten * uniform
        low = c.scores >= self.alpha_prune * self.tighten * uniform
        tier = torch.full_like(c.positions, PRUNED, dtype=torch.int8)
        tier = torch.where(low, torch.ones_like(tier) if self.tiers > 1 else torch.zeros_like(tier), tier)
        return torch.where(high, torch.zeros_like(tier), tier)


SPARSE_POLICIES: dict[str, type[Policy]] = {
    "snapkv": TopKPolicy,
    "h2o": TopKPolicy,
    "adakv": AdaKVPolicy,
    "streaming": StreamingPolicy,
    "pyramid": PyramidPolicy,
    "chunkkv": ChunkKVPolicy,
    "threshold": ThresholdPolicy,
}


def sparse_policy(name: str, **options) -> Policy:
    """Build a sparsity policy by name; unknown names and options raise with the valid ones."""
    if name not in SPARSE_POLICIES:
        raise ValueError(f"Unknown policy {name!r}; choose one of {sorted(SPARSE_POLICIES)} (or 'quest')")
    cls = SPARSE_POLICIES[name]
    fields = set(cls.__dataclass_fields__) - {"name"}
    unknown = set(options) - fields
    if unknown:
        raise ValueError(f"policy {name!r} takes {sorted(fields) or 'no options'}, not {sorted(unknown)}")
    if name == "h2o":
        options.setdefault("pooling", 1)
    policy = cls(name=name, **options)
    for key, value in options.items():
        if isinstance(value, (int, float)) and (value < 0 or (isinstance(value, float) and math.isnan(value))):
            raise ValueError(f"policy option {key}={value!r} must be >= 0")
    return policy
