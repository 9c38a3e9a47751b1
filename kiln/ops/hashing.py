"""Coordinate hash table: int64 keys -> int32 values, for sparse-convolution rulebooks.

The Triton table is open addressing with linear probing; its capacity is the next power of two at or above twice
the number of keys (load factor <= 0.5), empty slots hold -1, insertion claims a slot with ``atomic_cas``. The
reference (the specification) is a sorted key array searched with ``torch.searchsorted``.

Keys must be non-negative int64 (sparse coordinates are encoded as ``((b * D0 + z) * D1 + y) * D2 + x``); a
negative query key always misses, which is how callers mark out-of-range neighbours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._dispatch import backend_for, check_tensor
from ._triton import cdiv, direct, next_power_of_2, tl, triton
from .sparse_gemm import offset_masks

EMPTY = -1
_BLOCK = 256
# (voxel, offset) probes per program of the neighbour-map and conv-map kernels. A probe loop runs until the
# longest chain in its program ends, so fewer probes per program wait on fewer unlucky lanes: on an H100 at 150k
# voxels (scripts/gpu/hash_sweep.py) 256 took the neighbour map from 0.30 to 0.16 ms and the strided maps from
# 1.16 to 0.66 ms against 2048.
PROBES_PER_PROGRAM = 256


@dataclass
class HashTable:
    """A built table. ``backend`` is 'triton' (slot arrays) or 'ref' (sorted keys + the value of each)."""

    backend: str
    keys: torch.Tensor  # triton: [capacity] int64 slots (-1 empty); ref: [n] sorted int64
    values: torch.Tensor  # triton: [capacity] int32; ref: [n] int32 aligned with ``keys``

    @property
    def capacity(self) -> int:
        return self.keys.numel()


def _check_keys(name: str, keys: torch.Tensor) -> None:
    check_tensor(name, keys, ndim=1, dtypes=(torch.int64,))


def hash_build(keys: torch.Tensor, values: torch.Tensor | None = None) -> HashTable:
    """Table mapping ``keys[i]`` ([n] int64, non-negative, unique) to ``values[i]`` ([n] int32, default i)."""
    _check_keys("keys", keys)
    if values is None:
        values = torch.arange(keys.numel(), device=keys.device, dtype=torch.int32)
    check_tensor("values", values, ndim=1, dtypes=(torch.int32,), device=keys.device)
    if values.numel() != keys.numel():
        raise ValueError(f"values has {values.numel()} entries but keys has {keys.numel()}")
    if backend_for(keys) == "triton":
        table = _empty_table(keys.numel(), keys.device)
        _insert(table, keys.contiguous(), values.contiguous())
        return table
    return hash_build_ref(keys, values)


def hash_build_ref(keys: torch.Tensor, values: torch.Tensor) -> HashTable:
    sk, perm = torch.sort(keys)
    return HashTable("ref", sk, values[perm])


def hash_lookup(table: HashTable, queries: torch.Tensor) -> torch.Tensor:
    """int32 value of every query key (any shape, int64), -1 where the key is absent or negative."""
    check_tensor("queries", queries, dtypes=(torch.int64,), device=table.keys.device)
    if table.backend == "triton":
        return _lookup_triton(table, queries)
    return hash_lookup_ref(table, queries)


def hash_lookup_ref(table: HashTable, queries: torch.Tensor) -> torch.Tensor:
    if table.keys.numel() == 0:
        return torch.full(queries.shape, -1, dtype=torch.int32, device=queries.device)
    pos = torch.searchsorted(table.keys, queries).clamp_(max=table.keys.numel() - 1)
    found = (table.keys[pos] == queries) & (queries >= 0)
    return torch.where(found, table.values[pos], torch.full_like(table.values[pos], -1))


def hash_build_voxels(indices: torch.Tensor, spatial_shape) -> HashTable:
    """``hash_build(encode(indices))`` with value = row: on the GPU one kernel encodes each voxel's key from its
    int32 batch-first row and inserts it (no key tensor, no separate encode ops)."""
    check_tensor("indices", indices, ndim=2, dtypes=(torch.int32,))
    ndim = len(spatial_shape)
    if indices.shape[1] != ndim + 1:
        raise ValueError(f"indices must be [N, {ndim + 1}] for a {ndim}-d spatial_shape, got {tuple(indices.shape)}")
    if backend_for(indices) == "triton" and 1 <= ndim <= 3:
        n = indices.shape[0]
        table = _empty_table(n, indices.device)
        if n:
            idx = indices if indices.stride(1) == 1 else indices.contiguous()
            sizes = list(spatial_shape) + [1] * (3 - ndim)
            direct(_insert_voxels_kernel)[(cdiv(n, _BLOCK),)](
                idx, table.keys, table.values, n, table.capacity - 1, idx.stride(0), *sizes, NDIM=ndim, BLOCK=_BLOCK)
        return table
    key = indices[:, 0].long()
    for d, size in enumerate(spatial_shape):
        key = key * size + indices[:, 1 + d]
    return hash_build(key)


def neighbor_map(table: HashTable, indices: torch.Tensor, spatial_shape, rel: torch.Tensor,
                 masks: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A submanifold rulebook's pair map in one pass: ``pair_map[i, k]`` (int32 [N, K]) is the row of voxel i's
    neighbour at offset k -- the voxel at ``indices[i, 1:] + rel[:, k]`` in the same batch entry, looked up in
    ``table`` (built from the keys ``encode(indices)``) -- or -1 where there is none or it lies outside
    ``spatial_shape``; with ``masks``, also int64 [N] with bit k set where ``pair_map[:, k] >= 0`` (-1 for K > 63).

    indices: int32 [N, ndim + 1] batch-first; rel: int32 [ndim, K] per-dimension offsets. On the GPU one kernel
    decodes, bounds-checks, encodes and probes every (voxel, offset) and writes the offset masks with the map:
    built from separate torch ops the same map took ~90 launches per layer, whose host time outweighed the work.
    """
    check_tensor("indices", indices, ndim=2, dtypes=(torch.int32,), device=table.keys.device)
    check_tensor("rel", rel, ndim=2, dtypes=(torch.int32,), device=table.keys.device)
    ndim = len(spatial_shape)
    if indices.shape[1] != ndim + 1 or rel.shape[0] != ndim:
        raise ValueError(f"indices [N, {ndim + 1}] and rel [{ndim}, K] for a {ndim}-d spatial_shape, got "
                         f"{tuple(indices.shape)} and {tuple(rel.shape)}")
    if table.backend == "triton" and 1 <= ndim <= 3:
        return _neighbor_map_triton(table, indices, list(spatial_shape), rel, masks)
    return neighbor_map_ref(table, indices, spatial_shape, rel, masks)


def neighbor_map_ref(table, indices, spatial_shape, rel, masks=True):
    """The specification: every neighbour's coordinates, bounds, key and lookup as tensors."""
    coords = indices[:, 1:].long().unsqueeze(1) + rel.long().T.unsqueeze(0)  # [N, K, ndim]
    key = indices[:, 0].long().unsqueeze(1).expand(-1, rel.shape[1])
    ok = torch.ones_like(key, dtype=torch.bool)
    for d, size in enumerate(spatial_shape):
        ok &= (coords[..., d] >= 0) & (coords[..., d] < size)
        key = key * size + coords[..., d]
    pm = hash_lookup(table, torch.where(ok, key, torch.full_like(key, -1)))
    return pm, offset_masks(pm) if masks else None


def voxel_checks(indices: torch.Tensor, spatial_shape, batch_size: int) -> tuple[int, int, bool]:
    """(first row with a negative entry, first row outside ``batch_size`` / ``spatial_shape``, whether the keys
    ascend strictly) for int32 [N, ndim + 1] batch-first ``indices``; a row index of N means none. One host
    sync; on the GPU one kernel (with separate torch ops the checks cost ~30 launches per SparseConvTensor)."""
    n, ndim = indices.shape[0], len(spatial_shape)
    if backend_for(indices) == "triton" and 1 <= ndim <= 3 and n:
        idx = indices if indices.stride(1) == 1 else indices.contiguous()
        out = torch.tensor([n, n, 0], dtype=torch.int32).to(indices.device, non_blocking=True)
        block = 256
        sizes = list(spatial_shape) + [1] * (3 - ndim)
        direct(_voxel_check_kernel)[(cdiv(n, block),)](idx, out, n, idx.stride(0), int(batch_size), *sizes,
                                                              NDIM=ndim, BLOCK=block)
        neg, outside, descents = out.tolist()
        return neg, outside, descents == 0
    return voxel_checks_ref(indices, spatial_shape, batch_size)


def voxel_checks_ref(indices, spatial_shape, batch_size):
    n = indices.shape[0]
    if n == 0:
        return 0, 0, True
    limits = torch.tensor([int(batch_size)] + list(spatial_shape), device=indices.device)
    rows = torch.arange(n, device=indices.device)
    neg = torch.where((indices < 0).any(1), rows, n).min()
    outside = torch.where((indices.long() >= limits).any(1), rows, n).min()
    key = indices[:, 0].long()
    for d, size in enumerate(spatial_shape):
        key = key * size + indices[:, 1 + d]
    ascending = (key[1:] > key[:-1]).all().long()
    neg, outside, ascending = torch.stack([neg, outside, ascending]).tolist()
    return neg, outside, bool(ascending)


@triton.jit
def _voxel_check_kernel(Idx, Out, N, stride_i, B, S0, S1, S2, NDIM: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    prev_ok = ok & (rows > 0)
    ptr = Idx + rows.to(tl.int64) * stride_i
    b = tl.load(ptr, mask=ok, other=0)
    bp = tl.load(ptr - stride_i, mask=prev_ok, other=0)
    neg = b < 0
    out = b >= B
    key = b.to(tl.int64)
    key_prev = bp.to(tl.int64)
    for d in tl.static_range(NDIM):
        size = _pick(d, S0, S1, S2)
        c = tl.load(ptr + 1 + d, mask=ok, other=0)
        cp = tl.load(ptr - stride_i + 1 + d, mask=prev_ok, other=0)
        neg = neg | (c < 0)
        out = out | (c >= size)
        key = key * size + c
        key_prev = key_prev * size + cp
    big = tl.full([BLOCK], 2147483647, tl.int32)
    tl.atomic_min(Out, tl.min(tl.where(ok & neg, rows, big), axis=0))
    tl.atomic_min(Out + 1, tl.min(tl.where(ok & out, rows, big), axis=0))
    tl.atomic_add(Out + 2, tl.sum((prev_ok & (key <= key_prev)).to(tl.int32), axis=0))


@dataclass
class ConvMaps:
    """A regular or transposed convolution's rulebook as pair maps (``conv_maps``)."""

    out_keys: torch.Tensor   # int64 [M]: the output voxels' keys, row o of the output is out_keys[o]
    out_indices: torch.Tensor  # int32 [M, ndim + 1]: the same outputs as batch-first coordinates
    pair_fwd: torch.Tensor   # int32 [M, K]: input row feeding output o through offset k, -1 if none
    pair_bwd: torch.Tensor   # int32 [N, K]: output row input i feeds through offset k, -1 if none
    masks_fwd: torch.Tensor  # int64 [M]: bit k where pair_fwd[o, k] >= 0 (-1 for K > 63)
    masks_bwd: torch.Tensor  # int64 [N]: the same for pair_bwd


def conv_maps(indices: torch.Tensor, out_shape, ksize, stride, padding, dilation, transposed: bool,
              sort: bool) -> ConvMaps:
    """The output voxels and pair maps of a strided (or transposed) sparse convolution on the GPU.

    Input voxel i (``indices`` int32 [N, ndim + 1], batch first) reaches, through kernel tap t (per dimension,
    displacement ``t_d * dilation_d``), the output at ``(c + padding - t * dilation) / stride`` where that
    divides exactly (regular) or ``c * stride - padding + t * dilation`` (transposed), if inside ``out_shape``.
    The outputs are the distinct keys reached (ascending with ``sort``, else in hash-slot order). Two kernels
    over (voxel, reachable tap) -- only the taps a regular convolution's stride lets reach anything (a stride-2
    3x3x3 kernel: 8 of 27) -- one inserts every reached key into a hash table, one (after the occupied slots are
    numbered) looks each up and writes both pair maps, their offset masks and the outputs' coordinates. One host
    sync (the number of outputs). The taps one voxel can reach also bound the distinct outputs, which sizes the
    table (the outputs are typically far fewer: it stays sparse)."""
    ndim = len(out_shape)
    if not 1 <= ndim <= 3:
        raise ValueError(f"conv_maps handles 1-3 spatial dims, got {ndim}")
    n = indices.shape[0]
    K = math.prod(ksize)
    dev = indices.device
    idx = indices if indices.stride(1) == 1 else indices.contiguous()
    # a regular conv's tap t_d hits an output only where (c + p - t_d * dil) divides by the stride: at most
    # ceil(k / (s / gcd(dil, s))) taps per dimension reach anything from one voxel
    reach = [k if transposed else min(k, -(-k * math.gcd(dl, st) // st))
             for k, st, dl in zip(ksize, stride, dilation)]
    table = _empty_table((n * math.prod(reach) + 2) // 2, dev)  # capacity >= bound + 1: never full
    rp = max(2, next_power_of_2(math.prod(reach)))
    block = _rows_per_program(rp)
    pad3 = lambda v, fill: list(v) + [fill] * (3 - ndim)  # noqa: E731
    geom = (*pad3(out_shape, 1), *pad3(stride, 1), *pad3(padding, 0), *pad3(ksize, 1), *pad3(dilation, 1),
            *pad3(reach, 1))
    flags = dict(NDIM=ndim, TRANSPOSED=transposed, MAXSTEP=max(stride), RP=rp, BLOCK_R=block)
    grid = (cdiv(n, block),)
    if n:
        direct(_conv_insert_kernel)[grid](idx, table.keys, n, table.capacity - 1, idx.stride(0), *geom, **flags)
    out_keys, m = _number_slots(table, sort)
    pair_fwd = torch.full((m, K), -1, dtype=torch.int32, device=dev)
    pair_bwd = torch.full((n, K), -1, dtype=torch.int32, device=dev)
    out_indices = torch.empty((m, ndim + 1), dtype=torch.int32, device=dev)  # every output is reached: all set
    masks = K <= 63
    masks_fwd = torch.zeros(m, dtype=torch.int64, device=dev) if masks else torch.full((m,), -1, dtype=torch.int64,
                                                                                       device=dev)
    masks_bwd = torch.empty(n, dtype=torch.int64, device=dev) if masks else torch.full((n,), -1, dtype=torch.int64,
                                                                                       device=dev)
    if n:
        direct(_conv_pairs_kernel)[grid](idx, table.keys, table.values, pair_fwd, pair_bwd, masks_fwd, masks_bwd,
                                         out_indices, n, K, table.capacity - 1, idx.stride(0), *geom,
                                         WRITE_MASKS=masks, **flags)
    return ConvMaps(out_keys, out_indices, pair_fwd, pair_bwd, masks_fwd, masks_bwd)


def unique_keys(keys: torch.Tensor, sort: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct keys and, for every input key, the int64 index of its distinct key.

    With ``sort`` the distinct keys come out ascending (a stable, reproducible output order); without it the
    Triton path returns them in slot order, which depends on insertion races. The reference always sorts.
    """
    _check_keys("keys", keys)
    if backend_for(keys) == "triton":
        return _unique_triton(keys.contiguous(), sort)
    return unique_keys_ref(keys)


def unique_keys_ref(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    return uniq, inverse


# ----------------------------------------------------------------------------------------------- Triton


def _capacity(n: int) -> int:
    return max(16, next_power_of_2(2 * max(n, 1)))


def _rows_per_program(kp: int) -> int:
    return max(1, min(64, PROBES_PER_PROGRAM // kp))


def _empty_table(n: int, device) -> HashTable:
    """Every slot empty; the values stay unset: every reader loads a slot's value only where its key matched."""
    cap = _capacity(n)
    return HashTable("triton", torch.full((cap,), EMPTY, dtype=torch.int64, device=device),
                     torch.empty((cap,), dtype=torch.int32, device=device))


_NUMBER_BLOCK = 1024


def _number_slots(table: HashTable, sort: bool) -> tuple[torch.Tensor, int]:
    """Number the occupied slots 0..m-1 (each slot's value becomes its number) and return (their keys in number
    order, m). With ``sort`` the numbers follow ascending keys (reproducible: deterministic mode). Without it one
    kernel numbers the slots with a block counter, one host sync for m, in place of a nonzero (its own sync), a
    gather, an arange and a scatter; each block of slots keeps slot order, but the blocks follow the order in which
    their counter increments land, which is not reproducible run to run."""
    dev = table.keys.device
    if sort:
        slots = torch.nonzero(table.keys != EMPTY).view(-1)
        keys, order = torch.sort(table.keys[slots])
        table.values[slots[order]] = torch.arange(keys.numel(), device=dev, dtype=torch.int32)
        return keys, keys.numel()
    cap = table.capacity
    count = torch.zeros(1, dtype=torch.int32, device=dev)
    keys = torch.empty(cap, dtype=torch.int64, device=dev)
    direct(_number_slots_kernel)[(cdiv(cap, _NUMBER_BLOCK),)](table.keys, table.values, keys, count, cap,
                                                                     BLOCK=_NUMBER_BLOCK)
    m = int(count.item())
    return keys[:m], m


@triton.jit
def _number_slots_kernel(TKeys, TVals, OutKeys, Count, CAP, BLOCK: tl.constexpr):
    """Occupied slots of one block get consecutive numbers from a shared counter (one atomic per program)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(TKeys + offs, mask=offs < CAP, other=-1)
    occ = (key != -1).to(tl.int32)
    base = tl.atomic_add(Count, tl.sum(occ, axis=0))
    pos = base + tl.cumsum(occ, axis=0) - 1
    tl.store(TVals + offs, pos, mask=occ != 0)
    tl.store(OutKeys + pos, key, mask=occ != 0)


@triton.jit
def _hash_slot(key, cap_mask):
    # fold the key to < 2**32 and multiply by a 31-bit odd constant: the product stays below 2**63
    lo = key & 0xFFFFFFFF
    hi = (key >> 32) & 0xFFFFFFFF
    h = ((lo ^ (hi * 40503)) & 0xFFFFFFFF) * 1540483477
    h = h ^ (h >> 29)
    return h & cap_mask


@triton.jit
def _pick(D: tl.constexpr, a, b, c):
    """The D-th of three per-dimension scalars (D a compile-time dimension index; kernels take <= 3 dims)."""
    if D == 0:
        v = a
    elif D == 1:
        v = b
    else:
        v = c
    return v


@triton.jit
def _insert_keys(TKeys, key, active, cap_mask):
    """Linear-probing insert of ``key`` where ``active`` (any shape) -> (slot, claimed): each lane's slot, and
    whether it claimed it (False where the key was already there)."""
    slot = _hash_slot(key, cap_mask)
    claimed = active & (key != key)
    while tl.max(active.to(tl.int32)) > 0:
        # finished lanes compare against -2, which no slot ever holds: their CAS is a no-op read
        cmp = tl.where(active, -1, -2).to(tl.int64)
        prev = tl.atomic_cas(TKeys + slot, cmp, key)
        claimed = claimed | (active & (prev == -1))
        active = active & (prev != -1) & (prev != key)
        slot = tl.where(active, (slot + 1) & cap_mask, slot)
    return slot, claimed


@triton.jit
def _lookup_keys(TKeys, TVals, key, active, cap_mask):
    """int32 value of ``key`` where ``active`` (any shape), -1 where absent or inactive."""
    slot = _hash_slot(key, cap_mask)
    found = tl.full(key.shape, -1, tl.int32)
    while tl.max(active.to(tl.int32)) > 0:
        tk = tl.load(TKeys + slot, mask=active, other=-1)
        hit = active & (tk == key)
        found = tl.where(hit, tl.load(TVals + slot, mask=hit, other=-1), found)
        active = active & (tk != key) & (tk != -1)
        slot = (slot + 1) & cap_mask
    return found


@triton.jit
def _insert_kernel(Keys, Vals, TKeys, TVals, N, cap_mask, HAS_VALS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    key = tl.load(Keys + offs, mask=valid, other=0)
    slot, claimed = _insert_keys(TKeys, key, valid, cap_mask)
    if HAS_VALS:
        tl.store(TVals + slot, tl.load(Vals + offs, mask=valid, other=0), mask=claimed)


@triton.jit
def _lookup_kernel(Q, TKeys, TVals, Out, N, cap_mask, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    q = tl.load(Q + offs, mask=valid, other=-1)
    tl.store(Out + offs, _lookup_keys(TKeys, TVals, q, valid & (q >= 0), cap_mask), mask=valid)


@triton.jit
def _insert_voxels_kernel(Idx, TKeys, TVals, N, cap_mask, stride_i, S0, S1, S2, NDIM: tl.constexpr,
                          BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    active = rows < N
    ptr = Idx + rows.to(tl.int64) * stride_i
    key = tl.load(ptr, mask=active, other=0).to(tl.int64)
    for d in tl.static_range(NDIM):
        key = key * _pick(d, S0, S1, S2) + tl.load(ptr + 1 + d, mask=active, other=0).to(tl.int64)
    slot, claimed = _insert_keys(TKeys, key, active, cap_mask)
    tl.store(TVals + slot, rows, mask=claimed)


@triton.jit
def _neighbor_map_kernel(Idx, Rel, TKeys, TVals, PM, Masks, N, K, cap_mask, stride_i, S0, S1, S2,
                         NDIM: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr, WRITE_MASKS: tl.constexpr):
    """[BLOCK_R voxels, KP offsets] per program: neighbour coordinates, bounds, key, linear probe; row masks."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.arange(0, KP)
    r_ok = rows < N
    k_ok = ks < K
    inside = r_ok[:, None] & k_ok[None, :]
    row_ptr = Idx + rows.to(tl.int64) * stride_i
    key = tl.load(row_ptr, mask=r_ok, other=0).to(tl.int64)[:, None] + tl.zeros([BLOCK_R, KP], tl.int64)
    for d in tl.static_range(NDIM):
        size = _pick(d, S0, S1, S2)
        c = tl.load(row_ptr + 1 + d, mask=r_ok, other=0).to(tl.int64)
        r = tl.load(Rel + d * K + ks, mask=k_ok, other=0).to(tl.int64)
        nc = c[:, None] + r[None, :]
        inside = inside & (nc >= 0) & (nc < size)
        key = key * size + nc
    found = _lookup_keys(TKeys, TVals, key, inside, cap_mask)
    tl.store(PM + rows[:, None].to(tl.int64) * K + ks[None, :], found, mask=r_ok[:, None] & k_ok[None, :])
    if WRITE_MASKS:
        bit = tl.full([KP], 1, tl.int64) << ks.to(tl.int64)
        tl.store(Masks + rows, tl.sum(tl.where(found >= 0, bit[None, :], 0), axis=1), mask=r_ok)


@triton.jit
def _conv_lanes(Idx, rows, r_ok, stride_i, S0, S1, S2, T0, T1, T2, P0, P1, P2, KS0, KS1, KS2, D0, D1, D2,
                R0, R1, R2, NDIM: tl.constexpr, TRANSPOSED: tl.constexpr, MAXSTEP: tl.constexpr,
                BLOCK_R: tl.constexpr, RP: tl.constexpr):
    """[BLOCK_R voxels, RP lanes]: lane j is the j-th (row-major) combination of the taps that can reach an output
    -- R_d per dimension: every tap of a transposed convolution; for a regular one only the taps whose
    displacement leaves a multiple of the stride (a stride-2 3x3x3 kernel: 8 lanes, not 27). Returns each lane's
    output key, whether it is a real output, and its kernel offset k (row-major over the kernel)."""
    js = tl.arange(0, RP)
    row_ptr = Idx + rows.to(tl.int64) * stride_i
    key = tl.load(row_ptr, mask=r_ok, other=0).to(tl.int64)[:, None] + tl.zeros([BLOCK_R, RP], tl.int64)
    ok = r_ok[:, None] & (js < R0 * R1 * R2)[None, :]
    kcol = tl.zeros([BLOCK_R, RP], tl.int32)
    inner = R0 * R1 * R2
    for d in tl.static_range(NDIM):
        size, st, pd = _pick(d, S0, S1, S2), _pick(d, T0, T1, T2), _pick(d, P0, P1, P2)
        ksz, dil, reach = _pick(d, KS0, KS1, KS2), _pick(d, D0, D1, D2), _pick(d, R0, R1, R2)
        inner = inner // reach
        jd = ((js // inner) % reach).to(tl.int64)[None, :]
        c = tl.load(row_ptr + 1 + d, mask=r_ok, other=0).to(tl.int64)
        if TRANSPOSED:
            tap = jd + tl.zeros([BLOCK_R, RP], tl.int64)
            o = c[:, None] * st - pd + tap * dil
            ok = ok & (o >= 0) & (o < size)
        else:
            # the first tap whose displacement leaves a multiple of the stride; then every st / gcd(dil, st) taps
            t0 = tl.full([BLOCK_R], -1, tl.int64)
            for t in tl.static_range(MAXSTEP):
                t0 = tl.where((t0 < 0) & (t < st) & ((c + pd - t * dil) % st == 0), t, t0)
            tap = t0[:, None] + jd * (st // _gcd_small(dil, st, MAXSTEP))
            num = c[:, None] + pd - tap * dil
            o = tl.where(num >= 0, num, 0) // st
            ok = ok & (t0 >= 0)[:, None] & (tap < ksz) & (num >= 0) & (o < size)
        key = key * size + o
        kcol = kcol * ksz + tl.where(tap < ksz, tap, 0).to(tl.int32)
    return key, ok, kcol


@triton.jit
def _gcd_small(a, b, MAXSTEP: tl.constexpr):
    """gcd(a, b) for b <= MAXSTEP (a stride): the largest g <= b dividing both."""
    g = 1
    for v in tl.static_range(1, MAXSTEP + 1):
        g = tl.where((v <= b) & (a % v == 0) & (b % v == 0), v, g)
    return g


@triton.jit
def _conv_insert_kernel(Idx, TKeys, N, cap_mask, stride_i, S0, S1, S2, T0, T1, T2, P0, P1, P2, KS0, KS1, KS2,
                        D0, D1, D2, R0, R1, R2, NDIM: tl.constexpr, TRANSPOSED: tl.constexpr,
                        MAXSTEP: tl.constexpr, RP: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    key, active, _ = _conv_lanes(Idx, rows, rows < N, stride_i, S0, S1, S2, T0, T1, T2, P0, P1, P2, KS0, KS1, KS2,
                                 D0, D1, D2, R0, R1, R2, NDIM, TRANSPOSED, MAXSTEP, BLOCK_R, RP)
    _insert_keys(TKeys, key, active, cap_mask)


@triton.jit
def _conv_pairs_kernel(Idx, TKeys, TVals, PF, PB, MF, MB, OutIdx, N, K, cap_mask, stride_i, S0, S1, S2, T0, T1, T2,
                       P0, P1, P2, KS0, KS1, KS2, D0, D1, D2, R0, R1, R2, NDIM: tl.constexpr,
                       TRANSPOSED: tl.constexpr, MAXSTEP: tl.constexpr, WRITE_MASKS: tl.constexpr,
                       RP: tl.constexpr, BLOCK_R: tl.constexpr):
    """Both pair maps (they must start all -1: only the pairs found are written), their masks, and each
    output's batch-first coordinates (decoded from its key by every lane that reaches it: the same values, so
    the repeated stores are harmless)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < N
    key, active, kcol = _conv_lanes(Idx, rows, r_ok, stride_i, S0, S1, S2, T0, T1, T2, P0, P1, P2, KS0, KS1, KS2,
                                    D0, D1, D2, R0, R1, R2, NDIM, TRANSPOSED, MAXSTEP, BLOCK_R, RP)
    out = _lookup_keys(TKeys, TVals, key, active, cap_mask)
    found = out >= 0
    tl.store(PB + rows[:, None].to(tl.int64) * K + kcol, out, mask=found)
    # each (output, tap) has exactly one input: plain scattered stores
    tl.store(PF + out.to(tl.int64) * K + kcol, rows[:, None] + tl.zeros([BLOCK_R, RP], tl.int32), mask=found)
    rest = key
    for d in tl.static_range(NDIM):
        size = _pick(NDIM - 1 - d, S0, S1, S2)
        q = rest // size  # keys are non-negative: the floor
        tl.store(OutIdx + out.to(tl.int64) * (NDIM + 1) + (NDIM - d), (rest - q * size).to(tl.int32), mask=found)
        rest = q
    tl.store(OutIdx + out.to(tl.int64) * (NDIM + 1), rest.to(tl.int32), mask=found)
    if WRITE_MASKS:
        bit = tl.full([BLOCK_R, RP], 1, tl.int64) << kcol.to(tl.int64)
        tl.store(MB + rows, tl.sum(tl.where(found, bit, 0), axis=1), mask=r_ok)
        tl.atomic_or(MF + out.to(tl.int64), bit, mask=found)


def _neighbor_map_triton(table, indices, shape, rel, masks):
    n, K = indices.shape[0], rel.shape[1]
    pm = torch.empty((n, K), dtype=torch.int32, device=indices.device)
    write = masks and K <= 63
    m = torch.empty(n, dtype=torch.int64, device=indices.device) if write else None
    if n and K:
        idx = indices if indices.stride(1) == 1 else indices.contiguous()
        rel = rel.contiguous()
        kp = max(2, next_power_of_2(K))
        block = _rows_per_program(kp)
        sizes = shape + [1] * (3 - len(shape))
        direct(_neighbor_map_kernel)[(cdiv(n, block),)](
            idx, rel, table.keys, table.values, pm, m if write else pm, n, K, table.capacity - 1, idx.stride(0),
            *sizes, NDIM=len(shape), KP=kp, BLOCK_R=block, WRITE_MASKS=write)
    elif write:
        m.zero_()
    if masks and not write:
        m = torch.full((n,), -1, dtype=torch.int64, device=indices.device)
    return pm, m


def _insert(table: HashTable, keys: torch.Tensor, values: torch.Tensor | None) -> None:
    n = keys.numel()
    if n == 0:
        return
    grid = (cdiv(n, _BLOCK),)
    direct(_insert_kernel)[grid](keys, values if values is not None else keys, table.keys, table.values, n,
                                 table.capacity - 1, HAS_VALS=values is not None, BLOCK=_BLOCK)


def _lookup_triton(table: HashTable, queries: torch.Tensor) -> torch.Tensor:
    q = queries.reshape(-1).contiguous()
    out = torch.full(q.shape, -7, dtype=torch.int32, device=q.device)  # poison: every entry must be written
    if q.numel():
        direct(_lookup_kernel)[(cdiv(q.numel(), _BLOCK),)](q, table.keys, table.values, out, q.numel(),
                                                                  table.capacity - 1, BLOCK=_BLOCK)
    return out.view(queries.shape)


def _unique_triton(keys: torch.Tensor, sort: bool) -> tuple[torch.Tensor, torch.Tensor]:
    table = _empty_table(keys.numel(), keys.device)
    _insert(table, keys, None)
    uniq, _ = _number_slots(table, sort)
    inverse = _lookup_triton(table, keys).long()
    return uniq, inverse


def _check_hash(device, dtype, g):
    """Doctor check: Triton (or the reference on CPU) table vs the sorted reference, as exact equality."""
    keys = torch.randperm(50000, device=device, generator=g)[:3001].long() * 7919
    table = hash_build(keys)
    q = torch.cat([keys[torch.randperm(keys.numel(), device=device, generator=g)],
                   torch.randint(0, 2**40, (777,), device=device, generator=g), -keys[:5] - 1])
    got = hash_lookup(table, q)
    ref = hash_lookup_ref(hash_build_ref(keys, torch.arange(keys.numel(), device=device, dtype=torch.int32)), q)
    return float((got != ref).sum().item()), table.backend


DOCTOR_CHECKS = {"hash_lookup": _check_hash}
