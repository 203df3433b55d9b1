"""Tests for question-agnostic scoring (`scoring.ContextReconstruction`): the probe's scores against a reference computed
with transformers' eager attention, nothing of the probe stored, exactness at budget 1.0 on every architecture and
every way `generate` feeds a prompt (left padding, later turns, chunked prefill), and a context compressed before
its question still answering it on the embedded model where the observation window loses it; the cheap scorers
(`KeyDiversity`) against its definition, scoring a prompt without an extra pass."""

from __future__ import annotations

import pytest
import torch
from helpers import BATCH_PROMPTS, TINY_PROMPT, generate, lively
from transformers import DynamicCache

from leankv_hf import SparseHeadCache, UnifiedLeanCache
from leankv_hf.caches.layer import LeanLayer
from leankv_hf.policy import LAYER_FLOOR, layer_shares
from leankv_hf.scoring import (
    ContextReconstruction,
    KeyDiversity,
    ObservationWindow,
    make_scorer,
    scorer_spec,
)
from leankv_hf.testing import ARCHITECTURES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def lean_layers(cache) -> list[LeanLayer]:
    return [layer for layer in cache.layers if isinstance(layer, LeanLayer)]


def record_scores(monkeypatch) -> list[torch.Tensor]:
    """The window's scores of every layer when it compacts (right after the probe, before the policy ranks)."""
    seen = []
    compact = LeanLayer.compact

    def spy(self):
        seen.append(self.recent_scores.clone())
        compact(self)

    monkeypatch.setattr(LeanLayer, "compact", spy)
    return seen


@torch.inference_mode()
def reference_scores(
    model, ids: torch.Tensor, chunk: int, sink: int, lookback: int | None = None
) -> list[torch.Tensor]:
    """KVzip's scores from transformers' eager attention: the prompt in a DynamicCache; each chunk re-read after the
    prompt up to the chunk's end (its sinks, and the ``lookback`` tokens before it when given), at the positions that
    follow the whole prompt; a token's score is the most attention it gets from the re-reading queries (max over the
    query heads of its KV head) under a softmax over the sinks, the chunk and the re-reading tokens only."""
    model.set_attn_implementation("eager")
    n = ids.shape[1]
    heads = model.config.num_key_value_heads
    groups = model.config.num_attention_heads // heads
    prompt = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=prompt)
    scores = [torch.zeros(1, heads, n) for _ in range(model.config.num_hidden_layers)]
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        first = 0 if lookback is None else max(a - lookback, 0)
        seen = sorted(set(range(min(sink, b))) | set(range(first, b)))  # later chunks await their turn
        cache = DynamicCache(config=model.config)
        for i, layer in enumerate(prompt.layers):
            cache.update(layer.keys[:, :, seen].clone(), layer.values[:, :, seen].clone(), i)
        out = model(
            input_ids=ids[:, a:b],
            past_key_values=cache,
            position_ids=torch.arange(n, n + b - a)[None],
            output_attentions=True,
        )
        at = {token: column for column, token in enumerate(seen)}
        own = range(len(seen), len(seen) + b - a)
        columns = torch.tensor([at[t] for t in [*range(min(sink, a)), *range(a, b)]] + list(own))
        for i, probs in enumerate(out.attentions):
            kept = probs[0][:, :, columns]
            kept = kept / kept.sum(-1, keepdim=True)
            span = kept[:, :, min(sink, a) : min(sink, a) + b - a].view(heads, groups, b - a, b - a)
            scores[i][0, :, a:b] = span.amax((1, 2))
    model.set_attn_implementation("sdpa")
    return scores


@pytest.mark.parametrize("lookback", [None, 2, 40])
def test_probe_scores_match_eager_attention(tiny_tok, monkeypatch, lookback):
    model = lively("llama")
    ids = tiny_tok([TINY_PROMPT[:150]], return_tensors="pt").input_ids
    expected = reference_scores(model, ids, chunk=64, sink=4, lookback=lookback)
    seen = record_scores(monkeypatch)
    scorer = ContextReconstruction(chunk=64, lookback=lookback)
    cache = SparseHeadCache(model, budget=0.5, scorer=scorer, storage_dtype=torch.float32, recent=8)
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache)
    assert len(seen) == model.config.num_hidden_layers
    for got, want in zip(seen, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert all(0 < float(got.max()) <= 1 for got in seen)


def test_a_padded_row_scores_as_if_alone(tiny_tok, monkeypatch):
    """Left padding takes no part in a row's scores: neither as re-read tokens, nor as the probe's queries."""
    model = lively("llama")
    short, long = TINY_PROMPT[:60], TINY_PROMPT[:100]
    seen = record_scores(monkeypatch)
    for prompts in ([short], [long, short]):
        inputs = tiny_tok(prompts, return_tensors="pt", padding=True)
        positions = (inputs.attention_mask.cumsum(1) - 1).clamp(min=0)  # as generate gives them
        scorer = ContextReconstruction(chunk=256)  # one chunk: the same tokens re-read together
        cache = SparseHeadCache(model, budget=0.5, scorer=scorer, storage_dtype=torch.float32, recent=8)
        with torch.inference_mode():
            model(**inputs, position_ids=positions, past_key_values=cache)
    layers = model.config.num_hidden_layers
    alone, padded = seen[:layers], seen[layers:]
    n = alone[0].shape[-1]
    for want, got in zip(alone, padded, strict=True):
        assert bool((got[1, :, :-n] == 0).all())  # padding scores nothing
        torch.testing.assert_close(got[1:, :, -n:], want, rtol=1e-4, atol=1e-6)


def test_probe_stores_nothing_and_the_prompt_is_compressed(tiny_tok):
    model = lively("llama")
    ids = tiny_tok([TINY_PROMPT], return_tensors="pt").input_ids
    cache = SparseHeadCache(model, budget=0.25, scorer="reconstruct", recent=8)
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache)
    n = ids.shape[1]
    assert cache.get_seq_length() == n
    for layer in lean_layers(cache):
        assert layer.pending == 0 and layer.probe is None
        assert layer.keys.shape[-2] == 8  # the window after compaction: the probe's tokens are not in it
        assert (layer.kept_tokens().float().mean() <= -(-n // 4) + 1).all()
        positions = torch.cat([tier.positions for tier in layer.tiers])
        assert int(positions.max()) < n  # no stored row sits past the prompt


@pytest.mark.parametrize("scorer", ["reconstruct", "keydiff"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_full_budget_matches_dynamic_cache(arch, scorer, tiny_tok):
    model = lively(arch)
    inputs = tiny_tok(BATCH_PROMPTS, return_tensors="pt", padding=True)
    ref = generate(model, inputs, DynamicCache(config=model.config))
    for cache in (
        SparseHeadCache(model, budget=1.0, scorer=scorer, storage_dtype=torch.float32, recent=8, interval=4),
        UnifiedLeanCache(
            model,
            high=(16, 16),
            low=(16, 16),
            policy="adakv",
            scorer=scorer,
            buffer=8,
            interval=4,
            storage_dtype="float32",
        ),
    ):
        assert torch.equal(generate(model, inputs, cache), ref)


def test_later_turns_and_chunked_prefill(tiny_tok):
    """A context compressed before its question: the context alone, then context + question through generate
    (a later turn into a compressed cache), and a chunked prefill; each prompt is probed and compacted."""
    model = lively("llama")
    context = tiny_tok([TINY_PROMPT * 2], return_tensors="pt").input_ids
    question = tiny_tok([" What jumps over the dog?"], return_tensors="pt").input_ids
    ids = torch.cat([context, question], 1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ref = generate(model, inputs, DynamicCache(config=model.config))

    def exact():
        return SparseHeadCache(model, budget=1.0, scorer="reconstruct", storage_dtype=torch.float32, recent=8)

    cache = exact()
    with torch.inference_mode():
        model(input_ids=context, past_key_values=cache)
    assert torch.equal(generate(model, inputs, cache), ref)
    assert torch.equal(generate(model, inputs, exact(), prefill_chunk_size=64), ref)

    cache = SparseHeadCache(model, budget=0.25, scorer="reconstruct", recent=8)
    with torch.inference_mode():
        model(input_ids=context, past_key_values=cache)
    kept = cache.kept_tokens().float().mean()
    out = generate(model, inputs, cache)
    assert cache.get_seq_length() == out.shape[1] - 1
    assert cache.kept_tokens().float().mean() <= kept + question.shape[1] + 16


def test_key_diversity_favours_the_key_that_points_away():
    """`KeyDiversity`: ``1 - cos(key, mean key)`` over the visible keys, normalized, the same for a KV head's query
    heads; the odd key out scores most, an invisible one nothing."""
    keys = torch.tensor([[1.0, 0.1], [1.0, -0.1], [1.0, 0.0], [-1.0, 3.0], [0.0, 9.0]])[None, None]
    visible = torch.tensor([[[True, True, True, True, False]]])
    query = torch.randn(1, 2, 4, 2)
    got = KeyDiversity().prompt_scores(query, keys, torch.ones(1, 4, dtype=torch.bool), visible, 1.0)
    assert got.shape == (1, 1, 2, 5) and torch.equal(got[:, :, 0], got[:, :, 1])
    assert int(got[0, 0, 0].argmax()) == 3 and got[0, 0, 0, 4] == 0
    torch.testing.assert_close(got.sum(-1), torch.ones(1, 1, 2))


def test_key_diversity_compresses_a_prompt_with_no_extra_pass(tiny_tok, monkeypatch):
    """The cheap question-agnostic scorer scores a prompt inside its own forward (no probe: the model runs once),
    gives every real token a share, and the cache keeps its budget."""
    model = lively("llama")
    seen = record_scores(monkeypatch)
    calls = []
    model.get_decoder().register_forward_hook(lambda *args: calls.append(1))
    ids = tiny_tok([TINY_PROMPT * 3], return_tensors="pt").input_ids
    cache = SparseHeadCache(model, budget=0.25, scorer="keydiff", recent=8, gqa="mean")
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache)
    assert len(calls) == 1
    first = seen[0][0]  # [H, tokens] of the first layer, right after the prompt
    assert first.shape[-1] == ids.shape[1] and bool((first > 0).all())
    torch.testing.assert_close(first.sum(-1), torch.ones(first.shape[0]))  # one query's worth of attention
    assert float(cache.kept_tokens().float().mean()) <= ids.shape[1] / 4 + 1  # adakv: heads share a layer's budget


def test_a_model_without_the_hook_raises(tiny_tok):
    model = lively("llama")
    cache = SparseHeadCache(model, budget=0.5, scorer="reconstruct")
    model.get_decoder()._forward_hooks.clear()
    with pytest.raises(RuntimeError, match="use_leankv_attention"):
        generate(model, tiny_tok([TINY_PROMPT], return_tensors="pt"), cache, max_new_tokens=2)


@pytest.mark.parametrize(
    "build, named",
    [
        (lambda m: SparseHeadCache(m, scorer="kvzip"), "scorer='kvzip'"),
        (lambda m: SparseHeadCache(m, scorer={"name": "reconstruct", "chunks": 4}), r"\['chunks'\]"),
        (lambda m: SparseHeadCache(m, scorer={"name": "reconstruct", "chunk": 0}), "chunk=0"),
        (lambda m: SparseHeadCache(m, scorer={"name": "reconstruct", "lookback": -1}), "lookback=-1"),
        (lambda m: SparseHeadCache(m, policy="threshold", scorer="reconstruct"), "ranking policy"),
        (lambda m: SparseHeadCache(m, policy="quest", scorer="reconstruct"), "evicts nothing"),
        (lambda m: UnifiedLeanCache(m, group_size=16, scorer="reconstruct"), "ranking policy"),
        (lambda m: UnifiedLeanCache(m, group_size=16, policy="adakv", prune_ratio=0.8, low_ratio=0.2), "low_ratio=0.2"),
        (lambda m: UnifiedLeanCache(m, group_size=16, low_ratio=0.1), "low_ratio splits"),
        (lambda m: SparseHeadCache(m, budget_scope="model"), "budget_scope='model'"),
        (lambda m: SparseHeadCache(m, budget_scope="global"), "scorer='window'"),
        (lambda m: UnifiedLeanCache(m, policy="adakv", scorer="reconstruct", budget_scope="global"), "prune_ratio > 0"),
    ],
)
def test_bad_scorer_settings_raise_at_construction(build, named):
    with pytest.raises(ValueError, match=named):
        build(tiny_model("llama"))


def test_layer_shares_follow_the_models_best_scores():
    """`layer_shares`: per batch row, each layer keeps as many tokens as it holds of the model's best ``keep``,
    above a floor every layer keeps; a row's counts sum to ``keep``."""
    row = torch.tensor([0] * 4 + [1] * 4)
    sharp = (row, torch.tensor([0.9, 0.8, 0.7, 0.6, 0.1, 0.1, 0.1, 0.1]))  # row 0: the best tokens are here
    flat = (row, torch.tensor([0.1, 0.1, 0.1, 0.1, 0.9, 0.8, 0.7, 0.6]))  # row 1: here
    counts = torch.stack(layer_shares([sharp, flat], torch.tensor([4, 4])))  # [layers, B]
    floor = LAYER_FLOOR * 2  # the floor: LAYER_FLOOR of an equal part (2 of the 4)
    expected = torch.tensor([[floor + (1 - LAYER_FLOOR) * 4, floor], [floor, floor + (1 - LAYER_FLOOR) * 4]])
    torch.testing.assert_close(counts, expected)
    torch.testing.assert_close(counts.sum(0), torch.tensor([4.0, 4.0]))
    torch.testing.assert_close(
        torch.stack(layer_shares([sharp, sharp], torch.tensor([2, 8]))), torch.tensor([[1.0, 4.0]] * 2)
    )


@pytest.mark.parametrize("make", ["sparse", "unified"])
def test_a_global_budget_moves_tokens_between_layers_and_keeps_the_total(make, tiny_tok, tmp_path):
    """``budget_scope="global"``: after the probe, layers keep different numbers of tokens (their shares), the
    model keeps about what per-layer budgets keep, decode goes on, and a saved cache keeps its shares."""
    model = lively("llama")
    ids = tiny_tok([TINY_PROMPT * 3], return_tensors="pt").input_ids

    def build(scope):
        if make == "sparse":
            return SparseHeadCache(model, budget=0.3, scorer="reconstruct", recent=8, budget_scope=scope)
        return UnifiedLeanCache(
            model, policy="adakv", prune_ratio=0.7, scorer="reconstruct", buffer=8, group_size=16, budget_scope=scope
        )

    kept = {}
    for scope in ("layer", "global"):
        cache = build(scope)
        with torch.inference_mode():
            model(input_ids=ids, past_key_values=cache)
        kept[scope] = torch.stack([layer.kept_tokens().sum() for layer in lean_layers(cache)]).float()
    shares = torch.stack([layer.share for layer in lean_layers(cache)])
    # a multiple of an equal allowance each, not all equal (the pooled scores of this tiny model differ little
    # between layers: on one smollm2 prompt of 4K the shares spread from 0.27 to 2.33)
    assert bool((shares > LAYER_FLOOR).all()) and float(shares.std()) > 0.01
    assert abs(float(shares.mean()) - 1) < 0.05
    assert float(kept["global"].std()) > float(kept["layer"].std())
    assert abs(float(kept["global"].sum() - kept["layer"].sum())) <= 0.1 * float(kept["layer"].sum())
    token = ids[:, -1:]
    with torch.inference_mode():
        for _ in range(20):  # decode steps (past one compaction) keep each layer's share
            token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
    assert cache.get_seq_length() == ids.shape[1] + 20
    assert torch.equal(torch.stack([layer.share for layer in lean_layers(cache)]), shares)
    again = type(cache).from_pretrained(cache.save_pretrained(tmp_path / "ctx"), model=model)
    assert torch.equal(torch.stack([layer.share for layer in lean_layers(again)]), shares)


def test_layers_compete_with_the_scores_their_compactions_rank(tiny_tok):
    """`LeanLayer.competing` (what `share_budget` compares across layers) scores each token as the layer's
    compaction ranks it: pooled over neighbouring positions, so at least its own score, and more beside a
    better-scored token. Raw scores would credit a layer with one token where its compaction keeps several."""
    model = lively("llama")
    ids = tiny_tok([TINY_PROMPT * 3], return_tensors="pt").input_ids
    cache = UnifiedLeanCache(
        model, policy="adakv", prune_ratio=0.7, scorer="reconstruct", buffer=8, group_size=16, budget_scope="global"
    )
    with torch.inference_mode():
        token = model(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        for _ in range(6):  # tokens leave the window again: they compete beside the stored rows
            token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
    for layer in lean_layers(cache):
        candidates = layer._candidates()
        raw = candidates.scores[candidates.valid & ~candidates.sink]
        rows, scores = layer.competing()
        assert rows.shape == scores.shape == raw.shape and bool((rows == 0).all())
        assert bool((scores >= raw).all()) and bool((scores > raw).any())


def test_scorer_specs_round_trip():
    for scorer in (
        ObservationWindow(),
        ContextReconstruction(),
        ContextReconstruction(chunk=128, lookback=256, instruction=(5, 6)),
        ContextReconstruction(lookback=None),
    ):
        assert make_scorer(scorer_spec(scorer), window=32) == scorer
    assert scorer_spec(ContextReconstruction()) == "reconstruct"
    assert scorer_spec(ContextReconstruction(chunk=128)) == {"name": "reconstruct", "chunk": 128}


@pytest.mark.slow
def test_compressed_before_the_question_still_answers_on_smollm2(smollm2):
    """A pass key in filler, compressed to a tenth before the question arrives: the observation window keeps what
    the context's end needs and loses the key; the reconstruction scores keep it."""
    model, tok = smollm2
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    needle = "The pass key is 58213. Remember it. 58213 is the pass key. "
    head = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    context = tok(head + filler * 14 + needle + filler * 14, return_tensors="pt").input_ids
    question = tok("\nWhat is the pass key? The pass key is", add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([context, question], 1)
    answers = {}
    try:
        for scorer in ("window", "reconstruct"):
            cache = SparseHeadCache(model, budget=0.1, scorer=scorer)
            with torch.inference_mode():
                model(input_ids=context, past_key_values=cache)
            out = generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cache, max_new_tokens=6)
            answers[scorer] = tok.decode(out[0, ids.shape[1] :])
            assert cache.compression_ratio() > 4  # float32 model: 16-bit rows of a tenth of the tokens
    finally:
        model.set_attn_implementation("sdpa")
    assert "58213" in answers["reconstruct"] and "58213" not in answers["window"], answers
