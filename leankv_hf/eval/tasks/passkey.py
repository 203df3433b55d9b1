"""Passkey retrieval (Landmark attention's test): find a 5-digit key hidden at some depth in repeated filler.

Two sources: a seeded grid of lengths x depths x ``n_per_cell`` prompts, or the fixed shared set that peers
report on (JSONL rows with ``length_bucket`` such as "2k", ``n_tokens, depth, key, text``), whose format the
grid reproduces exactly. Scoring: the key appears in the output.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ..metrics import contains
from .base import Example, fit_length, read_jsonl
from .text import FILLER, filler

log = logging.getLogger(__name__)

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
MAX_NEW_TOKENS = 12
_ASK = "What is the pass key?"
_PEER_SCHEMA = {"length_bucket": (int, str), "n_tokens": int, "depth": (int, float), "key": (int, str), "text": str}


def passkey_example(n_sentences: int, depth: float, key: str, id: str = "passkey", **metadata) -> Example:
    """The prompt with ``n_sentences`` of filler, each followed by a space, and the needle at ``depth``.

    As in the shared set, the needle goes between two repeats of the five-sentence filler (or at the very end),
    at the boundary nearest to ``depth``; the prompt grows one sentence at a time to get close to any length.
    """
    sentences = [f"{s} " for s in filler(n_sentences)]
    boundaries = [*range(0, n_sentences, len(FILLER)), n_sentences]
    cut = min(boundaries, key=lambda b: abs(b - depth * n_sentences))
    context = INTRO + "".join(sentences[:cut]) + NEEDLE.format(key=key) + "".join(sentences[cut:])
    return Example(id, "passkey", context, QUESTION, (key,), MAX_NEW_TOKENS, {"depth": depth, **metadata})


class PasskeyTask:
    """Seeded grid (``lengths`` in tokens x ``depths`` in [0, 1]) or, with ``data``, the shared set's rows."""

    name = "passkey"
    truncate = False

    def __init__(
        self,
        lengths: Sequence[int] = (1024, 2048, 4096),
        depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        n_per_cell: int = 2,
        data: str | Path | None = None,
    ):
        if any(not 0 <= d <= 1 for d in depths):
            raise ValueError(f"passkey depths are fractions in [0, 1], got {list(depths)}")
        self.lengths, self.depths, self.n_per_cell, self.data = list(lengths), list(depths), n_per_cell, data

    def examples(self, tokenizer: PreTrainedTokenizerBase, seed: int) -> list[Example]:
        if self.data is not None:
            return load_passkey_file(self.data)
        out, hint = [], 1
        for length in self.lengths:
            for depth in self.depths:
                for i in range(self.n_per_cell):
                    key = str(random.Random(f"passkey:{seed}:{length}:{depth}:{i}").randint(10000, 99999))
                    id = f"passkey/L{length}/d{depth:g}/{i}"

                    def build(n: int, depth: float = depth, key: str = key, id: str = id, length: int = length):
                        return passkey_example(n, depth, key, id, length=length)

                    example, hint = fit_length(build, tokenizer, length, start=hint)
                    out.append(example)
        return out

    def score(self, example: Example, prediction: str) -> float:
        return contains(prediction, example.answers[0])


def load_passkey_file(path: str | Path) -> list[Example]:
    """The shared set: each row's ``text`` is the whole prompt; the question starts at the newline before "What is the pass key?"."""
    examples = []
    for number, row in read_jsonl(path, _PEER_SCHEMA):
        text = row["text"]
        cut = text.rfind(_ASK)
        if cut < 0:
            log.warning("%s:%d: skipped, the text has no %r", path, number, _ASK)
            continue
        cut -= text[:cut].endswith("\n")
        metadata = {"length": row["length_bucket"], "n_tokens": row["n_tokens"], "depth": row["depth"]}
        examples.append(
            Example(
                f"passkey/peers/{number}",
                "passkey",
                text[:cut],
                text[cut:],
                (str(row["key"]),),
                MAX_NEW_TOKENS,
                metadata,
            )
        )
    return examples
