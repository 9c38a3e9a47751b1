"""Paged KV-cache writes: scatter each token's K and V into its slot of the block pool.

The cache is either the model's float dtype or quantized (``int8`` or ``float8_e4m3fn``) with static scales,
one fp32 value per KV head for K and one for V (``k_scale`` / ``v_scale`` [Hkv], calibrated at build time):
``cache = quant(x / scale[h])`` (int8: round half away from zero, clamp +-127; fp8: round to nearest even,
saturate at +-448), ``x ~ cache * scale[h]``. Why static per head and not per token: the attention kernels
serve one KV head per program, so the scale is a scalar there that folds into the softmax scale (K) and the
output (V) for free; the pool keeps its layout with no scale side-tables, and a CUDA graph never sees a new
scale. vLLM's fp8 cache uses one static scale per layer; per head is the same cost and tracks heads whose
ranges differ.
"""

from __future__ import annotations

import torch

from ._dispatch import FLOAT_DTYPES, backend_for, check_same, check_tensor, interpreting
from ._triton import next_power_of_2, tl, triton
from .gemm import FP8_DTYPE, cast_to_qdtype, round_half_away
from .rotary import rope_heads

KV_CACHE_DTYPES = {"int8": torch.int8, "fp8": FP8_DTYPE}
QUANT_KV_DTYPES = tuple(KV_CACHE_DTYPES.values())


def check_kv_scales(x_dtype: torch.dtype, k_cache: torch.Tensor, k_scale, v_scale, num_kv_heads: int,
                    device: torch.device) -> bool:
    """Validate the cache dtype against the activations' and the scales it needs; True when quantized."""
    if k_cache.dtype == x_dtype:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale / v_scale apply to an int8 or fp8 KV cache, not a {k_cache.dtype} one")
        return False
    if k_cache.dtype not in QUANT_KV_DTYPES:
        raise ValueError(f"KV cache dtype must be the activations' ({x_dtype}), int8 or float8_e4m3fn, "
                         f"got {k_cache.dtype}")
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            raise ValueError(f"a {k_cache.dtype} KV cache needs {name} (fp32, one value per KV head)")
        # rank, dtype and length before the device: the same bad scale names the same problem on every device
        check_tensor(name, s, ndim=1, dtypes=(torch.float32,))
        if s.shape[0] != num_kv_heads:
            raise ValueError(f"{name} must have one value per KV head ({num_kv_heads}), got {s.shape[0]}")
        check_tensor(name, s, device=device)
    return True


def quantize_kv_ref(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [T, H, D] float, scale [H] -> the cache's int8 / e4m3 codes (the specification of the kernels' write)."""
    v = x.float() * (1.0 / scale.float())[None, :, None]
    if dtype == torch.int8:
        return round_half_away(v.clamp(-127.0, 127.0)).to(torch.int8)
    return v.clamp(-448.0, 448.0).to(FP8_DTYPE)


def dequantize_kv(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Cache values [..., H, D] -> fp32, times their head's scale when the cache is quantized."""
    if scale is None:
        return cache.float()
    return cache.float() * scale.float()[:, None]


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Write key/value [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at flat slots.

    slot_mapping: [T] int32/int64; slot s is (block s // block_size, offset s % block_size). Slot -1 means
    "do not store" (padding tokens, e.g. in a CUDA-graph batch). Caches are usually per-layer views of one pool.
    An int8 / fp8 cache quantizes on the way in with ``k_scale`` / ``v_scale`` [Hkv] (see the module doc).
    """
    check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("value", value, ndim=3, dtypes=(key.dtype,), device=key.device)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(key.dtype,) + QUANT_KV_DTYPES, device=key.device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=key.device)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int32, torch.int64), device=key.device)
    check_same("value.shape", tuple(value.shape), "key.shape", tuple(key.shape))
    check_same("v_cache.shape", tuple(v_cache.shape), "k_cache.shape", tuple(k_cache.shape))
    check_same("k_cache.shape[2:]", tuple(k_cache.shape[2:]), "key.shape[1:]", tuple(key.shape[1:]))
    check_same("slot_mapping.shape[0]", slot_mapping.shape[0], "key.shape[0]", key.shape[0])
    check_kv_scales(key.dtype, k_cache, k_scale, v_scale, key.shape[1], key.device)
    if backend_for(key, k_cache, slot_mapping) == "triton":
        _store_kv_triton(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        store_kv_ref(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def store_kv_ref(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = k_cache.shape[1]
    blocks, offs = slots // bs, slots % bs
    if k_cache.dtype in QUANT_KV_DTYPES:
        key, value = quantize_kv_ref(key, k_scale, k_cache.dtype), quantize_kv_ref(value, v_scale, v_cache.dtype)
    k_cache[blocks, offs] = key[keep]
    v_cache[blocks, offs] = value[keep]


@triton.jit
def _quant_heads(x, S, h, H, QDT: tl.constexpr, QUANT: tl.constexpr, IS_FP8: tl.constexpr,
                 MANUAL_FP8: tl.constexpr):
    """[BLOCK_H, ...] values of heads h -> the cache's dtype (divided by their head's scale when quantized)."""
    if QUANT:
        s = tl.load(S + h, mask=h < H, other=1.0)
        inv = tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s)  # IEEE-rounded like the reference's 1 / scale: a
        # GPU's default fp32 division may be an ulp off, which moves a value at a rounding boundary by one code
        return cast_to_qdtype(x.to(tl.float32) * inv[:, None], QDT, IS_FP8, MANUAL_FP8)
    else:
        return x


@triton.jit
def _store_kv_kernel(K, V, KC, VC, SLOTS, KS, VS, sk_t, sk_h, sv_t, sv_h, skc_b, skc_s, skc_h, svc_b, svc_s,
                     svc_h, block_size, H, D, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr,
                     IS_FP8: tl.constexpr, MANUAL_FP8: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    blk = slot // block_size
    off = slot % block_size
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    m = (h[:, None] < H) & (d[None, :] < D) & (slot >= 0)
    qdt = KC.dtype.element_ty
    k = _quant_heads(tl.load(K + t * sk_t + h[:, None] * sk_h + d[None, :], mask=m), KS, h, H, qdt, QUANT,
                     IS_FP8, MANUAL_FP8)
    v = _quant_heads(tl.load(V + t * sv_t + h[:, None] * sv_h + d[None, :], mask=m), VS, h, H, qdt, QUANT,
                     IS_FP8, MANUAL_FP8)
    tl.store(KC + blk * skc_b + off * skc_s + h[:, None] * skc_h + d[None, :], k, mask=m)
    tl.store(VC + blk * svc_b + off * svc_s + h[:, None] * svc_h + d[None, :], v, mask=m)


def _quant_flags(k_cache, k_scale, v_scale) -> tuple[tuple, dict]:
    quant = k_cache.dtype in QUANT_KV_DTYPES
    scales = (k_scale, v_scale) if quant else (k_cache, k_cache)  # dummies, never read
    return scales, dict(QUANT=quant, IS_FP8=k_cache.dtype == FP8_DTYPE, MANUAL_FP8=interpreting())


def _store_kv_triton(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    T, H, D = key.shape
    if T == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in their last dim")
    scales, flags = _quant_flags(k_cache, k_scale, v_scale)
    _store_kv_kernel[(T,)](key, value, k_cache, v_cache, slot_mapping, *scales, key.stride(0), key.stride(1),
                           value.stride(0), value.stride(1), k_cache.stride(0), k_cache.stride(1),
                           k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                           k_cache.shape[1], H, D, BLOCK_H=next_power_of_2(H),
                           BLOCK_D=next_power_of_2(D), num_warps=4, **flags)


# ------------------------------------------------------------------------------------------------ rope + store
def rope_and_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, is_neox: bool = True, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> None:
    """``apply_rotary(q, k, ...)`` then ``store_kv(k, v, ...)`` in one launch (a decode layer's three).

    q [T, Hq, D] and k [T, Hkv, D] are rotated in place (strided views of a fused qkv are fine); the rotated k
    and v [T, Hkv, D] go to their slots of k_cache / v_cache [num_blocks, block_size, Hkv, D] (slot -1: skip).
    Same rounding as ``apply_rotary``; an int8 / fp8 cache is written quantized with ``k_scale`` / ``v_scale``.
    """
    from .rotary import apply_rotary

    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("positions", positions, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=(torch.float32,), device=q.device)
    fast = (backend_for(q, k, v, k_cache, slot_mapping) == "triton" and k.dtype == q.dtype
            and k.dim() == 3 and v.shape == k.shape and k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2]
            and positions.shape[0] == q.shape[0] and cos_sin_cache.shape[1] % 2 == 0
            and cos_sin_cache.shape[1] <= q.shape[2])
    if not fast:  # the unfused ops validate everything and raise the usual errors
        apply_rotary(q, k, positions, cos_sin_cache, is_neox)
        store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), device=q.device)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,) + QUANT_KV_DTYPES, device=q.device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=q.device)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
    check_same("v_cache.shape", tuple(v_cache.shape), "k_cache.shape", tuple(k_cache.shape))
    check_same("k_cache.shape[2:]", tuple(k_cache.shape[2:]), "k.shape[1:]", tuple(k.shape[1:]))
    check_same("slot_mapping.shape[0]", slot_mapping.shape[0], "q.shape[0]", q.shape[0])
    check_kv_scales(q.dtype, k_cache, k_scale, v_scale, k.shape[1], q.device)
    _rope_and_store_kv_triton(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox,
                              k_scale, v_scale)


def rope_and_store_kv_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox=True,
                          k_scale=None, v_scale=None):
    from .rotary import rotary_ref

    q.copy_(rotary_ref(q, positions, cos_sin_cache, is_neox))
    k.copy_(rotary_ref(k, positions, cos_sin_cache, is_neox))
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@triton.jit
def _rope_store_kernel(Q, K, V, POS, CACHE, KC, VC, SLOTS, KS, VS, sq_t, sq_h, sq_d, sk_t, sk_h, sk_d, sv_t, sv_h, sv_d,
                       stride_cache, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, block_size, HQ, HK, D, ROT,
                       HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, IS_NEOX: tl.constexpr,
                       BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
                       QUANT: tl.constexpr, IS_FP8: tl.constexpr, MANUAL_FP8: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    dt = Q.dtype.element_ty
    pos = tl.load(POS + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    half_mask = offs < HALF
    cos = tl.load(CACHE + pos * stride_cache + offs, mask=half_mask, other=0.0).to(dt).to(tl.float32)
    sin = tl.load(CACHE + pos * stride_cache + HALF + offs, mask=half_mask, other=0.0).to(dt).to(tl.float32)
    rope_heads(Q, t, sq_t, sq_h, sq_d, HQ, 0, cos, sin, offs, half_mask, dt, HALF, IS_NEOX, BLOCK_HQ)
    k1, k2, d1, d2, mk = rope_heads(K, t, sk_t, sk_h, sk_d, HK, 0, cos, sin, offs, half_mask, dt, HALF, IS_NEOX,
                                     BLOCK_HK)
    slot = tl.load(SLOTS + t).to(tl.int64)
    blk = slot // block_size
    off = slot % block_size
    h = tl.arange(0, BLOCK_HK)
    keep = slot >= 0
    kc = KC + blk * skc_b + off * skc_s + h[:, None].to(tl.int64) * skc_h
    qdt = KC.dtype.element_ty
    tl.store(kc + d1[None, :], _quant_heads(k1, KS, h, HK, qdt, QUANT, IS_FP8, MANUAL_FP8), mask=mk & keep)
    tl.store(kc + d2[None, :], _quant_heads(k2, KS, h, HK, qdt, QUANT, IS_FP8, MANUAL_FP8), mask=mk & keep)
    d = tl.arange(0, BLOCK_D)
    hm = h[:, None] < HK
    # dims past the rotary ones (partial rotary) go to the cache unchanged
    mp = hm & (d[None, :] >= ROT) & (d[None, :] < D) & keep
    kp = tl.load(K + t * sk_t + h[:, None].to(tl.int64) * sk_h + d[None, :] * sk_d, mask=mp, other=0.0)
    tl.store(kc + d[None, :], _quant_heads(kp, KS, h, HK, qdt, QUANT, IS_FP8, MANUAL_FP8), mask=mp)
    mv = hm & (d[None, :] < D) & keep
    vv = tl.load(V + t * sv_t + h[:, None].to(tl.int64) * sv_h + d[None, :] * sv_d, mask=mv, other=0.0)
    tl.store(VC + blk * svc_b + off * svc_s + h[:, None].to(tl.int64) * svc_h + d[None, :],
             _quant_heads(vv, VS, h, HK, qdt, QUANT, IS_FP8, MANUAL_FP8), mask=mv)


def _rope_and_store_kv_triton(q, k, v, positions, cache, k_cache, v_cache, slot_mapping, is_neox, k_scale=None,
                              v_scale=None):
    T, HQ, D = q.shape
    HK = k.shape[1]
    if T == 0:
        return
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in their last dim")
    cache = cache if cache.stride(1) == 1 else cache.contiguous()
    rot = cache.shape[1]
    half = rot // 2
    scales, flags = _quant_flags(k_cache, k_scale, v_scale)
    _rope_store_kernel[(T,)](q, k, v, positions, cache, k_cache, v_cache, slot_mapping, *scales, *q.stride(),
                             *k.stride(),
                             *v.stride(), cache.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                             v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), k_cache.shape[1], HQ, HK, D,
                             rot, HALF=half, BLOCK_HALF=next_power_of_2(half), IS_NEOX=is_neox,
                             BLOCK_HQ=next_power_of_2(HQ), BLOCK_HK=next_power_of_2(HK),
                             BLOCK_D=next_power_of_2(D), num_warps=4, **flags)


def _check_rope_and_store_kv(device, dtype, g):
    from .rotary import rope_cos_sin_cache

    T, hq, hk, d, nb, bs = 9, 6, 2, 40, 5, 4
    cache = rope_cos_sin_cache(32, 300, 10000.0, device=device)
    errs = []
    for neox in (True, False):
        q = torch.randn(T, hq, d, device=device, dtype=dtype, generator=g)
        k = torch.randn(T, hk, d, device=device, dtype=dtype, generator=g)
        v = torch.randn_like(k)
        pos = torch.randint(0, 300, (T,), device=device, generator=g)
        slots = torch.randperm(nb * bs, device=device, generator=g)[:T]
        slots[::4] = -1
        kc = torch.randn(nb, bs, hk, d, device=device, dtype=dtype, generator=g)
        vc = torch.randn_like(kc)
        refs = [t.clone() for t in (q, k, v, kc, vc)]
        rope_and_store_kv_ref(refs[0], refs[1], refs[2], pos, cache, refs[3], refs[4], slots, neox)
        rope_and_store_kv(q, k, v, pos, cache, kc, vc, slots, neox)
        errs += [((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                 for a, b in zip((q, k, kc, vc), (refs[0], refs[1], refs[3], refs[4]))]
    return max(errs), backend_for(q)


DOCTOR_CHECKS = {"rope_and_store_kv": _check_rope_and_store_kv}
