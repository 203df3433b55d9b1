"""`UnifiedLeanCache`: LeanKV's unified compression — per token and head, high precision, low precision or
pruned, chosen from the attention each token receives, and revised as decoding goes on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..attention import use_leankv_attention
from ..policy import LeanKVPolicy
from ..store import Precision
from .base import LeanCache, head_dim, text_config
from .layer import LayerSettings, LeanLayer
from .sparse import GQA_MODES


@dataclass(frozen=True)
class LeanKVConfig:
    """Validated settings of `UnifiedLeanCache`; ``from_dict``/``to_dict`` round-trip (YAML/JSON friendly).

    ``high``/``low`` are (key_bits, value_bits) of the two tiers. A token whose mean attention is at least
    ``alpha_quant / context`` stays high, at least ``alpha_prune / context`` goes low, else it is pruned. The
    newest ``buffer`` tokens stay exact; ``sink`` first tokens stay high.
    """

    high: tuple[int, int] = (8, 4)
    low: tuple[int, int] = (4, 2)
    alpha_prune: float = 0.02
    alpha_quant: float = 1.0
    buffer: int = 32
    window: int = 32
    sink: int = 4
    interval: int = 16
    group_size: int = 64
    gqa: str = "max"

    def __post_init__(self):
        object.__setattr__(self, "high", tuple(self.high))
        object.__setattr__(self, "low", tuple(self.low))
        for name in ("high", "low"):
            pair = getattr(self, name)
            if len(pair) != 2:
                raise ValueError(f"{name}={pair!r} must be (key_bits, value_bits)")
            for bits in pair:
                Precision(bits, self.group_size)  # validates bits and group size
        if not 0 <= self.alpha_prune <= self.alpha_quant:
            raise ValueError(
                f"need 0 <= alpha_prune <= alpha_quant, got alpha_prune={self.alpha_prune}, alpha_quant={self.alpha_quant}"
            )
        for name in ("buffer", "sink"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an int >= 0")
        for name in ("window", "interval"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an int >= 1")
        if self.gqa not in GQA_MODES:
            raise ValueError(f"gqa={self.gqa!r}: choose one of {GQA_MODES}")

    @classmethod
    def from_dict(cls, data: dict) -> LeanKVConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown LeanKVConfig keys {sorted(unknown)}; valid keys are {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["high"], data["low"] = list(self.high), list(self.low)
        return data

    def tiers(self) -> tuple[tuple[Precision, Precision], ...]:
        return tuple((Precision(k, self.group_size), Precision(v, self.group_size)) for k, v in (self.high, self.low))


PRESETS: dict[str, dict] = {
    # Reference LeanKV settings (a_prune 0.02, a_quant 1.0), high K8V4 / low K4V2.
    "leankv": {},
    # More aggressive: more tokens drop to the low tier and more are pruned.
    "leankv-aggressive": {"alpha_prune": 0.1, "alpha_quant": 2.0},
}


class UnifiedLeanCache(LeanCache):
    """Per token and head: high tier, low tier or pruned, from attention importance; per request and per head.

    Needs the ``leankv`` attention function: given a model, it switches it.

    Example:
        >>> from leankv_hf import UnifiedLeanCache
        >>> from leankv_hf.testing import tiny_model, tiny_tokenizer
        >>> model, tok = tiny_model("llama"), tiny_tokenizer()
        >>> cache = UnifiedLeanCache(model, group_size=16, buffer=8, window=8)
        >>> out = model.generate(**tok("hello " * 40, return_tensors="pt"), past_key_values=cache, max_new_tokens=4)
        >>> cache.tier_counts().shape   # layers, batch, kv heads, (high, low, pruned)
        torch.Size([4, 1, 2, 3])
    """

    def __init__(self, model_or_config: PreTrainedModel | PretrainedConfig, preset: str | None = None, **settings):
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        config = LeanKVConfig.from_dict({**PRESETS.get(preset or "leankv", {}), **settings})
        text = text_config(model_or_config)
        for key, value in config.tiers():
            key.check_head_dim(head_dim(text))
            value.check_head_dim(head_dim(text))
        self.settings = config
        layer_settings = LayerSettings(
            tiers=config.tiers(),
            policy=LeanKVPolicy(alpha_prune=config.alpha_prune, alpha_quant=config.alpha_quant),
            budget=None,
            window=config.window,
            recent=config.buffer,
            sink=config.sink,
            interval=config.interval,
            gqa=config.gqa,
        )
        super().__init__(model_or_config, lambda i: LeanLayer(i, text.num_hidden_layers, layer_settings))
        if isinstance(model_or_config, PreTrainedModel):
            use_leankv_attention(model_or_config)

    def tier_counts(self) -> torch.Tensor:
        """``[layers, batch, kv_heads, 3]``: tokens in the high tier (exact window included), low tier, pruned."""
        return torch.stack([layer.tier_counts() for layer in self.layers if isinstance(layer, LeanLayer)])
