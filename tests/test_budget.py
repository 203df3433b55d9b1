"""The memory cap's cut: only ever lower a policy's tiers, least important first, until each head fits."""

import torch

from leankv_hf.budget import BudgetReport, fit_to_budget, row_nbytes
from leankv_hf.policy import PRUNED
from leankv_hf.store import Precision


def test_row_bytes_are_measured_from_the_encoding():
    k8, v4 = Precision(8, 64), Precision(4, 64)
    # K: 64 codes + fp16 scale + fp16 zero; V: 32 packed bytes + scale + zero; 7 bytes of position/score/age
    assert row_nbytes(k8, v4, 64, torch.float16) == (64 + 4) + (32 + 4) + 7
    assert row_nbytes(Precision(16), Precision(16), 64, torch.float16) == 64 * 2 * 2 + 7
    assert row_nbytes(Precision(8, 32, rank=32), v4, 64, torch.float16) == (32 + 4) + (32 + 4) + 7


def test_within_budget_nothing_changes():
    tiers = torch.tensor([[[0, 1, 1, PRUNED]]], dtype=torch.int8)
    scores = torch.tensor([[[0.5, 0.2, 0.1, 0.0]]])
    out = fit_to_budget(tiers, scores, torch.zeros_like(tiers, dtype=torch.bool), [10, 4], torch.tensor([[18]]))
    assert torch.equal(out, tiers)


def test_demotes_the_least_important_high_tokens_first_then_prunes():
    tiers = torch.tensor([[[0, 0, 0, 1, 1]]], dtype=torch.int8)
    scores = torch.tensor([[[0.9, 0.5, 0.7, 0.2, 0.1]]])
    none = torch.zeros_like(tiers, dtype=torch.bool)
    report = BudgetReport()
    # 3 x 10 + 2 x 4 = 38 bytes; a 32-byte cap: demoting one high token (saves 6) is enough: the 0.5 one
    out = fit_to_budget(tiers, scores, none, [10, 4], torch.tensor([[32]]), report)
    assert out.tolist() == [[[0, 1, 0, 1, 1]]] and (report.demoted, report.pruned) == (1, 0)
    # 12 bytes: everything low would be 20, so the two least important low tokens go
    out = fit_to_budget(tiers, scores, none, [10, 4], torch.tensor([[12]]), report)
    assert out.tolist() == [[[1, 1, 1, PRUNED, PRUNED]]]
    # protected tokens (sinks) are demoted but never pruned, whatever the cap
    protected = torch.tensor([[[False, False, False, False, True]]])
    out = fit_to_budget(tiers, scores, protected, [10, 4], torch.tensor([[0]]))
    assert out.tolist() == [[[PRUNED, PRUNED, PRUNED, PRUNED, 1]]]


def test_each_head_fits_its_own_budget():
    torch.manual_seed(0)
    tiers = torch.randint(-1, 2, (2, 3, 50), dtype=torch.int8)
    scores = torch.rand(2, 3, 50)
    budget = torch.randint(0, 400, (2, 3))
    out = fit_to_budget(tiers, scores, torch.zeros_like(tiers, dtype=torch.bool), [10, 4], budget)
    cost = (out == 0).sum(-1) * 10 + (out == 1).sum(-1) * 4
    assert (cost <= budget).all()
    assert ((out >= tiers) | (out == PRUNED)).all()  # only lowered (a higher index), or pruned
    assert (out[tiers == PRUNED] == PRUNED).all()  # nothing comes back
    # tight: a head that was cut is left with less than one step (demotion saves 6, pruning 4) to spare
    assert ((budget - cost < 6) | (out == tiers).all(-1)).all()
