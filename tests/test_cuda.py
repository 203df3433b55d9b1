"""The caches on a CUDA device (skipped without one): the same logits and bytes as on the CPU, and
half-precision generation that stays close to ``DynamicCache``."""

import copy
import warnings

import pytest
import torch
from helpers import BATCH_PROMPTS, GREEDY, lively
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

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


class Force(LogitsProcessor):
    """Records each step's logits, then forces the given next tokens (teacher forcing through ``generate``)."""

    def __init__(self, tokens: torch.Tensor | None):
        self.tokens, self.logits = tokens, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.logits.append(scores.float().cpu())
        if self.tokens is None:
            return scores
        forced = self.tokens[:, len(self.logits) - 1 : len(self.logits)].to(scores.device)
        return torch.full_like(scores, float("-inf")).scatter_(1, forced, 0.0)


def run(model, inputs, cache, new: int = 12, force: torch.Tensor | None = None):
    """Greedy tokens ``[B, new]`` and the logits of every step ``[new, B, V]`` (of ``force``'s tokens, if given)."""
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    record = Force(force)
    out = model.generate(
        **inputs,
        past_key_values=cache,
        max_new_tokens=new,
        logits_processor=LogitsProcessorList([record]),
        pad_token_id=model.config.pad_token_id,
        **GREEDY,
    )
    return out[:, inputs["input_ids"].shape[1] :].cpu(), torch.stack(record.logits)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", CACHES)
def test_cuda_matches_cpu(arch, name, tiny_tok):
    """float32 on both devices (no TF32), the GPU fed the CPU's tokens: the same stored bytes; the first logits
    (exact prefill attention) within float rounding, later ones within quantization noise (a rounding-level
    difference can move a value across a quantization step, or reorder two near-equal scores)."""
    cpu = lively(arch)
    gpu = copy.deepcopy(cpu).cuda()
    inputs = tiny_tok(BATCH_PROMPTS, return_tensors="pt", padding=True)
    caches = CACHES[name](cpu), CACHES[name](gpu)
    tokens, cpu_logits = run(cpu, inputs, caches[0])
    _, gpu_logits = run(gpu, inputs, caches[1], force=tokens)
    torch.testing.assert_close(gpu_logits[0], cpu_logits[0], atol=2e-3, rtol=1e-3)
    gap = (gpu_logits - cpu_logits).abs()
    assert float(gap.mean()) < 1e-2 and float(gap.max()) < 0.5, (float(gap.mean()), float(gap.max()))
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
    assert tokens.shape == (len(BATCH_PROMPTS), 12)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[0], reference[0], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("name", CACHES)
def test_a_decode_step_that_does_not_compact_never_waits_for_the_gpu(name, tiny_tok):
    """Between compactions a decode step only queues GPU work: no ``.item()``, ``bool(tensor)``, ``nonzero()``,
    ``.tolist()`` on its path (``torch.cuda.set_sync_debug_mode`` reports each with the line that asked). Steps that
    compact may wait; at least three steps that do not are checked. (A DynamicCache step is no baseline here: on
    the H200 run, torch 2.11, one of its steps synchronized inside torch itself.)"""
    model = lively("llama").to("cuda", torch.bfloat16)
    cache = CACHES[name](model)
    ids = tiny_tok(BATCH_PROMPTS[:1], return_tensors="pt").input_ids.cuda()
    compacted = []
    for layer in cache.layers:
        if hasattr(layer, "compact"):
            layer.compact = _counting(layer.compact, compacted)
    with torch.inference_mode():
        token = model(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        for _ in range(2):  # first calls set libraries up
            token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
        checked, syncs = 0, []
        for _ in range(12):
            before = len(compacted)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            if len(compacted) == before:
                checked += 1
                syncs += [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert checked >= 3, checked
    assert not syncs, sorted(set(syncs))


def _counting(compact, calls: list):
    def counted(*args, **kwargs):
        calls.append(1)
        return compact(*args, **kwargs)

    return counted
