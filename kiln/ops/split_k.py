"""Split-K for decode-sized GEMMs, shared by every GEMM of the kernel layer (weight-only, INT8, FP8).

A decode step multiplies a few rows by a wide weight: with output tiles alone a 2048-wide layer makes 16-32
programs, an eighth of an H100's SMs, so a memory-bound GEMM streams its weight through a fraction of the
machine. Splitting K over extra programs fills the SMs; each split writes an fp32 partial (scales applied: they
are linear) and one small kernel sums the partials in split order (deterministic, no atomics), adds the bias once
and rounds once to the output dtype.
"""

from __future__ import annotations

import torch

from ._dispatch import interpreting, pdl_launch_args
from ._triton import direct, triton, tl


def split_k_for(M: int, N: int, K: int, block_m: int, block_n: int, block_k: int, sms: int) -> int:
    """Split K over extra programs where the output tiles alone leave SMs idle, keeping at least four K tiles per
    split: decode-sized calls (M <= 16) aim at about two programs per SM (a GEMV only streams the weight);
    batched decode (M <= 64, one row tile of tl.dot) at about one per SM (a 4096-wide layer has only 64 column
    tiles of 64). Larger M fills the GPU with output tiles alone."""
    if M > 64:
        return 1
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    want = max(1, ((2 if M <= 16 else 1) * sms) // max(1, tiles))
    return max(1, min(want, K // (4 * block_k), 16))


def iters_per_split(K: int, block_k: int, split: int) -> tuple[int, int]:
    """(K tiles per split, number of non-empty splits) for a requested split count."""
    tiles = triton.cdiv(K, block_k)
    per = triton.cdiv(tiles, max(1, split))
    return per, triton.cdiv(tiles, per)


@triton.jit
def _split_k_sum_kernel(P, B, Y, RowOffsets, N, SPLIT, CHUNK, stride_ps, stride_pm, stride_ym, HAS_BIAS: tl.constexpr,
                        HAS_ROW_OFFSETS: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    """y[m, :] = sum over splits (in split order: deterministic) of the fp32 partials + bias, rounded once. With
    row offsets, row m sums only its first cdiv(offsets[m + 1] - offsets[m], CHUNK) splits (the others were
    never written)."""
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    if PDL:  # the partials are the previous kernel's output
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    n_split = SPLIT
    if HAS_ROW_OFFSETS:
        n_split = tl.cdiv(tl.load(RowOffsets + m + 1) - tl.load(RowOffsets + m), CHUNK)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for sp in range(0, n_split):
        acc += tl.load(P + sp * stride_ps + m * stride_pm + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + m * stride_ym + offs, acc.to(Y.dtype.element_ty), mask=mask)


def sum_partials(partials: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                 row_offsets: torch.Tensor | None = None, chunk: int = 1, pdl: bool = False) -> torch.Tensor:
    """``out`` [M, N] = sum over dim 0 of the fp32 ``partials`` [S, M, N] (in order) + ``bias``, one launch.

    ``row_offsets`` (int [M + 1] on the device) and ``chunk``: row m's work was ``row_offsets[m + 1] -
    row_offsets[m]`` items split into chunks of ``chunk``, so only its first cdiv(items, chunk) partials exist
    (the sparse weight gradient from compacted pair lists). ``pdl``: launched as a programmatic dependent of the
    kernel that wrote the partials (``_dispatch.pdl_launch_args``)."""
    if out.stride(-1) != 1 or partials.stride(-1) != 1:
        raise ValueError("partials and out must be contiguous in their last dim")
    split, M, N = partials.shape
    bn = min(1024, triton.next_power_of_2(N)) if not interpreting() else 32
    direct(_split_k_sum_kernel)[(M, triton.cdiv(N, bn))](
        partials, bias if bias is not None else partials, out, row_offsets if row_offsets is not None else partials,
        N, split, chunk, partials.stride(0), partials.stride(1), out.stride(0), HAS_BIAS=bias is not None,
        HAS_ROW_OFFSETS=row_offsets is not None, BLOCK_N=bn, num_warps=4, **pdl_launch_args(pdl))
    return out
