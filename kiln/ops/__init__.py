"""kiln's one kernel layer: plain functions on torch tensors; Triton on CUDA, a PyTorch reference elsewhere."""

from ._dispatch import backend_for, triton_available
from .activation import silu_and_mul
from .kv_cache import store_kv
from .norm import rms_norm
from .rotary import apply_rotary, rope_cos_sin_cache

__all__ = ["backend_for", "triton_available", "rms_norm", "apply_rotary", "rope_cos_sin_cache", "silu_and_mul",
           "store_kv"]
