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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Cache, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ..timing import clock
from .base import Example
from .text import essay_sentences


class PerplexityTask:
    """``n_per_cell`` seeded, non-overlapping windows per length of the text in ``text`` (a file path)."""

    name = "perplexity"
    truncate = False

    def __init__(self, text: str | Path, lengths: Sequence[int] = (2048,), n_per_cell: int = 4, steps: int = 128):
        if any(steps >= length for length in lengths):
            raise ValueError(
                f"perplexity windows must be longer than the {steps} teacher-forced steps: {list(lengths)}"
            )
        self.text, self.lengths, self.n_per_cell, self.steps = Path(text), list(lengths), n_per_cell, steps

    def examples(self, tokenizer: PreTrainedTokenizerBase, seed: int) -> list[Example]:
        tokens = tokenizer(self.text.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
        out = []
        for length in self.lengths:
            starts = range(0, len(tokens) - length + 1, length)
            if not starts:
                raise ValueError(f"{self.text} has {len(tokens)} tokens, fewer than one {length}-token window")
            picked = sorted(
                random.Random(f"perplexity:{seed}:{length}").sample(starts, min(self.n_per_cell, len(starts)))
            )
            for start in picked:
                cut, end = start + length - self.steps, start + length
                context, question = tokenizer.decode(tokens[start:cut]), tokenizer.decode(tokens[cut:end])
                metadata = {"length": length, "offset": start}
                out.append(
                    Example(f"perplexity/L{length}/{start}", "perplexity", context, question, (), self.steps, metadata)
                )
        return out


@dataclass(frozen=True)
class TeacherForced:
    """Sums over the teacher-forced tokens of one window (divide by ``tokens`` for means)."""

    nll: float
    kl: float
    tokens: int
    prefill_s: float
    decode_s: float


def _stepwise_logprobs(
    model: PreTrainedModel, tokens: torch.Tensor, split: int, cache: Cache
) -> Iterator[tuple[torch.Tensor, float]]:
    """Prefill ``tokens[:, :split]``, then feed the rest but the last one token at a time; after each call,
    yield the next-token log-probs (float32 ``[vocab]``) and the seconds the call took."""
    device = model.device
    chunks = [tokens[:, :split], *(tokens[:, p : p + 1] for p in range(split, tokens.shape[1] - 1))]
    for chunk in chunks:
        start = clock(device)
        logits = model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        seconds = clock(device) - start
        yield torch.log_softmax(logits[0, -1].float(), dim=-1), seconds


@torch.inference_mode()
def reference_logprobs(model: PreTrainedModel, ids: list[int], split: int) -> torch.Tensor:
    """``[len(ids) - split, vocab]``: a full ``DynamicCache``'s log-probs at each teacher-forced step, computed once
    and reused against many caches (``teacher_forced(reference=...)``), as `leankv tune` does."""
    tokens = torch.tensor([ids], device=model.device)
    return torch.stack(
        [logp for logp, _ in _stepwise_logprobs(model, tokens, split, DynamicCache(config=model.config))]
    )


@torch.inference_mode()
def teacher_forced(
    model: PreTrainedModel,
    ids: list[int],
    split: int,
    cache: Cache,
    reference: Cache | torch.Tensor | None = None,
    after_prefill: Callable[[], None] | None = None,
) -> TeacherForced:
    """Prefill ``ids[:split]`` through ``cache``, then feed ``ids[split:]`` one token at a time, summing the NLL of
    each true token and, when a ``reference`` is given (a cache run in lockstep, or `reference_logprobs`),
    KL(reference || cache-run) at every step.

    Only the calls through ``cache`` are timed; ``after_prefill`` runs once the prefix is in the cache.
    """
    tokens = torch.tensor([ids], device=model.device)
    if isinstance(reference, Cache):
        references = (logp for logp, _ in _stepwise_logprobs(model, tokens, split, reference))
    else:
        references = iter(reference) if reference is not None else None
    nll = kl = prefill_s = decode_s = 0.0
    for step, (logp, seconds) in enumerate(_stepwise_logprobs(model, tokens, split, cache)):
        if step == 0:
            prefill_s = seconds
            if after_prefill is not None:
                after_prefill()
        else:
            decode_s += seconds
        nll -= logp[ids[split + step]].item()
        if references is not None:
            ref = next(references)
            kl += torch.sum(ref.exp() * (ref - logp)).item()
    return TeacherForced(nll, kl, len(ids) - split, prefill_s, decode_s)


def sample_text(n_sentences: int = 400, seed: int = 0) -> str:
    """Built-in prose for tests and smoke runs only; real evaluations pass a real text file."""
    sentences = essay_sentences(n_sentences, f"sample:{seed}")
    return "\n\n".join(" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6))
