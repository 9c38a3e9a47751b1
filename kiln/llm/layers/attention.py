"""Paged attention layer: store this step's K/V into the layer's cache view, then attend through it."""

from __future__ import annotations

import torch
from torch import nn

from kiln.llm.context import get_context
from kiln.ops import store_kv
from kiln.ops.attention import paged_attention
from kiln.ops.fused_decode import decode_attention_rope, fused_decode_supported
from kiln.ops.kv_cache import rope_and_store_kv


class PagedAttention(nn.Module):
    """Holds views of this layer's K and V in the shared pool (set by the runner; not part of state_dict)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary=None) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq * D].

        ``rotary=(positions, cos_sin_cache, is_neox)`` rotates q and k first, fused with the KV store; in a decode
        step on the GPU (float cache, neox rotary over whole heads) also fused with the attention itself.
        """
        ctx = get_context()
        if self.k_cache is None:
            raise RuntimeError("PagedAttention has no KV cache: the runner must allocate it before a forward")
        # an int8 / fp8 cache carries per-head scales (buffers set by kiln.llm.quantize); a float one none
        ks, vs = getattr(self, "k_scale", None), getattr(self, "v_scale", None)
        if rotary is not None and ctx.is_decode and fused_decode_supported(q, self.k_cache, rotary[1], rotary[2], ks):
            o = decode_attention_rope(q, k, v, rotary[0], rotary[1], self.k_cache, self.v_cache, ctx.slot_mapping,
                                      ctx.seqlens_k, ctx.block_tables, self.scale)
            return o.reshape(q.shape[0], -1)
        if rotary is None:
            store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping, ks, vs)
        else:
            positions, cos_sin, is_neox = rotary
            rope_and_store_kv(q, k, v, positions, cos_sin, self.k_cache, self.v_cache, ctx.slot_mapping, is_neox,
                              ks, vs)
        o = paged_attention(q, self.k_cache, self.v_cache, ctx.cu_seqlens_q, ctx.seqlens_k, ctx.block_tables,
                            self.scale, max_seqlen_q=ctx.max_seqlen_q, is_decode=ctx.is_decode, k_scale=ks,
                            v_scale=vs)
        return o.reshape(q.shape[0], -1)
