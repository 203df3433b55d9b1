"""Cache methods by name: a compact string, a dict, or a YAML file -> a fresh transformers ``Cache``.

Parsing (``parse_method``) is separate from construction (``make_cache``) so that a bad name fails before any
model is loaded, and so that the forms can be tested without the caches they build.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from transformers import Cache, DynamicCache, PreTrainedModel, QuantizedCache

from ..scoring import SCORERS

Spec = str | dict


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method: which constructor (``kind``) and its keyword arguments."""

    kind: str
    kwargs: dict


def _flags(text: str, table: dict[str, tuple[str, Callable]]) -> dict:
    """``,g32,chan`` -> kwargs, each flag named by the longest table prefix it starts with."""
    kwargs = {}
    for flag in filter(None, text.split(",")):
        prefix = max((p for p in table if flag.startswith(p)), key=len, default=None)
        if prefix is None:
            raise ValueError(f"unknown option {flag!r}; options: {', '.join(table)}")
        name, convert = table[prefix]
        kwargs[name] = convert(flag[len(prefix) :])
    return kwargs


def _budget(text: str) -> float | int:
    return float(text) if "." in text else int(text)


_HETERO_FLAGS = {"g": ("group_size", int), "r": ("residual_length", int), "chan": ("key_axis", lambda _: "channel")}
_SCORER_FLAGS = {name: ("scorer", lambda _, name=name: name) for name in SCORERS} | {
    "global": ("budget_scope", lambda _: "global"),
    "perlayer": ("budget_scope", lambda _: "layer"),
}
_SPARSE_FLAGS = {"w": ("window", int), "rec": ("recent", int), "iv": ("interval", int), **_SCORER_FLAGS}
_UNIFIED_FLAGS = {
    "ap": ("alpha_prune", float),
    "aq": ("alpha_quant", float),
    "g": ("group_size", int),
    "pr": ("prune_ratio", float),
    "lr": ("low_ratio", float),
    "rank": ("rank", _budget),
    "buf": ("buffer", int),
    "iv": ("interval", int),
    **{name: ("policy", lambda _, name=name: name) for name in ("snapkv", "adakv", "pyramid", "chunkkv", "streaming")},
    **_SCORER_FLAGS,
}

# kind -> (argument pattern after "kind:", kwargs from the match, form for the docs)
_FORMS: dict[str, tuple[str | None, Callable[[re.Match | None], dict], str]] = {
    "full": (None, lambda m: {}, "full  (DynamicCache, the 16-bit reference)"),
    "hf-quanto": (
        r"(\d+)",
        lambda m: {"nbits": int(m[1])},
        "hf-quanto:N  (transformers QuantizedCache, quanto backend, N in 2,4)",
    ),
    "hf-hqq": (
        r"(\d+)",
        lambda m: {"nbits": int(m[1])},
        "hf-hqq:N  (transformers QuantizedCache, HQQ backend, N in 1,2,3,4,8)",
    ),
    "hf-fp8": (None, lambda m: {}, "hf-fp8  (transformers QuantizedCache, per-tensor FP8)"),
    "hetero": (
        r"k(\d+)v(\d+)((?:,[a-z]+\d*)*)",
        lambda m: {"key_bits": int(m[1]), "value_bits": int(m[2]), **_flags(m[3], _HETERO_FLAGS)},
        "hetero:kKvV[,gG][,chan][,rR]  (QuantizedHeteroCache: K/V bits, group size, per-channel keys, residual)",
    ),
    "sparse": (
        r"([a-z][a-z0-9_]*)@(\d+(?:\.\d*)?)((?:,[a-z]+\d*)*)",
        lambda m: {"policy": m[1], "budget": _budget(m[2]), **_flags(m[3], _SPARSE_FLAGS)},
        "sparse:POLICY@BUDGET[,wW][,recR][,ivI][,reconstruct|,keydiff][,global|,perlayer]  (SparseHeadCache; budget a "
        "fraction like 0.2 or a token count like 512; observation window, exact recent tokens, decode steps between "
        "evictions; scorer; global: the layers share the model's budget by the probe's scores, perlayer: each its own)",
    ),
    "unified": (
        r"(?:k(\d+)v(\d+)/k(\d+)v(\d+)|([a-z][\w-]*))((?:,[a-z]+[\d.]*)*)",
        lambda m: {
            **({"preset": m[5]} if m[5] else {"high": (int(m[1]), int(m[2])), "low": (int(m[3]), int(m[4]))}),
            **_flags(m[6], _UNIFIED_FLAGS),
        },
        "unified:PRESET[,...] or unified:kKvV/kKvV[,apA][,aqA][,gG][,prP][,lrL][,rankR][,bufB][,ivI][,POLICY]"
        "[,SCORER][,global|,perlayer]  (UnifiedLeanCache: a preset, or high/low tier bits; alpha_prune, alpha_quant thresholds; "
        "group size; prune ratio; low-tier ratio; key rank; exact buffer; decode steps between compactions; a sparse "
        "policy instead of the thresholds, e.g. adakv; scorer: window, keydiff or reconstruct; global: the layers "
        "share the model's budget by the probe's scores, perlayer: each keeps its own)",
    ),
}


def available_methods() -> list[str]:
    """Every accepted form, one line each."""
    return [doc for _, _, doc in _FORMS.values()] + [
        "PATH.yaml  (a dict: UnifiedLeanCache.from_config when it has a 'pipeline' key, else {method: KIND, ...kwargs})"
    ]


def _unknown(spec: object) -> ValueError:
    return ValueError(f"unknown cache method {spec!r}; valid forms: " + "; ".join(available_methods()))


def is_method_file(spec: str) -> bool:
    """Whether a spec names a YAML file rather than a compact form."""
    return spec.endswith((".yaml", ".yml"))


def _parse_dict(spec: dict) -> MethodSpec:
    spec = {k: v for k, v in spec.items() if k != "name"}
    if "pipeline" in spec:
        return MethodSpec("unified-config", {"config": spec})
    kind = spec.pop("method", None)
    if kind not in _FORMS:
        raise _unknown(kind)
    return MethodSpec(kind, spec)


def parse_method(spec: Spec) -> MethodSpec:
    """Parse a method spec: a compact string (see ``available_methods``), a dict, or a path to a YAML dict."""
    if isinstance(spec, dict):
        return _parse_dict(spec)
    if is_method_file(spec):
        loaded = yaml.safe_load(Path(spec).read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{spec}: a method file holds one dict, got {type(loaded).__name__}")
        return _parse_dict(loaded)
    kind, _, argument = spec.partition(":")
    if kind not in _FORMS:
        raise _unknown(spec)
    pattern, to_kwargs, _ = _FORMS[kind]
    match = re.fullmatch(pattern, argument) if pattern else None
    if (match is None) != (pattern is None) or (pattern is None and argument):
        raise _unknown(spec)
    try:
        return MethodSpec(kind, to_kwargs(match))
    except ValueError as error:
        raise ValueError(f"{spec!r}: {error}") from None


def _hf_quantized(backend: str, package: str | None = None, install: str = "") -> Callable[..., Cache]:
    def build(model: PreTrainedModel, **kwargs) -> Cache:
        if package is not None and importlib.util.find_spec(package) is None:
            raise ImportError(f"the {backend} KV cache backend needs {package}: run `{install}`")
        return QuantizedCache(backend=backend, config=model.config, **kwargs)

    return build


def _leankv_class(name: str) -> type:
    import leankv_hf

    cls = getattr(leankv_hf, name, None)
    if cls is None:
        raise ImportError(f"this leankv_hf has no {name}")
    return cls


def _leankv(name: str) -> Callable[..., Cache]:
    def build(model: PreTrainedModel, **kwargs) -> Cache:
        return _leankv_class(name)(model, **kwargs)

    return build


def _unified_config(model: PreTrainedModel, config: dict) -> Cache:
    return _leankv_class("UnifiedLeanCache").from_config(config, model=model)


_BUILDERS: dict[str, Callable[..., Cache]] = {
    "full": lambda model: DynamicCache(config=model.config),
    "hf-quanto": _hf_quantized("quanto", "optimum.quanto", "pip install optimum-quanto"),
    "hf-hqq": _hf_quantized("hqq", "hqq", "pip install hqq"),
    "hf-fp8": _hf_quantized("fp8"),
    "hetero": _leankv("QuantizedHeteroCache"),
    "sparse": _leankv("SparseHeadCache"),
    "unified": _leankv("UnifiedLeanCache"),
    "unified-config": _unified_config,
}


def make_cache(spec: Spec, model: PreTrainedModel) -> Cache:
    """A fresh cache for ``model`` built from ``spec`` (see ``parse_method``)."""
    parsed = parse_method(spec)
    return _BUILDERS[parsed.kind](model, **parsed.kwargs)


def method_label(spec: Spec) -> str:
    """The name a method's rows are recorded (and resumed) under: the string itself, or a dict's ``name``."""
    if isinstance(spec, str):
        return spec
    return str(spec.get("name") or json.dumps(spec, sort_keys=True, separators=(",", ":")))


def split_methods(text: str) -> list[str]:
    """Split a comma-separated method list where the specs may contain commas themselves (``hetero:k8v4,g32``):
    a piece starts a new method only when it names a kind or a YAML file."""
    methods: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if methods and piece.partition(":")[0] not in _FORMS and not is_method_file(piece):
            methods[-1] += "," + piece
        else:
            methods.append(piece)
    return methods
