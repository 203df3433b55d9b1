"""What the cache test modules share: lively tiny models, prompts, and greedy generation through a cache."""

from leankv_hf.testing import tiny_model

# The default init (0.02) makes the random llama/qwen2/mistral emit one token forever, so "same output as
# DynamicCache" would hold trivially; a wider init gives varied, attention-dependent greedy continuations.
# (gemma3 is the other way round: varied at 0.02, stuck at 0.2.)
INIT_RANGE = {"llama": 0.2, "qwen2": 0.2, "mistral": 0.2, "gemma3": 0.02}
TINY_PROMPT = "The quick brown fox jumps over the lazy dog again and again, " * 3  # 183 byte tokens
BATCH_PROMPTS = [
    "A much longer prompt than the others, so that the rest get left padded.",
    "short",
    "A medium-sized prompt here.",
    "Prompt number four, fairly long as well",
]
GREEDY = dict(do_sample=False, top_p=None, top_k=None, temperature=None)


def lively(arch: str, **kwargs):
    return tiny_model(arch, initializer_range=INIT_RANGE[arch], **kwargs)


def generate(model, inputs, cache, **kwargs):
    kwargs = {**GREEDY, "max_new_tokens": 16, **kwargs}
    return model.generate(**inputs, past_key_values=cache, pad_token_id=model.config.pad_token_id, **kwargs)
