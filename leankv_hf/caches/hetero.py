"""`QuantizedHeteroCache`: keys at more bits than values (K8V4, K4V2, ...), packed, recent tokens exact."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..store import DenseStore, Precision
from .base import CompressedLayer, LeanCache, check_storage_dtype, head_dim, sixteen_bit, text_config


class HeteroLayer(CompressedLayer):
    """One layer: a quantized `DenseStore` plus a residual window of recent tokens (``self.keys/values``).

    New tokens are attended exactly in the step they arrive; once the window holds ``2 * residual_length``
    tokens, the oldest are quantized in one chunk (a multiple of the key group for per-channel keys). The
    window (and a 16-bit side) is held at ``storage_dtype`` (default: the model's dtype, at most 16 bits).
    """

    is_croppable = True

    def __init__(
        self, key: Precision, value: Precision, residual_length: int, storage_dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.store = DenseStore(key, value)
        self.residual_length = residual_length
        self.storage_dtype = storage_dtype
        self.block = key.group_size if key.quantized and key.axis == "channel" else 1

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        window = self.storage_dtype or sixteen_bit(self.dtype)
        self.keys, self.values = key_states[:, :, :0].to(window), value_states[:, :, :0].to(window)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # One output buffer per side: the store dequantizes straight into it, then the window and the new tokens.
        stored, recent = self.store.length, self.keys.shape[-2]
        outs = []
        for window, new in ((self.keys, key_states), (self.values, value_states)):
            batch, heads, length, dim = new.shape
            out = new.new_empty(batch, heads, stored + recent + length, dim)
            out[:, :, stored : stored + recent] = window
            out[:, :, stored + recent :] = new
            outs.append(out)
        if stored:
            self.store.decode_into(*outs)
        self.keys = torch.cat([self.keys, key_states.to(self.keys.dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.values.dtype)], dim=-2)
        self._flush()
        return tuple(outs)

    def _flush(self) -> None:
        window = self.keys.shape[-2]
        if window < self.residual_length + max(self.residual_length, self.block):
            return
        n = window - self.residual_length
        n -= n % self.block
        self.store.append(self.keys[:, :, :n], self.values[:, :, :n])
        self.keys, self.values = self.keys[:, :, n:].clone(), self.values[:, :, n:].clone()

    def get_seq_length(self) -> int:
        return self.store.length + (self.keys.shape[-2] if self.is_initialized else 0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def reset(self) -> None:
        self.store = DenseStore(self.store.key, self.store.value)
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        total = max(self.get_seq_length() + tokens_to_remove, 0)
        if total >= self.store.length:
            self.keys, self.values = (
                self.keys[:, :, : total - self.store.length],
                self.values[:, :, : total - self.store.length],
            )
            return
        keep = total - total % self.block
        stored_k, stored_v = self.store.decode(self.keys.dtype)  # the cut block comes back as (dequantized) residual
        self.keys, self.values = stored_k[:, :, keep:total].clone(), stored_v[:, :, keep:total].clone()
        self.store.truncate(keep, self.block)

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.device)
        self.store.select_batch(index)
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)


@dataclass(frozen=True)
class HeteroConfig:
    """Validated settings of `QuantizedHeteroCache`."""

    key_bits: int = 8
    value_bits: int = 4
    group_size: int = 64
    key_axis: str = "token"
    key_group_size: int | None = None
    residual_length: int = 32
    scale_dtype: torch.dtype = torch.float16
    eight_bit: str = "int"
    storage_dtype: torch.dtype | None = None

    def __post_init__(self):
        if not isinstance(self.residual_length, int) or self.residual_length < 0:
            raise ValueError(f"residual_length={self.residual_length!r} must be an int >= 0")
        if self.eight_bit not in ("int", "fp8"):
            raise ValueError(f"eight_bit={self.eight_bit!r}: choose 'int' (int8 codes) or 'fp8' (e4m3)")
        object.__setattr__(self, "storage_dtype", check_storage_dtype(self.storage_dtype))
        self.key_precision(), self.value_precision()  # validates bits, groups, axis

    def key_precision(self) -> Precision:
        group = self.key_group_size or (32 if self.key_axis == "channel" else self.group_size)
        fmt = self.eight_bit if self.key_bits == 8 else "int"
        return Precision(self.key_bits, group, self.key_axis, fmt, self.scale_dtype)

    def value_precision(self) -> Precision:
        fmt = self.eight_bit if self.value_bits == 8 else "int"
        return Precision(self.value_bits, self.group_size, "token", fmt, self.scale_dtype)


class QuantizedHeteroCache(LeanCache):
    """Hetero-KV quantization: keys kept at more bits than values, packed; recent tokens in full precision.

    Works with any attention implementation (it hands back dequantized tensors). Hybrid models keep their
    sliding-window layers as windows; full-attention layers are quantized. The residual window (and a side at
    16 bits) is held at ``storage_dtype``: by default 16-bit, float16 for a float32 model (`sixteen_bit`).

    Example:
        >>> from leankv_hf import QuantizedHeteroCache
        >>> from leankv_hf.testing import tiny_model, tiny_tokenizer
        >>> model, tok = tiny_model("llama"), tiny_tokenizer()
        >>> cache = QuantizedHeteroCache(model, key_bits=8, value_bits=4, group_size=16)
        >>> out = model.generate(**tok("hello " * 40, return_tensors="pt"), past_key_values=cache, max_new_tokens=4)
        >>> round(cache.compression_ratio(), 1) > 1
        True
    """

    def __init__(
        self,
        model_or_config: PreTrainedModel | PretrainedConfig,
        key_bits: int = 8,
        value_bits: int = 4,
        group_size: int = 64,
        key_axis: str = "token",
        key_group_size: int | None = None,
        residual_length: int = 32,
        scale_dtype: torch.dtype = torch.float16,
        eight_bit: str = "int",
        storage_dtype: torch.dtype | None = None,
    ):
        cfg = HeteroConfig(
            key_bits,
            value_bits,
            group_size,
            key_axis,
            key_group_size,
            residual_length,
            scale_dtype,
            eight_bit,
            storage_dtype,
        )
        dim = head_dim(text_config(model_or_config))
        key, value = cfg.key_precision(), cfg.value_precision()
        key.check_head_dim(dim)
        value.check_head_dim(dim)
        self.settings = cfg
        super().__init__(model_or_config, lambda _: HeteroLayer(key, value, residual_length, cfg.storage_dtype))
