"""Skinny GEMM (M <= 16 rows, the decode linears) with optional fused prologues; cuBLAS for everything else.

``linear(x, weight, bias)`` is ``F.linear``. On CUDA in fp16/bf16 with at most ``MAX_M`` rows it runs a Triton
kernel built for batch-1/few-row decode, where cuBLAS reaches only 15-45% of the copy bandwidth on the small
Llama matrices: the grid splits N finely enough for at least two CTAs per SM, each CTA reads its [BLOCK_N, K]
slice of the weight exactly once in 16-byte vectors (K contiguous, tiles of 8K elements, the next tile's load
issued before the current one is reduced), accumulates in fp32 and rounds once, like cuBLAS. Larger M, CPU and
fp32 go to ``F.linear``.

Two prologues fold the op that feeds a decode linear into the GEMV, saving a launch each (per CTA the prologue is
recomputed on the activations, which are a few KB and sit in L2):

- ``silu_mul_linear(gate_up, weight)`` = ``F.linear(silu_and_mul(gate_up), weight)`` (the down projection);
- ``rms_norm_linear(x, norm_weight, eps, weight, bias, residual)`` = ``F.linear(rms_norm(x, ...), weight)`` (the
  qkv and gate_up projections; with ``residual`` it also returns ``x + residual`` like ``rms_norm``).

Both keep Hugging Face's 16-bit rounding points (silu rounded before the product, the normalised value rounded
before the weight multiply), so bf16 greedy decoding follows the unfused ops.

Switches: ``KILN_GEMV=off`` sends every call to the unfused ops and cuBLAS (end-to-end A/B timing;
``cublas_only()`` does so for a block, as the engine does for prefill steps);
programmatic dependent launch (``_dispatch.pdl_enabled``, on by default on sm_90+) lets each CTA load its first
weight tile before it waits for the previous kernel: the weight stream starts under the previous kernel's tail.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch
import torch.nn.functional as F

from ._dispatch import backend_for, check_same, check_tensor, interpreting, pdl_launch_args
from ._triton import cdiv, next_power_of_2, tl, triton
from .activation import silu_mul_f32
from .norm import residual_sum, rms_normalize

MAX_M = 16
# Measured on an H200 (2026-11-26, scripts/gpu/decode_gemv_bench.py, CUDA-graph chains at M=1): the Triton GEMV
# beats cuBLAS on narrow outputs (qkv 5.4 vs 6.0 us, o_proj 4.9 vs 6.0, down 11.1 vs 13.2 on the 1B shape; 15.7 vs
# 16.5, 10.8 vs 12.4, 30.4 vs 31.0 on 8B) and loses on wide ones (gate_up 25.3 vs 18.1, lm_head 156 vs 127), so
# wide outputs stay on cuBLAS. The fused RMSNorm prologue paid at K = 2048 (6.9 vs 8.0 us) and lost at K = 4096
# (27.4 vs 17.8); the fused SiLU prologue lost at both sizes measured (inner 8192: 14.8 vs 14.0; 14336: 38 vs 33).
MAX_GEMV_N = 8192
MAX_FUSED_NORM_K = 2048
MAX_FUSED_SILU_K = 4096
GEMV_DTYPES = (torch.float16, torch.bfloat16)
TILE_ELEMS = 8192          # weight elements per CTA per step: 16 KB in 16-bit, 64 per thread at 4 warps
PROLOGUE_NONE, PROLOGUE_SILU_MUL, PROLOGUE_RMS_NORM = 0, 1, 2


def gemv_enabled() -> bool:
    """On by default (``KILN_GEMV=off`` sends every call to cuBLAS and the unfused ops). On an H100 (session 7) batch-1
    decode on the Llama-3.1-8B shape gained 1.5-3 points of the memory roofline with it (77.3% -> 78.8-80.5%,
    alternating runs; 1B within noise), and its GPU tests pass. Prefill steps run under ``cublas_only()``: a prefix-cache hit leaves a prefill of a few rows,
    which through the GEMV took 19 ms against 15-16 ms on cuBLAS (scripts/gpu/ttft_probe.py)."""
    v = os.environ.get("KILN_GEMV", "on").lower()
    if v not in ("on", "off", "1", "0"):
        raise ValueError(f"KILN_GEMV must be 'on' or 'off', got {v!r}")
    return v in ("on", "1") and not _CUBLAS_ONLY.get()


_CUBLAS_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("kiln_gemv_cublas_only", default=False)


@contextlib.contextmanager
def cublas_only():
    """Inside this block every linear goes to cuBLAS and the unfused ops, whatever its row count. The engine runs
    prefill steps in it: the GEMV is built for decode steps (one row per sequence), while a prefill with few new
    rows (a prefix-cache hit) is faster on cuBLAS and would compile kernel variants on the request path."""
    token = _CUBLAS_ONLY.set(True)
    try:
        yield
    finally:
        _CUBLAS_ONLY.reset(token)


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_sized(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """True for a decode step's input (1 to ``MAX_M`` rows of ``x [..., K]``) on the Triton path with the GEMVs
    enabled: the one test every decode-only kernel choice (this GEMV, the weight-only epilogues) makes."""
    m = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    return 0 < m <= MAX_M and gemv_enabled() and backend_for(x, *others) == "triton"


def use_gemv(x: torch.Tensor, weight: torch.Tensor, k_in: int | None = None) -> bool:
    """True when ``x [..., K]`` times ``weight [N, K]`` goes to the Triton GEMV (small M, CUDA, 16-bit)."""
    if x.dtype not in GEMV_DTYPES or weight.dtype != x.dtype or x.dim() < 1:
        return False
    k = x.shape[-1] if k_in is None else k_in
    if k == 0 or weight.dim() != 2 or weight.shape[1] != k or weight.shape[0] == 0:
        return False
    if weight.shape[0] > MAX_GEMV_N:
        return False
    return decode_sized(x, weight)


# ------------------------------------------------------------------------------------------------ kernel
@triton.jit
def _gemv_kernel(X, W, B, Y, R, RO, NW, M, N, K, stride_xm, stride_xk, stride_wn, stride_ym, stride_rm,
                 stride_rom, eps,
                 PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 USE_DOT: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    dt = Y.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    # the first weight tile goes out before anything else (and, with PDL, before the previous kernel is done)
    if EVEN_K:
        w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
    else:
        w = tl.load(w_ptrs, mask=n_mask[:, None] & (offs_k[None, :] < K), other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x_rows = X + offs_m[:, None].to(tl.int64) * stride_xm
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PROLOGUE == 2:
        # RMSNorm statistics of each row (residual sum rounded to the dtype first, as torch's 16-bit add does)
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mk = m_mask[:, None] & (kk[None, :] < K)
            s = tl.load(x_rows + kk[None, :] * stride_xk, mask=mk, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(R + offs_m[:, None].to(tl.int64) * stride_rm + kk[None, :], mask=mk, other=0.0)
                s = residual_sum(s, r, dt).to(tl.float32)
            ss += tl.sum(s * s, axis=1)
        rstd = tl.rsqrt(ss / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # CUDA-core paths keep per-element partial sums and reduce across K once, after the loop (no per-step
    # cross-warp reduction between one tile's loads and the next)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        # prefetch the next tile while this one is reduced (fully masked past the end: no traffic)
        w_next = tl.load(w_ptrs + (k0 + BLOCK_K), mask=n_mask[:, None] & ((kk + BLOCK_K)[None, :] < K), other=0.0)
        mk = m_mask[:, None] & k_mask[None, :]
        if PROLOGUE == 1:
            g = tl.load(x_rows + kk[None, :] * stride_xk, mask=mk, other=0.0).to(tl.float32)
            u = tl.load(x_rows + (kk + K)[None, :] * stride_xk, mask=mk, other=0.0).to(tl.float32)
            xt = silu_mul_f32(g, u, dt).to(dt)
        elif PROLOGUE == 2:
            s = tl.load(x_rows + kk[None, :] * stride_xk, mask=mk, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(R + offs_m[:, None].to(tl.int64) * stride_rm + kk[None, :], mask=mk, other=0.0)
                s = residual_sum(s, r, dt)
                if pid_n == 0:
                    tl.store(RO + offs_m[:, None].to(tl.int64) * stride_rom + kk[None, :], s, mask=mk)
            nw = tl.load(NW + kk, mask=k_mask, other=0.0).to(tl.float32)
            xt = rms_normalize(s, rstd[:, None], nw[None, :], dt)
        else:
            xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=mk, other=0.0)
        if USE_DOT:
            if UPCAST:  # the interpreter multiplies 16-bit dot operands as raw integers; fp32 stays exact (no tf32)
                acc += tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(w))
        elif BLOCK_M == 1:  # plain 2D: [1, BK] broadcast over the [BN, BK] tile
            acc1 += w.to(tl.float32) * xt.to(tl.float32)
        else:
            acc3 += xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        w = w_next
    if not USE_DOT:
        if BLOCK_M == 1:
            acc = tl.sum(acc1, axis=1)[None, :]
        else:
            acc = tl.sum(acc3, axis=2)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(dt), mask=m_mask[:, None] & n_mask[None, :])


def gemv_config(M: int, N: int, K: int, sms: int = 132) -> dict:
    """Tile choice: BLOCK_N as large as keeps >= 2 CTAs per SM, BLOCK_N * BLOCK_K = TILE_ELEMS (K-contiguous)."""
    if M <= 4:
        block_m, use_dot = (1 if M == 1 else 2 if M == 2 else 4), False
    else:
        block_m, use_dot = 16, True
    kp = max(16, next_power_of_2(K))
    if use_dot:
        block_n, block_k = (16 if N <= 16 * 4 * sms else 32), min(kp, 256)
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=True, num_warps=4)
    block_n = 64
    while block_n > 4 and -(-N // block_n) < 2 * sms:
        block_n //= 2
    block_k = min(kp, max(64, TILE_ELEMS // (block_n * block_m)))
    block_n = max(block_n, min(64, TILE_ELEMS // (block_k * block_m)))  # small K: widen N instead
    while block_n > 1 and block_n > next_power_of_2(N):
        block_n //= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=False, num_warps=4)


def _launch(x2, weight, bias, prologue, K, *, residual=None, norm_weight=None, eps=0.0, config=None):
    """x2 [M, K] (or [M, 2K] for SiLU-and-mul), any strides; weight [N, K] (made K-contiguous if it is not)."""
    M = x2.shape[0]
    N = weight.shape[0]
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    ro = None
    if prologue == PROLOGUE_RMS_NORM and residual is not None:
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        ro = torch.empty(M, K, dtype=x2.dtype, device=x2.device)
    sms = _num_sms(x2.device.index or 0) if x2.is_cuda else 132
    cfg = dict(config) if config else gemv_config(M, N, K, sms)
    num_warps = cfg.pop("num_warps", 4)
    if cfg["BLOCK_M"] < M:
        raise ValueError(f"BLOCK_M ({cfg['BLOCK_M']}) must cover the {M} rows")
    bk = cfg["BLOCK_K"]
    grid = (cdiv(N, cfg["BLOCK_N"]),)
    dummy = y
    _gemv_kernel[grid](
        x2, weight, bias if bias is not None else dummy, y,
        residual if residual is not None else dummy, ro if ro is not None else dummy,
        norm_weight if norm_weight is not None else dummy,
        M, N, K, x2.stride(0), x2.stride(1), weight.stride(0), y.stride(0),
        residual.stride(0) if residual is not None else 0, ro.stride(0) if ro is not None else 0, float(eps),
        PROLOGUE=prologue, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        EVEN_K=K % bk == 0, UPCAST=interpreting() or x2.dtype == torch.float32, num_warps=num_warps,
        **cfg, **pdl_launch_args())
    return y, ro


# ------------------------------------------------------------------------------------------------ public ops
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``: x [..., K], weight [N, K], bias [N] or None -> [..., N] in x's dtype.

    Triton skinny GEMM when ``use_gemv`` (at most 16 rows, CUDA, fp16/bf16, not ``KILN_GEMV=off``); else cuBLAS.
    """
    check_tensor("x", x, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    if x.dim() < 1:
        raise ValueError("x must have at least one dim")
    check_same("weight.shape[1]", weight.shape[1], "x.shape[-1]", x.shape[-1])
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device)
        check_same("bias.shape[0]", bias.shape[0], "weight.shape[0]", weight.shape[0])
    if not use_gemv(x, weight) or (bias is not None and (bias.dtype != x.dtype or bias.shape != (weight.shape[0],))):
        return F.linear(x, weight, bias)
    K = x.shape[-1]
    y, _ = _launch(x.reshape(-1, K), weight, bias, PROLOGUE_NONE, K)
    return y.view(*x.shape[:-1], weight.shape[0])


def linear_ref(x, weight, bias=None):
    """The specification: fp32 math, rounded once to x's dtype."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(silu_and_mul(gate_up), weight, bias)``: gate_up [..., 2I] as [gate | up], weight [N, I]."""
    from .activation import silu_and_mul

    check_tensor("gate_up", gate_up, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    check_tensor("weight", weight, ndim=2, dtypes=(gate_up.dtype,), device=gate_up.device)
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even ([gate | up]), got shape {tuple(gate_up.shape)}")
    inner = gate_up.shape[-1] // 2
    check_same("weight.shape[1]", weight.shape[1], "gate_up.shape[-1] // 2", inner)
    if (not use_gemv(gate_up, weight, k_in=inner) or inner > MAX_FUSED_SILU_K
            or (bias is not None and bias.dtype != gate_up.dtype)):
        return linear(silu_and_mul(gate_up), weight, bias)
    y, _ = _launch(gate_up.reshape(-1, 2 * inner), weight, bias, PROLOGUE_SILU_MUL, inner)
    return y.view(*gate_up.shape[:-1], weight.shape[0])


def silu_mul_linear_ref(gate_up, weight, bias=None):
    from .activation import silu_and_mul_ref

    return linear_ref(silu_and_mul_ref(gate_up), weight, bias)


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, residual: torch.Tensor | None = None):
    """``linear(rms_norm(x, norm_weight, eps, residual), weight, bias)``.

    x [..., K]; norm_weight [K]; weight [N, K]. Without ``residual`` returns y [..., N]; with it returns
    ``(y, x + residual)`` like ``rms_norm`` does (the sum feeds the next residual connection).
    """
    from .norm import rms_norm

    check_tensor("x", x, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    check_same("weight.shape[1]", weight.shape[1], "x.shape[-1]", x.shape[-1])
    fast = (use_gemv(x, weight) and x.shape[-1] <= MAX_FUSED_NORM_K and norm_weight.dim() == 1 and norm_weight.shape[0] == x.shape[-1]
            and norm_weight.device == x.device and (bias is None or bias.dtype == x.dtype)
            and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype)))
    if not fast:
        if residual is None:
            return linear(rms_norm(x, norm_weight, eps), weight, bias)
        h, s = rms_norm(x, norm_weight, eps, residual)
        return linear(h, weight, bias), s
    K = x.shape[-1]
    r2 = None if residual is None else residual.reshape(-1, K)
    y, ro = _launch(x.reshape(-1, K), weight, bias, PROLOGUE_RMS_NORM, K, residual=r2, norm_weight=norm_weight, eps=eps)
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y if residual is None else (y, ro.view(x.shape))


def rms_norm_linear_ref(x, norm_weight, eps, weight, bias=None, residual=None):
    from .norm import rms_norm_ref

    if residual is None:
        return linear_ref(rms_norm_ref(x, norm_weight, eps), weight, bias)
    h, s = rms_norm_ref(x, norm_weight, eps, residual)
    return linear_ref(h, weight, bias), s


# ------------------------------------------------------------------------------------------------ doctor
def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _check_gemv(device, dtype, g):
    """The Triton GEMV itself (fp16/bf16 on CUDA or under the interpreter; fp32 checks the kernel math)."""
    M, N, K = 3, 45, 83
    x = torch.randn(M, K, device=device, dtype=dtype, generator=g)
    w = torch.randn(N, K, device=device, dtype=dtype, generator=g)
    b = torch.randn(N, device=device, dtype=dtype, generator=g)
    if backend_for(x) != "triton":
        return _rel(linear(x, w, b), linear_ref(x, w, b)), "ref"
    y, _ = _launch(x, w, b, PROLOGUE_NONE, K)
    return _rel(y, linear_ref(x, w, b)), "triton"


def _check_fused(device, dtype, g):
    M, N, K = 2, 37, 66
    gu = torch.randn(M, 2 * K, device=device, dtype=dtype, generator=g)
    x = torch.randn(M, K, device=device, dtype=dtype, generator=g)
    r = torch.randn(M, K, device=device, dtype=dtype, generator=g)
    nw = torch.randn(K, device=device, dtype=dtype, generator=g)
    w = torch.randn(N, K, device=device, dtype=dtype, generator=g)
    if backend_for(x) != "triton":
        return 0.0, "ref"
    y1, _ = _launch(gu, w, None, PROLOGUE_SILU_MUL, K)
    y2, s = _launch(x, w, None, PROLOGUE_RMS_NORM, K, residual=r, norm_weight=nw, eps=1e-5)
    r2, s_ref = rms_norm_linear_ref(x, nw, 1e-5, w, None, r)
    return max(_rel(y1, silu_mul_linear_ref(gu, w)), _rel(y2, r2), _rel(s, s_ref)), "triton"


DOCTOR_CHECKS = {"gemv": _check_gemv, "gemv_fused_prologues": _check_fused}
