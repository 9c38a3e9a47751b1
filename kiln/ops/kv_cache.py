"""Paged KV-cache writes: scatter each token's K and V into its slot of the block pool."""

from __future__ import annotations

import torch

from ._dispatch import FLOAT_DTYPES, backend_for, check_same, check_tensor
from ._triton import triton, tl
from .rotary import rope_heads


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at flat slots.

    slot_mapping: [T] int32/int64; slot s is (block s // block_size, offset s % block_size). Slot -1 means
    "do not store" (padding tokens, e.g. in a CUDA-graph batch). Caches are usually per-layer views of one pool.
    """
    check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("value", value, ndim=3, dtypes=(key.dtype,), device=key.device)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(key.dtype,), device=key.device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(key.dtype,), device=key.device)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int32, torch.int64), device=key.device)
    check_same("value.shape", tuple(value.shape), "key.shape", tuple(key.shape))
    check_same("v_cache.shape", tuple(v_cache.shape), "k_cache.shape", tuple(k_cache.shape))
    check_same("k_cache.shape[2:]", tuple(k_cache.shape[2:]), "key.shape[1:]", tuple(key.shape[1:]))
    check_same("slot_mapping.shape[0]", slot_mapping.shape[0], "key.shape[0]", key.shape[0])
    if backend_for(key, k_cache, slot_mapping) == "triton":
        _store_kv_triton(key, value, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(key, value, k_cache, v_cache, slot_mapping)


def store_kv_ref(key, value, k_cache, v_cache, slot_mapping):
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = k_cache.shape[1]
    blocks, offs = slots // bs, slots % bs
    k_cache[blocks, offs] = key[keep]
    v_cache[blocks, offs] = value[keep]


@triton.jit
def _store_kv_kernel(K, V, KC, VC, SLOTS, sk_t, sk_h, sv_t, sv_h, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h,
                     block_size, H, D, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    blk = slot // block_size
    off = slot % block_size
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    m = (h[:, None] < H) & (d[None, :] < D) & (slot >= 0)
    k = tl.load(K + t * sk_t + h[:, None] * sk_h + d[None, :], mask=m)
    v = tl.load(V + t * sv_t + h[:, None] * sv_h + d[None, :], mask=m)
    tl.store(KC + blk * skc_b + off * skc_s + h[:, None] * skc_h + d[None, :], k, mask=m)
    tl.store(VC + blk * svc_b + off * svc_s + h[:, None] * svc_h + d[None, :], v, mask=m)


def _store_kv_triton(key, value, k_cache, v_cache, slot_mapping):
    T, H, D = key.shape
    if T == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in their last dim")
    _store_kv_kernel[(T,)](key, value, k_cache, v_cache, slot_mapping, key.stride(0), key.stride(1),
                           value.stride(0), value.stride(1), k_cache.stride(0), k_cache.stride(1),
                           k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                           k_cache.shape[1], H, D, BLOCK_H=triton.next_power_of_2(H),
                           BLOCK_D=triton.next_power_of_2(D), num_warps=4)


# ------------------------------------------------------------------------------------------------ rope + store
def rope_and_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, is_neox: bool = True) -> None:
    """``apply_rotary(q, k, ...)`` then ``store_kv(k, v, ...)`` in one launch (a decode layer's three).

    q [T, Hq, D] and k [T, Hkv, D] are rotated in place (strided views of a fused qkv are fine); the rotated k
    and v [T, Hkv, D] go to their slots of k_cache / v_cache [num_blocks, block_size, Hkv, D] (slot -1: skip).
    Same rounding as ``apply_rotary``.
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
        store_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), device=q.device)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
    check_same("v_cache.shape", tuple(v_cache.shape), "k_cache.shape", tuple(k_cache.shape))
    check_same("k_cache.shape[2:]", tuple(k_cache.shape[2:]), "k.shape[1:]", tuple(k.shape[1:]))
    check_same("slot_mapping.shape[0]", slot_mapping.shape[0], "q.shape[0]", q.shape[0])
    _rope_and_store_kv_triton(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox)


def rope_and_store_kv_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox=True):
    from .rotary import rotary_ref

    q.copy_(rotary_ref(q, positions, cos_sin_cache, is_neox))
    k.copy_(rotary_ref(k, positions, cos_sin_cache, is_neox))
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)


@triton.jit
def _rope_store_kernel(Q, K, V, POS, CACHE, KC, VC, SLOTS, sq_t, sq_h, sq_d, sk_t, sk_h, sk_d, sv_t, sv_h, sv_d,
                       stride_cache, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, block_size, HQ, HK, D, ROT,
                       HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, IS_NEOX: tl.constexpr,
                       BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
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
    tl.store(kc + d1[None, :], k1, mask=mk & keep)
    tl.store(kc + d2[None, :], k2, mask=mk & keep)
    d = tl.arange(0, BLOCK_D)
    hm = h[:, None] < HK
    # dims past the rotary ones (partial rotary) go to the cache unchanged
    mp = hm & (d[None, :] >= ROT) & (d[None, :] < D) & keep
    kp = tl.load(K + t * sk_t + h[:, None].to(tl.int64) * sk_h + d[None, :] * sk_d, mask=mp, other=0.0)
    tl.store(kc + d[None, :], kp, mask=mp)
    mv = hm & (d[None, :] < D) & keep
    vv = tl.load(V + t * sv_t + h[:, None].to(tl.int64) * sv_h + d[None, :] * sv_d, mask=mv, other=0.0)
    tl.store(VC + blk * svc_b + off * svc_s + h[:, None].to(tl.int64) * svc_h + d[None, :], vv, mask=mv)


def _rope_and_store_kv_triton(q, k, v, positions, cache, k_cache, v_cache, slot_mapping, is_neox):
    T, HQ, D = q.shape
    HK = k.shape[1]
    if T == 0:
        return
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in their last dim")
    cache = cache if cache.stride(1) == 1 else cache.contiguous()
    rot = cache.shape[1]
    half = rot // 2
    _rope_store_kernel[(T,)](q, k, v, positions, cache, k_cache, v_cache, slot_mapping, *q.stride(), *k.stride(),
                             *v.stride(), cache.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                             v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), k_cache.shape[1], HQ, HK, D,
                             rot, HALF=half, BLOCK_HALF=triton.next_power_of_2(half), IS_NEOX=is_neox,
                             BLOCK_HQ=triton.next_power_of_2(HQ), BLOCK_HK=triton.next_power_of_2(HK),
                             BLOCK_D=triton.next_power_of_2(D), num_warps=4)


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
