"""Honest memory accounting and generation statistics for any cache.

``cache_nbytes`` counts the storage of every tensor a cache holds (payload, scales, zeros, scores, indices,
residual windows, and the inner tensors of quanto's quantized tensors), each storage once. ``dense_nbytes`` is
what the same tokens take in a 16-bit ``DynamicCache``: the reference for every compression ratio we publish.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import Cache


def _tensors(obj, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor reachable from a cache layer: plain, inside containers, or inside tensor subclasses."""
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            inner, _ = obj.__tensor_flatten__()
            for name in inner:
                yield from _tensors(getattr(obj, name), depth + 1)
        else:
            yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        for item in vars(obj).values():
            yield from _tensors(item, depth + 1)


def cache_nbytes(cache: Cache) -> int:
    """Bytes of all tensor storage held by ``cache`` (views of one storage counted once, at its full size)."""
    seen: dict[int, int] = {}
    for layer in cache.layers:
        for tensor in _tensors(layer):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())


def _dense_geometry(layer) -> tuple[int, int, int] | None:
    """(batch, kv_heads, head_dim) of a layer, from whichever tensors it keeps."""
    if hasattr(layer, "dense_geometry"):
        return layer.dense_geometry()
    for name in ("keys", "_quantized_keys"):
        tensor = getattr(layer, name, None)
        if isinstance(tensor, tuple):  # transformers' fp8 layer keeps (payload, scale)
            tensor = tensor[0]
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 4:
            batch, heads, _, head_dim = tensor.shape
            return batch, heads, head_dim
    return None


def dense_tokens(layer) -> int:
    """Tokens a ``DynamicCache`` layer of the same kind would hold now (a sliding layer keeps its window)."""
    seen = layer.get_seq_length()
    if getattr(layer, "is_sliding", False):
        return min(seen, layer.sliding_window - 1)
    return seen


def dense_nbytes(cache: Cache, dtype: torch.dtype = torch.float16) -> int:
    """Bytes the tokens this cache has seen would take in a ``DynamicCache`` at ``dtype`` (16-bit by default)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for layer in cache.layers:
        geometry = _dense_geometry(layer)
        if geometry is None:
            continue
        batch, heads, head_dim = geometry
        total += 2 * batch * heads * dense_tokens(layer) * head_dim * itemsize
    return total


def cache_stats(cache: Cache, dtype: torch.dtype = torch.float16) -> dict:
    """``nbytes`` stored, ``dense_nbytes`` at ``dtype`` and their ``ratio`` (dense over stored; NaN when empty)."""
    stored, dense = cache_nbytes(cache), dense_nbytes(cache, dtype)
    return {"nbytes": stored, "dense_nbytes": dense, "ratio": dense / stored if stored else float("nan")}


def compression_ratio(cache: Cache, dtype: torch.dtype = torch.float16) -> float:
    """Dense 16-bit bytes over real stored bytes, metadata included."""
    return cache_stats(cache, dtype)["ratio"]


@dataclass
class LeanKVMonitor:
    """Records bytes, ratio and per-step latency while a cache is used.

    Call ``step(cache)`` after each forward pass (or pass it as a ``generate`` streamer-free hook by calling it
    yourself in a loop); ``summary()`` gives p50/p99 step latency and the last bytes/ratio.

    Example:
        >>> from transformers import DynamicCache
        >>> mon = LeanKVMonitor()
        >>> mon.summary()["steps"]
        0
    """

    latencies_ms: list[float] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    _last: float | None = None

    def start(self) -> None:
        self._last = time.perf_counter()

    def step(self, cache: Cache) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.latencies_ms.append((now - self._last) * 1e3)
        stats = cache_stats(cache)
        self.nbytes.append(stats["nbytes"])
        self.ratios.append(stats["ratio"])
        self._last = time.perf_counter()

    def summary(self) -> dict:
        lat = torch.tensor(self.latencies_ms) if self.latencies_ms else None
        return {
            "steps": len(self.latencies_ms),
            "p50_ms": float(lat.quantile(0.5)) if lat is not None else None,
            "p99_ms": float(lat.quantile(0.99)) if lat is not None else None,
            "nbytes": self.nbytes[-1] if self.nbytes else 0,
            "ratio": self.ratios[-1] if self.ratios else None,
        }
