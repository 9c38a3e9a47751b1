"""RMSNorm module over ``kiln.ops.rms_norm`` (fused residual add when a residual is passed), and over
``kiln.ops.norm.rms_norm_quant`` where a W8A8 / FP8 linear follows it."""

from __future__ import annotations

import torch
from torch import nn

from kiln.ops import rms_norm
from kiln.ops.norm import rms_norm_quant


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        # the gain is exactly 1 (weight-only engines fold it into the next linear): the decode layer may then skip the
        # norm kernel. Checked once by ``check_unit_gain`` (the engine's runner at start-up), not per step (a sync)
        self.unit_gain = False

    @torch.no_grad()
    def check_unit_gain(self) -> bool:
        self.unit_gain = bool((self.weight == 1).all())
        return self.unit_gain

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual)

    def quantized(self, x: torch.Tensor, residual: torch.Tensor | None, dtype: torch.dtype,
                  smooth: torch.Tensor | None = None) -> tuple:
        """The norm (and residual sum) with its output quantized per token for the linear after it, in one kernel:
        ``(q [T, H], scale [T])``, plus ``x + residual`` when a residual is passed. x: [..., H]."""
        H = x.shape[-1]
        return rms_norm_quant(x.reshape(-1, H), self.weight, self.eps,
                              residual.reshape(-1, H) if residual is not None else None, dtype, smooth)
