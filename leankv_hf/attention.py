"""The ``leankv`` attention function: attends over a layer's ragged compressed body plus its dense recent
window, and hands the attention each token received back to the layer (queries never reach ``update()``).

transformers calls it with the tensors ``update()`` returned; a leankv layer tags its key tensor with itself
(``key.leankv_layer``). Untagged calls (sliding layers, other caches) go straight to sdpa.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "leankv"


def register() -> None:
    """Make ``attn_implementation="leankv"`` available (idempotent)."""
    AttentionInterface.register(NAME, leankv_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_leankv_attention(model) -> None:
    """Switch ``model`` to the leankv attention function (it runs sdpa for everything dense)."""
    register()
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)


def _recent_mask(mask: torch.Tensor | None, batch: int, q_len: int, r_len: int, device) -> torch.Tensor:
    """Boolean ``[B, 1, Q, R]`` visibility of the dense recent part (causal and padding from transformers)."""
    if mask is None:  # transformers skipped it: plain causal, no padding
        rows = torch.arange(q_len, device=device)[:, None] + (r_len - q_len)
        return (torch.arange(r_len, device=device)[None, :] <= rows).expand(batch, 1, q_len, r_len)
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask[..., -r_len:].expand(batch, 1, q_len, r_len)


def _gqa_pack(query: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, Hq, Q, D] -> [B, Hkv, G*Q, D]``: attend per KV head without repeating keys."""
    batch, heads, q_len, dim = query.shape
    return query.reshape(batch, heads // groups, groups * q_len, dim)


def leankv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    layer = getattr(key, "leankv_layer", None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    layer.attended = True
    batch, q_heads, q_len, dim = query.shape
    groups = q_heads // key.shape[1]
    scale = scaling if scaling is not None else dim**-0.5
    recent_mask = _recent_mask(attention_mask, batch, q_len, key.shape[2], query.device)

    body = layer.body_view(query.dtype, (key, value), query)  # body + recent, or None: transient, this layer only
    if body is None:
        all_k, all_v = key, value
        full_mask = recent_mask
    else:
        all_k, all_v, body_valid = body
        body_mask = body_valid[:, :, None, None, :].expand(-1, -1, groups, q_len, -1)
        recent = recent_mask[:, :, None].expand(-1, key.shape[1], groups, -1, -1)
        full_mask = torch.cat([body_mask, recent], dim=-1).flatten(2, 3)  # [B, Hkv, G*Q, L]

    window = layer.score_window(q_len)
    packed_q = _gqa_pack(query, groups)
    if window == q_len:  # decode: one explicit softmax gives both the output and the scores
        logits = torch.matmul(packed_q, all_k.transpose(-1, -2)).float() * scale
        logits = logits.masked_fill(~full_mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out = torch.matmul(probs.to(all_v.dtype), all_v)
    else:
        if body is None:
            # No padding and a fresh prompt: plain causal attention, which lets sdpa skip the materialized mask.
            causal = attention_mask is None and q_len == key.shape[2]
            out = torch.nn.functional.scaled_dot_product_attention(
                query,
                all_k,
                all_v,
                attn_mask=None if causal else full_mask,
                is_causal=causal,
                scale=scale,
                enable_gqa=groups > 1,
            ).reshape(batch, key.shape[1], groups * q_len, -1)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                packed_q, all_k, all_v, attn_mask=full_mask, scale=scale
            )
        probs = None
        if window:
            tail_q = query[:, :, -window:]
            if body is None:
                tail_mask = recent_mask[..., -window:, :].expand(-1, key.shape[1], -1, -1).repeat(1, 1, groups, 1)
            else:
                tail_mask = full_mask.unflatten(2, (groups, q_len))[:, :, :, -window:].flatten(2, 3)
            logits = torch.matmul(_gqa_pack(tail_q, groups), all_k.transpose(-1, -2)).float() * scale
            probs = torch.softmax(logits.masked_fill(~tail_mask, float("-inf")), dim=-1)
    if probs is not None:
        # [B, Hkv, G*w, L] -> per KV head, aggregated over its query heads, summed over the window's queries
        per_head = probs.view(batch, key.shape[1], groups, -1, probs.shape[-1])
        per_head = per_head.amax(2) if layer.gqa == "max" else per_head.mean(2)
        layer.observe(per_head.sum(2), n_queries=per_head.shape[2], visible=recent_mask[:, 0, -1])
    else:  # a query-aware policy takes no scores, but its layer still compacts
        layer.observe(None, n_queries=0, visible=recent_mask[:, 0, -1])
    out = out.reshape(batch, q_heads, q_len, -1).transpose(1, 2).contiguous()
    return out, None
