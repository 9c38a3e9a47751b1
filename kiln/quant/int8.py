"""Real INT8 layers: integer weights, INT8 activations, an INT8 GEMM with INT32 accumulation and a float rescale.

``convert(model)`` builds these from calibrated ``Quant*`` layers. The input is quantized with its calibrated
per-tensor scale (``q = clamp(round(x / s_x), -127, 127)``), then

- ``Int8Linear``: ``int8_gemm(q_x [M, K], q_w [N, K], s_x, s_w [N], bias)``;
- ``Int8Conv1d/2d/3d``: im2col on the int8 input (zero padding is exact: 0 quantizes to 0; other padding modes
  pad the float input first), one GEMM per group, K = C/groups * prod(kernel) (zero-padded by the GEMM to a
  multiple of 16 on the GPU);
- ``Int8ConvTranspose2d``: the GEMM ``q_x [N*H*W, C_in] x q_w [C_out*kh*kw, C_in]`` then col2im (``F.fold``).

The GEMMs are ``kiln.ops.gemm``: a Triton kernel on CUDA, an exact integer path on the CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.ops.gemm import int8_gemm

from . import tensor_quant as tq


def _quantize_act(x: torch.Tensor, scale: torch.Tensor, num_bits: int) -> torch.Tensor:
    qmin, qmax = tq.qrange(num_bits)
    return torch.clamp(torch.round(x.float() / scale), qmin, qmax).to(torch.int8)


class _Int8Base(nn.Module):
    def _init_from(self, qmod, weight_axis: int):
        iq, wq = qmod.input_quantizer, qmod.weight_quantizer
        for qz in (iq, wq):
            if not qz.calibrated:
                raise ValueError(f"{qz.name}: amax is not set; calibrate before convert")
        if iq.asymmetric:
            raise ValueError(f"{iq.name}: convert needs symmetric activation quantization")
        self.num_bits = iq.num_bits
        w = qmod.weight.detach()
        w_amax = wq.amax.detach().float()
        if wq.axis is None:  # per-tensor weight scale: expand to one per output channel for the GEMM
            w_amax = w_amax.expand(w.shape[weight_axis]).clone()
        q_w, w_scale = tq.quantize(w, w_amax, axis=weight_axis, num_bits=wq.num_bits)
        self.register_buffer("weight_int8", q_w)
        self.register_buffer("weight_scale", w_scale.float())
        self.register_buffer("input_scale", iq.scale().float().reshape(()).clone())
        self.register_buffer("bias", None if qmod.bias is None else qmod.bias.detach().float().clone())

    def _gemm(self, cols: torch.Tensor, w2d: torch.Tensor, w_scale: torch.Tensor, bias, out_dtype):
        return int8_gemm(cols, w2d, self.input_scale.reshape(1), w_scale, bias, out_dtype=out_dtype)


class Int8Linear(_Int8Base):
    def __init__(self, qmod: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = qmod.in_features, qmod.out_features
        self._init_from(qmod, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        q = _quantize_act(x, self.input_scale, self.num_bits)
        y = self._gemm(q.reshape(-1, self.in_features), self.weight_int8, self.weight_scale, self.bias, out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 x int8 -> int32"


def im2col(x: torch.Tensor, kernel_size, stride, dilation) -> tuple[torch.Tensor, tuple]:
    """Patches of an (already padded) [N, C, *S] tensor of any dtype: returns ([N * prod(O), C * prod(k)], O).

    Column order is (C, k1, k2, ...), matching ``weight.reshape(C_out, -1)``.
    """
    nd = len(kernel_size)
    for d in range(nd):
        span = dilation[d] * (kernel_size[d] - 1) + 1
        x = x.unfold(2 + d, span, stride[d])
    if any(dl > 1 for dl in dilation):
        idx = (Ellipsis,) + tuple(slice(None, None, dl) for dl in dilation)
        x = x[idx]
    n, c = x.shape[:2]
    out_sp = tuple(x.shape[2:2 + nd])
    # [N, C, O..., k...] -> [N, O..., C, k...]
    perm = (0,) + tuple(range(2, 2 + nd)) + (1,) + tuple(range(2 + nd, 2 + 2 * nd))
    cols = x.permute(perm).reshape(n * math.prod(out_sp), c * math.prod(kernel_size))
    return cols, out_sp


class Int8ConvNd(_Int8Base):
    """INT8 convolution (1d/2d/3d) as im2col + INT8 GEMM per group."""

    def __init__(self, qmod: nn.Module):
        super().__init__()
        self.nd = len(qmod.kernel_size)
        self.in_channels, self.out_channels = qmod.in_channels, qmod.out_channels
        self.kernel_size, self.stride, self.dilation = qmod.kernel_size, qmod.stride, qmod.dilation
        self.groups = qmod.groups
        self.padding_mode = qmod.padding_mode
        self.pad = tuple(qmod._reversed_padding_repeated_twice)  # F.pad order; covers padding='same'
        self._init_from(qmod, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.nd + 2:
            raise ValueError(f"expected a {self.nd + 2}-d input [N, C, ...], got shape {tuple(x.shape)}")
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        if self.padding_mode != "zeros":
            x = F.pad(x, self.pad, mode=self.padding_mode)
            q = _quantize_act(x, self.input_scale, self.num_bits)
        else:
            q = F.pad(_quantize_act(x, self.input_scale, self.num_bits), self.pad)
        n = x.shape[0]
        g = self.groups
        cin_g, cout_g = self.in_channels // g, self.out_channels // g
        outs = []
        for gi in range(g):
            cols, out_sp = im2col(q[:, gi * cin_g:(gi + 1) * cin_g], self.kernel_size, self.stride, self.dilation)
            w = self.weight_int8[gi * cout_g:(gi + 1) * cout_g].reshape(cout_g, -1)
            b = None if self.bias is None else self.bias[gi * cout_g:(gi + 1) * cout_g]
            outs.append(self._gemm(cols, w, self.weight_scale[gi * cout_g:(gi + 1) * cout_g], b, out_dtype))
        y = outs[0] if g == 1 else torch.cat(outs, dim=1)
        y = y.reshape(n, *out_sp, self.out_channels)
        return y.permute(0, self.nd + 1, *range(1, self.nd + 1)).contiguous()

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, im2col + int8 GEMM")


class Int8ConvTranspose2d(_Int8Base):
    """INT8 transposed convolution: GEMM of the int8 input with the int8 weight, then col2im in float."""

    def __init__(self, qmod: nn.ConvTranspose2d):
        super().__init__()
        if qmod.groups != 1:
            raise ValueError(f"{qmod.input_quantizer.name}: INT8 ConvTranspose2d supports groups=1 only")
        if qmod.padding_mode != "zeros":
            raise ValueError("INT8 ConvTranspose2d supports padding_mode='zeros' only")
        self.in_channels, self.out_channels = qmod.in_channels, qmod.out_channels
        self.kernel_size, self.stride, self.padding = qmod.kernel_size, qmod.stride, qmod.padding
        self.dilation, self.output_padding = qmod.dilation, qmod.output_padding
        self._init_from(qmod, 1)
        kk = self.kernel_size[0] * self.kernel_size[1]
        # weight [C_in, C_out, kh, kw] -> GEMM B [C_out * kh * kw, C_in]; scale per row = per output channel
        self.register_buffer("weight_rows", self.weight_int8.reshape(self.in_channels, -1).t().contiguous())
        self.register_buffer("row_scale", self.weight_scale.repeat_interleave(kk))

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a 4-d input [N, C, H, W], got shape {tuple(x.shape)}")
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        n, _, h, w = x.shape
        q = _quantize_act(x, self.input_scale, self.num_bits).permute(0, 2, 3, 1).reshape(n * h * w, -1)
        cols = self._gemm(q, self.weight_rows, self.row_scale, None, torch.float32)  # [N*H*W, C_out*kk]
        cols = cols.reshape(n, h * w, -1).transpose(1, 2)
        kh, kw = self.kernel_size
        oh = (h - 1) * self.stride[0] - 2 * self.padding[0] + self.dilation[0] * (kh - 1) + 1
        ow = (w - 1) * self.stride[1] - 2 * self.padding[1] + self.dilation[1] * (kw - 1) + 1
        if output_size is not None:
            oh, ow = tuple(output_size)[-2:]
        else:
            oh, ow = oh + self.output_padding[0], ow + self.output_padding[1]
        y = F.fold(cols, (oh, ow), self.kernel_size, dilation=self.dilation, padding=self.padding,
                   stride=self.stride)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y.to(out_dtype)
