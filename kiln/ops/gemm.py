"""INT8 GEMMs with INT32 accumulation and a float rescale (kiln.quant's real INT8 layers; later the LLM linears).

Layouts follow ``nn.Linear``: ``a`` is the activation [M, K] and ``b`` the weight [N, K] (K contiguous in both,
the layout Hopper's int8 tensor cores want), so ``out = a @ b.T``.

- ``int8_gemm_i32(a, b)`` -> int32 [M, N], the exact integer product.
- ``int8_gemm(a, b, a_scale, b_scale, bias=None, out_dtype=fp32)`` ->
  ``(acc.float() * a_scale[:, None] * b_scale[None, :] + bias)`` in ``out_dtype``; ``a_scale`` is per tensor
  (one value) or per row [M] (per token), ``b_scale`` per tensor or per output channel [N].

On CUDA a Triton kernel runs with a tile shape chosen by M from the H100/H200 sweeps; on the
CPU the reference computes the product exactly: int8 x int8 products summed in float64 are exact integers as
long as ``K * 128 * 128 < 2**53``, which every K allowed here satisfies. K is limited to 131071 so the int32
accumulator cannot overflow. K is zero-padded to a multiple of 16 for the kernel's vector loads.
Autotuning is opt-in (``KILN_GEMM_TUNE=1``: once per power-of-two bucket of M, for benchmarks): in a serving
engine every new bucket tuned in the request path (1.8-4.9 s for one step of a 1B engine on an H100), which made
batch-64 quantized decoding look 2x slower than bf16 (bench/RESULTS.md, session 8).
Decode-sized calls (M <= 64) whose output tiles leave SMs idle take fixed tiles and split K over extra programs
(``kiln.ops.split_k``, shared with the weight-only and FP8 GEMMs): at M = 64 a 2048-wide layer has only 16
column tiles of 128, so without it the weight streamed through an eighth of an H100.
"""

from __future__ import annotations

import os

import torch

from ._dispatch import FLOAT_DTYPES, backend_for, check_tensor, interpreting
from ._triton import TunedLauncher, cdiv, next_power_of_2, tl, triton
from .activation import silu_and_mul_ref, silu_mul_f32
from .split_k import iters_per_split, split_k_for, sum_partials

MAX_K = 131071  # 131071 * 128 * 128 < 2**31: the int32 accumulator cannot overflow
K_ALIGN = 16


def _check(a, b, a_scale=None, b_scale=None, bias=None, out_dtype=None, scaled=False):
    _check_operands(a, b, torch.int8)
    K = a.shape[1]
    if K > MAX_K:
        raise ValueError(f"K={K} exceeds {MAX_K}: the int32 accumulator could overflow")
    if scaled:
        _check_epilogue(a, b, a_scale, b_scale, bias, out_dtype)


def _check_operands(a, b, qdtype):
    """a [M, K] and b [N, K] of ``qdtype`` on one device (b laid out like nn.Linear.weight)."""
    check_tensor("a", a, ndim=2, dtypes=(qdtype,))
    check_tensor("b", b, ndim=2, dtypes=(qdtype,), device=a.device)
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"b.shape[1] ({b.shape[1]}) must equal a.shape[1] ({a.shape[1]}): b is [N, K] like "
                         "nn.Linear.weight")


def _check_epilogue(a, b, a_scale, b_scale, bias, out_dtype):
    """The rescale's inputs, shared by the INT8 and FP8 GEMMs: per-tensor or per-row / per-column fp32 scales,
    an optional [N] float bias and a float output dtype."""
    M, N = a.shape[0], b.shape[0]
    check_tensor("a_scale", a_scale, dtypes=(torch.float32,), device=a.device)
    check_tensor("b_scale", b_scale, dtypes=(torch.float32,), device=a.device)
    if a_scale.numel() not in (1, M):
        raise ValueError(f"a_scale must have 1 (per tensor) or M={M} (per row) values, got {a_scale.numel()}")
    if b_scale.numel() not in (1, N):
        raise ValueError(f"b_scale must have 1 (per tensor) or N={N} (per channel) values, got {b_scale.numel()}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=a.device)
        if bias.shape[0] != N:
            raise ValueError(f"bias has {bias.shape[0]} values but the output has N={N} columns")
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be one of float32/float16/bfloat16, got {out_dtype}")


def int8_gemm_i32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` of int8 a [M, K] and int8 b [N, K] as int32 [M, N]."""
    _check(a, b)
    if backend_for(a, b) == "triton":
        return _int8_gemm_triton(a, b, None, None, None, torch.int32)
    return int8_gemm_i32_ref(a, b)


def int8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(a @ b.T) * a_scale[:, None] * b_scale[None, :] + bias`` with exact int32 accumulation.

    a: int8 [M, K]; b: int8 [N, K]; a_scale: fp32, 1 or [M] values; b_scale: fp32, 1 or [N] values;
    bias: [N] float or None. Returns [M, N] in ``out_dtype`` (the rescale is done in fp32, rounded once).
    """
    _check(a, b, a_scale, b_scale, bias, out_dtype, scaled=True)
    if backend_for(a, b, a_scale, b_scale) == "triton":
        return _int8_gemm_triton(a, b, a_scale, b_scale, bias, out_dtype)
    return int8_gemm_ref(a, b, a_scale, b_scale, bias, out_dtype)


# ------------------------------------------------------------------------------------------------ reference
def int8_gemm_i32_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The specification: float64 products of int8 values and their sums are exact integers here."""
    return (a.to(torch.float64) @ b.to(torch.float64).T).to(torch.int32)


def int8_gemm_ref(a, b, a_scale, b_scale, bias=None, out_dtype=torch.float32):
    acc = int8_gemm_i32_ref(a, b).float()
    out = acc * a_scale.reshape(-1, 1).float() * b_scale.reshape(1, -1).float()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# ------------------------------------------------------------------------------------------------ Triton
@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row-tiles share the B tiles they stream, for L2 reuse."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (tile // group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + ((tile % group) % size_m), (tile % group) // size_m


@triton.jit
def _int8_tile(A, B, C, SA, SB, BIAS, M, N, K, n_iter, k_tile0, pid_m, pid_n,
               stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
               SA_PER_ROW: tl.constexpr, SB_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
               RAW: tl.constexpr, EVEN_K: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] output tile over ``n_iter`` K tiles from K tile ``k_tile0`` (a split of K, or all
    of it): the int32 K loop, then the raw store or the fused rescale."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrap rows/cols past the edge onto valid ones (their results are masked at the store): no load masks.
    # No multiple_of/max_contiguous hints: wrapped offsets are not contiguous, and with an odd K the rows are
    # not 16-byte aligned, so such hints made the GPU issue misaligned vector loads.
    rm = offs_m % M
    rn = offs_n % N
    k_start = k_tile0 * BLOCK_K
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm[:, None].to(tl.int64) * stride_am + (k_start + rk)[None, :] * stride_ak
    b_ptrs = B + rn[None, :].to(tl.int64) * stride_bn + (k_start + rk)[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for i in range(0, n_iter):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k_start - i * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    _int8_epilogue(C, SA, SB, BIAS, M, N, acc, offs_m, offs_n, stride_cm, stride_cn,
                   SA_PER_ROW, SB_PER_COL, HAS_BIAS, RAW)


@triton.jit
def _int8_epilogue(C, SA, SB, BIAS, M, N, acc, offs_m, offs_n, stride_cm, stride_cn,
                   SA_PER_ROW: tl.constexpr, SB_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                   RAW: tl.constexpr):
    """Store the int32 tile raw, or rescaled (per-row x per-column scales, + bias) in C's dtype."""
    rm = offs_m % M
    rn = offs_n % N
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    if RAW:
        tl.store(c_ptrs, acc, mask=mask)
    else:
        if SA_PER_ROW:
            sa = tl.load(SA + rm)[:, None]
        else:
            sa = tl.load(SA)
        if SB_PER_COL:
            sb = tl.load(SB + rn)[None, :]
        else:
            sb = tl.load(SB)
        out = acc.to(tl.float32) * sa * sb
        if HAS_BIAS:
            out = out + tl.load(BIAS + rn).to(tl.float32)[None, :]
        tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _int8_gemm_body(A, B, C, SA, SB, BIAS, M, N, K, n_iter,
                    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_cs,
                    SA_PER_ROW: tl.constexpr, SB_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                    RAW: tl.constexpr, EVEN_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    """Grid (output tiles, K splits): split s takes ``n_iter`` K tiles from tile ``s * n_iter`` and writes its
    fp32 partial at ``C + s * stride_cs`` (one split: C itself)."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    _int8_tile(A, B, C + split.to(tl.int64) * stride_cs, SA, SB, BIAS, M, N, K, n_iter, split * n_iter,
               pid_m, pid_n,
               stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
               SA_PER_ROW, SB_PER_COL, HAS_BIAS, RAW, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _int8_gemm_tma_body(a_desc, b_desc, C, SA, SB, BIAS, M, N, num_tiles, n_iter, stride_cm, stride_cn,
                        SA_PER_ROW: tl.constexpr, SB_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                        RAW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Persistent schedule (one program per SM walking the tiles in grouped order) with operand tiles brought
    by TMA: the copy engine fills shared memory (zero-filled past the edges, so no masks and no K padding in the
    loop) while the warps only issue wgmma; ``flatten`` overlaps the next tile's loads with this epilogue.
    On an H100 this beat the one-tile-per-program kernel at 8192^3 (1,157 vs 1,107 TOP/s) and 4096^3."""
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(n_iter):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _int8_epilogue(C, SA, SB, BIAS, M, N, acc, offs_m, offs_n, stride_cm, stride_cn,
                       SA_PER_ROW, SB_PER_COL, HAS_BIAS, RAW)


@triton.jit
def _int8_gemm_tma_kernel(a_desc, b_desc, C, SA, SB, BIAS, M, N, K, stride_cm, stride_cn,
                          SA_PER_ROW: tl.constexpr, SB_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                          RAW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    _int8_gemm_tma_body(a_desc, b_desc, C, SA, SB, BIAS, M, N,
                        tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), stride_cm, stride_cn,
                        SA_PER_ROW, SB_PER_COL, HAS_BIAS, RAW, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def _int8_gemm_tma_kernel_interp(a_desc, b_desc, C, SA, SB, BIAS, M, N, K, stride_cm, stride_cn,
                                 SA_PER_ROW: tl.constexpr, SB_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 RAW: tl.constexpr, NUM_TILES: tl.constexpr, K_ITERS: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # trip counts as constexprs for the interpreter (see _int8_gemm_kernel_interp)
    _int8_gemm_tma_body(a_desc, b_desc, C, SA, SB, BIAS, M, N, NUM_TILES, K_ITERS, stride_cm, stride_cn,
                        SA_PER_ROW, SB_PER_COL, HAS_BIAS, RAW, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def _int8_gemm_kernel(A, B, C, SA, SB, BIAS, M, N, K, k_per_split,
                      stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_cs,
                      SA_PER_ROW: tl.constexpr, SB_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                      RAW: tl.constexpr, EVEN_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    # k_per_split: K itself without a split (so autotuned tiles need no host-side trip count)
    _int8_gemm_body(A, B, C, SA, SB, BIAS, M, N, K, tl.cdiv(k_per_split, BLOCK_K),
                    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_cs,
                    SA_PER_ROW, SB_PER_COL, HAS_BIAS, RAW, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def _int8_gemm_kernel_interp(A, B, C, SA, SB, BIAS, M, N, K,
                             stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_cs,
                             SA_PER_ROW: tl.constexpr, SB_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                             RAW: tl.constexpr, EVEN_K: tl.constexpr, K_ITERS: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr):
    # Triton 3.6's interpreter cannot run range() over a runtime scalar with numpy 2, so the trip count
    # arrives as a constexpr here; the GPU entry above computes it at run time.
    _int8_gemm_body(A, B, C, SA, SB, BIAS, M, N, K, K_ITERS,
                    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_cs,
                    SA_PER_ROW, SB_PER_COL, HAS_BIAS, RAW, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


def _cfg(bm, bn, bk, group, stages, warps):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_stages=stages, num_warps=warps)


# Tile shapes tried on the GPU, chosen per (M, N, K). 128x256x128 reached 1.6x bf16 on an H200 at 8192^3;
# the narrow-M ones serve decode-like GEMMs (M <= 32) where B streaming dominates.
GPU_CONFIGS = [
    _cfg(128, 256, 128, 16, 3, 8),  # best of bench/int8_gemm_sweep.py on an H200 at 8192^3: 1,126 TOP/s
    _cfg(128, 256, 128, 8, 3, 8),
    _cfg(256, 128, 128, 8, 3, 8),
    _cfg(128, 128, 128, 8, 4, 8),
    _cfg(128, 128, 64, 8, 4, 4),
    _cfg(64, 128, 128, 8, 4, 4),
    _cfg(64, 64, 256, 8, 3, 4),
    _cfg(16, 128, 256, 1, 3, 4),
    _cfg(16, 64, 256, 1, 4, 4),
]
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}



def _set_tma_blocks(nargs):
    """Autotune pre-hook: the host-side TMA descriptors' box shape is the config's tile shape."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _tma_cfg(bm, bn, bk, group, stages, warps):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_stages=stages, num_warps=warps, pre_hook=_set_tma_blocks)


# The persistent TMA schedule serves M >= TMA_MIN_M (bench/int8_gemm_sweep.py, H100, 2026-11-26: 256x128x128
# reached 1,157 TOP/s = 1.58x bf16 at 8192^3; 128x256 tiles need more shared memory than Hopper has with it).
TMA_MIN_M = 128
TMA_CONFIGS = [
    _tma_cfg(256, 128, 128, 8, 3, 8),
    _tma_cfg(128, 128, 128, 8, 4, 4),
    _tma_cfg(128, 128, 128, 8, 3, 8),
    _tma_cfg(128, 256, 64, 8, 3, 8),
]
INTERPRET_TMA_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}

_heuristics = getattr(triton, "heuristics", None)
if _heuristics is not None:
    _int8_gemm_tuned = TunedLauncher(triton.autotune(configs=GPU_CONFIGS, key=["M", "N", "K"])(
        _heuristics({"EVEN_K": lambda meta: meta["K"] % meta["BLOCK_K"] == 0})(_int8_gemm_kernel)))
    _int8_gemm_tma_tuned = TunedLauncher(triton.autotune(configs=TMA_CONFIGS, key=["M", "N", "K"])(
        _int8_gemm_tma_kernel), pre_hook=_set_tma_blocks)
else:  # stand-in triton (not installed): never launched
    _int8_gemm_tuned = _int8_gemm_kernel
    _int8_gemm_tma_tuned = _int8_gemm_tma_kernel


def autotune() -> bool:
    """``KILN_GEMM_TUNE=1``: autotune the INT8 / FP8 GEMM tiles instead of taking the fixed ones (see the module
    docstring)."""
    return os.environ.get("KILN_GEMM_TUNE", "0") == "1"


def _tune_key(M: int, N: int, K: int, c: torch.Tensor, flags: dict) -> tuple:
    """A tuned GEMM's config is shared by every M up to the next power of two: tiles tuned at one M serve its
    neighbours, and an engine's prefill steps (a different M nearly every step) would otherwise autotune in the
    request path each time (seconds per new M)."""
    return (next_power_of_2(M), N, K, c.dtype, *flags.values())


def _tensor_descriptor():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # an older Triton: the pointer kernel serves every shape
        return None
    return TensorDescriptor


def _tma_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """TMA needs Hopper or newer, 16-byte aligned bases and row strides (K is padded to 16 already)."""
    if _tensor_descriptor() is None or a.shape[0] < TMA_MIN_M:
        return False
    if a.device.type == "cuda" and torch.cuda.get_device_capability(a.device) < (9, 0):
        return False
    return all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in (a, b))


def _k_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def _int8_gemm_triton(a, b, a_scale, b_scale, bias, out_dtype, schedule: str = "auto", split_k: int | None = None):
    """Launch: ``schedule`` "auto" picks the persistent TMA kernel for M >= TMA_MIN_M on Hopper, else the
    one-tile-per-program kernel; "tma" / "tile" force one (tests run both under the interpreter). Decode-sized
    rescaled calls split K where the tiles leave SMs idle (``split_k`` overrides the count; tests)."""
    raw = a_scale is None
    M, K = a.shape
    N = b.shape[0]
    a, b = _k_major(a), _k_major(b)
    if K % K_ALIGN:  # pad K with zeros (they add nothing) so every row starts 16-byte aligned
        pad = K_ALIGN - K % K_ALIGN
        a = torch.nn.functional.pad(a, (0, pad))
        b = torch.nn.functional.pad(b, (0, pad))
        K += pad
    c = torch.empty((M, N), device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_() if raw else int8_gemm_ref(a, b, a_scale, b_scale, bias, out_dtype)
    dummy = c if raw else a_scale
    sa = dummy if raw else a_scale.reshape(-1).contiguous()
    sb = dummy if raw else b_scale.reshape(-1).contiguous()
    flags = dict(SA_PER_ROW=(not raw) and sa.numel() > 1,
                 SB_PER_COL=(not raw) and sb.numel() > 1, HAS_BIAS=bias is not None, RAW=raw)
    bias_t = bias.contiguous() if bias is not None else sa
    strides = (a.stride(0), a.stride(1), b.stride(0), b.stride(1))

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    split = 1
    if not raw and schedule != "tma":
        tile = INTERPRET_CONFIG if interpreting() else fixed_config(M).kwargs
        if split_k is None and M <= 64:
            split_k = split_k_for(M, N, K, tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"], _num_sms(a.device))
        if split_k is not None and split_k > 1:
            per, split = iters_per_split(K, tile["BLOCK_K"], split_k)
    if split > 1:  # fp32 partials (scales applied, no bias), then one ordered sum + bias + rounding
        part = torch.empty((split, M, N), device=a.device, dtype=torch.float32)
        even = K % tile["BLOCK_K"] == 0 and cdiv(K, tile["BLOCK_K"]) % per == 0
        sflags = dict(flags, HAS_BIAS=False, EVEN_K=even)
        cs = (part.stride(1), part.stride(2), part.stride(0))
        tiles = (cdiv(M, tile["BLOCK_M"]) * cdiv(N, tile["BLOCK_N"]), split)
        if interpreting():
            _int8_gemm_kernel_interp[tiles](a, b, part, sa, sb, sa, M, N, K, *strides, *cs, **sflags, K_ITERS=per,
                                            **tile)
        else:
            cfg = fixed_config(M)
            _int8_gemm_kernel[tiles](a, b, part, sa, sb, sa, M, N, K, per * tile["BLOCK_K"], *strides, *cs,
                                     **sflags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return sum_partials(part, bias, c)
    cs = (c.stride(0), c.stride(1), 0)
    if schedule == "tma" or (schedule == "auto" and not interpreting() and _tma_ok(a, b)):
        _launch_tma(a, b, c, sa, sb, bias_t, M, N, K, flags)
    elif interpreting():
        cfg = INTERPRET_CONFIG
        _int8_gemm_kernel_interp[grid](a, b, c, sa, sb, bias_t, M, N, K, *strides, *cs, **flags,
                                       EVEN_K=K % cfg["BLOCK_K"] == 0, K_ITERS=cdiv(K, cfg["BLOCK_K"]), **cfg)
    elif not autotune():
        cfg = fixed_config(M)
        _int8_gemm_kernel[grid](a, b, c, sa, sb, bias_t, M, N, K, K, *strides, *cs, **flags,
                                EVEN_K=K % cfg.kwargs["BLOCK_K"] == 0, **cfg.kwargs,
                                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        _int8_gemm_tuned(_tune_key(M, N, K, c, flags), grid, a, b, c, sa, sb, bias_t, M, N, K, K, *strides, *cs,
                         **flags)
    return c


def _launch_tma(a, b, c, sa, sb, bias_t, M, N, K, flags):
    TensorDescriptor = _tensor_descriptor()
    a, b = (t if t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 else t.contiguous() for t in (a, b))
    if interpreting():
        cfg = INTERPRET_TMA_CONFIG
    elif not autotune():
        # 256x128 tiles only where C's rows are 16-aligned: otherwise the epilogue's store layout needs more
        # shared memory than Hopper has (seen on an H100 with N = 1003 and 257); autotuning skips it there too
        cfg = TMA_CONFIGS[0 if M >= 256 and N % 16 == 0 else 1]
    else:
        cfg = None
    # placeholder box shapes; the chosen config's pre-hook (or the fixed config below) sets the real ones
    a_desc = TensorDescriptor.from_tensor(a, [16, 32])
    b_desc = TensorDescriptor.from_tensor(b, [32, 32])
    n_sm = _num_sms(a.device)

    def grid(meta):
        return (min(n_sm, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)

    args = (a_desc, b_desc, c, sa, sb, bias_t, M, N, K, c.stride(0), c.stride(1))
    if cfg is None:
        _int8_gemm_tma_tuned(_tune_key(M, N, K, c, flags), grid, *args, **flags)
        return
    meta = cfg.kwargs if isinstance(cfg, triton.Config) else cfg
    _set_tma_blocks({"a_desc": a_desc, "b_desc": b_desc, **meta})
    if interpreting():
        tiles = cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])
        _int8_gemm_tma_kernel_interp[grid](*args, **flags, NUM_TILES=tiles, K_ITERS=cdiv(K, meta["BLOCK_K"]),
                                           **meta)
    else:
        _int8_gemm_tma_kernel[grid](*args, **flags, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs, so the persistent loop walks several tiles each


def fixed_config(M: int):
    """The tile shape used without autotuning (the default): by M, from GPU_CONFIGS."""
    if M <= 16:
        return GPU_CONFIGS[8]
    if M <= 64:
        return GPU_CONFIGS[5]
    return GPU_CONFIGS[0]


# ------------------------------------------------------------------------------------------------ doctor
def _check_int8_gemm(device, dtype, g):
    M, N, K = 37, 45, 83
    a = torch.randint(-128, 128, (M, K), device=device, dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (N, K), device=device, dtype=torch.int8, generator=g)
    sa = torch.rand(M, device=device, generator=g) * 0.01 + 1e-3
    sb = torch.rand(N, device=device, generator=g) * 0.01 + 1e-3
    bias = torch.randn(N, device=device, generator=g).to(dtype)
    acc = int8_gemm_i32(a, b)
    exact = torch.equal(acc.cpu(), (a.cpu().long() @ b.cpu().long().T).int())
    out = int8_gemm(a, b, sa, sb, bias, out_dtype=dtype)
    ref = int8_gemm_ref(a, b, sa, sb, bias, dtype)
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()
    return (err if exact else float("inf")), backend_for(a)


DOCTOR_CHECKS = {"int8_gemm": _check_int8_gemm}


# ================================================================================================ W8A8 / FP8
# Activation-quantized linears (kiln.quant.llm's SmoothQuant W8A8 and FP8 modes) on top of the GEMMs here:
#
# - ``quantize_activation(x, dtype, smooth=None, static_scale=None)`` -> (q [M, K], scale fp32 [M]): one scale
#   per row (dynamic per token; ``static_scale`` gives a calibrated per-tensor one instead), int8 (narrow range,
#   round half away from zero) or fp8 e4m3 (saturated at +-448, round to nearest even as the hardware cast does).
#   ``smooth`` [K] multiplies x first: SmoothQuant's run-time smoother, fused into the same pass over x.
# - ``w8a8_linear``: per-token int8 activations x per-channel int8 weights through ``int8_gemm`` (INT32
#   accumulation, per-row x per-column rescale epilogue); no second INT8 GEMM exists.
# - ``fp8_gemm`` / ``fp8_linear``: e4m3 x e4m3 ``tl.dot`` with fp32 accumulation (Ada/Hopper tensor cores,
#   compute capability >= 8.9) and the same rescale epilogue; reference = dequantize + fp32 matmul.
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
ACT_QUANT_DTYPES = (torch.int8, FP8_DTYPE)
_SCALE_EPS = 1e-12  # an all-zero row gets a tiny scale (quantizes to zeros) instead of a division by zero


def fp8_supported(device: torch.device | str | None = None) -> bool:
    """True where FP8 GEMMs can run: the CPU (reference path) and CUDA cards of compute capability >= 8.9."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                           else "cpu")
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _qmax(dtype: torch.dtype) -> float:
    return INT8_MAX if dtype == torch.int8 else FP8_MAX


def _check_act(x, dtype, smooth, static_scale):
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    if dtype not in ACT_QUANT_DTYPES:
        raise ValueError(f"activation quantization dtype must be int8 or float8_e4m3fn, got {dtype}")
    if smooth is not None:
        check_tensor("smooth", smooth, ndim=1, dtypes=(torch.float32,))
        if smooth.shape[0] != x.shape[1]:  # before the device check: the same error on every device
            raise ValueError(f"smooth has {smooth.shape[0]} values but x has K={x.shape[1]} columns")
        check_tensor("smooth", smooth, device=x.device)
    if static_scale is not None:
        check_tensor("static_scale", static_scale, dtypes=(torch.float32,), device=x.device)
        if static_scale.numel() != 1:
            raise ValueError(f"static_scale is one per-tensor value, got {static_scale.numel()} values")


def quantize_activation(x: torch.Tensor, dtype: torch.dtype = torch.int8, smooth: torch.Tensor | None = None,
                        static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (q [M, K] int8 or float8_e4m3fn, scale fp32 [M]) with ``x * smooth ~ q * scale[:, None]``.

    Dynamic per token (``scale = amax(|row|) / qmax``) unless ``static_scale`` (one fp32 value) is given."""
    _check_act(x, dtype, smooth, static_scale)
    if backend_for(x) == "triton":
        return _quant_act_triton(x, dtype, smooth, static_scale)
    return quantize_activation_ref(x, dtype, smooth, static_scale)


def silu_and_mul_quantize(x: torch.Tensor, dtype: torch.dtype = torch.int8,
                          smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_activation(silu_and_mul(x), dtype, smooth)`` in one launch: x [M, 2I] = [gate | up] (a fused
    gate/up projection's output) -> (q [M, I], scale fp32 [M]). The quantizer computes silu(gate) * up, rounded to
    x's dtype as ``silu_and_mul`` returns it, where it would have read that op's output: the W8A8 / FP8 down
    projection then costs one launch before its GEMM, not two. Dynamic per token only."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    if x.shape[1] % 2:
        raise ValueError(f"x's last dim must be even ([gate | up]), got shape {tuple(x.shape)}")
    _check_act(x[:, : x.shape[1] // 2], dtype, smooth, None)
    if backend_for(x) == "triton":
        return _quant_act_triton(x, dtype, smooth, None, glu=True)
    return quantize_activation_ref(silu_and_mul_ref(x), dtype, smooth)


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties away from zero (the kernels' int8 rounding)."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def quantize_activation_ref(x, dtype=torch.int8, smooth=None, static_scale=None):
    """The specification (also the CPU path): fp32 math, one reciprocal per row, then round / saturate."""
    xs = x.float() if smooth is None else x.float() * smooth.float()
    qmax = _qmax(dtype)
    if static_scale is None:
        scale = xs.abs().amax(dim=1).clamp_min(_SCALE_EPS) / qmax
    else:
        scale = static_scale.reshape(1).float().clamp_min(_SCALE_EPS / qmax).expand(x.shape[0]).contiguous()
    v = (xs * (1.0 / scale)[:, None]).clamp(-qmax, qmax)
    q = round_half_away(v).to(torch.int8) if dtype == torch.int8 else v.to(FP8_DTYPE)
    return q, scale


@triton.jit
def round_e4m3(v):
    """fp32 values already clamped to +-448 -> the nearest e4m3 value (ties to even), still fp32.

    Only the interpreter path uses it: Triton 3.6's interpreter rounds fp32 -> fp8 casts without carrying a
    mantissa overflow into the exponent (31.2 became 16.0); exact e4m3 values then cast correctly. The GPU's
    own cast (cvt.rn.satfinite) rounds the same way."""
    a = tl.abs(v)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)  # subnormals share the step of the smallest normal binade: 2^-9
    step = tl.exp2((e - 3).to(tl.float32))
    t = a / step
    f = tl.floor(t)
    d = t - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) > 0.5
    r = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f) * step
    return tl.where(v < 0, -r, r)


@triton.jit
def cast_to_qdtype(v, QDT: tl.constexpr, IS_FP8: tl.constexpr, MANUAL_FP8: tl.constexpr):
    """fp32 v (already divided by its scale) -> int8 (round half away, clamp 127) or e4m3 (saturate at 448)."""
    if IS_FP8:
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        if MANUAL_FP8:
            v = round_e4m3(v)
        return v.to(QDT)
    else:
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        r = tl.floor(tl.abs(v) + 0.5)
        return tl.where(v < 0, -r, r).to(tl.int8)


@triton.jit
def _act_values(x_row, kk, K, stride_xk, GLU: tl.constexpr):
    """The row's activations at columns ``kk`` as fp32 (0 past K); with ``GLU`` the row is [gate | up] (2K wide)
    and the values are silu(gate) * up rounded to x's dtype, ``silu_and_mul``'s output."""
    if GLU:
        g = tl.load(x_row + kk * stride_xk, mask=kk < K, other=0.0).to(tl.float32)
        u = tl.load(x_row + (K + kk) * stride_xk, mask=kk < K, other=0.0).to(tl.float32)
        dt = x_row.dtype.element_ty
        return silu_mul_f32(g, u, dt).to(dt).to(tl.float32)
    return tl.load(x_row + kk * stride_xk, mask=kk < K, other=0.0).to(tl.float32)


@triton.jit
def _quant_act_kernel(X, SMOOTH, SSCALE, Q, S, K, stride_xm, stride_xk, stride_qm,
                      HAS_SMOOTH: tl.constexpr, STATIC: tl.constexpr, IS_FP8: tl.constexpr,
                      MANUAL_FP8: tl.constexpr, QMAX: tl.constexpr, BLOCK_K: tl.constexpr, GLU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    offs = tl.arange(0, BLOCK_K)
    if STATIC:
        scale = tl.maximum(tl.load(SSCALE), 1e-12 / QMAX)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs
            v = _act_values(x_row, kk, K, stride_xk, GLU)
            if HAS_SMOOTH:
                v = v * tl.load(SMOOTH + kk, mask=kk < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.maximum(tl.max(amax, 0), 1e-12) / QMAX
    inv = 1.0 / scale
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs
        v = _act_values(x_row, kk, K, stride_xk, GLU)
        if HAS_SMOOTH:
            v = v * tl.load(SMOOTH + kk, mask=kk < K, other=0.0)
        q = cast_to_qdtype(v * inv, Q.dtype.element_ty, IS_FP8, MANUAL_FP8)
        tl.store(Q + row * stride_qm + kk, q, mask=kk < K)
    tl.store(S + row, scale)


def _quant_act_triton(x, dtype, smooth, static_scale, out=None, glu: bool = False):
    """Launch one program per row; ``out`` (tests pass a poisoned buffer) receives q. ``glu``: x is [gate | up]
    and the row quantized is silu(gate) * up."""
    M, K = x.shape
    K = K // 2 if glu else K
    q = out if out is not None else torch.empty(M, K, device=x.device, dtype=dtype)
    scale = torch.empty(M, device=x.device, dtype=torch.float32)
    if M == 0:
        return q, scale
    # the interpreter's cost is per tile op, not per element: wide tiles (tests still cover the K tail and loop)
    block_k = min(64 if interpreting() else 1024, max(16, next_power_of_2(K)))
    dummy = scale
    _quant_act_kernel[(M,)](x, smooth if smooth is not None else dummy,
                            static_scale.reshape(1) if static_scale is not None else dummy, q, scale, K,
                            x.stride(0), x.stride(1), q.stride(0), HAS_SMOOTH=smooth is not None,
                            STATIC=static_scale is not None, IS_FP8=dtype == FP8_DTYPE,
                            MANUAL_FP8=interpreting(), QMAX=_qmax(dtype), BLOCK_K=block_k, GLU=glu,
                            num_warps=4 if K <= 4096 else 8)
    return q, scale


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                smooth: torch.Tensor | None = None) -> torch.Tensor:
    """SmoothQuant W8A8: x [..., K] float -> per-token int8 (after ``x * smooth``) -> ``int8_gemm`` with the
    int8 weight [N, K] and its per-channel (or per-tensor) fp32 scale -> [..., N] in x's dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    q, s = quantize_activation(x2, torch.int8, smooth)
    y = int8_gemm(q, qweight, s, w_scale, bias, out_dtype=x.dtype)
    return y.view(*x.shape[:-1], qweight.shape[0])


def w8a8_linear_ref(x, qweight, w_scale, bias=None, smooth=None):
    """The specification: quantize the activation as above, dequantize both operands, fp32 matmul."""
    q, s = quantize_activation_ref(x.reshape(-1, x.shape[-1]), torch.int8, smooth)
    w = qweight.float() * w_scale.float().reshape(-1, 1)
    y = (q.float() * s[:, None]) @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], qweight.shape[0])


# ------------------------------------------------------------------------------------------------ FP8 GEMM
def _check_fp8(a, b, a_scale, b_scale, bias, out_dtype):
    _check_operands(a, b, FP8_DTYPE)
    _check_epilogue(a, b, a_scale, b_scale, bias, out_dtype)
    if a.is_cuda and not fp8_supported(a.device):
        raise ValueError(f"FP8 GEMMs need compute capability >= 8.9 (Ada/Hopper); {a.device} has "
                         f"{torch.cuda.get_device_capability(a.device)}")


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(a @ b.T) * a_scale[:, None] * b_scale[None, :] + bias``: a e4m3 [M, K], b e4m3 [N, K], fp32
    accumulation; a_scale 1 or [M] values, b_scale 1 or [N] (fp32) -> [M, N] in ``out_dtype``."""
    _check_fp8(a, b, a_scale, b_scale, bias, out_dtype)
    if backend_for(a, b, a_scale, b_scale) == "triton":
        return _fp8_gemm_triton(a, b, a_scale, b_scale, bias, out_dtype)
    return fp8_gemm_ref(a, b, a_scale, b_scale, bias, out_dtype)


def fp8_gemm_ref(a, b, a_scale, b_scale, bias=None, out_dtype=torch.float32):
    """The specification: e4m3 -> fp32 (exact), fp32 matmul, per-row x per-column rescale, rounded once."""
    out = (a.float() @ b.float().T) * a_scale.reshape(-1, 1).float() * b_scale.reshape(1, -1).float()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
               act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 W8A8: x [..., K] float -> e4m3 (dynamic per token, or the static per-tensor ``act_scale``) ->
    ``fp8_gemm`` with the e4m3 weight [N, K] and its per-channel / per-tensor scale -> [..., N] in x's dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    K = x.shape[-1]
    q, s = quantize_activation(x.reshape(-1, K), FP8_DTYPE, static_scale=act_scale)
    return fp8_gemm(q, qweight, s, w_scale, bias, out_dtype=x.dtype).view(*x.shape[:-1], qweight.shape[0])


def fp8_linear_ref(x, qweight, w_scale, bias=None, act_scale=None):
    q, s = quantize_activation_ref(x.reshape(-1, x.shape[-1]), FP8_DTYPE, static_scale=act_scale)
    return fp8_gemm_ref(q, qweight, s, w_scale, bias, x.dtype).view(*x.shape[:-1], qweight.shape[0])


@triton.jit
def _fp8_gemm_kernel(A, B, C, SA, SB, BIAS, M, N, K, k_per_split, stride_am, stride_bn, stride_cm, stride_cs,
                     SA_PER_ROW: tl.constexpr, SB_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                     UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """Grid (output tiles, K splits): split s covers K [s * k_per_split, (s + 1) * k_per_split) and writes at
    ``C + s * stride_cs`` (one split: k_per_split = K, C itself)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    k_lo = split * k_per_split
    C += split.to(tl.int64) * stride_cs
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n  # grouped ordering for L2 reuse of the weight tiles, as in the int8 kernel
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % size_m)
    pid_n = (pid % group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # rows/cols past the edge wrap onto valid ones; the store masks them
    rn = offs_n % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm[:, None].to(tl.int64) * stride_am + (k_lo + rk)[None, :]
    b_ptrs = B + rn[None, :].to(tl.int64) * stride_bn + (k_lo + rk)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        k_ok = k_lo + k0 + rk < K
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:  # structure check on devices without fp8 dot (never on the real fp8 path)
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if SA_PER_ROW:
        sa = tl.load(SA + rm)[:, None]
    else:
        sa = tl.load(SA)
    if SB_PER_COL:
        sb = tl.load(SB + rn)[None, :]
    else:
        sb = tl.load(SB)
    out = acc * sa * sb
    if HAS_BIAS:
        out = out + tl.load(BIAS + rn).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :], out.to(C.dtype.element_ty), mask=mask)


FP8_GPU_CONFIGS = [
    _cfg(128, 256, 128, 8, 3, 8),
    _cfg(128, 128, 128, 8, 4, 8),
    _cfg(64, 128, 128, 8, 4, 4),
    _cfg(64, 64, 128, 8, 4, 4),
    _cfg(16, 128, 128, 1, 4, 4),
    _cfg(16, 64, 256, 1, 4, 4),
]
FP8_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}

if _heuristics is not None:
    _fp8_gemm_tuned = TunedLauncher(triton.autotune(configs=FP8_GPU_CONFIGS, key=["M", "N", "K"])(_fp8_gemm_kernel))
else:
    _fp8_gemm_tuned = _fp8_gemm_kernel


def fp8_fixed_config(M: int):
    """Tiles without autotuning (the default), by M."""
    return FP8_GPU_CONFIGS[4] if M <= 16 else FP8_GPU_CONFIGS[2] if M <= 64 else FP8_GPU_CONFIGS[0]


def _fp8_gemm_triton(a, b, a_scale, b_scale, bias, out_dtype, out=None, upcast: bool = False,
                     split_k: int | None = None):
    """Launch; ``out`` [M, N] (tests pass a poisoned buffer); ``upcast`` multiplies in fp32 (structure tests);
    decode-sized calls split K as the INT8 GEMM does (``split_k`` overrides the count)."""
    M, K = a.shape
    N = b.shape[0]
    a, b = _k_major(a), _k_major(b)
    c = out if out is not None else torch.empty((M, N), device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return c
    if K == 0:
        c.copy_(fp8_gemm_ref(a, b, a_scale, b_scale, bias, out_dtype))
        return c
    sa, sb = a_scale.reshape(-1).contiguous(), b_scale.reshape(-1).contiguous()
    args = (a, b, c, sa, sb, bias.contiguous() if bias is not None else sa, M, N, K, K, a.stride(0), b.stride(0),
            c.stride(0), 0)
    flags = dict(SA_PER_ROW=sa.numel() > 1, SB_PER_COL=sb.numel() > 1, HAS_BIAS=bias is not None, UPCAST=upcast)

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    tile = FP8_INTERPRET_CONFIG if interpreting() else fp8_fixed_config(M).kwargs
    if split_k is None and M <= 64:
        split_k = split_k_for(M, N, K, tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"], _num_sms(a.device))
    split = iters_per_split(K, tile["BLOCK_K"], split_k)[1] if split_k is not None and split_k > 1 else 1
    if split > 1:  # fp32 partials (scales applied, no bias), then one ordered sum + bias + rounding
        per = iters_per_split(K, tile["BLOCK_K"], split_k)[0]
        part = torch.empty((split, M, N), device=a.device, dtype=torch.float32)
        sargs = (a, b, part, sa, sb, sa, M, N, K, per * tile["BLOCK_K"], a.stride(0), b.stride(0), part.stride(1),
                 part.stride(0))
        tiles = (cdiv(M, tile["BLOCK_M"]) * cdiv(N, tile["BLOCK_N"]), split)
        if interpreting():
            _fp8_gemm_kernel[tiles](*sargs, **dict(flags, HAS_BIAS=False), **tile)
        else:
            cfg = fp8_fixed_config(M)
            _fp8_gemm_kernel[tiles](*sargs, **dict(flags, HAS_BIAS=False), **cfg.kwargs, num_warps=cfg.num_warps,
                                    num_stages=cfg.num_stages)
        return sum_partials(part, bias, c)
    if interpreting():
        _fp8_gemm_kernel[grid](*args, **flags, **FP8_INTERPRET_CONFIG)
    elif not autotune():
        cfg = fp8_fixed_config(M)
        _fp8_gemm_kernel[grid](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        _fp8_gemm_tuned(_tune_key(M, N, K, c, flags), grid, *args, **flags)
    return c


def _check_w8a8(device, dtype, g):
    M, N, K = 5, 45, 83
    x = torch.randn(M, K, device=device, generator=g).to(dtype)
    q = torch.randint(-127, 128, (N, K), device=device, dtype=torch.int8, generator=g)
    s = torch.rand(N, device=device, generator=g) * 0.01 + 1e-3
    sm = torch.rand(K, device=device, generator=g) + 0.5
    return _rel_err(w8a8_linear(x, q, s, None, sm), w8a8_linear_ref(x, q, s, None, sm)), backend_for(x)


def _check_fp8_linear(device, dtype, g):
    if not fp8_supported(device):
        return 0.0, "skipped (no fp8 on this card)"
    M, N, K = 5, 45, 96
    x = torch.randn(M, K, device=device, generator=g).to(dtype)
    w = (torch.randn(N, K, device=device, generator=g) * 4).to(FP8_DTYPE)
    s = torch.rand(N, device=device, generator=g) * 0.01 + 1e-3
    return _rel_err(fp8_linear(x, w, s), fp8_linear_ref(x, w, s)), backend_for(x)


def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


DOCTOR_CHECKS.update({"w8a8_linear": _check_w8a8, "fp8_linear": _check_fp8_linear})
