"""Policies: given the tokens a layer may keep and their importance, choose each one's tier (or prune it).

Every policy sees `Candidates` (padded per batch row and KV head) and returns ``[B, H, L]`` int8: the tier
index (0 = highest precision) or -1 for pruned. Sink tokens are always kept at tier 0 and padding always
pruned, by `assign`, so a policy only ranks the rest. One small class per method, one shared instance per cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from . import kernels

PRUNED = -1


@dataclass
class Candidates:
    """Everything a policy decides from. Padded slots have ``valid=False``."""

    scores: torch.Tensor  # [B, H, L] float32: mean attention each token received per query
    positions: torch.Tensor  # [B, H, L] int64: absolute positions (for sinks, recency, chunks)
    valid: torch.Tensor  # [B, H, L] bool
    sink: torch.Tensor  # [B, H, L] bool: always kept
    budget: torch.Tensor  # [B] int64: tokens each head may keep among the candidates (sparsity policies)
    capacity: torch.Tensor  # [B] int64: candidates each head would have, had nothing been evicted
    context: torch.Tensor  # [B] int64: real tokens seen (uniform attention is 1 / context)
    layer_idx: int  # rank among the compressed layers (sliding layers of hybrid models do not count)
    num_layers: int  # compressed layers


def topk_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row of the last dim, True for the ``k`` highest scores; ``k`` holds the leading dims of ``scores``
    (``[B]``, broadcast over the middle dims, or ``[B, H]``). Ties go to the earlier slot, on every device
    (pooled scores tie often, and an unstable sort breaks ties differently on CPU and CUDA); a NaN ranks first.

    Ranked by one integer key per slot, unique, larger for a higher score and, among equal scores, for an earlier
    slot: its top ``max(k)`` are a stable descending sort's first slots, and a partial sort of integers takes a
    fraction of a full sort of floats (the ranking is most of a compaction's time on CPU). One host read; on CPU one
    kernel call (`kernels.topk_mask`)."""
    fused = kernels.topk_mask(scores, k)
    if fused is not None:
        return fused
    n = scores.shape[-1]
    k = k.view(*k.shape, *([1] * (scores.dim() - k.dim())))
    least, most = torch.stack(torch.aminmax(k)).tolist() if k.numel() else (n, n)
    if least >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0: -0.0 ties with 0.0
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).masked_fill_(scores.isnan(), 2**31 - 1)  # the floats' order
    key = (ordered.long() << 32) + torch.arange(n - 1, -1, -1, device=scores.device)
    top = key.topk(max(min(most, n), 0), dim=-1).indices
    kept = torch.arange(top.shape[-1], device=scores.device) < k
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, kept.expand_as(top))


BUDGET_SCOPES = ("layer", "global")  # each layer keeps its fraction; or the layers share the model's (`share_budget`)
LAYER_FLOOR = 0.2  # the part of an equal share every layer keeps whatever its scores (`layer_shares`)


def check_budget_scope(scope: str, scorer, budget: bool) -> None:
    """Refuse, at construction, a ``budget_scope`` that cannot apply: "global" splits a budget (``budget``: whether
    there is one) between layers from a probe's scores, taken for every layer before any compacts."""
    if scope not in BUDGET_SCOPES:
        raise ValueError(f"budget_scope={scope!r}: choose one of {BUDGET_SCOPES}")
    if scope == "global" and not scorer.probes:
        raise ValueError(
            f"budget_scope='global' splits the budget between layers by a probe's scores, and scorer={scorer.name!r} "
            "takes none (each layer compacts inside the forward): use scorer='reconstruct', or budget_scope='layer'"
        )
    if scope == "global" and not budget:
        raise ValueError("budget_scope='global' splits a budget between layers: set one (prune_ratio > 0)")


def layer_shares(competing: list[tuple[torch.Tensor, torch.Tensor]], keep: torch.Tensor) -> list[torch.Tensor]:
    """How many competing tokens each layer keeps when the layers share one budget, per batch row. ``competing``:
    per layer, the tokens it ranks, as ``(batch rows, scores)``; ``keep[B]``: how many of all of them the model
    keeps. The best ``keep`` of a row's tokens, over every layer, are counted per layer; a layer gets ``LAYER_FLOOR``
    of an equal part plus ``1 - LAYER_FLOOR`` of its count (AdaKV's floor one level up: no layer is emptied by scores
    that are low everywhere in it). A row's counts sum to ``keep``."""
    counts = torch.zeros(len(competing), keep.shape[0], device=keep.device)
    for b in range(keep.shape[0]):
        scores = [score[row == b].nan_to_num(float("-inf")) for row, score in competing]
        every = torch.cat(scores)
        k = min(int(keep[b]), every.numel())
        if k == 0:
            continue
        best = torch.zeros_like(every, dtype=torch.bool)
        best[every.topk(k).indices] = True  # exactly k, ties broken by topk
        counts[:, b] = torch.stack([part.sum() for part in best.split([len(s) for s in scores])]).float()
    return list(LAYER_FLOOR * counts.mean(0) + (1 - LAYER_FLOOR) * counts)


def share_budget(layers: list) -> None:
    """Split the model's budget between ``layers`` whose pending tokens a probe scored (``budget_scope="global"``;
    KVzip ranks across layers too): each layer keeps as many tokens as it holds of the whole model's best-scored
    ones, so a layer whose heads single out few tokens gives its bytes to one that singles out many. The tokens
    ranked are the ones each layer's compaction would rank (stored rows and those leaving the window), scored as it
    ranks them (pooled over neighbours: a layer keeping a token keeps its neighbours too, and that costs it budget),
    so at a later prompt the rows kept before compete again and the split moves only as far as the new tokens move
    it. Per batch row; decode-time compactions keep each layer's share (`LeanLayer.take_share`). ``layers``:
    `LeanLayer`s."""
    if not layers or layers[0].settings.budget_scope != "global":
        return
    equal = [layer.equal_keep() for layer in layers]
    counts = layer_shares([layer.competing() for layer in layers], torch.stack(equal).sum(0))
    for layer, count in zip(layers, counts, strict=True):
        layer.take_share(count)


class Policy:
    """Base: rank candidates; ``select`` returns True where a token is kept (single tier).

    ``pooling`` (odd kernel, 1 = off) max-pools scores over neighbouring positions first, as SnapKV does, so a
    multi-token fact (a number, a name) is kept or dropped whole. ``page_size`` > 0 marks a query-aware policy
    (Quest): it evicts nothing and, at each decode step, picks the pages of keys the query attends to.
    """

    name = "base"
    tiers = 1
    pooling = 1
    page_size = 0
    thresholds = False  # compares scores with uniform attention (1 / context): they must be means, not maxima

    def pooled(self, scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Scores max-pooled over neighbouring positions. Candidate slots are in position order only right after
        the prefill (later: stored rows per tier, then the tokens leaving the window), so sort, pool, scatter back (on CPU
        in one kernel call: `kernels.pooled`)."""
        if self.pooling <= 1:
            return scores
        fused = kernels.pooled(scores, positions, self.pooling)
        if fused is not None:
            return fused
        b, h, n = scores.shape
        order = torch.sort(positions, dim=-1, stable=True).indices  # ties (padding slots at 0) in slot order
        flat = scores.gather(-1, order).reshape(b * h, 1, n).clamp_min(0)  # -inf slots pool as 0, stay excluded
        pooled = F.max_pool1d(flat, self.pooling, stride=1, padding=self.pooling // 2).view(b, h, n)
        pooled = torch.empty_like(pooled).scatter_(-1, order, pooled)
        return pooled.masked_fill(scores == float("-inf"), float("-inf"))

    def select(self, c: Candidates) -> torch.Tensor:
        raise NotImplementedError

    def ranked(self, c: Candidates) -> Candidates:
        """What `tier_of` ranks: the tokens free to go (not sinks, not padding), scored as this policy ranks them
        (pooled), the others at -inf, the budget less the sinks. A token whose score is not a number (a NaN key or
        value in the model poisons the attention it receives) ranks below every real score: it is kept only where
        the budget exceeds the tokens with real scores."""
        free = c.valid & ~c.sink
        sinks = (c.sink & c.valid).sum(-1).amax(-1)
        scores = c.scores.masked_fill(~free | c.scores.isnan(), float("-inf"))
        return replace(
            c,
            scores=self.pooled(scores, c.positions),
            valid=free,
            budget=(c.budget - sinks).clamp_min(0),
            capacity=(c.capacity - sinks).clamp_min(0),
        )

    def assign(self, c: Candidates) -> torch.Tensor:
        """Tiers for ``c``: sinks at tier 0, padding pruned, the rest by `tier_of` (of what it `ranked`)."""
        ranked = self.ranked(c)
        tier = self.tier_of(ranked)
        tier = torch.where(ranked.valid, tier, torch.full_like(tier, PRUNED))
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
        return topk_mask(c.scores, c.budget)


@dataclass
class AdaKVPolicy(TopKPolicy):
    """AdaKV: the layer's budget (heads x per-head budget) goes to the best tokens across heads, each head
    guaranteed a ``floor`` share of the uniform budget."""

    name: str = "adakv"
    floor: float = 0.2

    def select(self, c: Candidates) -> torch.Tensor:
        scores = c.scores
        b, h, n = scores.shape
        guaranteed = topk_mask(scores, (c.budget.float() * self.floor).floor().long())
        rest = scores.masked_fill(guaranteed, float("-inf")).reshape(b, 1, h * n)
        extra = (c.budget * h - guaranteed.view(b, -1).sum(-1)).clamp_min(0)
        return guaranteed | topk_mask(rest, extra).view(b, h, n)


@dataclass
class StreamingPolicy(Policy):
    """StreamingLLM: sinks plus the most recent tokens; importance is ignored."""

    name: str = "streaming"

    def select(self, c: Candidates) -> torch.Tensor:
        recency = c.positions.float().masked_fill(~c.valid, float("-inf"))
        return topk_mask(recency, c.budget)


@dataclass
class PyramidPolicy(TopKPolicy):
    """PyramidKV: lower layers keep more, upper layers fewer (linear from ``(2 - beta)`` to ``beta`` times the
    mean budget), each layer ranking like SnapKV. A share above the candidates there are is capped, and what the
    capped (lower) layers cannot use goes to the others, so the mean over layers stays the budget."""

    name: str = "pyramid"
    beta: float = 0.4

    def __post_init__(self):
        if not 0 < self.beta <= 1:
            raise ValueError(f"beta={self.beta!r} must be in (0, 1] (1: every layer the same budget)")

    def layer_budget(self, c: Candidates) -> torch.Tensor:
        """``[B]`` tokens each head of this layer keeps: ``min(scale[l] * level, capacity)`` with the level that
        makes the mean over layers the budget (water-filling; the capped layers are the lowest ones)."""
        n, device = c.num_layers, c.budget.device
        scale = torch.linspace(2 - self.beta, self.beta, n, device=device)
        scale = scale / scale.mean()  # one layer: the budget itself
        budget, cap = c.budget.float()[:, None], c.capacity.float()[:, None]
        capped = torch.arange(n, device=device)  # if the lowest k layers are capped, the others share the rest...
        level = (n * budget - capped * cap) / scale.flip(0).cumsum(0).flip(0)
        fits = scale * level <= cap  # ...and the first k consistent with that (layer k below its cap) is the one
        first = fits.float().argmax(-1, keepdim=True)
        level = torch.where(fits.any(-1, keepdim=True), level.gather(-1, first), torch.inf)  # none: all capped
        return torch.minimum(scale[c.layer_idx] * level, cap).squeeze(-1).round().long()

    def select(self, c: Candidates) -> torch.Tensor:
        return topk_mask(c.scores, self.layer_budget(c))


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
            # Per (batch, head, chunk): summed importance and token count. The best chunks are kept while their
            # tokens fit the budget: candidates start and end mid-chunk (sinks and the window are not candidates)
            # and evictions leave holes, so chunks are counted by the tokens they hold, not as full.
            sums = torch.zeros(*c.scores.shape[:2], span, device=c.scores.device)
            sums.scatter_add_(-1, chunk_id, c.scores.clamp_min(0).masked_fill(~c.valid, 0))
            sizes = torch.zeros_like(sums).scatter_add_(-1, chunk_id, c.valid.float())
            best = sums.masked_fill(sizes == 0, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
            fits = sizes.gather(-1, best).cumsum(-1) <= c.budget.view(-1, 1, 1)
            self._shared[group] = torch.zeros_like(fits).scatter_(-1, best, fits)
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
    thresholds = True

    def select(self, c: Candidates) -> torch.Tensor:
        return (c.scores >= self.alpha / c.context.view(-1, 1, 1).float()) & topk_mask(c.scores, c.budget)


@dataclass
class LeanKVPolicy(Policy):
    """LeanKV tiers: mean attention >= ``alpha_quant / context`` -> high tier (0); >= ``alpha_prune / context``
    -> low tier (1); else pruned. A head keeps at most its budget's best tokens (all of them without one)."""

    name: str = "leankv"
    alpha_prune: float = 0.02
    alpha_quant: float = 1.0
    tiers: int = 2
    pooling: int = 7
    thresholds = True

    def tier_of(self, c: Candidates) -> torch.Tensor:
        uniform = 1.0 / c.context.view(-1, 1, 1).float()
        high = c.scores >= self.alpha_quant * uniform
        low = c.scores >= self.alpha_prune * uniform
        if bool((c.valid.sum(-1) > c.budget.view(-1, 1)).any()):  # else every head keeps all it may: nothing to rank
            low &= topk_mask(c.scores, c.budget)
        tier = torch.full_like(c.positions, PRUNED, dtype=torch.int8)
        tier = torch.where(low, torch.ones_like(tier) if self.tiers > 1 else torch.zeros_like(tier), tier)
        return torch.where(high & low, torch.zeros_like(tier), tier)


@dataclass
class TieredPolicy(Policy):
    """A ranking policy's choice split over two tiers: each head keeps what ``rank`` keeps within its budget, and the
    best ``high`` share of that budget (ranked the same way) stays in the high tier; the rest goes to the low tier.
    LeanKV's answer to uncertain importance: a token demoted to fewer bits is still there when a later question
    needs it."""

    rank: Policy
    high: float = 0.5
    name: str = "tiered"
    tiers: int = 2

    def __post_init__(self):
        if not 0 < self.high <= 1:
            raise ValueError(f"high={self.high!r} must be in (0, 1]: the share of the kept tokens stored high")
        self.pooling = self.rank.pooling

    def tier_of(self, c: Candidates) -> torch.Tensor:
        kept = self.rank.select(c) & c.valid
        high = self.rank.select(replace(c, budget=(c.budget.float() * self.high).ceil().long())) & kept
        tier = torch.where(kept, 1, PRUNED).to(torch.int8)
        return torch.where(high, 0, tier).to(torch.int8)


@dataclass
class QuestPolicy(Policy):
    """Quest (query-aware sparsity, arXiv 2406.10774): a SPEED policy. Nothing is evicted, so memory is not
    released: ``kept_tokens`` reports every token, and ``nbytes`` counts all of them plus the per-page key
    bounds. Keys are grouped in pages of ``page_size`` tokens per head; at each decode step the query attends
    only to the pages whose bound on its logit is highest, within the budget (the recent window and the pages
    holding the sinks always). The prefill attends fully."""

    name: str = "quest"
    page_size: int = 16

    def __post_init__(self):
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or self.page_size < 1:
            raise ValueError(f"page_size={self.page_size!r} must be an int >= 1")

    def select(self, c: Candidates) -> torch.Tensor:
        return c.valid

    def pages(
        self,
        query: torch.Tensor,
        low: torch.Tensor,
        high: torch.Tensor,
        filled: torch.Tensor,
        k: torch.Tensor,
        forced: int,
        top: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages to attend for one decode ``query[B, Hq, 1, D]``, given each page's elementwise key minimum ``low``
        and maximum ``high`` ``[B, H, P, D]``, the pages each head has filled ``[B, H]`` and may attend ``k[B]``
        (at most ``top``, a bound known on the host: the GPU is never waited for).

        The bound on ``q . key`` over a page is ``sum_d max(q_d low_d, q_d high_d) = relu(q) . high - relu(-q) . low``
        (two matmuls), the max over the query heads of a KV head. Returns ``[B, H, K]`` page indices, ascending
        (so the gathered keys stay in position order), and which of them are real.
        """
        batch, heads, n, dim = low.shape
        q = query.reshape(batch, heads, -1, dim).to(low.dtype)  # [B, H, G, D]: the query heads of each KV head
        bound = q.clamp_min(0) @ high.transpose(-1, -2) - (-q).clamp_min(0) @ low.transpose(-1, -2)
        index = torch.arange(n, device=low.device)
        bound = bound.amax(2).masked_fill(index < forced, torch.inf)  # the sinks' pages: always
        bound = bound.masked_fill(index >= filled[..., None], -torch.inf)  # empty pages (+-inf bounds): never
        best = bound.topk(min(top, n), dim=-1)
        chosen = (torch.arange(best.indices.shape[-1], device=low.device) < k.view(-1, 1, 1)) & (
            best.values > -torch.inf
        )
        pages = best.indices.masked_fill(~chosen, n).sort(-1).values  # the ones not chosen sort last
        return pages, pages < n


SPARSE_POLICIES: dict[str, type[Policy]] = {
    "snapkv": TopKPolicy,
    "h2o": TopKPolicy,
    "adakv": AdaKVPolicy,
    "streaming": StreamingPolicy,
    "pyramid": PyramidPolicy,
    "chunkkv": ChunkKVPolicy,
    "threshold": ThresholdPolicy,
    "quest": QuestPolicy,
}


def sparse_policy(name: str, **options) -> Policy:
    """Build a sparsity policy by name; unknown names and options raise with the valid ones."""
    if name not in SPARSE_POLICIES:
        raise ValueError(f"Unknown policy {name!r}; choose one of {sorted(SPARSE_POLICIES)}")
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
    if policy.pooling > 1 and policy.pooling % 2 == 0:
        raise ValueError(f"pooling={policy.pooling!r} must be odd (a window centred on each token), or 1 (off)")
    return policy
