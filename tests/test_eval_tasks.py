"""Tasks: deterministic, sized in tokens, answers where they should be, broken data reported and skipped."""

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from leankv_hf.eval.tasks import (
    LongBenchTask,
    PasskeyTask,
    PerplexityTask,
    RulerTask,
    encode,
    load_passkey_file,
    truncate_middle,
)
from leankv_hf.eval.tasks.longbench import DATASET2PROMPT
from leankv_hf.eval.tasks.passkey import INTRO, QUESTION, passkey_example
from leankv_hf.eval.tasks.perplexity import sample_text
from leankv_hf.eval.tasks.ruler import SUBTASKS
from leankv_hf.eval.tasks.text import FILLER
from leankv_hf.testing import tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"
PEERS = Path(__file__).parents[1] / "eval" / "data" / "passkey_peers.jsonl"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_passkey_is_deterministic_and_seeded(tok):
    task = PasskeyTask(lengths=[400], depths=[0.0, 0.5], n_per_cell=3)
    first, again, other = task.examples(tok, 0), task.examples(tok, 0), task.examples(tok, 1)
    assert first == again
    assert [e.answers for e in first] != [e.answers for e in other]
    assert all(len(e.answers[0]) == 5 and e.answers[0].isdigit() for e in first)
    assert len({e.id for e in first}) == 6


@pytest.mark.parametrize("length", [500, 900])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_length_and_depth(tok, length, depth):
    (example,) = PasskeyTask(lengths=[length], depths=[depth], n_per_cell=1).examples(tok, 0)
    # length: within half of the longest filler sentence (the unit the prompt grows by)
    sentence = max(len(tok(" " + s, add_special_tokens=False).input_ids) for s in FILLER)
    assert abs(len(encode(tok, example)[0]) - length) <= sentence // 2 + 1
    # depth: the needle sits on a sentence boundary at the requested fraction of the filler
    assert example.context.startswith(INTRO) and example.question == QUESTION
    body = example.context[len(INTRO) :]
    before, after = body.split("The pass key is", 1)
    n_before, n_after = before.count("."), after.count(".") - 3  # the needle has three sentences
    total = n_before + n_after
    assert n_before % len(FILLER) == 0 or n_before == total  # between two repeats of the filler, or at the end
    assert abs(n_before / total - depth) <= len(FILLER) / 2 / total
    assert before == "" or before.endswith("There and back again. ") or n_before == total and before.endswith(". ")


@pytest.mark.skipif(not PEERS.exists(), reason="no shared passkey set in this checkout")
def test_passkey_generator_reproduces_the_shared_set():
    rows = [json.loads(line) for line in PEERS.read_text().splitlines()]
    for row in rows:
        n_sentences = sum(row["text"].count(s) for s in FILLER)
        assert passkey_example(n_sentences, row["depth"], str(row["key"])).prompt == row["text"]
    examples = load_passkey_file(PEERS)
    assert len(examples) == len(rows) and examples[0].question == QUESTION
    assert examples[0].metadata == {
        "length": rows[0]["length_bucket"],
        "n_tokens": rows[0]["n_tokens"],
        "depth": rows[0]["depth"],
    }


def test_passkey_shared_set(tok, tmp_path, caplog):
    rows = [
        {
            "length_bucket": 2048,
            "n_tokens": 2050,
            "depth": 0.25,
            "key": 12345,
            "text": passkey_example(10, 0.25, "12345").prompt,
        },
        {"length_bucket": 4096, "n_tokens": 4101, "depth": 0.5},  # no key/text: reported, skipped
        {
            "length_bucket": 4096,
            "n_tokens": 4090,
            "depth": 0.5,
            "key": "67890",
            "text": passkey_example(20, 0.5, "67890").prompt,
        },
    ]
    path = tmp_path / "peers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        examples = load_passkey_file(path)
    assert [e.answers for e in examples] == [("12345",), ("67890",)]
    assert all(
        e.question == QUESTION and e.prompt == r["text"] for e, r in zip(examples, [rows[0], rows[2]], strict=True)
    )
    assert examples[1].metadata == {"length": 4096, "n_tokens": 4090, "depth": 0.5}
    assert "peers.jsonl:2" in caplog.text
    assert PasskeyTask(data=path).examples(tok, 0) == examples


def test_ruler_answers_are_in_their_prompts(tok):
    examples = RulerTask(lengths=[1200], n_per_cell=1).examples(tok, 0)
    assert [e.task for e in examples] == [f"ruler/{s}" for s in SUBTASKS]
    for example in examples:
        assert example.answers and all(a in example.context for a in example.answers), example.id
        assert abs(len(encode(tok, example)[0]) - 1200) <= 0.1 * 1200, example.id
    assert RulerTask(lengths=[1200], n_per_cell=1).examples(tok, 0) == examples


def test_ruler_semantics(tok):
    by = {
        e.task: e
        for e in RulerTask(["niah_multiquery", "vt", "cwe", "fwe"], lengths=[1500], n_per_cell=1).examples(tok, 3)
    }
    multiquery = by["ruler/niah_multiquery"]
    assert len(multiquery.answers) == 4 and "for " in multiquery.question and ", and " in multiquery.question
    vt = by["ruler/vt"]
    value = vt.context.split(f"VAR {vt.answers[0]} = ", 1)[1].split()[0]
    assert value in vt.question and "5 variables" in vt.question
    words = Counter(w for w in by["ruler/cwe"].context.split() if w.isalpha())
    assert {w for w, _ in words.most_common(10)} == set(by["ruler/cwe"].answers)
    coded = Counter(by["ruler/fwe"].context.split()[20:])  # skip the instruction's words
    assert [w for w, _ in coded.most_common(4) if w != "..."] == list(by["ruler/fwe"].answers)


def test_ruler_rejects_unknown_subtasks():
    with pytest.raises(ValueError, match="niah_single_1"):
        RulerTask(["niah_bogus"])


def test_longbench_from_fixture_dir_skips_and_reports_malformed_rows(tok, caplog):
    task = LongBenchTask(["qasper", "trec", "passage_retrieval_en"], data_dir=FIXTURES)
    with caplog.at_level(logging.WARNING):
        examples = task.examples(tok, 0)
    assert [e.id for e in examples] == [
        "longbench/qasper/qasper-1",
        "longbench/qasper/qasper-2",
        "longbench/trec/trec-1",
        "longbench/trec/trec-2",
        "longbench/passage_retrieval_en/pr-1",
        "longbench/passage_retrieval_en/pr-2",
    ]
    assert "qasper.jsonl:2" in caplog.text and "answers" in caplog.text
    qasper = examples[0]
    row = json.loads((FIXTURES / "qasper.jsonl").read_text().splitlines()[0])
    assert qasper.prompt == DATASET2PROMPT["qasper"].format(context=row["context"], input=row["input"])
    assert qasper.question == row["input"] + "\n\nAnswer:" and qasper.context.endswith("Question: ")
    assert qasper.max_new_tokens == 128 and examples[2].max_new_tokens == 64


def test_longbench_scoring_rules():
    task = LongBenchTask(["qasper", "trec", "passage_retrieval_en"], data_dir=FIXTURES)
    qasper, _, trec, _, retrieval, _ = task.examples(tiny_tokenizer(), 0)
    assert task.score(qasper, "Penn Treebank") == 1.0  # best over the references
    assert task.score(trec, "City\nIndividual") == 1.0  # first line only
    assert task.score(trec, "City or Individual") == 0.5
    assert task.score(retrieval, "Paragraph 2") == 1.0


def test_longbench_errors(tmp_path):
    with pytest.raises(ValueError, match="narrativeqa"):
        LongBenchTask(["bogus"])
    with pytest.raises(FileNotFoundError):
        LongBenchTask(["qasper"], data_dir=tmp_path).examples(tiny_tokenizer(), 0)


def test_templates_without_input_split_after_context():
    from leankv_hf.eval.tasks.longbench import split_prompt

    context, question = split_prompt("gov_report_e", {"context": "REPORT", "input": ""})
    assert context.endswith("REPORT") and question == "\n\nNow, write a one-page summary of the report.\n\nSummary:"


def test_truncate_middle_moves_the_split():
    ids = list(range(10))
    assert truncate_middle(ids, 7, 20) == (ids, 7)
    assert truncate_middle(ids, 7, 6) == ([0, 1, 2, 7, 8, 9], 3)
    assert truncate_middle(ids, 4, 6) == ([0, 1, 2, 7, 8, 9], 3)  # question longer than the kept tail


def test_perplexity_windows(tok, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(sample_text(100))
    task = PerplexityTask(text, lengths=[200, 300], n_per_cell=2, steps=40)
    examples = task.examples(tok, 0)
    assert [e.metadata["length"] for e in examples] == [200, 200, 300, 300]
    assert all(len(tok(e.question, add_special_tokens=False).input_ids) == 40 for e in examples)
    assert examples == task.examples(tok, 0)
    with pytest.raises(ValueError, match="fewer than one"):
        PerplexityTask(text, lengths=[10**6]).examples(tok, 0)
    with pytest.raises(ValueError, match="longer than"):
        PerplexityTask(text, lengths=[40], steps=40)
