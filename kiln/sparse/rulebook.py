"""Rulebooks: which input voxel feeds which output voxel through which kernel offset.

Coordinates are encoded as one int64 key per voxel, ``((b * D0 + z) * D1 + y) * D2 + x`` (row-major over the
batch and the spatial shape). Kernel offsets are enumerated row-major over the kernel's dims, the order of
spconv's KRSC weight ``[Cout, kD, kH, kW, Cin]``.

* submanifold: outputs = inputs; output ``o`` reads input ``o + (k - ksize // 2) * dilation`` (hash lookup).
* regular: output ``o`` reads input ``o * stride - padding + k * dilation``; outputs are every position some input
  reaches, deduplicated through the hash table (sorted, i.e. stable, in deterministic mode and on the CPU).
* transposed: output ``o = i * stride - padding + k * dilation`` for each input ``i``.
* inverse: the rulebook of a regular convolution with inputs and outputs swapped.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading

import torch

from kiln.ops import hashing
from kiln.ops.sparse_gemm import ConvPlan, build_plan, mask_order, offset_masks
from kiln.ops.sparse_gemm import compact_pairs as sparse_gemm_compact

_state = threading.local()

# Rulebooks with fewer output rows than this skip the mask sort (their implicit GEMM then runs rows in plain order,
# each tile over the union of its rows' offsets). A sort costs ~80-120 µs of host time on the device machines, where
# the sparse backbone is host-bound, and buys little GPU time on a small layer; on a 150k-row layer the sort is worth
# it (strided rulebook+fwd 1.23 vs 1.63 ms unsorted, H100, session 6). 65,536 from the interleaved A/B
# (scripts/gpu/sparse_host_ab.py --variants default sort-min-64k, H100, session 8): the backbone fwd+bwd 1.23-1.36x
# faster on KITTI and nuScenes, fp16 and fp32. 0 sorts every rulebook.
SORT_MIN_ROWS = int(os.environ.get("KILN_SPARSE_SORT_MIN_ROWS", "65536"))
if SORT_MIN_ROWS < 0:
    raise ValueError(f"KILN_SPARSE_SORT_MIN_ROWS must be >= 0, got {SORT_MIN_ROWS}")
# ... and the layer that first asks for the schedule must have at least this much GEMM work per offset (rows x Cin
# x Cout): the sort is ~8 launches and memsets (host time, in a host-bound pipeline) plus ~50 us of GPU at 150k rows,
# and it pays only where the GEMM it speeds up is long. On an H100 (scripts/gpu/sparse_host_ab.py --variants default
# sort-work-1g, nuScenes fp16, 150k voxels, 64 -> 64 channels, session 16), leaving that layer unsorted made its
# rulebook+forward 1.26x and its rulebook+forward+backward 1.34x faster, and a forward on the cached rulebook 0.83x as
# fast. 2**30: 150k x 64 x 64 runs unsorted (as the 16/32-channel layers of a backbone already did, 2**28 since
# session 11), 150k x 128 x 128 sorts.
SORT_MIN_WORK = int(os.environ.get("KILN_SPARSE_SORT_MIN_WORK", str(2**30)))
if SORT_MIN_WORK < 0:
    raise ValueError(f"KILN_SPARSE_SORT_MIN_WORK must be >= 0, got {SORT_MIN_WORK}")


def is_deterministic() -> bool:
    """Deterministic mode: sorted (stable) output coordinates, and no float atomics in any GEMM (see ``functional``)."""
    return getattr(_state, "deterministic", False)


def set_deterministic(enabled: bool) -> None:
    _state.deterministic = bool(enabled)


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    """``with kiln.sparse.deterministic(): ...`` — bit-reproducible rulebooks, outputs and gradients."""
    before = is_deterministic()
    set_deterministic(enabled)
    try:
        yield
    finally:
        set_deterministic(before)


class Rulebook:
    """Pairs sorted by kernel offset (``in_idx``, ``out_idx``: int64 [P]; ``counts``: host ints per offset).

    A submanifold rulebook built on the GPU starts from its pair map instead (``from_pair_map``): the implicit
    GEMM reads only that, so an inference forward never materialises the pair lists (a ``nonzero``, a host sync
    for the counts and a few dozen small kernels); the lists are derived on first use (weight gradients, the
    gather-scatter path, spconv's ``indice_pairs``)."""

    def __init__(self, in_idx: torch.Tensor | None, out_idx: torch.Tensor | None, counts: list[int] | None,
                 n_in: int, n_out: int, identity_offset: int = -1):
        self._in_idx, self._out_idx, self._counts = in_idx, out_idx, counts
        self.n_in, self.n_out = n_in, n_out
        self.identity_offset = identity_offset  # an offset whose pairs are (i, i) for every row (subm centre)
        self._cache: dict = {}
        self._kernel_volume = len(counts) if counts is not None else 0
        self._mirrored = False  # pair_bwd is pair_fwd with its offsets reversed (odd-kernel submanifold)

    @classmethod
    def from_maps(cls, pair_fwd: torch.Tensor, pair_bwd: torch.Tensor | None, n_in: int, n_out: int,
                  identity_offset: int = -1, mirrored: bool = False, masks_fwd: torch.Tensor | None = None,
                  masks_bwd: torch.Tensor | None = None) -> "Rulebook":
        """A rulebook from int32 pair maps (-1: no pair): ``pair_fwd`` [n_out, K] and ``pair_bwd`` [n_in, K], or
        for a submanifold rulebook with ``mirrored`` (odd kernel in every dim: offsets k and K-1-k are opposite)
        ``pair_fwd`` alone, ``pair_bwd`` being its flip. Offset masks computed with the maps save a pass."""
        rb = cls(None, None, None, n_in, n_out, identity_offset)
        rb._kernel_volume = pair_fwd.shape[1]
        rb._mirrored = mirrored
        for key, value in (("pair_fwd", pair_fwd), ("pair_bwd", pair_bwd), ("fwd_masks", masks_fwd),
                           ("bwd_masks", masks_bwd)):
            if value is not None:
                rb._cache[key] = value
        return rb

    def __repr__(self) -> str:
        return (f"Rulebook(n_in={self.n_in}, n_out={self.n_out}, kernel_volume={self.kernel_volume}, "
                f"identity_offset={self.identity_offset})")

    def _lists(self) -> None:
        """The pair lists of a rulebook built from its maps: by offset, then input row where the backward map
        was built (strided: the CPU's order), else by offset, then output row."""
        if "pair_bwd" in self._cache and not self._mirrored:
            pm = self._cache["pair_bwd"]
            kk, ii = torch.nonzero(pm.T >= 0, as_tuple=True)
            self._in_idx, self._out_idx = ii, pm.T[kk, ii].long()
        else:
            pm = self.pair_fwd()
            kk, oo = torch.nonzero(pm.T >= 0, as_tuple=True)
            self._in_idx, self._out_idx = pm.T[kk, oo].long(), oo
        self._counts = torch.bincount(kk, minlength=self._kernel_volume).tolist()

    @property
    def in_idx(self) -> torch.Tensor:
        if self._in_idx is None:
            self._lists()
        return self._in_idx

    @property
    def out_idx(self) -> torch.Tensor:
        if self._out_idx is None:
            self._lists()
        return self._out_idx

    @property
    def counts(self) -> list[int]:
        if self._counts is None:
            self._lists()
        return self._counts

    @property
    def kernel_volume(self) -> int:
        return self._kernel_volume

    def swapped(self) -> "Rulebook":
        """The rulebook with inputs and outputs exchanged (input gradients; inverse convolution)."""
        key = "swapped"
        if key not in self._cache:
            if self._in_idx is None and self._mirrored:  # its pair map is ours flipped: made only on demand
                sw = Rulebook(None, None, None, self.n_out, self.n_in, self.identity_offset)
                sw._kernel_volume, sw._mirrored = self.kernel_volume, True
            elif self._in_idx is None and "pair_bwd" in self._cache:  # both maps: exchanged
                sw = Rulebook.from_maps(self.pair_bwd(), self.pair_fwd(), self.n_out, self.n_in,
                                        self.identity_offset, masks_fwd=self._cache.get("bwd_masks"),
                                        masks_bwd=self._cache.get("fwd_masks"))
            else:
                sw = Rulebook(self.out_idx, self.in_idx, self.counts, self.n_out, self.n_in, self.identity_offset)
                sw._mirrored = self._mirrored
            for a, b in (("pair_fwd", "pair_bwd"), ("pair_bwd", "pair_fwd")):
                if a in self._cache:
                    sw._cache[b] = self._cache[a]
            sw._cache["swapped"] = self
            self._cache[key] = sw
        return self._cache[key]

    def _pair_map(self, rows_idx, vals_idx, n_rows):
        K = self.kernel_volume
        pm = torch.full((n_rows, K), -1, dtype=torch.int32, device=self.in_idx.device)
        if self.in_idx.numel():
            k_of = torch.repeat_interleave(torch.arange(K, device=self.in_idx.device),
                                           torch.tensor(self.counts, device=self.in_idx.device),
                                           output_size=self.in_idx.numel())  # no device sync
            pm[rows_idx, k_of] = vals_idx.to(torch.int32)
        return pm

    def mirror_source(self) -> "Rulebook | None":
        """For the swapped rulebook of an odd-kernel submanifold one (whose pair map is the original's with the
        offsets reversed) not yet materialised: the original. Its map, schedule and the weight reversed along the
        offsets compute this rulebook's convolution with no flipped copy of the map and no new masks or sort."""
        src = self._cache.get("swapped")
        if self._mirrored and src is not None and "pair_fwd" not in self._cache and "pair_fwd" in src._cache:
            return src
        return None

    def pair_fwd(self) -> torch.Tensor:
        """int32 [n_out, K]: input row per (output, offset), -1 where none."""
        if "pair_fwd" not in self._cache:
            src = self.mirror_source()
            if src is not None:
                self._cache["pair_fwd"] = src.pair_fwd().flip(1).contiguous()
            else:
                self._cache["pair_fwd"] = self._pair_map(self.out_idx, self.in_idx, self.n_out)
        return self._cache["pair_fwd"]

    def pair_bwd(self) -> torch.Tensor:
        """int32 [n_in, K]: output row per (input, offset), -1 where none."""
        if "pair_bwd" not in self._cache:
            if self._mirrored:  # (i -> o) at offset k is (o -> i) at the opposite offset K-1-k
                self._cache["pair_bwd"] = self.pair_fwd().flip(1).contiguous()
            else:
                self._cache["pair_bwd"] = self._pair_map(self.in_idx, self.out_idx, self.n_in)
        return self._cache["pair_bwd"]

    def compact_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward map's valid pairs grouped by offset on the device (``sparse_gemm.compact_pairs``), cached:
        the weight gradients of every layer sharing this rulebook read them."""
        if "compact" not in self._cache:
            self._cache["compact"] = sparse_gemm_compact(self.pair_fwd())
        return self._cache["compact"]

    def fwd_schedule(self, channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, masks) for the forward implicit GEMM: per-row offset masks and rows sorted by them -- order None
        (plain row order) below ``SORT_MIN_ROWS`` rows, or when ``channels`` (Cin x Cout of the layer asking) puts
        the GEMM work per offset below ``SORT_MIN_WORK``. Cached: the first layer to ask decides for the layers
        that share the rulebook."""
        if "fwd_sched" not in self._cache:
            m = self._cache.get("fwd_masks")
            m = offset_masks(self.pair_fwd()) if m is None else m
            mirror = self._cache.get("swapped") if self._mirrored else None
            if mirror is not None and "fwd_sched" in mirror._cache:
                # the same rows, every mask bit-reversed: the same groups, so the mirror's order serves (no sort)
                order = mirror._cache["fwd_sched"][0]
            elif self.n_out >= SORT_MIN_ROWS and (channels is None or self.n_out * channels >= SORT_MIN_WORK):
                order = mask_order(m, self.kernel_volume)
            else:
                order = None
            self._cache["fwd_sched"] = (order, m)
        return self._cache["fwd_sched"]

    def plan(self, block_pairs: int) -> ConvPlan:
        """The CPU gather-GEMM-reduce plan (outputs <- inputs), cached: built once per rulebook, in blocks of
        ~``block_pairs`` pairs for the first layer that asks (the block size only bounds temporaries; the layers
        sharing a rulebook reuse its plan). A mirrored submanifold rulebook's swapped twin (the input gradient's
        direction) has exactly its pairs, with offset k read as K-1-k: its plan is the original's relabelled, not
        built again -- a step of a backbone builds every rulebook's plans anew, and they were ~10% of it."""
        plan = self._cache.get("plan")
        if plan is None:
            twin = self._cache.get("swapped") if self._mirrored else None
            if twin is not None and "plan" in twin._cache:
                plan = twin._cache["plan"].with_offsets_reversed()
            else:
                plan = build_plan(self.out_idx, self.in_idx, self.counts, self.n_out, self.identity_offset,
                                  block_pairs)
            self._cache["plan"] = plan
        return plan

    def indice_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """spconv's layout: ``indice_pairs`` int32 [2, K, max_count] (-1 padded) and ``indice_pair_num`` [K]."""
        K = self.kernel_volume
        width = max(self.counts) if self.counts else 0
        pairs = torch.full((2, K, width), -1, dtype=torch.int32, device=self.in_idx.device)
        start = 0
        for k, c in enumerate(self.counts):
            pairs[0, k, :c] = self.in_idx[start:start + c].int()
            pairs[1, k, :c] = self.out_idx[start:start + c].int()
            start += c
        return pairs, torch.tensor(self.counts, dtype=torch.int32, device=self.in_idx.device)


_OFFSET_TABLES: dict = {}


def offset_table(ksize, dilation, device) -> torch.Tensor:
    """int32 [ndim, K]: each submanifold kernel offset's displacement per dimension (row-major over the kernel,
    centred, times the dilation), cached per device so a layer does not copy it to the GPU on every call."""
    key = (tuple(ksize), tuple(dilation), str(device))
    t = _OFFSET_TABLES.get(key)
    if t is None:
        rows = list(itertools.product(*[[(j - k // 2) * dl for j in range(k)] for k, dl in zip(ksize, dilation)]))
        t = torch.tensor(rows, dtype=torch.int32).T.contiguous().to(device)
        _OFFSET_TABLES[key] = t
    return t


def kernel_offsets(ksize, device) -> torch.Tensor:
    """int64 [K, ndim] kernel positions, row-major (KRSC order)."""
    pos = list(itertools.product(*[range(k) for k in ksize]))
    return torch.tensor(pos, dtype=torch.int64, device=device).view(len(pos), len(ksize))


def conv_output_size(spatial_shape, ksize, stride, padding, dilation):
    out = [(s + 2 * p - d * (k - 1) - 1) // st + 1
           for s, k, st, p, d in zip(spatial_shape, ksize, stride, padding, dilation)]
    if any(o <= 0 for o in out):
        raise ValueError(f"spatial_shape {list(spatial_shape)} is too small for kernel_size {list(ksize)}, "
                         f"stride {list(stride)}, padding {list(padding)}, dilation {list(dilation)}")
    return out


def deconv_output_size(spatial_shape, ksize, stride, padding, dilation, output_padding):
    # spconv's formula (kernel size, not the dilated extent)
    out = [(s - 1) * st - 2 * p + k + op
           for s, k, st, p, op in zip(spatial_shape, ksize, stride, padding, output_padding)]
    if any(o <= 0 for o in out):
        raise ValueError(f"transposed convolution output shape {out} is empty")
    return out


def encode(coords: torch.Tensor, batch: torch.Tensor, shape, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Keys (int64, or ``dtype`` where the caller knows they fit) of coordinates [..., ndim] with batch index
    [...] in the given spatial shape."""
    key = batch.to(dtype)
    for d, s in enumerate(shape):
        key = key * s + coords[..., d]
    return key


def decode(keys: torch.Tensor, shape) -> torch.Tensor:
    """int32 [N, ndim + 1] batch-first indices from keys."""
    out = torch.empty(keys.shape[0], len(shape) + 1, dtype=torch.int32, device=keys.device)
    rest = keys
    for d in reversed(range(len(shape))):
        q = torch.div(rest, shape[d], rounding_mode="floor")
        out[:, d + 1] = rest - q * shape[d]
        rest = q
    out[:, 0] = rest
    return out


def _unique(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return hashing.unique_keys(keys, sort=is_deterministic())


def _per_dim_product(parts, n):
    """AND / gather over the kernel's row-major offset product: parts[d] is [k_d, N] -> [K, N]."""
    out = None
    nd = len(parts)
    for d, t in enumerate(parts):
        shape = [1] * nd + [n]
        shape[d] = t.shape[0]
        t = t.view(shape)
        out = t if out is None else out & t
    return out.reshape(-1, n)


def _offset_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """[K]: sums over the kernel's row-major offset product of per-dim terms (``parts[d]`` is [k_d])."""
    out = parts[0]
    for t in parts[1:]:
        out = (out.unsqueeze(-1) + t).reshape(-1)
    return out


def _linear_strides(shape):
    strides, acc = [], 1
    for s_ in reversed(shape):
        strides.append(acc)
        acc *= s_
    return strides[::-1]


def _sorted_window_lookup(table, keys: torch.Tensor, d0: torch.Tensor, kx: int, n_look: int,
                          centre_last: bool = False) -> torch.Tensor:
    """``hash_lookup`` for the sorted-array table, exploiting that consecutive offsets along the last dim query
    consecutive keys. ``q0 = keys + d0[:, None]`` [R, N] is the key of the first offset of each run of ``kx``
    offsets (offsets ``r * kx + t`` query ``q0[r] + t``). All runs are searched at once, then the next ``kx`` sorted slots are checked: unique integer keys mean
    ``q0 + t`` can only sit within ``t`` slots of the first key >= ``q0``, and each slot matches at most one ``t``.
    With ``centre_last`` the last run is the voxels' own row (``q0 = key - kx // 2``, rows in table order): its
    first key >= ``q0`` is found from each voxel's own sorted position, without a search. Returns int32
    [n_look, N] (value, or -1); the caller masks out-of-bounds queries, which may match unrelated keys."""
    R, n = d0.numel(), keys.numel()
    sk, vals = table.keys, table.values
    if sk.numel() == 0 or n == 0:
        return torch.full((n_look, n), -1, dtype=torch.int32, device=keys.device)
    last = sk.numel() - 1
    lo, hi = int(sk[0]) + int(d0.min()), int(sk[-1]) + int(d0.max())
    narrow = int(sk[-1]) < 2**30 and -2**30 < lo and hi < 2**30
    idt = torch.int32 if narrow else torch.int64
    if narrow:  # half the memory traffic: keys, queries, positions and differences all fit int32
        sk, keys, d0 = sk.int(), keys.int(), d0.int()
    q0 = keys.unsqueeze(0) + d0.unsqueeze(1)
    q0f = q0.reshape(-1)
    if centre_last:
        # own sorted position minus the keys in [key - kx // 2, key) just before it
        own = torch.empty(n, dtype=idt, device=keys.device)
        own[vals.long()] = torch.arange(n, device=keys.device, dtype=idt)
        pc = own
        for m in range(1, kx // 2 + 1):
            back = own - m
            pc = pc - ((back >= 0) & (sk.index_select(0, back.clamp_(min=0)) >= q0[-1])).to(idt)
        pos = torch.cat([torch.searchsorted(sk, q0[:-1].reshape(-1), out_int32=narrow), pc])
    else:
        pos = torch.searchsorted(sk, q0f, out_int32=narrow)
    d, v = [], []
    for m in range(kx):
        p = (pos + m).clamp_(max=last)
        d.append(sk.index_select(0, p) - q0f)  # which t slot m answers (sk[p] == q0 + t), if any
        v.append(vals.index_select(0, p))
    rows = []
    for t in range(kx):
        res = v[t].masked_fill(d[t] != t, -1)
        for m in range(t):
            res = torch.where(d[m] == t, v[m], res)
        rows.append(res.view(R, n))
    return torch.stack(rows, 1).view(R * kx, n)[:n_look]


_DENSE_BITS = 6  # keys per directory block: 64
_dense = threading.local()


def _dense_fits(span: int, n: int) -> bool:
    """Whether the CPU direct table suits a key range of ``span`` keys holding ``n`` voxels: int32 keys and
    queries, and a directory (``span / 64`` int32) no larger than ~16 MiB or 64 entries per voxel."""
    return span < 2**30 and (span >> _DENSE_BITS) <= max(1 << 22, 64 * n)


def _dense_buffer(name: str, numel: int) -> torch.Tensor:
    """Per-thread int32 table, all 0 between calls (``_dense_lookup`` resets what it writes)."""
    store = getattr(_dense, "tables", None)
    if store is None:
        store = _dense.tables = {}
    t = store.get(name)
    if t is None or t.numel() < numel:
        t = torch.zeros(max(numel, 1), dtype=torch.int32)
        store[name] = t
    return t


def _dense_lookup(keys: torch.Tensor, deltas: torch.Tensor, span: int) -> torch.Tensor:
    """int32 [len(deltas), N]: the row (position in ``keys``) holding key ``keys[i] + deltas[k]``, -1 if none.

    CPU, int32; every ``keys[i] + deltas[k]`` must lie in [0, span) (callers shift keys by the most negative
    delta; queries of out-of-bounds neighbours land on unrelated keys, which callers mask). A two-level direct
    table instead of a search: a directory over blocks of 64 consecutive keys gives a block id (0: the empty
    block, whose slots are all -1), and the block's 64 slots give the row. The tables are reused per thread and
    reset entry by entry, so a call costs O(voxels + queries), never O(key range).
    """
    n = keys.numel()
    mask = (1 << _DENSE_BITS) - 1
    blk = keys >> _DENSE_BITS
    if n > 1 and bool((blk[1:] >= blk[:-1]).all()):  # sorted input (the usual case): ids from a running count
        first = torch.ones(n, dtype=torch.int32)
        torch.ne(blk[1:], blk[:-1], out=first[1:])
        bid = torch.cumsum(first, 0, dtype=torch.int32)
    else:
        bid = torch.unique(blk, return_inverse=True)[1].int().add_(1)
    n_blocks = int(bid.max()) + 1 if n else 1
    directory = _dense_buffer("dir", (span >> _DENSE_BITS) + 1)
    slots = _dense_buffer("slots", n_blocks << _DENSE_BITS)
    blk_l = blk.long()
    slot = ((bid << _DENSE_BITS) | (keys & mask)).long()
    directory.scatter_(0, blk_l, bid)  # (repeated blocks write the same id)
    slots.scatter_(0, slot, torch.arange(1, n + 1, dtype=torch.int32))
    try:
        q = (keys.unsqueeze(0) + deltas.unsqueeze(1)).view(-1)
        b = directory.index_select(0, q >> _DENSE_BITS)
        rows = slots.index_select(0, b.bitwise_left_shift_(_DENSE_BITS).bitwise_or_(q.bitwise_and_(mask)))
        return rows.sub_(1).view(deltas.numel(), n)  # slots hold row + 1: 0 (empty) becomes -1
    finally:
        clear = torch.zeros(n, dtype=torch.int32)
        directory.scatter_(0, blk_l, clear)
        slots.scatter_(0, slot, clear)


def release_tables() -> None:
    """Free this thread's CPU rulebook tables."""
    _dense.tables = {}


def build_subm(indices: torch.Tensor, spatial_shape, ksize, dilation) -> Rulebook:
    """Submanifold rulebook: every input is an output; pairs through the hash table of input coordinates.

    On the GPU (the Triton hash table) one kernel looks up every offset of every voxel and writes the pair map
    with its offset masks, and the rulebook stays that map. On the CPU offsets are separable, so validity is
    computed per dimension ([k_d, N]) and combined; a neighbour's key is the voxel's key plus a constant per
    offset. For odd kernels only the offsets before the centre are looked up there: a pair (o <- i) at offset k
    is the pair (i <- o) at the mirrored offset K-1-k.
    """
    n = indices.shape[0]
    dev = indices.device
    shape = list(spatial_shape)
    K = math.prod(ksize)
    coords = indices[:, 1:]
    centre_k = sum((k // 2) * math.prod(ksize[d + 1:]) for d, k in enumerate(ksize))
    symmetric = all(k % 2 == 1 for k in ksize)
    n_look = centre_k if symmetric else K
    if hashing.backend_for(indices) == "triton":  # a handful of launches: host time is this path's cost
        table = hashing.hash_build_voxels(indices, shape)
        pair_fwd, masks = hashing.neighbor_map(table, indices, shape, offset_table(ksize, dilation, dev))
        return Rulebook.from_maps(pair_fwd, None, n, n, centre_k if symmetric or n == 0 else -1,
                                  mirrored=symmetric, masks_fwd=masks)
    rels = [(torch.arange(k, device=dev) - k // 2) * dl for k, dl in zip(ksize, dilation)]  # [k_d] per dim
    # CPU: keys in a grid padded by the kernel's reach on every side, so an out-of-bounds neighbour has a key
    # of its own that no voxel holds: a plain miss in the direct table, no bounds mask
    pad = [(k // 2) * dl for k, dl in zip(ksize, dilation)]
    padded = [s_ + 2 * p_ for s_, p_ in zip(shape, pad)]
    dense = dev.type == "cpu" and hashing.backend_for(indices[:, :1]) == "ref"
    if dense:  # (no device sync on the GPU path)
        span = (int(indices[:, 0].max()) + 1 if n else 1) * math.prod(padded)
        dense = _dense_fits(span, n)
    lin = _linear_strides(padded if dense else shape)
    delta = _offset_sum([r * st for r, st in zip(rels, lin)])  # [K] key difference per kernel offset
    if dense:
        keys = encode(coords + torch.tensor(pad, dtype=coords.dtype, device=dev), indices[:, 0], padded,
                      torch.int32)
        src = _dense_lookup(keys, delta[:n_look].int(), span)  # [n_look, N]
        hit = src >= 0
    else:
        keys = encode(coords.long(), indices[:, 0], shape)
        table = hashing.hash_build(keys)
        oks = [(coords[:, d].unsqueeze(0) + r.unsqueeze(1).to(coords.dtype) >= 0)
               & (coords[:, d].unsqueeze(0) + r.unsqueeze(1).to(coords.dtype) < shape[d])
               for d, r in enumerate(rels)]  # [k_d, N] per dim
        ok = _per_dim_product(oks, n)  # [K, N]
        if table.backend == "ref" and dilation[-1] == 1 and ksize[-1] > 1:
            kx = ksize[-1]
            runs = -(-n_look // kx)
            d0 = delta[torch.arange(runs, device=dev) * kx]
            # for odd kernels the last run is the centre row's offsets before the centre
            src = _sorted_window_lookup(table, keys, d0, kx, n_look, centre_last=symmetric)
            hit = (src >= 0).logical_and_(ok[:n_look])
        else:
            q = keys.unsqueeze(0) + delta[:n_look].unsqueeze(1)
            q = torch.where(ok[:n_look], q, torch.full_like(q, -1))
            src = hashing.hash_lookup(table, q)  # [n_look, N]
            hit = src >= 0
    kk, oo = torch.nonzero(hit, as_tuple=True)  # sorted by offset, then output row
    ii = src.view(-1).index_select(0, kk * n + oo).long()
    half = torch.bincount(kk, minlength=n_look).tolist() if n_look else []
    if not symmetric:
        return Rulebook(ii, oo, half, n, n, centre_k if n == 0 else -1)
    # offsets after the centre mirror those before it (k -> K-1-k, pairs swapped), in reverse offset order;
    # each segment keeps its order (the order a stable sort by offset gives)
    ar = torch.arange(n, device=dev)
    ends = list(itertools.accumulate(half))
    starts = [e - c for e, c in zip(ends, half)]
    segs = list(reversed(list(zip(starts, ends))))
    in_idx = torch.cat([ii, ar] + [oo[a:b] for a, b in segs])
    out_idx = torch.cat([oo, ar] + [ii[a:b] for a, b in segs])
    counts = half + [n] + half[::-1]
    ident = centre_k if counts[centre_k] == n else -1
    rb = Rulebook(in_idx, out_idx, counts, n, n, ident)
    rb._mirrored = True  # offset K-1-k holds offset k's pairs swapped (odd kernel in every dimension)
    return rb


def build_conv(indices: torch.Tensor, spatial_shape, ksize, stride, padding, dilation,
               transposed: bool = False, output_padding=None) -> tuple[torch.Tensor, list[int], Rulebook]:
    """Regular or transposed convolution: (out_indices int32 [M, ndim+1], out_spatial_shape, rulebook)."""
    dev = indices.device
    ndim = len(ksize)
    shape = list(spatial_shape)
    if transposed:
        out_shape = deconv_output_size(shape, ksize, stride, padding, dilation, output_padding or [0] * ndim)
    else:
        out_shape = conv_output_size(shape, ksize, stride, padding, dilation)
    n = indices.shape[0]
    K = math.prod(ksize)
    if hashing.backend_for(indices) == "triton" and 1 <= ndim <= 3:  # the GPU: two kernels, one host sync
        maps = hashing.conv_maps(indices, out_shape, ksize, stride, padding, dilation, transposed,
                                 sort=is_deterministic())
        rb = Rulebook.from_maps(maps.pair_fwd, maps.pair_bwd, n, maps.out_keys.numel(), masks_fwd=maps.masks_fwd,
                                masks_bwd=maps.masks_bwd)
        return maps.out_indices, out_shape, rb
    lin = _linear_strides(out_shape)
    # on the CPU, int32 keys where every output key fits: half the memory traffic, a faster sort in unique
    narrow = dev.type == "cpu" and n > 0 and (int(indices[:, 0].max()) + 1) * math.prod(out_shape) < 2**31
    kdt = torch.int32 if narrow else torch.int64
    oks, outs = [], []
    for d in range(ndim):
        c = indices[:, 1 + d].to(kdt).unsqueeze(0)  # [1, N]
        j = (torch.arange(ksize[d], device=dev, dtype=kdt) * dilation[d]).unsqueeze(1)  # [k_d, 1]
        if transposed:
            o = c * stride[d] - padding[d] + j
            ok = torch.ones_like(o, dtype=torch.bool)
        else:
            num = c + padding[d] - j
            o = torch.div(num, stride[d], rounding_mode="floor")
            ok = o * stride[d] == num
        oks.append(ok & (o >= 0) & (o < out_shape[d]))
        outs.append(o * lin[d])  # [k_d, N] partial linear key
    ok = _per_dim_product(oks, n)
    # candidate output key of every (offset, input): the per-dim partial keys summed over the offset product
    full = indices[:, 0].to(kdt) * math.prod(out_shape)
    for d in range(ndim):
        shape_d = [1] * ndim + [n]
        shape_d[d] = ksize[d]
        full = full + outs[d].view(shape_d)
    flat = torch.nonzero(ok.reshape(-1)).view(-1)  # sorted by offset, then input row
    k_idx = torch.div(flat, max(n, 1), rounding_mode="floor")
    in_idx = flat - k_idx * n
    cand_keys = full.reshape(-1).index_select(0, flat)
    if narrow:
        uniq, out_idx = hashing.unique_keys_ref(cand_keys)  # what _unique does on the CPU: sorted
    else:
        uniq, out_idx = _unique(cand_keys)
    counts = torch.bincount(k_idx, minlength=K).tolist()
    out_indices = decode(uniq, out_shape)
    return out_indices, out_shape, Rulebook(in_idx, out_idx, counts, n, uniq.numel())
