"""Where compressed tokens live: how each side is encoded (`Precision`), and two layouts.

* `DenseStore`: every (batch, head) holds the same tokens, so one ``[B, H, T, ...]`` block per side — the
  quantized cache, which never evicts. Supports per-channel keys (groups span tokens).
* `RaggedStore`: each (batch, head) holds its own tokens. Rows ``[N, ...]`` are sorted by (batch, head) and
  ``counts[B, H]`` says how many each holds (CSR), so persistent memory is exactly the kept tokens: nothing is
  padded to the longest head. Attention reads a transient padded view (`PaddedLayout`, `Body`), one layer at a
  time; int-coded rows stay coded in it (`PaddedRows`), and on CPU and CUDA the decode step reads them where
  they lie instead (`kernels.in_place`). Its keys may be low rank (``Precision(rank=r)``): rows hold ``r``
  coefficients on a per-(batch, head) basis (`fit_basis`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from . import kernels
from .quant import QuantizedTensor, quantize
from .quant.packing import unpack

BITS = (16, 8, 4, 2)
MAX_AGE = 255  # observations a row's running mean counts; uint8
AXES = ("token", "channel")
FORMATS = ("int", "fp8")

Encoded = torch.Tensor | QuantizedTensor


@dataclass(frozen=True)
class Precision:
    """How one side (keys or values) of a tier is stored. ``bits=16`` keeps the model's own dtype, untouched."""

    bits: int = 16
    group_size: int = 64
    axis: str = "token"
    fmt: str = "int"
    scale_dtype: torch.dtype = torch.float16
    rank: int | None = None  # keys only: store rank-r coefficients on a per-head basis (RaggedStore)

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; choose one of {BITS}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} must be a positive int")
        if self.axis not in AXES:
            raise ValueError(f"axis={self.axis!r} is not supported; choose one of {AXES}")
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt={self.fmt!r} is not supported; choose one of {FORMATS}")
        if self.fmt == "fp8" and self.bits != 8:
            raise ValueError(f"fmt='fp8' needs bits=8, got bits={self.bits}")
        if self.scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"scale_dtype={self.scale_dtype} must be float16, bfloat16 or float32")
        if self.rank is not None:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise ValueError(f"rank={self.rank!r} must be a positive int (or None: full rank)")
            if self.axis != "token":
                raise ValueError(f"rank={self.rank} needs axis='token': coefficient rows are evicted one by one")

    @property
    def quantized(self) -> bool:
        return self.bits != 16

    @property
    def group(self) -> int:
        """Channels per quantization group: a low-rank row has only ``rank`` coefficients to group."""
        return min(self.group_size, self.rank) if self.rank else self.group_size

    def check_head_dim(self, head_dim: int) -> None:
        """Raise early (at cache construction) when the rank exceeds a head or groups cannot tile a row."""
        if self.rank and self.rank > head_dim:
            raise ValueError(f"rank={self.rank} must be in 1..head_dim={head_dim}")
        width = self.rank or head_dim
        if self.quantized and self.axis == "token" and width % self.group:
            raise ValueError(
                f"group_size={self.group_size} must divide the {'rank' if self.rank else 'head_dim'}={width} for "
                f"per-token groups; try one of {[g for g in (8, 16, 32, 64, 128, 256) if width % g == 0]}"
            )

    def encode(self, x: torch.Tensor) -> Encoded:
        """``x[..., T, D]`` as stored: itself at 16 bits, else `quant.quantize`d (by one CPU kernel call where
        `kernels.quantize` applies: the same bits)."""
        if not self.quantized:
            return x
        fused = kernels.quantize(x, self.bits, self.group, self.axis, self.fmt, self.scale_dtype)
        if fused is not None:
            return fused
        return quantize(x, self.bits, self.group, axis=self.axis, fmt=self.fmt, scale_dtype=self.scale_dtype)

    def label(self) -> str:
        return "16" if not self.quantized else f"{self.bits}{'fp8' if self.fmt == 'fp8' else ''}"


def fitting_group(width: int, preferred: int = 64) -> int:
    """The default group size for rows of ``width`` channels: the largest divisor of ``width`` up to ``preferred``
    (64, or the whole row when it is narrower), so that defaults fit every model."""
    return max(g for g in range(1, min(preferred, width) + 1) if width % g == 0)


def decode(x: Encoded, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` as a ``dtype`` tensor, written into ``out`` when given."""
    if isinstance(x, QuantizedTensor):
        return x.dequantize(dtype, out=out)
    return x.to(dtype) if out is None else out.copy_(x)


def fit_basis(x: torch.Tensor, rank: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal ``[..., D, rank]`` basis of the ``rank`` strongest directions of each ``x[..., T, D]`` (its top
    right singular vectors), from the rows where ``valid[..., T]``; in ``x``'s dtype.

    Computed as eigenvectors of the ``D x D`` Gram matrix, so any token count works (fewer than ``rank`` too)
    and ``rank == D`` is an exact change of basis.
    """
    wide = x.float()
    weighted = wide if valid is None else wide * valid[..., None]
    _, vectors = torch.linalg.eigh(weighted.mT @ wide)  # ascending eigenvalues
    return vectors[..., -rank:].flip(-1).to(x.dtype).contiguous()


def segment_matmul(x: torch.Tensor, segments: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """``x[i] @ mats[segments[i]]`` for rows ``x[N, a]`` and ``mats[S, a, b]``: rows padded per segment, one bmm."""
    counts = torch.bincount(segments, minlength=mats.shape[0])
    order = torch.sort(segments, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.shape[0], device=order.device) - (counts.cumsum(0) - counts)[segments[order]]
    padded = x.new_zeros(mats.shape[0], int(counts.max()), x.shape[-1])
    padded[segments, ranks] = x
    return torch.bmm(padded, mats.to(x.dtype))[segments, ranks]


def _fields(x: QuantizedTensor) -> dict[str, torch.Tensor]:
    return {name: value for name in ("payload", "scale", "zero") if (value := getattr(x, name)) is not None}


def cat(parts: list[Encoded], dim: int) -> Encoded:
    """Concatenate encoded blocks along a leading (token or row) dimension."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts, dim=dim)
    merged = {name: torch.cat([getattr(p, name) for p in parts], dim=dim) for name in _fields(parts[0])}
    return replace(parts[0], **merged)


def select(x: Encoded, dim: int, index: torch.Tensor) -> Encoded:
    """Rows ``index`` of a leading dimension (batch reorder, eviction)."""
    if isinstance(x, torch.Tensor):
        return x.index_select(dim, index)
    return replace(x, **{name: t.index_select(dim, index) for name, t in _fields(x).items()})


def token_range(x: Encoded, start: int, stop: int) -> Encoded:
    """Tokens ``[start, stop)`` of a ``[B, H, T, ...]`` block (per-channel scales cover a group of tokens, so there
    both ends fall on group boundaries)."""
    if isinstance(x, torch.Tensor):
        return x[:, :, start:stop]
    group = x.group_size if x.axis == "channel" else 1
    kept = {
        name: t[:, :, start:stop] if name == "payload" else t[:, :, start // group : stop // group]
        for name, t in _fields(x).items()
    }
    return replace(x, **kept)


@dataclass
class DenseStore:
    """Encoded ``[B, H, T, D]`` keys and values, the same tokens for every head; grown by concatenation."""

    key: Precision
    value: Precision
    keys: Encoded | None = None
    values: Encoded | None = None
    length: int = 0

    def __post_init__(self):
        if self.key.rank or self.value.rank:
            raise ValueError("a DenseStore holds full-rank tokens; low rank (rank=...) needs a RaggedStore")
        self._segments = None  # `body`'s segments and valid slots, for one shape (not state: never saved)
        self._readers = None  # the kernels' readers of the stored keys and values, while they stay the same

    def __deepcopy__(self, memo: dict) -> DenseStore:
        """A copy of the stored tokens alone: the kernels' readers view this store's tensors, and copied they would
        hold the copy's tokens a second time (a fork's own are made at its first step)."""
        return replace(self, keys=copy.deepcopy(self.keys, memo), values=copy.deepcopy(self.values, memo))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        ek, ev = self.key.encode(k), self.value.encode(v)
        self.keys = ek if self.keys is None else cat([self.keys, ek], dim=2)
        self.values = ev if self.values is None else cat([self.values, ev], dim=2)
        self.length += k.shape[2]

    def decode(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return decode(self.keys, dtype), decode(self.values, dtype)

    def body(self, dtype: torch.dtype) -> Body:
        """The stored tokens as a `Body` ``[B, H, T]`` (every slot valid): read in place where `kernels` can (each
        (batch, head) a segment of ``T`` rows), else decoded to ``dtype``."""
        batch, heads, length = self.keys.shape[:3]
        shape = (batch, heads, length)
        device = self.keys.device
        if self._segments is None or self._segments[0] != shape:  # made again only when the store grows
            starts = torch.arange(batch * heads, device=device) * length
            segment = torch.stack([starts, torch.full_like(starts, length), torch.zeros_like(starts)])
            self._segments = shape, segment, torch.ones(1, dtype=torch.bool, device=device).expand(shape)
        _, segment, valid = self._segments
        if self._readers is None or self._readers[0] is not self.keys:  # made again only when the store changes
            readers = [kernels.in_place([_token_rows(x)], [segment], shape) for x in (self.keys, self.values)]
            self._readers = self.keys, *readers  # the kernels refuse per-channel groups
        _, keys, values = self._readers
        if keys is not None and values is not None:
            return Body(keys, values, valid)
        keys, values = self.decode(dtype)
        return Body(PaddedRows(keys), PaddedRows(values), valid)

    def decode_into(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the stored tokens into the first ``length`` slots of ``keys``/``values`` ``[B, H, T, D]``."""
        decode(self.keys, keys.dtype, out=keys[:, :, : self.length])
        decode(self.values, values.dtype, out=values[:, :, : self.length])

    def select_batch(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values = select(self.keys, 0, index), select(self.values, 0, index)

    def truncate(self, length: int, block: int) -> None:
        """Keep the first ``length`` tokens; ``block`` is the token granularity of the layout (1 or a group)."""
        if self.keys is None or length >= self.length:
            return
        if length % block:
            raise ValueError(f"cannot cut a per-channel block of {block} tokens at {length}")
        self.keys, self.values = token_range(self.keys, 0, length), token_range(self.values, 0, length)
        self.length = length

    def drop(self, count: int) -> None:
        """Forget the first ``count`` tokens (a multiple of the layout's block); their memory is released."""
        if count:
            self.keys, self.values = (
                token_range(self.keys, count, self.length),
                token_range(self.values, count, self.length),
            )
            self.keys, self.values = _copied(self.keys), _copied(self.values)
            self.length -= count


def _token_rows(x: Encoded) -> Encoded:
    """Per-token rows ``[..., T, D] -> [N, D]`` (a view where the storage allows)."""
    if isinstance(x, torch.Tensor):
        return x.reshape(-1, x.shape[-1])
    return replace(x, **{name: t.reshape(-1, t.shape[-1]) for name, t in _fields(x).items()})


def _copied(x: Encoded) -> Encoded:
    """``x`` in storage of its own: a slice would pin the dropped tokens."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    return replace(x, **{name: t.clone() for name, t in _fields(x).items()})


@dataclass
class RaggedStore:
    """Tokens of one precision, a different number per (batch, head), with per-token importance.

    ``keys``/``values`` are encoded rows ``[N, D]`` sorted by (batch, head), then by arrival; ``counts[B, H]``
    says how many rows each head holds. ``positions`` (int32) and ``scores`` (running mean of the attention a
    token receives, fp16) with ``ages`` (observations, saturating at 255, uint8) let policies re-rank tokens.

    Low-rank keys (``key.rank``): rows hold coefficients on ``basis[B * H, D, rank]`` (set it, e.g. from
    `fit_basis`, before the first ``add``); the keys are ``coefficients @ basis^T``. Stores may share one.
    """

    key: Precision
    value: Precision
    counts: torch.Tensor | None = None
    keys: Encoded | None = None
    values: Encoded | None = None
    positions: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    ages: torch.Tensor | None = None
    basis: torch.Tensor | None = None

    def __post_init__(self):
        if self.value.rank:
            raise ValueError(f"value rank={self.value.rank}: low rank applies to keys only")

    @property
    def rows(self) -> int:
        return 0 if self.positions is None else self.positions.shape[0]

    def segments(self) -> torch.Tensor:
        """The (batch * heads) segment id of every row."""
        return torch.repeat_interleave(
            torch.arange(self.counts.numel(), device=self.counts.device), self.counts.flatten()
        )

    def init(self, batch: int, heads: int, device: torch.device) -> None:
        self.counts = torch.zeros(batch, heads, dtype=torch.long, device=device)
        self.positions = torch.zeros(0, dtype=torch.int32, device=device)
        self.scores = torch.zeros(0, dtype=torch.float16, device=device)
        self.ages = torch.zeros(0, dtype=torch.uint8, device=device)

    def add(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        segments: torch.Tensor,
        positions: torch.Tensor,
        scores: torch.Tensor,
        ages: torch.Tensor,
    ) -> None:
        """Insert rows (each with its segment id), keeping rows sorted by segment and, inside one, by arrival."""
        if segments.numel() == 0:
            return
        # Merge without sorting the stored rows: a stored row moves down by the new rows of earlier heads, the
        # j-th new row (in head order) lands after every stored row of its head and earlier heads.
        incoming = torch.bincount(segments, minlength=self.counts.numel())
        stored, counts, fresh = self.rows, self.counts.flatten(), segments.numel()
        order = torch.empty(stored + fresh, dtype=torch.long, device=segments.device)
        if stored:
            staying = torch.arange(stored, device=segments.device)
            order[staying + (incoming.cumsum(0) - incoming)[self.segments()]] = staying
        by_head = torch.sort(segments, stable=True).indices
        arrived = torch.arange(fresh, device=segments.device) + counts.cumsum(0)[segments[by_head]]
        order[arrived] = stored + by_head
        new = {"k": self.project(k, segments), "v": v, "positions": positions, "scores": scores, "ages": ages}
        self.rebuild(counts + incoming, order, new)

    def project(self, k: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """Keys ``k[N, D]`` as this store holds them: coefficients on their segment's basis when low rank."""
        if not self.key.rank:
            return k
        if self.basis is None:
            raise RuntimeError("low-rank keys need a basis: set store.basis (e.g. from fit_basis) before add()")
        return segment_matmul(k, segments, self.basis) if segments.numel() else k.new_empty(0, self.key.rank)

    def rows_at(self, index: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Rows ``index``, keys (``k``, coefficients where low rank) and values (``v``) decoded to ``dtype``, with
        their positions, scores and ages."""
        return {
            "k": decode(select(self.keys, 0, index), dtype),
            "v": decode(select(self.values, 0, index), dtype),
            "positions": self.positions[index],
            "scores": self.scores[index],
            "ages": self.ages[index],
        }

    def rebuild(self, counts: torch.Tensor, order: torch.Tensor | None, incoming: dict | None) -> None:
        """Hold rows ``order`` of the stored rows followed by ``incoming`` ones (`rows_at`'s fields, keys already as
        this store holds them, encoded here), ``counts[B * H]`` per head: one rewrite of each field (`add`, and a
        compaction's `compaction.plan`). ``order`` None: the stored rows stay as they are (then nothing comes in)."""
        if order is None or (incoming is None and not self.rows):
            return
        fields = ("keys", "values", "positions", "scores", "ages")
        if incoming is None:
            parts = [getattr(self, name) for name in fields]
        else:
            new = (
                self.key.encode(incoming["k"]),
                self.value.encode(incoming["v"]),
                incoming["positions"].to(torch.int32),
                incoming["scores"].to(torch.float16),
                incoming["ages"].to(torch.uint8),
            )
            parts = [cat([getattr(self, name), x], 0) if self.rows else x for name, x in zip(fields, new, strict=True)]
        self.hold(counts, *(select(x, 0, order) for x in parts))

    def hold(self, counts: torch.Tensor, keys: Encoded, values: Encoded, positions, scores, ages) -> None:
        """Hold these rows, ``counts[B * H]`` per head, as they are (`rebuild`'s, or `kernels.compaction_moves`')."""
        self.keys, self.values, self.positions, self.scores, self.ages = keys, values, positions, scores, ages
        self.counts = counts.view_as(self.counts)

    def select_batch(self, index: torch.Tensor) -> None:
        """Reorder or repeat whole batch rows (beam search): each new row copies the segments of ``index[b]``."""
        if self.counts is None:
            return
        batch, heads = self.counts.shape
        counts = self.counts.flatten()
        starts = torch.cumsum(counts, 0) - counts
        source = (index.to(counts.device)[:, None] * heads + torch.arange(heads, device=counts.device)).flatten()
        lengths = counts[source]
        row_index = torch.repeat_interleave(starts[source] - torch.cumsum(lengths, 0) + lengths, lengths)
        row_index += torch.arange(row_index.shape[0], device=counts.device)
        if self.rows:
            for name in ("keys", "values", "positions", "scores", "ages"):
                setattr(self, name, select(getattr(self, name), 0, row_index))
        if self.basis is not None:
            self.basis = self.basis.index_select(0, source)
        self.counts = lengths.view(index.shape[0], heads)


@dataclass
class PaddedRows:
    """``[B, H, W, D]`` rows, as floats or as int codes with one scale and zero per row (``x = code * scale +
    zero``, ``scale``/``zero`` ``[B, H, W]``). Products apply the scale and zero per row on the small side, so
    coded rows are never dequantized: attention reads each code once."""

    data: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        if self.scale is None:
            return self.data
        return torch.addcmul(self.zero[..., None], self.data, self.scale[..., None])

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """``query[B, H, Q, D] @ rows^T`` -> ``[B, H, Q, W]``."""
        out = torch.matmul(query, self.data.mT)
        if self.scale is None:
            return out
        return out.mul_(self.scale[:, :, None]).add_(query.sum(-1, keepdim=True) * self.zero[:, :, None])

    def weigh(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs[B, H, Q, W] @ rows`` -> ``[B, H, Q, D]``."""
        if self.scale is None:
            return torch.matmul(probs, self.data)
        return torch.matmul(probs * self.scale[:, :, None], self.data) + torch.matmul(probs, self.zero[..., None])


@dataclass
class Body:
    """A transient padded view of stored tokens ``[B, H, W, ...]``; ``valid[B, H, W]`` marks the real rows.

    Low-rank ``keys`` are coefficients on ``basis[B, H, D, rank]`` (None: full-rank keys): attention can score
    them in the reduced space, ``(q @ basis) @ keys^T``, or rebuild them with `full_keys`."""

    keys: PaddedRows | kernels.cpu.CodedRows  # or kernels.gpu.CodedRows: a reader of the stores in place
    values: PaddedRows | kernels.cpu.CodedRows
    valid: torch.Tensor
    basis: torch.Tensor | None = None

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """``query[B, H, Q, D] @ keys^T`` -> ``[B, H, Q, W]``, -inf in empty slots; low-rank keys are scored in
        their reduced space."""
        reduced = query if self.basis is None else query @ self.basis
        if not isinstance(self.keys, PaddedRows):  # the kernels leave -inf in empty slots themselves
            return self.keys.scores(reduced)
        return self.keys.scores(reduced).masked_fill_(~self.valid[:, :, None], -torch.inf)

    def full_keys(self) -> torch.Tensor:
        keys = self.keys.dense()
        return keys if self.basis is None else keys @ self.basis.mT


class PaddedLayout:
    """Where the rows of some `RaggedStore`s go in a per-head padded body: each (batch, head) holds the rows of
    every store in turn, padded to the head holding the most. Stores change only when a cache compacts, so a
    layout is made then and reused by every decode step until the next; it holds a few numbers per head, none
    per row.

    Example:
        >>> import torch
        >>> from leankv_hf.store import PaddedLayout, Precision, RaggedStore
        >>> store = RaggedStore(Precision(8, 16), Precision(8, 16))
        >>> store.init(batch=1, heads=2, device=torch.device("cpu"))
        >>> rows = torch.randn(3, 16)
        >>> store.add(rows, rows, torch.tensor([0, 1, 1]), torch.arange(3), torch.zeros(3), torch.zeros(3))
        >>> body = PaddedLayout([store]).view(torch.float32)
        >>> body.keys.data.shape, body.valid.tolist()
        (torch.Size([1, 2, 2, 16]), [[[True, False], [True, True]]])
    """

    def __init__(self, stores: list[RaggedStore]):
        self.stores = stores
        self.shape = tuple(stores[0].counts.shape)
        counts = torch.stack([store.counts.flatten() for store in stores])  # [stores, B * H]
        self.held = counts.sum(0)
        self.width = int(self.held.max()) if self.held.numel() else 0
        # Per (store, head): its first row in the store, its row count and its first slot in the head (rows are
        # sorted by head), one [3, B * H] table per store: where the kernels find rows.
        table = torch.stack([counts.cumsum(1) - counts, counts, counts.cumsum(0) - counts], 1)
        self.starts, self.offsets = table[:, 0], table[:, 2]
        self.segments = list(table)
        # The kernels' readers of the stores in place and their decode step (`view`, `decode_step`), made on first use.
        self._readers = None

    def __deepcopy__(self, memo: dict) -> PaddedLayout:
        """The layout of copies of the stores, its readers made again at first use: they view the stores' tensors,
        and copied they would hold a fork's rows a second time and fold its scores where no store reads them."""
        return PaddedLayout(copy.deepcopy(self.stores, memo))

    def slots(self) -> list[torch.Tensor]:
        """Per store, each row's index in the flattened ``[B * H * W]`` body: row i of head s sits at
        s * width + offset(s) + (i - start(s))."""
        heads = torch.arange(self.held.shape[0], device=self.held.device) * self.width
        return [
            torch.arange(store.rows, device=shift.device)
            + shift.repeat_interleave(store.counts.flatten(), output_size=store.rows)
            for store, shift in zip(self.stores, heads + self.offsets - self.starts, strict=True)
        ]

    def view(self, dtype: torch.dtype, fused: bool = False) -> Body:
        """Every stored row decoded into its slot (low-rank keys stay coefficients); empty slots are zero.
        ``fused``: where `kernels` can read the stores in place, the body's rows are their readers (same
        products, no padded copy)."""
        if fused:
            keys, values, _ = self._in_place()
            if keys is not None and values is not None:
                return Body(keys, values, self._valid(), self._basis(dtype))
        (batch, heads), shape = self.shape, (*self.shape, self.width)
        held = [store for store in self.stores if store.rows]
        keys, values = [store.keys for store in held], [store.values for store in held]
        # Which row of the stores, taken in turn, fills each slot; empty slots take the zero row appended last.
        total = sum(store.rows for store in self.stores)
        source = torch.full((batch * heads * self.width,), total, dtype=torch.long, device=self.held.device)
        first = 0
        for store, where in zip(self.stores, self.slots(), strict=True):
            source[where] = torch.arange(first, first + store.rows, device=source.device)
            first += store.rows
        rows = gather_rows(keys, source, dtype, shape), gather_rows(values, source, dtype, shape)
        return Body(*rows, self._valid(), self._basis(dtype))

    def decode_step(
        self, dtype: torch.dtype
    ) -> tuple[kernels.cpu.DecodeStep | kernels.gpu.DecodeStep, torch.Tensor | None] | None:
        """A decode step over the stores in one call (`kernels.decode_step`: the stores read in place), with
        the low-rank keys' basis in ``dtype`` (or None); None where no kernel does it. A decode step needs nothing
        else of the body: no view, no mask of the valid slots."""
        step = self._in_place()[2] if self.width else None
        return None if step is None else (step, self._basis(dtype))

    def _in_place(self) -> tuple:
        """The kernels' readers of the stores' keys and values (each None where no kernel reads them), and their
        decode step in one call (or None); made at first use and kept: the stores do not change until the next
        layout."""
        if self._readers is None:
            held = [i for i, store in enumerate(self.stores) if store.rows]
            stores, segments = [self.stores[i] for i in held], [self.segments[i] for i in held]
            shape = (*self.shape, self.width)
            keys = kernels.in_place([store.keys for store in stores], segments, shape)
            values = kernels.in_place([store.values for store in stores], segments, shape)
            step = None if keys is None or values is None else kernels.decode_step(keys, values, stores)
            self._readers = keys, values, step
        return self._readers

    def _valid(self) -> torch.Tensor:
        """Which slots hold a row, ``[B, H, W]``."""
        valid = torch.arange(self.width, device=self.held.device) < self.held[:, None]
        return valid.view(*self.shape, self.width)

    def _basis(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The low-rank keys' basis ``[B, H, D, rank]`` in ``dtype``, or None (full-rank keys)."""
        basis = next(store.basis for store in self.stores if store.rows)
        return None if basis is None else basis.view(*self.shape, *basis.shape[1:]).to(dtype)

    def fold(self, scores: torch.Tensor, n: int, reduce: str = "mean") -> None:
        """Fold ``n`` observations, summing (``reduce="mean"``) or peaking (``"max"``) at ``scores[B, H, W]`` (what
        the body's slots received), into each row's score and age (`fold_scores`)."""
        if n == 0:
            return
        if kernels.enabled(self.held.device):
            held = [(store, seg) for store, seg in zip(self.stores, self.segments, strict=True) if store.rows]
            kernels.fold(scores, n, held, self.width, reduce)
            return
        flat = scores.flatten()
        for store, slots in zip(self.stores, self.slots(), strict=True):
            if store.rows:
                score, store.ages = fold_scores(store.scores.float(), store.ages, flat[slots], n, reduce)
                store.scores = score.half()


def fold_scores(score: torch.Tensor, ages: torch.Tensor, observed: torch.Tensor, n: int, reduce: str = "mean"):
    """Fold ``n`` new observations into tokens' scores. ``"mean"``: ``observed`` is their sum, and the score a running
    mean whose ages saturate at `MAX_AGE` (from then on it decays: old observations weigh 255 against the new ones).
    ``"max"``: ``observed`` is their maximum, and the score the largest seen."""
    if n == 0:
        return score, ages
    weight = ages.float()
    if reduce == "max":
        score = torch.maximum(score, observed)
    else:
        score = (score * weight + observed) / (weight + n)
    return score, (weight + n).clamp_max(MAX_AGE).to(torch.uint8)


def gather_rows(
    parts: list[Encoded], source: torch.Tensor, dtype: torch.dtype, shape: tuple[int, int, int]
) -> PaddedRows:
    """Rows ``shape + (D,)`` in ``dtype``: flat row ``i`` is row ``source[i]`` of the ``parts`` taken in turn,
    or zero where ``source[i]`` is their total row count.

    When every part holds int codes with one group layout, the codes, scales and zeros are gathered (moving
    bytes, not floats): one group per row stays coded (`PaddedRows`), more are dequantized in one pass.
    Otherwise each part is decoded and the floats gathered. Gathers, not scatters: a CPU row gather copies
    whole rows, a scatter works element by element."""

    def gathered(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([*tensors, tensors[0].new_zeros(1, tensors[0].shape[-1])]).index_select(0, source)

    layouts = {
        (rows.scale.shape[-1], rows.axis) if isinstance(rows, QuantizedTensor) and rows.fmt == "int" else None
        for rows in parts
    }
    if len(layouts) > 1 or None in layouts or next(iter(layouts))[1] != "token":
        return PaddedRows(gathered([decode(rows, dtype) for rows in parts]).view(*shape, -1))
    codes = gathered([unpack(rows.payload, rows.bits) for rows in parts])  # empty slots: code 0, scale 0, zero 0
    scale = gathered([rows.scale.to(dtype) for rows in parts])
    zero = gathered([rows.zero.to(dtype) for rows in parts])
    if scale.shape[-1] == 1:
        return PaddedRows(codes.to(dtype).view(*shape, -1), scale.view(shape), zero.view(shape))
    return PaddedRows(
        replace(parts[0], payload=codes, scale=scale, zero=zero, bits=8).dequantize(dtype).view(*shape, -1)
    )
