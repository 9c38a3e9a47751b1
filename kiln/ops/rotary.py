"""Rotary position embedding: cos/sin tables (plain, linear and Llama-3 scaled) and in-place application.

Two layouts exist in the wild: *neox* rotates the two halves of the rotary dims (Llama, Qwen, Mistral in Hugging
Face format); *interleaved* (GPT-J, Meta's original Llama checkpoints) rotates adjacent pairs.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import FLOAT_DTYPES, backend_for, check_same, check_tensor
from ._triton import cdiv, next_power_of_2, tl, triton

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(rotary_dim: int, base: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim // 2], with HF's ``rope_scaling`` applied.

    Computed in fp32 like Hugging Face and vLLM do, so angles (and hence logits) match the checkpoint's own
    implementation rather than an exact-math ideal it was never trained with.
    """
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    inv = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_mid, mid, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def rope_cos_sin_cache(rotary_dim: int, max_position: int, base: float = 10000.0, scaling: dict | None = None,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """[max_position, rotary_dim] fp32 table: cos in the first half of each row, sin in the second."""
    if max_position <= 0:
        raise ValueError(f"max_position must be > 0, got {max_position}")
    inv = rope_inv_freq(rotary_dim, base, scaling)
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv.float())
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place by their token's position; returns (q, k).

    positions: [T] int32/int64 indices into cos_sin_cache [max_position, rotary_dim] (rotary_dim <= D, even);
    dims past rotary_dim are left as they are (partial rotary). q and k may be strided views, e.g. of a fused
    qkv projection.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=q.device)
    check_tensor("positions", positions, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=(torch.float32,), device=q.device)
    check_same("k.shape[0]", k.shape[0], "q.shape[0]", q.shape[0])
    check_same("k.shape[2]", k.shape[2], "q.shape[2]", q.shape[2])
    check_same("positions.shape[0]", positions.shape[0], "q.shape[0]", q.shape[0])
    rot = cos_sin_cache.shape[1]
    if rot % 2 or rot > q.shape[2]:
        raise ValueError(f"cos_sin_cache.shape[1] ({rot}) must be even and <= head_dim ({q.shape[2]})")
    if backend_for(q, k, positions, cos_sin_cache) == "triton":
        _apply_rotary_triton(q, k, positions, cos_sin_cache, is_neox)
    else:
        q.copy_(rotary_ref(q, positions, cos_sin_cache, is_neox))
        k.copy_(rotary_ref(k, positions, cos_sin_cache, is_neox))
    return q, k


def rotary_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool = True):
    """Out-of-place reference for one tensor x [T, H, D].

    Rounds where Hugging Face's ``apply_rotary_pos_emb`` does in 16-bit (cos/sin, each product, the sum), so
    bf16 engines follow the checkpoint's reference path; in fp32 every rounding is exact.
    """
    rot = cos_sin_cache.shape[1]
    dt = x.dtype

    def r(t):
        return t.to(dt).float()

    cs = r(cos_sin_cache[positions.long()])
    cos, sin = cs[:, None, : rot // 2], cs[:, None, rot // 2:]
    xf = x.float()
    xr, rest = xf[..., :rot], xf[..., rot:]
    if is_neox:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        out = torch.cat([r(r(x1 * cos) - r(x2 * sin)), r(r(x2 * cos) + r(x1 * sin))], dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([r(r(x1 * cos) - r(x2 * sin)), r(r(x2 * cos) + r(x1 * sin))], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1).to(dt)


@triton.jit
def rotate_halves(x1, x2, cos, sin, DT: tl.constexpr):
    """The rotation of a pair of halves (fp32 in, DT out), rounded where the reference rounds: each product, then
    the sum."""
    o1 = ((x1 * cos).to(DT).to(tl.float32) - (x2 * sin).to(DT).to(tl.float32)).to(DT)
    o2 = ((x2 * cos).to(DT).to(tl.float32) + (x1 * sin).to(DT).to(tl.float32)).to(DT)
    return o1, o2


@triton.jit
def rope_heads(X, t, sx_t, sx_h, sx_d, H, h0, cos, sin, offs, half_mask, DT: tl.constexpr, HALF: tl.constexpr,
               IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate heads h0 .. h0 + BLOCK_H of token t in place (heads >= H masked), rounding where the reference does:
    each product, then the sum. Returns (o1, o2, d1, d2, mask) for a caller that also stores them elsewhere."""
    h = h0 + tl.arange(0, BLOCK_H)
    m = (h[:, None] < H) & half_mask[None, :]
    if IS_NEOX:
        d1 = offs
        d2 = offs + HALF
    else:
        d1 = 2 * offs
        d2 = 2 * offs + 1
    base = X + t * sx_t + h[:, None].to(tl.int64) * sx_h
    x1 = tl.load(base + d1[None, :] * sx_d, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + d2[None, :] * sx_d, mask=m, other=0.0).to(tl.float32)
    o1, o2 = rotate_halves(x1, x2, cos[None, :], sin[None, :], DT)
    tl.store(base + d1[None, :] * sx_d, o1, mask=m)
    tl.store(base + d2[None, :] * sx_d, o2, mask=m)
    return o1, o2, d1, d2, m


@triton.jit
def _rotary_kernel(X, POS, CACHE, stride_t, stride_h, stride_d, stride_cache, H,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    half_mask = offs < HALF
    dt = X.dtype.element_ty
    cos = tl.load(CACHE + pos * stride_cache + offs, mask=half_mask, other=0.0).to(dt).to(tl.float32)
    sin = tl.load(CACHE + pos * stride_cache + HALF + offs, mask=half_mask, other=0.0).to(dt).to(tl.float32)
    rope_heads(X, t, stride_t, stride_h, stride_d, H, tl.program_id(1) * BLOCK_H, cos, sin, offs, half_mask,
               dt, HALF, IS_NEOX, BLOCK_H)


def _apply_rotary_triton(q, k, positions, cache, is_neox):
    T = q.shape[0]
    if T == 0:
        return
    cache = cache if cache.stride(1) == 1 else cache.contiguous()
    half = cache.shape[1] // 2
    for x in (q, k):
        block_h = min(next_power_of_2(x.shape[1]), 16)
        grid = (T, cdiv(x.shape[1], block_h))
        _rotary_kernel[grid](x, positions, cache, *x.stride(), cache.stride(0), x.shape[1], HALF=half,
                             BLOCK_HALF=next_power_of_2(half), IS_NEOX=is_neox, BLOCK_H=block_h,
                             num_warps=4)
