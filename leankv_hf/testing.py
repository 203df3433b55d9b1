"""Tiny random-weight models and a byte-level tokenizer, built from configs: fast, offline, a few MB each.

They cover architectures the embedded model does not (Qwen2 biases, Mistral, Gemma 3's hybrid sliding/full
layers) so that every cache is exercised on each.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma3")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte) that needs no files."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: i + len(SPECIAL_TOKENS) for i, ch in enumerate(sorted(byte_chars))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def tiny_config(arch: str = "llama", **overrides):
    """Config of a 4-layer model with GQA (4 query heads, 2 KV heads, head_dim 16)."""
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    elif arch == "mistral":
        config = MistralConfig(**common, sliding_window=None)
    elif arch == "gemma3":
        # 6 layers: 5 sliding (window 16) then 1 full, as Gemma 3 interleaves them.
        common.update(num_hidden_layers=6, hidden_activation="gelu_pytorch_tanh")
        config = Gemma3TextConfig(**common, sliding_window=16, query_pre_attn_scalar=16)
    else:
        raise ValueError(f"Unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """A random-weight causal LM of the given architecture, in eval mode, using sdpa attention."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()
