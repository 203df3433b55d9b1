"""The runner end to end on a tiny random model: rows, summary, plots, resume, settings, sharding, perplexity."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import leankv_hf.eval.runner as runner
from leankv_hf.eval import run_eval
from leankv_hf.eval.results import ROWS, read_rows
from leankv_hf.eval.tasks import LongBenchTask, PasskeyTask, PerplexityTask
from leankv_hf.eval.tasks.perplexity import sample_text
from leankv_hf.testing import tiny_model, tiny_tokenizer

QUANTO = importlib.util.find_spec("optimum.quanto") is not None
METHODS = ["full", "hf-quanto:4"] if QUANTO else ["full"]
FIXTURES = Path(__file__).parent / "fixtures" / "longbench"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(head_dim=32)  # quanto's 64-wide groups need heads x head_dim divisible by 64


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _passkey(n_per_cell: int = 1) -> PasskeyTask:
    return PasskeyTask(lengths=[250, 400], depths=[0.0, 1.0], n_per_cell=n_per_cell)


@pytest.fixture
def counted(monkeypatch):
    """Counts the examples actually computed."""
    calls = []
    real = runner.evaluate_example

    def counting(*args, **kwargs):
        calls.append(args[3].id)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_example", counting)
    return calls


def test_end_to_end_writes_rows_summary_and_plots(model, tok, tmp_path):
    summary = run_eval(model, tok, _passkey(), METHODS, tmp_path, max_new_tokens=4)
    rows = read_rows(tmp_path / ROWS)
    assert len(rows) == 4 * len(METHODS)
    row = rows[0]
    for key in ("task", "method", "setting", "id", "metadata", "prediction", "score", "cache_bytes", "dense_bytes",
                "ratio", "prefill_s", "decode_s", "decode_tokens", "prompt_tokens"):  # fmt: skip
        assert key in row
    assert row["metadata"]["depth"] == 0.0 and row["metadata"]["length"] == 250
    assert row["ratio"] == pytest.approx(2.0)  # a float32 DynamicCache is twice the 16-bit reference
    assert row["cache_bytes"] > 0 and row["decode_tokens"] == 3
    assert row["prefill_cache_bytes"] < row["cache_bytes"]  # measured after the prompt, then after decoding
    assert [(e.method, e.n) for e in summary.entries] == [(m, 4) for m in METHODS]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [e["method"] for e in saved["entries"]] == METHODS
    assert "| passkey | full | query_aware | 4 |" in (tmp_path / "summary.md").read_text()
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "score_vs_ratio_passkey.png" in pngs and "passkey_heatmap_full_query_aware.png" in pngs
    assert all((tmp_path / p).read_bytes().startswith(b"\x89PNG") for p in pngs)
    if QUANTO:
        quanto = summary.entries[1]
        assert quanto.ratio < 0.5 and quanto.cache_bytes < summary.entries[0].cache_bytes


def test_resume_skips_done_rows(model, tok, tmp_path, counted):
    """Done rows are not computed again; each run's first example of a method runs twice (the first untimed)."""
    run_eval(model, tok, _passkey(), ["full"], tmp_path, limit=2, max_new_tokens=2)
    first = read_rows(tmp_path / ROWS)
    assert counted == [first[0]["id"], first[0]["id"], first[1]["id"]]
    run_eval(model, tok, _passkey(), ["full"], tmp_path, limit=4, max_new_tokens=2)
    rows = read_rows(tmp_path / ROWS)
    assert counted[3:] == [rows[2]["id"], *(r["id"] for r in rows[2:])]
    assert rows[:2] == first  # untouched, not recomputed
    assert len({r["id"] for r in rows}) == 4


def test_interrupted_write_is_dropped_and_recomputed(model, tok, tmp_path, counted):
    run_eval(model, tok, _passkey(), ["full"], tmp_path, limit=2, max_new_tokens=2)
    path = tmp_path / ROWS
    data = path.read_bytes()
    lines = data.split(b"\n")
    path.write_bytes(data[: len(lines[0]) + 1 + len(lines[1]) // 2])  # crash halfway through the second row
    summary = run_eval(model, tok, _passkey(), ["full"], tmp_path, limit=2, max_new_tokens=2)
    rows = read_rows(path)
    assert counted == [rows[0]["id"], rows[0]["id"], rows[1]["id"], rows[1]["id"], rows[1]["id"]]
    assert path.read_bytes().count(b"\n") == 2 and summary.entries[0].n == 2


def test_query_agnostic_matches_query_aware_for_the_full_cache(model, tok, tmp_path, monkeypatch):
    caches = []
    real = runner.make_cache
    monkeypatch.setattr(runner, "make_cache", lambda spec, m: caches.append(real(spec, m)) or caches[-1])
    aware = run_eval(model, tok, _passkey(), ["full"], tmp_path, max_new_tokens=5)
    agnostic = run_eval(model, tok, _passkey(), ["full"], tmp_path, setting="query_agnostic", max_new_tokens=5)
    rows = read_rows(tmp_path / ROWS)
    by_setting = {s: [r["prediction"] for r in rows if r["setting"] == s] for s in ("query_aware", "query_agnostic")}
    assert len(by_setting["query_agnostic"]) == 4
    assert by_setting["query_aware"] == by_setting["query_agnostic"]
    # the same tokens at the same positions: the context is fed once, the question after it
    for aware_cache, agnostic_cache in zip(caches[1:5], caches[6:], strict=True):  # each run's first: its warm-up
        for a, b in zip(aware_cache.layers, agnostic_cache.layers, strict=True):
            assert a.keys.shape == b.keys.shape and torch.allclose(a.keys, b.keys, atol=1e-4)
    assert [e.setting for e in agnostic.entries] == ["query_aware", "query_agnostic"] and aware.entries[0].n == 4
    with pytest.raises(ValueError, match="query_agnostic"):
        run_eval(model, tok, _passkey(), ["full"], tmp_path, setting="sideways")


class _Process:
    """Stands in for one of two accelerate processes (barriers are no-ops when run one after the other)."""

    def __init__(self, index: int):
        self.process_index, self.num_processes = index, 2
        self.is_main_process = self.is_local_main_process = index == 0

    def wait_for_everyone(self):
        pass


def test_sharded_processes_merge(model, tok, tmp_path, counted):
    task = _passkey(n_per_cell=2)
    run_eval(model, tok, task, ["full"], tmp_path, max_new_tokens=2, state=_Process(1))
    assert (tmp_path / "rows.rank1.jsonl").exists() and not (tmp_path / ROWS).exists()
    summary = run_eval(model, tok, task, ["full"], tmp_path, max_new_tokens=2, state=_Process(0))
    rows = read_rows(tmp_path / ROWS)
    examples = [e.id for e in task.examples(tok, 0)]
    assert sorted(r["id"] for r in rows) == sorted(examples)
    assert counted == [examples[1], *examples[1::2], examples[0], *examples[::2]]  # every other one, each warmed up
    assert not list(tmp_path.glob("rows.rank*.jsonl")) and summary.entries[0].n == 8


def test_longbench_prompts_are_cut_in_the_middle(model, tok, tmp_path, monkeypatch):
    monkeypatch.setattr(model.config, "max_position_embeddings", 150)
    task = LongBenchTask(["qasper", "trec"], data_dir=FIXTURES)
    run_eval(model, tok, task, ["full"], tmp_path, max_new_tokens=3)
    rows = read_rows(tmp_path / ROWS)
    assert [r["prompt_tokens"] for r in rows] == [147] * 4  # context 150 minus 3 to generate
    assert {r["task"] for r in rows} == {"longbench/qasper", "longbench/trec"}
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)


def test_perplexity_nll_and_kl(model, tok, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(sample_text(60))
    task = PerplexityTask(text, lengths=[200], n_per_cell=2, steps=24)
    summary = run_eval(model, tok, task, ["full", "hf-quanto:2"] if QUANTO else ["full"], tmp_path / "out")
    rows = read_rows(tmp_path / "out" / ROWS)
    assert all(r["tokens"] == 24 and r["decode_tokens"] == 23 for r in rows)
    full = summary.entries[0]
    assert full.kl == 0.0 and full.delta_nll == 0.0 and full.score is None
    assert full.ppl == pytest.approx(torch.tensor(full.nll).exp().item()) and full.ppl > 1
    assert "| perplexity | full |" in (tmp_path / "out" / "summary.md").read_text()
    if QUANTO:
        quanto = summary.entries[1]
        assert quanto.kl > 0 and quanto.delta_nll is not None and quanto.ratio < full.ratio


@pytest.mark.slow
def test_two_cpu_processes_shard_and_merge(model, tok, tmp_path):
    """The real launch: torchrun starts two CPU processes (gloo); each runs half the examples, the main one merges."""
    checkpoint = tmp_path / "tiny"
    model.save_pretrained(checkpoint)
    tok.save_pretrained(checkpoint)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "leankv_hf.eval"]
    command += [
        "--model",
        str(checkpoint),
        "--out",
        str(out),
        "--methods",
        "full",
        "--task",
        "passkey",
        "--lengths",
        "120",
        "--depths",
        "0,1",
        "--n-per-cell",
        "2",
        "--max-new-tokens",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(out / ROWS)
    assert len(rows) == len({r["id"] for r in rows}) == 4  # every example once: sharded, not run twice
    assert "2/2" in done.stderr and "4/4" not in done.stderr  # the main process's progress: its half only
    assert not list(out.glob("rows.rank*.jsonl"))
