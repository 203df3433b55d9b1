"""Tests for compressed contexts as reusable objects: save and reload (`persist`) and fork (`copy.deepcopy`) give a
cache that continues with bit-identical logits; bad files and mismatched models are refused with clear errors;
nothing is ever half-written."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import TINY_PROMPT, generate, lively

from leankv_hf import QuantizedHeteroCache, SparseHeadCache, UnifiedLeanCache
from leankv_hf.monitor import _tensors
from leankv_hf.persist import CONFIG, TENSORS

pytestmark = pytest.mark.usefixtures("one_thread")

CACHES = {
    "hetero k8v4": lambda m: QuantizedHeteroCache(m, group_size=16, residual_length=8),
    "sparse adakv, reconstruct": lambda m: SparseHeadCache(m, budget=0.3, scorer="reconstruct", recent=8, interval=4),
    "sparse quest": lambda m: SparseHeadCache(m, budget=0.3, policy="quest", recent=8),
    "unified two tiers, rank 8": lambda m: UnifiedLeanCache(
        m, group_size=16, policy="adakv", prune_ratio=0.6, low_ratio=0.2, scorer="reconstruct", buffer=8, rank=8
    ),
    "unified leankv, budget_mb": lambda m: UnifiedLeanCache(m, group_size=16, buffer=8, interval=4, budget_mb=0.05),
}


def prefilled(model, tok, build):
    context = tok([TINY_PROMPT * 2], return_tensors="pt").input_ids
    cache = build(model)
    with torch.inference_mode():
        model(input_ids=context, past_key_values=cache)
    return cache, context


def continued(model, cache, ids):
    """Greedy continuation of ``ids`` (the cached context first) with every step's logits."""
    out = generate(
        model,
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        cache,
        max_new_tokens=12,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.scores)


def question(tok, context, text=" and then what?"):
    return torch.cat([context, tok([text], return_tensors="pt").input_ids], 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("name", CACHES)
def test_reloaded_and_forked_caches_continue_bit_identically(arch, name, tiny_tok, tmp_path):
    model = lively(arch)
    cache, context = prefilled(model, tiny_tok, CACHES[name])
    cache.save_pretrained(tmp_path / "ctx", input_ids=context)
    reloaded = type(cache).from_pretrained(tmp_path / "ctx", model=model)
    assert torch.equal(reloaded.input_ids, context) and reloaded.nbytes() == cache.nbytes()
    fork = copy.deepcopy(cache)
    ids = question(tiny_tok, context)
    sequences, logits = continued(model, cache, ids)
    for other in (reloaded, fork):
        again, again_logits = continued(model, other, ids)
        assert torch.equal(again, sequences) and torch.equal(again_logits, logits)


@pytest.mark.parametrize("name", CACHES)
def test_a_fork_made_after_decoding_continues_like_the_original(name, tiny_tok):
    """Forked in the middle of decoding (say, to sample several continuations), when the kernels read the stores in
    place: the fork's next steps are decode steps at once, and it continues as the original does, the attention
    they fold into scores reaching its own rows. (The kernels' views of the original's tensors are not copied with
    it: copies would take that attention where no row reads it, and hold the rows twice.)"""
    model = lively("llama")
    cache, context = prefilled(model, tiny_tok, CACHES[name])
    sequences, _ = continued(model, cache, question(tiny_tok, context))
    fork = copy.deepcopy(cache)
    (again, logits), (fork_again, fork_logits) = continued(model, cache, sequences), continued(model, fork, sequences)
    assert torch.equal(fork_again, again) and torch.equal(fork_logits, logits)
    for layer, twin in zip(cache.layers, fork.layers, strict=True):
        for store, copied in zip(getattr(layer, "tiers", []), getattr(twin, "tiers", []), strict=True):
            assert torch.equal(copied.scores, store.scores) and torch.equal(copied.ages, store.ages)


def test_forks_answer_different_questions_on_their_own(tiny_tok):
    model = lively("llama")
    build = CACHES["unified two tiers, rank 8"]
    cache, context = prefilled(model, tiny_tok, build)
    stored = {id(t.untyped_storage()) for layer in cache.layers for t in _tensors(layer)}
    seen, nbytes = cache.get_seq_length(), cache.nbytes()
    for text in (" and then what?", " who jumps?"):
        fork = copy.deepcopy(cache)
        assert not stored & {id(t.untyped_storage()) for layer in fork.layers for t in _tensors(layer)}
        fresh, _ = prefilled(model, tiny_tok, build)
        ids = question(tiny_tok, context, text)
        assert torch.equal(continued(model, fork, ids)[1], continued(model, fresh, ids)[1])
    assert cache.get_seq_length() == seen and cache.nbytes() == nbytes  # the forks left the original untouched


@pytest.fixture
def saved(tiny_tok, tmp_path):
    model = lively("llama")
    cache, context = prefilled(model, tiny_tok, CACHES["unified two tiers, rank 8"])
    return model, cache.save_pretrained(tmp_path / "ctx", input_ids=context)


def test_only_json_and_safetensors_are_written(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG, TENSORS])
    config = json.loads((path / CONFIG).read_text())
    assert config["cache_class"] == "UnifiedLeanCache"
    assert config["tokens"] == UnifiedLeanCache.from_pretrained(path, model=model).input_ids.shape[1] > 300


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(num_hidden_layers=6), "num_hidden_layers=4"),
        (dict(num_key_value_heads=1), "num_key_value_heads=2"),
        (dict(head_dim=32), "head_dim=16"),
    ],
)
def test_a_model_of_other_shapes_is_refused(saved, change, named):
    _, path = saved
    with pytest.raises(ValueError, match=named):
        UnifiedLeanCache.from_pretrained(path, model=lively("llama", **change))


def test_a_model_in_another_dtype_is_refused(saved):
    model, path = saved
    with pytest.raises(ValueError, match="float32 model; this model runs in bfloat16"):
        UnifiedLeanCache.from_pretrained(path, model=model.to(torch.bfloat16))


def test_another_cache_class_is_refused(saved):
    model, path = saved
    with pytest.raises(ValueError, match="holds a UnifiedLeanCache, not a SparseHeadCache"):
        SparseHeadCache.from_pretrained(path, model=model)


def test_truncated_altered_and_edited_files_are_refused(saved):
    model, path = saved
    tensors, config = path / TENSORS, path / CONFIG
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or altered"):
        UnifiedLeanCache.from_pretrained(path, model=model)
    tensors.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="truncated or altered"):
        UnifiedLeanCache.from_pretrained(path, model=model)
    tensors.write_bytes(data)
    text = config.read_text()
    config.write_text(text.replace('"tokens": ', '"tokens": 1'))
    with pytest.raises(ValueError, match="edited or damaged"):
        UnifiedLeanCache.from_pretrained(path, model=model)
    config.write_text(text[:-20])
    with pytest.raises(ValueError, match="not valid JSON"):
        UnifiedLeanCache.from_pretrained(path, model=model)
    config.write_text(text.replace('"format_version": 1', '"format_version": 2'))
    with pytest.raises(ValueError, match="format version 2.*upgrade"):
        UnifiedLeanCache.from_pretrained(path, model=model)
    with pytest.raises(FileNotFoundError, match="no saved leankv cache"):
        UnifiedLeanCache.from_pretrained(path / "nothing", model=model)


def test_a_failed_save_leaves_the_old_directory_whole(saved, monkeypatch, tiny_tok):
    model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    cache, _ = prefilled(model, tiny_tok, CACHES["sparse adakv, reconstruct"])

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("leankv_hf.persist.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        cache.save_pretrained(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no staging directory left behind
    monkeypatch.undo()
    cache.save_pretrained(path)  # and a successful save replaces it whole
    assert SparseHeadCache.from_pretrained(path, model=model).get_seq_length() == cache.get_seq_length()


@pytest.mark.parametrize("name", CACHES)
def test_a_chunked_prefill_compacts_after_each_chunk(name, tiny_tok):
    """``generate(..., prefill_chunk_size=N)`` works with every cache, and a compressing cache never holds more
    than its share of what it has seen plus one chunk (each chunk is compacted before the next arrives)."""
    model = lively("llama")
    ids = tiny_tok([TINY_PROMPT * 4], return_tensors="pt").input_ids
    cache, chunk, held = CACHES[name](model), 48, []

    def record(*_):  # after each forward of the model (and after the probe that scored it), not the probe's own
        if cache.probe is None:
            held.append((cache.get_seq_length(), cache.nbytes(), cache.nbytes() / cache.dense_nbytes()))

    hook = model.get_decoder().register_forward_hook(record)
    try:
        out = generate(model, {"input_ids": ids}, cache, max_new_tokens=4, prefill_chunk_size=chunk)
    finally:
        hook.remove()
    assert out.shape[1] == ids.shape[1] + 4 and cache.get_seq_length() == out.shape[1] - 1
    prefill = held[: -(-ids.shape[1] // chunk)]
    assert [seen for seen, _, _ in prefill] == [min(ids.shape[1], chunk * (i + 1)) for i in range(len(prefill))]
    if name.endswith("budget_mb"):  # the cap holds after every chunk
        assert all(nbytes <= 0.05 * 2**20 for _, nbytes, _ in prefill), prefill
    elif name.startswith(("sparse adakv", "unified")):  # pruning caches: compacted to their share after every chunk
        assert all(ratio < 0.6 for _, _, ratio in prefill), prefill


@pytest.mark.slow
def test_the_embedded_model_answers_alike_from_the_original_a_reload_and_a_fork(smollm2, tmp_path):
    """smollm2-135m, a real-prose context compressed with ``leankv-agnostic`` in chunks: the original, the reloaded
    copy and a fork give the same tokens and bit-identical logits for a question asked afterwards."""
    from leankv_hf import prefill
    from leankv_hf.eval.tasks.needle import DEFAULT_TEXT

    model, tok = smollm2
    context = tok(DEFAULT_TEXT.read_text()[:2000], return_tensors="pt").input_ids
    cache = prefill(model, UnifiedLeanCache(model, preset="leankv-agnostic"), context, chunk_size=192)
    assert cache.compression_ratio() > 4
    cache.save_pretrained(tmp_path / "ctx", input_ids=context)
    reloaded = UnifiedLeanCache.from_pretrained(tmp_path / "ctx", model=model)
    fork = copy.deepcopy(cache)
    ids = question(tok, context, "\nWhat is this text about? It is about")
    sequences, logits = continued(model, cache, ids)
    for other in (reloaded, fork):
        again, again_logits = continued(model, other, ids)
        assert torch.equal(again, sequences) and torch.equal(again_logits, logits)
