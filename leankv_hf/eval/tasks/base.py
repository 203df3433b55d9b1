"""What every task shares: the ``Example`` record, the ``Task`` protocol, and prompt tokenization/sizing.

A prompt is split into a *context* (what a query-agnostic cache may compress before it knows the question) and
a *question* (everything after). Both settings feed the same token ids: the context and the question are
tokenized separately and concatenated, so the split point is exact and the two settings are comparable.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One prompt to run: ``context + question`` is the model's input; ``answers`` are the references."""

    id: str
    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    max_new_tokens: int
    metadata: dict = field(default_factory=dict)
    followups: tuple[tuple[str, tuple[str, ...]], ...] = ()  # more (question, answers) about the same context

    @property
    def prompt(self) -> str:
        return self.context + self.question

    def questions(self) -> list[Example]:
        """The example and each follow-up question as an example of its own (same context), in order."""
        asked = [self] if not self.followups else [replace(self, id=f"{self.id}/q1", followups=())]
        for i, (question, answers) in enumerate(self.followups, start=2):
            asked.append(replace(self, id=f"{self.id}/q{i}", question=question, answers=answers, followups=()))
        return asked


class Task(Protocol):
    """A source of examples (the perplexity task is one: it is scored by teacher forcing, not on predictions)."""

    name: str
    truncate: bool  # cut over-long prompts in the middle to fit the model (LongBench's rule)

    def examples(self, tokenizer: PreTrainedTokenizerBase, seed: int) -> list[Example]: ...


class ScoredTask(Task, Protocol):
    """A task whose examples are answered by generation and scored on the generated text."""

    def score(self, example: Example, prediction: str) -> float: ...


def encode(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[list[int], int]:
    """Token ids of the whole prompt and the index where the question starts (special tokens only before the context)."""
    context = tokenizer(example.context).input_ids
    question = tokenizer(example.question, add_special_tokens=False).input_ids
    return context + question, len(context)


def truncate_middle(ids: list[int], split: int, max_tokens: int) -> tuple[list[int], int]:
    """Keep the first and last ``max_tokens // 2`` tokens (LongBench), moving the question split with the tail."""
    if len(ids) <= max_tokens:
        return ids, split
    head, tail = max_tokens // 2, max_tokens - max_tokens // 2
    question = len(ids) - split
    return ids[:head] + ids[-tail:], max_tokens - min(question, tail)


def fit_length(
    build: Callable[[int], Example], tokenizer: PreTrainedTokenizerBase, target: int, start: int = 1
) -> tuple[Example, int]:
    """The ``build(n)`` whose prompt is closest to ``target`` tokens, for a size ``n`` that grows the prompt.

    Gallops from ``start`` (pass the previous answer as a hint: neighbouring examples need nearly the same ``n``)
    then bisects, so a good hint costs a handful of tokenizations.
    """
    built: dict[int, tuple[Example, int]] = {}

    def size(n: int) -> int:
        if n not in built:
            example = build(n)
            built[n] = example, len(encode(tokenizer, example)[0])
        return built[n][1]

    lo = hi = max(start, 0)
    step = 1
    if size(hi) < target:
        while size(hi) < target:
            if hi > 4 * target + 64:
                raise ValueError(f"cannot build a prompt of {target} tokens: it stops growing at {size(hi)}")
            lo, hi, step = hi, hi + step, step * 2
    else:
        while lo > 0 and size(lo) >= target:
            hi, lo, step = lo, max(lo - step, 0), step * 2
        if size(lo) >= target:
            return built[lo][0], lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) < target else (lo, mid)
    best = lo if target - size(lo) <= size(hi) - target else hi
    return built[best][0], best


def read_jsonl(path: str | Path, schema: dict[str, type | tuple[type, ...]]) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` for each well-formed row; log and skip rows that are not JSON objects with
    every ``schema`` key of the right type, so that a broken row is reported and never silently scored."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                log.warning("%s:%d: skipped, not JSON (%s)", path, number, error)
                continue
            problem = schema_problem(row, schema)
            if problem:
                log.warning("%s:%d: skipped, %s", path, number, problem)
                continue
            yield number, row


def schema_problem(row: object, schema: dict[str, type | tuple[type, ...]]) -> str | None:
    """Why ``row`` does not match ``schema`` (missing key or wrong type), or None when it does."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    missing = [key for key in schema if key not in row]
    if missing:
        return f"missing keys {missing}"
    for key, types in schema.items():
        if not isinstance(row[key], types) or isinstance(row[key], bool) and bool not in _as_tuple(types):
            return f"key {key!r} has type {type(row[key]).__name__}"
    return None


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)
