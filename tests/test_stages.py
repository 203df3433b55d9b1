"""The pipeline stages on plain tensors, and the low-rank encoding of `RaggedStore` they share with the caches."""

from types import SimpleNamespace

import pytest
import torch

from leankv_hf import LowRanker, Quantizer, Reconstructor, Sparsifier, cache_nbytes
from leankv_hf.quant import QuantizedTensor
from leankv_hf.store import (
    DenseStore,
    PaddedLayout,
    Precision,
    RaggedStore,
    decode,
    fit_basis,
    gather_rows,
    segment_matmul,
)


def low_rank_keys(rank: int, shape=(2, 3, 40, 16), noise: float = 0.0) -> torch.Tensor:
    """Keys spanning ``rank`` directions per head, plus optional isotropic noise."""
    torch.manual_seed(0)
    b, h, t, d = shape
    return torch.randn(b, h, t, rank) @ torch.randn(b, h, rank, d) + noise * torch.randn(shape)


# -- Quantizer ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantizer_error_is_within_half_a_step(bits):
    x = torch.randn(2, 3, 10, 32) * 3
    quantizer = Quantizer(bits=bits, group_size=16)
    q = quantizer.encode(x)
    assert isinstance(q, QuantizedTensor) and q.payload.shape[-1] == 32 * bits // 8
    step = q.scale.float().repeat_interleave(16, -1)
    error = (quantizer.decode(q) - x).abs()
    assert bool((error <= step / 2 + 1e-5).all())
    assert quantizer.decode(q).dtype == x.dtype and quantizer.decode(q, torch.float16).dtype == torch.float16


def test_quantizer_16_bits_passes_through_and_bad_bits_are_named():
    x = torch.randn(1, 1, 4, 8)
    assert Quantizer(bits=16).encode(x) is x
    with pytest.raises(ValueError, match=r"bits=3 .*\(16, 8, 4, 2\)"):
        Quantizer(bits=3)


# -- LowRanker / Reconstructor -----------------------------------------------------------------------------
def test_low_rank_is_exact_at_full_rank():
    keys = torch.randn(2, 3, 40, 16)
    coefficients, basis = LowRanker(rank=16)(keys)
    assert coefficients.shape == (2, 3, 40, 16) and basis.shape == (2, 3, 16, 16)
    torch.testing.assert_close(Reconstructor()(coefficients, basis), keys, atol=1e-4, rtol=1e-4)


def test_low_rank_recovers_a_low_rank_signal_and_the_basis_is_orthonormal():
    keys = low_rank_keys(4)
    coefficients, basis = LowRanker(rank=4)(keys)
    torch.testing.assert_close(basis.mT @ basis, torch.eye(4).expand(2, 3, 4, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(Reconstructor()(coefficients, basis), keys, atol=1e-3, rtol=1e-3)
    _, too_small = LowRanker(rank=3)(keys)
    assert (Reconstructor()(keys @ too_small, too_small) - keys).abs().max() > 0.1


def test_low_rank_error_decreases_with_rank():
    keys = low_rank_keys(8, noise=0.3)
    errors = []
    for rank in (1, 2, 4, 8, 12, 16):
        coefficients, basis = LowRanker(rank=rank)(keys)
        errors.append(float((Reconstructor()(coefficients, basis) - keys).norm()))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-3


def test_low_rank_fits_only_valid_tokens():
    keys = low_rank_keys(2)
    valid = torch.ones(keys.shape[:3], dtype=torch.bool)
    keys[:, :, 0] = 100 * torch.randn(keys.shape[-1])  # an outlier outside the signal's span
    valid[:, :, 0] = False
    coefficients, basis = LowRanker(rank=2)(keys, valid)
    torch.testing.assert_close(Reconstructor()(coefficients, basis)[:, :, 1:], keys[:, :, 1:], atol=1e-3, rtol=1e-3)


def test_reconstructor_decodes_quantized_coefficients():
    keys = low_rank_keys(4)
    coefficients, basis = LowRanker(rank=4)(keys)
    packed = Quantizer(bits=8, group_size=4).encode(coefficients)
    error = (Reconstructor()(packed, basis) - keys).abs().max()
    assert 0 < error < 0.05 * keys.abs().max()


def test_low_rank_validation():
    with pytest.raises(ValueError, match=r"rank=0 must be a positive int"):
        LowRanker(rank=0)
    with pytest.raises(ValueError, match=r"rank=32 must be in 1..head_dim=16"):
        LowRanker(rank=32).fit(torch.randn(1, 1, 4, 16))


# -- Sparsifier --------------------------------------------------------------------------------------------
def test_sparsifier_keeps_each_heads_top_scored_tokens():
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 20, 8), torch.randn(2, 3, 20, 8)
    scores = torch.rand(2, 3, 20)
    sparsifier = Sparsifier(ratio=0.75, method="snapkv", options={"pooling": 1})
    mask = sparsifier.keep(scores)
    top = scores.topk(5, dim=-1).indices
    assert torch.equal(mask, torch.zeros_like(mask).scatter_(-1, top, True))
    kept_k, kept_v, counts = sparsifier(keys, values, scores)
    assert torch.equal(counts, torch.full((2, 3), 5))
    assert torch.equal(kept_k, keys[mask]) and torch.equal(kept_v, values[mask])


def test_sparsifier_heads_differ_and_sinks_stay():
    rising = torch.arange(10.0)
    scores = torch.stack([rising, rising.flip(0)])[None]  # head 0 likes the end, head 1 the start
    mask = Sparsifier(ratio=0.5, method="snapkv", sink=1, options={"pooling": 1}).keep(scores)
    assert mask[0, 0].nonzero().flatten().tolist() == [0, 6, 7, 8, 9]  # the sink, then the best four
    assert mask[0, 1].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


def test_sparsifier_validation():
    with pytest.raises(ValueError, match="Unknown policy 'nope'"):
        Sparsifier(method="nope")
    with pytest.raises(ValueError, match=r"ratio=1.0 must be in \[0, 1\)"):
        Sparsifier(ratio=1.0)
    with pytest.raises(ValueError, match="not \\['bogus'\\]"):
        Sparsifier(options={"bogus": 1})


# -- low-rank keys in a RaggedStore ------------------------------------------------------------------------
def ragged(rank: int | None, bits: int = 16, keys=None):
    """A store of 2 x 3 heads holding every token of ``keys`` (or random ones)."""
    keys = torch.randn(2, 3, 12, 16) if keys is None else keys
    store = RaggedStore(Precision(bits, 8, rank=rank), Precision(16))
    store.init(2, 3, torch.device("cpu"))
    if rank:
        store.basis = fit_basis(keys, rank).flatten(0, 1)
    b, h, t = (i.flatten() for i in torch.meshgrid(*(torch.arange(n) for n in keys.shape[:3]), indexing="ij"))
    order = torch.randperm(b.numel())  # rows arrive in any order: the store sorts them by (batch, head)
    b, h, t = b[order], h[order], t[order]
    store.add(keys[b, h, t], keys[b, h, t], b * 3 + h, t, torch.zeros(b.numel()), torch.zeros(b.numel()))
    return store, keys


def test_segment_matmul_multiplies_each_row_by_its_segments_matrix():
    x, segments, mats = torch.randn(9, 4), torch.tensor([2, 0, 2, 1, 0, 2, 2, 1, 0]), torch.randn(3, 4, 5)
    expected = torch.stack([x[i] @ mats[s] for i, s in enumerate(segments.tolist())])
    torch.testing.assert_close(segment_matmul(x, segments, mats), expected)


def stored_view(store: RaggedStore):
    """Each stored row's key and value from the padded view (keys rebuilt from the basis), in row order."""
    layout = PaddedLayout([store])
    body = layout.view(torch.float32)
    assert int(body.valid.sum()) == store.rows
    (slots,) = layout.slots()
    return body.full_keys().flatten(0, 2)[slots], body.values.dense().flatten(0, 2)[slots], store.segments()


def test_ragged_store_low_rank_round_trip():
    full, keys = ragged(rank=16)
    k, v, segments = stored_view(full)
    expected = keys.flatten(0, 1)[segments, full.positions.long()]
    assert full.keys.shape == (72, 16)
    torch.testing.assert_close(k, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v, expected)  # values stay full rank
    low, keys = ragged(rank=4, keys=low_rank_keys(4, shape=(2, 3, 12, 16)))
    k, _, segments = stored_view(low)
    assert low.keys.shape == (72, 4)
    torch.testing.assert_close(k, keys.flatten(0, 1)[segments, low.positions.long()], atol=1e-3, rtol=1e-3)


def test_ragged_store_low_rank_rows_drop_and_ragged_view():
    store, keys = ragged(rank=16)
    mask = torch.zeros(store.rows, dtype=torch.bool)
    mask[::5] = True  # an uneven set of rows per head
    taken, kept = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)
    segments = store.segments()[taken]
    read = store.rows_at(taken, torch.float32)
    store.rebuild(torch.bincount(store.segments()[kept], minlength=store.counts.numel()), kept, None)
    rows = keys.flatten(0, 1)[segments, read["positions"].long()]
    rebuilt = segment_matmul(read["k"], segments, store.basis.mT)  # read keys stay coefficients
    torch.testing.assert_close(rebuilt, rows, atol=1e-4, rtol=1e-4)
    k, _, segments = stored_view(store)  # heads now hold different numbers of rows
    torch.testing.assert_close(k, keys.flatten(0, 1)[segments, store.positions.long()], atol=1e-4, rtol=1e-4)


def test_ragged_store_low_rank_bytes_include_the_basis():
    store, _ = ragged(rank=4, bits=8)
    n, heads = 72, 6
    coefficients = n * 4 + n * 2 * 2  # 8-bit codes, one fp16 scale and zero per row (group = rank = 4)
    values = n * 16 * 4  # fp32, full rank
    metadata = n * (4 + 2 + 1) + heads * 8  # positions, scores, ages; counts
    basis = heads * 16 * 4 * 4  # [B * H, D, rank] fp32
    assert cache_nbytes(SimpleNamespace(layers=[store])) == coefficients + values + metadata + basis


def test_low_rank_store_needs_a_basis_and_keys_only():
    store = RaggedStore(Precision(16, rank=4), Precision(16))
    store.init(1, 1, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="set store.basis"):
        zeros = torch.zeros(2, dtype=torch.long)
        store.add(torch.randn(2, 8), torch.randn(2, 8), zeros, zeros, zeros, zeros)
    with pytest.raises(ValueError, match="keys only"):
        RaggedStore(Precision(16), Precision(16, rank=4))
    with pytest.raises(ValueError, match="needs a RaggedStore"):
        DenseStore(Precision(8, rank=4), Precision(4))


def test_precision_checks_rank_against_the_head():
    with pytest.raises(ValueError, match=r"rank=80 must be in 1..head_dim=64"):
        Precision(8, 32, rank=80).check_head_dim(64)
    with pytest.raises(ValueError, match=r"group_size=32 must divide the rank=48"):
        Precision(8, 32, rank=48).check_head_dim(64)
    Precision(8, 64, rank=32).check_head_dim(64)  # a group never spans more than a row: group = rank
    assert Precision(8, 64, rank=32).group == 32
    with pytest.raises(ValueError, match="axis='token'"):
        Precision(8, 32, axis="channel", rank=16)


# -- the padded body view: gathered rows, coded products, merged inserts -------------------------------------
@pytest.mark.parametrize(
    "precisions",
    [
        [Precision(8, 16), Precision(4, 16)],  # int codes, one group per row: stays coded
        [Precision(8, 8), Precision(2, 8)],  # two groups per row: dequantized once
        [Precision(16), Precision(4, 16)],  # mixed with 16-bit rows: decoded, then gathered
    ],
)
def test_gather_rows_matches_decoding_each_part(precisions):
    torch.manual_seed(0)
    parts = [p.encode(torch.randn(n, 16)) for p, n in zip(precisions, (5, 7), strict=True)]
    reference = torch.cat([decode(part, torch.float32) for part in parts] + [torch.zeros(1, 16)])
    source = torch.tensor([3, 12, 0, 12, 11, 5, 7, 1, 12, 2, 4, 6, 8, 9, 10])  # 12: the zero row
    rows = gather_rows(parts, source, torch.float32, (1, 3, 5))
    torch.testing.assert_close(rows.dense().flatten(0, 2), reference[source])
    assert (rows.scale is not None) == (precisions[0].group_size == 16 and precisions[0].quantized)


def test_coded_rows_products_equal_the_dense_products():
    torch.manual_seed(0)
    coded = gather_rows([Precision(4, 16).encode(torch.randn(6, 16))], torch.arange(6), torch.float32, (1, 2, 3))
    assert coded.scale is not None  # one group per row: kept as codes
    query, probs = torch.randn(1, 2, 4, 16), torch.rand(1, 2, 4, 3)
    dense = coded.dense()
    torch.testing.assert_close(coded.scores(query), query @ dense.mT)
    torch.testing.assert_close(coded.weigh(probs), probs @ dense)


def test_ragged_store_add_merges_new_rows_after_each_heads_stored_rows():
    store = RaggedStore(Precision(16), Precision(16))
    store.init(1, 3, torch.device("cpu"))

    def add(segments, positions):
        rows = torch.tensor(positions, dtype=torch.float32)[:, None].expand(-1, 4)
        n = len(positions)
        store.add(rows, rows, torch.tensor(segments), torch.tensor(positions), torch.zeros(n), torch.zeros(n))

    add([2, 0, 2], [0, 1, 2])
    add([1, 2, 0, 1], [3, 4, 5, 6])
    assert store.counts.tolist() == [[2, 2, 3]]
    assert store.positions.tolist() == [1, 5, 3, 6, 0, 2, 4]  # by head, then by arrival
    assert store.keys[:, 0].tolist() == [1, 5, 3, 6, 0, 2, 4]
