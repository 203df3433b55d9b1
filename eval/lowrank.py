"""Low-rank keys on smollm2-135m, two measurements behind `eval/RESULTS.md`:

1. why they lose accuracy: how much of each head's keys a rank-r basis misses, fitted on the keys after RoPE
   (what the cache receives and `UnifiedLeanCache(rank=...)` stores) and before it (the k_proj output);
2. what scoring in the reduced space saves: one decode query's scores against a `leankv-m` layer's stored keys,
   ``(q @ basis) @ coefficients^T`` against rebuilding the keys first.

    OMP_NUM_THREADS=1 taskset -c 0 python eval/lowrank.py   # -> eval/results/lowrank.md
"""

import time
from pathlib import Path

import torch
from transformers import DynamicCache

from leankv_hf import UnifiedLeanCache, load_model
from leankv_hf.eval.bench import bench_prompt
from leankv_hf.store import fit_basis

OUT = Path(__file__).parent / "results" / "lowrank.md"
RANKS = (16, 32, 48)


def missed(keys: torch.Tensor, rank: int) -> float:
    """Relative error ``||K - K B B^T|| / ||K||`` of each head's keys ``[H, T, D]`` on its own rank-r basis."""
    basis = fit_basis(keys, rank)
    return float((keys - keys @ basis @ basis.mT).norm() / keys.norm())


def microseconds(fn, repeats: int = 300) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


@torch.inference_mode()
def rope_table(model, ids) -> list[str]:
    layers = model.model.layers
    before = {}
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(lambda m, i, o, index=index: before.__setitem__(index, o))
        for index, layer in enumerate(layers)
    ]
    cache = DynamicCache()
    model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
    for hook in hooks:
        hook.remove()
    heads, dim = model.config.num_key_value_heads, model.config.head_dim
    rows = ["| rank | after RoPE (stored today) | before RoPE (k_proj output) |", "|---|---|---|"]
    for rank in RANKS:
        post = [missed(cache.layers[i].keys[0].float(), rank) for i in range(len(layers))]
        pre = [missed(before[i][0].view(-1, heads, dim).transpose(0, 1).float(), rank) for i in range(len(layers))]
        rows.append(f"| {rank} of {dim} | {sum(post) / len(post):.3f} | {sum(pre) / len(pre):.3f} |")
    return rows


@torch.inference_mode()
def speed_table(model, ids) -> list[str]:
    cache = UnifiedLeanCache(model, preset="leankv-m")
    model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
    heads = model.config.num_key_value_heads
    groups = model.config.num_attention_heads // heads
    query = torch.randn(1, heads, groups, model.config.head_dim)
    rows = [
        "| layer | slots per head | reduced space, µs | rebuilt keys, µs | max score difference |",
        "|---|---|---|---|---|",
    ]
    for index in (0, 10, 20):
        body = cache.layers[index].body_view(torch.float32)
        reduced = microseconds(lambda body=body: body.keys.scores(query @ body.basis))
        rebuilt = microseconds(lambda body=body: query @ body.full_keys().mT)
        gap = float((body.keys.scores(query @ body.basis) - query @ body.full_keys().mT).abs().max())
        rows.append(f"| {index} | {body.valid.shape[-1]} | {reduced:.0f} | {rebuilt:.0f} | {gap:.1e} |")
    return rows


def main() -> None:
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    rope = rope_table(model, torch.tensor([bench_prompt(tok, 2048)]))
    speed = speed_table(model, torch.tensor([bench_prompt(tok, 4096)]))
    OUT.write_text(
        "# Low-rank keys on smollm2-135m\n\n"
        "- command: `OMP_NUM_THREADS=1 taskset -c 0 python eval/lowrank.py`\n\n"
        "## Share of the keys a rank-r basis misses, after and before RoPE\n\n"
        "One 2,048-token bench prompt; mean over the 30 layers of ||K - K B B^T|| / ||K|| (B: each head's top-r\n"
        "right singular vectors of its own keys).\n\n" + "\n".join(rope) + "\n\n"
        "## One decode query's scores against a `leankv-m` layer holding a 4,096-token prompt (one thread)\n\n"
        + "\n".join(speed)
        + "\n"
    )
    print(OUT.read_text())


if __name__ == "__main__":
    main()
