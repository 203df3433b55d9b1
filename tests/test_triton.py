"""The Triton decode kernels (`leankv_hf.kernels.gpu`) against the padded view they replace.

Without a GPU they run on CPU tensors under ``TRITON_INTERPRET=1`` (set in conftest before any kernel is defined),
and each kernel is also compiled for sm_80 and sm_90 with Triton's own compiler, so an error only a GPU build would
hit fails here too. On a CUDA machine the same products run on the device.
"""

import os
import subprocess
import sys

import pytest
import torch

from leankv_hf.store import PaddedLayout, PaddedRows, Precision, RaggedStore

pytest.importorskip("triton")
from leankv_hf.kernels import gpu  # noqa: E402  (after the skip: the module imports triton)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRECISIONS = {  # key, value
    "k8v4": (Precision(8, 32), Precision(4, 32)),
    "k4v2": (Precision(4, 32), Precision(2, 32)),
    "k2v2 per row": (Precision(2, 128), Precision(2, 128)),
    "16-bit": (Precision(16), Precision(16)),
    "bf16 scales": (Precision(8, 64, scale_dtype=torch.bfloat16), Precision(4, 16, scale_dtype=torch.float32)),
}


def store_with(
    counts: torch.Tensor, key: Precision, value: Precision, dim: int, dtype=torch.float32, basis=None
) -> RaggedStore:
    """A store holding ``counts[B, H]`` random rows per (batch, head); low-rank keys on ``basis[B * H, D, rank]``."""
    store = RaggedStore(key, value)
    store.init(*counts.shape, DEVICE)
    store.basis = basis
    segments = torch.repeat_interleave(torch.arange(counts.numel()), counts.flatten()).to(DEVICE)
    n = segments.numel()
    k, v = (torch.randn(n, dim, device=DEVICE, dtype=dtype) * 2 for _ in range(2))
    store.add(
        k, v, segments, *(torch.arange(n, device=DEVICE), torch.rand(n, device=DEVICE), torch.zeros(n, device=DEVICE))
    )
    return store


def check_products(stores: list[RaggedStore], query_rows: int, dim: int, dtype=torch.float32, tol=1e-4):
    layout = PaddedLayout(stores)
    shape = (*layout.shape, layout.width)
    held = [i for i, s in enumerate(stores) if s.rows]
    segments = [layout.segments[i] for i in held]
    keys = gpu.CodedRows([stores[i].keys for i in held], segments, shape)
    values = gpu.CodedRows([stores[i].values for i in held], segments, shape)
    padded = layout.view(torch.float32)
    assert isinstance(padded.keys, PaddedRows)
    query = torch.randn(*layout.shape, query_rows, dim, device=DEVICE)
    wide = torch.rand(*layout.shape, query_rows, layout.width + 5, device=DEVICE)  # body then a recent window
    probs = wide[..., : layout.width]  # a slice, as attention hands it over
    logits = keys.scores(query.to(dtype))
    assert logits.dtype == dtype and logits.shape == (*layout.shape, query_rows, layout.width)
    expected = padded.logits(query.to(dtype).float())
    assert torch.equal(logits.isinf(), expected.isinf())  # -inf exactly in the empty slots
    torch.testing.assert_close(logits.float(), expected, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(
        values.weigh(probs.to(dtype)).float(), padded.values.weigh(probs.to(dtype).float()), rtol=tol, atol=tol * 10
    )


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("groups", [1, 3, 8])
def test_triton_products_match_the_padded_view(precision, groups):
    """Batch 2 x 3 heads holding 0, 1, odd and long (split across programs) row counts."""
    torch.manual_seed(0)
    counts = torch.tensor([[0, 1, 7], [gpu.ROWS + 37, 2, 0]])
    check_products([store_with(counts, *PRECISIONS[precision], dim=128)], query_rows=groups, dim=128)


@pytest.mark.parametrize("dim", [64, 256])
def test_triton_head_dims_and_two_tiers(dim):
    """Two stores (a high and a low tier) sharing each head's slots, queries of two steps per GQA group."""
    torch.manual_seed(1)
    high = store_with(torch.tensor([[3, 0], [5, 40]]), Precision(8, 64), Precision(4, 64), dim)
    low = store_with(torch.tensor([[9, 4], [0, 300]]), Precision(4, 32), Precision(2, 32), dim)
    check_products([high, low], query_rows=6, dim=dim)


def test_triton_rows_narrower_than_a_power_of_two():
    """Rank-24 coefficient rows: a width that is no power of two (masked columns)."""
    torch.manual_seed(2)
    store = store_with(torch.tensor([[5, 11]]), Precision(8, 8), Precision(4, 8), dim=24)
    check_products([store], query_rows=4, dim=24)


def test_triton_bfloat16_queries_get_bfloat16_products():
    torch.manual_seed(3)
    store = store_with(torch.tensor([[17, 3]]), *PRECISIONS["k8v4"], dim=64, dtype=torch.bfloat16)
    check_products([store], query_rows=3, dim=64, dtype=torch.bfloat16, tol=2e-2)


def test_triton_generation_matches_the_padded_view(tiny_tok, monkeypatch):
    """The unified cache decoding through the Triton kernels (forced in place of numba on CPU) gives the padded
    view's tokens and logits within float summation order: through the products (scores, weigh, fold) with the
    softmax between them, and through a decode step's three launches (`gpu.DecodeStep`)."""
    from helpers import GREEDY, TINY_PROMPT, lively

    from leankv_hf import UnifiedLeanCache, kernels

    model = lively("llama").to(DEVICE)
    ids = tiny_tok([TINY_PROMPT, "short one"], return_tensors="pt", padding=True).to(DEVICE)
    steps = []  # the fused step's calls
    call = gpu.DecodeStep.__call__
    monkeypatch.setattr(gpu.DecodeStep, "__call__", lambda self, *args: steps.append(1) or call(self, *args))

    def run(fused: str, step=None) -> torch.Tensor:
        monkeypatch.setenv("LEANKV_FUSED", fused)
        monkeypatch.setattr(kernels, "decode_step", step or (lambda *readers: None))  # None: the products
        cache = UnifiedLeanCache(model, preset="leankv", group_size=16, buffer=8, window=8, interval=4)
        out = model.generate(
            **ids, past_key_values=cache, max_new_tokens=10, return_dict_in_generate=True, output_scores=True, **GREEDY
        )
        return out.sequences, torch.stack(out.scores)

    if DEVICE.type == "cpu":  # stores on CPU go through the Triton kernels (interpreted) instead of numba's
        monkeypatch.setattr(kernels, "enabled", lambda device="cpu": os.environ["LEANKV_FUSED"] == "1")
        monkeypatch.setattr(kernels.cpu, "CodedRows", gpu.CodedRows)
        monkeypatch.setattr(kernels.cpu, "fusable", gpu.fusable)
    padded = run("0")
    products = run("1")
    assert not steps
    fused = run("1", gpu.DecodeStep)
    assert steps
    for via_triton in (products, fused):
        assert torch.equal(via_triton[0], padded[0])
        torch.testing.assert_close(via_triton[1], padded[1], rtol=1e-3, atol=1e-3)


COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from leankv_hf.kernels import gpu

POINTERS = dict(query="*bf16", probs="*bf16", out="*fp32", partial="*fp32", observed="*fp32", score="*fp16",
                ages="*u8", segs="*i64", segs_a="*i64", segs_b="*i64", reduced="*bf16", window_keys="*bf16",
                window_values="*bf16", visible="*i1", scale="fp32", logits="*fp32", most="*fp32", totals="*fp32",
                score_a="*fp16", score_b="*fp16", ages_a="*u8", ages_b="*u8", recent="*fp32", recent_ages="*u8")


def build(kernel, constants, codes, capability, rows=None):
    signature = {name: POINTERS.get(name, "i32") for name in kernel.arg_names}
    for side, bits in codes.items():
        signature |= {f"codes_{side}": "*fp16" if bits == 16 else "*u8", f"scale_{side}": "*fp16",
                      f"zero_{side}": "*fp16"}
    for name, bits in (rows or {}).items():  # the decode step's: keys_a, values_a, ... and their scales and zeros
        kind, side = name.split("_")
        signature |= {name: "*fp16" if bits == 16 else "*u8", f"{kind[0]}_scale_{side}": "*fp16",
                      f"{kind[0]}_zero_{side}": "*fp16"}
    signature |= dict.fromkeys(constants, "constexpr")
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", capability, 32))
    assert compiled.asm["cubin"]
    print(kernel.__name__, constants, f"sm_{capability}")


for capability in (80, 90):
    for a, b, two in ((8, 4, True), (4, 2, True), (16, 8, True), (2, 16, False)):
        constants = dict(D=128, BITS_A=a, GROUP_A=32, BITS_B=b, GROUP_B=64, TWO=two, BLOCK_Q=4, BLOCK_N=16,
                         BLOCK_D=128)
        for kernel in (gpu._scores_kernel, gpu._weigh_kernel):
            build(kernel, constants, {"a": a, "b": b}, capability)
    for peak in (False, True):
        build(gpu._fold_kernel, dict(PEAK=peak, BLOCK=gpu.ROWS), {}, capability)
    for ka, va, kb, vb, two in ((8, 4, 4, 2, True), (16, 16, 16, 16, False), (2, 2, 8, 8, True)):
        constants = dict(DK=32, D=128, BITS_KA=ka, GROUP_KA=32, BITS_VA=va, GROUP_VA=32, BITS_KB=kb, GROUP_KB=32,
                         BITS_VB=vb, GROUP_VB=64, TWO=two, VISIBLE=two, BLOCK_Q=4, BLOCK_N=16, BLOCK_DK=32,
                         BLOCK_D=128)
        codes = {f"{kind}_{side}": bits for side, pair in (("a", (ka, va)), ("b", (kb, vb)))
                 for kind, bits in zip(("keys", "values"), pair)}
        build(gpu._step_kernel, constants, {}, capability, codes)
    build(gpu._combine_kernel, dict(D=128, BLOCK_Q=4, BLOCK_D=128), {}, capability)
    for by_max, peak in ((True, False), (False, True)):
        build(gpu._fold_step_kernel, dict(TWO=True, BY_MAX=by_max, PEAK=peak, BLOCK_Q=4, BLOCK_N=gpu.ROWS), {},
              capability)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="Triton builds CUDA binaries on Linux")
def test_triton_kernels_compile_for_sm80_and_sm90():
    """Every kernel, bit width and tier mix built to cubin for A100 (sm_80) and H100/H200 (sm_90), as the GPU
    would build them: in a fresh process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert len(done.stdout.splitlines()) == 32, done.stdout


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_triton_fold_updates_running_scores_like_the_torch_arithmetic(reduce):
    """Each row's fp16 score and uint8 age, updated in place from the attention its slot received."""
    from leankv_hf.store import fold_scores

    torch.manual_seed(4)
    stores = [store_with(torch.tensor([[3, 0], [gpu.ROWS + 9, 1]]), *PRECISIONS["k8v4"], dim=32) for _ in range(2)]
    for store in stores:
        store.ages = torch.randint(0, 256, (store.rows,), dtype=torch.uint8, device=DEVICE)
        store.ages[::3] = 255  # saturated: the mean decays
        store.scores = torch.rand(store.rows, device=DEVICE).half()
    layout = PaddedLayout(stores)
    observed = torch.rand(*layout.shape, layout.width + 4, device=DEVICE) * 3  # body then a recent window
    expected = []
    for store, slots in zip(stores, layout.slots(), strict=True):
        score, ages = fold_scores(
            store.scores.float(), store.ages, observed[..., : layout.width].flatten()[slots], 3, reduce
        )
        expected.append((score.half(), ages))
    gpu.fold(observed[..., : layout.width], 3, list(zip(stores, layout.segments, strict=True)), layout.width, reduce)
    for store, (score, ages) in zip(stores, expected, strict=True):
        assert torch.equal(store.ages, ages)
        torch.testing.assert_close(store.scores, score, rtol=1e-3, atol=0)  # within one fp16 rounding


def test_triton_programs_read_many_row_blocks_when_segments_are_many(monkeypatch):
    """Few programs for many rows (as for a large batch of long contexts): each loops over several row blocks."""
    monkeypatch.setattr(gpu, "PROGRAMS", 2)
    torch.manual_seed(5)
    counts = torch.tensor([[5 * gpu.ROWS + 3, 0, 2 * gpu.ROWS]])
    check_products([store_with(counts, *PRECISIONS["k4v2"], dim=64)], query_rows=3, dim=64)


def step_case(
    stores: list[RaggedStore], groups: int, dim: int, span: int, visible: bool, by_max=True, peak=False, basis=None
):
    """Both decode steps (`kernels.cpu.DecodeStep`, `gpu.DecodeStep`) over copies of ``stores``, with the same
    queries and window; each returns its output and what it updated: the stores' scores and ages, the window's."""
    import copy

    from leankv_hf.kernels import cpu

    layout = PaddedLayout(stores)
    batch, heads = layout.shape
    query = torch.randn(batch, heads, groups, dim, device=DEVICE)
    reduced = query if basis is None else query @ basis.view(batch, heads, *basis.shape[1:])
    window = torch.randn(2, batch, heads, span, dim, device=DEVICE)
    seen = torch.rand(batch, span, device=DEVICE) > 0.3 if visible else None
    if seen is not None:
        seen[:, -1] = True  # the query's own token
    recent = torch.rand(batch, heads, span, device=DEVICE)
    ages = torch.randint(0, 256, (batch, heads, span), dtype=torch.uint8, device=DEVICE)
    results = []
    for backend in (cpu, gpu):
        held = copy.deepcopy(stores)
        segments = PaddedLayout(held).segments
        shape = (batch, heads, layout.width)
        readers = [backend.CodedRows([getattr(s, side) for s in held], segments, shape) for side in ("keys", "values")]
        step = backend.DecodeStep(*readers, held)
        state = recent.clone(), ages.clone()
        out = step(query, reduced, *window, seen, dim**-0.5, by_max, peak, *state)
        results.append((out, [(s.scores, s.ages) for s in held], state))
    return results


def check_step(results, tol=1e-4):
    (out, stored, window), (out_gpu, stored_gpu, window_gpu) = results
    torch.testing.assert_close(out_gpu, out, rtol=tol, atol=tol)
    for (score, ages), (score_gpu, ages_gpu) in zip(stored, stored_gpu, strict=True):
        assert torch.equal(ages_gpu, ages)
        torch.testing.assert_close(score_gpu, score, rtol=2e-3, atol=1e-6)  # within one fp16 rounding
    torch.testing.assert_close(window_gpu[0], window[0], rtol=tol, atol=1e-6)
    assert torch.equal(window_gpu[1], window[1])


@pytest.mark.parametrize(
    ("mix", "groups"),
    # GQA groups on one mix (each group count over four compiles another numba step, the reference: ~20 s cold)
    [("two tiers", 1), ("two tiers", 3), ("two tiers", 8), ("two tiers", 20), ("one store", 3), ("16-bit", 3)],
)
def test_triton_decode_step_matches_the_cpu_step(mix, groups):
    """The fused GPU step (logits and partial softmax per program, combined, then folded) gives the numba step's
    output and updates the same scores: heads of 0, 1, odd and split row counts, a window partly hidden."""
    torch.manual_seed(6)
    counts = torch.tensor([[0, 1, 7], [gpu.ROWS + 37, 2, 0]])
    dim = 128 if mix == "one store" else 64
    if mix == "two tiers":
        stores = [store_with(counts, *PRECISIONS["k8v4"], dim), store_with(counts.flip(1), *PRECISIONS["k4v2"], dim)]
    else:
        sixteen = mix == "16-bit"  # rows held at a 16-bit storage dtype, as a cache holds them
        stores = [store_with(counts, *PRECISIONS["16-bit" if sixteen else "k2v2 per row"], dim, torch.float16)]
    check_step(step_case(stores, groups, dim, span=5, visible=groups != 3))


def test_triton_decode_step_scores_low_rank_keys_and_keeps_means_or_peaks():
    """Low-rank keys (both tiers' coefficients on one per-head basis) scored in the reduced space; a KV head taking
    its query heads' mean attention, scores keeping their peak."""
    torch.manual_seed(7)
    counts = torch.tensor([[3, gpu.ROWS + 5], [0, 9]])
    basis = torch.linalg.qr(torch.randn(4, 64, 32, device=DEVICE))[0]
    stores = [
        store_with(counts, Precision(8, 32, rank=32), Precision(4, 32), 64, basis=basis),
        store_with(counts.flip(0), Precision(4, 32, rank=32), Precision(2, 32), 64, basis=basis),
    ]
    check_step(step_case(stores, 4, 64, span=3, visible=True, by_max=False, peak=True, basis=basis))
