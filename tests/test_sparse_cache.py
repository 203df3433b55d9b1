"""Tests for `SparseHeadCache`: lossless at budget 1.0, real memory release, per-head budgets, sinks and recent
window kept, padding never kept, bounded long generation, every policy, every way `generate` drives it, and the
query-aware `quest` policy (nothing evicted, fewer keys attended)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BATCH_PROMPTS, GREEDY, TINY_PROMPT, generate, lively
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from leankv_hf.caches.hetero import SlidingHeteroLayer
from leankv_hf.caches.layer import LeanLayer
from leankv_hf.caches.sparse import SparseHeadCache
from leankv_hf.testing import ARCHITECTURES, tiny_model

POLICIES = ("snapkv", "adakv", "h2o", "streaming", "pyramid", "chunkkv", "threshold")  # the evicting ones


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smol(smollm2):
    """The session's SmolLM2; SparseHeadCache switches it to 'leankv' attention, switched back afterwards."""
    yield smollm2
    smollm2[0].set_attn_implementation("sdpa")


@pytest.fixture(scope="module")
def passkey_ids(smol):
    return smol[1](open("eval/data/passkey_2k.txt").read(), return_tensors="pt").input_ids


def lean_layers(cache) -> list[LeanLayer]:
    return [layer for layer in cache.layers if isinstance(layer, LeanLayer)]


def stored_positions(layer: LeanLayer, b: int, h: int) -> list[int]:
    """Absolute positions of the rows that (batch b, head h) holds in its tiers."""
    heads = layer.keys.shape[1]
    out = []
    for tier in layer.tiers:
        if tier.rows:
            out += tier.positions[tier.segments() == b * heads + h].tolist()
    return sorted(out)


def recent_positions(layer: LeanLayer) -> list[int]:
    window = layer.keys.shape[-2]
    return list(range(layer.seen - window, layer.seen))


# --------------------------------------------------------------------------- budget 1.0: exactly a DynamicCache


@pytest.mark.parametrize("policy", POLICIES + ("quest",))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_full_budget_matches_dynamic_cache_on_tiny_models(arch, policy, tiny_tok):
    model = lively(arch)
    inputs = tiny_tok([TINY_PROMPT], return_tensors="pt")
    cache = SparseHeadCache(
        model, budget=1.0, storage_dtype=torch.float32, policy=policy, recent=8, window=8, interval=4
    )
    assert model.config._attn_implementation == "leankv"
    out = generate(model, inputs, cache, max_new_tokens=24)
    ref = generate(model, inputs, DynamicCache(config=model.config), max_new_tokens=24)  # untagged: plain sdpa
    assert len(set(ref[0, -24:].tolist())) > 3  # a real continuation, not one token repeated
    assert torch.equal(out, ref)
    seen = out.shape[1] - 1
    assert cache.get_seq_length() == seen
    assert (cache.kept_tokens() == seen).all()  # nothing evicted
    assert all(sum(t.rows for t in layer.tiers) > 0 for layer in lean_layers(cache))  # the body path was used


@pytest.mark.parametrize("policy", ["pyramid", "chunkkv"])
def test_full_budget_keeps_everything_with_default_settings(policy, tiny_tok):
    """Regression: pyramid gave upper layers 0.4x of budget=1.0 and chunkkv dropped chunks straddling the sinks,
    so both evicted at budget 1.0 (here with the default window, recent 32 and interval 16)."""
    model = lively("llama")
    inputs = tiny_tok([TINY_PROMPT], return_tensors="pt")
    cache = SparseHeadCache(model, budget=1.0, storage_dtype=torch.float32, policy=policy)
    out = generate(model, inputs, cache, max_new_tokens=40)
    ref = generate(model, inputs, DynamicCache(config=model.config), max_new_tokens=40)
    assert (cache.kept_tokens() == out.shape[1] - 1).all()
    assert torch.equal(out, ref)


def test_pyramid_lower_layers_keep_more_and_the_mean_is_the_budget(tiny_tok):
    model = lively("llama")
    ids = tiny_tok(TINY_PROMPT * 2, return_tensors="pt").input_ids  # 366 tokens
    cache = SparseHeadCache(model, budget=0.5, policy="pyramid")
    with torch.no_grad():
        model(ids, past_key_values=cache)
    per_layer = cache.kept_tokens().float().mean((1, 2)).tolist()
    assert per_layer == sorted(per_layer, reverse=True) and per_layer[0] > 1.5 * per_layer[-1]
    assert abs(sum(per_layer) / len(per_layer) - math.ceil(0.5 * ids.shape[1])) <= 0.5


@pytest.mark.parametrize("policy", ["adakv", "quest"])
def test_full_budget_matches_dynamic_cache_on_smollm2(policy, smol):
    model, tok = smol
    inputs = tok(
        "The three primary colors are red, yellow and blue. The three secondary colors are", return_tensors="pt"
    )
    cache = SparseHeadCache(
        model, budget=1.0, storage_dtype=torch.float32, policy=policy, recent=4, window=4, interval=2
    )
    assert model.config._attn_implementation == "leankv"
    out = generate(model, inputs, cache, max_new_tokens=8)
    assert torch.equal(out, generate(model, inputs, DynamicCache(config=model.config), max_new_tokens=8))
    assert (cache.kept_tokens() == out.shape[1] - 1).all()


# --------------------------------------------------------------------------- memory: pruned tokens leave


def kept_bytes_bounds(cache, itemsize: int) -> tuple[int, int]:
    """(lower, upper) bounds on nbytes from kept_tokens(): every kept token holds K and V at the model dtype;
    a stored row adds 7 B (int32 position, fp16 score, uint8 age), a recent-window token 5 B per head (fp32
    score, uint8 age) and 1 B per batch row (valid). Upper bound: one 4 KiB page per (layer, batch, head) of slack
    for the small per-head/per-layer tensors (counts, padding)."""
    kept = cache.kept_tokens()
    dim = lean_layers(cache)[0].keys.shape[-1]
    payload = int(kept.sum()) * 2 * dim * itemsize
    return payload, payload + int(kept.sum()) * 7 + kept.numel() * 4096


def test_pruned_tokens_leave_memory_on_smollm2(smol, passkey_ids):
    model, _ = smol
    ids = passkey_ids[:, :600]
    nbytes = {}
    for budget in (0.25, 1.0):
        cache = SparseHeadCache(model, budget=budget)
        # 4 new tokens: prefill (compaction) + 3 decode steps, before the next compaction (recent + interval)
        out = generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cache, max_new_tokens=4)
        assert cache.get_seq_length() == out.shape[1] - 1 == 603
        kept = cache.kept_tokens()
        assert kept.shape == (30, 1, 3)
        if budget == 0.25:
            # each layer's heads share math.ceil(0.25 * 600) = 150 tokens on average, plus the 3 decode steps
            assert kept.float().mean(-1).flatten().tolist() == [153.0] * 30
        lower, upper = kept_bytes_bounds(cache, 2)  # kept tokens are held at 16 bits
        assert lower <= cache.nbytes() <= upper, (lower, cache.nbytes(), upper)
        nbytes[budget] = cache.nbytes()
    assert nbytes[0.25] < 0.35 * nbytes[1.0], nbytes


def documented_nbytes(cache) -> int:
    """Exact bytes of a SparseHeadCache per the layout LeanLayer/RaggedStore document: per stored row K and V
    plus int32 position, fp16 score, uint8 age; per tier int64 counts[B, H] and the padded layout's int64 first
    row, row count and first slot per (batch, head), plus its int64 row total per (batch, head) (see
    `PaddedLayout`); the recent window's K and V plus
    fp32 score and uint8 age per (batch, head, token) and a bool valid per (batch, token); int64 padding[B]."""
    total = 0
    for layer in lean_layers(cache):
        batch, heads, recent, dim = layer.keys.shape
        itemsize = layer.keys.element_size()
        rows = sum(tier.rows for tier in layer.tiers)
        total += rows * (2 * dim * itemsize + 4 + 2 + 1) + (4 * len(layer.tiers) + 1) * batch * heads * 8
        total += batch * heads * recent * (2 * dim * itemsize + 4 + 1) + batch * recent + batch * 8
    return total


def test_nbytes_is_exactly_the_documented_layout(tiny_tok):
    model = lively("llama")
    ids = tiny_tok(TINY_PROMPT * 2, return_tensors="pt").input_ids
    for budget in (0.25, 1.0):
        cache = SparseHeadCache(model, budget=budget)
        # 4 new tokens: prefill (compaction) + 3 decode steps, before the next compaction (recent + interval)
        generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cache, max_new_tokens=4)
        assert cache.nbytes() == documented_nbytes(cache)


def test_pruned_tokens_leave_memory_right_after_prefill(tiny_tok):
    """Regression: the recent window left by the prefill compaction must not be a view pinning the whole prompt."""
    model = lively("llama")
    ids = tiny_tok(TINY_PROMPT * 2, return_tensors="pt").input_ids
    cache = SparseHeadCache(model, budget=0.25)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=dense)
    lower, upper = kept_bytes_bounds(cache, 2)  # kept tokens are held at 16 bits
    assert cache.nbytes() < 0.5 * dense_bytes(dense)
    assert lower <= cache.nbytes() <= upper, (lower, cache.nbytes(), upper)


def dense_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("policy", ["adakv", "threshold"])
def test_heads_keep_different_counts_on_smollm2(policy, smol, passkey_ids):
    model, _ = smol
    ids = passkey_ids[:, :300]
    # threshold alone (budget 1.0): its survivors are capped by the budget, which would make heads uniform
    cache = SparseHeadCache(model, budget=0.3 if policy == "adakv" else 1.0, policy=policy)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    kept = cache.kept_tokens()
    assert (kept < 300).any()  # something was evicted
    per_layer_spread = kept.amax(-1) - kept.amin(-1)  # [layers, batch]
    # measured: adakv 30/30 layers uneven; threshold (alpha 0.02 prunes little: most heads keep all 300) 12/30
    assert (per_layer_spread > 0).float().mean() > 0.25, kept.squeeze(1).tolist()
    if policy == "adakv":  # uneven per head, but the layer's total is the budget
        assert kept.float().mean(-1).flatten().tolist() == [math.ceil(0.3 * 300)] * 30


# --------------------------------------------------------------------------- positions, sinks, recent window


def test_seq_length_and_positions_after_eviction(tiny_tok):
    model = lively("llama")
    inputs = tiny_tok([TINY_PROMPT], return_tensors="pt")
    cache = SparseHeadCache(model, budget=0.5, policy="streaming", recent=8, sink=4, interval=4)
    generate(model, inputs, cache, max_new_tokens=40)
    dynamic = DynamicCache(config=model.config)
    generate(model, inputs, dynamic, max_new_tokens=40)
    # every token generate fed (prompt + new tokens but the last, which was only sampled) counts, evicted or not
    seen = inputs.input_ids.shape[1] + 40 - 1
    assert cache.get_seq_length() == dynamic.get_seq_length() == seen
    assert int(cache.kept_tokens().max()) < seen
    for layer in lean_layers(cache):
        for h in range(layer.keys.shape[1]):
            body = stored_positions(layer, 0, h)
            # streaming: the 4 sinks, then the newest tokens right before the recent window, in one run
            assert body[:4] == [0, 1, 2, 3]
            first_recent = recent_positions(layer)[0]
            assert body[4:] == list(range(first_recent - len(body) + 4, first_recent))


def test_sinks_and_recent_window_are_never_evicted(tiny_tok):
    model = lively("llama")
    more = tiny_tok("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 4, return_tensors="pt").input_ids
    ids = more[:, :200]
    cache = SparseHeadCache(model, budget=16, recent=8, sink=4, interval=4, storage_dtype=torch.float32)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    dynamic = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=dynamic)  # same prefill attention (nothing evicted yet when it ran)
    for i, layer in enumerate(lean_layers(cache)):
        assert layer.seen == 200
        assert recent_positions(layer) == list(range(192, 200))
        torch.testing.assert_close(layer.keys, dynamic.layers[i].keys[:, :, -8:])  # the last 8 tokens, exact
        torch.testing.assert_close(layer.values, dynamic.layers[i].values[:, :, -8:])
        for h in range(layer.keys.shape[1]):
            body = stored_positions(layer, 0, h)
            assert body[:4] == [0, 1, 2, 3]
            assert all(p < 192 for p in body)
    assert int(cache.kept_tokens().max()) <= 16 + 8  # adakv moves budget between heads; the layer mean is 16
    assert cache.kept_tokens().float().mean(-1).flatten().tolist() == [16.0] * 4

    more = more[:, :201]  # generate feeds what the cache has not seen: one more prompt token
    out = model.generate(more, attention_mask=torch.ones_like(more), past_key_values=cache, max_new_tokens=30, **GREEDY)
    for layer in lean_layers(cache):
        assert layer.seen == out.shape[1] - 1
        for h in range(layer.keys.shape[1]):
            assert stored_positions(layer, 0, h)[:4] == [0, 1, 2, 3]
        assert recent_positions(layer)[-1] == layer.seen - 1 and layer.keys.shape[-2] >= 8


def test_int_budget_includes_recent_window_and_sinks(tiny_tok):
    """An int budget counts the recent window and the sinks: one too small for them is refused, and one that
    fits them is a per-head cap (snapkv: no sharing between heads)."""
    model = lively("llama")
    with pytest.raises(ValueError, match="budget=16"):
        SparseHeadCache(model, budget=16)  # recent 32 + sink 4 do not fit
    ids = tiny_tok(TINY_PROMPT, return_tensors="pt").input_ids
    cache = SparseHeadCache(model, budget=40, policy="snapkv")
    with torch.no_grad():
        model(ids, past_key_values=cache)
    assert (cache.kept_tokens() == 40).all()


# --------------------------------------------------------------------------- generate: batches, beams, turns


def test_left_padded_batch(tiny_tok):
    model = lively("llama")
    inputs = tiny_tok(BATCH_PROMPTS, return_tensors="pt", padding=True)
    pads = (inputs.attention_mask == 0).sum(1)
    assert (pads > 0).sum() == 3
    cache = SparseHeadCache(model, budget=0.5, policy="adakv", recent=8, window=8, sink=4, interval=4)
    out = generate(model, inputs, cache, max_new_tokens=24)
    assert out.shape == (4, inputs.input_ids.shape[1] + 24)
    real = inputs.input_ids.shape[1] + 23 - pads  # real tokens each row has seen
    for layer in lean_layers(cache):
        assert layer.padding.tolist() == pads.tolist()
        assert layer.recent_valid.all()  # the prompt (and its padding) has left the 8-token window
        for b in range(4):
            kept = layer.kept_tokens()[b]
            assert (kept < real[b]).all()  # eviction happened in every row
            for h in range(layer.keys.shape[1]):
                body = stored_positions(layer, b, h)
                assert min(body) >= pads[b]  # padding is never kept
                assert body[:4] == list(range(pads[b], pads[b] + 4))  # the sinks are the first real tokens
    ref = generate(model, inputs, DynamicCache(config=model.config), max_new_tokens=24)
    full = generate(
        model,
        inputs,
        SparseHeadCache(model, budget=1.0, storage_dtype=torch.float32, recent=8, window=8, interval=4),
        max_new_tokens=24,
    )
    assert torch.equal(full, ref)


def test_beam_search(tiny_tok):
    model = lively("llama")
    inputs = tiny_tok([TINY_PROMPT[:100]], return_tensors="pt")
    beams = dict(num_beams=2, num_return_sequences=2, max_new_tokens=20, early_stopping=True)
    ref = generate(model, inputs, DynamicCache(config=model.config), **beams)
    out = generate(
        model,
        inputs,
        SparseHeadCache(model, budget=1.0, storage_dtype=torch.float32, recent=8, window=8, interval=4),
        **beams,
    )
    assert not torch.equal(out[0], out[1])
    assert torch.equal(out, ref)
    cache = SparseHeadCache(model, budget=0.5, recent=8, window=8, interval=4)
    out = generate(model, inputs, cache, **beams)
    assert out.shape == (2, inputs.input_ids.shape[1] + 20)
    assert int(cache.kept_tokens().max()) < cache.get_seq_length()


def _two_turns(model, tok, cache):
    first = tok([TINY_PROMPT[:90]], return_tensors="pt")
    out = generate(model, first, cache, max_new_tokens=12)
    follow = tok([" And then what happened next?"], return_tensors="pt").input_ids
    ids = torch.cat([out, follow], 1)
    return generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cache, max_new_tokens=12)


def test_multi_turn(tiny_tok):
    model = lively("llama")
    ref = _two_turns(model, tiny_tok, DynamicCache(config=model.config))
    full = SparseHeadCache(model, budget=1.0, storage_dtype=torch.float32, recent=8, window=8, interval=4)
    assert torch.equal(_two_turns(model, tiny_tok, full), ref)
    cache = SparseHeadCache(model, budget=0.5, recent=8, window=8, interval=4)
    out = _two_turns(model, tiny_tok, cache)
    assert cache.get_seq_length() == out.shape[1] - 1
    kept = cache.kept_tokens().float().mean(-1)
    assert (kept <= math.ceil(0.5 * cache.get_seq_length()) + 4).all()  # the second turn was compressed too


class _Recorder(LogitsProcessor):
    """Samples the cache after every forward of generate (a logits processor runs once per step)."""

    def __init__(self, cache):
        self.cache, self.kept, self.nbytes = cache, [], []

    def __call__(self, input_ids, scores):
        self.kept.append(self.cache.kept_tokens())
        self.nbytes.append(self.cache.nbytes())
        return scores


def test_long_generation_stays_bounded(tiny_tok):
    model = lively("llama")
    inputs = tiny_tok([TINY_PROMPT[:120]], return_tensors="pt")
    cache = SparseHeadCache(model, budget=64)  # recent 32, interval 16
    rec = _Recorder(cache)
    out = generate(
        model, inputs, cache, max_new_tokens=1000, min_new_tokens=1000, logits_processor=LogitsProcessorList([rec])
    )
    assert out.shape[1] == inputs.input_ids.shape[1] + 1000 == cache.get_seq_length() + 1
    kept = torch.stack(rec.kept)  # [steps, layers, batch, heads]
    # adakv moves tokens between the heads of a layer: the per-layer mean is the per-head budget
    per_layer = kept.float().mean(-1)
    assert per_layer.max() <= 64 + 16
    assert per_layer[-16:].min() >= 64  # and it is used, not under-filled
    assert rec.nbytes[-1] < 1.3 * rec.nbytes[99]
    assert max(rec.nbytes[100:]) < 1.3 * rec.nbytes[99]


def test_gemma3_sliding_layers_stay_windows(tiny_tok):
    model = lively("gemma3")
    cache = SparseHeadCache(model, budget=0.5, recent=8, window=8, interval=4)
    assert [type(layer) for layer in cache.layers] == [SlidingHeteroLayer] * 5 + [LeanLayer]
    inputs = tiny_tok([TINY_PROMPT], return_tensors="pt")
    out = generate(model, inputs, cache, max_new_tokens=30)
    seen = out.shape[1] - 1
    assert cache.get_seq_length() == seen
    window = cache.layers[0]
    assert window.store.length + window.keys.shape[-2] == 15  # the sliding layers kept their window only
    assert cache.kept_tokens().shape == (1, 1, 2)
    assert cache.kept_tokens().float().mean() <= math.ceil(0.5 * seen) + 4


def test_gemma3_pyramid_mean_budget_over_compressed_layers(tiny_tok):
    model = lively("gemma3")
    cache = SparseHeadCache(model, budget=0.5, policy="pyramid", recent=8, window=8, interval=4)
    inputs = tiny_tok([TINY_PROMPT], return_tensors="pt")
    with torch.no_grad():
        model(**inputs, past_key_values=cache)
    # the only compressed layer is the last of 6, but the first of 1: it gets the whole budget, not 0.4x of it
    assert cache.kept_tokens().float().mean() == math.ceil(0.5 * inputs.input_ids.shape[1])


def test_other_attention_implementation_raises(tiny_tok):
    model = lively("llama")
    cache = SparseHeadCache(model, budget=0.5)
    model.set_attn_implementation("sdpa")
    inputs = tiny_tok([TINY_PROMPT], return_tensors="pt")
    with pytest.raises(RuntimeError, match="'leankv'"):
        generate(model, inputs, cache, max_new_tokens=4)


# --------------------------------------------------------------------------- validation and policies


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(budget=0), "budget=0"),
        (dict(budget=1.5), "budget=1.5"),
        (dict(budget=-3), "budget=-3"),
        (dict(policy="nope"), r"'nope'.*adakv.*snapkv"),
        (dict(window=0), "window=0"),
        (dict(gqa="min"), "gqa='min'"),
        (dict(policy="snapkv", floor=0.1), r"floor"),
        (dict(policy="pyramid", beta=0.0), r"beta=0\.0"),
        (dict(policy="quest", page_size=0), "page_size=0"),
    ],
)
def test_bad_settings_raise_at_construction(kwargs, named):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=named):
        SparseHeadCache(model, **kwargs)
    assert model.config._attn_implementation == "sdpa"  # nothing switched on failure


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_respects_the_budget(policy, tiny_tok):
    model = lively("llama")
    inputs = tiny_tok([TINY_PROMPT + "and more text to read."], return_tensors="pt")
    cache = SparseHeadCache(model, budget=0.3, policy=policy)
    out = generate(model, inputs, cache, max_new_tokens=30, min_new_tokens=30)
    seen = out.shape[1] - 1
    assert cache.get_seq_length() == seen
    kept = cache.kept_tokens().float()
    # per head on average (pyramid: over layers too, as its layers get unequal shares by design)
    means = [kept.mean()] if policy == "pyramid" else kept.mean(-1).flatten()
    for mean in means:
        assert mean <= math.ceil(0.3 * seen) + 32 + 16
        assert mean < 0.6 * seen  # really evicted


# --------------------------------------------------------------------------- quest: evicts nothing, attends fewer keys


def page_bounds(keys: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise min and max of ``keys[T, D]`` per page of ``size`` tokens, recomputed from scratch."""
    pages = torch.split(keys, size)
    return torch.stack([p.amin(0) for p in pages]), torch.stack([p.amax(0) for p in pages])


def assert_page_bounds_match_the_store(layer: LeanLayer, size: int = 16) -> None:
    tier, heads = layer.tiers[0], layer.keys.shape[1]
    for segment, keys in enumerate(torch.split(tier.keys, tier.counts.flatten().tolist())):
        b, h = divmod(segment, heads)
        low, high = page_bounds(keys, size)
        assert torch.equal(layer.page_low[b, h, : len(low)], low)
        assert torch.equal(layer.page_high[b, h, : len(high)], high)


def record_widths(monkeypatch) -> list[tuple[int, int, int, int]]:
    """(tokens seen, exact window, stored tokens per head, keys in the body view) for every decode-time body view."""
    widths = []
    original = LeanLayer.body_view

    def spy(self, dtype, query=None, fused=False):
        view = original(self, dtype, query, fused)
        if query is not None and query.shape[2] == 1 and view is not None:
            widths.append((self.seen, self.keys.shape[-2], int(self.tiers[0].counts.max()), view.valid.shape[2]))
        return view

    monkeypatch.setattr(LeanLayer, "body_view", spy)
    return widths


def test_quest_attends_only_the_pages_its_budget_allows(tiny_tok, monkeypatch):
    model = lively("llama")
    inputs = tiny_tok([TINY_PROMPT * 2], return_tensors="pt")  # 366 tokens
    widths = record_widths(monkeypatch)
    cache = SparseHeadCache(model, budget=0.25, policy="quest")  # recent 32, sink 4, pages of 16
    out = generate(model, inputs, cache, max_new_tokens=24)
    assert (cache.kept_tokens() == out.shape[1] - 1).all()  # nothing evicted: a speed policy
    assert len(widths) == 23 * 4  # every decode step of every layer
    for seen, window, stored, width in widths:
        # the budget counts the exact window: ceil(0.25 * seen) - window tokens from the body, in whole pages
        pages = math.ceil((math.ceil(0.25 * seen) - window) / 16)
        assert width == 16 * pages < 0.35 * stored


def test_quest_always_attends_the_sinks_page(tiny_tok, monkeypatch):
    """A budget smaller than the recent window still leaves the sinks attended (their page, 16 keys)."""
    model = lively("llama")
    widths = record_widths(monkeypatch)
    generate(
        model, tiny_tok([TINY_PROMPT * 2], return_tensors="pt"), SparseHeadCache(model, budget=0.01, policy="quest")
    )
    assert [width for *_, width in widths] == [16] * 15 * 4


def test_quest_view_holds_the_pages_with_the_highest_bounds(tiny_tok):
    """The gathered view is exactly the stored keys of the top pages, ranked from bounds recomputed from scratch
    (incremental bounds, page choice and gather all checked against a brute-force reference)."""
    model = lively("llama")
    inputs = tiny_tok([TINY_PROMPT * 2], return_tensors="pt")
    cache = SparseHeadCache(model, budget=0.25, policy="quest")
    generate(model, inputs, cache, max_new_tokens=24)
    torch.manual_seed(0)
    query = torch.randn(1, 4, 1, 16)  # 4 query heads, 2 per KV head
    for layer in lean_layers(cache):
        assert_page_bounds_match_the_store(layer)
        view, full = layer.body_view(torch.float32, query), layer.body_view(torch.float32)
        keys, values, valid = view.full_keys(), view.values.dense(), view.valid
        full_keys, full_values = full.full_keys(), full.values.dense()
        pages = math.ceil((math.ceil(0.25 * layer.seen) - layer.keys.shape[-2]) / 16)
        for h in range(2):
            low, high = page_bounds(full_keys[0, h], 16)
            q = query[0, 2 * h : 2 * h + 2, 0]  # [2, D]
            bound = torch.maximum(q[:, None] * low, q[:, None] * high).sum(-1).amax(0)
            bound[0] = torch.inf  # the sinks' page
            top = bound.topk(pages).indices.sort().values
            ranks = (top[:, None] * 16 + torch.arange(16)).flatten()
            ranks = ranks[ranks < full_keys.shape[2]]
            assert torch.equal(keys[0, h][valid[0, h]], full_keys[0, h, ranks])
            assert torch.equal(values[0, h][valid[0, h]], full_values[0, h, ranks])


def test_quest_page_bounds_are_updated_incrementally(tiny_tok, monkeypatch):
    """Only the tokens entering the store are folded into the bounds: the prompt's once, then each interval's."""
    added = []
    original = LeanLayer._add_to_pages

    def spy(self, keys, segments, ranks):
        added.append(keys.shape[0])
        return original(self, keys, segments, ranks)

    monkeypatch.setattr(LeanLayer, "_add_to_pages", spy)
    model = lively("llama")
    inputs = tiny_tok([TINY_PROMPT], return_tensors="pt")  # 183 tokens
    cache = SparseHeadCache(model, budget=0.25, policy="quest", interval=16)  # recent 32, 2 KV heads
    generate(model, inputs, cache, max_new_tokens=40)
    prompt, heads = inputs.input_ids.shape[1], 2
    # per layer: the prefill's exits, then two compactions of 16 tokens (at 48 and 64 tokens in the window)
    assert added == [(prompt - 32) * heads] * 4 + [16 * heads] * 8
    for layer in lean_layers(cache):
        assert_page_bounds_match_the_store(layer)
        assert layer.page_low.shape[2] == math.ceil((prompt + 32 - 32) / 16)


def test_quest_left_padded_batch(tiny_tok, monkeypatch):
    model = lively("llama")
    inputs = tiny_tok(BATCH_PROMPTS, return_tensors="pt", padding=True)
    pads = (inputs.attention_mask == 0).sum(1)
    widths = record_widths(monkeypatch)
    cache = SparseHeadCache(model, budget=0.5, policy="quest", recent=8, window=8, sink=4, interval=4, page_size=4)
    out = generate(model, inputs, cache, max_new_tokens=24)
    assert out.shape == (4, inputs.input_ids.shape[1] + 24)
    real = inputs.input_ids.shape[1] + 23 - pads
    assert torch.equal(cache.kept_tokens()[:, :, 0], real.expand(4, -1))  # every real token, no padding
    for layer in lean_layers(cache):
        assert_page_bounds_match_the_store(layer, size=4)
        for b in range(4):
            assert stored_positions(layer, b, 0)[0] == pads[b]
    assert all(width < stored for *_, stored, width in widths[-4:])
    ref = generate(model, inputs, DynamicCache(config=model.config), max_new_tokens=24)
    full = SparseHeadCache(
        model, budget=1.0, storage_dtype=torch.float32, policy="quest", recent=8, window=8, interval=4, page_size=4
    )
    assert torch.equal(generate(model, inputs, full, max_new_tokens=24), ref)


def test_quest_nbytes_counts_every_token_and_the_page_bounds(tiny_tok):
    model = lively("llama")
    ids = tiny_tok(TINY_PROMPT * 2, return_tensors="pt").input_ids
    cache = SparseHeadCache(model, budget=0.25, policy="quest")
    generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cache, max_new_tokens=4)
    bounds = sum(2 * layer.page_low.numel() * layer.page_low.element_size() for layer in lean_layers(cache))
    assert bounds > 0
    assert cache.nbytes() == documented_nbytes(cache) + bounds


def test_quest_finds_the_passkey_on_smollm2(smol, monkeypatch):
    """The needle sits mid-prompt, far from the recent window: only the pages Quest picks per query bring it."""
    model, tok = smol
    head = open("eval/data/passkey_2k.txt").read().split("\n")[0]
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    needle = "The pass key is 31415. Remember it. 31415 is the pass key. "
    prompt = f"{head}\n{filler * 12}{needle}{filler * 12}\nWhat is the pass key? The pass key is"
    inputs = tok(prompt, return_tensors="pt")
    widths = record_widths(monkeypatch)
    cache = SparseHeadCache(model, budget=0.1, policy="quest")
    out = generate(model, inputs, cache, max_new_tokens=6)
    assert "31415" in tok.decode(out[0, inputs.input_ids.shape[1] :])
    # ceil(0.1 * ~645) - ~33 in the window: 2 pages of 16 (the sinks' page one of them) out of ~610 stored
    assert [width for *_, width in widths] == [32] * 5 * 30 and min(stored for *_, stored, _ in widths) > 600
