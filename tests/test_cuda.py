"""The caches on a CUDA device (skipped without one): the same tokens, logits and bytes as on the CPU, and
half-precision generation that stays close to ``DynamicCache``."""

import copy

import pytest
import torch
from helpers import BATCH_PROMPTS, lively
from transformers import DynamicCache

from leankv_hf import QuantizedHeteroCache, SparseHeadCache, UnifiedLeanCache
from leankv_hf.testing import ARCHITECTURES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMALL = {"group_size": 16, "buffer": 8, "window": 8, "interval": 4}
CACHES = {
    "hetero-k8v4": lambda model: QuantizedHeteroCache(
        model, key_bits=8, value_bits=4, group_size=16, residual_length=8
    ),
    "sparse-adakv": lambda model: SparseHeadCache(model, budget=0.5, policy="adakv", window=8, recent=8, interval=4),
    "sparse-quest": lambda model: SparseHeadCache(model, budget=0.5, policy="quest", window=8, recent=8, interval=4),
    "unified-leankv": lambda model: UnifiedLeanCache(model, **SMALL),
    "unified-leankv-m": lambda model: UnifiedLeanCache(model, preset="leankv-m", **SMALL),
    "unified-budget": lambda model: UnifiedLeanCache(model, preset="leankv-adakv", budget_mb=0.5, **SMALL),
}


def run(model, inputs, cache, new: int = 12):
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    out = model.generate(
        **inputs,
        past_key_values=cache,
        max_new_tokens=new,
        do_sample=False,
        top_p=None,
        top_k=None,
        temperature=None,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=model.config.pad_token_id,
    )
    return out.sequences.cpu(), torch.stack(out.scores).float().cpu()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", CACHES)
def test_cuda_matches_cpu(arch, name, tiny_tok):
    """float32 on both devices (no TF32): the same tokens, logits within float rounding, the same stored bytes."""
    cpu = lively(arch)
    gpu = copy.deepcopy(cpu).cuda()
    inputs = tiny_tok(BATCH_PROMPTS, return_tensors="pt", padding=True)
    caches = CACHES[name](cpu), CACHES[name](gpu)
    (cpu_tokens, cpu_logits), (gpu_tokens, gpu_logits) = run(cpu, inputs, caches[0]), run(gpu, inputs, caches[1])
    assert torch.equal(gpu_tokens, cpu_tokens)
    torch.testing.assert_close(gpu_logits, cpu_logits, atol=2e-3, rtol=1e-3)
    assert caches[1].nbytes() == caches[0].nbytes() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", CACHES)
def test_half_precision_on_cuda_stays_close_to_dynamic_cache(name, dtype, tiny_tok):
    """The prefill attends over every token, so the first new token's logits match DynamicCache's closely; the
    compressed decode steps stay finite."""
    model = lively("llama").to("cuda", dtype)
    inputs = tiny_tok(BATCH_PROMPTS, return_tensors="pt", padding=True)
    _, reference = run(model, inputs, DynamicCache())
    tokens, logits = run(model, inputs, CACHES[name](model))
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 12
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[0], reference[0], atol=0.1, rtol=0.05)
