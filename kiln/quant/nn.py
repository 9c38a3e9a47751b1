"""Fake-quantized layers: ``QuantLinear``, ``QuantConv1d/2d/3d``, ``QuantConvTranspose2d`` and their quantizer.

Each layer owns an ``input_quantizer`` (per tensor) and a ``weight_quantizer`` (per output channel by default) of
type ``TensorQuantizer``. A quantizer's ``amax`` (and ``amin`` when asymmetric) is a registered buffer, so a
calibrated model saves and loads through ``state_dict``; with ``learn_amax`` it becomes a Parameter under the
same name (QAT with learned scales). Switches: ``enable_calib`` / ``disable_calib`` (collect statistics),
``enable_quant`` / ``disable_quant`` (fake-quantize or pass through).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import tensor_quant as tq
from .calib import HistogramCalibrator, MaxCalibrator, make_calibrator


@dataclass
class Int8Config:
    """What ``quantize_`` does to a model (torchao style: one config object).

    num_bits: integer width (8 for INT8).
    weight_per_channel: per-output-channel weight scales (True, TensorRT's choice) or one per tensor.
    activation_asymmetric: asymmetric (zero point) activation fake-quant; ``convert`` needs symmetric.
    learn_amax: make every amax a Parameter for QAT with learned scales.
    num_bins: histogram bins for entropy / percentile / mse calibration.
    skip: module names (fnmatch patterns, e.g. ``"fc*"``) or module classes left in float.
    """

    num_bits: int = 8
    weight_per_channel: bool = True
    activation_asymmetric: bool = False
    learn_amax: bool = False
    num_bins: int = 2048
    skip: tuple = field(default_factory=tuple)

    def __post_init__(self):
        tq.qrange(self.num_bits)  # validates num_bits
        if not isinstance(self.num_bins, int) or self.num_bins < 16:
            raise ValueError(f"num_bins must be an int >= 16, got {self.num_bins!r}")
        if isinstance(self.skip, (str, type)):
            self.skip = (self.skip,)
        self.skip = tuple(self.skip)


class TensorQuantizer(nn.Module):
    """Fake-quantizes a tensor with a calibrated ``amax``; collects calibration statistics when enabled."""

    def __init__(self, num_bits: int = 8, axis: int | None = None, amax_shape: tuple = (),
                 narrow_range: bool = True, asymmetric: bool = False, num_bins: int = 2048, name: str = ""):
        super().__init__()
        tq.qrange(num_bits)
        if axis is None and tuple(amax_shape) != ():
            raise ValueError("a per-tensor quantizer (axis=None) has a scalar amax")
        if axis is not None and asymmetric:
            raise ValueError("asymmetric quantizers are per-tensor (axis=None)")
        self.num_bits = num_bits
        self.axis = axis
        self.narrow_range = narrow_range
        self.asymmetric = asymmetric
        self.num_bins = num_bins
        self.name = name
        # NaN = not calibrated yet
        self.register_buffer("amax", torch.full(tuple(amax_shape), float("nan")))
        if asymmetric:
            self.register_buffer("amin", torch.full((), float("nan")))
        self._quant = True
        self._calib = False
        self.calibrator: MaxCalibrator | HistogramCalibrator | None = None

    # ----------------------------------------------------------------------------------------- switches
    def enable_quant(self):
        self._quant = True

    def disable_quant(self):
        self._quant = False

    def enable_calib(self, kind: str = "max"):
        """Start collecting statistics with a fresh 'max' or 'histogram' calibrator."""
        if self.asymmetric and kind != "max":
            raise ValueError(f"{self.name}: asymmetric quantizers calibrate with 'max' (min/max) only")
        self.calibrator = make_calibrator(kind, axis=self.axis, name=self.name, num_bins=self.num_bins,
                                          num_bits=self.num_bits)
        self._amin_seen = None
        self._calib = True

    def disable_calib(self):
        self._calib = False

    @property
    def calibrated(self) -> bool:
        ok = not torch.isnan(self.amax).any().item()
        return ok and (not self.asymmetric or not torch.isnan(self.amin).any().item())

    @property
    def learn_amax(self) -> bool:
        return isinstance(self.amax, nn.Parameter)

    def set_learn_amax(self, learn: bool = True) -> None:
        """Turn amax into a trainable Parameter (or back into a buffer); the state_dict key stays ``amax``."""
        if self.asymmetric and learn:
            raise ValueError(f"{self.name}: learned amax is supported for symmetric quantizers only")
        value = self.amax.detach().clone()
        if learn and not self.learn_amax:
            if not self.calibrated:
                raise ValueError(f"{self.name}: calibrate before learning amax")
            del self._buffers["amax"]
            self.amax = nn.Parameter(value)
        elif not learn and self.learn_amax:
            del self._parameters["amax"]
            self.register_buffer("amax", value)

    def load_calib_amax(self, method: str = "max", **kw) -> None:
        """Set amax from the calibrator's statistics (``method``: max / entropy / percentile / mse)."""
        if self.calibrator is None:
            raise ValueError(f"{self.name}: no calibration statistics collected")
        amax = self.calibrator.compute_amax(method, **kw)
        if amax is None:
            raise ValueError(f"{self.name}: the calibration data never reached this quantizer")
        with torch.no_grad():
            self.amax.copy_(amax.reshape(self.amax.shape).to(self.amax))
            if self.asymmetric:
                self.amin.copy_(torch.as_tensor(self._amin_seen).to(self.amin))

    def set_amax(self, amax) -> None:
        with torch.no_grad():
            self.amax.copy_(torch.as_tensor(amax).reshape(self.amax.shape).to(self.amax))

    # ----------------------------------------------------------------------------------------- math
    def scale(self) -> torch.Tensor:
        """fp32 scale(s) of the symmetric grid: amax / 127."""
        return tq.scale_from_amax(self.amax.detach(), self.num_bits, self.narrow_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calib:
            self.calibrator.collect(x)
            if self.asymmetric:
                m = x.detach().amin().float()
                self._amin_seen = m if self._amin_seen is None else torch.minimum(self._amin_seen, m)
        if not self._quant:
            return x
        if not self.calibrated:
            raise ValueError(f"{self.name or 'quantizer'}: amax is not set; run kiln.quant.calibrate(model, loader)")
        if self.asymmetric:
            if torch.onnx.is_in_onnx_export():
                scale, zp = tq.asym_params(self.amin.detach(), self.amax.detach(), self.num_bits)
                return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), 0, 2**self.num_bits - 1)
            return tq.fake_quant_asym(x, self.amin, self.amax, None, self.num_bits)
        if torch.onnx.is_in_onnx_export():
            return self._export_fake_quant(x)
        return tq.fake_quant(x, self.amax, self.axis, self.num_bits, self.narrow_range)

    def _export_fake_quant(self, x):
        """ONNX QuantizeLinear/DequantizeLinear via torch's fake-quantize ops (ONNX int8 is [-128, 127])."""
        scale = self.scale().to(x.device)
        qmin, qmax = tq.qrange(self.num_bits, narrow_range=False)
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, float(scale), 0, qmin, qmax)
        zp = torch.zeros(scale.numel(), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_channel_affine(x, scale, zp, self.axis % x.dim(), qmin, qmax)

    def extra_repr(self) -> str:
        kind = "asym" if self.asymmetric else ("narrow" if self.narrow_range else "full")
        where = "per-tensor" if self.axis is None else f"axis={self.axis}"
        state = ("quant" if self._quant else "pass") + (", calib" if self._calib else "")
        return f"{self.num_bits}bit {kind} {where}, {state}, name={self.name!r}"


class _QuantMixin:
    """Shared set-up: quantizers built from an Int8Config; weights shared with the float module they replace."""

    weight_axis = 0

    def _init_quantizers(self, config: Int8Config, name: str = ""):
        c = config
        self.input_quantizer = TensorQuantizer(c.num_bits, None, (), asymmetric=c.activation_asymmetric,
                                               num_bins=c.num_bins, name=f"{name}.input_quantizer")
        if c.weight_per_channel:
            ch = self.weight.shape[self.weight_axis]
            self.weight_quantizer = TensorQuantizer(c.num_bits, self.weight_axis, (ch,), num_bins=c.num_bins,
                                                    name=f"{name}.weight_quantizer")
        else:
            self.weight_quantizer = TensorQuantizer(c.num_bits, None, (), num_bins=c.num_bins,
                                                    name=f"{name}.weight_quantizer")
        self.weight_quantizer.set_amax(tq.reduce_amax(self.weight, self.weight_quantizer.axis))

    @classmethod
    def from_float(cls, mod: nn.Module, config: Int8Config | None = None, name: str = ""):
        config = config or Int8Config()
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.__dict__.update({k: v for k, v in mod.__dict__.items()
                           if k not in ("_parameters", "_buffers", "_modules")})
        q._parameters = dict(mod._parameters)  # the same Parameter objects: optimizers keep working
        q._buffers = dict(mod._buffers)
        q._modules = dict(mod._modules)
        q._init_quantizers(config, name)
        return q


class QuantLinear(_QuantMixin, nn.Linear):
    def __init__(self, in_features, out_features, bias=True, config: Int8Config | None = None, device=None,
                 dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quantizers(config or Int8Config())

    def forward(self, x):
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class _QuantConvNd(_QuantMixin):
    def __init__(self, *args, config: Int8Config | None = None, **kw):
        super().__init__(*args, **kw)
        self._init_quantizers(config or Int8Config())

    def forward(self, x):
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """nn.Conv1d with fake-quantized input (per tensor) and weight (per output channel)."""


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """nn.Conv2d with fake-quantized input (per tensor) and weight (per output channel)."""


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    """nn.Conv3d with fake-quantized input (per tensor) and weight (per output channel)."""


class QuantConvTranspose2d(_QuantMixin, nn.ConvTranspose2d):
    weight_axis = 1  # weight is [in, out / groups, kh, kw]: one scale per output channel

    def __init__(self, *args, config: Int8Config | None = None, **kw):
        super().__init__(*args, **kw)
        self._init_quantizers(config or Int8Config())

    def forward(self, x, output_size=None):
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2,
                                              self.dilation)
        return F.conv_transpose2d(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias,
                                  self.stride, self.padding, output_padding, self.groups, self.dilation)


# float class -> quantized class; exact type match (a subclass with its own forward is not swapped)
QUANT_MODULES: dict[type, type] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
}


def quantizers(model: nn.Module):
    """(name, TensorQuantizer) for every quantizer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TensorQuantizer)]
