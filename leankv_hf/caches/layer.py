"""`LeanLayer`: the compressing layer behind `SparseHeadCache` and `UnifiedLeanCache`.

A dense, exact recent window (``self.keys/values``) receives new tokens. The ``leankv`` attention function
reports the attention every token received (`observe`); after the prefill, and every ``interval`` decode
steps, tokens leaving the window and the tokens already stored are re-ranked by the policy, which puts each
into a tier (a `RaggedStore` at some precision) or prunes it. Pruned rows leave memory.

A query-aware policy (Quest, ``policy.page_size > 0``) evicts nothing: the layer keeps each stored page's
elementwise key minimum and maximum (``page_low``/``page_high``, updated as tokens enter the store), and at
each decode step `body_view` gathers only the pages the policy picks for the query.

Flow: attention -> scores (`observe`) -> policy (`compact`) -> store. Nothing reaches back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import compaction, kernels
from ..budget import BudgetReport, fit_to_budget, row_nbytes
from ..policy import Candidates, Policy
from ..scoring import ObservationWindow, Scorer
from ..store import Body, PaddedLayout, PaddedRows, Precision, RaggedStore, decode, fold_scores, select
from .base import UNATTENDED, CompressedLayer, sixteen_bit


@dataclass(frozen=True)
class LayerSettings:
    """How a `LeanLayer` compresses (validated by the cache configs that build it)."""

    tiers: tuple[tuple[Precision, Precision], ...]
    policy: Policy
    budget: float | int | None = None  # fraction of tokens or tokens per head; None: the policy decides (thresholds)
    scorer: Scorer = ObservationWindow()  # what a token's score measures, and when it is taken (`scoring`)
    recent: int = 32  # newest tokens kept exact, never evicted
    sink: int = 4  # first tokens always kept
    interval: int = 16  # decode steps between compactions
    gqa: str = "max"  # how the query heads of one KV head combine their attention
    storage_dtype: torch.dtype | None = None  # of the exact window and 16-bit tiers; None: `sixteen_bit`
    budget_bytes: float | None = None  # hard cap on the whole cache's bytes (budget_mb); None: no cap
    budget_layers: int = 1  # compressed layers sharing the cap
    budget_pooled: bool = True  # the heads of a layer share its bytes (adaptive); else each head an equal share
    reserve_tokens: int = 0  # tokens per batch row and KV head that uncompressed (sliding) layers hold
    budget_scope: str = "layer"  # "global": the layers share the model's budget by a probe's scores (`share_budget`)


class LeanLayer(CompressedLayer):
    """``layer_idx`` is the layer's rank among the cache's compressed layers, ``num_layers`` their count (the
    sliding layers of hybrid models are not compressed, so layer-dependent budgets must not count them)."""

    is_croppable = False  # evicted tokens cannot come back
    # What `persist` saves; the rest (dtypes, budget shares, the padded layout) follows from them and the settings.
    saved_state = (
        "keys",
        "values",
        "recent_scores",
        "recent_ages",
        "recent_valid",
        "padding",
        "seen",
        "prefilled",
        "tiers",
        "page_low",
        "page_high",
        "budget_report",
        "share",
    )

    def __init__(self, layer_idx: int, num_layers: int, settings: LayerSettings):
        super().__init__()
        self.layer_idx, self.num_layers, self.settings = layer_idx, num_layers, settings
        self.gqa = settings.gqa
        self.tiers = [RaggedStore(k, v) for k, v in settings.tiers]
        self.seen = 0
        self.attended = True
        self.prefilled = False
        self._layout = None  # where stored rows sit in the padded body (`PaddedLayout`), remade at each compaction
        self._viewed = False  # whether attention saw the whole body this step (its scores route back to the rows)
        self.share = None  # [B]: this layer's part of the model's budget (`share_budget`); None: an equal part

    # -- transformers' layer interface -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.storage_dtype = self.settings.storage_dtype or sixteen_bit(self.dtype)
        batch, heads = key_states.shape[:2]
        self.keys = key_states[:, :, :0].to(self.storage_dtype)
        self.values = value_states[:, :, :0].to(self.storage_dtype)
        self.recent_scores = torch.zeros(batch, heads, 0, device=self.device)
        self.recent_ages = torch.zeros(batch, heads, 0, dtype=torch.uint8, device=self.device)
        self.recent_valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        self.padding = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.padded = False  # whether any row is left-padded (host side: a decode step never asks the GPU)
        if self.settings.policy.page_size:
            empty = self.keys.new_empty(batch, heads, 0, key_states.shape[-1])
            self.page_low, self.page_high = empty, empty.clone()
        for tier in self.tiers:
            tier.init(batch, heads, self.device)
        self.budget_report = BudgetReport()
        if self.settings.budget_bytes is not None:
            dim = key_states.shape[-1]
            self.row_bytes = [row_nbytes(k, v, dim, self.storage_dtype) for k, v in self.settings.tiers]
            self.head_bytes = self._head_share(batch, heads, dim)
        self.is_initialized = True

    def _head_share(self, batch: int, heads: int, dim: int) -> torch.Tensor:
        """``[B, H]`` bytes of stored rows each head may hold: the cache's cap split over the compressed layers,
        less what a layer holds besides its rows at most (the exact window just before a compaction, counts and the
        layout's table per tier, the low-rank basis) and a share of the uncompressed layers' windows."""
        s = self.settings
        item = self.keys.element_size()
        window = s.recent + s.interval
        per_row = window * heads * (2 * dim * item + 4 + 1) + window + 8 + 8 * heads * (4 * len(self.tiers) + 1)
        rank = s.tiers[0][0].rank
        per_row += heads * dim * rank * item if rank else 0
        per_row += s.reserve_tokens * heads * 2 * dim * item / s.budget_layers  # at most 16-bit (sliding layers)
        share = int((s.budget_bytes / s.budget_layers / batch - per_row) // heads)
        least = s.sink * min(self.row_bytes)
        if share < least:
            need = (per_row + heads * least) * batch * s.budget_layers / 2**20
            raise ValueError(
                f"budget_mb={s.budget_bytes / 2**20:g} is too small for a batch of {batch}: the exact window of "
                f"{window} tokens and the sinks need {need:.3f} MiB; raise budget_mb or lower buffer/interval"
            )
        return torch.full((batch, heads), share, device=self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.probe is not None:  # a probe re-reads pending tokens: it sees part of the window; nothing is stored
            return self._probe_view(key_states, value_states)
        if not self.attended or self.pending:
            raise RuntimeError(UNATTENDED)
        self.attended = False
        new = key_states.shape[2]
        self._append(key_states, value_states)
        # One operation each (a padded copy), not a fill and a concatenation: a decode step runs them in every layer.
        self.recent_scores = F.pad(self.recent_scores, (0, new))
        self.recent_ages = F.pad(self.recent_ages, (0, new))
        self.recent_valid = F.pad(self.recent_valid, (0, new), value=True)
        self.seen += new
        return self._tagged_window(key_states, value_states, "leankv_layer")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # transformers builds the mask of the dense recent part only; the body's mask is per head (`body_view`).
        recent = self.keys.shape[-2] if self.is_initialized else 0
        return recent + query_length, self.seen - recent

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.num_layers, self.settings)

    def restored(self) -> None:
        """After `persist` filled the saved state in: rebuild what follows from it."""
        self._layout = PaddedLayout(self.tiers)
        self.padded = bool(self.padding.any())

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
        names = ["keys", "values", "recent_scores", "recent_ages", "recent_valid", "padding"]
        names += ["share"] if self.share is not None else []
        for name in names + (["page_low", "page_high"] if self.settings.policy.page_size else []):
            setattr(self, name, getattr(self, name).index_select(0, index))
        for tier in self.tiers:
            tier.select_batch(index)
        self._layout = PaddedLayout(self.tiers)
        if self.settings.budget_bytes is not None:  # a new batch size: a new share of the cap
            self.head_bytes = self._head_share(*self.dense_geometry())

    # -- what the attention function uses ----------------------------------------------------------------
    def score_window(self, query_length: int) -> int:
        """How many of the newest queries must report their attention (the scorer's choice); none for a query-aware
        policy, which evicts nothing."""
        return 0 if self.settings.policy.page_size else self.settings.scorer.queries(query_length)

    def body_view(self, dtype: torch.dtype, query: torch.Tensor | None = None, fused: bool = False) -> Body | None:
        """The stored tokens as a transient padded `Body` (low-rank keys as coefficients), or None when nothing
        is stored yet. Given the decode ``query`` ``[B, Hq, 1, D]``, a query-aware policy narrows the body to the
        pages it picks. ``fused``: the caller only takes the body's products, so it may read the stores in place
        (`PaddedLayout.view`). The attention the body receives goes back to its rows through `observe`."""
        self._viewed = False
        if not any(tier.rows for tier in self.tiers):
            return None
        if self.settings.policy.page_size and query is not None and query.shape[2] == 1:
            return self._page_view(query, dtype)  # a query-aware policy takes no scores
        self._viewed = True
        return self._layout.view(dtype, fused)

    def decode_step(self, dtype: torch.dtype) -> tuple | None:
        """The decode step over the stored rows in one call (a numba kernel, or three Triton launches), with the
        low-rank keys' basis (`PaddedLayout.decode_step`), or None: nothing stored, a query-aware policy, or no kernel
        reads the stores (attention takes `body_view`). The step folds the attention every row receives into its score
        itself."""
        if self.settings.policy.page_size or self._layout is None:  # no layout: nothing stored yet
            return None
        return self._layout.decode_step(dtype)

    def _page_view(self, query: torch.Tensor, dtype: torch.dtype) -> Body:
        """The pages the policy picks for ``query``, gathered from the store: a `Body` of width pages x page size.
        Decided on the device: how many pages a head may take is bounded on the host (from the token count alone),
        so no decode step waits for the GPU."""
        tier, size = self.tiers[0], self.settings.policy.page_size  # nothing is evicted: one tier holds all
        counts = tier.counts
        filled = (counts + size - 1) // size
        allowed = self._allowance(self.seen - self.padding) - self.recent_valid.sum(-1)
        forced = -(-self.settings.sink // size)  # the pages holding the sinks
        k = ((allowed.clamp_min(0) + size - 1) // size).clamp_min(forced)
        budget = self.settings.budget  # without padding the recent window is all valid: k is known exactly
        most = (budget if isinstance(budget, int) else math.ceil(self.seen * budget)) - (
            0 if self.padded else self.keys.shape[-2]
        )
        top = max(-(-max(most, 0) // size), forced)
        pages, chosen = self.settings.policy.pages(query, self.page_low, self.page_high, filled, k, forced, top)
        rank = (pages[..., None] * size + torch.arange(size, device=self.device)).flatten(2)  # [B, H, K * size]
        valid = chosen.repeat_interleave(size, -1) & (rank < counts[..., None])
        starts = (counts.flatten().cumsum(0) - counts.flatten()).view_as(counts)
        rows = (starts[..., None] + rank).masked_fill(~valid, 0).flatten()
        batch, heads, width = valid.shape
        keys = decode(select(tier.keys, 0, rows), dtype).view(batch, heads, width, -1)
        values = decode(select(tier.values, 0, rows), dtype).view(batch, heads, width, -1)
        return Body(PaddedRows(keys), PaddedRows(values), valid)

    def observe(
        self, scores: torch.Tensor | None, n_queries: int, visible: torch.Tensor | None, query_length: int
    ) -> None:
        """Take the attention ``scores[B, H, body + recent]`` of ``n_queries`` queries (their sum, or their maximum
        when the scorer reduces by max) out of a forward of ``query_length``; compact when due. A prompt that a
        probe scores is left pending: the cache compacts after the probe (`LeanCache.after_forward`)."""
        reduce = self.settings.scorer.reduce
        if scores is not None:
            recent = self.keys.shape[-2]
            self.recent_scores, self.recent_ages = fold_scores(
                self.recent_scores, self.recent_ages, scores[..., -recent:], n_queries, reduce
            )
            if self._viewed:
                self._layout.fold(scores[..., : self._layout.width], n_queries, reduce)
        self._viewed = False
        first = not self.prefilled
        if first:
            # Left padding: tokens the last prompt query cannot see are padding, never kept.
            self.recent_valid = self.recent_valid & visible
            self.padding = (~visible).sum(-1)
            self.padded = bool(self.padding.any())
            self.prefilled = True
        if self.settings.scorer.probes and query_length > 1 and not self.settings.policy.page_size:
            self.pending = query_length
        elif first or self.keys.shape[-2] >= self.settings.recent + self.settings.interval:
            self.compact()

    def _probe_view(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """What a probe reads besides the stored body, in the model's dtype: the window's sink columns, its columns
        from the probe's ``first_read`` to the end of the tokens it re-reads (later ones await their own probe), then
        its own tokens. ``probe_columns``: the window columns read, ascending; ``probe_sinks[B, S]``: which of the
        first ``S`` of them (those before the re-read ones that may hold sinks) are each row's sinks."""
        start, stop = self.probe.start, self.probe.stop
        first = self.seen - self.keys.shape[-2]  # position of the window's first token
        sinks = min(max(int((self.padding + self.settings.sink).max()) - first, 0), start)
        lo = max(self.probe.first_read, sinks)
        columns = torch.cat([torch.arange(sinks), torch.arange(lo, stop)]).to(self.device)
        position = first + columns[:sinks]
        sink = (position >= self.padding[:, None]) & (position < (self.padding + self.settings.sink)[:, None])
        self.probe_columns, self.probe_sinks = columns, sink
        window = slice(None, stop) if lo == sinks else columns
        keys = torch.cat([self.keys[:, :, window].to(self.dtype), key_states], -2)
        values = torch.cat([self.values[:, :, window].to(self.dtype), value_states], -2)
        keys.leankv_layer = self
        return keys, values

    def settle(self) -> None:
        """The pending tokens got their scores (from a probe): compact."""
        self.pending = 0
        self.probe_columns = self.probe_sinks = None  # the last probe's view: not part of what the cache holds
        self.compact()

    def fold_probe(self, scores: torch.Tensor) -> None:
        """The most attention each re-read token got from the probe, ``scores[B, H, stop - start]``. State is
        replaced, never updated in place: a cache filled under ``torch.inference_mode`` must go on under ``no_grad``
        (``generate``)."""
        span = slice(self.probe.start, self.probe.stop)
        scores = torch.maximum(self.recent_scores[..., span], scores)
        self.recent_scores = torch.cat(
            [self.recent_scores[..., : span.start], scores, self.recent_scores[..., span.stop :]], -1
        )

    # -- policy -> store ---------------------------------------------------------------------------------
    def compact(self) -> None:
        """Re-rank stored tokens and those leaving the recent window; move each to its tier or prune it."""
        s = self.settings
        batch, heads = self.keys.shape[:2]
        n_exit = self._exiting()
        if n_exit == 0 and not any(t.rows for t in self.tiers):
            return
        candidates = self._candidates()
        target = s.policy.assign(candidates)
        if s.budget_bytes is not None:
            target = self._fit_budget(target, candidates)
        counts, target = torch.stack([tier.counts.flatten() for tier in self.tiers]), target.view(batch * heads, -1)
        leaving = self._leaving_keys(n_exit)
        moved = None
        if not s.policy.page_size:  # pages take their keys' bounds from the rows entering (`_incoming`)
            window = leaving, self.values, self.recent_scores, self.recent_ages
            moved = kernels.compaction_moves(
                self.tiers, counts, target, n_exit, window, self.seen - self.keys.shape[-2]
            )
        if moved is None:
            plan = compaction.plan(counts, target, n_exit)
            incoming = [self._incoming(rows, n_exit, leaving) for rows in plan.incoming]
            for tier, count, order, rows in zip(self.tiers, plan.counts, plan.orders, incoming, strict=True):
                tier.rebuild(count, order, rows)  # after every tier's incoming rows were read
        else:
            for tier, rows in zip(self.tiers, moved, strict=True):
                if rows is not None:
                    tier.hold(*rows)
        self._layout = PaddedLayout(self.tiers)  # made once per compaction, used by every step until the next
        # Copies, not views: a view would pin the evicted tokens' storage until the next step.
        self.keys, self.values = self.keys[:, :, n_exit:].clone(), self.values[:, :, n_exit:].clone()
        self.recent_scores = self.recent_scores[..., n_exit:].clone()
        self.recent_ages = self.recent_ages[..., n_exit:].clone()
        self.recent_valid = self.recent_valid[:, n_exit:].clone()

    def _incoming(self, rows: list[torch.Tensor], n_exit: int, leaving: torch.Tensor) -> dict | None:
        """The rows entering a tier (`compaction.Plan`'s ``incoming``): rows moving down from a higher tier (decoded;
        low-rank keys stay coefficients on the basis the tiers share), then tokens leaving the window (their keys
        ``leaving`` as the tiers hold them, `_leaving_keys`)."""
        *moved, window = rows
        parts = [
            source.rows_at(index, self.storage_dtype)
            for source, index in zip(self.tiers, moved, strict=True)
            if index.numel()
        ]
        if window.numel():
            segments, i = window // n_exit, window % n_exit
            positions = self.seen - self.keys.shape[-2] + i
            parts.append(
                {
                    "k": leaving.flatten(0, 1)[segments, i],
                    "v": self.values.flatten(0, 1)[segments, i],
                    "positions": positions,
                    "scores": self.recent_scores.flatten(0, 1)[segments, i],
                    "ages": self.recent_ages.flatten(0, 1)[segments, i],
                }
            )
            if self.settings.policy.page_size:
                keys = self.keys.flatten(0, 1)[segments, i]
                self._add_to_pages(keys, segments, positions - self.padding[segments // self.keys.shape[1]])
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]} if parts else None

    def _leaving_keys(self, n_exit: int) -> torch.Tensor:
        """The keys of the ``n_exit`` tokens leaving the window, ``[B, H, n_exit, D]``, as the tiers hold them."""
        return self.keys[:, :, :n_exit]

    def _candidates(self) -> Candidates:
        """What the next compaction ranks, per (batch, head): the stored rows of every tier in turn, then the tokens
        leaving the exact window."""
        s = self.settings
        batch, heads, window = self.keys.shape[:3]
        n_exit = self._exiting()
        scores, positions, valid = compaction.candidate_table(
            self.tiers, self.recent_scores, self.recent_valid, n_exit, self.seen - window
        )
        width = scores.shape[-1]
        shape = (batch, heads, width)
        context = self._context()
        staying = self.recent_valid[:, n_exit:].sum(-1)  # real tokens that stay in the exact window
        return Candidates(
            scores=scores.view(shape),
            positions=positions.view(shape),
            valid=valid.view(shape),
            sink=(positions.view(shape) < (self.padding + s.sink).view(-1, 1, 1)) & valid.view(shape),
            budget=context - staying if s.budget is None else (self._allowance(context) - staying).clamp_min(0),
            capacity=context - staying,
            context=context,
            layer_idx=self.layer_idx,
            num_layers=self.num_layers,
        )

    def _fit_budget(self, target: torch.Tensor, c: Candidates) -> torch.Tensor:
        """Cut the policy's choice to the byte cap: per head, or pooled over the layer's heads (adaptive)."""
        shape = (target.shape[0], 1, -1) if self.settings.budget_pooled else target.shape
        budget = self.head_bytes.sum(-1, keepdim=True) if self.settings.budget_pooled else self.head_bytes
        fitted = fit_to_budget(
            target.reshape(shape),
            c.scores.reshape(shape),
            c.sink.reshape(shape),
            self.row_bytes,
            budget,
            self.budget_report,
        )
        return fitted.view_as(target)

    def _allowance(self, context: torch.Tensor, shared: bool = True) -> torch.Tensor:
        """``[B]`` tokens each head may hold (or attend, for a query-aware policy), recent window and sinks included:
        the budget, times this layer's share of the model's (`share_budget`) where it has one and ``shared``."""
        budget = self.settings.budget
        equal = (
            torch.full_like(context, budget) if isinstance(budget, int) else (context.float() * budget).ceil().long()
        )
        if self.share is None or not shared:
            return equal
        return torch.minimum((equal * self.share).ceil().long(), context)

    def competing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens the next compaction ranks (stored rows, and the tokens leaving the exact window; not sinks or
        padding), each one's batch row and its score as the policy ranks it (pooled over neighbours where the policy
        pools: a layer keeps a kept token's neighbours too): what `share_budget` compares across layers."""
        ranked = self.settings.policy.ranked(self._candidates())
        rows = torch.arange(ranked.valid.shape[0], device=self.device)[:, None, None].expand_as(ranked.valid)
        return rows[ranked.valid], ranked.scores[ranked.valid]

    def equal_keep(self) -> torch.Tensor:
        """``[B]`` how many of its competing tokens (`competing`, all heads) the layer keeps with an equal part of the
        budget: each head's allowance less the tokens it keeps anyway (the staying window, the sinks)."""
        return (self._allowance(self._context(), shared=False) - self._reserved()).clamp_min(0) * self.keys.shape[1]

    def take_share(self, count: torch.Tensor) -> None:
        """Keep ``count[B]`` competing tokens (all heads) at the next compaction, and the same share of the budget
        (as a multiple of an equal one) at every later one."""
        heads, equal = self.keys.shape[1], self._allowance(self._context(), shared=False)
        self.share = (count / heads + self._reserved()) / equal.clamp_min(1)

    def _context(self) -> torch.Tensor:
        """``[B]`` real tokens seen (at least 1: uniform attention is ``1 / context``)."""
        return (self.seen - self.padding).clamp_min(1)

    def _exiting(self) -> int:
        """Window tokens the next compaction moves out of the exact window."""
        return max(self.keys.shape[-2] - self.settings.recent, 0)

    def _reserved(self) -> torch.Tensor:
        """``[B]`` tokens each head keeps whatever the policy says: those staying in the window, and the sinks."""
        return self.recent_valid[:, self._exiting() :].sum(-1) + self.settings.sink

    def _add_to_pages(self, keys: torch.Tensor, segments: torch.Tensor, ranks: torch.Tensor) -> None:
        """Fold keys entering the store (``ranks`` within their head) into their pages' key minimum and maximum.
        Only the pages they land in change: the bounds are never recomputed from the stored keys."""
        if segments.numel() == 0:
            return
        size, dim = self.settings.policy.page_size, keys.shape[-1]
        grow = int(ranks.max()) // size + 1 - self.page_low.shape[2]
        if grow > 0:  # new pages start empty: +inf minimum, -inf maximum
            self.page_low = F.pad(self.page_low, (0, 0, 0, grow), value=torch.inf)
            self.page_high = F.pad(self.page_high, (0, 0, 0, grow), value=-torch.inf)
        batch, heads, pages = self.page_low.shape[:3]
        index = (segments * pages + ranks // size)[:, None].expand(-1, dim)
        keys = keys.to(self.page_low.dtype)
        self.page_low = self.page_low.view(-1, dim).scatter_reduce(0, index, keys, "amin").view_as(self.page_low)
        self.page_high = self.page_high.view(-1, dim).scatter_reduce(0, index, keys, "amax").view_as(self.page_high)

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
