"""``leankv eval`` / ``leankv bench`` through the real command line, on a tiny model standing in for the default."""

import argparse
import csv
import importlib.util
import io
import sys
from pathlib import Path

import pytest
import torch

import leankv_hf.models
from leankv_hf.cli import main
from leankv_hf.eval.__main__ import main as module_main
from leankv_hf.eval.cli import BENCH_OPTIONS, EVAL_OPTIONS, build_task, resolve
from leankv_hf.eval.results import ROWS, read_rows
from leankv_hf.testing import tiny_model, tiny_tokenizer

QUANTO = importlib.util.find_spec("optimum.quanto") is not None
PASSKEY = ["--task", "passkey", "--lengths", "250", "--depths", "0,1", "--max-new-tokens", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def loaded(monkeypatch):
    """``load_model`` returns a tiny model; records what it was asked for."""
    asked = []

    def load_model(name, dtype=None, device=None):
        asked.append((name, dtype, device))
        return tiny_model(head_dim=32), tiny_tokenizer()

    monkeypatch.setattr(leankv_hf.models, "load_model", load_model)
    return asked


def test_eval_command_end_to_end(loaded, tmp_path, capsys):
    assert (
        main(["eval", *PASSKEY, "--n-per-cell", "1", "--methods", "full", "--out", str(tmp_path), "--dtype", "float32"])
        == 0
    )
    assert loaded == [("smollm2-135m", "float32", None)]
    assert len(read_rows(tmp_path / ROWS)) == 2
    out = capsys.readouterr().out
    assert "| passkey | full | query_aware | 2 |" in out


def test_module_entry_point_is_the_same_command(loaded, tmp_path):
    assert module_main([*PASSKEY, "--n-per-cell", "1", "--out", str(tmp_path), "--setting", "query_agnostic"]) == 0
    assert {r["setting"] for r in read_rows(tmp_path / ROWS)} == {"query_agnostic"}


def test_suite_sets_options_and_flags_win(loaded, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        f"task: passkey\nlengths: [250]\ndepths: [0.5]\nn-per-cell: 1\nmethods: [full]\nmax_new_tokens: 2\nout: {tmp_path / 'out'}\nmodel: tiny\n"
    )
    assert main(["eval", "--suite", str(suite), "--n-per-cell", "3"]) == 0
    rows = read_rows(tmp_path / "out" / ROWS)
    assert len(rows) == 3 and {r["metadata"]["depth"] for r in rows} == {0.5}
    assert loaded[0][0] == "tiny"


def test_bad_suite_key_lists_valid_ones(loaded, tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text("task: passkey\nlenghts: [250]\n")
    assert main(["eval", "--suite", str(suite)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lenghts'" in err and "n_per_cell" in err and len(err.strip().splitlines()) == 1
    assert loaded == []


def test_unknown_names_are_usage_errors(loaded, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--methods", "full,nope"])
    assert exit_.value.code == 2 and "hetero:kKvV" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--task", "mmlu"])
    assert exit_.value.code == 2 and "longbench" in capsys.readouterr().err
    assert main(["eval", "--task", "passkey", "--datasets", "qasper"]) == 2
    assert "--datasets do(es) not apply to --task passkey" in capsys.readouterr().err
    assert main(["eval", "--task", "perplexity"]) == 2
    assert "--text" in capsys.readouterr().err
    assert loaded == []


def test_unknown_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["eval", "--model", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "smollm2-135m" in err and len(err.splitlines()) == 1


def test_bench_command(loaded, tmp_path, capsys, monkeypatch):
    methods = "hf-quanto:4" if QUANTO else "full"
    argv = [
        "bench",
        "--methods",
        methods,
        "--lengths",
        "64,128",
        "--decode-tokens",
        "2",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    monkeypatch.setattr(sys, "argv", ["leankv", *argv])
    assert main(argv) == 0
    text = (tmp_path / "bench.csv").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert f"# command: leankv bench --methods {methods} --lengths 64,128" in text
    assert any(line == f"# torch: {torch.__version__}" for line in header)
    assert any(line.startswith("# threads: ") for line in header)
    rows = list(csv.DictReader(io.StringIO("\n".join(line for line in text.splitlines() if not line.startswith("#")))))
    measured = ["full", methods] if QUANTO else ["full"]
    assert [(r["method"], r["length"]) for r in rows] == [(m, length) for length in ("64", "128") for m in measured]
    full = [r for r in rows if r["method"] == "full"]
    assert all(float(r["prefill_vs_full"]) == 1.0 and float(r["decode_vs_full"]) == 1.0 for r in full)
    assert all(float(r["ratio"]) == pytest.approx(2.0) for r in full)
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")
    assert "# leankv bench" in (tmp_path / "bench.md").read_text() and "decode_vs_full" in capsys.readouterr().out


SUITES = sorted((Path(__file__).parents[1] / "eval" / "suites").glob("*.yaml"))


@pytest.mark.parametrize("suite", SUITES, ids=lambda p: p.name)
def test_shipped_suites_are_valid(suite):
    bench = suite.stem.startswith("bench")  # bench.yaml, bench_long.yaml
    args = resolve(argparse.Namespace(suite=str(suite)), BENCH_OPTIONS if bench else EVAL_OPTIONS)
    assert args.methods and args.out.startswith(("results/", "eval/results/"))  # scratch, or published
    if not bench:
        assert build_task(args).name == args.task


def test_suites_are_shipped():
    assert {"quick.yaml", "passkey_peers.yaml", "bench.yaml", "hetero_kl.yaml"} <= {p.name for p in SUITES}


def test_bench_peak_memory_follows_what_the_cache_keeps(tmp_path):
    """Peak resident memory (a fresh process per method) with a chunked prefill: the full cache's peak covers its
    stored bytes; a cache keeping a tenth of the tokens peaks far below it, because it compacts after each chunk."""
    from leankv_hf.eval.bench import run_bench

    shapes = dict(head_dim=64, num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=8)
    model, tokenizer = tiny_model(**shapes), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    spec = "sparse:adakv@0.1"
    rows = run_bench(model, tokenizer, [spec], [2048], 2, 1, prefill_chunk=256, rss_of=str(tmp_path))
    full, sparse = sorted(rows, key=lambda r: r.method != "full")
    assert full.peak_memory_bytes >= 0.9 * full.cache_bytes > 0
    assert sparse.peak_memory_bytes < 0.4 * full.peak_memory_bytes
    assert {r.prefill_chunk for r in rows} == {256}
    with pytest.raises(ValueError, match="prefill_chunk=0"):
        run_bench(model, tokenizer, [spec], [64], 2, 1, prefill_chunk=0)
