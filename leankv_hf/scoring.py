"""Importance: which queries' attention becomes a stored token's score, and when.

A policy ranks tokens by score; a scorer decides what the score measures:

* `ObservationWindow` (SnapKV, the default): inside a prompt's own forward, its last ``window`` queries report the
  attention each token received; decode queries keep adding to it (a running mean). Cheap, and right when the
  question is at the end of the prompt. When it is not (a context compressed before the question exists: a chat's
  next turn, a document asked many questions, a reused prefix, a chunked prefill), it measures what the context's
  own end needs, and loses what a later question will need.
* `ContextReconstruction` (KVzip's idea, arXiv 2505.23416): question-agnostic. After each prompt (or prefill chunk) the
  cache re-reads it in a probe pass: the prompt's tokens again, teacher-forced (optionally behind a short
  instruction). To reproduce a token the model must attend to it, so a token's score is the most attention any
  re-reading query gave it (over the query heads of its KV head). The probe goes a chunk at a time; each chunk's
  queries attend to what the layer holds up to the chunk's end (after a long prompt: the exact prompt so far; in a
  chunked prefill: the compressed past and the current chunk) and to themselves. The pass runs the prompt's tokens
  once more through the model, and its keys and values are never stored.
* `KeyDiversity` (KeyDiff, arXiv 2504.15364): question-agnostic and cheap, with no extra pass. Inside a prompt's
  forward it scores every token from the prompt as a whole, not from its last window: a token whose key points away
  from the head's mean key is one that queries unlike the usual ones single out, so the score is ``1 - cos(k, mean
  key)``, normalized over the visible tokens like one query's attention; decode queries add theirs, as with the
  observation window.

Scores from a probe are maxima, so later observations fold in by ``max`` (`Scorer.reduce`); the observation window's
are means of attention per query, which LeanKV's thresholds (``alpha / context``) compare against.

The probe needs the model: a forward hook on the decoder (`attention.use_leankv_attention` installs it) hands it to
the cache right after a prompt's forward; the cache runs the probe, then compacts. Data still flows one way: attention -> scores -> policy
-> store.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .policy import share_budget

REDUCTIONS = ("mean", "max")


@dataclass(frozen=True)
class Scorer:
    """Base: how a token's score is measured. ``reduce`` folds new observations into it (see `store.fold_scores`)."""

    name = "base"
    reduce = "mean"
    probes = False  # whether scores come from a probe pass after a prompt's forward

    def queries(self, query_length: int) -> int:
        """How many of a forward's newest queries report their attention from inside it: here a decode step's, and a
        prompt is scored otherwise (`prompt_scores`, or a probe)."""
        return query_length if query_length == 1 else 0

    def prompt_scores(self, query, keys, real, visible, scale: float) -> torch.Tensor | None:
        """Scores of a prompt's tokens from the prompt as a whole (None: the scorer takes them otherwise):
        ``[B, Hkv, G, L]`` per query head, each a distribution over the ``visible[B, Hkv, L]`` ``keys[B, Hkv, L, D]``;
        ``query[B, Hq, Q, D]`` are the prompt's queries, ``real[B, Q]`` marks those that are not padding."""
        return None


@dataclass(frozen=True)
class ObservationWindow(Scorer):
    """The last ``window`` queries of each prompt score it; every decode query adds to the scores (mean)."""

    window: int = 32
    name = "window"

    def __post_init__(self):
        _positive_int("window", self.window)

    def queries(self, query_length: int) -> int:
        return min(self.window, query_length)


@dataclass(frozen=True)
class KeyDiversity(Scorer):
    """Question-agnostic scores without an extra pass: ``1 - cos(key, the head's mean key)`` over a prompt's visible
    tokens, normalized; decode queries add their attention (mean)."""

    name = "keydiff"

    def prompt_scores(self, query, keys, real, visible, scale: float) -> torch.Tensor:
        k = torch.nn.functional.normalize(keys.float(), dim=-1)
        k = k.masked_fill(~visible[..., None], 0)
        anchor = torch.nn.functional.normalize(k.sum(2, keepdim=True), dim=-1)
        apart = (1 - (k * anchor).sum(-1)).clamp_min(0).masked_fill(~visible, 0)  # [B, Hkv, L]
        shares = apart / apart.sum(-1, keepdim=True).clamp_min(torch.finfo(apart.dtype).tiny)
        return shares[:, :, None].expand(-1, -1, query.shape[1] // keys.shape[1], -1)


@dataclass(frozen=True)
class ContextReconstruction(Scorer):
    """Question-agnostic scores from re-reading each prompt (KVzip). ``chunk``: prompt tokens one probe forward
    re-reads and the cache then compacts; ``lookback``: the prompt tokens before those that it sees besides the
    sinks and the stored body (None: all of them). Re-reading a token finds its first reading nearby, so a bounded
    lookback keeps the pass linear in the prompt's length (its attention is ``chunk x (lookback + 2 chunk)`` per
    query head) where seeing everything makes it quadratic; with three needles per 2K tokens asked in turn, the
    whole view (``lookback=None``) found as many as the bounded one (eval/RESULTS.md, reuse). ``instruction``:
    token ids placed before the re-read tokens (e.g. the tokenization of "Repeat the previous context exactly.");
    empty: plain repetition. Decode queries fold in by max."""

    chunk: int = 256
    lookback: int | None = 256
    instruction: tuple[int, ...] = field(default=())
    name = "reconstruct"
    reduce = "max"
    probes = True

    def __post_init__(self):
        _positive_int("chunk", self.chunk)
        if self.lookback is not None:
            _positive_int("lookback", self.lookback)
        object.__setattr__(self, "instruction", tuple(self.instruction))
        if not all(isinstance(i, int) and i >= 0 for i in self.instruction):
            raise ValueError(f"instruction={self.instruction!r} must be token ids (ints >= 0)")

    @torch.inference_mode()
    def score(self, cache, decoder: torch.nn.Module, tokens: dict, attention_mask: torch.Tensor | None) -> None:
        """Re-read the pending tokens of every compressing layer of ``cache`` through ``decoder``, a chunk at a time,
        then let the layers compact them. ``tokens``: the forward's ``input_ids`` or ``inputs_embeds`` (its pending
        tokens are the last ones)."""
        layers = cache.pending_layers()
        first = layers[0]
        name, new = next(iter(tokens.items()))
        new = new[:, -first.pending :]
        batch, device = new.shape[0], new.device
        instruction = torch.tensor(self.instruction, dtype=torch.long, device=device).expand(batch, -1)
        if name == "inputs_embeds" and self.instruction:
            instruction = decoder.get_input_embeddings()(instruction)
        instructed = torch.ones(batch, len(self.instruction), dtype=torch.bool, device=device)
        real = (first.seen - first.padding)[:, None]  # real tokens so far per row: the probe's positions follow them
        mask = attention_mask
        start = first.keys.shape[-2] - first.pending
        for chunk in new.split(self.chunk, 1):
            stop = start + chunk.shape[1]
            valid = torch.cat([instructed, first.recent_valid[:, start:stop]], 1)
            inputs = torch.cat([instruction, chunk], 1)
            positions = real + (valid.cumsum(1) - 1).clamp(min=0)  # a row's padding takes no positions
            if attention_mask is not None:  # what the decoder's own masks (sliding layers) see: prompt, then probe
                mask = torch.cat([attention_mask, valid.to(attention_mask.dtype)], 1)
            first_read = 0 if self.lookback is None else max(start - self.lookback, 0)
            with cache.probing(Probe(start, stop, valid, first_read)):
                decoder(**{name: inputs}, position_ids=positions, attention_mask=mask, past_key_values=cache)
            start = stop
        share_budget(layers)
        for layer in layers:
            layer.settle()


@dataclass(frozen=True)
class Probe:
    """A probe forward in progress: it re-reads window tokens ``[start, stop)`` and sees those from ``first_read`` on
    (and the sinks); ``valid[B, P]`` marks its real tokens (instruction, and re-read tokens that are not padding)."""

    start: int
    stop: int
    valid: torch.Tensor
    first_read: int


SCORERS: dict[str, type[Scorer]] = {
    "window": ObservationWindow,
    "keydiff": KeyDiversity,
    "reconstruct": ContextReconstruction,
}


def make_scorer(spec: str | dict | Scorer, window: int = 32) -> Scorer:
    """A scorer from its name, a dict ``{"name": ..., option: value}``, or a `Scorer` as given. The observation
    window takes ``window`` unless the dict sets it."""
    if isinstance(spec, Scorer):
        return spec
    options = {"name": spec} if isinstance(spec, str) else dict(spec) if isinstance(spec, dict) else None
    if options is None or options.get("name") not in SCORERS:
        raise ValueError(
            f"scorer={spec!r}: choose one of {sorted(SCORERS)} (a name, or a dict with 'name' and options)"
        )
    cls = SCORERS[options.pop("name")]
    if cls is ObservationWindow:
        options.setdefault("window", window)
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"scorer {cls.name!r} takes {sorted(allowed) or 'no options'}, not {unknown}")
    return cls(**options)


def scorer_spec(scorer: Scorer) -> str | dict:
    """The YAML-friendly form `make_scorer` reads back: the name alone when the options are the defaults (the
    observation window's size lives in the cache's own ``window`` setting)."""
    if isinstance(scorer, ObservationWindow):
        return scorer.name
    changed = {f.name: getattr(scorer, f.name) for f in fields(scorer) if getattr(scorer, f.name) != f.default}
    changed = {name: list(value) if isinstance(value, tuple) else value for name, value in changed.items()}
    return {"name": scorer.name, **changed} if changed else scorer.name


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1")
