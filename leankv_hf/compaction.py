"""Where every row goes at a compaction: the policy's tiers turned into each store's new rows (`plan`).

A compaction ranks, per (batch, head) segment, the rows of every tier in turn and then the tokens leaving the exact
window (`caches.layer.LeanLayer._candidates`); the policy gives each a tier or `PRUNED` (``target[S, W]``). A stored
row of tier ``u`` aimed at a lower tier ``g > u`` moves there (re-encoded); aimed at ``u`` or above, it stays where it
is (lost precision does not come back); pruned, it leaves memory. A leaving token enters its tier. Each store keeps
its rows sorted by segment and, inside one, its staying rows first (in their order), then the rows entering it.

The table a compaction ranks (`candidate_table`) and the plan are index arithmetic: on CPU one kernel call each
(`kernels.candidate_table`, `kernels.compaction_plan`), elsewhere a few dozen small torch operations (tested to give
the same). The caller moves the rows (`store.RaggedStore.rebuild`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels


@dataclass
class Plan:
    """Per tier ``t``: ``counts[t]`` ``[S]`` its rows per segment after the compaction; ``orders[t]`` its new rows, as
    indices into its stored rows followed by the rows entering it (None: its rows do not change); ``incoming[t]``
    the rows entering it, in that order: per tier ``u`` above it, the indices of the rows of ``u`` moving down to it,
    then those of the leaving tokens entering it (token ``i`` of segment ``s`` is ``s * exiting + i``), each
    ascending."""

    counts: list[torch.Tensor]
    orders: list[torch.Tensor | None]
    incoming: list[list[torch.Tensor]]


def plan(counts: torch.Tensor, target: torch.Tensor, exiting: int) -> Plan:
    """The plan for stores holding ``counts[T, S]`` rows per segment, given each candidate's tier ``target[S, W]``
    (int8; the slots as `LeanLayer._candidates` lays them out) and the ``exiting`` tokens leaving each segment's
    window."""
    planned = kernels.compaction_plan(counts, target, exiting)
    return Plan(*planned) if planned is not None else _torch_plan(counts, target, exiting)


def candidate_table(
    stores: list, recent: torch.Tensor, recent_valid: torch.Tensor, exiting: int, start: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a compaction ranks, per segment: the rows of every store (`store.RaggedStore`) in turn, then the
    ``exiting`` oldest tokens of the window (``recent[B, H, R]`` their scores, ``recent_valid[B, R]``, positions from
    ``start``); as ``[S, W]`` scores (float32), positions (int64) and which slots hold one, ``W`` the most any
    segment has."""
    counts = torch.stack([store.counts.flatten() for store in stores])
    scores = torch.cat([store.scores for store in stores]).float()
    positions = torch.cat([store.positions for store in stores])
    recent = recent[..., :exiting].flatten(0, 1)
    table = kernels.candidate_table(counts, scores, positions, recent, recent_valid, exiting, start)
    if table is not None:
        return table
    segments, device = counts.shape[1], counts.device
    width = int(counts.sum(0).max()) + exiting
    table, at = (
        torch.zeros(segments, width, device=device),
        torch.zeros(segments, width, dtype=torch.long, device=device),
    )
    valid = torch.zeros(segments, width, dtype=torch.bool, device=device)
    ids = torch.arange(segments, device=device)
    segment = torch.cat([ids.repeat_interleave(c) for c in counts])
    ahead = torch.cat([torch.zeros_like(counts[:1]), counts.cumsum(0)])  # slots before each tier's rows, per segment
    first = torch.cat([torch.zeros_like(counts[:1, 0]), counts.sum(1).cumsum(0)[:-1]])  # each tier's first row
    tier = torch.repeat_interleave(torch.arange(len(stores), device=device), counts.sum(1))
    rank = torch.arange(segment.shape[0], device=device) - first[tier] - (counts.cumsum(1) - counts)[tier, segment]
    slot = ahead[tier, segment] + rank
    table[segment, slot], at[segment, slot], valid[segment, slot] = scores, positions.long(), True
    tail = ahead[-1][:, None] + torch.arange(exiting, device=device)  # [S, exiting]
    table.scatter_(1, tail, recent)
    at.scatter_(1, tail, torch.arange(start, start + exiting, device=device).expand(segments, -1))
    heads = segments // recent_valid.shape[0]
    valid.scatter_(1, tail, recent_valid[:, :exiting].repeat_interleave(heads, 0))
    return table, at, valid


def _torch_plan(counts: torch.Tensor, target: torch.Tensor, exiting: int) -> Plan:
    tiers, segments = counts.shape
    device = counts.device
    rows = counts.sum(1)
    first = [0, *rows.cumsum(0).tolist()]
    ids = torch.arange(segments, device=device)
    # Every candidate by code (the tiers' rows in turn, then the leaving tokens): its segment, tier and slot.
    segment = torch.cat([*(ids.repeat_interleave(c) for c in counts), ids.repeat_interleave(exiting)])
    source = torch.repeat_interleave(
        torch.arange(tiers + 1, device=device), torch.cat([rows, rows.new_tensor([segments * exiting])])
    )
    # Its slot among its segment's candidates: the slots of the tiers before its own, then its rank in its tier.
    ahead = torch.cat([torch.zeros_like(counts[:1]), counts.cumsum(0)])
    starts = torch.cat([counts.cumsum(1) - counts, ids[None] * exiting])  # each segment's first row in each tier
    rank = torch.arange(segment.shape[0], device=device) - torch.tensor(first, device=device)[source]
    slot = ahead[source, segment] + rank - starts[source, segment]
    goal = target[segment, slot].long()
    dest = torch.where((goal > source) | (goal < 0) | (source == tiers), goal, source)
    plan = Plan([], [], [])
    for t in range(tiers):
        codes = (dest == t).nonzero().squeeze(1)
        entering = source[codes] != t
        plan.counts.append(torch.bincount(segment[codes], minlength=segments))
        sizes = torch.bincount(source[codes[entering]], minlength=tiers + 1).tolist()
        parts = codes[entering].split(sizes)
        plan.incoming.append([part - start for part, start in zip(parts, first, strict=True)])
        index = torch.where(entering, rows[t] + entering.cumsum(0) - 1, codes - first[t])
        plan.orders.append(index[torch.sort(segment[codes] * 2 + entering, stable=True).indices])
    return plan
