"""A decode step's attention in one launch: rotary on q and the new k, the KV store, split-K paged attention and
the split reduction.

Unfused, a decode layer runs three kernels between its qkv and o projections (``rope_and_store_kv``, the split-K
decode kernel and its log-sum-exp reduction). Each is a few microseconds of launch and ramp for almost no bytes,
which at batch 1 on a 1B model is ~8% of a step (H100, session 8 probe: 43 us of rope + store and 90 us of
attention per step over 16 layers). Here one grid (sequence, KV head, split) does it all:

- every program rotates its query group (a few hundred bytes) and the sequence's new key itself;
- the new token is key ``L - 1``; the split whose range holds it takes that key's K and V from registers instead
  of the cache and is the one that writes them there, so no program reads a slot written in the same launch;
- each split that holds keys writes its partial output and log-sum-exp, then bumps a per-(sequence, KV head)
  counter; the program that finishes last merges those splits and resets the counter to zero for the next launch
  (the "last block" pattern: no second kernel, no spinning). Splits past the context's keys (at short contexts,
  most of the 32) store nothing and do not count in, and the merge reads only the splits with keys, all the
  group's heads in one pass where 16 splits cover them (see ``_decode_attention_rope_triton``).

Splits, tiles and rounding are the unfused kernels' (cos/sin and each rotary product rounded to the dtype, the
same key chunks per split, probabilities rounded to the dtype before the PV product, the same merge), so greedy
decoding follows ``rope_and_store_kv`` + ``paged_attention`` (the rotation and the online-softmax step are the
same jit helpers). Float caches with neox rotary over the whole head only; the layer keeps the unfused path for
quantized caches, partial or GPT-J rotary, and on the CPU. ``KILN_FUSED_DECODE=0`` turns it off (A/B timing).
"""

from __future__ import annotations

import os

import torch

from ._counters import last_to_arrive, rearm, split_counters
from ._dispatch import FLOAT_DTYPES, backend_for, check_same, check_tensor, interpreting, pdl_launch_args
from ._triton import next_power_of_2, tl, triton
from .attention import (_precision, _upcast, decode_num_splits, paged_attention, paged_attention_ref,
                        softmax_pv_step, split_merge_weights)
from .kv_cache import rope_and_store_kv, rope_and_store_kv_ref
from .rotary import rotate_halves



def fused_decode_enabled() -> bool:
    v = os.environ.get("KILN_FUSED_DECODE", "1").lower()
    if v not in ("0", "1", "on", "off"):
        raise ValueError(f"KILN_FUSED_DECODE must be 0 or 1, got {v!r}")
    return v in ("1", "on")


def fused_decode_supported(q: torch.Tensor, k_cache: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool,
                           k_scale: torch.Tensor | None = None) -> bool:
    """True when ``decode_attention_rope`` runs its Triton kernel for these inputs (else use the unfused ops)."""
    d = q.shape[-1]
    return (fused_decode_enabled() and is_neox and k_scale is None and q.dim() == 3 and q.dtype in FLOAT_DTYPES
            and k_cache.dtype == q.dtype and cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == d
            and d >= 32 and d & (d - 1) == 0 and k_cache.stride(-1) == 1
            and backend_for(q, k_cache, cos_sin_cache) == "triton")


def decode_attention_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                          cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, seqlens_k: torch.Tensor, block_tables: torch.Tensor,
                          scale: float, num_splits: int | None = None) -> torch.Tensor:
    """One new token per sequence: q [B, Hq, D], k / v [B, Hkv, D] (unrotated, e.g. views of a fused qkv) ->
    attention output [B, Hq, D].

    Same result as ``rope_and_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)``
    followed by ``paged_attention(q, ..., is_decode=True)``: the rotated key and v go to ``slot_mapping[b]`` (-1:
    not stored) and sequence b attends to its cached keys ``0 .. seqlens_k[b] - 2`` plus the new one. Unlike
    ``rope_and_store_kv``, q and k are left unrotated.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=(q.dtype,), device=q.device)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("positions", positions, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=(torch.float32,), device=q.device)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
    check_tensor("seqlens_k", seqlens_k, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32, torch.int64), device=q.device)
    B, hq, d = q.shape
    hkv = k_cache.shape[2]
    check_same("k.shape", tuple(k.shape), "(B, Hkv, D)", (B, hkv, d))
    check_same("v.shape", tuple(v.shape), "k.shape", tuple(k.shape))
    check_same("v_cache.shape", tuple(v_cache.shape), "k_cache.shape", tuple(k_cache.shape))
    check_same("k_cache.shape[3]", k_cache.shape[3], "head_dim", d)
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping), ("seqlens_k", seqlens_k),
                    ("block_tables", block_tables)):
        check_same(f"{name}.shape[0]", t.shape[0], "the batch size", B)
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if cos_sin_cache.shape[1] != d or d < 32 or d & (d - 1):
        raise ValueError(f"decode_attention_rope rotates whole heads: cos_sin_cache.shape[1] "
                         f"({cos_sin_cache.shape[1]}) must equal head_dim ({d}), a power of two >= 32")
    if backend_for(q, k_cache, block_tables) != "triton":
        return decode_attention_rope_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                         seqlens_k, block_tables, scale)
    locks = split_counters(q.device, B * hkv)
    if locks is None:  # a CUDA-graph capture outgrew the counters: the unfused kernels (capturable, no host sync)
        q2, k2 = q.clone(), k.clone()
        rope_and_store_kv(q2, k2, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
        cu = torch.arange(B + 1, dtype=torch.int32, device=q.device)
        return paged_attention(q2, k_cache, v_cache, cu, seqlens_k, block_tables, scale, max_seqlen_q=1,
                               is_decode=True)
    return _decode_attention_rope_triton(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                         seqlens_k, block_tables, scale, locks, num_splits)


def decode_attention_rope_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, seqlens_k,
                              block_tables, scale):
    """The unfused ops on copies of q and k (for rows whose slot is stored; a row with slot -1 is padding)."""
    q2, k2 = q.clone(), k.clone()
    rope_and_store_kv_ref(q2, k2, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, True)
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_attention_ref(q2, k_cache, v_cache, cu, seqlens_k, block_tables, scale)


@triton.jit
def _cached_tile(BT, KC, VC, seq, bt_stride, block_size, kvh, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, n, end,
                 new_at, h, d, HALF: tl.constexpr):
    """The cached keys ``n`` [BLOCK_N] of one KV head (positions before ``end``, except the new one): K as its two
    rotary halves [HALF, BLOCK_N] and V [BLOCK_N, D] (masked positions read nothing and are zero)."""
    cached = (n < end) & (n != new_at)
    blk = tl.load(BT + seq * bt_stride + n // block_size, mask=cached, other=0).to(tl.int64)
    sl = n % block_size
    kb = KC + blk * skc_b + sl * skc_s + kvh * skc_h
    ka = tl.load(kb[None, :] + h[:, None], mask=cached[None, :], other=0.0)
    kz = tl.load(kb[None, :] + HALF + h[:, None], mask=cached[None, :], other=0.0)
    vv = tl.load(VC + (blk * svc_b + sl * svc_s + kvh * svc_h)[:, None] + d[None, :], mask=cached[:, None], other=0.0)
    return ka, kz, vv


@triton.jit
def _attend_tile(m_i, l_i, acc, r1, r2, ka, kz, vv, kn1, kn2, vn, n, end, new_at, scale_log2e,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over the key tile ``n``: the new key's K and V (``kn1``, ``kn2``, ``vn``, in
    registers) replace its cache position, which this launch is writing."""
    fresh = n == new_at
    ka = tl.where(fresh[None, :], kn1[:, None], ka)  # [HALF, BLOCK_N]
    kz = tl.where(fresh[None, :], kn2[:, None], kz)
    vv = tl.where(fresh[:, None], vn[None, :], vv)
    if UPCAST:
        ka = ka.to(tl.float32)
        kz = kz.to(tl.float32)
        vv = vv.to(tl.float32)
    s = tl.dot(r2, kz, tl.dot(r1, ka, input_precision=PRECISION), input_precision=PRECISION) * scale_log2e
    s = tl.where((n < end)[None, :], s, float("-inf"))
    return softmax_pv_step(m_i, l_i, acc, s, vv, PRECISION)


@triton.jit
def _decode_rope_kernel(Q, K, V, POS, CS, KC, VC, SLOTS, LENS_K, BT, MID_O, MID_LSE, LOCKS, O, scale_log2e,
                        sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, s_cs, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h,
                        bt_stride, block_size, so_t, so_h, HKV,
                        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
                        SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, RED_G: tl.constexpr, FEW_S: tl.constexpr,
                        FEW_G: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    HQ = HKV * GROUP
    L = tl.load(LENS_K + seq)  # the new token is key L - 1; keys before it are in the cache
    # the unfused kernel's chunking over all L keys, so every split sums the same keys in the same order
    chunk = tl.cdiv(tl.cdiv(L, SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, L)

    # rotary for the query group and the new key (every program; a few hundred bytes)
    dt = O.dtype.element_ty
    D: tl.constexpr = 2 * HALF
    new_at = L - 1
    pos = tl.load(POS + seq).to(tl.int64)
    h = tl.arange(0, HALF)
    cos = tl.load(CS + pos * s_cs + h).to(dt).to(tl.float32)
    sin = tl.load(CS + pos * s_cs + HALF + h).to(dt).to(tl.float32)
    slot = tl.load(SLOTS + seq).to(tl.int64)
    # the split's first key tile is in the cache already (keys before the new one: written by earlier steps, and
    # the previous kernel, the qkv projection, does not touch the cache), so it is read before ``gdc_wait``, under
    # that kernel's tail; with 32 splits a context of up to 2048 keys is one tile per split
    d = tl.arange(0, D)
    n0 = start + tl.arange(0, BLOCK_N)
    ka0, kz0, vv0 = _cached_tile(BT, KC, VC, seq, bt_stride, block_size, kvh, skc_b, skc_s, skc_h, svc_b, svc_s,
                                 svc_h, n0, end, new_at, h, d, HALF)
    if PDL:  # everything above comes from before the graph; q, k, v are the previous kernel's output
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    head = kvh * GROUP + g
    qp = Q + seq * sq_t + head[:, None] * sq_h + h[None, :]
    q1 = tl.load(qp, mask=g_ok[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(qp + HALF, mask=g_ok[:, None], other=0.0).to(tl.float32)
    r1, r2 = rotate_halves(q1, q2, cos[None, :], sin[None, :], dt)
    kp = K + seq * sk_t + kvh * sk_h
    kn1, kn2 = rotate_halves(tl.load(kp + h).to(tl.float32), tl.load(kp + HALF + h).to(tl.float32), cos, sin, dt)
    vn = tl.load(V + seq * sv_t + kvh * sv_h + d)

    # the split whose range holds the new token stores it (slot -1: padding, not stored) and reads it from
    # registers, never from the slot it is writing
    own = (start <= new_at) & (new_at < end) & (slot >= 0)
    safe = tl.maximum(slot, 0)
    kc_new = KC + (safe // block_size) * skc_b + (safe % block_size) * skc_s + kvh * skc_h
    tl.store(kc_new + h, kn1, mask=own)
    tl.store(kc_new + HALF + h, kn2, mask=own)
    tl.store(VC + (safe // block_size) * svc_b + (safe % block_size) * svc_s + kvh * svc_h + d, vn, mask=own)
    if UPCAST:
        r1 = r1.to(tl.float32)
        r2 = r2.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)

    if start < end:
        m_i, l_i, acc = _attend_tile(m_i, l_i, acc, r1, r2, ka0, kz0, vv0, kn1, kn2, vn, n0, end, new_at,
                                     scale_log2e, UPCAST, PRECISION)
    for s0 in range(start + BLOCK_N, end, BLOCK_N):
        n = s0 + tl.arange(0, BLOCK_N)
        ka, kz, vv = _cached_tile(BT, KC, VC, seq, bt_stride, block_size, kvh, skc_b, skc_s, skc_h, svc_b, svc_s,
                                  svc_h, n, end, new_at, h, d, HALF)
        m_i, l_i, acc = _attend_tile(m_i, l_i, acc, r1, r2, ka, kz, vv, kn1, kn2, vn, n, end, new_at, scale_log2e,
                                     UPCAST, PRECISION)

    if SPLITS == 1:
        tl.store(O + seq * so_t + head[:, None] * so_h + d[None, :], (acc * (1.0 / l_i)[:, None]).to(dt),
                 mask=g_ok[:, None])
    elif start < end:  # a split past the context's keys (short contexts leave most of them empty) stops here
        row = seq * HQ + head
        tl.store(MID_O + (row[:, None] * SPLITS + split) * D + d[None, :], acc * (1.0 / l_i)[:, None],
                 mask=g_ok[:, None])
        tl.store(MID_LSE + row * SPLITS + split, m_i + tl.log2(l_i), mask=g_ok)
        live = tl.cdiv(L, chunk)  # the splits that hold keys: the first ones
        if last_to_arrive(LOCKS + seq * HKV + kvh, live):
            # the last of them merges them, in the narrower of two widths that covers them: all the group's heads
            # at once where they fit in registers, so every load is issued at once (one L2 round trip); all the
            # splits take a constant count, so the full-width loads need no mask
            if live == SPLITS:
                _merge_splits(MID_O, MID_LSE, O, seq, kvh, HQ, so_t, so_h, SPLITS, GROUP, SPLITS, BLOCK_S, RED_G, D)
            elif FEW_G > RED_G and live <= FEW_S:
                _merge_splits(MID_O, MID_LSE, O, seq, kvh, HQ, so_t, so_h, live, GROUP, SPLITS, FEW_S, FEW_G, D)
            else:
                _merge_splits(MID_O, MID_LSE, O, seq, kvh, HQ, so_t, so_h, live, GROUP, SPLITS, BLOCK_S, RED_G, D)
            rearm(LOCKS + seq * HKV + kvh)


@triton.jit
def _merge_splits(MID_O, MID_LSE, O, seq, kvh, HQ, so_t, so_h, live, GROUP: tl.constexpr, SPLITS: tl.constexpr,
                  BLOCK_S: tl.constexpr, RED_G: tl.constexpr, D: tl.constexpr):
    """O for the group's heads from the first ``live`` splits' partial outputs and log-sum-exps (``.cg`` loads:
    the other programs wrote them), RED_G heads per pass over BLOCK_S >= live splits."""
    dt = O.dtype.element_ty
    d = tl.arange(0, D)
    s_idx = tl.arange(0, BLOCK_S)
    s_ok = s_idx < live
    rg = tl.arange(0, RED_G)
    for g0 in range(0, GROUP, RED_G):
        rg_ok = (g0 + rg) < GROUP
        r = seq * HQ + kvh * GROUP + g0 + rg  # [RED_G]
        m2 = rg_ok[:, None] & s_ok[None, :]
        lse_s = tl.load(MID_LSE + r[:, None] * SPLITS + s_idx[None, :], mask=m2, other=float("-inf"),
                        cache_modifier=".cg")
        parts = tl.load(MID_O + ((r[:, None] * SPLITS + s_idx[None, :]) * D)[:, :, None] + d[None, None, :],
                        mask=m2[:, :, None], other=0.0, cache_modifier=".cg")
        w = split_merge_weights(lse_s, m2, 1)
        o = tl.sum(parts * w[:, :, None], 1)  # [RED_G, D]
        tl.store(O + seq * so_t + (kvh * GROUP + g0 + rg)[:, None] * so_h + d[None, :], o.to(dt),
                 mask=rg_ok[:, None])


def _decode_attention_rope_triton(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, seqlens_k,
                                  block_tables, scale, locks, num_splits=None):
    B, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    out = torch.empty_like(q)
    if B == 0:
        return out
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k, v and the caches must be contiguous in their last dim")
    splits = num_splits or decode_num_splits(B, hkv, q.device)
    if splits > 1:
        mid_o = torch.empty(B, hq, splits, d, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(B, hq, splits, dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_lse = out
    cs = cos_sin_cache if cos_sin_cache.stride(1) == 1 else cos_sin_cache.contiguous()
    block_s = max(2, next_power_of_2(splits))
    # heads merged per pass of the reduction: at most 8K fp32 partials in registers (64 per thread); where few
    # splits hold keys (a short context), the merge takes them in a width of half the splits, more heads a pass
    # (H200, session 28, with the empty splits left out: the Llama-8B heads' call 7.9 -> 6.1-6.6 us at 128-1024
    # keys, scripts/gpu/decode_attn_bench.py)
    red_g = max(1, min(next_power_of_2(group), 8192 // (block_s * d)))
    few_s = max(2, block_s // 2)
    few_g = max(1, min(next_power_of_2(group), 8192 // (few_s * d)))
    _decode_rope_kernel[(B, hkv, splits)](
        q, k, v, positions, cs, k_cache, v_cache, slot_mapping, seqlens_k, block_tables, mid_o, mid_lse, locks,
        out, scale * 1.4426950408889634, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), cs.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        k_cache.shape[1], out.stride(0), out.stride(1), hkv,
        GROUP=group, BLOCK_G=max(16, next_power_of_2(group)), HALF=d // 2,
        BLOCK_N=64 if q.is_cuda and not interpreting() else 16, SPLITS=splits,
        BLOCK_S=block_s, RED_G=red_g, FEW_S=few_s, FEW_G=few_g, UPCAST=_upcast(q), PRECISION=_precision(q),
        num_warps=4, num_stages=2, **pdl_launch_args())
    return out


def _doctor_fused_decode(device, dtype, g):
    """Four sequences (one with no cached keys) with GQA, against the unfused reference ops."""
    bs, hq, hkv, d = 16, 8, 2, 64
    lens = [1, 18, 70, 133]
    nb = sum(-(-L // bs) for L in lens) + 1
    kc = torch.randn(nb, bs, hkv, d, device=device, dtype=dtype, generator=g)
    vc = torch.randn(nb, bs, hkv, d, device=device, dtype=dtype, generator=g)
    perm = torch.randperm(nb, device=device, generator=g).tolist()
    tables, slots, i = [], [], 0
    for L in lens:
        n = -(-L // bs)
        tables.append(perm[i:i + n] + [-1] * (9 - n))
        slots.append(perm[i + (L - 1) // bs] * bs + (L - 1) % bs)
        i += n
    bt = torch.tensor(tables, dtype=torch.int32, device=device)
    lk = torch.tensor(lens, dtype=torch.int32, device=device)
    sl = torch.tensor(slots, dtype=torch.int64, device=device)
    pos = (lk - 1).long()
    qkv = torch.randn(4, (hq + 2 * hkv) * d, device=device, dtype=dtype, generator=g)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=1)
    q, k, v = q.view(4, hq, d), k.view(4, hkv, d), v.view(4, hkv, d)
    from .rotary import rope_cos_sin_cache

    cs = rope_cos_sin_cache(d, 256, 10000.0, device=device)
    ref = decode_attention_rope_ref(q, k, v, pos, cs, kc.clone(), vc.clone(), sl, lk, bt, d ** -0.5)
    if backend_for(q, kc) != "triton":
        return 0.0, "ref"
    got = _decode_attention_rope_triton(q, k, v, pos, cs, kc, vc, sl, lk, bt, d ** -0.5,
                                        split_counters(kc.device, 8), num_splits=3)
    err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    return err / (8 if dtype != torch.float32 else 1e2), "triton"


DOCTOR_CHECKS = {"decode_attention_rope": _doctor_fused_decode}
