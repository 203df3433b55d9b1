"""The ``leankv`` attention function: attends over a layer's ragged compressed body plus its dense recent
window, and hands the attention each token received back to the layer (queries never reach ``update()``).

transformers calls it with the tensors ``update()`` returned; a leankv layer tags its key tensor with itself
(``key.leankv_layer``), and a quantized cache's layer tags a decode step's keys with itself as ``key.leankv_stored``
(its store read in place, nothing scored). Untagged calls (sliding layers, other caches) go straight to sdpa.
"""

from __future__ import annotations

from collections.abc import Iterator

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
    """Switch ``model`` to the leankv attention function (it runs sdpa for everything dense), and hook its decoder
    so that a cache whose scorer probes (`scoring.ContextReconstruction`) scores each prompt right after its forward."""
    register()
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)
    decoder = model.get_decoder()
    if not getattr(decoder, "_leankv_hooked", False):
        decoder.register_forward_hook(_after_forward, with_kwargs=True)
        decoder._leankv_hooked = True


def _after_forward(module: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
    cache = kwargs.get("past_key_values")
    finish = getattr(cache, "after_forward", None)
    if finish is not None:
        tokens = {name: kwargs[name] for name in ("input_ids", "inputs_embeds") if kwargs.get(name) is not None}
        if not tokens and args:  # input_ids given positionally
            tokens = {"input_ids": args[0]}
        finish(module, tokens, kwargs.get("attention_mask"))


def _recent_mask(mask: torch.Tensor | None, batch: int, q_len: int, r_len: int, device) -> torch.Tensor:
    """Boolean ``[B, 1, Q, R]`` visibility of the dense recent part (causal and padding from transformers)."""
    if mask is None:  # transformers skipped it: plain causal, no padding
        rows = torch.arange(q_len, device=device)[:, None] + (r_len - q_len)
        return (torch.arange(r_len, device=device)[None, :] <= rows).expand(batch, 1, q_len, r_len)
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask[..., -r_len:].expand(batch, 1, q_len, r_len)


def _visible(recent: torch.Tensor, body: torch.Tensor | None, rows: slice, heads: int, groups: int) -> torch.Tensor:
    """``[B, Hkv, G*q, body + R]``: what the query ``rows`` see, packed like `_gqa_pack` queries; ``recent``
    ``[B, 1, Q, R]`` from `_recent_mask`, ``body[B, Hkv, W]`` the valid rows of the stored body (or None)."""
    recent = recent[:, :, rows].expand(-1, heads, -1, -1)
    if body is not None:
        recent = torch.cat([body[:, :, None].expand(-1, -1, recent.shape[2], -1), recent], -1)
    return recent[:, :, None].expand(-1, -1, groups, -1, -1).flatten(2, 3)


def _gqa_pack(query: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, Hq, Q, D] -> [B, Hkv, G*Q, D]``: attend per KV head without repeating keys."""
    batch, heads, q_len, dim = query.shape
    return query.reshape(batch, heads // groups, groups * q_len, dim)


MASK_BLOCK_BYTES = 8 * 2**20  # what the float32 scores or mask of one block of queries may take


def _query_blocks(q_len: int, per_query: int) -> Iterator[slice]:
    """Slices of ``q_len`` queries whose float32 rows of ``per_query`` values fit in ``MASK_BLOCK_BYTES``."""
    rows = max(1, MASK_BLOCK_BYTES // (4 * per_query))
    return (slice(start, min(start + rows, q_len)) for start in range(0, q_len, rows))


def _masked_attention(query, key, value, recent, body, scale: float, groups: int) -> torch.Tensor:
    """sdpa of ``query[B, Hq, Q, D]`` over ``key``/``value`` ``[B, Hkv, L, D]`` (the stored body, then the dense
    part), masked by ``recent[B, 1, Q, R]`` (`_recent_mask`) and ``body[B, Hkv, W]`` (its valid rows, or None). The
    query heads of a KV head share its keys (sdpa's ``enable_gqa``), and without a body every head shares one mask.
    sdpa turns a boolean mask into floats; queries go in blocks so that mask stays within ``MASK_BLOCK_BYTES`` however
    long the context (a chunked prefill's peak memory follows the compressed cache, not the prompt)."""
    q_heads, q_len = query.shape[1], query.shape[2]
    mask_heads = 1 if body is None else q_heads
    rows = None if body is None else body.repeat_interleave(groups, 1)[:, :, None]  # [B, Hq, 1, W]
    out = []
    for block in _query_blocks(q_len, query.shape[0] * mask_heads * key.shape[2]):
        mask = recent[:, :, block]
        if rows is not None:
            mask = torch.cat([rows.expand(-1, -1, mask.shape[2], -1), mask.expand(-1, q_heads, -1, -1)], -1)
        out.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, block], key, value, attn_mask=mask, scale=scale, enable_gqa=groups > 1
            )
        )
    return torch.cat(out, 2)


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
    stored = getattr(key, "leankv_stored", None)
    if stored is not None:
        stored.attended = True
        return _stored_step(stored.store, query, key, value, attention_mask, scaling), None
    layer = getattr(key, "leankv_layer", None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    batch, q_heads, q_len, dim = query.shape
    heads = key.shape[1]
    groups = q_heads // heads
    scale = scaling if scaling is not None else dim**-0.5
    if layer.probe is not None:
        return _probe_attention(layer, query, key, value, scale, groups), None
    layer.attended = True
    window = layer.score_window(q_len)
    # One scoring query without padding sees the whole window: no mask to build.
    plain_step = attention_mask is None and q_len == window == 1 and layer.prefilled
    recent_mask = None if plain_step else _recent_mask(attention_mask, batch, q_len, key.shape[2], query.device)

    # One kernel call where it runs: the output, and the scores every stored row and window token received.
    fused_step = layer.decode_step(query.dtype) if q_len == window == 1 else None
    # Else a transient body, this layer only. Decode reads it through its products alone: in place where it can.
    body = None if fused_step is not None else layer.body_view(query.dtype, query, fused=window == q_len)
    packed_q = _gqa_pack(query, groups)
    valid = None if body is None else body.valid
    if fused_step is not None:
        step, basis = fused_step
        reduced = packed_q if basis is None else packed_q @ basis
        visible = None if recent_mask is None else recent_mask[:, 0, 0]
        by_max, peak = layer.gqa == "max", layer.settings.scorer.reduce == "max"
        out = step(packed_q, reduced, key, value, visible, scale, by_max, peak, layer.recent_scores, layer.recent_ages)
        probs = None  # folded already
    elif window == q_len:  # every query reports its scores (decode): one explicit softmax gives output and scores
        visible = None if recent_mask is None else _visible(recent_mask, None, slice(None), heads, groups)
        probs, out = _explicit_attention(packed_q, body, key, value, visible, scale)
    else:
        if body is None:
            # No padding and a fresh prompt: plain causal attention, which lets sdpa skip the materialized mask.
            all_k = key
            causal = attention_mask is None and q_len == key.shape[2]
            out = torch.nn.functional.scaled_dot_product_attention(
                query,
                key,
                value,
                attn_mask=None if causal else recent_mask,
                is_causal=causal,
                scale=scale,
                enable_gqa=groups > 1,
            ).reshape(batch, key.shape[1], groups * q_len, -1)
        else:  # a prompt after earlier turns: rebuild the body's keys and attend over body and prompt
            all_k, all_v = torch.cat([body.full_keys(), key], 2), torch.cat([body.values.dense(), value], 2)
            out = _masked_attention(query, all_k, all_v, recent_mask, valid, scale, groups)
        probs = None
        if window:
            tail = _visible(recent_mask, valid, slice(q_len - window, None), heads, groups)
            logits = torch.matmul(_gqa_pack(query[:, :, -window:], groups), all_k.transpose(-1, -2)).float() * scale
            probs = torch.softmax(logits.masked_fill(~tail, float("-inf")), dim=-1)
            # a padding query sees nothing (its softmax is NaN): it scores nothing
            probs = probs.masked_fill_(~tail.any(-1, keepdim=True), 0)
        else:  # a scorer may score the prompt as a whole (`Scorer.prompt_scores`)
            sees = _visible(recent_mask, valid, slice(q_len - 1, None), heads, 1)[:, :, 0]
            real = recent_mask[:, 0, -1, -q_len:]  # this forward's tokens that are not padding
            probs = layer.settings.scorer.prompt_scores(query, all_k, real, sees, scale)  # [B, Hkv, G, L]
    last_query_sees = None if recent_mask is None else recent_mask[:, 0, -1]
    if probs is not None:
        # [B, Hkv, G*w, L] -> per KV head, aggregated over its query heads, summed over the window's queries
        per_head = probs.view(batch, key.shape[1], groups, -1, probs.shape[-1])
        per_head = per_head.amax(2) if layer.gqa == "max" else per_head.mean(2)
        observed = per_head.amax(2) if layer.settings.scorer.reduce == "max" else per_head.sum(2)
        layer.observe(observed, per_head.shape[2], last_query_sees, q_len)
    else:  # no query reports scores (a query-aware policy, a prompt a probe will score, a step that folded its own)
        layer.observe(None, 0, last_query_sees, q_len)  # the layer still compacts when due
    out = out.reshape(batch, q_heads, q_len, -1).transpose(1, 2).contiguous()
    return out, None


def _explicit_attention(packed, body, key, value, visible, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax of the ``packed`` queries (`_gqa_pack`) over the body's rows, through its products (read in place
    where the kernels can), then the dense window ``key``/``value``; ``visible`` (None: all) masks the last of those
    columns. Returns the float32 probabilities ``[B, Hkv, G*Q, body + R]`` and the output ``[B, Hkv, G*Q, D]``."""
    logits = torch.matmul(packed, key.transpose(-1, -2))
    if body is not None:
        logits = torch.cat([body.logits(packed), logits], -1)
    if visible is not None:
        logits[..., -visible.shape[-1] :].masked_fill_(~visible, -torch.inf)
    probs = torch.softmax(logits.float().mul_(scale), dim=-1)
    probs_v = probs.to(value.dtype)
    out = torch.matmul(probs_v[..., -key.shape[2] :], value)
    if body is not None:
        out += body.values.weigh(probs_v[..., : body.valid.shape[-1]])
    return probs, out


def _stored_step(store, query, key, value, attention_mask, scaling: float | None) -> torch.Tensor:
    """One decode query over a `store.DenseStore`, read in place (`DenseStore.body`), then the exact window
    ``key``/``value``; ``attention_mask`` (if any) spans both. Returns ``[B, 1, Hq, D]``."""
    batch, q_heads, q_len, dim = query.shape
    body = store.body(query.dtype)
    visible = None
    if attention_mask is not None:
        visible = _recent_mask(attention_mask, batch, q_len, body.valid.shape[-1] + key.shape[2], query.device)
    scale = scaling if scaling is not None else dim**-0.5
    _, out = _explicit_attention(_gqa_pack(query, q_heads // key.shape[1]), body, key, value, visible, scale)
    return out.reshape(batch, q_heads, q_len, dim).transpose(1, 2).contiguous()


def _probe_attention(layer, query, key, value, scale: float, groups: int) -> torch.Tensor:
    """A probe re-reading window tokens ``[start, stop)`` (`scoring.ContextReconstruction`). Its queries attend to what
    the layer has stored (the compressed body), the window columns it reads (`LeanLayer._probe_view`) and their own
    tokens, causally; that output feeds the next layer (sdpa). A re-read token's score is the most attention it gets
    from the valid queries (over the query heads of its KV head) renormalized over the sinks, the re-read tokens and
    the probe's own, as KVzip does: a chunk's scores do not shrink as the context before it grows. Renormalized over
    those columns, the attention is a softmax over them alone, so only their logits are computed. Returns the output
    ``[B, P, Hq, D]``."""
    probe = layer.probe
    batch, q_heads, p_len, _ = query.shape
    heads = key.shape[1]
    device = query.device
    window = layer.recent_valid[:, layer.probe_columns]  # [B, C]: the window columns the probe reads
    own = torch.ones(p_len, p_len, dtype=torch.bool, device=device).tril()
    own = own & (probe.valid[:, None, :] | torch.eye(p_len, dtype=torch.bool, device=device))  # [B, P, P]
    visible = torch.cat([window[:, None, :].expand(-1, p_len, -1), own], -1)[:, None]  # [B, 1, P, C + P]
    all_keys, all_values, stored = key, value, None
    body = layer.body_view(query.dtype)
    sinks_k, sinks_valid = key[:, :, :0], torch.ones(batch, heads, 0, dtype=torch.bool, device=device)
    if body is not None:  # each head's first stored rows are its sinks: the earliest tokens, kept high, never moved
        stored_keys, stored = body.full_keys(), body.valid
        all_keys, all_values = torch.cat([stored_keys, key], 2), torch.cat([body.values.dense(), value], 2)
        sinks = min(layer.settings.sink, stored_keys.shape[2])
        sinks_k, sinks_valid = stored_keys[:, :, :sinks], body.valid[:, :, :sinks]
    out = _masked_attention(query, all_keys, all_values, visible, stored, scale, groups)
    is_sink = layer.probe_sinks  # [B, S]: the first S window columns read, before the re-read ones, may hold sinks
    sinks = is_sink.shape[1]
    span = slice(window.shape[1] - (probe.stop - probe.start), window.shape[1])  # the re-read columns; own ones follow
    scored = torch.cat([sinks_k, key[:, :, :sinks], key[:, :, span.start :]], 2)
    counted = torch.cat(  # [B, H, 1, S]: which of those columns each row's queries may count
        [sinks_valid, is_sink[:, None].expand(-1, heads, -1), window[:, None, span].expand(-1, heads, -1)], -1
    )[:, :, None]
    first, fixed = sinks_k.shape[2] + sinks, counted.shape[-1]
    uncounted = None if bool(counted.all()) else ~counted[:, :, None]  # usually none: no padding, every sink real
    invalid = None if bool(probe.valid.all()) else ~probe.valid[:, None, None, :, None]
    best = None
    for block in _query_blocks(p_len, batch * q_heads * scored.shape[2]):  # like the output: bounded memory
        logits = torch.matmul(_gqa_pack(query[:, :, block] * scale, groups), scored.transpose(-1, -2)).float()
        grid = logits.view(batch, heads, groups, block.stop - block.start, -1)
        if uncounted is not None:
            grid[..., :fixed].masked_fill_(uncounted, -torch.inf)
        grid[..., fixed:].masked_fill_(~own[:, None, None, block], -torch.inf)
        received = torch.softmax(grid, -1, out=grid)[..., first : first + span.stop - span.start]  # in place
        if invalid is not None:
            received = received.masked_fill(invalid[:, :, :, block], 0)
        per_head = (received.amax(2) if layer.gqa == "max" else received.mean(2)).amax(2)
        best = per_head if best is None else torch.maximum(best, per_head)
    layer.fold_probe(best)
    return out.transpose(1, 2).contiguous()
