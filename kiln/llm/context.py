"""Attention metadata for the current forward pass.

The runner sets it before calling the model and clears it after, so model ``forward`` signatures stay
``(input_ids, positions)`` (nano-vllm's pattern) while every attention layer reads the same packed-batch layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionContext:
    slot_mapping: torch.Tensor    # [T] flat KV slot of each new token (-1: don't store)
    cu_seqlens_q: torch.Tensor    # [B + 1] int32
    seqlens_k: torch.Tensor       # [B] int32, cached + new tokens
    block_tables: torch.Tensor    # [B, max_blocks] int32
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    is_decode: bool = False       # every sequence has exactly one new token


_CONTEXT: AttentionContext | None = None


def set_context(ctx: AttentionContext | None) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def get_context() -> AttentionContext:
    if _CONTEXT is None:
        raise RuntimeError("attention layers ran outside a ModelRunner step (no AttentionContext set)")
    return _CONTEXT
