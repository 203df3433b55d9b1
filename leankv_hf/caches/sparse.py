"""`SparseHeadCache`: each KV head keeps its own important tokens; pruned tokens leave memory."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..attention import use_leankv_attention
from ..policy import Policy, check_budget_scope, sparse_policy
from ..scoring import ObservationWindow, Scorer, make_scorer, scorer_spec
from ..store import Precision
from .base import LeanCache, check_storage_dtype, full_attention_layers, text_config
from .hetero import SlidingHeteroLayer
from .layer import LayerSettings, LeanLayer

GQA_MODES = ("max", "mean")


@dataclass(frozen=True)
class SparseConfig:
    """Validated settings of `SparseHeadCache`. ``budget``: a fraction of the tokens in (0, 1], or an int
    number of tokens per head (recent window and sinks included); ``budget_scope`` "global" (with a probing scorer)
    lets the layers share the model's budget by the probe's scores instead of each keeping ``budget``."""

    budget: float | int = 0.2
    policy: str = "adakv"
    window: int = 32
    recent: int = 32
    sink: int = 4
    interval: int = 16
    gqa: str = "max"
    scorer: str | dict | Scorer = "window"
    storage_dtype: torch.dtype | None = None
    budget_scope: str = "layer"
    policy_options: dict = field(default_factory=dict)

    def __post_init__(self):
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"budget={b!r} must be a fraction in (0, 1] or an int token count")
        if isinstance(b, float) and not 0 < b <= 1:
            raise ValueError(f"budget={b!r}: a fraction must be in (0, 1]; pass an int for a token count")
        if isinstance(b, int) and b < 1:
            raise ValueError(f"budget={b!r}: a token count must be >= 1")
        for name in ("window", "recent", "sink", "interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name in ("window", "interval") else 0):
                raise ValueError(f"{name}={value!r} must be an int >= {1 if name in ('window', 'interval') else 0}")
        if isinstance(b, int) and b < self.recent + self.sink:
            raise ValueError(
                f"budget={b} tokens per head cannot hold the recent window ({self.recent}) and sinks ({self.sink}): "
                f"raise it to >= {self.recent + self.sink} or lower recent/sink"
            )
        object.__setattr__(self, "storage_dtype", check_storage_dtype(self.storage_dtype))
        if self.gqa not in GQA_MODES:
            raise ValueError(f"gqa={self.gqa!r}: choose one of {GQA_MODES}")
        policy = self.build_policy()  # unknown policy names and options fail here, at construction
        scorer = self.build_scorer()
        object.__setattr__(self, "scorer", scorer_spec(scorer))
        if policy.thresholds and scorer.reduce != "mean":
            raise ValueError(
                f"policy={self.policy!r} compares mean attention with alpha / context, but scorer={self.scorer!r} "
                "scores by maximum: choose a ranking policy (snapkv, adakv, pyramid, ...)"
            )
        check_budget_scope(self.budget_scope, scorer, True)
        if policy.page_size and not isinstance(scorer, ObservationWindow):
            raise ValueError(
                f"policy={self.policy!r} evicts nothing, so it takes no scorer; got scorer={self.scorer!r}"
            )

    def build_policy(self) -> Policy:
        return sparse_policy(self.policy, **self.policy_options)

    def build_scorer(self) -> Scorer:
        return make_scorer(self.scorer, self.window)


class SparseHeadCache(LeanCache):
    """Per-head dynamic sparsity. Needs the ``leankv`` attention function: given a model, it switches it.

    Kept tokens are held at ``storage_dtype`` (default 16-bit: float16 for a float32 model, see `sixteen_bit`).

    Example:
        >>> from leankv_hf import SparseHeadCache
        >>> from leankv_hf.testing import tiny_model, tiny_tokenizer
        >>> model, tok = tiny_model("llama"), tiny_tokenizer()
        >>> cache = SparseHeadCache(model, budget=0.5, policy="adakv", recent=8, window=8)
        >>> out = model.generate(**tok("hello " * 40, return_tensors="pt"), past_key_values=cache, max_new_tokens=4)
        >>> cache.kept_tokens().shape
        torch.Size([4, 1, 2])
    """

    def __init__(
        self,
        model_or_config: PreTrainedModel | PretrainedConfig,
        budget: float | int = 0.2,
        policy: str = "adakv",
        window: int = 32,
        recent: int = 32,
        sink: int = 4,
        interval: int = 16,
        gqa: str = "max",
        scorer: str | dict | Scorer = "window",
        storage_dtype: torch.dtype | None = None,
        budget_scope: str = "layer",
        **policy_options,
    ):
        cfg = SparseConfig(
            budget, policy, window, recent, sink, interval, gqa, scorer, storage_dtype, budget_scope, policy_options
        )
        self.settings = cfg
        settings = LayerSettings(
            tiers=((Precision(16), Precision(16)),),
            policy=cfg.build_policy(),
            budget=budget,
            scorer=cfg.build_scorer(),
            recent=recent,
            sink=sink,
            interval=interval,
            gqa=gqa,
            storage_dtype=cfg.storage_dtype,
            budget_scope=budget_scope,
        )
        compressed = full_attention_layers(text_config(model_or_config))  # layer budgets count only these
        super().__init__(
            model_or_config,
            lambda i: LeanLayer(compressed.index(i), len(compressed), settings),
            lambda window: SlidingHeteroLayer(Precision(16), Precision(16), recent, cfg.storage_dtype, window),
        )
        if isinstance(model_or_config, PreTrainedModel):
            use_leankv_attention(model_or_config)

    def arguments(self) -> dict:
        arguments = {
            f.name: getattr(self.settings, f.name) for f in fields(self.settings) if f.name != "policy_options"
        }
        return {**arguments, **self.settings.policy_options}

    def _lean_layers(self) -> list[LeanLayer]:
        return [layer for layer in self.layers if isinstance(layer, LeanLayer)]

    def kept_tokens(self) -> torch.Tensor:
        """``[layers, batch, kv_heads]``: tokens each head of each compressed layer holds now (with ``quest``,
        which evicts nothing, every token seen)."""
        return torch.stack([layer.kept_tokens() for layer in self._lean_layers()])
