"""Tests for `QuantizedHeteroCache`: exactness at 16 bits, accuracy and packed bytes when quantized, and every
way `generate` drives a cache (sampling, beams, left padding, multi-turn, crop, bf16, hybrid layers)."""

from __future__ import annotations

import pytest
import torch
from helpers import BATCH_PROMPTS, GREEDY, TINY_PROMPT, generate, lively
from transformers import DynamicCache

from leankv_hf.caches import hetero
from leankv_hf.caches.hetero import HeteroLayer, QuantizedHeteroCache, SlidingHeteroLayer
from leankv_hf.testing import ARCHITECTURES, tiny_model

STORY = (
    "In the spring of 1871, the young engineer Clara Whitfield arrived in the mill town of Ashbourne with a "
    "trunk of drawings and a letter of introduction to the owner of the largest textile works in the valley. "
    "The town was loud with looms from dawn to dusk, and the river that powered them ran grey with dye. Clara "
    "had been hired to redesign the water wheels, which lost nearly half their power to friction and leaks. "
    "Within a month she had measured every sluice and gear, filled three notebooks with figures, and argued "
    "with the foreman about the price of iron. Her proposal was simple: replace the wooden paddles with curved "
    "steel blades, raise the channel by two feet, and add a governor so the shafts would turn at a steady pace "
    "whatever the season. The owner, a cautious man named Edmund Hale, agreed to try it on a single wheel. "
    "When the new wheel turned for the first time, the workers gathered on the bank to watch. It ran smoother "
    "and faster than any of the old ones, and by autumn every wheel in the works had been rebuilt. Years later, "
    "people in Ashbourne still spoke of the winter the river froze and only the steel wheels kept turning, "
    "because Clara had insisted on heating the channel with waste steam from the boilers."
)  # 259 SmolLM2 tokens of varied prose


pytestmark = pytest.mark.usefixtures("one_thread")


def hetero_layers(cache) -> list[HeteroLayer]:
    """The full-attention layers (sliding windows are `SlidingHeteroLayer`s)."""
    return [layer for layer in cache.layers if type(layer) is HeteroLayer]


def generate_scored(model, inputs, cache, new_tokens):
    """Greedy tokens and the raw logits of every step (prefill's last position, then each decode step)."""
    out = model.generate(
        **inputs,
        past_key_values=cache,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=model.config.pad_token_id,
        **GREEDY,
    )
    return out.sequences, torch.stack(out.logits, 1)


@pytest.fixture(scope="module")
def story_ids(smollm2):
    return smollm2[1](STORY, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def story_logits(smollm2, story_ids):
    with torch.no_grad():
        return smollm2[0](story_ids).logits


# --------------------------------------------------------------------------- 16 bits: exactly a DynamicCache


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_16_bits_matches_dynamic_cache_on_tiny_models(arch, tiny_tok):
    model = lively(arch)
    inputs = tiny_tok([TINY_PROMPT], return_tensors="pt")
    ref, ref_logits = generate_scored(model, inputs, DynamicCache(config=model.config), 24)
    # residual_length=8: most of the prompt goes through the (16-bit) store, not only the residual window
    cache = QuantizedHeteroCache(model, key_bits=16, value_bits=16, storage_dtype=torch.float32, residual_length=8)
    out, logits = generate_scored(model, inputs, cache, 24)
    assert len(set(ref[0, -24:].tolist())) > 3  # a real continuation, not one token repeated
    assert torch.equal(out, ref)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert all(layer.store.length > 150 for layer in hetero_layers(cache))
    assert cache.get_seq_length() == out.shape[1] - 1


def test_16_bits_matches_dynamic_cache_on_smollm2(smollm2):
    model, tok = smollm2
    inputs = tok("The three primary colors are red, yellow and", return_tensors="pt")
    ref, ref_logits = generate_scored(model, inputs, DynamicCache(config=model.config), 6)
    cache = QuantizedHeteroCache(model, key_bits=16, value_bits=16, storage_dtype=torch.float32, residual_length=2)
    out, logits = generate_scored(model, inputs, cache, 6)
    assert torch.equal(out, ref)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert hetero_layers(cache)[0].store.length > 0


# --------------------------------------------------------------------------- quantized: close, and bytes as designed


def _teacher_forced_logits(model, ids, cache, tail=32):
    """Prefill all but the last ``tail`` tokens, then score those ``tail`` tokens against the cache."""
    with torch.no_grad():
        model(ids[:, :-tail], past_key_values=cache)
        return model(ids[:, -tail:], past_key_values=cache).logits


# Bounds measured on STORY (259 tokens; 195 of the 227 prefilled tokens quantized, the 32 scored tokens attend
# them). Reference logits have std 6.8 and range +-36. Measured max |diff| / top-1 agreement over 32 positions:
# K8V4 0.97 / 0.94, K8V4 per-channel keys 0.97 / 0.91, K8V8 fp8 0.55 / 0.91, K4V2 6.6 / 0.75. The bounds are
# about 2x the measured error (and well under K4V2's), and agreement may lose one more token than measured.
QUALITY = {
    "K8V4": (dict(key_bits=8, value_bits=4), 2.0, 0.875),
    "K8V4-channel": (dict(key_bits=8, value_bits=4, key_axis="channel"), 2.0, 0.875),
    "K8V8-fp8": (dict(key_bits=8, value_bits=8, eight_bit="fp8"), 1.5, 0.875),
}


@pytest.mark.parametrize("name", list(QUALITY))
def test_quantized_logits_close_to_dynamic_cache_on_smollm2(name, smollm2, story_ids, story_logits):
    model, _ = smollm2
    kwargs, max_diff, min_agree = QUALITY[name]
    cache = QuantizedHeteroCache(model, **kwargs)
    logits = _teacher_forced_logits(model, story_ids, cache)
    ref = story_logits[:, -32:]
    assert hetero_layers(cache)[0].store.length >= 190  # the scored tokens really attended quantized tokens
    diff = (logits - ref).abs().max().item()
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert diff < max_diff, f"max |logit diff| {diff:.3f}"
    assert agree >= min_agree, f"top-1 agreement {agree:.3f}"


def test_fewer_bits_are_further_from_dynamic_cache(smollm2, story_ids, story_logits):
    model, _ = smollm2
    errors = {}
    for kb, vb in ((8, 4), (4, 2)):
        logits = _teacher_forced_logits(model, story_ids, QuantizedHeteroCache(model, key_bits=kb, value_bits=vb))
        errors[kb, vb] = (logits - story_logits[:, -32:]).abs().mean().item()
    assert 0 < errors[8, 4] < errors[4, 2] / 2, errors


def _expected_split(tokens: int, residual: int) -> tuple[int, int]:
    """(stored, residual) after one update of ``tokens`` tokens into an empty layer, per HeteroLayer._flush
    with per-token keys (block 1): the window flushes at >= 2 * residual, keeping ``residual`` exact."""
    if tokens < 2 * residual:
        return 0, tokens
    return tokens - residual, residual


def test_k4v2_packed_bytes_follow_the_formula_on_smollm2(smollm2):
    model, tok = smollm2
    ids = tok(STORY + " " + STORY[:200], return_tensors="pt").input_ids
    assert 290 <= ids.shape[1] <= 320
    cache = QuantizedHeteroCache(model, key_bits=4, value_bits=2, group_size=64, residual_length=32)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    cfg = model.config
    heads, dim, itemsize = cfg.num_key_value_heads, cfg.head_dim, model.dtype.itemsize
    assert dim == 64 and itemsize == 4

    def expected_bytes(stored, residual):
        # per stored token and head: K 64 codes x 4 bits = 32 B, V 64 x 2 bits = 16 B, one group of 64 channels
        # per side, each with an fp16 scale and an fp16 zero (4 B per side); residual: K and V in fp16 (the
        # fp32 model's window is held at 16 bits when quantizing)
        per_layer = stored * heads * (32 + 16 + 4 + 4) + residual * heads * dim * 2 * 2
        return cfg.num_hidden_layers * per_layer

    stored, residual = _expected_split(ids.shape[1], 32)
    for layer in hetero_layers(cache):
        assert (layer.store.length, layer.keys.shape[-2]) == (stored, residual)
    assert cache.nbytes() == expected_bytes(stored, residual)

    # One decode step: one more exact token (the window is below 2 * 32 again, no flush). The step reads the store in
    # place, through its table of (start, count, offset) per head (int64) and a one-element valid mask.
    with torch.no_grad():
        model(ids[:, -1:], past_key_values=cache)
    assert cache.nbytes() == expected_bytes(stored, residual + 1) + cfg.num_hidden_layers * (3 * heads * 8 + 1)
    assert cache.get_seq_length() == ids.shape[1] + 1


def test_compression_ratio_on_smollm2_1000_tokens(smollm2):
    model, tok = smollm2
    text = open("eval/data/passkey_2k.txt").read()
    ids = tok(text, return_tensors="pt").input_ids[:, :1000]
    dynamic = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=dynamic)
    # Feed the model's own K/V to each cache exactly as the model's forward would (layer by layer, one prefill
    # update each): the ratio depends only on what the cache stores, and it saves a 1000-token forward per cache.
    caches = {bits: QuantizedHeteroCache(model, key_bits=bits[0], value_bits=bits[1]) for bits in ((8, 4), (4, 2))}
    for cache in caches.values():
        for i, layer in enumerate(dynamic.layers):
            cache.update(layer.keys, layer.values, i)
        assert cache.get_seq_length() == 1000
        assert cache.dense_nbytes() == dynamic_bytes(dynamic) // 2  # 16-bit reference of an fp32 DynamicCache

    cfg = model.config
    heads, layers = cfg.num_key_value_heads, cfg.num_hidden_layers
    dense = 1000 * layers * heads * 64 * 2 * 2
    residual_bytes = 32 * heads * 64 * 2 * 2 * layers  # the 32 recent tokens, fp16
    stored_bytes = {(8, 4): (64 + 4) + (32 + 4), (4, 2): (32 + 4) + (16 + 4)}  # per token and head
    for bits, cache in caches.items():
        store = 968 * heads * layers * stored_bytes[bits]
        assert cache.nbytes() == store + residual_bytes
        assert cache.compression_ratio() == pytest.approx(dense / (store + residual_bytes))
        # The store alone reaches the 16-bit design ratios (K8V4 256/104 = 2.46, K4V2 256/56 = 4.57)
        assert 968 * heads * layers * 64 * 2 * 2 / store > (2.3 if bits == (8, 4) else 4.0)
    # With the fp16 residual window included (32 tokens x 256 B per head): K8V4 2.35x, K4V2 4.10x at 1000
    # tokens (the window's share shrinks with length: 2.43x / 4.45x at 4096 tokens).
    assert caches[8, 4].compression_ratio() == pytest.approx(256_000 / (968 * 104 + 32 * 256))
    assert caches[4, 2].compression_ratio() == pytest.approx(256_000 / (968 * 56 + 32 * 256))
    assert caches[8, 4].compression_ratio() > 2.3 and caches[4, 2].compression_ratio() > 4.0


@pytest.mark.parametrize(
    ("dtype", "storage_dtype", "expected"),
    [
        (torch.float32, None, torch.float16),
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, None, torch.bfloat16),
    ],
)
def test_storage_dtype(dtype, storage_dtype, expected, tiny_tok):
    """Unquantized tokens are held at 16 bits by default (fp16 for an fp32 model), or at the dtype asked for."""
    model, tok = tiny_model("llama", dtype=dtype), tiny_tok
    cache = QuantizedHeteroCache(model, 8, 4, group_size=16, residual_length=8, storage_dtype=storage_dtype)
    with torch.no_grad():
        model(**tok("hello world " * 10, return_tensors="pt"), past_key_values=cache)
    assert {layer.keys.dtype for layer in hetero_layers(cache)} == {expected}


def dynamic_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


# --------------------------------------------------------------------------- generate: every way it drives a cache


def test_sampling_runs_and_is_seeded(tiny_tok):
    model = lively("llama")
    inputs = tiny_tok([TINY_PROMPT], return_tensors="pt")
    sample = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=24)

    def run(cache, seed):
        torch.manual_seed(seed)
        return model.generate(**inputs, past_key_values=cache, pad_token_id=0, **sample)

    q1 = run(QuantizedHeteroCache(model, key_bits=8, value_bits=4, group_size=16, residual_length=8), 7)
    q2 = run(QuantizedHeteroCache(model, key_bits=8, value_bits=4, group_size=16, residual_length=8), 7)
    assert q1.shape == (1, inputs.input_ids.shape[1] + 24)
    assert torch.equal(q1, q2)
    exact = run(
        QuantizedHeteroCache(model, key_bits=16, value_bits=16, storage_dtype=torch.float32, residual_length=8), 7
    )
    assert torch.equal(exact, run(DynamicCache(config=model.config), 7))
    assert not torch.equal(exact, run(DynamicCache(config=model.config), 8))  # the seed matters: real sampling


def test_beam_search_16_bits_matches_dynamic_cache(tiny_tok):
    model = lively("llama")
    inputs = tiny_tok([TINY_PROMPT[:100]], return_tensors="pt")
    beams = dict(num_beams=2, num_return_sequences=2, max_new_tokens=20, early_stopping=True)
    ref = generate(model, inputs, DynamicCache(config=model.config), **beams)
    out = generate(
        model,
        inputs,
        QuantizedHeteroCache(model, key_bits=16, value_bits=16, storage_dtype=torch.float32, residual_length=4),
        **beams,
    )
    assert out.shape[0] == 2 and not torch.equal(out[0], out[1])
    assert torch.equal(out, ref)
    quantized = QuantizedHeteroCache(model, key_bits=8, value_bits=4, group_size=16, residual_length=4)
    out = generate(model, inputs, quantized, **beams)
    assert out.shape == (2, inputs.input_ids.shape[1] + 20)


def test_left_padded_batch_16_bits_matches_dynamic_cache(tiny_tok):
    model = lively("llama")
    inputs = tiny_tok(BATCH_PROMPTS, return_tensors="pt", padding=True)
    assert (inputs.attention_mask == 0).any(dim=1).sum() == 3  # three rows really are padded
    ref = generate(model, inputs, DynamicCache(config=model.config), max_new_tokens=20)
    out = generate(
        model,
        inputs,
        QuantizedHeteroCache(model, key_bits=16, value_bits=16, storage_dtype=torch.float32, residual_length=4),
        max_new_tokens=20,
    )
    assert torch.equal(out, ref)
    out = generate(
        model,
        inputs,
        QuantizedHeteroCache(model, key_bits=8, value_bits=4, group_size=16, residual_length=4),
        max_new_tokens=20,
    )
    assert out.shape == ref.shape


def _two_turns(model, tok, cache):
    first = tok([TINY_PROMPT[:90]], return_tensors="pt")
    out = generate(model, first, cache, max_new_tokens=12)
    follow = tok([" And then what happened next?"], return_tensors="pt").input_ids
    ids = torch.cat([out, follow], 1)
    second = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return generate(model, second, cache, max_new_tokens=12)


def test_multi_turn_16_bits_matches_dynamic_cache(tiny_tok):
    model = lively("llama")
    ref = _two_turns(model, tiny_tok, DynamicCache(config=model.config))
    cache = QuantizedHeteroCache(model, key_bits=16, value_bits=16, storage_dtype=torch.float32, residual_length=4)
    out = _two_turns(model, tiny_tok, cache)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == out.shape[1] - 1
    quantized = QuantizedHeteroCache(model, key_bits=8, value_bits=4, group_size=16, residual_length=4)
    out = _two_turns(model, tiny_tok, quantized)
    assert quantized.get_seq_length() == out.shape[1] - 1


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_crop_then_forward(axis, tiny_tok):
    model = lively("llama")
    ids = tiny_tok(TINY_PROMPT, return_tensors="pt").input_ids[:, :100]
    with torch.no_grad():
        full = model(ids[:, :60]).logits[:, 50:]
    for bits in (16, 8):
        cache = QuantizedHeteroCache(
            model,
            key_bits=bits,
            value_bits=bits,
            group_size=16,
            key_axis=axis,
            key_group_size=16,
            residual_length=8,
            storage_dtype=torch.float32,
        )
        layer = hetero_layers(cache)[0]
        with torch.no_grad():
            model(ids, past_key_values=cache)
        blocks = bits < 16 and axis == "channel"  # quantized per-channel keys flush and cut whole 16-token groups
        assert layer.store.length == (80 if blocks else 92)
        cache.crop(-3)
        assert cache.get_seq_length() == 97
        assert layer.store.length + layer.keys.shape[-2] == 97
        cache.crop(-(97 - 50))  # beyond the residual window: the store is cut (per-channel keys mid-group)
        assert cache.get_seq_length() == 50
        assert layer.store.length == (48 if blocks else 50)
        with torch.no_grad():
            logits = model(ids[:, 50:60], past_key_values=cache).logits
        assert cache.get_seq_length() == 60
        if bits == 16:  # exact: the cropped cache is the prefix, at the right positions
            torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
        else:
            assert (logits - full).abs().max() < 0.5
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_crop_into_the_store_does_not_grow_memory(axis, tiny_tok):
    model = lively("llama")
    ids = tiny_tok(TINY_PROMPT, return_tensors="pt").input_ids[:, :160]
    cache = QuantizedHeteroCache(
        model, key_bits=4, value_bits=2, group_size=16, key_axis=axis, key_group_size=16, residual_length=8
    )
    with torch.no_grad():
        model(ids, past_key_values=cache)
    before, stored = cache.nbytes(), hetero_layers(cache)[0].store.length
    cache.crop(-53)
    assert hetero_layers(cache)[0].store.length < stored  # the crop really cut into the store
    assert cache.nbytes() <= 1.1 * before, (before, cache.nbytes())


def test_crop_during_generation_matches_dynamic_cache(tiny_tok):
    """The assisted-decoding pattern: generate, drop the last tokens, generate again from the shorter prefix."""
    model = lively("llama")
    inputs = tiny_tok([TINY_PROMPT[:80]], return_tensors="pt")
    results = []
    for cache in (
        DynamicCache(config=model.config),
        QuantizedHeteroCache(model, key_bits=16, value_bits=16, storage_dtype=torch.float32, residual_length=4),
    ):
        out = generate(model, inputs, cache, max_new_tokens=10)
        cache.crop(-5)
        ids = out[:, : cache.get_seq_length() + 1]
        results.append(
            generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cache, max_new_tokens=8)
        )
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bf16_model(arch, tiny_tok):
    model = lively(arch, dtype=torch.bfloat16)
    inputs = tiny_tok([TINY_PROMPT], return_tensors="pt")
    ref = generate(model, inputs, DynamicCache(config=model.config))
    exact = QuantizedHeteroCache(model, key_bits=16, value_bits=16, residual_length=8)  # default: the bf16 itself
    assert torch.equal(generate(model, inputs, exact), ref)
    cache = QuantizedHeteroCache(model, key_bits=8, value_bits=4, group_size=16, residual_length=8)
    out = generate(model, inputs, cache)
    assert out.shape == ref.shape
    layer = hetero_layers(cache)[0]
    assert layer.keys.dtype == torch.bfloat16 and layer.store.length > 0
    assert cache.nbytes() < exact.nbytes()


def test_gemma3_sliding_layers_keep_their_window_quantized(tiny_tok):
    model = lively("gemma3")
    cache = QuantizedHeteroCache(model, key_bits=8, value_bits=4, group_size=16, residual_length=8)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [SlidingHeteroLayer] * 5 + [HeteroLayer]
    inputs = tiny_tok([TINY_PROMPT], return_tensors="pt")
    out = generate(model, inputs, cache, max_new_tokens=20)
    assert out.shape == (1, inputs.input_ids.shape[1] + 20)
    assert cache.get_seq_length() == out.shape[1] - 1
    window = cache.layers[0]
    assert window.store.length + window.keys.shape[-2] == 15  # exactly the window (16) minus the token attending
    assert window.store.length > 0 and cache.layers[-1].store.length > 150
    ref = generate(model, inputs, DynamicCache(config=model.config), max_new_tokens=20)
    assert (out == ref).float().mean() > 0.9
    fresh = QuantizedHeteroCache(model, key_bits=8, value_bits=4, group_size=16, residual_length=8)
    with torch.no_grad():
        model(**inputs, past_key_values=fresh)
    for tensor in (fresh.layers[0].keys, fresh.layers[0].store.keys.payload):  # copies, not views pinning the prompt
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_per_channel_keys(tiny_tok):
    model = lively("llama")
    inputs = tiny_tok([TINY_PROMPT], return_tensors="pt")
    cache = QuantizedHeteroCache(
        model, key_bits=4, value_bits=2, group_size=16, key_axis="channel", key_group_size=16, residual_length=8
    )
    out = generate(model, inputs, cache, max_new_tokens=30)
    assert out.shape == (1, inputs.input_ids.shape[1] + 30)
    for layer in hetero_layers(cache):
        assert layer.store.length % 16 == 0 and layer.store.length > 150
        assert layer.store.keys.axis == "channel" and layer.store.keys.scale.shape[-2] == layer.store.length // 16
        assert layer.store.length + layer.keys.shape[-2] == out.shape[1] - 1
    assert cache.compression_ratio() > 1.5


def test_fp8_eight_bit_runs_and_is_close(tiny_tok):
    model = lively("llama")
    ids = tiny_tok([TINY_PROMPT], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits[:, -32:]
    errors = {}
    for name, kwargs in {"fp8": dict(eight_bit="fp8"), "int8": {}}.items():
        cache = QuantizedHeteroCache(model, key_bits=8, value_bits=8, group_size=16, residual_length=8, **kwargs)
        errors[name] = (_teacher_forced_logits(model, ids, cache) - ref).abs().mean().item()
        payload = hetero_layers(cache)[0].store.values.payload.dtype
        assert payload == (torch.float8_e4m3fn if name == "fp8" else torch.uint8)
    k4v2 = QuantizedHeteroCache(model, key_bits=4, value_bits=2, group_size=16, residual_length=8)
    errors["K4V2"] = (_teacher_forced_logits(model, ids, k4v2) - ref).abs().mean().item()
    # Measured mean |logit diff| on this random model (logit std 1.6): int8 0.018, fp8 0.11 (3 mantissa bits),
    # K4V2 0.79. fp8 must stay in the 8-bit league: well under K4V2 and under 0.15 logit std.
    assert errors["int8"] < errors["fp8"] < 0.3 * errors["K4V2"], errors
    assert errors["fp8"] < 0.15 * ref.std().item(), errors


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(key_bits=3), "bits=3"),
        (dict(value_bits=5), "bits=5"),
        (dict(group_size=48), "group_size=48"),
        (dict(key_axis="diag"), "diag"),
        (dict(residual_length=-1), "residual_length=-1"),
        (dict(eight_bit="fp4"), "fp4"),
    ],
)
def test_bad_settings_raise_at_construction_on_smollm2(kwargs, named, smollm2):
    with pytest.raises(ValueError, match=named):
        QuantizedHeteroCache(smollm2[0], **kwargs)


def test_group_not_dividing_tiny_head_dim_raises():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="group_size=12"):
        QuantizedHeteroCache(model, group_size=12)
    with pytest.raises(ValueError, match="group_size=12"):
        QuantizedHeteroCache(model.config, key_bits=16, value_bits=4, group_size=12)


# --------------------------------------------------------------------------- decode steps reading the store in place


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_store_read_in_place_gives_what_the_dequantized_path_gives(arch, tiny_tok, monkeypatch):
    """At 16 bits exactly a DynamicCache; at K8V4 the dequantized path's tokens, logits within float summation
    order. Left-padded rows included (the mask spans the store and the window)."""
    model = lively(arch)
    inputs = tiny_tok(BATCH_PROMPTS, return_tensors="pt", padding=True)
    ref, ref_logits = generate_scored(model, inputs, DynamicCache(config=model.config), 16)
    monkeypatch.setattr(hetero, "IN_PLACE_DEVICES", ())  # the dequantized path, on every device
    dense = generate_scored(model, inputs, QuantizedHeteroCache(model, group_size=16, residual_length=4), 16)
    monkeypatch.setattr(hetero, "IN_PLACE_DEVICES", ("cuda", "cpu"))
    exact = QuantizedHeteroCache(model, key_bits=16, value_bits=16, storage_dtype=torch.float32, residual_length=4)
    out, logits = generate_scored(model, inputs, exact, 16)
    assert torch.equal(out, ref)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    quantized = QuantizedHeteroCache(model, group_size=16, residual_length=4)
    out, logits = generate_scored(model, inputs, quantized, 16)
    assert torch.equal(out, dense[0])
    torch.testing.assert_close(logits, dense[1], rtol=1e-3, atol=1e-3)
    assert all(layer.store.length > 0 and layer.store._segments is not None for layer in hetero_layers(quantized))
