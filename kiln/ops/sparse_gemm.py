"""Sparse-convolution GEMMs over a rulebook: gather-GEMM-scatter and the fused masked implicit GEMM.

A rulebook relates input rows to output rows per kernel offset ``k`` (``K`` offsets). Two encodings:

* pair lists, sorted by offset: ``in_idx[p]``, ``out_idx[p]`` (int64 [P]) with ``counts[k]`` pairs for offset
  ``k`` (``offsets = [0, cumsum(counts)]``);
* a pair map ``pair_map[r, k]`` (int32 [R, K]): the row feeding output row ``r`` through offset ``k``, or -1.
  The forward map (rows = outputs, entries = inputs) drives the forward pass; the backward map (rows = inputs,
  entries = outputs) drives the input gradient with the transposed weight. Each row's offset mask is the bitset
  of its valid entries; rows are processed in mask order (``order``) so a tile skips offsets none of its rows use.

``weight`` is [K, Cin, Cout] (any strides: a view of spconv's KRSC [Cout, *k, Cin] weight works uncopied).
Everything accumulates in fp32 and returns the input dtype. Each output row is written by exactly one program
(implicit GEMM) and the weight gradient is split over pair chunks whose fp32 partials are summed in a fixed order,
so the Triton paths use no atomics and are deterministic.
"""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._dispatch import FLOAT_DTYPES, backend_for, check_tensor, interpreting
from ._triton import TunedLauncher, cdiv, direct, next_power_of_2, tl, triton
from ._counters import split_counters
from .split_k import sum_partials_if_last_of

# rows per chunk when the reference materialises gathered inputs ([rows, K * Cin])
_REF_CHUNK_ELEMS = 1 << 24


def check_conv_inputs(x, weight, bias=None):
    """Features [N, Cin] in a float dtype, weight [K, Cin, Cout] and bias [Cout] in its dtype on its device."""
    check_tensor("features", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=3, dtypes=(x.dtype,), device=x.device)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} input channels but features has {x.shape[1]}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device)
        if bias.shape[0] != weight.shape[2]:
            raise ValueError(f"bias has {bias.shape[0]} values but weight has {weight.shape[2]} output channels")


def _accumulate_fp32(x: torch.Tensor) -> bool:
    """CPU matmuls in half precision are slow and round per product: compute in fp32 there."""
    return x.device.type == "cpu" and x.dtype != torch.float32


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32: half-precision CUDA operands keep their speed (fp32 accumulation and output, so a per-offset
    product is not rounded to half before the offsets are summed); anything else is already fp32 here."""
    if a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b)


# ------------------------------------------------------------------------------------ gather-GEMM-scatter


def gather_gemm_scatter(x: torch.Tensor, weight: torch.Tensor, in_idx: torch.Tensor, out_idx: torch.Tensor,
                        counts: list[int], n_out: int, identity_offset: int = -1,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[out_idx[p]] += x[in_idx[p]] @ weight[k(p)]`` (+ ``bias``), one GEMM per kernel offset; y [n_out, Cout].

    x: [N, Cin]; weight: [K, Cin, Cout]; in_idx/out_idx: int64 [P] sorted by offset with ``counts`` (host ints,
    length K). ``identity_offset`` names an offset whose pairs are exactly (i, i) for every row (the centre of a
    submanifold kernel): it becomes a plain GEMM with no gather or scatter. The bias is added to the fp32 sum,
    before the one rounding to x's dtype.
    """
    check_conv_inputs(x, weight, bias)
    if len(counts) != weight.shape[0]:
        raise ValueError(f"counts has {len(counts)} offsets but weight has {weight.shape[0]}")
    fp32 = _accumulate_fp32(x)
    xc = x.float() if fp32 else x
    wc = weight.float() if fp32 else weight
    acc_dtype = torch.float32
    if identity_offset >= 0:
        y = _mm_fp32(xc, wc[identity_offset])
    else:
        y = torch.zeros(n_out, weight.shape[2], dtype=acc_dtype, device=x.device)
    start = 0
    for k, c in enumerate(counts):
        if c and k != identity_offset:
            ii = in_idx[start:start + c]
            y.index_add_(0, out_idx[start:start + c], _mm_fp32(xc.index_select(0, ii), wc[k]))
        start += c
    if bias is not None:
        y += bias.float()
    return y if y.dtype == x.dtype else y.to(x.dtype)


# ------------------------------------------------------------------ planned gather-GEMM-reduce (CPU fast path)
#
# The per-offset gather-GEMM-scatter above spends as long in ``index_add_`` (a sort plus a read-modify-write of the
# output per offset) and in page faults of fresh temporaries as in its GEMMs. The planned path instead, per block
# of destination rows: gathers every pair's source row once into a reused workspace, runs one GEMM per offset into
# a reused product buffer, and sums each destination row's products with ``embedding_bag`` (a prefetching
# gather-reduce: each row written once, its products summed in offset order, so the result does not depend on the
# thread count). The centre offset of a submanifold kernel reads and writes rows in place, with no gather.

# bytes per workspace buffer: bounds the temporaries (and keeps blocks cache-friendly) on large scenes
PLAN_BUDGET_BYTES = 16 << 20


@dataclass
class PlanBlock:
    """Destination rows ``[r0, r1)`` and how to compute them (see ``build_plan``)."""

    r0: int
    r1: int
    # (k, first product row, end product row, first pair in the plan's src/dst, or -1: the block's rows in place)
    segments: list[tuple[int, int, int, int]]
    bag_idx: torch.Tensor  # int64 product row of each pair, ordered by destination row, then offset
    bag_off: torch.Tensor  # int64 [r1 - r0 + 1] CSR offsets of the destination rows into ``bag_idx``
    n_products: int


@dataclass
class ConvPlan:
    """A rulebook direction (destination rows <- source rows per offset) cut into blocks of destination rows."""

    n_rows: int
    kernel_volume: int
    src: torch.Tensor  # int64 [P] source row of each pair (segments index into it)
    dst: torch.Tensor  # int64 [P] destination row of each pair
    blocks: list[PlanBlock]

    def with_offsets_reversed(self) -> "ConvPlan":
        """The same pairs and blocks with offset k read as K-1-k (the plan of a mirrored rulebook's twin)."""
        last = self.kernel_volume - 1
        blocks = [PlanBlock(b.r0, b.r1, [(last - k, z0, z1, g0) for k, z0, z1, g0 in b.segments], b.bag_idx,
                            b.bag_off, b.n_products) for b in self.blocks]
        return ConvPlan(self.n_rows, self.kernel_volume, self.src, self.dst, blocks)


def plan_block_pairs(cin: int, cout: int) -> int:
    """Pairs per block: the largest power of two whose product buffer fits ``PLAN_BUDGET_BYTES`` (>= 4096)."""
    per_pair = 4 * max(cin, cout, 1)
    n = max(4096, PLAN_BUDGET_BYTES // per_pair)
    return 1 << (n.bit_length() - 1)


def build_plan(dst: torch.Tensor, src: torch.Tensor, counts: list[int], n_rows: int, identity_offset: int = -1,
               block_pairs: int = 1 << 30) -> ConvPlan:
    """Plan ``y[dst[p]] += x[src[p]] @ W[k(p)]`` for pairs sorted by offset (``counts`` per offset).

    Blocks are ranges of destination rows with about ``block_pairs`` pairs each. With several blocks the pairs
    are put in (offset, destination row) order — already so for rulebooks built from sorted coordinates, else
    sorted here — so a block's pairs of one offset are one contiguous range. ``identity_offset`` names an offset
    whose pairs are (i, i) for every row: its products are computed from the block's rows in place.
    """
    dev = dst.device
    K = len(counts)
    P = int(sum(counts))
    dst = dst.long()
    src = src.long()
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    if P == 0 or n_rows == 0:
        blocks = [PlanBlock(0, n_rows, [], dst, zero.expand(n_rows + 1), 0)] if n_rows else []
        return ConvPlan(n_rows, K, src, dst, blocks)
    row_off = torch.cat([zero, torch.cumsum(torch.bincount(dst, minlength=n_rows), 0)])
    n_blocks = max(1, min(n_rows, -(-P // block_pairs)))
    starts = [0] + list(itertools.accumulate(counts))
    if n_blocks == 1:
        cuts = [0, n_rows]
        bounds = [[starts[k], starts[k + 1]] for k in range(K)]
    else:
        k_of = torch.repeat_interleave(torch.arange(K, device=dev), torch.tensor(counts, device=dev),
                                       output_size=P)
        key = k_of * n_rows + dst
        if not bool((key[1:] >= key[:-1]).all()):
            order = torch.sort(key, stable=True).indices
            key, dst, src = key[order], dst[order], src[order]
        # row cuts where the cumulative pair count crosses equal shares; then every (offset, block) range at once
        share = torch.arange(1, n_blocks, device=dev, dtype=torch.int64) * P // n_blocks
        inner = torch.searchsorted(row_off, share).tolist()
        cuts = sorted(set([0] + [min(max(c, 1), n_rows - 1) for c in inner] + [n_rows]))
        q = (torch.arange(K, device=dev).unsqueeze(1) * n_rows
             + torch.tensor(cuts, device=dev).unsqueeze(0)).reshape(-1)
        bounds = torch.searchsorted(key, q).view(K, len(cuts)).tolist()
    nb = len(cuts) - 1
    # each block lays out its products offset by offset; pair p of range (a, e) -> product row p - a + z0
    segments: list[list[tuple[int, int, int, int]]] = [[] for _ in range(nb)]
    zfill = [0] * nb
    shifts, lens = [], []
    identity_ranges = []
    for k in range(K):
        for b in range(nb):
            a, e = bounds[k][b], bounds[k][b + 1]
            if e == a:
                continue
            in_place = k == identity_offset and e - a == cuts[b + 1] - cuts[b]
            if in_place:
                identity_ranges.append((a, e, zfill[b] - cuts[b]))
            segments[b].append((k, zfill[b], zfill[b] + e - a, -1 if in_place else a))
            shifts.append(zfill[b] - a)
            lens.append(e - a)
            zfill[b] += e - a
    if nb == 1:
        zpos = torch.arange(P, device=dev)
    else:
        zpos = torch.arange(P, device=dev) + torch.repeat_interleave(
            torch.tensor(shifts, device=dev), torch.tensor(lens, device=dev), output_size=P)
    for a, e, rshift in identity_ranges:
        # in place: row r's product is at z0 + r - r0, whatever order the identity pairs are listed in
        zpos[a:e] = dst[a:e] + rshift
    # destination-row (CSR) order, offsets ascending within a row (a fixed summation order): a counting sort, as
    # a rulebook has at most one pair per (destination, offset) -- a pair's place is its row's start plus the
    # row's pairs in earlier offsets (on the CPU here 2-2.5x faster than a stable sort of the destinations)
    bag_all = torch.empty_like(zpos)
    bag_all[_csr_positions(dst, row_off, starts)] = zpos
    cut_off = row_off[torch.tensor(cuts, device=dev)].tolist()
    blocks = [PlanBlock(cuts[b], cuts[b + 1], segments[b], bag_all[cut_off[b]:cut_off[b + 1]],
                        row_off[cuts[b]:cuts[b + 1] + 1] - cut_off[b], zfill[b]) for b in range(nb)]
    return ConvPlan(n_rows, K, src, dst, blocks)


def _csr_positions(dst: torch.Tensor, row_off: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """int64 [P]: each pair's position in (destination row, offset) order, for pairs grouped by offset (offset k's
    are ``dst[starts[k]:starts[k + 1]]``, each destination at most once per offset) and ``row_off`` the CSR row
    offsets of ``dst``."""
    filled = row_off[:-1].clone()  # next free position of every row
    pos = torch.empty_like(dst)
    ones = torch.ones(max((e - a for a, e in zip(starts, starts[1:])), default=0), dtype=dst.dtype,
                      device=dst.device)
    for a, e in zip(starts, starts[1:]):
        if e > a:
            seg = dst[a:e]
            torch.index_select(filled, 0, seg, out=pos[a:e])
            filled.index_add_(0, seg, ones[:e - a])
    return pos


_workspace = threading.local()


def _buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused flat buffer (per thread, dtype and device): fresh multi-MB temporaries cost a page fault per 4 KiB,
    which at these sizes takes longer than the gather that fills them."""
    store = getattr(_workspace, "bufs", None)
    if store is None:
        store = _workspace.bufs = {}
    key = (name, dtype, device)
    buf = store.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
        store[key] = buf
    return buf[:numel]


def release_workspace() -> None:
    """Free this thread's planned-path buffers (they are otherwise kept for the next call)."""
    _workspace.bufs = {}


def _reduce_rows(out: torch.Tensor | None, blk: PlanBlock, z: torch.Tensor, n_cols: int, dtype, device):
    """Row sums of the block's products; into ``out[r0:r1]`` when the plan has several blocks."""
    if blk.n_products == 0:
        res = torch.zeros(blk.r1 - blk.r0, n_cols, dtype=dtype, device=device)
    else:
        res = F.embedding_bag(blk.bag_idx, z, blk.bag_off, mode="sum", include_last_offset=True)
    if out is None:
        return res
    out[blk.r0:blk.r1] = res
    return out


def planned_conv(x: torch.Tensor, weight: torch.Tensor, plan: ConvPlan,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[r] = sum over the plan's pairs (r <- i, k) of x[i] @ weight[k]`` (+ ``bias``); y [plan.n_rows, Cout].

    x: [N, Cin]; weight: [K, Cin, Cout] (any strides). Same result as ``gather_gemm_scatter`` up to summation
    order (fixed: offset order within a row), computed in fp32 on the CPU for half inputs (the bias too, before
    the one rounding).
    """
    check_conv_inputs(x, weight, bias)
    if plan.kernel_volume != weight.shape[0]:
        raise ValueError(f"plan has {plan.kernel_volume} offsets but weight has {weight.shape[0]}")
    fp32 = _accumulate_fp32(x)
    xc = x.float() if fp32 else x
    wc = weight.float() if fp32 else weight
    cin, cout = weight.shape[1], weight.shape[2]
    dt, dev = xc.dtype, x.device
    if len(plan.blocks) != 1:
        y = torch.empty(plan.n_rows, cout, dtype=dt, device=dev)
    else:
        y = None
    for blk in plan.blocks:
        z = _buffer("z", blk.n_products * cout, dt, dev).view(blk.n_products, cout)
        for k, z0, z1, g0 in blk.segments:
            if g0 < 0:
                a = xc[blk.r0:blk.r1]
            else:  # gathered per segment, so the GEMM reads it from cache
                a = torch.index_select(xc, 0, plan.src[g0:g0 + z1 - z0],
                                       out=_buffer("g", (z1 - z0) * cin, dt, dev).view(z1 - z0, cin))
            torch.mm(a, wc[k], out=z[z0:z1])
        y = _reduce_rows(y, blk, z, cout, dt, dev)
    if y is None:
        y = torch.zeros(0, cout, dtype=dt, device=dev)
    if bias is not None:
        y += bias.to(dt)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def planned_conv_backward(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, plan_t: ConvPlan,
                          need_dx: bool = True, need_dw: bool = True):
    """(dx, dw) of ``planned_conv`` given ``plan_t``, the plan of the transposed rulebook (input rows <- output
    rows). Each block gathers the output gradients of its pairs once and uses them twice: dx = sum dy @ W[k]^T
    (reduced per input row as in the forward) and dW[k] += x[i]^T dy (fp32, blocks in a fixed order)."""
    check_tensor("grad_out", dy, ndim=2, dtypes=(x.dtype,), device=x.device)
    fp32 = _accumulate_fp32(x)
    xc = x.float() if fp32 else x
    dc = dy.float() if fp32 else dy
    wc = weight.float() if fp32 else weight
    K, cin, cout = weight.shape
    dt, dev = xc.dtype, x.device
    dw = torch.zeros(K, cin, cout, dtype=dt, device=dev) if need_dw else None
    dx = None
    if need_dx and len(plan_t.blocks) != 1:
        dx = torch.empty(plan_t.n_rows, cin, dtype=dt, device=dev)
    for blk in plan_t.blocks:
        if need_dx:
            z = _buffer("z", blk.n_products * cin, dt, dev).view(blk.n_products, cin)
        for k, z0, z1, g0 in blk.segments:
            if g0 < 0:
                dk, xk = dc[blk.r0:blk.r1], xc[blk.r0:blk.r1]
            else:  # gathered per segment, so both GEMMs read them from cache
                n = z1 - z0
                dk = torch.index_select(dc, 0, plan_t.src[g0:g0 + n], out=_buffer("g", n * cout, dt, dev).view(n, cout))
                if need_dw:
                    xk = torch.index_select(xc, 0, plan_t.dst[g0:g0 + n],
                                            out=_buffer("x", n * cin, dt, dev).view(n, cin))
            if need_dw:
                dw[k].addmm_(xk.t(), dk)
            if need_dx:
                torch.mm(dk, wc[k].t(), out=z[z0:z1])
        if need_dx:
            dx = _reduce_rows(dx, blk, z, cin, dt, dev)
    if need_dx and dx is None:
        dx = torch.zeros(plan_t.n_rows, cin, dtype=dt, device=dev)
    if dx is not None and dx.dtype != x.dtype:
        dx = dx.to(x.dtype)
    if dw is not None and dw.dtype != x.dtype:
        dw = dw.to(x.dtype)
    return dx, dw


# --------------------------------------------------------------------------------------- implicit GEMM


def offset_masks(pair_map: torch.Tensor) -> torch.Tensor:
    """int64 [R]: bit k set where ``pair_map[r, k] >= 0`` (kernel volumes up to 63; larger ones give -1)."""
    K = pair_map.shape[1]
    if K > 63:
        return torch.full((pair_map.shape[0],), -1, dtype=torch.int64, device=pair_map.device)
    bits = torch.ones(K, dtype=torch.int64, device=pair_map.device) << torch.arange(K, device=pair_map.device)
    return ((pair_map >= 0).long() * bits).sum(1)


def mask_order(masks: torch.Tensor, kernel_volume: int = 63) -> torch.Tensor:
    """Row processing order (int64 [R], the sort's own indices: the kernels read either width, and a conversion is
    one more launch on a host-bound path): rows grouped by offset mask (stable), so tiles see few distinct offsets.
    Masks of up to 31 offsets sort as int32: half the radix passes of int64."""
    keys = masks.to(torch.int32) if kernel_volume <= 31 else masks
    return torch.sort(keys, stable=True).indices


def implicit_gemm(x: torch.Tensor, weight: torch.Tensor, pair_map: torch.Tensor, order: torch.Tensor | None = None,
                  masks: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  reverse_offsets: bool = False) -> torch.Tensor:
    """``y[r] = sum_k x[pair_map[r, k]] @ weight[k]`` over valid entries (+ ``bias``, added to the fp32
    accumulator in the kernel's epilogue); returns y [R, Cout] in x's dtype.

    x: [N, Cin]; weight: [K, Cin, Cout]; pair_map: int32 [R, K] with -1 for no pair. ``order`` (int32 or int64 [R],
    a permutation) and ``masks`` (int64 [R], from ``offset_masks``) only change the Triton kernel's schedule.
    ``reverse_offsets`` uses ``weight[K-1-k]`` for offset k (a mirrored submanifold rulebook's input gradient),
    read through a negative stride rather than a flipped copy.
    """
    check_conv_inputs(x, weight, bias)
    check_tensor("pair_map", pair_map, ndim=2, dtypes=(torch.int32,), device=x.device)
    if pair_map.shape[1] != weight.shape[0]:
        raise ValueError(f"pair_map has {pair_map.shape[1]} offsets but weight has {weight.shape[0]}")
    return implicit_gemm_unchecked(x, weight, pair_map, order, masks, bias, reverse_offsets,
                                   backend_for(x, weight, pair_map) == "triton")


def implicit_gemm_unchecked(x, weight, pair_map, order, masks, bias, reverse_offsets: bool, triton: bool):
    """``implicit_gemm`` without its input checks, on the backend the caller chose: for the sparse convolution
    Function, which validates a layer's inputs once per forward (``kiln.sparse.functional.sparse_conv``); every
    check costs host time on a host-bound backbone (three GEMM calls per layer)."""
    if triton:
        return _implicit_gemm_triton(x, weight, pair_map, order, masks, bias, reverse_offsets)
    return implicit_gemm_ref(x, weight.flip(0) if reverse_offsets else weight, pair_map, bias)


def implicit_gemm_ref(x, weight, pair_map, bias=None):
    R, K = pair_map.shape
    cin, cout = weight.shape[1], weight.shape[2]
    fp32 = _accumulate_fp32(x)
    xc = x.float() if fp32 else x
    wc = (weight.float() if fp32 else weight).reshape(K * cin, cout)
    x_pad = torch.cat([xc, xc.new_zeros(1, cin)])
    pm = pair_map.long()
    pm = torch.where(pm < 0, torch.full_like(pm, x.shape[0]), pm)
    y = torch.empty(R, cout, dtype=torch.float32, device=x.device)
    step = max(1, _REF_CHUNK_ELEMS // max(1, K * cin))
    for s in range(0, R, step):
        y[s:s + step] = _mm_fp32(x_pad[pm[s:s + step]].reshape(-1, K * cin), wc)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


# The weight gradient from compacted pair lists (``compact_pairs``, once per rulebook) or from the dense pair map,
# which reads every (row, offset) while a LiDAR map is 10-22% filled. ``KILN_SPARSE_WGRAD``: "auto" (default) takes
# the lists for fp32 only. On an H100 (scripts/gpu/sparse_host_ab.py, wgrad_sweep.py) the lists made the fp32 weight
# gradient 2.7-4.5x faster (the map path's fp32 runs on FMA: 3xTF32 cannot take operands strided along the
# reduction) and a strided fp32 layer's fwd+bwd 1.8x; in fp16 the GPU gain was small and the compaction's launches
# made the host-bound backbone 6-13% slower.
WGRAD_MODES = ("auto", "map", "lists")
WGRAD_MODE = os.environ.get("KILN_SPARSE_WGRAD", "auto")
if WGRAD_MODE not in WGRAD_MODES:
    raise ValueError(f"KILN_SPARSE_WGRAD must be one of {WGRAD_MODES}, got {WGRAD_MODE!r}")


# "auto" compacts only rulebooks of at least this many rows: a compaction is ~7 launches (~150 µs of host time on
# the device hosts), and below this size the map's extra GPU time hides under the host-bound backbone's host time.
LISTS_MIN_ROWS = 65536


def wgrad_from_lists(dtype: torch.dtype, rows: int | None = None) -> bool:
    """Whether a weight gradient in ``dtype`` over a rulebook of ``rows`` output rows (None: large) should read
    compacted pair lists (``WGRAD_MODE``, ``LISTS_MIN_ROWS``)."""
    if WGRAD_MODE != "auto":
        return WGRAD_MODE == "lists"
    return dtype == torch.float32 and (rows is None or rows >= LISTS_MIN_ROWS)


def compact_pairs(pair_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The valid entries of a pair map [R, K] grouped by offset, with no host sync: (src, rows, offsets) where
    offset k's pairs are ``src[offsets[k]:offsets[k+1]]`` (int32 source rows) and ``rows[...]`` (int32 map rows,
    ascending); offsets is int64 [K + 1] on the device. The buffers are sized for a full map (R * K): the count
    stays on the device, so nothing waits for it."""
    check_tensor("pair_map", pair_map, ndim=2, dtypes=(torch.int32,))
    R, K = pair_map.shape
    dev = pair_map.device
    # one flat scan over the offset-major validity mask gives every valid entry its slot in the offset-grouped
    # lists (a column-wise cumsum of the [R, K] map ran one thread per column on CUDA: 31-46 ms at 150k rows)
    valid_t = (pair_map.t() >= 0).contiguous().view(-1)  # [K * R], offset-major
    slot = torch.cumsum(valid_t, 0, dtype=torch.int32)  # slot[k * R + r]: valid entries up to (k, r), inclusive
    src = torch.empty(R * K, dtype=torch.int32, device=dev)
    rows = torch.empty(R * K, dtype=torch.int32, device=dev)
    if R * K and backend_for(pair_map) == "triton":
        pm = pair_map if pair_map.stride(1) == 1 else pair_map.contiguous()
        offsets = torch.empty(K + 1, dtype=torch.int64, device=dev)  # the kernel writes it (no fill, no copy)
        block = 1024
        direct(_compact_pairs_kernel)[(cdiv(R * K, block),)](pm, slot, src, rows, offsets, R, K,
                                                                     pm.stride(0), BLOCK=block)
        return src, rows, offsets
    offsets = torch.zeros(K + 1, dtype=torch.int64, device=dev)
    if R:
        offsets[1:] = slot.view(K, R)[:, -1]
    if R * K:
        kk, rr = torch.nonzero(pair_map.t() >= 0, as_tuple=True)  # by offset, then row
        src[: kk.numel()] = pair_map[rr, kk]
        rows[: kk.numel()] = rr.int()
    return src, rows, offsets


def weight_grad(x: torch.Tensor, dy: torch.Tensor, pair_map: torch.Tensor,
                lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``dW[k] = sum_r x[pair_map[r, k]]^T dy[r]`` over valid entries: [K, Cin, Cout] in x's dtype (fp32
    accumulation). Driven by the forward pair map (what the forward already holds), so a backward never derives
    pair lists (a ``nonzero`` and a host sync per layer). Rows go in plain order: on an H100 the forward's mask
    order made it slower (two more dependent loads per block, few blocks skipped; scripts/gpu/wgrad_sweep.py).
    ``lists`` (``compact_pairs(pair_map)``) visits only the valid pairs instead. The Triton path returns a view of
    a [Cout, K, Cin] buffer (spconv's weight layout), so a KRSC parameter's gradient needs no copy."""
    check_tensor("features", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("grad_out", dy, ndim=2, dtypes=(x.dtype,), device=x.device)
    check_tensor("pair_map", pair_map, ndim=2, dtypes=(torch.int32,), device=x.device)
    if pair_map.shape[0] != dy.shape[0]:
        raise ValueError(f"pair_map has {pair_map.shape[0]} rows but grad_out has {dy.shape[0]}")
    return weight_grad_unchecked(x, dy, pair_map, lists, backend_for(x, dy, pair_map) == "triton")


def weight_grad_unchecked(x, dy, pair_map, lists, triton: bool):
    """``weight_grad`` without its input checks (see ``implicit_gemm_unchecked``)."""
    if triton:
        return _weight_grad_triton(x, dy, pair_map, lists)
    return weight_grad_ref(x, dy, *pairs_from_map(pair_map))


def weight_grad_ref(x, dy, in_idx, out_idx, counts):
    fp32 = _accumulate_fp32(x)
    xc = x.float() if fp32 else x
    dc = dy.float() if fp32 else dy
    dw = torch.zeros(len(counts), x.shape[1], dy.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for k, c in enumerate(counts):
        if c:
            a = xc.index_select(0, in_idx[start:start + c])
            b = dc.index_select(0, out_idx[start:start + c])
            dw[k] = torch.mm(a.t(), b).float()
        start += c
    return dw.to(x.dtype)


# ------------------------------------------------------------------------------------------- Triton


@triton.jit
def _or_combine(a, b):
    return a | b


@triton.jit
def _implicit_gemm_kernel(X, W, Y, PairMap, Order, Masks, Bias, R, CIN: tl.constexpr, COUT: tl.constexpr,
                          K: tl.constexpr, stride_xm, stride_wk, stride_wc, stride_wn, stride_ym, stride_pm,
                          HAS_ORDER: tl.constexpr, HAS_MASKS: tl.constexpr, HAS_BIAS: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < R
    if HAS_ORDER:
        rows = tl.load(Order + rm, mask=row_ok, other=0).to(tl.int64)
    else:
        rows = rm.to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < COUT
    if HAS_MASKS:
        m = tl.load(Masks + rows, mask=row_ok, other=0)
        tile_mask = tl.reduce(m, 0, _or_combine)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # K and CIN are constexpr: static loops pipeline on the GPU, and Triton's interpreter (under numpy 2.x)
    # cannot iterate a range with runtime bounds
    for k in range(K):
        use = True
        if HAS_MASKS:
            use = ((tile_mask >> k) & 1) != 0
        if use:
            idx = tl.load(PairMap + rows * stride_pm + k, mask=row_ok, other=-1)
            valid = idx >= 0
            src = tl.where(valid, idx, 0).to(tl.int64)
            for c0 in range(0, CIN, BLOCK_K):
                rc = c0 + tl.arange(0, BLOCK_K)
                c_ok = rc < CIN
                a = tl.load(X + src[:, None] * stride_xm + rc[None, :], mask=valid[:, None] & c_ok[None, :],
                            other=0.0)
                b = tl.load(W + k * stride_wk + rc[:, None] * stride_wc + rn[None, :] * stride_wn,
                            mask=c_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc += tl.dot(a, b, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _weight_grad_kernel(X, DY, P, DW, Counters, PairMap, Src, Rows, Offsets, R, CIN: tl.constexpr,
                        COUT: tl.constexpr, N_SPLIT, CHUNK: tl.constexpr, stride_xm, stride_dm, stride_pm, stride_pp,
                        stride_wk, stride_wc, stride_wn, LISTS: tl.constexpr, PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: offset k, a chunk of CHUNK rows of the pair map -- or (LISTS) CHUNK of offset k's compacted
    pairs -- and a [BLOCK_M, BLOCK_N] tile of dW[k]; its fp32 partial goes to P[k * N_SPLIT + chunk]. The tile's
    last program to finish sums its chunks' partials in chunk order into DW[k, c, n] at ``k * stride_wk + c *
    stride_wc + n * stride_wn`` (``sum_partials_if_last_of``: fixed order, so deterministic; no float atomics,
    and no separate sum launch)."""
    pid = tl.program_id(0)
    k = pid // N_SPLIT
    s = pid % N_SPLIT
    rc = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = rc < CIN
    n_ok = rn < COUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if LISTS:
        lo = tl.load(Offsets + k) + s * CHUNK
        hi = tl.load(Offsets + k + 1)
    else:
        lo = s * CHUNK
        hi = R
    if lo < hi:  # LISTS: the grid is sized for full columns; a chunk past its offset's pairs writes nothing
        for i in range(0, CHUNK, BLOCK_K):
            p = lo + i + tl.arange(0, BLOCK_K)
            if LISTS:
                valid = p < hi
                rows = tl.load(Rows + p, mask=valid, other=0).to(tl.int64)
                src = tl.load(Src + p, mask=valid, other=0).to(tl.int64)
            else:
                rows = p.to(tl.int64)
                src = tl.load(PairMap + rows * stride_pm + k, mask=p < hi, other=-1)
                valid = src >= 0
                src = tl.where(valid, src, 0).to(tl.int64)
            a = tl.load(X + src[None, :] * stride_xm + rc[:, None], mask=valid[None, :] & c_ok[:, None], other=0.0)
            b = tl.load(DY + rows[:, None] * stride_dm + rn[None, :], mask=valid[:, None] & n_ok[None, :],
                        other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=PRECISION)
        tl.store(P + pid.to(tl.int64) * stride_pp + rc[:, None] * COUT + rn[None, :], acc,
                 mask=c_ok[:, None] & n_ok[None, :])
    # every program of the tile arrives (also those past an offset's pairs); the partials that exist get summed
    if LISTS:
        n_sum = tl.cdiv(hi - (lo - s * CHUNK), CHUNK)
    else:
        n_sum = N_SPLIT
    tile = (k * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    sum_partials_if_last_of(P + (k * N_SPLIT).to(tl.int64) * stride_pp, DW + k.to(tl.int64) * stride_wk, Counters,
                            tile, rc, rn, c_ok, n_ok, stride_pp, COUT, stride_wc, stride_wn, N_SPLIT, n_sum)


@triton.jit
def _compact_pairs_kernel(PairMap, Slot, Src, Rows, Offsets, R, K, stride_pm, BLOCK: tl.constexpr):
    """Offset-major entry e = k * R + r: a valid pair-map entry (r, k) goes to slot[e] - 1 of the lists (writes
    in list order; the map is read with stride K, from L2). Each offset's last row also writes the running count
    as offsets[k + 1]; entry 0 writes offsets[0] = 0."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = e < R * K
    k = e // R
    r = e - k * R
    v = tl.load(PairMap + r * stride_pm + k, mask=ok, other=-1)
    hit = v >= 0
    last = ok & (r == R - 1)
    count = tl.load(Slot + e, mask=hit | last, other=1).to(tl.int64)
    tl.store(Src + count - 1, v, mask=hit)
    tl.store(Rows + count - 1, r.to(tl.int32), mask=hit)
    tl.store(Offsets + k + 1, count, mask=last)
    tl.store(Offsets + e, tl.zeros_like(count), mask=e == 0)


def _configs():
    # in order of preference: pruning keeps the first few that suit the channel counts
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                                     (128, 128, 32, 8, 3), (32, 64, 32, 4, 2), (128, 64, 64, 8, 3),
                                     (64, 32, 32, 4, 3), (128, 32, 32, 4, 4)]]


def _max_tune() -> int:
    """Configs timed per autotune key (``KILN_SPARSE_TUNE``, default 3). Each candidate is a compile of a kernel
    unrolled over the kernel volume (seconds on the GPU), and a backbone meets a dozen keys per dtype: bounded,
    so a cold machine finishes a benchmark in minutes."""
    return max(1, int(os.environ.get("KILN_SPARSE_TUNE", "3")))


def _prune_fwd(configs, named_args, **kwargs):
    cin, cout = named_args["CIN"], named_args["COUT"]
    keep = [c for c in configs if c.kwargs["BLOCK_N"] <= max(32, next_power_of_2(cout))
            and c.kwargs["BLOCK_K"] <= max(32, next_power_of_2(cin))]
    return (keep or configs[:1])[:_max_tune()]


def _prune_wgrad(configs, named_args, **kwargs):
    cin, cout = named_args["CIN"], named_args["COUT"]
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, next_power_of_2(cin))
            and c.kwargs["BLOCK_N"] <= max(16, next_power_of_2(cout))]
    return (keep or configs[:1])[:_max_tune()]


def _bench(kernel_call, quantiles):
    """Shorter timing than Triton's default (25 ms warm-up, 100 ms of repeats) per candidate."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


_implicit_gemm_tuned = None
_weight_grad_tuned = None


def _tuned():
    global _implicit_gemm_tuned, _weight_grad_tuned
    if _implicit_gemm_tuned is None:
        import triton.testing  # noqa: F401  (for _bench)
        _implicit_gemm_tuned = TunedLauncher(triton.autotune(
            configs=_configs(), key=["CIN", "COUT", "K", "HAS_MASKS", "PRECISION"],
            prune_configs_by={"early_config_prune": _prune_fwd}, do_bench=_bench)(_implicit_gemm_kernel))
        wg = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
              for bm, bn, bk, w, s in [(32, 32, 64, 4, 3), (64, 64, 32, 4, 3), (64, 64, 64, 4, 3),
                                       (16, 16, 64, 2, 3), (32, 64, 64, 4, 3), (64, 32, 64, 4, 3),
                                       (128, 128, 32, 8, 3)]]
        _weight_grad_tuned = TunedLauncher(triton.autotune(
            configs=wg, key=["CIN", "COUT", "CHUNK", "LISTS", "PRECISION"],
            prune_configs_by={"early_config_prune": _prune_wgrad}, do_bench=_bench)(_weight_grad_kernel))
    return _implicit_gemm_tuned, _weight_grad_tuned


def _launch_key(tensors: tuple, flags: dict, *shape) -> tuple:
    """What decides a tuned kernel's config and compiled variant, for ``TunedLauncher``: the autotune key's sizes,
    the dtypes of the kernel's tensor arguments (``tensors``) and the compile-time flags."""
    return (*shape, *[t.dtype for t in tensors], *flags.values())


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, next_power_of_2(max(n, 1))))


def _precision(x: torch.Tensor) -> str:
    """The tl.dot precision of fp32 features: split-operand 3xTF32 on tensor cores, which keeps products to about
    fp32 accuracy (the dropped low*low term is ~2^-22 relative) at several times the speed of FMA ("ieee"), which
    the interpreter keeps; plain TF32 only where torch allows it for matmuls. Half inputs ignore it."""
    if x.dtype != torch.float32:
        return "tf32"
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee" if interpreting() else "tf32x3"


def _upcast(x: torch.Tensor) -> bool:
    """Triton's interpreter multiplies bf16 dot operands wrongly (numpy has no bf16): widen them there."""
    return x.dtype == torch.bfloat16 and interpreting()


def _implicit_gemm_triton(x, weight, pair_map, order, masks, bias=None, reverse_offsets=False):
    R, K = pair_map.shape
    cin, cout = weight.shape[1], weight.shape[2]
    x = x if x.stride(1) == 1 else x.contiguous()
    pair_map = pair_map if pair_map.stride(1) == 1 else pair_map.contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty(R, cout, dtype=x.dtype, device=x.device)
    if R == 0:
        return y
    if x.shape[0] == 0:
        return y.copy_(bias.expand(R, cout)) if bias is not None else y.zero_()
    has_masks = masks is not None and K <= 63
    # reversed offsets: the kernel's W + k * stride_wk walks back from the last offset
    w_base, stride_wk = (weight[K - 1:], -weight.stride(0)) if reverse_offsets else (weight, weight.stride(0))
    args = (x, w_base, y, pair_map, order if order is not None else pair_map, masks if has_masks else pair_map,
            bias if bias is not None else y, R, cin, cout, K, x.stride(0), stride_wk, weight.stride(1),
            weight.stride(2), y.stride(0), pair_map.stride(0))
    flags = dict(HAS_ORDER=order is not None, HAS_MASKS=has_masks, HAS_BIAS=bias is not None, PRECISION=_precision(x),
                 UPCAST=_upcast(x))
    if interpreting():
        bm, bn, bk = 16, _block(cout, hi=32), _block(cin, hi=32)
        grid = (cdiv(R, bm), cdiv(cout, bn))
        _implicit_gemm_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    else:
        kern, _ = _tuned()
        grid = lambda meta: (cdiv(R, meta["BLOCK_M"]), cdiv(cout, meta["BLOCK_N"]))  # noqa: E731
        kern(_launch_key(args[:7], flags, cin, cout, K), grid, *args, **flags)
    return y


def _wgrad_chunk(R: int, K: int) -> int:
    """Rows per weight-gradient program: about two thousand (offset, chunk) programs, in powers of two (a
    compile-time loop bound, so few distinct values)."""
    if interpreting():
        return 64
    per = cdiv(R, max(1, 2048 // K))
    return max(256, min(8192, next_power_of_2(per)))


def _wgrad_lists_chunk(R: int, K: int) -> int:
    """Pairs per weight-gradient program from compacted lists: half the map chunk. Only the programs inside an
    offset's pairs work (a LiDAR map is 10-22% filled; the rest exit at once), so smaller chunks keep the SMs busy;
    on an H100 (nuScenes scale, 16/64 ch, fp16/fp32; scripts/gpu/wgrad_sweep.py) half was best or within 10% of it
    on every rulebook, a quarter lost up to 25% on fp16 submanifold ones."""
    return max(64 if interpreting() else 128, _wgrad_chunk(R, K) // 2)


def _weight_grad_triton(x, dy, pair_map, lists=None):
    R, K = pair_map.shape
    cin, cout = x.shape[1], dy.shape[1]
    x = x if x.stride(1) == 1 else x.contiguous()
    dy = dy if dy.stride(1) == 1 else dy.contiguous()
    pair_map = pair_map if pair_map.stride(1) == 1 else pair_map.contiguous()
    if R == 0 or x.shape[0] == 0:
        return torch.zeros(K, cin, cout, dtype=x.dtype, device=x.device)
    chunk = _wgrad_chunk(R, K) if lists is None else _wgrad_lists_chunk(R, K)
    n_split = cdiv(R, chunk)
    partial = torch.empty(K * n_split, cin, cout, dtype=torch.float32, device=x.device)
    # dW is written in spconv's KRSC layout [Cout, K, Cin] and returned as its [K, Cin, Cout] view: the module's
    # weight gradient is then this buffer reshaped, with no copy
    dw_krsc = torch.empty(cout, K, cin, dtype=x.dtype, device=x.device)
    dw = dw_krsc.permute(1, 2, 0)
    src, rows, offsets = lists if lists is not None else (pair_map, pair_map, pair_map)
    # one arrival counter per dW tile, for the smallest tile a config may take (16 x 16)
    counters = split_counters(x.device, K * cdiv(cin, 16) * cdiv(cout, 16))
    args = (x, dy, partial, dw, counters, pair_map, src, rows, offsets, R, cin, cout, n_split, chunk, x.stride(0),
            dy.stride(0), pair_map.stride(0), partial.stride(0), dw.stride(0), dw.stride(1), dw.stride(2),
            lists is not None)
    # fp32: FMA, not 3xTF32 -- both operands have the rows (the reduction) strided, which tensor-core TF32 cannot
    # take directly (H100, 64 ch: 0.93 ms against 1.16-1.23 ms; scripts/gpu/wgrad_sweep.py --precisions)
    prec = _precision(x)
    flags = dict(PRECISION="ieee" if prec == "tf32x3" else prec, UPCAST=_upcast(x))
    if interpreting():
        bm, bn, bk = _block(cin, hi=32), _block(cout, hi=32), 16
        grid = (K * n_split, cdiv(cin, bm), cdiv(cout, bn))
        _weight_grad_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    else:
        _, kern = _tuned()
        grid = lambda meta: (K * n_split, cdiv(cin, meta["BLOCK_M"]),  # noqa: E731
                             cdiv(cout, meta["BLOCK_N"]))
        kern(_launch_key(args[:9], flags, cin, cout, chunk), grid, *args, **flags)
    return dw


# --------------------------------------------------------------------------------------- doctor check


def _random_rulebook(n_in, n_out, K, device, g):
    """Random pair map with at most one input per (output, offset) and at most one output per (input, offset)."""
    pm = torch.full((n_out, K), -1, dtype=torch.int32, device=device)
    for k in range(K):
        m = min(n_in, n_out)
        rows = torch.randperm(n_out, device=device, generator=g)[: m // 2 + 1]
        srcs = torch.randperm(n_in, device=device, generator=g)[: rows.numel()]
        pm[rows, k] = srcs.int()
    return pm


def pairs_from_map(pair_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(in_idx, out_idx, counts) sorted by offset, from a forward pair map [R, K]."""
    t = pair_map.t()
    k_idx, rows = torch.nonzero(t >= 0, as_tuple=True)
    counts = torch.bincount(k_idx, minlength=pair_map.shape[1]).tolist()
    return t[k_idx, rows].long(), rows, counts


def _check_sparse_gemm(device, dtype, g):
    n_in, n_out, K, cin, cout = 301, 257, 27, 24, 40
    x = torch.randn(n_in, cin, device=device, dtype=dtype, generator=g)
    w = torch.randn(K, cin, cout, device=device, dtype=dtype, generator=g) / 8
    pm = _random_rulebook(n_in, n_out, K, device, g)
    in_idx, out_idx, counts = pairs_from_map(pm)
    masks = offset_masks(pm)
    # reference in fp32 so the check measures the kernel's rounding, not the reference's
    ref = implicit_gemm_ref(x.float(), w.float(), pm)
    got = implicit_gemm(x, w, pm, mask_order(masks, K), masks)
    got2 = gather_gemm_scatter(x, w, in_idx, out_idx, counts, n_out)
    dy = torch.randn(n_out, cout, device=device, dtype=dtype, generator=g)
    dw_ref = weight_grad_ref(x.float(), dy.float(), in_idx, out_idx, counts)
    dw = weight_grad(x, dy, pm)

    def err(a, b):
        return ((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    # one output element sums up to K*Cin products: allow for the final rounding only (relative to the max)
    return max(err(got, ref), err(got2, ref), err(dw, dw_ref)), backend_for(x)


DOCTOR_CHECKS = {"sparse_conv_gemm": _check_sparse_gemm}
