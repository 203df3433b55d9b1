"""Metric functions against cases worked out by hand."""

import pytest

from leankv_hf.eval import metrics


def test_qa_f1_drops_articles_and_punctuation():
    # "the cat sat" -> [cat, sat]; "cat sat down" -> [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8
    assert metrics.qa_f1_score("the cat sat", "cat sat down") == pytest.approx(0.8)
    assert metrics.qa_f1_score("The Cat, sat!", "cat sat") == 1.0
    assert metrics.qa_f1_score("a dog", "cat") == 0.0
    assert metrics.normalize_answer("  The  Quick, brown fox.") == "quick brown fox"


def test_qa_f1_zh_uses_jieba_words():
    # [我, 爱, 北京] vs [我, 爱, 北京, 天安门]: P = 1, R = 3/4, F1 = 6/7
    assert metrics.qa_f1_zh_score("我爱北京", "我爱北京天安门") == pytest.approx(6 / 7)
    assert metrics.normalize_zh_answer("北京， 天安门！") == "北京天安门"


def test_rouge_l():
    # LCS "the cat on the mat" = 5 of 6 words each side
    assert metrics.rouge_score("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert metrics.rouge_score("", "anything") == 0.0
    assert metrics.rouge_zh_score("我爱北京", "我爱北京天安门") == pytest.approx(6 / 7)


def test_code_sim_takes_first_code_line():
    assert metrics.code_sim_score("# a comment\nx = 1\ny = 2", "x = 1") == 1.0
    assert metrics.code_sim_score("```python\nx = 2", "x = 1") == pytest.approx(0.8)  # 2*4/10


def test_count_and_retrieval():
    assert metrics.count_score("There are 3 unique paragraphs, not 4", "3") == 0.5
    assert metrics.count_score("no digits", "3") == 0.0
    assert metrics.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert metrics.retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    assert metrics.retrieval_zh_score("段落5", "段落5") == 1.0


def test_classification():
    classes = ["Location", "Entity", "Human being", "Other number", "Other"]
    assert metrics.classification_score("Location", "Location", classes) == 1.0
    assert metrics.classification_score("Location or Entity", "Location", classes) == 0.5
    assert metrics.classification_score("Human", "Human being", classes) == 0.0
    # "Other" is a strict substring of the truth "Other number": not a competing match
    assert metrics.classification_score("Other number", "Other number", classes) == 1.0


def test_ruler_string_match_and_passkey():
    assert metrics.string_match_all("The numbers are 123 and 456", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert metrics.string_match_all("ABC", ["abc"]) == 1.0
    assert metrics.string_match_part("only 123", ["123", "456"]) == 1.0
    assert metrics.string_match_part("none", ["123", "456"]) == 0.0
    assert metrics.contains(" 12345. Remember", "12345") == 1.0
    assert metrics.contains("1234", "12345") == 0.0


CODE_PAIRS = [
    ("x = 2", "x = 1"),
    ("return self.model(input_ids)", "return self.model(inputs)"),
    ("for i in range(10):", "for j in range(n):"),
    ("public static void main(String[] args) {", "public void main(String args) {"),
    ("self.assertEqual(result, expected)", "assert result == expected"),
    ("", "abc"),
    ("    def forward(self, x):", "def forward(x):"),
]


@pytest.mark.parametrize("prediction, truth", CODE_PAIRS)
def test_code_sim_equals_fuzzywuzzys_ratio(prediction, truth):
    """rapidfuzz gives the scores fuzzywuzzy gave (its pure-Python path: difflib, rounded to whole percent)."""
    from difflib import SequenceMatcher

    assert (
        metrics.code_sim_score(prediction, truth) == round(100 * SequenceMatcher(None, prediction, truth).ratio()) / 100
    )
