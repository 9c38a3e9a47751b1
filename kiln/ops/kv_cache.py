"""Paged KV-cache writes: scatter each token's K and V into its slot of the block pool."""

from __future__ import annotations

import torch

from ._dispatch import FLOAT_DTYPES, backend_for, check_same, check_tensor
from ._triton import triton, tl


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
