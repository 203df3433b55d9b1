"""Run a task's examples through a model with each cache method and record one row per (method, example).

Greedy decoding, a fresh cache per example. Three settings:

* ``query_aware``: the whole prompt goes through ``model.generate``; a compressing cache sees the question.
* ``query_agnostic``: the context alone is prefilled first (compressing caches compress here, before the
  question exists), then ``generate`` gets the full prompt and feeds only the tokens the cache has not seen
  (``get_seq_length`` counts tokens seen, evicted ones included).
* ``reuse``: as ``query_agnostic``, then every follow-up question of the example is asked in turn on the same
  cache, each answer staying in it (a conversation about one compressed document). Each question is a row, its
  task suffixed with its place (``needle (question 2)``), so damage from earlier answers to later ones shows.

``prefill_chunk`` prefills N tokens per forward (compressing caches compact after each chunk); its rows carry the
method's name with `` [prefill chunk N]``.

Bytes are measured twice: right after the prompt (``prefill_cache_bytes``: a cache may hold everything until
it compacts) and at the end (``cache_bytes`` and ``dense_bytes``, measured together, giving ``ratio``: the
footprint the cache settles at, prompt and generated tokens included).

Rows are appended durably as they are produced (see ``results``), so an interrupted run resumes; under
``accelerate launch`` examples are sharded across processes and the main process merges and reports.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    Cache,
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..prefill import prefill
from . import results
from .methods import Spec, make_cache, method_label, parse_method
from .report import Summary, summarize, write_report
from .tasks.base import Example, ScoredTask, encode, truncate_middle
from .tasks.perplexity import PerplexityTask, teacher_forced
from .timing import clock

SETTINGS = ("query_aware", "query_agnostic", "reuse")


def _nbytes(cache: Cache) -> dict:
    """Stored bytes and the 16-bit ``DynamicCache`` bytes of the same tokens, measured together."""
    from leankv_hf.monitor import cache_nbytes, dense_nbytes

    return {"cache_bytes": cache_nbytes(cache), "dense_bytes": dense_nbytes(cache)}


class _PromptProbe(LogitsProcessor):
    """Called by ``generate`` at every step; the first call marks the end of the prompt's prefill, when the
    cache's bytes are measured (that measurement is excluded from the decode time)."""

    def __init__(self, cache: Cache, device: torch.device):
        self.cache, self.device = cache, device
        self.at: float | None = None
        self.prefill_cache_bytes = 0
        self.overhead = 0.0

    def mark(self) -> None:
        if self.at is not None:
            return
        self.at = clock(self.device)
        self.prefill_cache_bytes = _nbytes(self.cache)["cache_bytes"]
        self.overhead = time.perf_counter() - self.at

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.mark()
        return scores


@torch.inference_mode()
def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[int],
    split: int,
    cache: Cache,
    setting: str,
    max_new_tokens: int,
    prefill_chunk: int | None = None,
) -> dict:
    """One greedy answer to ``ids``; with ``setting="query_agnostic"`` its first ``split`` tokens (the context) are
    prefilled into the cache alone first. A cache already holding a prefix of ``ids`` continues it."""
    device = model.device
    tokens = torch.tensor([ids], device=device)
    probe = _PromptProbe(cache, device)
    start = clock(device)
    if setting == "query_agnostic":  # leave at least one token for generate to feed, even when the question is empty
        prefill(model, cache, tokens[:, : min(split, len(ids) - 1)], chunk_size=prefill_chunk)
    out = model.generate(
        input_ids=tokens,
        attention_mask=torch.ones_like(tokens),
        past_key_values=cache,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([probe]),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        prefill_chunk_size=prefill_chunk,
    )
    end = clock(device)
    new = out[0, len(ids) :]
    return {
        "output_ids": out[0].tolist(),
        "prediction": tokenizer.decode(new, skip_special_tokens=True),
        **_nbytes(cache),
        "prefill_cache_bytes": probe.prefill_cache_bytes,
        "prefill_s": probe.at - start,
        "decode_s": end - probe.at - probe.overhead,
        "decode_tokens": max(len(new) - 1, 0),
    }


def _perplexity(model: PreTrainedModel, ids: list[int], split: int, cache: Cache, spec: Spec) -> dict:
    probe = _PromptProbe(cache, model.device)
    reference = None if parse_method(spec).kind == "full" else DynamicCache(config=model.config)
    result = teacher_forced(model, ids, split, cache, reference=reference, after_prefill=probe.mark)
    return {
        "prediction": "",
        **_nbytes(cache),
        "prefill_cache_bytes": probe.prefill_cache_bytes,
        "prefill_s": result.prefill_s,
        "decode_s": result.decode_s,
        "decode_tokens": result.tokens - 1,
        "nll": result.nll,
        "kl": result.kl,
        "tokens": result.tokens,
        "score": result.nll / result.tokens,
    }


def evaluate_example(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: ScoredTask | PerplexityTask,
    example: Example,
    spec: Spec,
    setting: str,
    max_new_tokens: int | None = None,
    prefill_chunk: int | None = None,
) -> list[dict]:
    """Run ``example`` through a fresh ``spec`` cache and score it: one row, or with ``setting="reuse"`` one per
    question, asked in turn on the same cache."""
    ids, split = encode(tokenizer, example)
    limit = max_new_tokens or example.max_new_tokens
    context = getattr(model.config, "max_position_embeddings", None)
    if task.truncate and context:
        ids, split = truncate_middle(ids, split, context - limit)
    cache = make_cache(spec, model)
    if isinstance(task, PerplexityTask):
        return [_row(example, spec, setting, prefill_chunk, ids, _perplexity(model, ids, split, cache, spec))]
    asked = example.questions() if setting == "reuse" else [example]
    rows, mode = [], "query_aware" if setting == "query_aware" else "query_agnostic"
    for place, question in enumerate(asked, start=1):
        if place > 1:  # the conversation so far (with the last answer), then the next question
            ids = rows[-1]["output_ids"]
            ids, split = ids + tokenizer(question.question, add_special_tokens=False).input_ids, len(ids)
        measured = _generate(model, tokenizer, ids, split, cache, mode, limit, prefill_chunk)
        measured["score"] = task.score(question, measured["prediction"])
        rows.append(_row(question, spec, setting, prefill_chunk, ids, measured))
        mode = "query_aware"  # the cache holds the conversation: generate feeds the rest
        if len(asked) > 1:
            rows[-1]["task"] = f"{question.task} (question {place})"
    for row in rows:
        row.pop("output_ids", None)
    return rows


def _row(example: Example, spec: Spec, setting: str, prefill_chunk: int | None, ids: list[int], measured: dict):
    dense = measured["dense_bytes"]
    return {
        "task": example.task,
        "method": method_label(spec) + (f" [prefill chunk {prefill_chunk}]" if prefill_chunk else ""),
        "setting": setting,
        "id": example.id,
        "metadata": example.metadata,
        "answers": list(example.answers),
        "prompt_tokens": len(ids),
        **measured,
        "ratio": measured["cache_bytes"] / dense if dense else float("nan"),
        "finished_at": time.time(),
    }


def run_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: ScoredTask | PerplexityTask,
    methods: Sequence[Spec],
    out_dir: str | Path,
    limit: int | None = None,
    seed: int = 0,
    setting: str = "query_aware",
    max_new_tokens: int | None = None,
    state=None,
    prefill_chunk: int | None = None,
) -> Summary:
    """Evaluate every method on the task's first ``limit`` examples, resuming from the rows already in
    ``out_dir``; writes ``rows.jsonl``, ``summary.json``, ``summary.md`` and plots, and returns the summary. Each
    method's first example runs once more before it counts, untimed, so the times are a warm process's: a kernel's
    first call compiles it or loads it from numba's cache, which added 4-27 s to a first 2K PassKey prompt.

    ``state`` is an ``accelerate.PartialState`` (default: the current one): process K of N runs examples
    K, K+N, ... and the main process merges and reports once all are done.
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; valid: {', '.join(SETTINGS)}")
    for spec in methods:
        parse_method(spec)
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = results.shard_path(out_dir, state.process_index, state.num_processes)
    if state.is_main_process:
        results.remove_partial_files(out_dir)
    results.drop_partial_line(path)
    done = {results.row_key(row) for row in results.all_rows(out_dir)}
    examples = task.examples(tokenizer, seed)[:limit][state.process_index :: state.num_processes]
    suffix = f" [prefill chunk {prefill_chunk}]" if prefill_chunk else ""

    def finished(example: Example, spec: Spec) -> bool:
        asked = example.questions() if setting == "reuse" else [example]
        return all((method_label(spec) + suffix, setting, q.id) in done for q in asked)

    todo = [(e, s) for e in examples for s in methods if not finished(e, s)]
    warm = set()  # methods that ran once: one-time costs (compiling or loading kernels, a peer's first call) are paid
    for example, spec in tqdm(todo, desc=f"{task.name} ({setting})", disable=not state.is_local_main_process):
        run, label = (model, tokenizer, task, example, spec, setting, max_new_tokens, prefill_chunk), method_label(spec)
        if label not in warm:  # a method's first example runs once untimed, so they stay out of its times
            evaluate_example(*run)
            warm.add(label)
        torch.manual_seed(seed)
        results.append_rows(path, evaluate_example(*run))
    state.wait_for_everyone()
    if state.is_main_process:
        summary = write_report(results.merge_shards(out_dir), out_dir)
    state.wait_for_everyone()
    return summary if state.is_main_process else summarize(results.all_rows(out_dir))
