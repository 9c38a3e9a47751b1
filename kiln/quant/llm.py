"""Weight-only quantization of LLM linears (TensorRT-LLM's W8A16 / W4A16), computed by ``kiln.ops.wo_gemm``.

- ``int8-wo``: per-output-channel symmetric int8 weights, ``w ~ q * scale[n]`` (``scale = amax / 127``).
- ``int4-wo``: asymmetric int4 per group of ``group_size`` (32, 64 or 128) consecutive input features,
  ``w ~ (code - zero) * scale`` with codes 0..15 packed two per byte; one fp32 scale and one uint8 zero point per
  (output row, group).

``quantize_weight_only_(model, mode, group_size)`` swaps every ``nn.Linear`` (fused ones included) for its
quantized twin in place, except the names in ``skip`` (the LM head by default: with tied embeddings it is the
float embedding table). The quantized tensors are registered buffers, so ``state_dict`` / ``load_state_dict``
and kiln's engine files round-trip them. ``quantize_weights=False`` swaps in empty modules of the right shapes
(loading a built engine: the tensors come from its weight file).
"""

from __future__ import annotations

import fnmatch
import logging

import torch
from torch import nn

from kiln.ops.wo_gemm import (SUPPORTED_GROUP_SIZES, dequantize_int4_weight, dequantize_int8_weight, pack_int4,
                              w4a16_linear, w8a16_linear)

from .tensor_quant import quantize, quantize_asym, reduce_amax

log = logging.getLogger(__name__)

WEIGHT_ONLY_MODES = ("int8-wo", "int4-wo")
DEFAULT_GROUP_SIZE = 128


def check_weight_only_args(mode: str, group_size: int | None = None) -> int | None:
    """Validate a weight-only mode and group size; returns the group size to use (None for int8-wo)."""
    if mode not in WEIGHT_ONLY_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; expected one of {', '.join(WEIGHT_ONLY_MODES)}")
    if mode == "int8-wo":
        if group_size is not None:
            raise ValueError(f"group_size applies to int4-wo only; int8-wo is per output channel "
                             f"(got group_size={group_size!r})")
        return None
    if group_size is None:
        return DEFAULT_GROUP_SIZE
    if isinstance(group_size, bool) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"unsupported group size {group_size!r} for int4-wo; expected one of "
                         f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}")
    return group_size


def quantize_int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 [N, K], fp32 scale [N]): symmetric, per output channel, narrow range."""
    return quantize(weight.detach().float(), reduce_amax(weight.detach().float(), axis=0), axis=0)


def quantize_int4_weight(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float [N, K] -> (packed uint8 [N, K/2], fp32 scales [N, K/G], uint8 zeros [N, K/G]): asymmetric per group."""
    N, K = weight.shape
    if K % group_size:
        raise ValueError(f"in_features={K} is not divisible by group_size={group_size}")
    groups = weight.detach().float().reshape(N * (K // group_size), group_size)
    codes, scale, zero = quantize_asym(groups, groups.amin(dim=1), groups.amax(dim=1), axis=0, num_bits=4)
    return (pack_int4(codes.reshape(N, K)), scale.reshape(N, K // group_size).contiguous(),
            zero.to(torch.uint8).reshape(N, K // group_size).contiguous())


class _WeightOnlyLinear(nn.Module):
    """Common parts: shapes, an optional float bias buffer, ``dequantized_weight`` for references."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if bias:
            self.register_buffer("bias", torch.empty(out_features, device=device, dtype=dtype or torch.float32))
        else:
            self.bias = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8WeightOnlyLinear(_WeightOnlyLinear):
    """W8A16: int8 weight [N, K] and fp32 per-channel scale [N]; activations stay float."""

    mode = "int8-wo"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("qweight", torch.empty(out_features, in_features, device=device, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, device=device, dtype=torch.float32))

    @classmethod
    def from_float(cls, linear: nn.Linear, quantize_weights: bool = True) -> "Int8WeightOnlyLinear":
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype)
        if quantize_weights:
            q, s = quantize_int8_weight(w)
            mod.qweight.copy_(q)
            mod.scale.copy_(s)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int8_weight(self.qweight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a16_linear(x, self.qweight, self.scale, self.bias)


class Int4WeightOnlyLinear(_WeightOnlyLinear):
    """W4A16: packed int4 weight [N, K/2], fp32 scales and uint8 zero points [N, K/group_size]."""

    mode = "int4-wo"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 128,
                 device=None, dtype=None):
        check_weight_only_args("int4-wo", group_size)
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} is not divisible by group_size={group_size}")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.group_size = group_size
        ng = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, device=device, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, ng, device=device, dtype=torch.float32))
        self.register_buffer("zeros", torch.empty(out_features, ng, device=device, dtype=torch.uint8))

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 128,
                   quantize_weights: bool = True) -> "Int4WeightOnlyLinear":
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, w.device, w.dtype)
        if quantize_weights:
            q, s, z = quantize_int4_weight(w, group_size)
            mod.qweight.copy_(q)
            mod.scales.copy_(s)
            mod.zeros.copy_(z)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int4_weight(self.qweight, self.scales, self.zeros, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


WEIGHT_ONLY_MODULES = (Int8WeightOnlyLinear, Int4WeightOnlyLinear)


def _skipped(name: str, skip) -> bool:
    return any(name == s or fnmatch.fnmatchcase(name, s) for s in skip)


def quantize_weight_only_(model: nn.Module, mode: str, group_size: int | None = None,
                          skip: tuple[str, ...] = ("lm_head",), quantize_weights: bool = True) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (names in ``skip`` and fnmatch patterns excepted) for its weight-only
    quantized twin, in place. Every layer is checked before any is swapped: an in_features not divisible by the
    group size raises ValueError naming the layers. ``quantize_weights=False`` leaves the new buffers empty."""
    group_size = check_weight_only_args(mode, group_size)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip)]
    if not targets or targets[0][0] == "":
        raise ValueError("quantize_weight_only_ swaps nn.Linear children of a model; found none to quantize")
    if group_size is not None:
        bad = [f"{n} (in_features={m.in_features})" for n, m in targets if m.in_features % group_size]
        if bad:
            raise ValueError(f"int4-wo group size {group_size} does not divide the input dimension of: "
                             f"{', '.join(bad)}; choose a group size from {SUPPORTED_GROUP_SIZES} that divides them")
    for name, lin in targets:
        if mode == "int8-wo":
            qmod = Int8WeightOnlyLinear.from_float(lin, quantize_weights)
        else:
            qmod = Int4WeightOnlyLinear.from_float(lin, group_size, quantize_weights)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, qmod)
    log.info("quantize_weight_only_: %d linears -> %s%s", len(targets), mode,
             f" (group {group_size})" if group_size else "")
    return model
