"""INT8 GEMMs with INT32 accumulation and a float rescale (kiln.quant's real INT8 layers; later the LLM linears).

Layouts follow ``nn.Linear``: ``a`` is the activation [M, K] and ``b`` the weight [N, K] (K contiguous in both,
the layout Hopper's int8 tensor cores want), so ``out = a @ b.T``.

- ``int8_gemm_i32(a, b)`` -> int32 [M, N], the exact integer product.
- ``int8_gemm(a, b, a_scale, b_scale, bias=None, out_dtype=fp32)`` ->
  ``(acc.float() * a_scale[:, None] * b_scale[None, :] + bias)`` in ``out_dtype``; ``a_scale`` is per tensor
  (one value) or per row [M] (per token), ``b_scale`` per tensor or per output channel [N].

On CUDA a Triton kernel (autotuned over a few tile shapes, keyed on M/N/K, 128x256x128 among them) runs; on the
CPU the reference computes the product exactly: int8 x int8 products summed in float64 are exact integers as
long as ``K * 128 * 128 < 2**53``, which every K allowed here satisfies. K is limited to 131071 so the int32
accumulator cannot overflow. K is zero-padded to a multiple of 16 for the kernel's vector loads.
``KILN_GEMM_TUNE=0`` skips autotuning and uses a fixed tile shape chosen by M (quicker first calls).
"""

from __future__ import annotations

import os

import torch

from ._dispatch import FLOAT_DTYPES, backend_for, check_tensor, interpreting
from ._triton import triton, tl

MAX_K = 131071  # 131071 * 128 * 128 < 2**31: the int32 accumulator cannot overflow
K_ALIGN = 16


def _check(a, b, a_scale=None, b_scale=None, bias=None, out_dtype=None, scaled=False):
    check_tensor("a", a, ndim=2, dtypes=(torch.int8,))
    check_tensor("b", b, ndim=2, dtypes=(torch.int8,), device=a.device)
    M, K = a.shape
    if b.shape[1] != K:
        raise ValueError(f"b.shape[1] ({b.shape[1]}) must equal a.shape[1] ({K}): b is [N, K] like nn.Linear.weight")
    if K > MAX_K:
        raise ValueError(f"K={K} exceeds {MAX_K}: the int32 accumulator could overflow")
    if not scaled:
        return
    N = b.shape[0]
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
def _int8_gemm_body(A, B, C, SA, SB, BIAS, M, N, K, n_iter,
                    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                    SA_PER_ROW: tl.constexpr, SB_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                    RAW: tl.constexpr, EVEN_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-tiles share the B tiles they stream, for L2 reuse
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % size_m)
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrap rows/cols past the edge onto valid ones (their results are masked at the store): no load masks.
    # No multiple_of/max_contiguous hints: wrapped offsets are not contiguous, and with an odd K the rows are
    # not 16-byte aligned, so such hints made the GPU issue misaligned vector loads.
    rm = offs_m % M
    rn = offs_n % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rn[None, :].to(tl.int64) * stride_bn + rk[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for i in range(0, n_iter):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - i * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

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
def _int8_gemm_kernel(A, B, C, SA, SB, BIAS, M, N, K,
                      stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                      SA_PER_ROW: tl.constexpr, SB_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                      RAW: tl.constexpr, EVEN_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    _int8_gemm_body(A, B, C, SA, SB, BIAS, M, N, K, tl.cdiv(K, BLOCK_K),
                    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                    SA_PER_ROW, SB_PER_COL, HAS_BIAS, RAW, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def _int8_gemm_kernel_interp(A, B, C, SA, SB, BIAS, M, N, K,
                             stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                             SA_PER_ROW: tl.constexpr, SB_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                             RAW: tl.constexpr, EVEN_K: tl.constexpr, K_ITERS: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr):
    # Triton 3.6's interpreter cannot run range() over a runtime scalar with numpy 2, so the trip count
    # arrives as a constexpr here; the GPU entry above computes it at run time.
    _int8_gemm_body(A, B, C, SA, SB, BIAS, M, N, K, K_ITERS,
                    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
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

_heuristics = getattr(triton, "heuristics", None)
if _heuristics is not None:
    _int8_gemm_tuned = triton.autotune(configs=GPU_CONFIGS, key=["M", "N", "K"])(
        _heuristics({"EVEN_K": lambda meta: meta["K"] % meta["BLOCK_K"] == 0})(_int8_gemm_kernel))
else:  # stand-in triton (not installed): never launched
    _int8_gemm_tuned = _int8_gemm_kernel


def _k_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def _int8_gemm_triton(a, b, a_scale, b_scale, bias, out_dtype):
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
    args = (a, b, c, sa, sb, bias_t, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            c.stride(0), c.stride(1))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if interpreting():
        cfg = INTERPRET_CONFIG
        _int8_gemm_kernel_interp[grid](*args, **flags, EVEN_K=K % cfg["BLOCK_K"] == 0,
                                K_ITERS=triton.cdiv(K, cfg["BLOCK_K"]), **cfg)
    elif os.environ.get("KILN_GEMM_TUNE", "1") == "0":  # fixed tiles: no autotuning (quick GPU test runs)
        cfg = fixed_config(M)
        _int8_gemm_kernel[grid](*args, **flags, EVEN_K=K % cfg.kwargs["BLOCK_K"] == 0, **cfg.kwargs,
                                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        _int8_gemm_tuned[grid](*args, **flags)
    return c


def fixed_config(M: int):
    """The tile shape used without autotuning (``KILN_GEMM_TUNE=0``): by M, from GPU_CONFIGS."""
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
