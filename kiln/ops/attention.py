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
Hq must be a multiple of Hkv (MHA, GQA, MQA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import FLOAT_DTYPES, check_tensor


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    seqlens_k: torch.Tensor, block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of packed queries against their sequences' paged K/V; returns [T, Hq, D]."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), device=q.device)
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
    return paged_attention_ref(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_tables, scale)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence from a paged cache, [length, Hkv, D]."""
    bs = cache.shape[1]
    n_blocks = -(-length // bs)
    return cache[block_table[:n_blocks].long()].reshape(n_blocks * bs, *cache.shape[2:])[:length]


def paged_attention_ref(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_tables, scale):
    """Reference: per sequence, gather K/V and run SDPA in fp32 with an explicit causal offset mask."""
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seqlens_k.tolist()
    group = q.shape[1] // k_cache.shape[2]
    for i, L in enumerate(lens):
        s, e = cu[i], cu[i + 1]
        n = e - s
        if n == 0:
            continue
        k = gather_kv(k_cache, block_tables[i], L).float().repeat_interleave(group, dim=1)
        v = gather_kv(v_cache, block_tables[i], L).float().repeat_interleave(group, dim=1)
        qi = q[s:e].float()
        q_pos = torch.arange(L - n, L, device=q.device)
        mask = torch.arange(L, device=q.device)[None, :] <= q_pos[:, None]  # [n, L]
        o = F.scaled_dot_product_attention(qi.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=scale)
        out[s:e] = o.transpose(0, 1).to(q.dtype)
    return out
