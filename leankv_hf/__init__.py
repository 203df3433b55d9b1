"""leankv-hf: smaller KV caches for HuggingFace Transformers, with the eval harness that proves it."""

from .models import load_model
from .monitor import LeanKVMonitor, cache_nbytes, compression_ratio, dense_nbytes

__all__ = ["LeanKVMonitor", "cache_nbytes", "compression_ratio", "dense_nbytes", "load_model"]
__version__ = "0.1.0"
