"""`LeanLayer`: the compressing layer behind `SparseHeadCache` and `UnifiedLeanCache`.

A dense, exact recent window (``self.keys/values``) receives new tokens. The ``leankv`` attention function
reports the attention every token received (`observe`); after the prefill, and every ``interval`` decode
steps, tokens leaving the window and the tokens already stored are re-ranked by the policy, which puts each
into a tier (a `RaggedStore` at some precision) or prunes it. Pruned rows leave memory.

Flow: attention -> scores (`observe`) -> policy (`compact`) -> store. Nothing reaches back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from ..policy import PRUNED, Candidates, Policy
from ..store import Precision, RaggedStore
from .base import BatchSelectMixin

MAX_AGE = 255


@dataclass(frozen=True)
class LayerSettings:
    """How a `LeanLayer` compresses (validated by the cache configs that build it)."""

    tiers: tuple[tuple[Precision, Precision], ...]
    policy: Policy
    budget: float | int | None = None  # fraction of tokens or tokens per head; None: the policy decides (thresholds)
    window: int = 32  # prefill queries whose attention scores the prompt (SnapKV's observation window)
    recent: int = 32  # newest tokens kept exact, never evicted
    sink: int = 4  # first tokens always kept
    interval: int = 16  # decode steps between compactions
    gqa: str = "max"  # how the query heads of one KV head combine their attention


class LeanLayer(BatchSelectMixin, CacheLayerMixin):
    is_sliding = False
    is_croppable = False  # evicted tokens cannot come back

    def __init__(self, layer_idx: int, num_layers: int, settings: LayerSettings):
        super().__init__()
        self.layer_idx, self.num_layers, self.settings = layer_idx, num_layers, settings
        self.gqa = settings.gqa
        self.tiers = [RaggedStore(k, v) for k, v in settings.tiers]
        self.seen = 0
        self.attended = True
        self.prefilled = False
        self._rows = None  # (tier, segments, ranks, offset) of the last body view, to route scores back

    # -- transformers' layer interface -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads = key_states.shape[:2]
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self.recent_scores = torch.zeros(batch, heads, 0, device=self.device)
        self.recent_ages = torch.zeros(batch, heads, 0, dtype=torch.uint8, device=self.device)
        self.recent_valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        self.padding = torch.zeros(batch, dtype=torch.long, device=self.device)
        for tier in self.tiers:
            tier.init(batch, heads, self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.attended:
            raise RuntimeError(
                "This cache compresses inside the 'leankv' attention function, but the model ran another one. "
                "Call leankv_hf.use_leankv_attention(model) (the cache constructors do it when given the model)."
            )
        self.attended = False
        batch, heads, new = key_states.shape[:3]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.recent_scores = torch.cat([self.recent_scores, self.recent_scores.new_zeros(batch, heads, new)], -1)
        self.recent_ages = torch.cat([self.recent_ages, self.recent_ages.new_zeros(batch, heads, new)], -1)
        self.recent_valid = torch.cat([self.recent_valid, self.recent_valid.new_ones(batch, new)], -1)
        self.seen += new
        self.keys.leankv_layer = self
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # transformers builds the mask of the dense recent part only; the body's mask is per head (`body_view`).
        recent = self.keys.shape[-2] if self.is_initialized else 0
        return recent + query_length, self.seen - recent

    def get_max_length(self) -> int:
        return -1

    def dense_geometry(self) -> tuple[int, int, int]:
        batch, heads, _, dim = self.keys.shape
        return batch, heads, dim

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.num_layers, self.settings)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        recent = self.keys.shape[-2] if self.is_initialized else 0
        if tokens_to_remove > 0 or -tokens_to_remove > recent - self.settings.recent:
            raise ValueError(
                f"crop({tokens_to_remove}): a compressing cache can only drop tokens still in its exact recent "
                f"window ({max(recent - self.settings.recent, 0)} removable now); evicted tokens cannot be restored"
            )
        keep = recent + tokens_to_remove
        self.keys, self.values = self.keys[:, :, :keep], self.values[:, :, :keep]
        self.recent_scores, self.recent_ages = self.recent_scores[..., :keep], self.recent_ages[..., :keep]
        self.recent_valid = self.recent_valid[:, :keep]
        self.seen += tokens_to_remove

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.device)
        for name in ("keys", "values", "recent_scores", "recent_ages", "recent_valid", "padding"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        for tier in self.tiers:
            tier.select_batch(index)

    # -- what the attention function uses ----------------------------------------------------------------
    def score_window(self, query_length: int) -> int:
        """How many of the newest queries must report their attention: the observation window at prefill,
        every decode query (scores keep accumulating)."""
        return min(self.settings.window, query_length)

    def body_view(self, dtype: torch.dtype):
        """Transient padded ``(keys, values, valid)`` of all tiers, or None when nothing is stored yet."""
        if not any(tier.rows for tier in self.tiers):
            self._rows = None
            return None
        ks, vs, valids, routes, offset = [], [], [], [], 0
        for t, tier in enumerate(self.tiers):
            if not tier.rows:
                continue
            k, v, valid, segments, ranks = tier.padded(dtype)
            ks.append(k)
            vs.append(v)
            valids.append(valid)
            routes.append((t, segments, ranks, offset))
            offset += k.shape[2]
        self._rows = routes
        return torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(valids, 2)

    def observe(self, scores: torch.Tensor | None, n_queries: int, visible: torch.Tensor) -> None:
        """Take the attention ``scores[B, H, body + recent]`` summed over ``n_queries`` queries; compact when due."""
        if scores is not None:
            recent = self.keys.shape[-2]
            self.recent_scores, self.recent_ages = _running_mean(
                self.recent_scores, self.recent_ages, scores[..., -recent:], n_queries
            )
            if self._rows:
                batch, heads = scores.shape[:2]
                for t, segments, ranks, offset in self._rows:
                    tier = self.tiers[t]
                    flat = scores[..., offset : offset + int(tier.counts.max())].reshape(batch * heads, -1)
                    tier.scores, tier.ages = _running_mean(tier.scores.float(), tier.ages, flat[segments, ranks], n_queries)
                    tier.scores = tier.scores.half()
        self._rows = None  # routing indices are transient: they must not outlive this step
        if not self.prefilled:
            # Left padding: tokens the last prompt query cannot see are padding, never kept.
            self.recent_valid &= visible
            self.padding = (~visible).sum(-1)
            self.prefilled = True
            self.compact()
        elif self.keys.shape[-2] >= self.settings.recent + self.settings.interval:
            self.compact()

    # -- policy -> store ---------------------------------------------------------------------------------
    def compact(self) -> None:
        """Re-rank stored tokens and those leaving the recent window; move each to its tier or prune it."""
        s = self.settings
        batch, heads = self.keys.shape[:2]
        n_exit = max(self.keys.shape[-2] - s.recent, 0)
        if n_exit == 0 and not any(t.rows for t in self.tiers):
            return
        start = self.seen - self.keys.shape[-2]
        exit_pos = torch.arange(start, start + n_exit, device=self.device).expand(batch, heads, n_exit)
        sources = [(t.scores.float(), t.positions.long(), t.segments(), t.ranks(t.segments()), t) for t in self.tiers]
        counts = [t.counts for t in self.tiers]
        width = int(sum(counts).max()) + n_exit

        scores = torch.zeros(batch * heads, width, device=self.device)
        positions = torch.zeros(batch * heads, width, dtype=torch.long, device=self.device)
        valid = torch.zeros(batch * heads, width, dtype=torch.bool, device=self.device)
        slot_of = []
        base = torch.zeros(batch * heads, dtype=torch.long, device=self.device)
        for tier_scores, tier_pos, segments, ranks, tier in sources:
            slot = base[segments] + ranks
            scores[segments, slot], positions[segments, slot], valid[segments, slot] = tier_scores, tier_pos, True
            slot_of.append((segments, slot))
            base = base + tier.counts.flatten()
        exit_slot = base[:, None] + torch.arange(n_exit, device=self.device)
        rows = torch.arange(batch * heads, device=self.device)[:, None]
        scores[rows, exit_slot] = self.recent_scores[..., :n_exit].reshape(batch * heads, n_exit)
        positions[rows, exit_slot] = exit_pos.reshape(batch * heads, n_exit)
        valid[rows, exit_slot] = self.recent_valid[:, None, :n_exit].expand(-1, heads, -1).reshape(batch * heads, n_exit)

        shape = (batch, heads, width)
        context = (self.seen - self.padding).clamp_min(1)
        candidates = Candidates(
            scores=scores.view(shape),
            positions=positions.view(shape),
            valid=valid.view(shape),
            sink=(positions.view(shape) < (self.padding + s.sink).view(-1, 1, 1)) & valid.view(shape),
            budget=self._budget(context),
            context=context,
            layer_idx=self.layer_idx,
            num_layers=self.num_layers,
        )
        target = s.policy.assign(candidates).view(batch * heads, width)

        # Stored rows: stay, move down a tier (re-encoded), or leave memory. Rows never move up: lost precision
        # does not come back.
        moved = [[] for _ in self.tiers]
        for t, (segments, slot) in enumerate(slot_of):
            goal = target[segments, slot].long()
            down = goal > t
            if bool(down.any()):
                taken = self.tiers[t].take(down, self.dtype)
                for g in goal[down].unique().tolist():
                    pick = goal[down] == g
                    moved[g].append({key: value[pick] for key, value in taken.items()})
            self.tiers[t].keep(goal[~down] != PRUNED)
        exit_goal = target[rows, exit_slot].view(batch, heads, n_exit)
        for t, tier in enumerate(self.tiers):
            for part in moved[t]:
                tier.add(part["k"], part["v"], part["segments"], part["positions"], part["scores"], part["ages"])
            b, h, i = (exit_goal == t).nonzero(as_tuple=True)
            tier.add(
                self.keys[b, h, i],
                self.values[b, h, i],
                b * heads + h,
                exit_pos[b, h, i],
                self.recent_scores[b, h, i],
                self.recent_ages[b, h, i],
            )
        # Copies, not views: a view would pin the evicted tokens' storage until the next step.
        self.keys, self.values = self.keys[:, :, n_exit:].clone(), self.values[:, :, n_exit:].clone()
        self.recent_scores = self.recent_scores[..., n_exit:].clone()
        self.recent_ages = self.recent_ages[..., n_exit:].clone()
        self.recent_valid = self.recent_valid[:, n_exit:].clone()

    def _budget(self, context: torch.Tensor) -> torch.Tensor:
        """Tokens each head may keep among the candidates: the budget minus the exact recent window."""
        budget = self.settings.budget
        if budget is None:
            return context  # thresholds decide
        total = torch.full_like(context, budget) if isinstance(budget, int) else (context.float() * budget).ceil().long()
        return (total - self.keys.shape[-2] + max(self.keys.shape[-2] - self.settings.recent, 0)).clamp_min(0)

    # -- introspection -----------------------------------------------------------------------------------
    def kept_tokens(self) -> torch.Tensor:
        """Tokens each (batch, head) holds now: all tiers plus the valid part of the recent window."""
        recent = self.recent_valid.sum(-1)[:, None]
        return sum(t.counts for t in self.tiers) + recent

    def tier_counts(self) -> torch.Tensor:
        """``[B, H, tiers + 1]``: tokens per tier, the last column the pruned ones."""
        held = torch.stack([t.counts for t in self.tiers], -1)
        pruned = (self.seen - self.padding)[:, None] - held.sum(-1) - self.recent_valid.sum(-1)[:, None]
        held[..., 0] += self.recent_valid.sum(-1)[:, None]  # the exact window counts as high precision
        return torch.cat([held, pruned[..., None]], -1)


def _running_mean(mean: torch.Tensor, ages: torch.Tensor, total: torch.Tensor, n: int):
    """Fold ``n`` new observations summing to ``total`` into a running mean; ages saturate (then it decays)."""
    if n == 0:
        return mean, ages
    weight = ages.float()
    mean = (mean * weight + total) / (weight + n)
    return mean, (weight + n).clamp_max(MAX_AGE).to(torch.uint8)

