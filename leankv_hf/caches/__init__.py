"""The three caches; one base (`LeanCache`), two layer kinds (dense quantized, ragged compressing)."""

from .hetero import QuantizedHeteroCache
from .sparse import SparseHeadCache
from .unified import LeanKVConfig, UnifiedLeanCache

__all__ = ["LeanKVConfig", "QuantizedHeteroCache", "SparseHeadCache", "UnifiedLeanCache"]
