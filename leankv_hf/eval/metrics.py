"""Scoring functions: pure, each returning a score in [0, 1] for one prediction.

LongBench's metrics are reimplemented from its ``metrics.py`` (same normalization, same tokenization), with two
documented differences: ROUGE-L comes from ``rouge-score`` (LongBench uses the ``rouge`` package; both are the
LCS F-measure, ``rouge-score`` tokenizes slightly differently), and ``classification_score`` drops every matched
class that is a strict substring of the ground truth (LongBench's loop can skip one while mutating its list).
RULER's ``string_match_all/part`` and the passkey check are one-liners kept here so that all scoring is in one place.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Sequence


@functools.cache
def _jieba():
    """jieba (Chinese word segmentation), imported when a Chinese task is first scored: it takes a second."""
    import jieba

    jieba.setLogLevel(60)
    return jieba


_ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_PUNCTUATION = set(string.punctuation)
_ALL_PUNCTUATION = _PUNCTUATION | set(_ZH_PUNCTUATION)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: lowercase, drop punctuation and English articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Chinese normalization: lowercase, drop ASCII and CJK punctuation, drop all whitespace."""
    return "".join(ch for ch in text.lower() if ch not in _ALL_PUNCTUATION and not ch.isspace())


def _token_f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """Bag-of-words F1 after ``normalize_answer``."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _zh_tokens(text: str) -> list[str]:
    return [t for t in (normalize_zh_answer(w) for w in _jieba().cut(text, cut_all=False)) if t]


def qa_f1_zh_score(prediction: str, ground_truth: str) -> float:
    """Bag-of-words F1 over jieba words, each normalized with ``normalize_zh_answer``."""
    return _token_f1(_zh_tokens(prediction), _zh_tokens(ground_truth))


class _WhitespaceTokenizer:
    """rouge-score's default tokenizer deletes non-ASCII text; pre-segmented Chinese only needs a split."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return text.split()


@functools.cache
def _rouge_l(pre_segmented: bool):
    from rouge_score import rouge_scorer  # imports nltk: a second, paid only by summarization tasks

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer() if pre_segmented else None)


def rouge_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words)."""
    return _rouge_l(False).score(ground_truth, prediction)["rougeL"].fmeasure


def rouge_zh_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F-measure over jieba words."""

    def words(text: str) -> str:
        return " ".join(_jieba().cut(text, cut_all=False))

    return _rouge_l(True).score(words(ground_truth), words(prediction))["rougeL"].fmeasure


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str]) -> float:
    """1/k when the ground truth is among the k class names found in the prediction, else 0.

    Class names that are strict substrings of the ground truth do not count as competing matches.
    """
    matches = [c for c in all_classes if c in prediction and not (c in ground_truth and c != ground_truth)]
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _fraction_equal(numbers: list[str], target: str) -> float:
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, ground_truth: str) -> float:
    """Fraction of the numbers in the prediction that equal the ground-truth count."""
    return _fraction_equal(re.findall(r"\d+", prediction), str(ground_truth))


def retrieval_score(prediction: str, ground_truth: str) -> float:
    """Fraction of the numbers in the prediction that equal the paragraph number in "Paragraph N"."""
    return _fraction_equal(re.findall(r"\d+", prediction), re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str) -> float:
    """Chinese retrieval: the ground truth reads "段落N"."""
    return _fraction_equal(re.findall(r"\d+", prediction), re.findall(r"段落(\d+)", ground_truth)[0])


def code_sim_score(prediction: str, ground_truth: str) -> float:
    """Edit similarity of the first prediction line that is not a comment or fence: LongBench's ``fuzz.ratio``
    (the InDel similarity in whole percent, as fuzzywuzzy with python-Levenshtein gives it), computed by rapidfuzz,
    / 100."""
    from rapidfuzz import fuzz

    lines = prediction.lstrip("\n").split("\n")
    first = next((line for line in lines if "`" not in line and "#" not in line and "//" not in line), "")
    return round(fuzz.ratio(first, ground_truth)) / 100


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER: the fraction of references found (case-insensitively) in the prediction."""
    return sum(r.lower() in prediction.lower() for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER's QA metric: 1 when any reference is found (case-insensitively) in the prediction."""
    return float(any(r.lower() in prediction.lower() for r in references))


def contains(prediction: str, answer: str) -> float:
    """Passkey: 1 when the exact key string appears in the generated text."""
    return float(answer in prediction)
