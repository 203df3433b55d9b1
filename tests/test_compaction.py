"""Where every row goes at a compaction (`compaction.plan`), and what it ranks (`compaction.candidate_table`): the
CPU kernel and the torch code against a plain reference, on random stores."""

import copy

import pytest
import torch

from leankv_hf import compaction, kernels
from leankv_hf.caches.layer import LayerSettings, LeanLayer
from leankv_hf.caches.unified import LowRankLayer
from leankv_hf.policy import Policy
from leankv_hf.store import Precision, RaggedStore


def reference_plan(counts: torch.Tensor, target: torch.Tensor, exiting: int) -> tuple[list, list, list]:
    """The plan, candidate by candidate: a stored row of tier u aimed below moves there, aimed at u or above stays,
    pruned leaves; a leaving token enters its tier. Per tier: new counts, new rows (stayers then entering rows per
    segment), entering codes ascending."""
    tiers, segments = counts.shape
    first = [0, *counts.sum(1).cumsum(0).tolist()]
    candidates = []  # (code, segment, source tier, goal)
    for s in range(segments):
        slot = 0
        for u in range(tiers):
            for j in range(int(counts[u, s])):
                candidates.append((first[u] + int(counts[u, :s].sum()) + j, s, u, int(target[s, slot])))
                slot += 1
        for i in range(exiting):
            candidates.append((first[tiers] + s * exiting + i, s, tiers, int(target[s, slot + i])))
    stay = [[[] for _ in range(segments)] for _ in range(tiers)]
    enter = [[[] for _ in range(segments)] for _ in range(tiers)]
    incoming = [[] for _ in range(tiers)]
    for code, s, u, goal in sorted(candidates):
        dest = goal if goal > u or goal < 0 or u == tiers else u
        if dest == u:
            stay[dest][s].append(code - first[dest])
        elif dest >= 0:
            enter[dest][s].append(code)
            incoming[dest].append(code)
    held = [first[t + 1] - first[t] for t in range(tiers)]
    orders = [
        [i for s in range(segments) for i in stay[t][s] + [held[t] + incoming[t].index(c) for c in enter[t][s]]]
        for t in range(tiers)
    ]
    new = [[len(stay[t][s]) + len(enter[t][s]) for s in range(segments)] for t in range(tiers)]
    return new, orders, incoming


def plans(counts, target, exiting) -> list[compaction.Plan]:
    found = [compaction._torch_plan(counts, target, exiting)]
    planned = kernels.compaction_plan(counts, target, exiting)
    return found + ([compaction.Plan(*planned)] if planned is not None else [])


def test_the_plan_moves_rows_down_only_keeps_each_segments_order_and_the_kernel_agrees():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        tiers, segments, exiting = (
            int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((1, 4), (1, 6), (0, 5))
        )
        counts = torch.randint(0, 6, (tiers, segments), generator=gen)
        counts[:, 0] = 0 if segments > 1 else counts[:, 0]  # a head holding nothing
        width = max(int(counts.sum(0).max()) + exiting, 1)
        target = torch.randint(-1, tiers, (segments, width), generator=gen).to(torch.int8)
        new, orders, incoming = reference_plan(counts, target, exiting)
        found = plans(counts, target, exiting)
        assert len(found) == (2 if kernels.enabled("cpu") else 1)
        first = [0, *counts.sum(1).cumsum(0).tolist()]
        for plan in found:
            for t in range(tiers):
                assert plan.counts[t].tolist() == new[t]
                assert len(plan.incoming[t]) == tiers + 1  # from each tier, then from the window
                codes = [int(i) + first[u] for u, rows in enumerate(plan.incoming[t]) for i in rows]
                assert codes == incoming[t]
                order = plan.orders[t]
                if order is None:  # the kernel's word for "as they are"
                    assert orders[t] == list(range(int(counts[t].sum()))) and not incoming[t]
                else:
                    assert order.tolist() == orders[t]


def test_a_plan_where_nothing_moves_leaves_every_store_as_it_is():
    counts = torch.tensor([[2, 1], [1, 0]])
    target = torch.tensor([[0, 0, 1, -1], [0, -1, -1, -1]], dtype=torch.int8)  # one token leaving, pruned
    for plan in plans(counts, target, 1):
        assert [c.tolist() for c in plan.counts] == [[2, 1], [1, 0]]
        assert all(rows.numel() == 0 for entering in plan.incoming for rows in entering)
        assert all(
            order is None or order.tolist() == list(range(n)) for order, n in zip(plan.orders, (3, 1), strict=True)
        )


def stores_with_rows(gen: torch.Generator, tiers: int, batch: int, heads: int) -> list[RaggedStore]:
    stores = []
    for _ in range(tiers):
        store = RaggedStore(Precision(16), Precision(16))
        store.init(batch, heads, torch.device("cpu"))
        n = int(torch.randint(0, 12, (1,), generator=gen))
        segments = torch.randint(0, batch * heads, (n,), generator=gen)
        scores = torch.rand(n, generator=gen)
        scores[: n // 4] = float("nan")  # a poisoned score stays one
        store.add(torch.randn(n, 8), torch.randn(n, 8), segments, torch.randperm(100)[:n], scores, torch.zeros(n))
        stores.append(store)
    return stores


@pytest.mark.parametrize("tiers", [1, 2, 3])
def test_the_candidate_table_holds_each_heads_rows_tier_by_tier_then_the_leaving_tokens(tiers):
    gen = torch.Generator().manual_seed(tiers)
    batch, heads, window, exiting = 2, 3, 6, 4
    for _ in range(20):
        stores = stores_with_rows(gen, tiers, batch, heads)
        recent = torch.rand(batch, heads, window, generator=gen)
        recent_valid = torch.rand(batch, window, generator=gen) > 0.3
        table = compaction.candidate_table(stores, recent, recent_valid, exiting, 100)
        scores, positions, valid = table
        width = int(sum(s.counts for s in stores).max()) + exiting
        assert scores.shape == positions.shape == valid.shape == (batch * heads, width)
        for s in range(batch * heads):
            rows = [
                (float(st.scores[i]), int(st.positions[i]))
                for st in stores
                for i in range(st.rows)
                if st.segments()[i] == s
            ]
            held = len(rows)
            rows += [(float(recent.flatten(0, 1)[s, i]), 100 + i) for i in range(exiting)]
            torch.testing.assert_close(scores[s, : len(rows)], torch.tensor([r[0] for r in rows]), equal_nan=True)
            assert positions[s, : len(rows)].tolist() == [r[1] for r in rows]
            assert valid[s, :held].all() and not valid[s, len(rows) :].any()
            assert valid[s, held : len(rows)].tolist() == recent_valid[s // heads, :exiting].tolist()
        if kernels.enabled("cpu"):  # the torch code gives the same table
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(kernels, "candidate_table", lambda *args: None)
                again = compaction.candidate_table(stores, recent, recent_valid, exiting, 100)
            for a, b in zip(table, again, strict=True):
                assert torch.equal(
                    a.nan_to_num(-1.0) if a.is_floating_point() else a,
                    b.nan_to_num(-1.0) if b.is_floating_point() else b,
                )


class RandomTiers(Policy):
    """Each candidate to a tier or pruned at random (the same draw for the same candidates): every kind of move at
    once."""

    def __init__(self, tiers: int):
        self.tiers = tiers

    def tier_of(self, c):
        gen = torch.Generator().manual_seed(int(c.positions.sum()))
        return torch.randint(-1, self.tiers, c.scores.shape, generator=gen).to(torch.int8)


def layer_with_rows(tiers, dtype: torch.dtype, seed: int) -> LeanLayer:
    """A layer mid-decoding: random rows in every tier (some empty), a window of 12 tokens of which 8 leave, padding
    in one batch row, NaN in a score and in a value group, infinities in the window, rows from tiny to huge; low-rank
    keys on a random basis."""
    gen = torch.Generator().manual_seed(seed)
    batch, heads, dim, window = 2, 3, 32, 12
    settings = LayerSettings(tiers=tiers, policy=RandomTiers(len(tiers)), recent=4, sink=2, storage_dtype=dtype)
    rank = tiers[0][0].rank
    layer = (LowRankLayer if rank else LeanLayer)(0, 1, settings)

    def rows(*shape):
        return torch.randn(*shape, dim, generator=gen) * torch.exp2(torch.randint(-12, 8, (*shape, 1), generator=gen))

    layer.lazy_initialization(rows(batch, heads, 1), rows(batch, heads, 1))
    basis = torch.linalg.qr(torch.randn(batch * heads, dim, rank or 1, generator=gen)).Q.to(dtype)
    for tier in layer.tiers:
        tier.basis = basis if rank else None
        n = int(torch.randint(0, 40, (1,), generator=gen)) * (seed % 3 != 0 or tier is layer.tiers[0])
        values = rows(n)
        values[: n // 8, :4] = float("nan")
        segments = torch.randint(0, batch * heads, (n,), generator=gen)
        scores, ages = torch.rand(n, generator=gen), torch.randint(0, 256, (n,), generator=gen)
        tier.add(rows(n).to(dtype), values.to(dtype), segments, torch.randperm(90, generator=gen)[:n], scores, ages)
    layer.keys, layer.values = rows(batch, heads, window).to(dtype), rows(batch, heads, window).to(dtype)
    layer.keys[0, 2, 1, 5], layer.values[1, 0, 0, 7] = float("inf"), -float("inf")  # a key past float16's range
    layer.recent_scores = torch.rand(batch, heads, window, generator=gen)
    layer.recent_scores[0, 1, 2] = float("nan")
    layer.recent_ages = torch.randint(0, 256, (batch, heads, window), generator=gen, dtype=torch.uint8)
    layer.recent_valid = torch.ones(batch, window, dtype=torch.bool)
    layer.recent_valid[1, :3] = False
    layer.padding[1] = 3
    layer.seen = 100
    return layer


def bits(x) -> list[torch.Tensor]:
    fields = [x] if isinstance(x, torch.Tensor) else [x.payload, x.scale, x.zero]
    return [f.view(torch.int16) if f.dtype in (torch.float16, torch.bfloat16) else f for f in fields]


TIER_MIXES = {
    "leankv": ((8, 4), (4, 2)),
    "one 16-bit tier": ((16, 16),),
    "16-bit above codes": ((16, 16), (2, 2)),
    "codes above 16-bit": ((8, 8), (16, 16)),
    "three tiers": ((8, 8), (4, 4), (2, 2)),
    "low-rank keys": ((8, 4), (4, 2)),
}


@pytest.mark.skipif(not kernels.enabled("cpu"), reason="the CPU kernels need numba")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mix", TIER_MIXES, ids=list(TIER_MIXES))
def test_a_compaction_in_kernel_calls_leaves_every_tier_as_the_torch_code_does(monkeypatch, mix, dtype):
    """`kernels.compaction_moves` (the plan and every tier's new rows in one call per tier) against `compaction.plan`,
    `LeanLayer._incoming` and `RaggedStore.rebuild`: the same rows, bit for bit, after rows stayed, moved down a tier
    (decoded and encoded again), entered from the window (projected on the basis where keys are low rank) or were
    pruned. Groups of 16 channels: two per row."""
    rank = 16 if mix == "low-rank keys" else None
    tiers = tuple((Precision(k, 16, rank=rank), Precision(v, 16)) for k, v in TIER_MIXES[mix])
    calls = []
    moves = kernels.compaction_moves
    monkeypatch.setattr(kernels, "compaction_moves", lambda *args: calls.append(moves(*args)) or calls[-1])
    for seed in range(6):
        layer = layer_with_rows(tiers, dtype, seed)
        fused, reference = copy.deepcopy(layer), copy.deepcopy(layer)
        fused.compact()
        assert calls[-1] is not None and any(moved is not None for moved in calls[-1])
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "compaction_moves", lambda *args: None)
            reference.compact()
        for a, b in zip(fused.tiers, reference.tiers, strict=True):
            assert torch.equal(a.counts, b.counts)
            for name in ("keys", "values", "positions", "scores", "ages"):
                for x, y in zip(bits(getattr(a, name)), bits(getattr(b, name)), strict=True):
                    assert x.dtype == y.dtype and torch.equal(x, y), (seed, name)
        assert torch.equal(fused.keys.view(torch.int16), reference.keys.view(torch.int16))
