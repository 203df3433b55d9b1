"""leankv-hf: smaller KV caches for HuggingFace Transformers, with the eval harness that proves it."""

from .attention import use_leankv_attention
from .caches import LeanKVConfig, QuantizedHeteroCache, SparseHeadCache, UnifiedLeanCache
from .models import load_model
from .monitor import LeanKVMonitor, cache_nbytes, cache_stats, compression_ratio, dense_nbytes
from .prefill import prefill
from .scoring import ContextReconstruction, ObservationWindow
from .stages import LowRanker, Quantizer, Reconstructor, Sparsifier

__all__ = [
    "LeanKVConfig",
    "LeanKVMonitor",
    "LowRanker",
    "ObservationWindow",
    "QuantizedHeteroCache",
    "Quantizer",
    "ContextReconstruction",
    "Reconstructor",
    "SparseHeadCache",
    "Sparsifier",
    "UnifiedLeanCache",
    "cache_nbytes",
    "cache_stats",
    "compression_ratio",
    "dense_nbytes",
    "load_model",
    "prefill",
    "use_leankv_attention",
]
__version__ = "0.1.0"
