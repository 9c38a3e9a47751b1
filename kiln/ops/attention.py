"""Attention over a paged KV cache, for packed variable-length batches.

One call covers every case the scheduler produces: a fresh prefill, a prefill chunk that attends to a cached
prefix, and single-token decodes, mixed in one batch. K/V of the new tokens are already in the cache (see
``kv_cache.store_kv``); query token i of a sequence with ``n`` new tokens and ``L`` cached-plus-new tokens sits at
position ``L - n + i`` and attends causally to keys ``0 .. L - n + i``.

Layouts (shared with the Triton kernels):
  q            [T, Hq, D]      packed queries of all sequences
  k/v_cache    [num_blocks, block_size, Hkv, D]
  cu_seqlens_q [B + 1] int32   prefix sums of new-token counts
  seqlens_k    [B] int32       total tokens (cached + new) per sequence
  block_tables [B, max_blocks] int32, -1 padded
Hq must be a multiple of Hkv (MHA, GQA, MQA). An int8 / fp8 cache (``kv_cache``'s module doc) comes with
``k_scale`` / ``v_scale`` [Hkv]: the reference dequantizes the gathered K/V; the kernels, which serve one KV head
per program, convert the codes to the compute dtype (exact) and fold the head's K scale into the softmax scale
and its V scale into the output.
"""

from __future__ import annotations

import itertools
import os

import torch
import torch.nn.functional as F

from ._dispatch import FLOAT_DTYPES, backend_for, check_tensor, interpreting
from ._triton import cdiv, next_power_of_2, tl, triton
from .kv_cache import QUANT_KV_DTYPES, check_kv_scales, dequantize_kv


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    seqlens_k: torch.Tensor, block_tables: torch.Tensor, scale: float, max_seqlen_q: int | None = None,
                    is_decode: bool = False, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of packed queries against their sequences' paged K/V; returns [T, Hq, D].

    ``max_seqlen_q`` (the longest query run; computed if omitted, which syncs) sizes the prefill grid without a
    device round trip; ``is_decode`` (every sequence has one query) selects the split-K decode kernel.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,) + QUANT_KV_DTYPES, device=q.device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=q.device)
    check_kv_scales(q.dtype, k_cache, k_scale, v_scale, k_cache.shape[2], q.device)
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("seqlens_k", seqlens_k)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32, torch.int64), device=q.device)
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k_cache.shape[2]})")
    if q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"q head_dim ({q.shape[2]}) must match the cache's ({k_cache.shape[3]})")
    if cu_seqlens_q.shape[0] != seqlens_k.shape[0] + 1 or block_tables.shape[0] != seqlens_k.shape[0]:
        raise ValueError(f"cu_seqlens_q ({cu_seqlens_q.shape[0]}), seqlens_k ({seqlens_k.shape[0]}) and "
                         f"block_tables ({block_tables.shape[0]}) disagree on the batch size")
    if backend_for(q, k_cache, block_tables) == "triton":
        if is_decode:
            return paged_decode_triton(q, k_cache, v_cache, seqlens_k, block_tables, scale, k_scale=k_scale,
                                       v_scale=v_scale)
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if seqlens_k.numel() else 0
        return varlen_prefill_triton(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_tables, scale,
                                     max_seqlen_q, k_scale, v_scale)
    return paged_attention_ref(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_tables, scale, k_scale, v_scale)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence from a paged cache, [length, Hkv, D]."""
    bs = cache.shape[1]
    n_blocks = -(-length // bs)
    return cache[block_table[:n_blocks].long()].reshape(n_blocks * bs, *cache.shape[2:])[:length]


def paged_attention_ref(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_tables, scale, k_scale=None,
                        v_scale=None):
    """Reference: per sequence, gather K/V (dequantized when the cache is int8 / fp8) and run SDPA in fp32 with an
    explicit causal offset mask."""
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seqlens_k.tolist()
    group = q.shape[1] // k_cache.shape[2]
    if lens and cu == list(range(len(lens) + 1)):
        return _decode_ref(q, k_cache, v_cache, seqlens_k, block_tables, scale, max(lens), group, k_scale,
                           v_scale)
    for i, L in enumerate(lens):
        s, e = cu[i], cu[i + 1]
        n = e - s
        if n == 0:
            continue
        k = dequantize_kv(gather_kv(k_cache, block_tables[i], L), k_scale).repeat_interleave(group, dim=1)
        v = dequantize_kv(gather_kv(v_cache, block_tables[i], L), v_scale).repeat_interleave(group, dim=1)
        qi = q[s:e].float()
        q_pos = torch.arange(L - n, L, device=q.device)
        mask = torch.arange(L, device=q.device)[None, :] <= q_pos[:, None]  # [n, L]
        o = F.scaled_dot_product_attention(qi.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=scale)
        out[s:e] = o.transpose(0, 1).to(q.dtype)
    return out


def _decode_ref(q, k_cache, v_cache, seqlens_k, block_tables, scale, max_len, group, k_scale=None, v_scale=None):
    """One query per sequence: gather every sequence's K/V into a padded batch and run one masked SDPA (the
    same math as the per-sequence loop, without a Python loop over the batch)."""
    B = q.shape[0]
    bs = k_cache.shape[1]
    nb = -(-max_len // bs)
    tables = block_tables[:, :nb].clamp_min(0).long()
    k = dequantize_kv(k_cache[tables].reshape(B, nb * bs, *k_cache.shape[2:])[:, :max_len], k_scale)
    v = dequantize_kv(v_cache[tables].reshape(B, nb * bs, *v_cache.shape[2:])[:, :max_len], v_scale)
    k = k.repeat_interleave(group, dim=2).transpose(1, 2)  # [B, Hq, L, D]
    v = v.repeat_interleave(group, dim=2).transpose(1, 2)
    mask = torch.arange(max_len, device=q.device)[None, :] < seqlens_k.to(q.device)[:, None]  # [B, L]
    o = F.scaled_dot_product_attention(q.float()[:, :, None, :], k, v, attn_mask=mask[:, None, None, :],
                                       scale=scale)
    return o[:, :, 0, :].to(q.dtype)


# ------------------------------------------------------------------------------------------------ Triton kernels
def _precision(q: torch.Tensor) -> str:
    """fp32 inputs get true fp32 products (not TF32), so an fp32 engine matches fp32 references."""
    return "ieee" if q.dtype == torch.float32 or _upcast(q) else "tf32"


def _upcast(q: torch.Tensor) -> bool:
    """Triton's interpreter multiplies bf16 tiles as raw integers in tl.dot; it gets fp32 tiles instead."""
    return interpreting() and q.dtype == torch.bfloat16


@triton.jit
def softmax_pv_step(m_i, l_i, acc, s, v, PRECISION: tl.constexpr):
    """One key tile of the online softmax shared by every attention kernel here: ``s`` [M, N] masked scores in
    log2 units, ``v`` [N, D] -> the updated running max, sum and output; probabilities are rounded to v's dtype
    before the PV product."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def split_merge_weights(lse, ok, AXIS: tl.constexpr):
    """The weights that merge split-K partial outputs, from the splits' base-2 log-sum-exps ``lse`` along ``AXIS``:
    exp2(lse - max), normalised. ``ok`` masks the splits that count; a split without keys has lse = -inf and weight
    0. Shared by the reduction kernel here and the fused decode kernel's merge, so both round alike. (A row with no
    split at all, a padded head, gets zeros, not NaN.)"""
    m = tl.max(lse, AXIS)
    w = tl.where(ok & (lse > float("-inf")), tl.exp2(lse - tl.expand_dims(tl.where(m > float("-inf"), m, 0.0), AXIS)),
                 0.0)
    total = tl.sum(w, AXIS)
    return w / tl.expand_dims(tl.where(total > 0, total, 1.0), AXIS)


# Both kernels are GQA-aware: one program serves all query heads of one KV head, so each K/V tile is loaded once
# for its whole query group. Rows of the prefill tile are (token, head-in-group) pairs.


@triton.jit
def _prefill_kernel(Q, K, V, O, CU_Q, LENS_K, BT, KS, VS, scale_log2e,
                    sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_t, so_h, bt_stride, block_size,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr, KV_QUANT: tl.constexpr):
    m_blk = tl.program_id(0)
    seq = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(CU_Q + seq)
    n_q = tl.load(CU_Q + seq + 1) - q_start
    if m_blk * BLOCK_M < n_q * GROUP:
        L = tl.load(LENS_K + seq)
        rows = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
        tok = rows // GROUP
        head = kvh * GROUP + rows % GROUP
        row_ok = tok < n_q
        q_pos = L - n_q + tok
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_ptr = Q + (q_start + tok).to(tl.int64)[:, None] * sq_t + head[:, None] * sq_h + d[None, :]
        q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        if KV_QUANT:  # the head's K scale joins the softmax scale; its V scale multiplies the output
            qk_scale = scale_log2e * tl.load(KS + kvh)
            out_scale = tl.load(VS + kvh)
        else:
            qk_scale = scale_log2e
            out_scale = 1.0
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        last_tok = tl.minimum((m_blk * BLOCK_M + BLOCK_M - 1) // GROUP, n_q - 1)
        kv_end = L - n_q + last_tok + 1
        for start in range(0, kv_end, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < kv_end
            blk = tl.load(BT + seq * bt_stride + n // block_size, mask=n_ok, other=0).to(tl.int64)
            slot = n % block_size
            k_off = blk * sk_b + slot * sk_s + kvh * sk_h
            k = tl.load(K + k_off[None, :] + d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            if UPCAST or KV_QUANT:
                k = k.to(q.dtype)
            s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
            s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
            v_off = blk * sv_b + slot * sv_s + kvh * sv_h
            v = tl.load(V + v_off[:, None] + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST or KV_QUANT:
                v = v.to(q.dtype)
            m_i, l_i, acc = softmax_pv_step(m_i, l_i, acc, s, v, PRECISION)
        out = acc * (out_scale / l_i)[:, None]
        o_ptr = O + (q_start + tok).to(tl.int64)[:, None] * so_t + head[:, None] * so_h + d[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _kv_scales(k_cache, k_scale, v_scale):
    quant = k_cache.dtype in QUANT_KV_DTYPES
    return (k_scale, v_scale) if quant else (k_cache, k_cache), quant  # dummies when float: never read


def varlen_prefill_triton(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_tables, scale, max_seqlen_q,
                          k_scale=None, v_scale=None):
    T, Hq, D = q.shape
    B = seqlens_k.shape[0]
    Hkv = k_cache.shape[2]
    group = Hq // Hkv
    out = torch.empty_like(q)
    if T == 0 or B == 0:
        return out
    block_d = max(16, next_power_of_2(D))
    block_m = 64 if q.is_cuda else 16
    block_n = 64 if q.is_cuda and block_d <= 128 else 32 if q.is_cuda else 16
    grid = (cdiv(max_seqlen_q * group, block_m), B, Hkv)
    scales, quant = _kv_scales(k_cache, k_scale, v_scale)
    _prefill_kernel[grid](q, k_cache, v_cache, out, cu_seqlens_q, seqlens_k, block_tables, *scales,
                          scale * 1.4426950408889634,
                          q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], out.stride(0),
                          out.stride(1), block_tables.stride(0), k_cache.shape[1], GROUP=group, HEAD_DIM=D,
                          BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=_upcast(q), PRECISION=_precision(q),
                          KV_QUANT=quant, num_warps=4 if block_d <= 64 else 8, num_stages=2)
    return out


@triton.jit
def _decode_split_kernel(Q, K, V, MID_O, MID_LSE, LENS_K, BT, KS, VS, scale_log2e,
                         sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, bt_stride, block_size,
                         smo_b, smo_h, smo_s, sml_b, sml_h,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, UPCAST: tl.constexpr,
                         PRECISION: tl.constexpr, KV_QUANT: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    L = tl.load(LENS_K + seq)
    chunk = tl.cdiv(tl.cdiv(L, SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, L)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    head = kvh * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + seq.to(tl.int64) * sq_t + head[:, None] * sq_h + d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if KV_QUANT:  # as in the prefill kernel: scales fold into the softmax scale and the output
        qk_scale = scale_log2e * tl.load(KS + kvh)
        out_scale = tl.load(VS + kvh)
    else:
        qk_scale = scale_log2e
        out_scale = 1.0
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s0 in range(start, end, BLOCK_N):
        n = s0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        blk = tl.load(BT + seq * bt_stride + n // block_size, mask=n_ok, other=0).to(tl.int64)
        slot = n % block_size
        k = tl.load(K + (blk * sk_b + slot * sk_s + kvh * sk_h)[None, :] + d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST or KV_QUANT:
            k = k.to(q.dtype)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        v = tl.load(V + (blk * sv_b + slot * sv_s + kvh * sv_h)[:, None] + d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST or KV_QUANT:
            v = v.to(q.dtype)
        m_i, l_i, acc = softmax_pv_step(m_i, l_i, acc, s, v, PRECISION)
    has = l_i > 0
    out = acc * (out_scale / tl.where(has, l_i, 1.0))[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    base = seq.to(tl.int64) * smo_b + head[:, None] * smo_h + split * smo_s + d[None, :]
    tl.store(MID_O + base, out, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(MID_LSE + seq.to(tl.int64) * sml_b + head * sml_h + split, lse, mask=g_ok)


@triton.jit
def _decode_reduce_kernel(MID_O, MID_LSE, O, smo_b, smo_h, smo_s, sml_b, sml_h, so_t, so_h,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
                          BLOCK_S: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < SPLITS
    lse = tl.load(MID_LSE + seq * sml_b + head * sml_h + s, mask=s_ok, other=float("-inf"))
    w = split_merge_weights(lse, s_ok, 0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    parts = tl.load(MID_O + seq * smo_b + head * smo_h + s[:, None] * smo_s + d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0)
    tl.store(O + seq * so_t + head * so_h + d, out.to(O.dtype.element_ty), mask=d_ok)


def decode_num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Split the keys so batch x kv-heads x splits fills the GPU about twice (flash-decoding); depends only on
    the batch shape, so one CUDA graph per batch size stays valid for any context length."""
    if device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    cap = int(os.environ.get("KILN_DECODE_MAX_SPLITS", "32"))  # A/B timing of the split count
    if cap < 1:
        raise ValueError(f"KILN_DECODE_MAX_SPLITS must be >= 1, got {cap}")
    return int(min(cap, max(1, -(-2 * sms // max(1, batch * num_kv_heads)))))


def paged_decode_triton(q, k_cache, v_cache, seqlens_k, block_tables, scale, num_splits: int | None = None,
                        k_scale=None, v_scale=None):
    """One query per sequence (q [B, Hq, D]); split-K over the keys, then a log-sum-exp reduction."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    group = Hq // Hkv
    out = torch.empty_like(q)
    if B == 0:
        return out
    splits = num_splits or decode_num_splits(B, Hkv, q.device)
    mid_o = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)
    block_d = max(16, next_power_of_2(D))
    block_n = 64 if q.is_cuda else 16
    scales, quant = _kv_scales(k_cache, k_scale, v_scale)
    _decode_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, mid_o, mid_lse, seqlens_k, block_tables, *scales, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        k_cache.shape[1], mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, BLOCK_G=max(16, next_power_of_2(group)), HEAD_DIM=D, BLOCK_D=block_d, BLOCK_N=block_n,
        SPLITS=splits, UPCAST=_upcast(q), PRECISION=_precision(q), KV_QUANT=quant, num_warps=4, num_stages=2)
    _decode_reduce_kernel[(B, Hq)](mid_o, mid_lse, out, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
                                   mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1), HEAD_DIM=D,
                                   BLOCK_D=block_d, SPLITS=splits, BLOCK_S=next_power_of_2(splits),
                                   num_warps=4)
    return out


def _doctor_attention(device, dtype, g):
    """Prefill with a cached prefix (GQA) and split-K decode against the SDPA reference."""
    bs, hq, hkv, d = 16, 8, 2, 64
    lens_new, lens_k = [37, 1, 5], [37, 70, 133]  # new tokens (a whole prompt, a decode, a chunk), cached keys
    nb = sum(-(-L // bs) for L in lens_k) + 2
    kc = torch.randn(nb, bs, hkv, d, device=device, dtype=dtype, generator=g)
    vc = torch.randn(nb, bs, hkv, d, device=device, dtype=dtype, generator=g)
    perm = torch.randperm(nb, device=device, generator=g).to(torch.int32)
    tables, i = [], 0
    for L in lens_k:
        n = -(-L // bs)
        tables.append(perm[i:i + n].tolist() + [-1] * (9 - n))
        i += n
    bt = torch.tensor(tables, dtype=torch.int32, device=device)
    cu = torch.tensor([0, *itertools.accumulate(lens_new)], dtype=torch.int32, device=device)  # [0, 37, 38, 43]
    lk = torch.tensor(lens_k, dtype=torch.int32, device=device)
    q = torch.randn(43, hq, d, device=device, dtype=dtype, generator=g)
    ref = paged_attention_ref(q, kc, vc, cu, lk, bt, d ** -0.5)
    got = paged_attention(q, kc, vc, cu, lk, bt, d ** -0.5, max_seqlen_q=37)
    err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    qd = torch.randn(3, hq, d, device=device, dtype=dtype, generator=g)
    cud = torch.arange(4, dtype=torch.int32, device=device)
    ref_d = paged_attention_ref(qd, kc, vc, cud, lk, bt, d ** -0.5)
    got_d = paged_attention(qd, kc, vc, cud, lk, bt, d ** -0.5, is_decode=True)
    err_d = ((got_d.float() - ref_d.float()).abs().max() / ref_d.float().abs().max()).item()
    # attention averages values, so compare at the scale of one rounding of the inputs
    return max(err, err_d) / (8 if dtype != torch.float32 else 1e2), backend_for(q, kc, bt)


DOCTOR_CHECKS = {"paged_attention": _doctor_attention}
