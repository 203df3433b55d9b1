"""What every leankv cache shares: a transformers `Cache` whose full-attention layers are ours.

Sliding-window layers of hybrid models (Gemma 3) stay `DynamicSlidingWindowLayer`: they are already bounded,
and compressing them buys little. Byte accounting is the generic, honest counter of `monitor`.
"""

from __future__ import annotations

from collections.abc import Callable

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


class CompressedLayer(CacheLayerMixin):
    """What a leankv layer shares: no length limit, the dense geometry the byte counter compares against, and
    beam search / batch expansion through ``_select_batch(index)`` over its batch rows."""

    is_sliding = False

    def get_max_length(self) -> int:
        return -1

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


class SlidingWindowLayer(DynamicSlidingWindowLayer):
    """transformers' sliding-window layer, holding a copy of its window. Right after a prefill, transformers'
    own keeps a view of the whole prompt's keys and values, which pins all of them in memory."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        out = super().update(key_states, value_states, *args, **kwargs)
        if self.keys.untyped_storage().nbytes() > 2 * self.keys.numel() * self.keys.element_size():
            self.keys, self.values = self.keys.clone(), self.values.clone()
        return out


def uncompressed_layer(kind: str, **kwargs) -> CacheLayerMixin:
    """The layer a leankv cache keeps for a layer it does not compress (sliding, chunked)."""
    cls = DYNAMIC_LAYER_TYPE_MAPPING[kind]
    return (SlidingWindowLayer if cls is DynamicSlidingWindowLayer else cls)(**kwargs)


class LeanCache(Cache):
    """A `Cache` with one leankv layer per full-attention layer, built by ``make_layer(layer_idx)``."""

    def __init__(
        self, model_or_config: PreTrainedModel | PretrainedConfig, make_layer: Callable[[int], CacheLayerMixin]
    ):
        config = text_config(model_or_config)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
        layers = [
            make_layer(i) if kind == "full_attention" else uncompressed_layer(kind, **kwargs)
            for i, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs, strict=True))
        ]
        super().__init__(layers=layers)
        self.config = config

    def nbytes(self) -> int:
        """Bytes of every tensor this cache holds: payload, scales, zeros, scores, indices, windows."""
        return cache_nbytes(self)

    def dense_nbytes(self, dtype: torch.dtype = torch.float16) -> int:
        """Bytes the same tokens would take in a ``DynamicCache`` at ``dtype``."""
        return dense_nbytes(self, dtype)

    def compression_ratio(self, dtype: torch.dtype = torch.float16) -> float:
        """``dense_nbytes(dtype) / nbytes()``: real compression, metadata included."""
        return compression_ratio(self, dtype)
