"""Linear layers that load checkpoint tensors into slices of a fused weight.

A fused projection (q|k|v, gate|up) is one GEMM at run time; at load time each Hugging Face tensor names its
shard and lands in its rows of the fused weight, copied in place (no intermediate full-size tensors).
"""

from __future__ import annotations

import torch
from torch import nn


class FusedLinear(nn.Linear):
    """``nn.Linear`` whose output rows are the concatenation of named shards, e.g. {"q": 512, "k": 128, ...}."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False, **kw):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias, **kw)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (off, size)
            off += size

    def shard_view(self, param: torch.Tensor, shard: str) -> torch.Tensor:
        off, size = self.shard_offsets[shard]
        return param.data.narrow(0, off, size)
