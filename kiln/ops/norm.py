"""RMSNorm with an optional fused residual add (Llama-style pre-norm blocks)."""

from __future__ import annotations

import torch

from ._dispatch import FLOAT_DTYPES, backend_for, check_same, check_tensor, pdl_launch_args
from ._triton import next_power_of_2, tl, triton


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
    if backend_for(x, weight) == "triton":
        return _rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)


def rms_norm_ref(x, weight, eps=1e-6, residual=None):
    if residual is not None:
        x = x + residual
        summed = x
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = (y.float() * weight.float()).to(x.dtype)
    return (y, summed) if residual is not None else y


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
        x = (x.to(tl.float32) + r.to(tl.float32)).to(RO.dtype.element_ty)
        tl.store(RO + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / H
    y = (xf * tl.rsqrt(var + eps)).to(Y.dtype.element_ty).to(tl.float32) * w
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


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
