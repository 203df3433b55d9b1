"""The orchestrator: a budget in, a measured table and a chosen config out."""

import pytest
import torch
from transformers import DynamicCache

from leankv_hf import UnifiedLeanCache
from leankv_hf.cli import main
from leankv_hf.eval.tasks.perplexity import reference_logprobs, teacher_forced
from leankv_hf.testing import tiny_model
from leankv_hf.tune import tune

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 30
SMALL = {"group_size": 16, "buffer": 8, "window": 8, "interval": 4}


def test_precomputed_reference_gives_the_lockstep_kl(tiny_tok):
    model = tiny_model("llama")
    ids = tiny_tok(TEXT).input_ids[:140]
    lockstep = teacher_forced(
        model, ids, 128, UnifiedLeanCache(model, **SMALL), reference=DynamicCache(config=model.config)
    )
    once = teacher_forced(
        model, ids, 128, UnifiedLeanCache(model, **SMALL), reference=reference_logprobs(model, ids, 128)
    )
    assert lockstep.kl > 0
    assert once.kl == pytest.approx(lockstep.kl, rel=1e-5) and once.nll == pytest.approx(lockstep.nll, rel=1e-6)


def test_tune_measures_every_candidate_and_picks_the_lowest_kl_that_fits(tiny_tok):
    model = tiny_model("llama")
    candidates = {
        "exact": {**SMALL, "high": (16, 16), "low": (16, 16), "alpha_prune": 0.0},
        "k4v2/k2v2": {**SMALL, "high": (4, 2), "low": (2, 2)},
    }
    plan = tune(model, tiny_tok, budget_mb=1.0, context=128, steps=6, text=TEXT, candidates=candidates, progress=False)
    trials = {t.name: t for t in plan.trials}
    assert set(trials) == set(candidates)
    assert trials["exact"].kl == pytest.approx(0, abs=1e-6)
    assert trials["k4v2/k2v2"].kl > 1e-4
    assert trials["k4v2/k2v2"].compression > trials["exact"].compression
    assert plan.best.name == "exact" and all(t.fits for t in plan.trials)
    assert plan.best_config().high == (16, 16)

    # A budget only the smaller candidate meets: the exact one is measured, reported, and rejected.
    budget = (trials["k4v2/k2v2"].peak_mb + trials["exact"].peak_mb) / 2
    plan = tune(
        model, tiny_tok, budget_mb=budget, context=128, steps=6, text=TEXT, candidates=candidates, progress=False
    )
    assert {t.name: t.fits for t in plan.trials} == {"exact": False, "k4v2/k2v2": True}
    assert plan.best.name == "k4v2/k2v2"
    assert "→" in plan.to_markdown().splitlines()[2]  # the chosen row is marked, first


def test_tune_rejects_bad_input_before_measuring(tiny_tok):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="budget_mb"):
        tune(model, tiny_tok, budget_mb=0, text=TEXT)
    with pytest.raises(ValueError, match="unknown LeanKVConfig keys"):
        tune(model, tiny_tok, budget_mb=1, context=64, steps=2, text=TEXT, candidates={"bad": {"bitz": 3}})
    with pytest.raises(ValueError, match="calibration text has"):
        tune(model, tiny_tok, budget_mb=1, context=4096, steps=2, text=TEXT, candidates={"ok": SMALL})


@pytest.mark.slow
def test_tune_command_writes_table_and_config(tmp_path, capsys):
    candidates = tmp_path / "candidates.yaml"
    candidates.write_text("k8v4: {high: [8, 4], low: [4, 2]}\nk4v2: {high: [4, 2], low: [2, 2]}\n")
    out = tmp_path / "tune"
    code = main(
        [
            "tune",
            "--budget-mb",
            "8",
            "--context",
            "256",
            "--steps",
            "4",
            "--candidates",
            str(candidates),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "chose" in capsys.readouterr().out
    assert (out / "tune.md").read_text().count("|") > 20 and (out / "best.yaml").exists()


def test_the_chosen_plan_keeps_its_cap(tiny_tok, tmp_path):
    """best.yaml is the plan for the budget: loading it gives a cache capped at that budget, and the cap holds."""
    model = tiny_model("llama")
    candidates = {"k8v4": {**SMALL, "high": (8, 4), "low": (4, 2)}}
    plan = tune(model, tiny_tok, budget_mb=0.05, context=128, steps=4, text=TEXT, candidates=candidates, progress=False)
    (tmp_path / "best.yaml").write_text(plan.best_config().to_yaml())
    cache = UnifiedLeanCache.from_config(tmp_path / "best.yaml", model=model)
    assert cache.settings.budget_mb == 0.05
    ids = tiny_tok(TEXT, return_tensors="pt").input_ids[:, :600]
    peak = 0
    with torch.no_grad():
        for step in range(0, 600, 50):
            model(input_ids=ids[:, step : step + 50], past_key_values=cache)
            peak = max(peak, cache.nbytes())
    assert peak <= 0.05 * 2**20 and cache.stats()["budget_pruned"] > 0
