"""Where every row goes at a compaction: the policy's tiers turned into each store's new rows (`plan`).

A compaction ranks, per (batch, head) segment, the rows of every tier in turn and then the tokens leaving the exact
window (`caches.layer.LeanLayer._candidates`); the policy gives each a tier or `PRUNED` (``target[S, W]``). A stored
row of tier ``u`` aimed at a lower tier ``g > u`` moves there (re-encoded); aimed at ``u`` or above, it stays where it
is (lost precision does not come back); pruned, it leaves memory. A leaving token enters its tier. Each store keeps
its rows sorted by segment and, inside one, its staying rows first (in their order), then the rows entering it.

The table a compaction ranks (`candidate_table`) and the plan are index arithmetic: on CPU one kernel call each
(`kernels.candidate_table`, `kernels.compaction_plan`), elsewhere a few dozen small torch operations (tested to give
the same). The caller moves the rows (`store.RaggedStore.rebuild`); on CPU, `kernels.compaction_moves` makes the plan
in one kernel call and each changed store's rows in one more (the same bits, without the hundred small torch
operations a layer's rebuild takes).
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
    segment, _, slot = _candidate_slots(counts, exiting)
    heads = segments // recent_valid.shape[0]
    window = recent_valid[:, :exiting].repeat_interleave(heads, 0).flatten()
    width = int(counts.sum(0).max()) + exiting
    table = torch.zeros(segments, width, device=device)
    at = torch.zeros(segments, width, dtype=torch.long, device=device)
    valid = torch.zeros(segments, width, dtype=torch.bool, device=device)
    table[segment, slot] = torch.cat([scores, recent.flatten()])
    at[segment, slot] = torch.cat(
        [positions.long(), torch.arange(start, start + exiting, device=device).repeat(segments)]
    )
    valid[segment, slot] = torch.cat([torch.ones_like(positions, dtype=torch.bool), window])
    return table, at, valid


def _candidate_slots(counts: torch.Tensor, exiting: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every candidate by code (each tier's rows in turn, then the leaving tokens segment by segment): its segment, its
    tier (``T`` for a leaving token) and its slot among its segment's candidates (the slots of the tiers before its
    own, then its rank in its own)."""
    tiers, segments = counts.shape
    device = counts.device
    rows = torch.cat([counts.sum(1), counts.new_tensor([segments * exiting])])
    ids = torch.arange(segments, device=device)
    segment = torch.cat([*(ids.repeat_interleave(c) for c in counts), ids.repeat_interleave(exiting)])
    source = torch.repeat_interleave(torch.arange(tiers + 1, device=device), rows)
    ahead = torch.cat([torch.zeros_like(counts[:1]), counts.cumsum(0)])
    starts = torch.cat([counts.cumsum(1) - counts, ids[None] * exiting])  # each segment's first row in each tier
    rank = torch.arange(segment.shape[0], device=device) - (rows.cumsum(0) - rows)[source] - starts[source, segment]
    return segment, source, ahead[source, segment] + rank


def _torch_plan(counts: torch.Tensor, target: torch.Tensor, exiting: int) -> Plan:
    tiers, segments = counts.shape
    rows = counts.sum(1)
    first = [0, *rows.cumsum(0).tolist()]
    segment, source, slot = _candidate_slots(counts, exiting)
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
