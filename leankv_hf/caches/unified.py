"""`UnifiedLeanCache`: LeanKV's unified compression — per token and head, high precision, low precision or
pruned, chosen from the attention each token receives, and revised as decoding goes on; keys optionally low
rank. `LeanKVConfig` is its one validated config: keyword arguments, presets, dicts, YAML/JSON, and the
``pipeline`` dict of quantize / sparsify / lowrank stages."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import yaml
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs

from ..attention import use_leankv_attention
from ..monitor import cache_stats
from ..policy import SPARSE_POLICIES, LeanKVPolicy, Policy, TieredPolicy, check_budget_scope, sparse_policy
from ..scoring import Scorer, make_scorer, scorer_spec
from ..store import Precision, fit_basis, fitting_group
from .base import LeanCache, check_storage_dtype, full_attention_layers, head_dim, text_config
from .hetero import SlidingHeteroLayer
from .layer import LayerSettings, LeanLayer
from .sparse import GQA_MODES

POLICIES = ("leankv", *SPARSE_POLICIES)
MODES = ("adaptive", "static")
# Pipeline stages, in the only order they can run, with the params each takes.
STAGES: dict[str, tuple[str, ...]] = {
    "quantize": ("bits", "key_bits", "value_bits", "group_size"),
    "sparsify": ("ratio", "method"),
    "lowrank": ("rank", "method"),
}
SPARSIFY_METHODS = ("importance", *SPARSE_POLICIES)


@dataclass(frozen=True)
class LeanKVConfig:
    """Validated settings of `UnifiedLeanCache`; dicts (``from_dict``/``to_dict``), YAML and JSON round-trip.

    ``high``/``low`` are (key_bits, value_bits) of the two tiers. With ``policy="leankv"``, a token whose mean
    attention is at least ``alpha_quant / context`` stays high, at least ``alpha_prune / context`` goes low, else
    it is pruned; ``prune_ratio`` > 0 also caps each head at its best ``1 - prune_ratio`` of the tokens. Any
    sparse policy name instead ranks: each head keeps its best ``1 - prune_ratio`` of the tokens, of which the worst
    ``low_ratio`` (a fraction of all tokens) go to the low tier and the rest stay high. ``scorer`` says what the
    scores measure (`scoring`): "window" (the prompt's last ``window`` queries; the question must be in the prompt)
    or a question-agnostic one: "keydiff" (cheap: from the prompt's keys as a whole, no extra pass) or
    "reconstruct" (the cache re-reads each prompt; ranking policies only). ``rank`` stores keys
    as rank-r coefficients on a per-head SVD basis of the prompt's keys: an int, or a fraction of head_dim. The
    newest ``buffer`` tokens stay exact; ``sink`` first tokens stay high. ``budget_mb`` is a hard cap on the
    stored bytes (MiB, or None): as the cache fills, the least important tokens move down a tier, then out;
    ``mode`` "adaptive" lets the heads of a layer share its bytes by importance, "static" gives each an equal
    share. ``storage_dtype`` holds the exact window and 16-bit tiers (None: 16-bit, float16 for a float32 model).
    ``budget_scope`` "global" (with ``scorer="reconstruct"`` and ``prune_ratio``) lets the layers share the model's
    budget by the probe's scores, as KVzip ranks across layers; "layer": each keeps ``1 - prune_ratio``.
    """

    high: tuple[int, int] = (8, 4)
    low: tuple[int, int] = (4, 2)
    alpha_prune: float = 0.02
    alpha_quant: float = 1.0
    prune_ratio: float = 0.0
    low_ratio: float = 0.0
    policy: str = "leankv"
    scorer: str | dict | Scorer = "window"
    rank: int | float | None = None
    buffer: int = 32
    window: int = 32
    sink: int = 4
    interval: int = 16
    group_size: int | None = None
    gqa: str = "max"
    mode: str = "adaptive"
    budget_mb: float | None = None
    storage_dtype: str | None = None
    budget_scope: str = "layer"

    def __post_init__(self):
        for name in ("high", "low"):
            pair = getattr(self, name)
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"{name}={pair!r} must be (key_bits, value_bits)")
            object.__setattr__(self, name, tuple(pair))
            for bits in pair:
                Precision(bits, self.group_for(64))  # validates bits and group size
        if not 0 <= self.alpha_prune <= self.alpha_quant:
            raise ValueError(
                f"need 0 <= alpha_prune <= alpha_quant, got alpha_prune={self.alpha_prune}, alpha_quant={self.alpha_quant}"
            )
        if not _number(self.prune_ratio) or not 0 <= self.prune_ratio < 1:
            raise ValueError(f"prune_ratio={self.prune_ratio!r} must be in [0, 1): the fraction of tokens pruned")
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r}: choose one of {POLICIES}")
        if not _number(self.low_ratio) or not 0 <= self.low_ratio < 1 - self.prune_ratio:
            raise ValueError(
                f"low_ratio={self.low_ratio!r} must be in [0, 1 - prune_ratio) = [0, {1 - self.prune_ratio:g}): the "
                "fraction of tokens stored in the low tier, out of those kept"
            )
        if self.low_ratio and self.policy == "leankv":
            raise ValueError("low_ratio splits a ranking policy's tokens; with policy='leankv' the thresholds decide")
        object.__setattr__(self, "scorer", scorer_spec(make_scorer(self.scorer, self.window)))  # YAML-friendly
        if self.policy != "leankv" and sparse_policy(self.policy).page_size:
            raise ValueError(f"policy={self.policy!r} is query-aware and evicts nothing; choose an evicting one")
        r = self.rank
        if r is not None and not (_int(r) and r >= 1 or _number(r) and not _int(r) and 0 < r <= 1):
            raise ValueError(f"rank={r!r} must be an int >= 1, a fraction of head_dim in (0, 1], or None (full rank)")
        for name in ("buffer", "sink"):
            if not _int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an int >= 0")
        for name in ("window", "interval"):
            if not _int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an int >= 1")
        if self.gqa not in GQA_MODES:
            raise ValueError(f"gqa={self.gqa!r}: choose one of {GQA_MODES}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: choose one of {MODES}")
        dtype = check_storage_dtype(self.storage_dtype)  # kept as its name, so dicts and YAML round-trip
        object.__setattr__(self, "storage_dtype", None if dtype is None else str(dtype).removeprefix("torch."))
        mb = self.budget_mb
        if mb is not None and not (_number(mb) and math.isfinite(mb) and mb > 0):
            raise ValueError(f"budget_mb={mb!r} must be a positive number of megabytes, or None (no cap)")
        check_budget_scope(self.budget_scope, self.build_scorer(), self.prune_ratio > 0)
        if self.build_policy().thresholds and self.build_scorer().reduce != "mean":
            raise ValueError(
                f"policy={self.policy!r} compares mean attention with alpha / context, but scorer={self.scorer!r} "
                "scores by maximum: choose a ranking policy (e.g. policy='adakv' with prune_ratio)"
            )

    # -- in and out --------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> LeanKVConfig:
        """Settings by name, or a pipeline dict (it has a ``pipeline`` key: see `from_pipeline`)."""
        if "pipeline" in data:
            return cls.from_pipeline(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown LeanKVConfig keys {sorted(unknown)}; valid keys are {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["high"], data["low"] = list(self.high), list(self.low)
        return data

    @classmethod
    def from_yaml(cls, text: str) -> LeanKVConfig:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"a LeanKVConfig document holds one mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def load(cls, source: dict | str | Path) -> LeanKVConfig:
        """From a dict, or a ``.json`` / YAML file holding one."""
        if isinstance(source, dict):
            return cls.from_dict(source)
        path = Path(source)
        if path.suffix == ".json":
            return cls.from_dict(json.loads(path.read_text()))
        return cls.from_yaml(path.read_text())

    @classmethod
    def from_pipeline(cls, data: dict) -> LeanKVConfig:
        """The pipeline dict: ``{"pipeline": [{"type": STAGE, "params": {...}}, ...], "orchestrator": {...}}``.

        Stages (each optional, at most once, in this order): ``quantize`` (``bits``, or ``key_bits`` and
        ``value_bits``: the high tier; the low tier gets half, at least 2; ``group_size``), ``sparsify``
        (``ratio`` pruned, ``method``: "importance" for LeanKV's tiers, or a sparse policy name) and ``lowrank``
        (``rank``: int or fraction of head_dim, ``method``: "svd"). A stage may also be written ``{STAGE: params}``.
        ``orchestrator``: ``mode`` and ``budget_mb`` (see `LeanKVConfig`). Other top-level keys are plain settings.
        Without ``quantize`` nothing is quantized; without ``sparsify`` nothing is pruned and every token is high.
        """
        stages = data.get("pipeline")
        if not isinstance(stages, list):
            raise ValueError(f"'pipeline' must be a list of stages ({', '.join(STAGES)}), got {stages!r}")
        parsed = [_stage(entry) for entry in stages]
        order = list(STAGES)
        for (before, _), (after, _) in zip(parsed, parsed[1:], strict=False):
            if order.index(after) <= order.index(before):
                problem = "appears twice" if after == before else f"cannot come before {after!r}"
                raise ValueError(
                    f"pipeline stage {before!r} {problem}: stages run once each, in the order {' -> '.join(STAGES)}"
                )
        params = dict(parsed)
        settings = _quantize(params["quantize"]) if "quantize" in params else {"high": (16, 16), "low": (16, 16)}
        settings.update(
            _sparsify(params["sparsify"]) if "sparsify" in params else {"alpha_prune": 0.0, "alpha_quant": 0.0}
        )
        if "lowrank" in params:
            method = params["lowrank"].get("method", "svd")
            if method != "svd":
                raise ValueError(f"lowrank method={method!r}: only 'svd' is supported")
            if "rank" not in params["lowrank"]:
                raise ValueError("the lowrank stage needs a rank (an int, or a fraction of head_dim)")
            settings["rank"] = params["lowrank"]["rank"]
        orchestrator = data.get("orchestrator") or {}
        _check_params("orchestrator", orchestrator, ("mode", "budget_mb"))
        settings.update(orchestrator)
        rest = {key: value for key, value in data.items() if key not in ("pipeline", "orchestrator")}
        clash = sorted(set(rest) & set(settings))
        if clash:
            raise ValueError(f"{clash} set both by the pipeline and at top level: keep one")
        return cls.from_dict({**settings, **rest})

    # -- what the cache builds ---------------------------------------------------------------------------
    def resolved_rank(self, head_dim: int) -> int | None:
        """Keys' rank for heads of ``head_dim`` (a fraction resolves to at least 1); None: full rank."""
        if self.rank is None:
            return None
        rank = self.rank if _int(self.rank) else max(1, round(self.rank * head_dim))
        if rank > head_dim:
            raise ValueError(f"rank={rank} must be in 1..head_dim={head_dim}")
        return rank

    def group_for(self, head_dim: int) -> int:
        """The quantization group: ``group_size``, or by default `store.fitting_group` of the head_dim."""
        return fitting_group(head_dim) if self.group_size is None else self.group_size

    def tiers(self, head_dim: int) -> tuple[tuple[Precision, Precision], ...]:
        """(key, value) precision per tier, checked against ``head_dim`` (groups tile a row; rank fits)."""
        rank = self.resolved_rank(head_dim)
        group = self.group_for(head_dim)
        tiers = tuple((Precision(k, group, rank=rank), Precision(v, group)) for k, v in (self.high, self.low))
        for pair in tiers:
            for precision in pair:
                precision.check_head_dim(head_dim)
        return tiers

    def build_policy(self) -> Policy:
        if self.policy == "leankv":
            return LeanKVPolicy(alpha_prune=self.alpha_prune, alpha_quant=self.alpha_quant)
        ranking = sparse_policy(self.policy)
        if not self.low_ratio:
            return ranking
        return TieredPolicy(ranking, high=1 - self.low_ratio / (1 - self.prune_ratio))

    def build_scorer(self) -> Scorer:
        return make_scorer(self.scorer, self.window)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_params(where: str, params, allowed: tuple[str, ...]) -> None:
    if not isinstance(params, dict):
        raise ValueError(f"{where} must be a mapping with keys among {list(allowed)}, got {params!r}")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {where} keys {unknown}; allowed: {list(allowed)}")


def _stage(entry) -> tuple[str, dict]:
    """``{"type": T, "params": {...}}`` or ``{T: {...}}`` -> (T, params), both checked."""
    if isinstance(entry, dict) and "type" in entry:
        _check_params("stage", entry, ("type", "params"))
        kind, params = entry["type"], entry.get("params") or {}
    elif isinstance(entry, dict) and len(entry) == 1:
        ((kind, params),) = entry.items()
        params = params or {}
    else:
        raise ValueError(f'pipeline stage {entry!r} must be {{"type": STAGE, "params": {{...}}}} or {{STAGE: {{...}}}}')
    if kind not in STAGES:
        raise ValueError(f"unknown pipeline stage {kind!r}; stages: {list(STAGES)}")
    _check_params(kind, params, STAGES[kind])
    return kind, params


def _quantize(params: dict) -> dict:
    key, value = params.get("key_bits", params.get("bits")), params.get("value_bits", params.get("bits"))
    if not (_int(key) and _int(value)):
        raise ValueError(f"the quantize stage needs int bits, or key_bits and value_bits; got {params}")
    settings = {"high": (key, value), "low": (max(key // 2, 2), max(value // 2, 2))}  # low: half the bits
    return settings | ({"group_size": params["group_size"]} if "group_size" in params else {})


def _sparsify(params: dict) -> dict:
    method = params.get("method", "importance")
    if method not in SPARSIFY_METHODS:
        raise ValueError(f"sparsify method={method!r}: choose one of {SPARSIFY_METHODS}")
    policy = "leankv" if method == "importance" else method  # importance: LeanKV's tiers by attention
    return {"policy": policy} | ({"prune_ratio": params["ratio"]} if "ratio" in params else {})


class LowRankLayer(LeanLayer):
    """A `LeanLayer` whose tiers hold keys as coefficients on one basis per (batch, head): the SVD of the keys
    it holds when tokens first leave the exact window (the prompt's, normally). Tiers share it, so a demoted
    token keeps its subspace."""

    def compact(self) -> None:
        if self.tiers[0].basis is None and self.keys.shape[-2] > self.settings.recent:
            rank = self.settings.tiers[0][0].rank
            basis = fit_basis(self.keys, rank, valid=self.recent_valid[:, None]).flatten(0, 1)
            for tier in self.tiers:
                tier.basis = basis
        super().compact()

    def _leaving_keys(self, n_exit: int) -> torch.Tensor:
        """Coefficients on each head's basis: one batched product over every head's leaving tokens."""
        keys = self.keys[:, :, :n_exit]
        basis = self.tiers[0].basis.to(keys.dtype)
        return torch.bmm(keys.flatten(0, 1), basis).view(*keys.shape[:3], basis.shape[-1])

    def _select_batch(self, index: torch.Tensor) -> None:
        super()._select_batch(index)
        self._share_basis()

    def restored(self) -> None:
        self._share_basis()
        super().restored()

    def _share_basis(self) -> None:
        for tier in self.tiers[1:]:  # each tier selected (or was loaded with) its own copy: share one again
            tier.basis = self.tiers[0].basis


PRESETS: dict[str, dict] = {
    # Reference LeanKV settings (a_prune 0.02, a_quant 1.0), high K8V4 / low K4V2.
    "leankv": {},
    # More aggressive: more tokens drop to the low tier and more are pruned.
    "leankv-aggressive": {"alpha_prune": 0.1, "alpha_quant": 2.0},
    # The seed's LeanKV-S / -M / -L (rank as a fraction of head_dim: 64 and 32 of 128).
    "leankv-s": {"high": (8, 8), "low": (4, 4), "prune_ratio": 0.3},
    "leankv-m": {"high": (8, 8), "low": (4, 4), "prune_ratio": 0.3, "rank": 0.5},
    "leankv-l": {"high": (4, 4), "low": (2, 2), "prune_ratio": 0.5, "rank": 0.25},
    # Per-head sparsity and quantization together: each layer's heads share 20% of the tokens by importance
    # (AdaKV), stored at K8V4 -- about 10x smaller than 16-bit.
    "leankv-adakv": {"high": (8, 4), "low": (4, 2), "policy": "adakv", "prune_ratio": 0.8},
    # When the question is not known yet (a context compressed before it is asked, reused, chunk-prefilled): scores
    # from re-reading the context (KVzip), and uncertainty answered with a tier rather than a cut: the model keeps 10%
    # of the tokens at K8V4 and 20% more at K4V2, shared between layers and heads by those scores -- about 9-10x
    # smaller than 16-bit.
    "leankv-agnostic": {
        "high": (8, 4),
        "low": (4, 2),
        "policy": "adakv",
        "prune_ratio": 0.7,
        "low_ratio": 0.2,
        "scorer": "reconstruct",
        "budget_scope": "global",
    },
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
        config = LeanKVConfig.from_dict({**PRESETS[preset or "leankv"], **settings})
        text = text_config(model_or_config)
        self.settings = config
        compressed = full_attention_layers(text)
        layer_settings = LayerSettings(
            tiers=config.tiers(head_dim(text)),
            policy=config.build_policy(),
            budget=1 - config.prune_ratio if config.prune_ratio else None,  # None: the thresholds decide
            scorer=config.build_scorer(),
            recent=config.buffer,
            sink=config.sink,
            interval=config.interval,
            gqa=config.gqa,
            storage_dtype=check_storage_dtype(config.storage_dtype),
            budget_bytes=None if config.budget_mb is None else config.budget_mb * 2**20,
            budget_layers=len(compressed),
            budget_pooled=config.mode == "adaptive",
            reserve_tokens=sum(kwargs.get("sliding_window", 0) for kwargs in get_layer_types_and_kwargs(text)[1]),
            budget_scope=config.budget_scope,
        )
        layer = LowRankLayer if config.rank else LeanLayer
        high = [
            Precision(bits, config.group_for(head_dim(text))) for bits in config.high
        ]  # sliding: high tier, full rank
        super().__init__(
            model_or_config,
            lambda i: layer(compressed.index(i), len(compressed), layer_settings),
            lambda window: SlidingHeteroLayer(*high, config.buffer, layer_settings.storage_dtype, window),
        )
        if isinstance(model_or_config, PreTrainedModel):
            use_leankv_attention(model_or_config)

    def arguments(self) -> dict:
        return self.settings.to_dict()

    @classmethod
    def from_config(
        cls, source: LeanKVConfig | dict | str | Path, model: PreTrainedModel | PretrainedConfig
    ) -> UnifiedLeanCache:
        """A cache for ``model`` from a `LeanKVConfig`, a settings or pipeline dict, or a YAML/JSON file."""
        config = source if isinstance(source, LeanKVConfig) else LeanKVConfig.load(source)
        return cls(model, **config.to_dict())

    def tier_counts(self) -> torch.Tensor:
        """``[layers, batch, kv_heads, 3]``: tokens in the high tier (exact window included), low tier, pruned."""
        return torch.stack([layer.tier_counts() for layer in self.layers if isinstance(layer, LeanLayer)])

    def stats(self) -> dict:
        """Bytes, dense bytes, ratio (`monitor.cache_stats`), token-head counts per tier over the compressed
        layers, tokens seen per sequence, and what the ``budget_mb`` cap did: token-heads it moved down a tier
        (``budget_demoted``) or pruned (``budget_pruned``) beyond the thresholds' choice."""
        layers = [layer for layer in self.layers if isinstance(layer, LeanLayer) and layer.is_initialized]
        high, low, pruned = self.tier_counts().sum((0, 1, 2)).tolist()
        return {
            **cache_stats(self),
            "high": high,
            "low": low,
            "pruned": pruned,
            "tokens_seen": self.get_seq_length(),
            "budget_demoted": sum(layer.budget_report.demoted for layer in layers),
            "budget_pruned": sum(layer.budget_report.pruned for layer in layers),
        }
