"""RMSNorm with an optional fused residual add (Llama-style pre-norm blocks), and the same norm fused with the
per-token activation quantization of a W8A8 / FP8 GEMM that consumes it (``rms_norm_quant``)."""

from __future__ import annotations

import torch

from ._dispatch import FLOAT_DTYPES, backend_for, check_same, check_tensor, interpreting, pdl_launch_args
from ._triton import next_power_of_2, tl, triton
from .gemm import FP8_DTYPE, _check_act, _qmax, cast_to_qdtype, quantize_activation_ref


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``y = x / rms(x) * weight`` over the last dim, computed in fp32.

    Rounding follows Hugging Face's LlamaRMSNorm: the normalised value is rounded to x's dtype before the
    weight multiplies it, so 16-bit engines reproduce the checkpoint's reference implementation bit for bit.

    x: [..., H] fp32/fp16/bf16; weight: [H]. With ``residual`` ([..., H], x's dtype) the sum ``x + residual`` is
    normalised and also returned, so a transformer block does its residual add and norm in one pass:
    returns ``(y, x + residual)``. Without it returns ``y``. Inputs are never modified.
    """
    _check_norm_args(x, weight, eps, residual)
    if backend_for(x, weight) == "triton":
        return _rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)


def _check_norm_args(x, weight, eps, residual) -> None:
    """The argument checks ``rms_norm`` and ``rms_norm_quant`` share, each a ValueError naming the argument."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    check_same("weight.shape[0]", weight.shape[0], "x.shape[-1]", x.shape[-1])
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device)
        check_same("residual.shape", tuple(residual.shape), "x.shape", tuple(x.shape))


def rms_norm_ref(x, weight, eps=1e-6, residual=None):
    if residual is not None:
        x = x + residual
        summed = x
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = (y.float() * weight.float()).to(x.dtype)
    return (y, summed) if residual is not None else y


@triton.jit
def residual_sum(x, r, dt):
    """``x + residual`` rounded once to the dtype: exactly what torch's fp16/bf16 add does."""
    return (x.to(tl.float32) + r.to(tl.float32)).to(dt)


@triton.jit
def rms_normalize(x, rstd, w, dt):
    """RMSNorm of a tile given its rows' ``1 / rms``: rounded to the dtype, times the weight, rounded again (the
    order of every norm here; the kernels that fold a norm into a GEMV use it too, so they match bit for bit)."""
    return ((x.to(tl.float32) * rstd).to(dt).to(tl.float32) * w).to(dt)


@triton.jit
def _rms_norm_kernel(X, R, W, Y, RO, stride_x, stride_r, stride_y, stride_ro, H, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if PDL:  # the weight is a parameter; x and the residual are the previous kernel's output
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        # fp32 add rounded once to the input dtype: exactly what torch's fp16/bf16 add does
        x = residual_sum(x, r, RO.dtype.element_ty)
        tl.store(RO + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / H
    tl.store(Y + row * stride_y + cols, rms_normalize(xf, tl.rsqrt(var + eps), w, Y.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _rms_norm_triton(x, weight, eps, residual):
    H = x.shape[-1]
    x2 = _rows(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, H)
    n = x2.shape[0]
    block = next_power_of_2(H)
    warps = 4 if block <= 4096 else 8
    launch = dict(BLOCK=block, num_warps=warps, **pdl_launch_args())
    if residual is None:
        if n:
            _rms_norm_kernel[(n,)](x2, x2, weight, y2, y2, x2.stride(0), 0, y2.stride(0), 0, H, eps,
                                   HAS_RESIDUAL=False, **launch)
        return y
    r2 = _rows(residual)
    ro = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ro2 = ro.view(-1, H)
    if n:
        _rms_norm_kernel[(n,)](x2, r2, weight, y2, ro2, x2.stride(0), r2.stride(0), y2.stride(0), ro2.stride(0),
                               H, eps, HAS_RESIDUAL=True, **launch)
    return y, ro


# ------------------------------------------------------------------------------------------------ norm + quantize
def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.int8, smooth: torch.Tensor | None = None) -> tuple:
    """``quantize_activation(rms_norm(x, weight, eps, residual), dtype, smooth)`` in one kernel: the normalised row
    (rounded to x's dtype, as ``rms_norm`` returns it) is quantized per token while it is still in registers.

    A W8A8 / FP8 linear after a norm otherwise costs a second launch that reads the norm's output back; at batch 64
    a Llama-3.2-1B decode step ran 64 quantizer launches (bench/RESULTS.md, session 24), half of them after a norm.
    The arithmetic is the two ops' own, so the bits are too. x: [N, H] float; returns ``(q [N, H], scale fp32 [N])``,
    with ``residual`` ``(q, scale, x + residual)``."""
    check_tensor("x", x, ndim=2)
    _check_norm_args(x, weight, eps, residual)
    _check_act(x, dtype, smooth, None)
    if backend_for(x, weight) == "triton":
        return _rms_norm_quant_triton(x, weight, eps, residual, dtype, smooth)
    return rms_norm_quant_ref(x, weight, eps, residual, dtype, smooth)


def rms_norm_quant_ref(x, weight, eps=1e-6, residual=None, dtype=torch.int8, smooth=None):
    out = rms_norm_ref(x, weight, eps, residual)
    y = out[0] if residual is not None else out
    q, scale = quantize_activation_ref(y, dtype, smooth)
    return (q, scale, out[1]) if residual is not None else (q, scale)


@triton.jit
def _rms_norm_quant_kernel(X, R, W, SMOOTH, Q, S, RO, stride_x, stride_r, stride_q, stride_ro, H, eps,
                           HAS_RESIDUAL: tl.constexpr, HAS_SMOOTH: tl.constexpr, IS_FP8: tl.constexpr,
                           MANUAL_FP8: tl.constexpr, QMAX: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One row: ``_rms_norm_kernel``'s norm (and residual sum), then ``gemm._quant_act_kernel``'s dynamic per-token
    quantization of the result, with the same roundings."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        sm = tl.load(SMOOTH + cols, mask=mask, other=0.0)
    if PDL:  # the weights are parameters; x and the residual are the previous kernel's output
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = residual_sum(x, r, RO.dtype.element_ty)
        tl.store(RO + row * stride_ro + cols, x, mask=mask)
    dt = X.dtype.element_ty
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / H
    y = rms_normalize(xf, tl.rsqrt(var + eps), w, dt).to(tl.float32)  # rms_norm's output
    if HAS_SMOOTH:
        y = y * sm
    scale = tl.maximum(tl.max(tl.abs(y), 0), 1e-12) / QMAX
    inv = 1.0 / scale
    tl.store(Q + row * stride_q + cols, cast_to_qdtype(y * inv, Q.dtype.element_ty, IS_FP8, MANUAL_FP8), mask=mask)
    tl.store(S + row, scale)


def _rms_norm_quant_triton(x, weight, eps, residual, dtype, smooth):
    n, H = x.shape
    x2 = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty(n, H, dtype=dtype, device=x.device)
    scale = torch.empty(n, dtype=torch.float32, device=x.device)
    ro = torch.empty_like(x2) if residual is not None else None
    r2 = (residual if residual.stride(1) == 1 else residual.contiguous()) if residual is not None else None
    block = next_power_of_2(H)
    if n:
        _rms_norm_quant_kernel[(n,)](
            x2, r2 if r2 is not None else x2, weight, smooth if smooth is not None else scale, q, scale,
            ro if ro is not None else x2, x2.stride(0), r2.stride(0) if r2 is not None else 0, q.stride(0),
            ro.stride(0) if ro is not None else 0, H, eps, HAS_RESIDUAL=residual is not None,
            HAS_SMOOTH=smooth is not None, IS_FP8=dtype == FP8_DTYPE, MANUAL_FP8=interpreting(), QMAX=_qmax(dtype),
            BLOCK=block, num_warps=4 if block <= 4096 else 8, **pdl_launch_args())
    return (q, scale, ro) if residual is not None else (q, scale)
