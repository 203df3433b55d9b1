"""`UnifiedLeanCache` and `LeanKVConfig`: identity when nothing is compressed, presets, low-rank keys, configs."""

import json
import math

import pytest
import torch
import yaml
from transformers import DynamicCache

from leankv_hf import LeanKVConfig, UnifiedLeanCache, cache_nbytes
from leankv_hf.caches.layer import LeanLayer
from leankv_hf.testing import tiny_model

SMALL = {"group_size": 16, "buffer": 8, "window": 8, "interval": 4}
SEED_M = {
    "pipeline": [
        {"type": "quantize", "params": {"bits": 8}},
        {"type": "sparsify", "params": {"ratio": 0.3, "method": "importance"}},
        {"type": "lowrank", "params": {"rank": 0.5, "method": "svd"}},
    ],
}


@pytest.fixture(scope="module")
def inputs(tiny_tok):
    return tiny_tok(["hello world, " * 8, "the quick brown fox jumps. " * 4], return_tensors="pt", padding=True)


def generate(model, inputs, cache, new=8):
    return model.generate(
        **inputs,
        past_key_values=cache,
        max_new_tokens=new,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )


def max_logit_gap(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.scores, b.scores, strict=True))


def lean_layers(cache) -> list[LeanLayer]:
    return [layer for layer in cache.layers if isinstance(layer, LeanLayer)]


# -- the cache ---------------------------------------------------------------------------------------------
def test_no_compression_matches_dynamic_cache(inputs):
    """16-bit tiers and alpha_prune=0 keep every token exactly; only the summation order differs."""
    reference = generate(tiny_model(), inputs, DynamicCache())
    model = tiny_model()
    cache = UnifiedLeanCache(
        model, high=(16, 16), low=(16, 16), alpha_prune=0.0, alpha_quant=2.0, storage_dtype="float32", **SMALL
    )
    out = generate(model, inputs, cache)
    assert torch.equal(out.sequences, reference.sequences)
    assert max_logit_gap(out, reference) < 1e-5
    counts = cache.tier_counts()
    assert int(counts[..., 2].sum()) == 0 and int(counts[..., 1].sum()) > 0  # both tiers used, nothing pruned
    assert sum(t.rows for layer in lean_layers(cache) for t in layer.tiers) > 0  # tokens really left the window


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("preset", ["leankv-s", "leankv-m", "leankv-l", "leankv-adakv"])
def test_presets_generate(arch, preset, inputs):
    model = tiny_model(arch)
    cache = UnifiedLeanCache(model, preset=preset, **SMALL)
    out = generate(model, inputs, cache)
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + 8)
    stats = cache.stats()
    assert stats["pruned"] > 0
    assert stats["ratio"] > 1 or arch == "gemma3"  # gemma3's sliding layers stay dense fp32 windows
    rank = {"leankv-m": 8, "leankv-l": 4}.get(preset)  # of head_dim 16
    for layer in lean_layers(cache):
        assert layer.tiers[0].key.rank == rank
        if rank:
            assert layer.tiers[0].basis.shape == (2 * 2, 16, rank)
            assert layer.tiers[0].keys.shape[-1] == rank  # 8-bit or 4-bit coefficients, packed
            assert layer.tiers[1].basis is layer.tiers[0].basis  # one basis per layer, shared by the tiers


@pytest.mark.parametrize(("preset", "ratio"), [("leankv-s", 0.3), ("leankv-l", 0.5)])
def test_prune_ratio_caps_each_head(preset, ratio, tiny_tok):
    model = tiny_model()
    prompt = tiny_tok("a fairly long prompt that leaves the recent window " * 3, return_tensors="pt")
    cache = UnifiedLeanCache(model, preset=preset, **SMALL)
    with torch.no_grad():
        model(**prompt, past_key_values=cache)
    tokens = prompt["input_ids"].shape[1]
    kept = cache.tier_counts()[..., :2].sum(-1)
    assert int(kept.max()) <= math.ceil((1 - ratio) * tokens)
    assert int(cache.tier_counts()[..., 2].min()) >= math.floor(ratio * tokens)


def test_full_rank_keys_match_the_plain_cache(inputs):
    settings = {"high": (16, 8), "low": (16, 4), **SMALL}
    model = tiny_model()
    plain = generate(model, inputs, UnifiedLeanCache(model, **settings))
    full_rank = generate(model, inputs, UnifiedLeanCache(model, rank=16, **settings))
    low_rank = generate(model, inputs, UnifiedLeanCache(model, rank=2, **settings))
    assert max_logit_gap(full_rank, plain) < 1e-4
    assert max_logit_gap(low_rank, plain) > 1e-3  # the comparison can fail: rank 2 of 16 loses information


def two_turns(model, tiny_tok, cache):
    """A prompt, 6 new tokens, then a follow-up turn (its prefill attends over the stored body), 6 more."""
    first = tiny_tok("The cat sat on the mat and looked at the moon. " * 3, return_tensors="pt")
    out = generate(model, first, cache, new=6)
    follow = tiny_tok(" Then it went to sleep, and dreamt of mice.", return_tensors="pt").input_ids
    ids = torch.cat([out.sequences, follow], -1)
    return generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cache, new=6)


def test_multi_turn(tiny_tok):
    """The second turn's prompt attends over the stored body: exact with 16-bit tiers, and a full-rank basis
    (rebuilt keys at the prompt, reduced-space scores while decoding) matches plain full-rank keys."""
    model = tiny_model()
    reference = two_turns(model, tiny_tok, DynamicCache())
    identity = UnifiedLeanCache(
        model, high=(16, 16), low=(16, 16), alpha_prune=0.0, alpha_quant=2.0, storage_dtype="float32", **SMALL
    )
    out = two_turns(model, tiny_tok, identity)
    assert torch.equal(out.sequences, reference.sequences) and max_logit_gap(out, reference) < 1e-5
    settings = {"high": (16, 8), "low": (16, 4), "prune_ratio": 0.3, **SMALL}
    plain = two_turns(model, tiny_tok, UnifiedLeanCache(model, **settings))
    full_rank = two_turns(model, tiny_tok, UnifiedLeanCache(model, rank=16, **settings))
    assert max_logit_gap(full_rank, plain) < 1e-4


def test_low_rank_bytes_count_the_basis_once_per_layer(inputs):
    model = tiny_model()
    cache = UnifiedLeanCache(model, high=(16, 8), low=(16, 4), rank=4, **SMALL)
    generate(model, inputs, cache, new=4)
    total = cache.nbytes()
    layers = lean_layers(cache)
    for layer in layers:
        assert layer.tiers[0].keys.shape[-1] == 4  # rows hold coefficients
        for tier in layer.tiers:
            tier.basis = None
    assert total - cache_nbytes(cache) == len(layers) * (2 * 2) * 16 * 4 * 2  # [B * H, D, rank] fp16, once a layer


def test_low_rank_survives_beam_search(tiny_tok):
    model = tiny_model()
    cache = UnifiedLeanCache(model, preset="leankv-m", **SMALL)
    prompt = tiny_tok("beams over a compressed cache, " * 3, return_tensors="pt")
    out = model.generate(
        **prompt, past_key_values=cache, max_new_tokens=8, num_beams=2, do_sample=False, pad_token_id=0
    )
    assert out.shape[0] == 1
    high, low = lean_layers(cache)[0].tiers
    assert high.basis.shape == (2 * 2, 16, 8) and low.basis is high.basis  # two beams x two heads, one copy


def test_stats(inputs):
    model = tiny_model()
    cache = UnifiedLeanCache(model, preset="leankv-l", **SMALL)
    generate(model, inputs, cache)
    stats = cache.stats()
    assert stats["nbytes"] == cache.nbytes() and stats["dense_nbytes"] == cache.dense_nbytes()
    assert stats["ratio"] == pytest.approx(stats["dense_nbytes"] / stats["nbytes"])
    assert stats["tokens_seen"] == cache.get_seq_length() == inputs["input_ids"].shape[1] + 7
    assert [stats[k] for k in ("high", "low", "pruned")] == cache.tier_counts().sum((0, 1, 2)).tolist()
    real = int(inputs["attention_mask"].sum()) + 2 * 7  # per sequence: its prompt without padding, new tokens
    assert stats["high"] + stats["low"] + stats["pruned"] == len(lean_layers(cache)) * 2 * real


def test_construction_checks_the_model():
    with pytest.raises(ValueError, match=r"rank=32 must be in 1..head_dim=16"):
        UnifiedLeanCache(tiny_model(), rank=32, group_size=16)
    with pytest.raises(ValueError, match=r"group_size=8 must divide the rank=12"):
        UnifiedLeanCache(tiny_model(), rank=12, group_size=8)
    with pytest.raises(ValueError, match="Unknown preset 'leankv-xl'"):
        UnifiedLeanCache(tiny_model(), preset="leankv-xl")


# -- the config --------------------------------------------------------------------------------------------
def seed_pipeline(bits: int, ratio: float, rank: float | None = None) -> dict:
    stages = [{"type": "quantize", "params": {"bits": bits}}, {"type": "sparsify", "params": {"ratio": ratio}}]
    return {"pipeline": stages + ([{"type": "lowrank", "params": {"rank": rank}}] if rank else [])}


def test_seed_pipeline_dict():
    config = LeanKVConfig.from_dict(SEED_M)
    assert (config.high, config.low, config.prune_ratio, config.rank) == ((8, 8), (4, 4), 0.3, 0.5)
    assert (config.policy, config.alpha_prune, config.alpha_quant) == ("leankv", 0.02, 1.0)  # importance: LeanKV tiers


@pytest.mark.parametrize(
    ("preset", "pipeline"),
    [("leankv-s", seed_pipeline(8, 0.3)), ("leankv-m", SEED_M), ("leankv-l", seed_pipeline(4, 0.5, 0.25))],
)
def test_presets_are_the_seed_pipelines(preset, pipeline):
    cache = UnifiedLeanCache(tiny_model(), preset=preset, group_size=16)
    assert cache.settings == LeanKVConfig.from_dict({**pipeline, "group_size": 16})


def test_pipeline_forms_and_orchestrator():
    config = LeanKVConfig.from_pipeline(
        {
            "pipeline": [
                {"quantize": {"key_bits": 4, "value_bits": 2}},
                {"sparsify": {"ratio": 0.5, "method": "snapkv"}},
            ],
            "orchestrator": {"mode": "static", "budget_mb": 512},
            "buffer": 64,
        }
    )
    assert (config.high, config.low, config.policy, config.prune_ratio) == ((4, 2), (2, 2), "snapkv", 0.5)
    assert (config.mode, config.budget_mb, config.buffer, config.rank) == ("static", 512, 64, None)
    only_quantize = LeanKVConfig.from_dict({"pipeline": [{"quantize": {"bits": 4}}]})
    assert (only_quantize.high, only_quantize.alpha_quant, only_quantize.prune_ratio) == ((4, 4), 0.0, 0.0)
    nothing = LeanKVConfig.from_dict({"pipeline": []})
    assert (nothing.high, nothing.low, nothing.alpha_prune) == ((16, 16), (16, 16), 0.0)


def test_sparse_policy_pipeline_keeps_one_tier(inputs):
    model = tiny_model()
    pipeline = {"pipeline": [{"type": "sparsify", "params": {"ratio": 0.5, "method": "snapkv"}}], **SMALL}
    cache = UnifiedLeanCache.from_config(pipeline, model=model)
    generate(model, inputs, cache)
    stats = cache.stats()
    assert stats["low"] == 0 and stats["pruned"] > 0 and stats["high"] > 0


def test_round_trips(tmp_path):
    config = LeanKVConfig(
        high=(8, 8), low=(4, 2), prune_ratio=0.25, rank=0.5, alpha_prune=1e-5, group_size=8, budget_mb=256.5
    )
    assert LeanKVConfig.from_dict(config.to_dict()) == config
    assert LeanKVConfig.from_yaml(config.to_yaml()) == config
    assert LeanKVConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    (tmp_path / "c.yaml").write_text(config.to_yaml())
    (tmp_path / "c.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "seed.yml").write_text(yaml.safe_dump({**SEED_M, "group_size": 16}))
    model = tiny_model()
    for source in (config, config.to_dict(), str(tmp_path / "c.json"), tmp_path / "c.yaml"):
        assert UnifiedLeanCache.from_config(source, model=model).settings == config
    seed = UnifiedLeanCache.from_config(str(tmp_path / "seed.yml"), model=model)
    assert seed.settings == LeanKVConfig.from_dict({**SEED_M, "group_size": 16})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"bogus": 1}, r"unknown LeanKVConfig keys \['bogus'\]; valid keys are"),
        ({"high": (8, 3)}, r"bits=3 is not supported; choose one of \(16, 8, 4, 2\)"),
        ({"high": (8,)}, r"high=\(8,\) must be \(key_bits, value_bits\)"),
        ({"alpha_prune": 2.0}, r"need 0 <= alpha_prune <= alpha_quant"),
        ({"prune_ratio": 1.0}, r"prune_ratio=1.0 must be in \[0, 1\)"),
        ({"prune_ratio": -0.1}, r"prune_ratio=-0.1 must be in \[0, 1\)"),
        ({"policy": "nope"}, r"policy='nope': choose one of \('leankv', 'snapkv'"),
        ({"rank": 0}, r"rank=0 must be an int >= 1, a fraction of head_dim in \(0, 1\]"),
        ({"rank": 1.5}, r"rank=1.5 must be an int >= 1, a fraction"),
        ({"rank": True}, r"rank=True must be"),
        ({"buffer": -1}, r"buffer=-1 must be an int >= 0"),
        ({"window": 0}, r"window=0 must be an int >= 1"),
        ({"gqa": "min"}, r"gqa='min': choose one of \('max', 'mean'\)"),
        ({"mode": "eager"}, r"mode='eager': choose one of \('adaptive', 'static'\)"),
        ({"budget_mb": 0}, r"budget_mb=0 must be a positive number of megabytes, or None"),
        ({"budget_mb": float("inf")}, r"budget_mb=inf must be a positive number"),
        ({"pipeline": {"quantize": {}}}, r"'pipeline' must be a list of stages \(quantize, sparsify, lowrank\)"),
        (
            {"pipeline": [{"type": "prune"}]},
            r"unknown pipeline stage 'prune'; stages: \['quantize', 'sparsify', 'lowrank'\]",
        ),
        (
            {"pipeline": [{"type": "quantize", "params": {"bits": 8, "nbits": 4}}]},
            r"unknown quantize keys \['nbits'\]; allowed: \['bits'",
        ),
        (
            {"pipeline": [{"type": "quantize", "param": {}}]},
            r"unknown stage keys \['param'\]; allowed: \['type', 'params'\]",
        ),
        ({"pipeline": ["quantize"]}, r"pipeline stage 'quantize' must be \{\"type\": STAGE"),
        ({"pipeline": [{"quantize": {"bits": 8}}, {"quantize": {"bits": 4}}]}, r"stage 'quantize' appears twice"),
        (
            {"pipeline": [{"lowrank": {"rank": 8}}, {"quantize": {"bits": 8}}]},
            r"stage 'lowrank' cannot come before 'quantize': .* quantize -> sparsify -> lowrank",
        ),
        (
            {"pipeline": [{"sparsify": {"ratio": 0.3}}, {"quantize": {"bits": 8}}]},
            r"stage 'sparsify' cannot come before 'quantize'",
        ),
        (
            {"pipeline": [{"quantize": {"key_bits": 8}}]},
            r"the quantize stage needs int bits, or key_bits and value_bits",
        ),
        ({"pipeline": [{"quantize": {"bits": 5}}]}, r"bits=5 is not supported"),
        ({"pipeline": [{"quantize": {"bits": "8"}}]}, r"needs int bits"),
        (
            {"pipeline": [{"sparsify": {"method": "random"}}]},
            r"sparsify method='random': choose one of \('importance', 'snapkv'",
        ),
        ({"pipeline": [{"sparsify": {"ratio": 1.2}}]}, r"prune_ratio=1.2 must be in \[0, 1\)"),
        ({"pipeline": [{"lowrank": {"rank": 8, "method": "pca"}}]}, r"lowrank method='pca': only 'svd' is supported"),
        ({"pipeline": [{"lowrank": {}}]}, r"the lowrank stage needs a rank"),
        (
            {"pipeline": [], "orchestrator": {"budget": 1}},
            r"unknown orchestrator keys \['budget'\]; allowed: \['mode', 'budget_mb'\]",
        ),
        ({"pipeline": [], "orchestrator": {"budget_mb": -5}}, r"budget_mb=-5 must be a positive number"),
        (
            {"pipeline": [{"quantize": {"bits": 8}}], "high": [4, 4]},
            r"\['high'\] set both by the pipeline and at top level",
        ),
        ({"pipeline": [], "nope": 1}, r"unknown LeanKVConfig keys \['nope'\]"),
    ],
)
def test_invalid_configs_name_the_problem(data, message):
    with pytest.raises(ValueError, match=message):
        LeanKVConfig.from_dict(data)


def test_invalid_yaml_document():
    with pytest.raises(ValueError, match="holds one mapping, got list"):
        LeanKVConfig.from_yaml("- 1\n- 2\n")


@pytest.mark.parametrize("mode", ["adaptive", "static"])
def test_budget_mb_is_a_hard_cap_through_a_long_generation(mode, tiny_tok):
    """Stored bytes stay under budget_mb after every step, however long the context grows; the cap reports
    what it did beyond the thresholds."""
    model = tiny_model()
    budget_mb = 0.05
    cache = UnifiedLeanCache(model, budget_mb=budget_mb, mode=mode, **SMALL)
    ids = tiny_tok("The cat sat on the mat and looked at the moon. " * 8, return_tensors="pt").input_ids
    sizes = []
    with torch.no_grad():
        logits = model(ids, past_key_values=cache).logits
        sizes.append(cache.nbytes())
        for _ in range(600):
            token = logits[:, -1:].argmax(-1)
            logits = model(token, past_key_values=cache).logits
            sizes.append(cache.nbytes())
    assert cache.get_seq_length() == ids.shape[1] + 600
    assert max(sizes) <= budget_mb * 2**20
    assert max(sizes) > 0.8 * budget_mb * 2**20  # the budget is used, not wasted
    stats = cache.stats()
    assert stats["budget_demoted"] > 0 and stats["budget_pruned"] > 0
    uncapped = UnifiedLeanCache(model, **SMALL)
    with torch.no_grad():
        model(torch.cat([ids, ids, ids], 1), past_key_values=uncapped)
    assert uncapped.nbytes() > budget_mb * 2**20  # without the cap, fewer tokens already exceed it


def test_budget_mb_too_small_is_a_clear_error(tiny_tok):
    model = tiny_model()
    cache = UnifiedLeanCache(model, budget_mb=0.001, **SMALL)
    with pytest.raises(ValueError, match=r"budget_mb=0.001 is too small for a batch of 1"):
        model(tiny_tok("hello world", return_tensors="pt").input_ids, past_key_values=cache)
