"""Split-K for decode-sized GEMMs, shared by every GEMM of the kernel layer (weight-only, INT8, FP8).

A decode step multiplies a few rows by a wide weight: with output tiles alone a 2048-wide layer makes 16-32
programs, an eighth of an H100's SMs, so a memory-bound GEMM streams its weight through a fraction of the
machine. Splitting K over extra programs fills the SMs; each split writes an fp32 partial (scales applied: they
are linear), and the partials are summed in split order (deterministic), the bias added once and the sum rounded once
to the output dtype: by one small kernel (``sum_partials``), or inside the GEMM by the last split program of each
output tile to finish (``sum_partials_if_last``: an arrival counter per tile, no extra launch).
"""

from __future__ import annotations

import torch

from ._counters import last_to_arrive, rearm
from ._dispatch import interpreting, pdl_launch_args
from ._triton import cdiv, direct, next_power_of_2, tl, triton


def split_k_for(M: int, N: int, K: int, block_m: int, block_n: int, block_k: int, sms: int,
                programs_per_sm: int | None = None, min_k_tiles: int = 4) -> int:
    """Split K over extra programs where the output tiles alone leave SMs idle, keeping at least ``min_k_tiles`` K
    tiles per split (at most 16 splits): decode-sized calls (M <= 16) aim at about two programs per SM by default (a
    GEMV only streams the weight); batched decode (M <= 64, one row tile of tl.dot) at about one per SM (a
    4096-wide layer has only 64 column tiles of 64). Larger M fills the GPU with output tiles alone. A kernel
    whose programs are light (the int4 GEMV) asks for more per SM."""
    if M > 64:
        return 1
    if programs_per_sm is None:
        programs_per_sm = 2 if M <= 16 else 1
    tiles = cdiv(M, block_m) * cdiv(N, block_n)
    want = max(1, (programs_per_sm * sms) // max(1, tiles))
    return max(1, min(want, K // (min_k_tiles * block_k), 16))


def iters_per_split(K: int, block_k: int, split: int) -> tuple[int, int]:
    """(K tiles per split, number of non-empty splits) for a requested split count."""
    tiles = cdiv(K, block_k)
    per = cdiv(tiles, max(1, split))
    return per, cdiv(tiles, per)


@triton.jit
def _split_k_sum_kernel(P, B, Y, N, SPLIT, stride_ps, stride_pm, stride_ym, HAS_BIAS: tl.constexpr,
                        BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    """y[m, :] = sum over splits (in split order: deterministic) of the fp32 partials + bias, rounded once."""
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    if PDL:  # the partials are the previous kernel's output
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for sp in range(0, SPLIT):
        acc += tl.load(P + sp * stride_ps + m * stride_pm + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + m * stride_ym + offs, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def sum_partials_in_order(ptrs, mask, stride_ps, SPLIT: tl.constexpr):
    """The fp32 partials at ``ptrs + s * stride_ps`` summed in split order (deterministic), read through L2 (``.cg``:
    other SMs wrote them). Called by a tile's last program to arrive (``last_to_arrive``), which then applies its own
    epilogue and re-arms the counter."""
    acc = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    for sp in tl.static_range(1, SPLIT):
        acc += tl.load(ptrs + sp * stride_ps, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def sum_partials_if_last(P, Y, B, Counters, tile, offs_m, offs_n, m_mask, n_mask, stride_ps, stride_pm, stride_ym,
                         SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The split-K sum inside the GEMM: called by every split program of an output tile after it stored its fp32
    partial (``P`` [SPLIT, M, N]). The tile's last program to arrive (``Counters[tile]`` counts arrivals) sums the
    partials in split order, adds the bias and rounds once into ``Y``, as ``sum_partials`` would (the same
    arithmetic, so the same bits), then re-arms the counter to 0. A decode step then needs no separate sum kernel
    per split linear, and no launch gap before it."""
    if last_to_arrive(Counters + tile, SPLIT):
        mask = m_mask[:, None] & n_mask[None, :]
        acc = sum_partials_in_order(P + offs_m[:, None].to(tl.int64) * stride_pm + offs_n[None, :], mask, stride_ps,
                                    SPLIT)
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=mask)
        rearm(Counters + tile)


@triton.jit
def sum_partials_if_last_of(P, Y, Counters, tile, offs_m, offs_n, m_mask, n_mask, stride_ps, stride_pm, stride_ym,
                            stride_yn, arrivals, n_sum):
    """``sum_partials_if_last`` with runtime counts (the sparse weight gradient, whose split count is a launch
    argument): ``arrivals`` programs report for the tile, and the last sums the first ``n_sum`` partials in split
    order (splits past an offset's pairs wrote nothing; ``n_sum`` = 0 stores zeros) and rounds once into ``Y``
    (element (m, n) at ``m * stride_ym + n * stride_yn``: the weight gradient lands in the parameter's layout).
    The counter is an integer arrival count, not a float atomic: the sum's order is fixed and the bits are
    reproducible."""
    if last_to_arrive(Counters + tile, arrivals):
        mask = m_mask[:, None] & n_mask[None, :]
        ptrs = P + offs_m[:, None].to(tl.int64) * stride_pm + offs_n[None, :]
        acc = tl.zeros([offs_m.shape[0], offs_n.shape[0]], dtype=tl.float32)
        for sp in range(0, n_sum):
            acc += tl.load(ptrs + sp * stride_ps, mask=mask, other=0.0, cache_modifier=".cg")  # L2: other SMs
        tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn,
                 acc.to(Y.dtype.element_ty), mask=mask)
        rearm(Counters + tile)


def sum_partials(partials: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                 pdl: bool = False) -> torch.Tensor:
    """``out`` [M, N] = sum over dim 0 of the fp32 ``partials`` [S, M, N] (in order) + ``bias``, one launch.
    ``pdl``: launched as a programmatic dependent of the kernel that wrote the partials
    (``_dispatch.pdl_launch_args``)."""
    if out.stride(-1) != 1 or partials.stride(-1) != 1:
        raise ValueError("partials and out must be contiguous in their last dim")
    split, M, N = partials.shape
    bn = min(1024, next_power_of_2(N)) if not interpreting() else 32
    direct(_split_k_sum_kernel)[(M, cdiv(N, bn))](
        partials, bias if bias is not None else partials, out, N, split, partials.stride(0), partials.stride(1),
        out.stride(0), HAS_BIAS=bias is not None, BLOCK_N=bn, num_warps=4, **pdl_launch_args(pdl))
    return out
