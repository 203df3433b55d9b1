"""The fused CPU kernels against the torch code they replace: same products, same running means, same generation."""

import pytest
import torch
from helpers import TINY_PROMPT, lively

from leankv_hf import UnifiedLeanCache, kernels
from leankv_hf.attention import _explicit_attention
from leankv_hf.caches.layer import LeanLayer
from leankv_hf.kernels import cpu
from leankv_hf.store import PaddedLayout, PaddedRows, Precision, RaggedStore, fold_scores

pytest.importorskip("numba")

DIM = 32


def ragged_stores(precisions, batch=2, heads=3, seed=0, dtype=torch.float32) -> list[RaggedStore]:
    """Stores holding a random, different number of rows per (batch, head), some heads none; ``dtype``: of the
    rows given (what a 16-bit precision keeps)."""
    torch.manual_seed(seed)
    stores = []
    for key, value in precisions:
        store = RaggedStore(key, value)
        store.init(batch, heads, torch.device("cpu"))
        counts = torch.randint(0, 9, (batch * heads,))
        counts[seed % (batch * heads)] = 0
        segments = torch.repeat_interleave(torch.arange(batch * heads), counts)
        n = segments.numel()
        rows = (torch.randn(n, DIM) * 2).to(dtype), torch.randn(n, DIM).to(dtype)
        store.add(*rows, segments, torch.arange(n), torch.rand(n), torch.zeros(n))
        stores.append(store)
    return stores


MIXES = {
    "k8v4, k4v2": [(Precision(8, DIM), Precision(4, DIM)), (Precision(4, DIM), Precision(2, DIM))],
    "two groups per row": [(Precision(8, 16), Precision(8, 8)), (Precision(2, 16), Precision(4, 16))],
    "one store": [(Precision(4, DIM), Precision(8, DIM))],
}


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("rows", [1, 3, 5, 8])
def test_fused_products_match_the_padded_view(mix, rows):
    layout = PaddedLayout(ragged_stores(MIXES[mix]))
    fused, padded = layout.view(torch.float32, fused=True), layout.view(torch.float32)
    assert isinstance(fused.keys, kernels.cpu.CodedRows) and isinstance(padded.keys, PaddedRows)
    assert torch.equal(fused.valid, padded.valid)
    batch, heads, width = fused.valid.shape
    query, probs = torch.randn(batch, heads, rows, DIM), torch.rand(batch, heads, rows, width)
    torch.testing.assert_close(fused.logits(query), padded.logits(query), rtol=1e-5, atol=1e-4)  # -inf: empty
    torch.testing.assert_close(fused.values.weigh(probs), padded.values.weigh(probs), rtol=1e-5, atol=1e-4)


STEP_MIXES = {  # one store, two stores with two groups per row, a 16-bit store beside a coded one
    "one store": MIXES["one store"],
    "two groups per row": MIXES["two groups per row"],
    "16-bit, k4v2": [(Precision(16), Precision(16)), (Precision(4, DIM), Precision(2, DIM))],
}


@pytest.mark.parametrize("mix", STEP_MIXES)
@pytest.mark.parametrize("padded", [False, True], ids=["all visible", "padded window"])
@pytest.mark.parametrize("by_max, peak", [(True, True), (False, False)], ids=["max", "mean"])
@pytest.mark.parametrize("chunk", [kernels.cpu.CHUNK, 3], ids=["a task per head", "heads split in tasks"])
def test_a_decode_step_in_one_call_matches_the_products_it_replaces(mix, padded, by_max, peak, chunk, monkeypatch):
    """`DecodeStep`: one query per query head over the stores and an exact window gives the output, and folds the
    scores every row and window token received, as the readers' products, a softmax and the folds do (`fold`,
    `fold_scores`), up to float summation order; also where a head's rows are split across tasks, each with its own
    maximum (flash-decoding)."""
    monkeypatch.setattr(kernels.cpu, "CHUNK", chunk)
    stores, reference = (ragged_stores(STEP_MIXES[mix], seed=2, dtype=torch.float16) for _ in range(2))
    for store, twin in zip(stores, reference, strict=True):
        store.ages = torch.randint(0, 256, (store.rows,), dtype=torch.uint8)
        twin.ages, twin.scores = store.ages.clone(), store.scores.clone()
    layout, twin_layout = PaddedLayout(stores), PaddedLayout(reference)
    step, _ = layout.decode_step(torch.float32)
    batch, heads, width = *layout.shape, layout.width
    groups, window, scale = 3, 5, DIM**-0.5
    query, keys, values = torch.randn(batch, heads, groups, DIM), *torch.randn(2, batch, heads, window, DIM)
    visible = torch.tensor([[True] * window, [False, False, True, True, True]]) if padded else None
    recent, ages = torch.rand(batch, heads, window), torch.randint(0, 256, (batch, heads, window), dtype=torch.uint8)
    expected_recent, expected_ages = recent.clone(), ages.clone()

    out = step(query, query, keys, values, visible, scale, by_max, peak, recent, ages)

    columns = None if visible is None else visible[:, None, None].expand(-1, heads, groups, -1)
    probs, expected = _explicit_attention(
        query, twin_layout.view(torch.float32, fused=True), keys, values, columns, scale
    )
    received = probs.amax(2) if by_max else probs.mean(2)
    twin_layout.fold(received[..., :width], 1, "max" if peak else "mean")
    expected_recent, expected_ages = fold_scores(
        expected_recent, expected_ages, received[..., width:], 1, "max" if peak else "mean"
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recent, expected_recent, rtol=1e-5, atol=1e-6)
    assert torch.equal(ages, expected_ages)
    for store, twin in zip(stores, reference, strict=True):
        torch.testing.assert_close(store.scores, twin.scores, rtol=1e-3, atol=0)  # fp16: within one rounding
        assert torch.equal(store.ages, twin.ages)


def test_a_decode_step_folds_into_the_scores_each_store_holds_now():
    """A layout's step keeps its views of the stores' scores and ages from one call to the next; a store given new
    ones in between (the torch fold replaces them) gets its observations there, and the old ones stay as they were."""
    stores = ragged_stores(MIXES["k8v4, k4v2"])
    layout = PaddedLayout(stores)
    decode_step, _ = layout.decode_step(torch.float32)
    batch, heads = layout.shape
    recent = torch.zeros(batch, heads, 5)
    args = torch.randn(batch, heads, 3, DIM), torch.randn(2, batch, heads, 5, DIM), recent, recent.byte()
    query, window = args[:2]

    def step() -> None:
        decode_step(query, query, *window, None, 0.125, True, False, *args[2:])

    step()
    old = stores[0].ages
    stores[0].scores, stores[0].ages = stores[0].scores.clone(), old.clone()
    seen = old.clone()
    step()
    assert torch.equal(old, seen) and torch.equal(stores[0].ages, seen + 1)


def test_only_a_decode_step_of_one_or_two_stores_is_one_call():
    """Three stores (no cache has three tiers) take the readers' products; so do rows the kernels cannot read."""
    three = [(Precision(8, DIM), Precision(4, DIM))] * 3
    assert PaddedLayout(ragged_stores(three)).decode_step(torch.float32) is None
    fp8 = [(Precision(8, DIM, fmt="fp8"), Precision(8, DIM, fmt="fp8"))]
    assert PaddedLayout(ragged_stores(fp8)).decode_step(torch.float32) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_rows_are_read_in_place(dtype):
    """A 16-bit tier (`SparseHeadCache`'s rows), alone or beside a coded one: the kernels read the rows' bits, with
    subnormals and zeros among them, and give the padded view's products."""
    stores = ragged_stores([(Precision(16), Precision(16)), (Precision(4, DIM), Precision(2, DIM))], dtype=dtype)
    tiny = torch.tensor([0.0, -0.0, 1e-7, -3e-6, 5e-5], dtype=dtype)  # float16 zeros and subnormals
    stores[0].keys[:, : tiny.numel()] = tiny
    for layout in (PaddedLayout(stores[:1]), PaddedLayout(stores)):
        fused, padded = layout.view(torch.float32, fused=True), layout.view(torch.float32)
        assert isinstance(fused.keys, kernels.cpu.CodedRows) and isinstance(padded.keys, PaddedRows)
        batch, heads, width = fused.valid.shape
        query, probs = torch.randn(batch, heads, 3, DIM), torch.rand(batch, heads, 3, width)
        torch.testing.assert_close(fused.logits(query), padded.logits(query), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(fused.values.weigh(probs), padded.values.weigh(probs), rtol=1e-5, atol=1e-4)


def test_the_kernels_use_torchs_threads_and_give_the_same_products_on_one(monkeypatch):
    """Tasks (chunks of a head's rows) run in parallel on ``torch.get_num_threads()`` threads; their sums are added
    in task order, so the products and a decode step's output and scores are bit-identical to a single thread's."""
    import numba

    monkeypatch.setattr(kernels.cpu, "CHUNK", 3)  # several tasks per head
    layouts = {threads: PaddedLayout(ragged_stores(MIXES["k8v4, k4v2"], batch=3, heads=4)) for threads in (1, 2)}
    fused = {threads: layout.view(torch.float32, fused=True) for threads, layout in layouts.items()}
    batch, heads, width = fused[1].valid.shape
    query, probs = torch.randn(batch, heads, 3, DIM), torch.rand(batch, heads, 3, width)
    window = torch.randn(2, batch, heads, 5, DIM)
    before = torch.get_num_threads()
    try:
        products = {}
        for threads, body in fused.items():
            torch.set_num_threads(threads)
            recent = torch.zeros(batch, heads, 5)
            step, _ = layouts[threads].decode_step(torch.float32)
            out = step(query, query, *window, None, 0.125, True, False, recent, torch.zeros_like(recent).byte())
            assert numba.get_num_threads() == min(threads, numba.config.NUMBA_NUM_THREADS)
            scores = [store.scores for store in layouts[threads].stores]
            products[threads] = body.logits(query), body.values.weigh(probs), out, recent, *scores
            assert numba.get_num_threads() == min(threads, numba.config.NUMBA_NUM_THREADS)
            assert torch.get_num_threads() == threads  # the kernels leave torch's own setting alone
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(products[1], products[2], strict=True))


def test_the_first_kernel_call_leaves_torchs_thread_count_alone():
    """Starting numba's OpenMP pool sets torch's OpenMP thread count to every core: a user's one-thread setting must
    hold through a process's first decode step (a fresh process, so the pool is not started yet)."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from leankv_hf.kernels import cpu\n"
        "torch.set_num_threads(1)\n"
        "cpu._use_torch_threads()\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1"]


def test_a_kernel_compiled_in_one_process_is_loaded_from_numbas_cache_in_the_next():
    """A first decode step compiles its kernels (tens of seconds); numba caches them on disk, keyed by a hash of what
    each kernel's closure holds. That key must be the same in every process, or every new process compiles again."""
    import subprocess
    import sys

    script = (
        "import hashlib\n"
        "from numba.core.caching import FunctionCache\n"
        "from numba.core.serialize import dumps\n"
        "from leankv_hf.kernels import cpu\n"
        "for kernel in (cpu._step_kernel((8, 1, 4, 1), (4, 1, 2, 1), 1), *cpu._kernels(4, 2)):\n"
        "    assert isinstance(kernel._cache, FunctionCache), kernel\n"
        "    held = tuple(cell.cell_contents for cell in kernel.py_func.__closure__)\n"
        "    print(hashlib.sha256(dumps(held)).hexdigest())\n"
    )
    keys = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
        for _ in range(2)
    ]
    assert len(keys[0]) == 3 and keys[0] == keys[1]


def test_every_variant_of_a_kernel_and_of_its_routines_has_a_name_of_its_own():
    """numba names a function's machine code by its name and a number counted per process, and a cached kernel carries
    the routines it calls under those names. Named alike, two variants of a routine (``score`` reading 8-bit codes,
    ``score`` reading 4-bit ones) compiled in two processes could end up under one name in two cached kernels, and a
    process loading both linked one for both: after test runs had cached kernels from several processes, the next run
    got wrong outputs, and a bench loading two presets' kernels corrupted its heap. numba also keeps one cache index per name, rewritten without a lock."""
    cpu = kernels.cpu
    kernels_ = [
        cpu._step_kernel((8, 1, 4, 1), (4, 1, 2, 1), 1),
        cpu._step_kernel((8, 1, 8, 1), (4, 1, 4, 1), 2),
        *cpu._kernels(8, 1),
        *cpu._kernels(4, 2),
    ]
    routines = [
        *cpu._routines(8, 1),
        *cpu._routines(4, 1),
        *cpu._routines(4, 2),
        *cpu._routines(16, 1),
        cpu._score(8, 1, 1),
    ]
    names = [function.py_func.__qualname__ for function in kernels_ + routines]
    assert len(set(names)) == len(names)
    assert len({kernel._cache._cache_file._index_path for kernel in kernels_}) == len(kernels_)


def test_a_new_python_thread_runs_the_kernels_on_torchs_thread_count_too():
    """numba's thread count is set per Python thread: a second thread (a server's worker) must get its own."""
    import threading

    import numba

    fused = PaddedLayout(ragged_stores(MIXES["one store"])).view(torch.float32, fused=True)
    query = torch.randn(*fused.valid.shape[:2], 1, DIM)
    before = torch.get_num_threads()
    seen = []

    def decode() -> None:
        fused.logits(query)
        seen.append((numba.get_num_threads(), min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))

    try:
        torch.set_num_threads(1)
        fused.logits(query)  # this thread first, at one thread
        worker = threading.Thread(target=decode)
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 1 and seen[0][0] == seen[0][1]


def test_bfloat16_queries_get_bfloat16_products():
    """A bfloat16 model on CPU: the kernels compute in float32 and hand back bfloat16 (within its rounding)."""
    layout = PaddedLayout(ragged_stores(MIXES["k8v4, k4v2"]))
    fused, padded = layout.view(torch.bfloat16, fused=True), layout.view(torch.float32)
    batch, heads, width = fused.valid.shape
    query, probs = torch.randn(batch, heads, 3, DIM), torch.rand(batch, heads, 3, width)
    logits, weighed = fused.logits(query.bfloat16()), fused.values.weigh(probs.bfloat16())
    assert logits.dtype == weighed.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), padded.logits(query.bfloat16().float()), rtol=1e-2, atol=1e-1)
    torch.testing.assert_close(weighed.float(), padded.values.weigh(probs.bfloat16().float()), rtol=1e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_scales_are_read_exactly(dtype):
    """The kernels read 16-bit scales, zeros and scores from their bits through a small table of powers: every
    finite pattern (normal, subnormal, zero, negative) gives exactly torch's float32 value."""
    import numba
    import numpy as np

    @numba.njit
    def read(bits, powers, mantissa, out):
        for i in range(bits.shape[0]):
            out[i] = kernels.cpu._float16(bits[i], powers, mantissa)

    patterns = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(dtype)
    out = np.zeros(2**16, np.float32)
    read(kernels.cpu._bits(patterns), *kernels.cpu._powers(dtype), out)
    finite = torch.isfinite(patterns)
    assert torch.equal(torch.from_numpy(out)[finite], patterns.float()[finite])


def test_scores_are_written_as_float16_exactly_as_torch_rounds():
    """The decode step writes each row's new score as float16 bits in place (`_half_bits`): torch's rounding for
    every float32 around float16's range, its edges (largest finite, overflow, subnormals, ties) and the specials."""
    import numba
    import numpy as np

    @numba.njit
    def write(values, out):
        for i in range(values.shape[0]):
            out[i] = kernels.cpu._half_bits(values[i])

    torch.manual_seed(0)
    spread = torch.randn(200_000) * torch.exp2(torch.randint(-30, 18, (200_000,)).float())
    top, tiny = 65504.0, 2.0**-24
    edges = torch.tensor([0.0, -0.0, top, 65519.99, 65520.0, 65536.0, 1e30, 2.0**-14, tiny, tiny / 2, tiny * 1.5])
    halfway = (torch.arange(-2048, 2048).float() + 0.5) * tiny  # subnormal ties
    ulp_ties = 1 + (torch.arange(0, 1024).float() + 0.5) * 2.0**-10  # normal ties between 1 and 2
    specials = torch.tensor([float("inf"), -float("inf"), float("nan")])
    values = torch.cat([spread, edges, -edges, halfway, ulp_ties, specials])
    out = np.zeros(values.shape[0], np.uint16)
    write(values.numpy(), out)
    written = torch.from_numpy(out.view(np.int16)).view(torch.float16)
    expected = values.half()
    assert torch.equal(written.isnan(), expected.isnan())
    assert torch.equal(written[~expected.isnan()].view(torch.int16), expected[~expected.isnan()].view(torch.int16))


@pytest.mark.parametrize("n", [1, 4])
def test_folded_scores_match_the_running_mean(monkeypatch, n):
    """Each row's running mean and age, from the scores its slot received: bit for bit the torch arithmetic."""
    stores = {fused: ragged_stores(MIXES["k8v4, k4v2"], seed=1) for fused in (True, False)}
    for store in stores[True] + stores[False]:
        store.ages = torch.randint(0, 256, (store.rows,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        store.ages[::3] = 255  # saturated: the mean decays
    layouts = {fused: PaddedLayout(stores[fused]) for fused in stores}
    scores = torch.rand(*layouts[True].shape, layouts[True].width) * n
    layouts[True].fold(scores, n)
    monkeypatch.setattr(kernels, "enabled", lambda *device: False)
    layouts[False].fold(scores, n)
    for fused, reference in zip(stores[True], stores[False], strict=True):
        assert torch.equal(fused.scores, reference.scores) and torch.equal(fused.ages, reference.ages)


@pytest.mark.parametrize(
    "precision",
    [Precision(16), Precision(8, DIM, fmt="fp8"), Precision(4, DIM, scale_dtype=torch.float32)],
    ids=["float32 rows", "fp8 rows", "float32 scales"],
)
def test_rows_the_kernels_cannot_read_take_the_padded_view(precision):
    layout = PaddedLayout(ragged_stores([(Precision(8, DIM), Precision(4, DIM)), (precision, precision)]))
    assert isinstance(layout.view(torch.float32, fused=True).keys, PaddedRows)


def test_switching_the_kernels_off_gives_the_padded_view(monkeypatch):
    layout = PaddedLayout(ragged_stores(MIXES["one store"]))
    monkeypatch.setenv("LEANKV_FUSED", "0")
    assert not kernels.enabled()
    assert isinstance(layout.view(torch.float32, fused=True).keys, PaddedRows)


@pytest.mark.parametrize("preset", ["leankv", "leankv-m"])
def test_generation_through_the_kernels_matches_the_padded_view(tiny_tok, monkeypatch, preset):
    """Teacher-forced: the same tokens through both paths put the same tokens in the same tiers and give logits
    equal up to float summation order (which compounds over 13 steps, hence 1e-3). Through the kernels a decode step
    is one call that reads the stores: it builds no body view (the padded path builds one per layer and step)."""
    model = lively("llama")
    ids = tiny_tok([TINY_PROMPT, "short one"], return_tensors="pt", padding=True)
    steps = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    decode_views = []
    body_view = LeanLayer.body_view

    def counted(self, dtype, query=None, fused=False):
        decode_views.append(query is not None and query.shape[2] == 1)
        return body_view(self, dtype, query, fused)

    monkeypatch.setattr(LeanLayer, "body_view", counted)

    def run(fused: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        monkeypatch.setenv("LEANKV_FUSED", fused)
        decode_views.clear()
        cache = UnifiedLeanCache(model, preset=preset, group_size=16, buffer=8, window=8, interval=4)
        mask = ids.attention_mask
        with torch.no_grad():
            out = [model(**ids, past_key_values=cache).logits[:, -1]]
            for step in steps.T:
                mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
                out.append(model(input_ids=step[:, None], attention_mask=mask, past_key_values=cache).logits[:, -1])
        return torch.stack(out), cache.tier_counts(), sum(decode_views)

    (fused, fused_tiers, fused_views), (padded, padded_tiers, padded_views) = run("1"), run("0")
    assert fused_views == 0 and padded_views == 12 * model.config.num_hidden_layers
    assert torch.equal(fused_tiers, padded_tiers)
    torch.testing.assert_close(fused, padded, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bits, group", [(8, 32), (4, 16), (2, 8), (4, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [50, 90])
def test_rows_are_quantized_in_one_call_to_the_same_bits(bits, group, dtype, tokens):
    """`kernels.quantize` (what a store encodes with on CPU) against `quant.quantize`: the same codes, scales and zeros,
    bit for bit, on rows of every scale, constant groups, tiny and huge values, and groups whose least or greatest value
    is a zero of either sign (which one counts: the first); a group with a NaN, an infinity or a scale past float16 is
    NaN in both (the torch code leaves its codes as they fall, the kernel writes 0). 600 and 1080 rows: tasks of
    `QUANTIZE_CHUNK` rows and a shorter last one."""
    from leankv_hf.quant import quantize

    assert 4 * 3 * tokens % cpu.QUANTIZE_CHUNK
    torch.manual_seed(bits * group)
    rows = torch.randn(4, 3, tokens, 64) * torch.exp2(torch.randint(-20, 12, (4, 3, tokens, 1)).float())
    rows[2, 0, :4] = rows[2, 0, :4].abs()  # least values: zeros of both signs
    rows[2, 0, :4, :2] = torch.tensor([[-0.0, 0.0], [0.0, -0.0]]).repeat(2, 1)
    rows[2, 1, :4] = -rows[2, 1, :4].abs()  # greatest values: zeros of both signs
    rows[2, 1, :4, :2] = torch.tensor([[-0.0, 0.0], [0.0, -0.0]]).repeat(2, 1)
    rows[0, 0, :5] = 3.0  # constant groups
    rows[0, 1, :5] = 1e-9  # rounds to a zero zero
    rows[0, 1, 5:10] = -1e-9
    rows[1, 0, 0, 0], rows[1, 0, 1, 1], rows[1, 0, 2, 2] = float("nan"), float("inf"), -float("inf")
    rows[1, 1, 0, :8] = torch.tensor([-60000.0, 60000.0] * 4)  # the scale overflows float16
    rows = rows.to(dtype)
    fused = kernels.quantize(rows, bits, group, "token", "int", torch.float16)
    expected = quantize(rows, bits, group, scale_dtype=torch.float16)
    assert fused.shape == expected.shape and fused.dtype == expected.dtype == dtype
    bad = expected.scale.isnan()
    assert torch.equal(fused.scale.isnan(), bad) and torch.equal(fused.zero.isnan(), bad) and bad.any()
    assert torch.equal(fused.scale[~bad].view(torch.int16), expected.scale[~bad].view(torch.int16))
    assert torch.equal(fused.zero[~bad].view(torch.int16), expected.zero[~bad].view(torch.int16))
    good = (~bad).repeat_interleave(group * bits // 8, -1)  # the payload bytes of the finite groups
    assert torch.equal(fused.payload[good], expected.payload[good])
    assert torch.equal(fused.dequantize().isnan(), expected.dequantize().isnan())


def test_rows_a_kernel_cannot_quantize_go_to_torch():
    rows = torch.randn(2, 3, 64)
    assert kernels.quantize(rows, 4, 32, "channel", "int", torch.float16) is None
    assert kernels.quantize(rows, 8, 32, "token", "fp8", torch.float16) is None
    assert kernels.quantize(rows, 4, 32, "token", "int", torch.bfloat16) is None
    assert kernels.quantize(rows.double(), 4, 32, "token", "int", torch.float16) is None
