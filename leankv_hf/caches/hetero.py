"""`QuantizedHeteroCache`: keys at more bits than values (K8V4, K4V2, ...), packed, recent tokens exact."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..attention import use_leankv_attention
from ..store import DenseStore, Precision, fitting_group
from .base import UNATTENDED, CompressedLayer, LeanCache, check_storage_dtype, head_dim, sixteen_bit, text_config

IN_PLACE_DEVICES = ("cuda", "cpu")  # where a decode step reads the store in place (see `HeteroLayer`)


class HeteroLayer(CompressedLayer):
    """One layer: a quantized `DenseStore` plus a residual window of recent tokens (``self.keys/values``).

    New tokens are attended exactly in the step they arrive; once the window holds ``2 * residual_length``
    tokens, the oldest are quantized in one chunk (a multiple of the key group for per-channel keys). The
    window (and a 16-bit side) is held at ``storage_dtype`` (default: the model's dtype, at most 16 bits).

    ``in_place`` (the model runs the 'leankv' attention function): a decode step hands attention the window alone,
    and attention reads the store where it lies (`store.DenseStore.body`: the Triton kernels on CUDA, numba on
    CPU), so no dequantized copy of the cache is made per step. Otherwise, and for prompts, attention gets
    everything dequantized, which works with any attention implementation.
    """

    is_croppable = True
    saved_state = ("keys", "values", "store")  # what `persist` saves and restores

    def __init__(
        self,
        key: Precision,
        value: Precision,
        residual_length: int,
        storage_dtype: torch.dtype | None = None,
        in_place: bool = False,
    ):
        super().__init__()
        self.store = DenseStore(key, value)
        self.residual_length = residual_length
        self.storage_dtype = storage_dtype
        self.in_place = in_place
        self.block = key.group_size if key.quantized and key.axis == "channel" else 1

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        window = self.storage_dtype or sixteen_bit(self.dtype)
        self.keys, self.values = key_states[:, :, :0].to(window), value_states[:, :, :0].to(window)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.attended:
            raise RuntimeError(UNATTENDED)
        if (
            self.in_place
            and key_states.device.type in IN_PLACE_DEVICES
            and key_states.shape[-2] == 1
            and self.store.length
        ):
            # Read in place: the window's oldest tokens join the store first, so attention reads this step's state.
            self._flush()
            self._append(key_states, value_states)
            self.attended = False
            return self._tagged_window(key_states, value_states, "leankv_stored")
        outs = self.peek(key_states, value_states)
        self._append(key_states, value_states)
        self._flush()
        return outs

    def peek(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention reads with these new tokens: everything held, then them; nothing is stored. One output
        buffer per side: the store dequantizes straight into it, then the window and the new tokens."""
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


class SlidingHeteroLayer(HeteroLayer):
    """A sliding-window layer of a hybrid model (Gemma 2/3, Mistral-style windows) held like the cache's other
    layers: the older tokens at the cache's bits, the newest ``residual_length`` exact, and only the window the
    model attends to kept (the ``sliding_window - 1`` newest tokens; per-channel keys round that up to whole groups,
    and attention still reads exactly the window)."""

    is_sliding = True
    is_croppable = False
    saved_state = (*HeteroLayer.saved_state, "cumulative_length")

    def __init__(self, key: Precision, value: Precision, residual_length: int, storage_dtype, sliding_window: int):
        super().__init__(key, value, residual_length, storage_dtype)
        self.sliding_window = sliding_window
        self.cumulative_length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        outs = super().update(key_states, value_states)  # through `peek`: the window before, then the new tokens
        self.cumulative_length += key_states.shape[-2]
        extra = self.store.length + self.keys.shape[-2] - (self.sliding_window - 1)
        if extra > 0:  # forget what has left the window: whole blocks of the store first, then the exact window
            stored = min(self.store.length, extra - extra % self.block)
            self.store.drop(stored)
            exact = 0 if self.store.length else min(extra - stored, self.keys.shape[-2])
            if exact:
                self.keys, self.values = self.keys[:, :, exact:].clone(), self.values[:, :, exact:].clone()
        return outs

    def peek(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The window the model attends to (what `get_mask_sizes` announces), then the new tokens."""
        keep = min(self.cumulative_length, self.sliding_window - 1) + key_states.shape[-2]
        keys, values = super().peek(key_states, value_states)
        return keys[:, :, -keep:], values[:, :, -keep:]

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = min(self.cumulative_length, self.sliding_window - 1)
        return held + query_length, max(self.cumulative_length - self.sliding_window + 1, 0)

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a sliding-window layer cannot be cropped: the tokens it forgot do not come back")


@dataclass(frozen=True)
class HeteroConfig:
    """Validated settings of `QuantizedHeteroCache`. ``group_size`` None: `store.fitting_group` of the head_dim."""

    key_bits: int = 8
    value_bits: int = 4
    group_size: int | None = None
    key_axis: str = "token"
    key_group_size: int | None = None
    residual_length: int = 32
    scale_dtype: torch.dtype = torch.float16
    eight_bit: str = "int"
    storage_dtype: torch.dtype | None = None

    def __post_init__(self):
        if (
            isinstance(self.residual_length, bool)
            or not isinstance(self.residual_length, int)
            or self.residual_length < 0
        ):
            raise ValueError(f"residual_length={self.residual_length!r} must be an int >= 0")
        if self.eight_bit not in ("int", "fp8"):
            raise ValueError(f"eight_bit={self.eight_bit!r}: choose 'int' (int8 codes) or 'fp8' (e4m3)")
        object.__setattr__(self, "storage_dtype", check_storage_dtype(self.storage_dtype))
        self.key_precision(64), self.value_precision(64)  # validates bits, groups, axis

    def key_precision(self, head_dim: int) -> Precision:
        group = self.key_group_size or (32 if self.key_axis == "channel" else self.group(head_dim))
        fmt = self.eight_bit if self.key_bits == 8 else "int"
        return Precision(self.key_bits, group, self.key_axis, fmt, self.scale_dtype)

    def value_precision(self, head_dim: int) -> Precision:
        fmt = self.eight_bit if self.value_bits == 8 else "int"
        return Precision(self.value_bits, self.group(head_dim), "token", fmt, self.scale_dtype)

    def group(self, head_dim: int) -> int:
        """``group_size``, or by default `store.fitting_group` of the head_dim."""
        return fitting_group(head_dim) if self.group_size is None else self.group_size


class QuantizedHeteroCache(LeanCache):
    """Hetero-KV quantization: keys kept at more bits than values, packed; recent tokens in full precision.

    Given the model, it switches it to the 'leankv' attention function, which reads the quantized tokens where they
    lie at each decode step; given a config, it hands back dequantized tensors (any attention implementation).
    Hybrid models keep their sliding-window layers as windows; full-attention layers are quantized. The residual window (and a side at
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
        group_size: int | None = None,
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
        key, value = cfg.key_precision(dim), cfg.value_precision(dim)
        key.check_head_dim(dim)
        value.check_head_dim(dim)
        self.settings = cfg
        in_place = isinstance(model_or_config, PreTrainedModel)
        super().__init__(
            model_or_config,
            lambda _: HeteroLayer(key, value, residual_length, cfg.storage_dtype, in_place),
            lambda window: SlidingHeteroLayer(key, value, residual_length, cfg.storage_dtype, window),
        )
        if in_place:
            use_leankv_attention(model_or_config)

    def arguments(self) -> dict:
        return asdict(self.settings)
