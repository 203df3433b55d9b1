"""What every leankv cache shares: a transformers `Cache` whose full-attention layers are ours.

Sliding-window layers of hybrid models (Gemma 2/3, Mistral-style windows) keep exactly their window, held like
the cache's other tokens (`hetero.SlidingHeteroLayer`: at the cache's bits, the newest tokens exact, 16-bit by
default) instead of at the model's dtype. Byte accounting is the generic, honest counter of `monitor`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import Cache, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    CacheLayerMixin,
    DynamicSlidingWindowLayer,
    get_layer_types_and_kwargs,
)

from ..monitor import cache_nbytes, compression_ratio, dense_nbytes


def text_config(model_or_config: PreTrainedModel | PretrainedConfig) -> PretrainedConfig:
    config = model_or_config.config if isinstance(model_or_config, PreTrainedModel) else model_or_config
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"expected a transformers model or config, got {type(model_or_config).__name__}")
    return config.get_text_config(decoder=True)


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def full_attention_layers(config: PretrainedConfig) -> list[int]:
    """Indices of the layers a leankv cache compresses: the full-attention ones."""
    layer_types, _ = get_layer_types_and_kwargs(config)
    return [i for i, kind in enumerate(layer_types) if kind == "full_attention"]


def sixteen_bit(dtype: torch.dtype) -> torch.dtype:
    """Where a cache keeps tokens unquantized: the model's dtype, but float16 for a float32 model. Ratios are
    against a 16-bit dense cache, so a float32 copy would cost twice the reference for no useful precision;
    pass ``storage_dtype=torch.float32`` to a cache to keep it (exact equality with an fp32 ``DynamicCache``)."""
    return torch.float16 if dtype == torch.float32 else dtype


STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def check_storage_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A cache's ``storage_dtype`` option: None (`sixteen_bit`), or one of `STORAGE_DTYPES` (name or dtype)."""
    if dtype is None or dtype in STORAGE_DTYPES.values():
        return dtype
    if dtype in STORAGE_DTYPES:
        return STORAGE_DTYPES[dtype]
    raise ValueError(f"storage_dtype={dtype!r}: choose None (16-bit) or one of {sorted(STORAGE_DTYPES)}")


UNATTENDED = (
    "This cache reads its compressed tokens inside the 'leankv' attention function (and scores prompts from a hook "
    "on the model's decoder), but the model ran without them. Call leankv_hf.use_leankv_attention(model) (the cache "
    "constructors do it when given the model)."
)


class CompressedLayer(CacheLayerMixin):
    """What a leankv layer shares: no length limit, the dense geometry the byte counter compares against, and
    beam search / batch expansion through ``_select_batch(index)`` over its batch rows."""

    is_sliding = False
    pending = 0  # newest window tokens awaiting a probe's scores (see `scoring`); then the layer compacts
    attended = True  # whether the 'leankv' attention function read what update() last handed it
    probe = None  # the probe forward in progress (`scoring.Probe`): its keys and values are seen, never stored

    def get_max_length(self) -> int:
        return -1

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """New tokens join the window, at its storage dtype."""
        self.keys = torch.cat([self.keys, key_states.to(self.keys.dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.values.dtype)], dim=-2)

    def _tagged_window(self, key_states: torch.Tensor, value_states: torch.Tensor, tag: str):
        """The window (``self.keys``/``values``, ending with ``key_states``/``value_states``) as attention reads it:
        in the model's dtype, this step's tokens exactly as given, the keys tagged ``tag`` with this layer for the
        'leankv' attention function. The tag goes on a view: on the window itself it would make a reference cycle
        that holds the cache's memory until a garbage collection."""
        new = key_states.shape[-2]
        keys, values = self.keys, self.values
        if keys.dtype != key_states.dtype:  # converted whole, then this step's tokens put back: cheaper than a cat
            keys, values = keys.to(key_states.dtype), values.to(value_states.dtype)
            keys[:, :, -new:], values[:, :, -new:] = key_states, value_states
        keys = keys.view_as(keys)
        setattr(keys, tag, self)
        return keys, values

    def dense_geometry(self) -> tuple[int, int, int]:
        batch, heads, _, dim = self.keys.shape
        return batch, heads, dim

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats))


def uncompressed_layer(kind: str, **kwargs) -> CacheLayerMixin:
    """The layer a leankv cache keeps for a layer kind it neither compresses nor windows (transformers' own)."""
    return DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs)


def is_window(kind: str) -> bool:
    """Whether layers of ``kind`` (sliding or chunked attention) attend to a bounded window of recent tokens."""
    return DYNAMIC_LAYER_TYPE_MAPPING.get(kind) is DynamicSlidingWindowLayer


class LeanCache(Cache):
    """A `Cache` with one leankv layer per full-attention layer, built by ``make_layer(layer_idx)``, and one per
    sliding-window layer of a hybrid model, built by ``make_window(sliding_window)``."""

    def __init__(
        self,
        model_or_config: PreTrainedModel | PretrainedConfig,
        make_layer: Callable[[int], CacheLayerMixin],
        make_window: Callable[[int], CacheLayerMixin],
    ):
        config = text_config(model_or_config)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
        layers = [
            make_layer(i)
            if kind == "full_attention"
            else make_window(kwargs["sliding_window"])
            if is_window(kind)
            else uncompressed_layer(kind, **kwargs)
            for i, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs, strict=True))
        ]
        super().__init__(layers=layers)
        self.config = config
        self.probe = None
        self.input_ids = None  # the token ids a reloaded cache was saved with (`from_pretrained`)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if self.probe is not None and getattr(layer, "probe", None) is None:  # a probe is seen here, not stored
            return layer.peek(key_states, value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def pending_layers(self) -> list[CacheLayerMixin]:
        """The layers holding tokens a probe must score before they compact."""
        return [layer for layer in self.layers if isinstance(layer, CompressedLayer) and layer.pending]

    @contextmanager
    def probing(self, probe) -> Iterator[None]:
        """Within: forwards through this cache are the probe ``probe`` (`scoring.Probe`), nothing is stored."""
        layers = self.pending_layers()
        self.probe = probe
        for layer in layers:
            layer.probe = probe
        try:
            yield
        finally:
            self.probe = None
            for layer in layers:
                layer.probe = None

    def after_forward(self, decoder: torch.nn.Module, tokens: dict, attention_mask: torch.Tensor | None) -> None:
        """Called by the decoder's forward hook (`attention.use_leankv_attention`): a scorer that probes scores the
        tokens the forward left pending, and their layers compact them."""
        layers = self.pending_layers()
        if layers and self.probe is None:
            layers[0].settings.scorer.score(self, decoder, tokens, attention_mask)

    def arguments(self) -> dict:
        """The keyword arguments that build this cache again for the same model (`save_pretrained`)."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | Path, input_ids: torch.Tensor | None = None) -> Path:
        """Save this cache to ``directory`` (safetensors and JSON, replaced atomically; see `persist`), with the token
        ids it holds when given: ``generate`` must be passed them again, followed by the new ones.

        Example:
            >>> import copy, tempfile, torch
            >>> from leankv_hf import UnifiedLeanCache
            >>> from leankv_hf.testing import tiny_model
            >>> model = tiny_model("llama")
            >>> context = torch.randint(3, 200, (1, 40))
            >>> cache = UnifiedLeanCache(model, group_size=16, buffer=8)
            >>> _ = model(input_ids=context, past_key_values=cache)
            >>> path = cache.save_pretrained(tempfile.mkdtemp() + "/ctx", input_ids=context)
            >>> again = UnifiedLeanCache.from_pretrained(path, model=model)
            >>> again.get_seq_length(), torch.equal(again.input_ids, context)
            (40, True)
            >>> question = torch.cat([again.input_ids, torch.tensor([[5, 6, 7]])], 1)
            >>> out = model.generate(question, past_key_values=copy.deepcopy(again), max_new_tokens=2, do_sample=False)
        """
        from ..persist import save

        return save(self, directory, input_ids)

    @classmethod
    def from_pretrained(cls, directory: str | Path, model: PreTrainedModel) -> LeanCache:
        """A cache saved by `save_pretrained`, for ``model``; ``input_ids`` holds the token ids saved with it (or
        None). A model of other shapes or dtype, an altered or truncated file, or a newer format raises a
        `ValueError` naming what differs."""
        from ..persist import load

        cache, cache.input_ids = load(cls, directory, model)
        return cache

    def nbytes(self) -> int:
        """Bytes of every tensor this cache holds: payload, scales, zeros, scores, indices, windows."""
        return cache_nbytes(self)

    def dense_nbytes(self, dtype: torch.dtype = torch.float16) -> int:
        """Bytes the same tokens would take in a ``DynamicCache`` at ``dtype``."""
        return dense_nbytes(self, dtype)

    def compression_ratio(self, dtype: torch.dtype = torch.float16) -> float:
        """``dense_nbytes(dtype) / nbytes()``: real compression, metadata included."""
        return compression_ratio(self, dtype)
