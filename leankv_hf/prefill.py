"""Prefill a context into a cache without generating: the first half of "compress once, ask many times".

A document, a shared prefix or a chat's history goes through the model once; the cache compresses it (with a
question-agnostic scorer, before any question exists) and can then be saved, reloaded and forked, each copy
answering its own question through ``generate``. ``chunk_size`` feeds the context in pieces: a compressing cache
compacts after each, so peak memory follows the compressed cache plus one chunk instead of the whole context
(``generate(..., prefill_chunk_size=N)`` does the same for a prompt).
"""

from __future__ import annotations

import torch
from transformers import Cache, PreTrainedModel


@torch.inference_mode()
def prefill(
    model: PreTrainedModel,
    cache: Cache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> Cache:
    """Run ``input_ids`` ``[B, T]`` (left-padded where ``attention_mask`` says so) through ``model`` into ``cache``,
    ``chunk_size`` tokens per forward (None: all at once); returns the cache.

    Example:
        >>> import copy, torch
        >>> from leankv_hf import SparseHeadCache, prefill
        >>> from leankv_hf.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> context = torch.randint(3, 200, (1, 300))
        >>> cache = prefill(model, SparseHeadCache(model, budget=0.2, scorer="reconstruct"), context, chunk_size=128)
        >>> cache.get_seq_length(), int(cache.kept_tokens().float().mean()) <= 61
        (300, True)
        >>> ids = torch.cat([context, torch.tensor([[7, 8, 9]])], 1)
        >>> out = model.generate(ids, past_key_values=copy.deepcopy(cache), max_new_tokens=2, do_sample=False)
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 1, or None (one forward)")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be [batch, tokens] with at least one token, got shape {tuple(input_ids.shape)}"
        )
    past = cache.get_seq_length()
    mask = positions = None
    if attention_mask is not None:
        if attention_mask.shape[1] != past + input_ids.shape[1]:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} tokens; the cache holds {past} and input_ids add "
                f"{input_ids.shape[1]}"
            )
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    for start in range(0, input_ids.shape[1], chunk_size or input_ids.shape[1]):
        stop = min(start + (chunk_size or input_ids.shape[1]), input_ids.shape[1])
        if attention_mask is not None:
            mask, span = attention_mask[:, : past + stop], positions[:, past + start : past + stop]
        model(
            input_ids=input_ids[:, start:stop],
            attention_mask=mask,
            position_ids=None if attention_mask is None else span,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return cache
