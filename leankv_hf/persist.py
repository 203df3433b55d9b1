"""Saving and reloading a compressed cache: tensors in safetensors, everything else in JSON, never pickle (a cache
directory may come from elsewhere).

A cache directory holds ``cache.safetensors`` and ``config.json``: the format and library versions, the cache class
and the arguments that build it, the model's fingerprint (what must match for the cache to be reused), the model's
dtype, the tokens seen, optionally the token ids the cache holds (what ``generate`` must be given again), the
tensors' SHA-256, and per layer its geometry and state. Loading checks all of it before building anything, then
builds the cache for the given model from its arguments and fills each layer; anything that differs raises a
`ValueError` naming it. Saving writes a temporary directory and renames it into place, so a directory is never
half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import fields, is_dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .quant import QuantizedTensor

FORMAT = "leankv-cache"
FORMAT_VERSION = 1
TENSORS, CONFIG = "cache.safetensors", "config.json"
# The model settings a cache's shapes and positions depend on.
FINGERPRINT = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
    "layer_types",
    "sliding_window",
    "rope_parameters",
    "rope_theta",
)
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (torch.float16, torch.bfloat16, torch.float32)}


def fingerprint(config) -> dict:
    """The model settings a saved cache must match, as JSON values."""
    data = config.to_dict()
    return json.loads(json.dumps({key: data[key] for key in FINGERPRINT if data.get(key) is not None}, default=str))


def _encode(value, name: str, tensors: dict[str, torch.Tensor]):
    """A layer attribute as JSON, its tensors added to ``tensors`` under ``name``-based keys."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().contiguous().clone()  # clones: safetensors refuses shared storage
        return {"tensor": name}
    if isinstance(value, QuantizedTensor):
        parts = {
            part: _encode(getattr(value, part), f"{name}.{part}", tensors) for part in ("payload", "scale", "zero")
        }
        meta = {key: getattr(value, key) for key in ("bits", "group_size", "axis", "fmt", "last_dim")}
        return {"quantized": {**parts, **meta, "dtype": str(value.dtype).removeprefix("torch.")}}
    if isinstance(value, (list, tuple)):
        return {"list": [_encode(item, f"{name}.{i}", tensors) for i, item in enumerate(value)]}
    if isinstance(value, dict):
        return {"dict": {key: _encode(item, f"{name}.{key}", tensors) for key, item in value.items()}}
    if is_dataclass(value):  # a store: its state, not its precisions (those come from the cache's arguments)
        state = {f.name: getattr(value, f.name) for f in fields(value) if f.name not in ("key", "value")}
        return {"fields": {key: _encode(item, f"{name}.{key}", tensors) for key, item in state.items()}}
    raise TypeError(f"cannot save a {type(value).__name__} ({name})")


def _decode(data, tensors: dict[str, torch.Tensor], into=None):
    """`_encode`'s inverse; a ``fields`` entry fills the object ``into`` (the fresh layer's own store)."""
    if not isinstance(data, dict):
        return data
    if "dtype" in data:
        return _DTYPES[data["dtype"]]
    if "tensor" in data:
        return tensors[data["tensor"]]
    if "quantized" in data:
        q = dict(data["quantized"])
        parts = {part: _decode(q.pop(part), tensors) for part in ("payload", "scale", "zero")}
        dtype = _DTYPES[q.pop("dtype")]
        return QuantizedTensor(**parts, **q, dtype=dtype)
    if "list" in data:
        items = into if isinstance(into, list) else [None] * len(data["list"])
        return [_decode(item, tensors, old) for item, old in zip(data["list"], items, strict=True)]
    if "dict" in data:
        return {key: _decode(item, tensors) for key, item in data["dict"].items()}
    for key, item in data["fields"].items():
        setattr(into, key, _decode(item, tensors, getattr(into, key, None)))
    return into


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save(cache, directory: str | Path, input_ids: torch.Tensor | None = None) -> Path:
    """Write ``cache`` (and the ``input_ids`` it holds, if given) to ``directory``, replacing it atomically."""
    from . import __version__

    directory = Path(directory)
    layers, tensors = [], {}
    for i, layer in enumerate(cache.layers):
        if not layer.is_initialized:
            raise ValueError(f"layer {i} holds nothing yet: prefill the cache before saving it")
        if getattr(layer, "pending", 0):
            raise ValueError(f"layer {i} has tokens awaiting their scores: save after the forward that added them")
        saved = getattr(layer, "saved_state", None)
        if saved is None:
            raise ValueError(f"layer {i} is a {type(layer).__name__}, which leankv cannot save")
        batch, heads, _, dim = layer.keys.shape
        state = {name: _encode(getattr(layer, name, None), f"layers.{i}.{name}", tensors) for name in saved}
        layers.append({"class": type(layer).__name__, "shape": [batch, heads, dim], "state": state})
    if input_ids is not None:
        tensors["input_ids"] = input_ids.detach().to(torch.long).cpu().contiguous().clone()
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "leankv_version": __version__,
        "cache_class": type(cache).__name__,
        "arguments": _encode(cache.arguments(), "arguments", {}),
        "model": fingerprint(cache.config),
        "dtype": str(cache.layers[0].dtype).removeprefix("torch."),
        "tokens": cache.get_seq_length(),
        "input_ids": input_ids is not None,
        "layers": layers,
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, staging / TENSORS)
        config["sha256"] = _sha256(staging / TENSORS)
        config["config_sha256"] = _config_digest(config)
        (staging / CONFIG).write_text(json.dumps(config, indent=1))
        _replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _config_digest(config: dict) -> str:
    """SHA-256 of the config itself (its own digest left out): an edited config.json is refused, not misread."""
    body = {key: value for key, value in config.items() if key != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _replace_directory(staging: Path, directory: Path) -> None:
    """Move ``staging`` to ``directory``; an existing one is swapped out first and removed only after."""
    old = None
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
        os.replace(directory, old / directory.name)
    os.replace(staging, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_config(directory: str | Path) -> dict:
    """A saved cache's ``config.json``, checked to be one this version reads."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no saved leankv cache ({CONFIG} is missing)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): the file is damaged") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} does not describe a leankv cache (format {FORMAT!r} expected)")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {version!r}; this leankv-hf reads up to {FORMAT_VERSION}: upgrade leankv-hf"
        )
    if config.get("config_sha256") != _config_digest(config):
        raise ValueError(f"{path} does not match its own SHA-256: the file was edited or damaged")
    return config


def load(cls, directory: str | Path, model) -> tuple:
    """The cache saved in ``directory``, rebuilt as ``cls`` for ``model``, and the token ids saved with it (or None)."""
    directory = Path(directory)
    config = read_config(directory)
    if config["cache_class"] != cls.__name__:
        raise ValueError(f"{directory} holds a {config['cache_class']}, not a {cls.__name__}: load it with that class")
    from .caches.base import text_config

    expected = fingerprint(text_config(model))
    differ = [
        key for key in sorted(set(expected) | set(config["model"])) if expected.get(key) != config["model"].get(key)
    ]
    if differ:
        saved_as = ", ".join(f"{key}={config['model'].get(key)!r}" for key in differ)
        have = ", ".join(f"{key}={expected.get(key)!r}" for key in differ)
        raise ValueError(f"{directory} was saved for a model with {saved_as}; this model has {have}")
    dtype = str(model.dtype).removeprefix("torch.")
    if config["dtype"] != dtype:
        raise ValueError(f"{directory} was saved from a {config['dtype']} model; this model runs in {dtype}")
    path = directory / TENSORS
    if not path.is_file() or _sha256(path) != config.get("sha256"):
        raise ValueError(
            f"{path} is missing or does not match the SHA-256 in {CONFIG}: the file is truncated or altered"
        )
    try:
        tensors = load_file(path, device=str(model.device))
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    cache = cls(model, **_decode(config["arguments"], {}))
    if len(config["layers"]) != len(cache.layers):
        raise ValueError(f"{directory} holds {len(config['layers'])} layers; this model has {len(cache.layers)}")
    for i, (layer, saved) in enumerate(zip(cache.layers, config["layers"], strict=True)):
        if saved["class"] != type(layer).__name__:
            raise ValueError(f"layer {i} was saved as a {saved['class']}; this cache builds a {type(layer).__name__}")
        batch, heads, dim = saved["shape"]
        empty = torch.empty(batch, heads, 0, dim, dtype=model.dtype, device=model.device)
        layer.lazy_initialization(empty, empty)
        for name, value in saved["state"].items():
            setattr(layer, name, _decode(value, tensors, getattr(layer, name, None)))
        restored = getattr(layer, "restored", None)
        if restored is not None:
            restored()
    return cache, tensors.get("input_ids") if config["input_ids"] else None
