"""Teacher-forced perplexity and KL to the full cache: does a compressed cache change what the model predicts?

Each example is a window of ``length`` tokens of a text file. The first ``length - steps`` tokens are prefilled
through the cache (where compressing caches compress); the last ``steps`` tokens are then fed one at a time, as
in decoding but with the true next token, collecting each true token's negative log-likelihood.

KL(full || compressed) at each step needs the full cache's next-token distribution at that step. It is computed
in lockstep: the same model runs a second, plain ``DynamicCache`` alongside and the KL is summed on the fly.
That doubles the compute of non-full methods but keeps memory at two caches plus one vocabulary-sized row
whatever the length (storing reference log-probs would take ``steps x vocab`` values per window).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

from ..timing import clock
from .base import Example
from .text import essay_sentences


class PerplexityTask:
    """``n_per_cell`` seeded, non-overlapping windows per length of the text in ``text`` (a file path)."""

    name = "perplexity"
    truncate = False

    def __init__(self, text: str | Path, lengths: Sequence[int] = (2048,), n_per_cell: int = 4, steps: int = 128):
        if any(steps >= length for length in lengths):
            raise ValueError(f"perplexity windows must be longer than the {steps} teacher-forced steps: {list(lengths)}")
        self.text, self.lengths, self.n_per_cell, self.steps = Path(text), list(lengths), n_per_cell, steps

    def examples(self, tokenizer: PreTrainedTokenizerBase, seed: int) -> list[Example]:
        tokens = tokenizer(self.text.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
        out = []
        for length in self.lengths:
            starts = range(0, len(tokens) - length + 1, length)
            if not starts:
                raise ValueError(f"{self.text} has {len(tokens)} tokens, fewer than one {length}-token window")
            picked = sorted(random.Random(f"perplexity:{seed}:{length}").sample(starts, min(self.n_per_cell, len(starts))))
            for start in picked:
                cut, end = start + length - self.steps, start + length
                context, question = tokenizer.decode(tokens[start:cut]), tokenizer.decode(tokens[cut:end])
                metadata = {"length": length, "offset": start}
                out.append(Example(f"perplexity/L{length}/{start}", "perplexity", context, question, (), self.steps, metadata))
        return out


@dataclass(frozen=True)
class TeacherForced:
    """Sums over the teacher-forced tokens of one window (divide by ``tokens`` for means)."""

    nll: float
    kl: float
    tokens: int
    prefill_s: float
    decode_s: float


@torch.inference_mode()
def teacher_forced(
    model: PreTrainedModel,
    ids: list[int],
    split: int,
    cache: Cache,
    reference: Cache | None = None,
    after_prefill: Callable[[], None] | None = None,
) -> TeacherForced:
    """Prefill ``ids[:split]`` through ``cache``, then feed ``ids[split:]`` one token at a time, summing the NLL of
    each true token and, when a ``reference`` cache is given, KL(reference-run || cache-run) at every step.

    Only the calls through ``cache`` are timed; ``after_prefill`` runs once the prefix is in the cache.
    """
    device = model.device
    tokens = torch.tensor([ids], device=device)

    def next_logprobs(chunk: torch.Tensor, past: Cache) -> torch.Tensor:
        logits = model(input_ids=chunk, past_key_values=past, use_cache=True, logits_to_keep=1).logits
        return torch.log_softmax(logits[0, -1].float(), dim=-1)

    start = clock(device)
    logp = next_logprobs(tokens[:, :split], cache)
    prefill_s = clock(device) - start
    if after_prefill is not None:
        after_prefill()
    ref = next_logprobs(tokens[:, :split], reference) if reference is not None else None
    nll = kl = decode_s = 0.0
    for position in range(split, len(ids)):
        nll -= logp[ids[position]].item()
        if ref is not None:
            kl += torch.sum(ref.exp() * (ref - logp)).item()
        if position + 1 == len(ids):
            break
        token = tokens[:, position : position + 1]
        start = clock(device)
        logp = next_logprobs(token, cache)
        decode_s += clock(device) - start
        ref = next_logprobs(token, reference) if reference is not None else None
    return TeacherForced(nll, kl, len(ids) - split, prefill_s, decode_s)


def sample_text(n_sentences: int = 400, seed: int = 0) -> str:
    """Built-in prose for tests and smoke runs only; real evaluations pass a real text file."""
    sentences = essay_sentences(n_sentences, f"sample:{seed}")
    return "\n\n".join(" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6))
