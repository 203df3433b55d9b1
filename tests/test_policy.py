"""Policy unit tests on hand-built `Candidates`: layer budgets (pyramid), chunk selection (chunkkv), score pooling
over positions, and Quest's page bounds and page choice."""

from __future__ import annotations

import pytest
import torch

from leankv_hf.policy import (
    PRUNED,
    Candidates,
    ChunkKVPolicy,
    PyramidPolicy,
    QuestPolicy,
    TopKPolicy,
    sparse_policy,
    topk_mask,
)


def candidates(
    n: int,
    budget: int,
    sinks: int = 4,
    layer_idx: int = 0,
    num_layers: int = 1,
    positions: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> Candidates:
    """One batch row, one head: ``n`` candidates (positions 0..n-1 unless given), nothing evicted before."""
    positions = torch.arange(n) if positions is None else positions
    if scores is None:
        scores = torch.rand(n, generator=torch.Generator().manual_seed(layer_idx))
    return Candidates(
        scores=scores.view(1, 1, n),
        positions=positions.view(1, 1, n),
        valid=torch.ones(1, 1, n, dtype=torch.bool),
        sink=positions.view(1, 1, n) < sinks,
        budget=torch.tensor([budget]),
        capacity=torch.tensor([n]),
        context=torch.tensor([n]),
        layer_idx=layer_idx,
        num_layers=num_layers,
    )


def kept(policy, c: Candidates) -> int:
    return int((policy.assign(c) != PRUNED).sum())


# --------------------------------------------------------------------------- pyramid


@pytest.mark.parametrize("budget", [20, 60, 90, 100])
def test_pyramid_layer_budgets_are_capped_and_keep_the_mean(budget):
    """Lower layers keep more, no layer more than there is, and the mean over layers is the budget: the share
    the capped lower layers cannot use goes to the upper ones."""
    n, layers = 104, 8  # 4 sinks + 100 free candidates
    counts = [kept(PyramidPolicy(), candidates(n, budget + 4, layer_idx=i, num_layers=layers)) for i in range(layers)]
    assert counts == sorted(counts, reverse=True) and max(counts) <= n
    assert abs(sum(counts) / layers - (budget + 4)) <= 0.5  # rounding only
    if budget < 100:
        assert counts[0] > counts[-1]
    if budget == 90:  # 1.6x would be 144 > 100: the lowest layers are capped, the upper ones get more than 0.4x
        assert counts[0] == n and counts[-1] > 0.4 * 90 + 4
    if budget == 100:  # everything: nothing evicted in any layer
        assert counts == [n] * layers


def test_pyramid_single_compressed_layer_keeps_the_budget():
    """A hybrid model with one compressed layer (tiny Gemma 3): that layer gets the whole budget, not 1.6x or 0.4x."""
    assert kept(PyramidPolicy(), candidates(104, 44, layer_idx=0, num_layers=1)) == 44


def test_pyramid_beta_is_validated():
    with pytest.raises(ValueError, match=r"beta=1\.5"):
        sparse_policy("pyramid", beta=1.5)


# --------------------------------------------------------------------------- chunkkv


def test_chunkkv_full_budget_keeps_everything():
    """12 candidates, sinks 0..3, budget 12: the 8 free tokens straddle two chunks, both kept."""
    assert (sparse_policy("chunkkv").assign(candidates(12, 12)) == 0).all()


def test_chunkkv_keeps_whole_chunks_within_the_budget():
    policy = ChunkKVPolicy(chunk=8)
    c = candidates(64, 4 + 20)  # free tokens 4..63: a partial chunk (4..7), then 7 whole chunks
    keep = (policy.assign(c) != PRUNED).view(-1)
    free = keep[4:]
    assert int(free.sum()) <= 20
    chunk_id = torch.arange(4, 64) // 8
    for chunk in chunk_id.unique():  # each chunk kept or dropped whole
        assert free[chunk_id == chunk].all() or not free[chunk_id == chunk].any()
    assert int(free.sum()) >= 20 - 8  # and the budget is used up to less than one chunk


# --------------------------------------------------------------------------- pooling


def test_pooling_runs_over_neighbouring_positions_not_slots():
    """Slots in an arbitrary order (as after decode compactions): the token at position 6 pools into positions
    5 and 7, wherever their slots are."""
    positions = torch.tensor([9, 6, 2, 11, 0, 7, 4, 1, 10, 5, 3, 8])
    scores = torch.full((12,), 0.01).index_fill(0, torch.tensor([1]), 1.0)  # slot 1 holds position 6
    scores += torch.arange(12) * 1e-4  # distinct, so top-k has no ties
    c = candidates(12, 3, sinks=0, positions=positions, scores=scores)
    pooled = TopKPolicy(pooling=3).pooled(c.scores, c.positions).view(-1)
    by_position = pooled[positions.argsort()]
    assert by_position[5:8].tolist() == [scores[1].item()] * 3
    assert (by_position[:5] < 0.1).all() and (by_position[8:] < 0.1).all()
    keep = TopKPolicy(pooling=3).assign(c).view(-1) == 0
    assert sorted(positions[keep].tolist()) == [5, 6, 7]


@pytest.mark.parametrize("pooling", [3, 7])
def test_pooling_in_one_cpu_kernel_call_gives_the_torch_paths_scores(pooling, monkeypatch):
    """The CPU kernel (`kernels.pooled`) against the torch code, bit for bit: heads whose slots hold positions in runs
    (as after compactions), excluded slots (-inf), and padding slots all at position 0 (ties go in slot order)."""
    generator = torch.Generator().manual_seed(pooling)
    for width in (5, 40, 300):
        scores = torch.rand(2, 3, width, generator=generator)
        scores[torch.rand(2, 3, width, generator=generator) < 0.2] = float("-inf")
        runs = [  # four sorted runs per head
            torch.cat([run.sort().values for run in torch.randperm(width + 50, generator=generator)[:width].chunk(4)])
            for _ in range(6)
        ]
        positions = torch.stack(runs).view(2, 3, width)
        positions[0, 1, width // 2 :] = 0  # padding slots
        pooled = {}
        for fused in ("1", "0"):
            monkeypatch.setenv("LEANKV_FUSED", fused)
            pooled[fused] = TopKPolicy(pooling=pooling).pooled(scores, positions)
        assert torch.equal(pooled["1"], pooled["0"])


def test_an_even_pooling_window_is_refused():
    with pytest.raises(ValueError, match="pooling=4 must be odd"):
        sparse_policy("snapkv", pooling=4)


def test_ranked_is_what_the_policy_ranks_and_assign_follows_it():
    """`Policy.ranked` (what `share_budget` compares across layers, `LeanLayer.competing`): pooled scores of the
    tokens free to go; sinks, padding and NaN scores at -inf; the budget less the sinks. `assign` keeps its best."""
    scores = torch.tensor([9.0, 0.1, 0.2, 5.0, 0.3, 0.4, float("nan"), 0.5, 0.6, 0.7])
    c = candidates(10, 5, sinks=1, scores=scores)
    c.valid[..., 9] = False  # padding
    ranked = TopKPolicy(pooling=3).ranked(c)
    inf = float("-inf")
    assert ranked.scores.view(-1).tolist() == pytest.approx([inf, 0.2, 5.0, 5.0, 5.0, 0.4, inf, 0.6, 0.6, inf])
    assert ranked.valid.view(-1).tolist() == [False] + [True] * 8 + [False]
    assert ranked.budget.tolist() == [4]
    keep = TopKPolicy(pooling=3).assign(c).view(-1) != PRUNED
    assert keep.nonzero().view(-1).tolist() == [0, 2, 3, 4, 7]  # the sink, then the best 4 (ties: earlier slot)


# --------------------------------------------------------------------------- quest


def test_quest_page_bound_is_an_upper_bound_of_every_key_logit():
    torch.manual_seed(0)
    batch, kv_heads, groups, pages, size, dim = 2, 3, 2, 5, 4, 8
    keys = torch.randn(batch, kv_heads, pages, size, dim)
    query = torch.randn(batch, kv_heads * groups, 1, dim)
    low, high = keys.amin(3), keys.amax(3)
    q = query.view(batch, kv_heads, groups, dim)
    bound = torch.maximum(q[:, :, :, None] * low[:, :, None], q[:, :, :, None] * high[:, :, None]).sum(-1).amax(2)
    logits = torch.einsum("bhgd,bhpsd->bhgps", q, keys).amax(-1).amax(2)  # [B, H, pages]: best key per page
    assert (bound >= logits - 1e-5).all()
    filled = torch.full((batch, kv_heads), pages)
    pages_chosen, real = QuestPolicy(page_size=size).pages(
        query, low, high, filled, torch.tensor([2, 2]), forced=0, top=2
    )
    assert real.all()
    expected = bound.topk(2, dim=-1).indices.sort(-1).values
    assert torch.equal(pages_chosen, expected)


def test_quest_forces_sink_pages_and_skips_empty_ones():
    """The sinks' page is always chosen; pages a head has not filled never are (their bounds are +-inf)."""
    dim = 4
    low = torch.zeros(1, 1, 4, dim)
    high = torch.zeros(1, 1, 4, dim)
    high[0, 0, 2] = 5.0  # page 2 has the best bound for a positive query
    low[0, 0, 3], high[0, 0, 3] = torch.inf, -torch.inf  # page 3 is empty
    query = torch.ones(1, 1, 1, dim)
    pages, real = QuestPolicy(page_size=2).pages(
        query, low, high, torch.tensor([[3]]), torch.tensor([3]), forced=1, top=3
    )
    assert pages[real].tolist() == [0, 1, 2]
    pages, real = QuestPolicy(page_size=2).pages(
        query, low, high, torch.tensor([[3]]), torch.tensor([2]), forced=1, top=3
    )
    assert pages[real].tolist() == [0, 2]
    pages, real = QuestPolicy(page_size=2).pages(
        query, low, high, torch.tensor([[3]]), torch.tensor([9]), forced=1, top=9
    )
    assert pages[real].tolist() == [0, 1, 2]  # more pages allowed than filled: only the filled ones


def test_quest_evicts_nothing():
    assert kept(QuestPolicy(), candidates(40, 5)) == 40


@pytest.mark.parametrize("page_size", [0, 2.5, True])
def test_quest_page_size_is_validated(page_size):
    with pytest.raises(ValueError, match=f"page_size={page_size!r}"):
        sparse_policy("quest", page_size=page_size)


@pytest.mark.parametrize("fused", ["1", "0"], ids=["cpu kernel", "torch"])
@pytest.mark.parametrize("per_head", [False, True], ids=["k per batch row", "k per head"])
def test_topk_mask_keeps_what_a_stable_descending_sort_ranks_first(per_head, fused, monkeypatch):
    """`topk_mask` against its definition (the ``k`` first slots of a stable descending sort): ties to the earlier
    slot, -0.0 tied with 0.0, -inf last, NaN first, any ``k`` from 0 to past the row; in the CPU kernel
    (`kernels.topk_mask`) and in torch."""
    monkeypatch.setenv("LEANKV_FUSED", fused)
    torch.manual_seed(0)
    scores = torch.randint(0, 6, (4, 3, 40)).float() / 4  # many ties
    scores[0, 0, ::5], scores[1, 1, 3], scores[1, 1, 7] = -torch.inf, float("nan"), -0.0
    scores[2] = torch.rand(3, 40)
    k = torch.randint(0, 45, (4, 3) if per_head else (4,))
    k[0] = 0
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(40).expand_as(order))
    expected = rank < k.view(*k.shape, *([1] * (3 - k.dim())))
    assert torch.equal(topk_mask(scores, k), expected)
    assert topk_mask(scores, torch.full((4,), 40)).all()
