"""Gated activations: SiLU-and-mul for SwiGLU MLPs (gate and up projections fused into one GEMM)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import FLOAT_DTYPES, backend_for, check_tensor, pdl_launch_args
from ._triton import cdiv, next_power_of_2, tl, triton


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2*I] laid out as [gate | up]; returns silu(gate) * up, [..., I], in x's dtype (math in fp32)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x's last dim must be even ([gate | up]), got shape {tuple(x.shape)}")
    if backend_for(x) == "triton":
        return _silu_and_mul_triton(x)
    return silu_and_mul_ref(x)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) is rounded to x's dtype before the product, as ``act(gate_proj(x)) * up_proj(x)`` does in HF."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate).to(x.dtype).float() * up).to(x.dtype)


@triton.jit
def silu_mul_f32(g, u, dt: tl.constexpr):
    """silu(g) * u from fp32 gate and up values, with silu rounded to ``dt`` before the product (HF's rounding);
    the result is fp32, to be rounded to ``dt`` by the caller. Every kernel that applies SwiGLU uses this."""
    return (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u


@triton.jit
def _silu_and_mul_kernel(X, Y, stride_x, stride_y, I, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    if PDL:  # x is the previous kernel's output; the next one (the down projection's GEMV) may start its weight loads
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = silu_mul_f32(g, u, Y.dtype.element_ty)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def _silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    two_i = x.shape[-1]
    inner = two_i // 2
    x2 = x.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(*x.shape[:-1], inner, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, inner)
    n = x2.shape[0]
    if n and inner:
        block = min(next_power_of_2(inner), 1024)
        _silu_and_mul_kernel[(n, cdiv(inner, block))](x2, y2, x2.stride(0), y2.stride(0), inner,
                                                             BLOCK=block, num_warps=4, **pdl_launch_args())
    return y
