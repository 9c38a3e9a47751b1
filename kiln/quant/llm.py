"""Quantized LLM linears: weight-only (TensorRT-LLM's W8A16 / W4A16, computed by ``kiln.ops.wo_gemm``) and
activation-quantized W8A8 (SmoothQuant INT8 and FP8 e4m3, computed by ``kiln.ops.gemm``).

- ``int8-wo``: per-output-channel symmetric int8 weights, ``w ~ q * scale[n]`` (``scale = amax / 127``).
- ``int4-wo``: asymmetric int4 per group of ``group_size`` (32, 64 or 128) consecutive input features,
  ``w ~ (code - zero) * scale`` with codes 0..15 packed two per byte; one fp32 scale and one uint8 zero point per
  (output row, group).

- ``w8a8``: SmoothQuant. Per-output-channel symmetric int8 weights, dynamic per-token int8 activations, INT8
  GEMM with INT32 accumulation and a per-token x per-channel rescale. Before quantizing, each linear's input
  channel k is divided by ``s[k] = amax_x[k]^alpha / amax_w[k]^(1 - alpha)`` and its weight column multiplied
  by it (``smoothquant_scales``); ``1/s`` is folded into the RMSNorm weight in front of a layer where one exists
  (``fold_smoothing_into_norm_``), else kept as a run-time ``smooth`` vector fused into the activation
  quantization kernel (TensorRT-LLM's "smoother").
- ``fp8``: e4m3 weights with a per-output-channel scale (``amax / 448``), dynamic per-token e4m3 activations,
  FP8 GEMM with fp32 accumulation (Ada/Hopper; the reference path on CPUs).

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

from kiln.ops.gemm import FP8_DTYPE, FP8_MAX, fp8_gemm, fp8_linear, int8_gemm, w8a8_linear
from kiln.ops.wo_gemm import (SUPPORTED_GROUP_SIZES, WeightOnly, deinterleave_int4_rows, dequantize_int4_weight,
                              dequantize_int8_weight, interleave_int4_rows, pack_int4, wo_fused_linear,
                              wo_rms_norm_linear)

from .tensor_quant import quantize, quantize_asym, reduce_amax

log = logging.getLogger(__name__)

WEIGHT_ONLY_MODES = ("int8-wo", "int4-wo")
DEFAULT_GROUP_SIZE = 128
# rows per interleaved group of the GPU's int4 layout: a 16-byte load holds one word column of 4 rows
INT4_ROW_INTERLEAVE = 4


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


class _WeightOnlyForward:
    """The weight-only linears' forwards, through ``kiln.ops.wo_gemm``'s ``WeightOnly`` (one dispatch on the bit
    width for every entry point); each class gives its ``weight_only()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight_only().linear(x, self.bias)

    def glu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``silu_and_mul(self(x))``: at decode one launch, the activation in the GEMV's epilogue."""
        return self.fused_forward(x, glu=True)

    def fused_forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, rms_eps: float | None = None,
                      glu: bool = False) -> torch.Tensor:
        """``[residual +] self(x / rms(x))`` (SiLU-and-mul'ed with ``glu``), for a linear whose RMSNorm gain was
        folded into its weight (``fold_norm_gains_``): one decode row takes the 1 / rms and the residual add in
        the GEMV's epilogue (``kiln.ops.wo_gemm.wo_fused_linear``)."""
        return wo_fused_linear(x, self.weight_only(), self.bias, residual, rms_eps, glu)

    def norm_forward(self, norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``self(norm(x, residual))``, plus ``x + residual`` when one is given (``norm``: the RMSNorm module in
        front of this linear); one int8 decode row takes the norm inside the GEMV
        (``kiln.ops.wo_gemm.wo_rms_norm_linear``)."""
        return wo_rms_norm_linear(x, norm.weight, norm.eps, self.weight_only(), self.bias, residual)


class _PerChannelLinear(_WeightOnlyLinear):
    """A ``QDTYPE`` weight [N, K] with an fp32 per-output-channel scale [N] (int8-wo, w8a8 and fp8 share it)."""

    QDTYPE: torch.dtype = torch.int8

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("qweight", torch.empty(out_features, in_features, device=device, dtype=self.QDTYPE))
        self.register_buffer("scale", torch.empty(out_features, device=device, dtype=torch.float32))

    @staticmethod
    def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_int8_weight(weight)

    def _fill(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        q, sc = self.quantize_weight(weight)
        self.qweight.copy_(q)
        self.scale.copy_(sc)
        if bias is not None:
            self.bias.copy_(bias.detach())

    @classmethod
    def from_float(cls, linear: nn.Linear, quantize_weights: bool = True):
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype)
        if quantize_weights:
            mod._fill(w, linear.bias)
        return mod


class Int8WeightOnlyLinear(_WeightOnlyForward, _PerChannelLinear):
    """W8A16: int8 weight [N, K] and fp32 per-channel scale [N]; activations stay float."""

    mode = "int8-wo"

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int8_weight(self.qweight, self.scale)

    def weight_only(self) -> WeightOnly:
        return WeightOnly(self.qweight, self.scale)


class Int4WeightOnlyLinear(_WeightOnlyForward, _WeightOnlyLinear):
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

    def weight_only(self) -> WeightOnly:
        return WeightOnly(self.qweight, self.scales, self.zeros, self.group_size, 4)

    @property
    def row_interleave(self) -> int:
        """R of a row-interleaved ``qweight`` (``interleave_rows_``), 0 for the usual packing."""
        return self.qweight.shape[2] if self.qweight.dim() == 3 else 0

    def interleave_rows_(self, rows: int = INT4_ROW_INTERLEAVE) -> bool:
        """Store ``qweight`` as row-interleaved words [N / rows, K / 8, rows] (``kiln.ops.wo_gemm``
        ``interleave_int4_rows``), the layout the GPU's one-row int4 GEMV streams fastest; the same bytes, replaced
        in place, not copied beside. ``state_dict`` and ``load_state_dict`` keep the usual packing, so engine files
        and checkpoints do not depend on it. False (and nothing changes) where the rows do not divide: a [gate | up]
        weight pairs whole quads, so N must be a multiple of 2 * rows."""
        if self.row_interleave or self.out_features % (2 * rows) or self.in_features % 8:
            return False
        self.qweight = interleave_int4_rows(self.qweight, rows)
        return True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.row_interleave:
            destination[prefix + "qweight"] = deinterleave_int4_rows(self.qweight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        rows = self.row_interleave
        if rows:  # load the usual packing into the usual layout, then interleave again
            self.qweight = deinterleave_int4_rows(self.qweight)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if rows:
            self.interleave_rows_(rows)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", group_size={self.group_size}"
                + (f", row_interleave={self.row_interleave}" if self.row_interleave else ""))


def interleave_int4_rows_(model: nn.Module, rows: int = INT4_ROW_INTERLEAVE) -> int:
    """``Int4WeightOnlyLinear.interleave_rows_`` on every int4 linear of ``model``; the number interleaved. The
    engine calls it wherever its ops run in Triton (``ModelRunner``); the references read either layout."""
    return sum(m.interleave_rows_(rows) for m in model.modules() if isinstance(m, Int4WeightOnlyLinear))


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


# The widest hidden size whose int4 decode layer runs without norm kernels (``takes_folded_decode_layer``). H200,
# session 27 (scripts/gpu/int8_pipe_ab.py --quant int4-wo, greedy graph replay): the 1B (2048) went from 0.592 to
# 0.551 ms, the 8B (4096) from 2.225 to 2.487 ms. Session 28 found the cause in programmatic dependent launch:
# captured without PDL the 8B's norm-free layer wins (2.337 against 2.451 ms), with it the split-K int4 GEMVs chained
# straight into each other lose (mostly gate_up launched early behind o_proj); launching gate_up without PDL came to
# 2.191 ms, still behind the layer with norm kernels (2.153).
MAX_INT4_FOLDED_HIDDEN = 2048


def takes_folded_decode_layer(qkv: nn.Module, o_proj: nn.Module, gate_up: nn.Module, down: nn.Module) -> bool:
    """True when a decode layer over these four linears runs as four GEMVs with the norms and residual adds in
    their epilogues (``fused_forward``): all weight-only, and for int4 a hidden size of at most
    ``MAX_INT4_FOLDED_HIDDEN``."""
    mods = (qkv, o_proj, gate_up, down)
    if not all(isinstance(m, WEIGHT_ONLY_MODULES) for m in mods):
        return False
    return not any(isinstance(m, Int4WeightOnlyLinear) for m in mods) or qkv.in_features <= MAX_INT4_FOLDED_HIDDEN


@torch.no_grad()
def fold_norm_gains_(norm_weight: torch.Tensor, linears: list[nn.Linear]) -> None:
    """Move an RMSNorm's gain g into the columns of the float linears it feeds (``W[:, k] *= g[k]``) and set it
    to 1, before they are quantized: ``W (g * n(x)) = (W diag(g)) n(x)``. Why: a norm of unit gain is just
    ``x / rms(x)``, which the decode GEMV applies to its output (``fused_forward`` of the weight-only linears), so
    the decode layer needs no norm kernel. The model's function is unchanged up to rounding; the quantizer's
    scales (per channel, or per group) then cover the scaled rows."""
    g = norm_weight.detach().float()
    for lin in linears:
        if lin.in_features != g.numel():
            raise ValueError(f"a norm of {g.numel()} features cannot feed a linear of in_features={lin.in_features}")
        lin.weight.copy_((lin.weight.float() * g[None, :]).to(lin.weight.dtype))
    norm_weight.fill_(1.0)


# ================================================================================================ W8A8 / FP8
ACTIVATION_MODES = ("w8a8", "fp8")
QUANT_MODES = WEIGHT_ONLY_MODES + ACTIVATION_MODES
DEFAULT_SMOOTHQUANT_ALPHA = 0.5


def check_quant_args(mode: str, group_size: int | None = None) -> int | None:
    """Validate any LLM quantization mode and its group size; returns the group size to use (int4-wo only)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; expected one of {', '.join(QUANT_MODES)}")
    if mode in ACTIVATION_MODES:
        if group_size is not None:
            raise ValueError(f"group_size applies to int4-wo only; {mode} weights are per output channel "
                             f"(got group_size={group_size!r})")
        return None
    return check_weight_only_args(mode, group_size)


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"SmoothQuant migration strength alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def smoothquant_scales(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float = DEFAULT_SMOOTHQUANT_ALPHA,
                       min_scale: float = 1e-5) -> torch.Tensor:
    """Per-input-channel migration factors ``s = amax_x^alpha / amax_w^(1 - alpha)`` (SmoothQuant, eq. 4).

    ``act_amax`` [K]: calibrated max |x| per input channel; ``weight_amax`` [K]: max |w| over the output rows
    (of every linear sharing the input). Dividing x by s and multiplying w by s leaves x @ w.T unchanged and
    evens out their ranges. Channels that never fired (or all-zero weight columns) keep s = 1."""
    alpha = check_alpha(alpha)
    a = act_amax.detach().float()
    w = weight_amax.detach().float()
    if a.shape != w.shape or a.dim() != 1:
        raise ValueError(f"act_amax {tuple(a.shape)} and weight_amax {tuple(w.shape)} must be matching vectors")
    s = a.clamp_min(min_scale).pow(alpha) / w.clamp_min(min_scale).pow(1.0 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp_min(min_scale)


def fold_smoothing_into_norm_(norm_weight: torch.Tensor, linears: list[nn.Linear], act_amax: torch.Tensor,
                              alpha: float = DEFAULT_SMOOTHQUANT_ALPHA) -> torch.Tensor:
    """Smooth the linears reading one RMSNorm's output: the norm's weight is divided by s, their weight columns
    multiplied by s, in place (the float function is unchanged, nothing is left to do at run time). Returns s."""
    w_amax = torch.stack([lin.weight.detach().float().abs().amax(dim=0) for lin in linears]).amax(dim=0)
    s = smoothquant_scales(act_amax, w_amax, alpha).to(norm_weight.device)
    with torch.no_grad():
        norm_weight.copy_((norm_weight.float() / s).to(norm_weight.dtype))
        for lin in linears:
            lin.weight.copy_((lin.weight.float() * s[None, :]).to(lin.weight.dtype))
    return s


def quantize_fp8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (e4m3 [N, K], fp32 scale [N]): per output channel, ``scale = amax / 448``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


class W8A8Linear(_PerChannelLinear):
    """SmoothQuant W8A8: int8 weight [N, K] (smoothed), fp32 per-channel scale [N], optional run-time smoother
    ``smooth`` [K] (= 1/s where no norm absorbed it); activations are quantized per token on the fly."""

    mode = "w8a8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, runtime_smooth: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        if runtime_smooth:
            self.register_buffer("smooth", torch.empty(in_features, device=device, dtype=torch.float32))
        else:
            self.smooth = None

    @classmethod
    def from_float(cls, linear: nn.Linear, act_amax: torch.Tensor | None = None,
                   alpha: float = DEFAULT_SMOOTHQUANT_ALPHA, quantize_weights: bool = True,
                   runtime_smooth: bool | None = None) -> "W8A8Linear":
        """``act_amax`` given: smooth with a run-time smoother (the weight is multiplied by s here); None: the
        weight is quantized as it is (smoothing already folded into a norm, or none wanted)."""
        w = linear.weight
        rt = act_amax is not None if runtime_smooth is None else runtime_smooth
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, rt, w.device, w.dtype)
        if quantize_weights:
            wf = w.detach().float()
            if act_amax is not None:
                s = smoothquant_scales(act_amax.to(wf.device), wf.abs().amax(dim=0), alpha)
                wf = wf * s[None, :]
                mod.smooth.copy_(1.0 / s)
            mod._fill(wf, linear.bias)
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer computes with, smoother folded back in: x @ W.T with W [N, K]."""
        w = dequantize_int8_weight(self.qweight, self.scale)
        return w if self.smooth is None else w * self.smooth.float()[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_linear(x, self.qweight, self.scale, self.bias, self.smooth)

    def input_quantization(self) -> tuple[torch.dtype, torch.Tensor | None]:
        """How ``forward`` quantizes its input, (dtype, run-time smoother): the norm before this layer can do it in
        its own kernel (``RMSNorm.quantized``) and pass the result to ``forward_quantized``."""
        return torch.int8, self.smooth

    def forward_quantized(self, q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """``forward`` on activations already quantized per token as ``input_quantization`` says: q [M, K], scale
        fp32 [M] -> [M, N] in ``out_dtype``."""
        return int8_gemm(q, self.qweight, scale, self.scale, self.bias, out_dtype=out_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", runtime_smooth={self.smooth is not None}"


class Fp8Linear(_PerChannelLinear):
    """FP8 W8A8: e4m3 weight [N, K] with an fp32 per-channel scale [N]; activations e4m3 per token on the fly."""

    mode = "fp8"
    QDTYPE = FP8_DTYPE

    @staticmethod
    def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_fp8_weight(weight)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.qweight, self.scale, self.bias)

    def input_quantization(self) -> tuple[torch.dtype, torch.Tensor | None]:
        """How ``forward`` quantizes its input (e4m3 per token, no smoother): see ``W8A8Linear``."""
        return FP8_DTYPE, None

    def forward_quantized(self, q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """``forward`` on e4m3 activations already quantized per token: q [M, K], scale fp32 [M] -> [M, N]."""
        return fp8_gemm(q, self.qweight, scale, self.scale, self.bias, out_dtype=out_dtype)


ACTIVATION_MODULES = (W8A8Linear, Fp8Linear)
QUANTIZED_MODULES = WEIGHT_ONLY_MODULES + ACTIVATION_MODULES


def quantize_activations_(model: nn.Module, mode: str, act_amax: dict[str, torch.Tensor] | None = None,
                          alpha: float = DEFAULT_SMOOTHQUANT_ALPHA, skip: tuple[str, ...] = ("lm_head",),
                          quantize_weights: bool = True, runtime_smooth: tuple[str, ...] = ()) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (``skip`` excepted) for its W8A8 (``mode="w8a8"``) or FP8 twin, in
    place. For w8a8, ``act_amax[name]`` (calibrated input amax) smooths that layer with a run-time smoother;
    layers without an entry are quantized as they are (their smoothing, if any, was folded into a norm first).
    ``quantize_weights=False`` leaves the buffers empty; ``runtime_smooth`` then names (fnmatch patterns) the
    layers that carry a smoother, as a built engine records them."""
    check_quant_args(mode)
    if mode not in ACTIVATION_MODES:
        raise ValueError(f"quantize_activations_ takes w8a8 or fp8; use quantize_weight_only_ for {mode!r}")
    alpha = check_alpha(alpha)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip)]
    if not targets or targets[0][0] == "":
        raise ValueError("quantize_activations_ swaps nn.Linear children of a model; found none to quantize")
    for name, lin in targets:
        if mode == "fp8":
            qmod = Fp8Linear.from_float(lin, quantize_weights)
        elif quantize_weights:
            qmod = W8A8Linear.from_float(lin, (act_amax or {}).get(name), alpha)
        else:
            qmod = W8A8Linear.from_float(lin, quantize_weights=False, runtime_smooth=_skipped(name, runtime_smooth))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, qmod)
    log.info("quantize_activations_: %d linears -> %s", len(targets), mode)
    return model
