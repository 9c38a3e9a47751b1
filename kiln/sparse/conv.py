"""Sparse convolution modules with spconv 2.x's constructor signatures and KRSC weights ``[Cout, *k, Cin]``."""

from __future__ import annotations

import enum
import math

import torch
from torch import nn

from . import functional as Fsp
from .modules import SparseModule
from .rulebook import build_conv, build_subm
from .tensor import IndiceData, SparseConvTensor


class ConvAlgo(enum.Enum):
    """spconv's algorithm names, accepted for compatibility: kiln maps them onto its own two paths."""

    Native = 0
    MaskImplicitGemm = 1
    MaskSplitImplicitGemm = 2


def _tuple(v, n, name):
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    if len(v) != n or not all(isinstance(i, int) for i in v):
        raise ValueError(f"{name} must be an int or {n} ints, got {v}")
    return v


def _algo_name(algo) -> str:
    if algo is None or algo == "auto":
        return "auto"
    if algo == ConvAlgo.Native or algo == "gather":
        return "gather"
    if algo in (ConvAlgo.MaskImplicitGemm, ConvAlgo.MaskSplitImplicitGemm, "implicit"):
        return "implicit"
    raise ValueError(f"algo must be a ConvAlgo, 'auto', 'gather' or 'implicit', got {algo!r}")


def _check_input(x, ndim, in_channels, name):
    if not isinstance(x, SparseConvTensor):
        raise ValueError(f"{name} expects a SparseConvTensor, got {type(x).__name__}")
    if len(x.spatial_shape) != ndim:
        raise ValueError(f"{name} is {ndim}-D but the input has spatial_shape {x.spatial_shape}")
    if in_channels is not None and x.features.shape[1] != in_channels:
        raise ValueError(f"{name} expects {in_channels} input channels, got features of shape "
                         f"{tuple(x.features.shape)}")


def _lookup_inverse(x: SparseConvTensor, key, ksize, name) -> IndiceData:
    if key is None:
        raise ValueError(f"{name}: inverse convolution needs the indice_key of the convolution it inverts")
    datas = x.find_indice_pair(key)
    if datas is None:
        raise ValueError(f"{name}: unknown indice_key {key!r} (known: {sorted(map(str, x.indice_dict))}); "
                         "the inverted convolution must run first with that key")
    if datas.is_subm:
        raise ValueError(f"{name}: indice_key {key!r} belongs to a submanifold convolution; inverse convolution "
                         "only inverts regular convolutions and pooling")
    if ksize is not None and list(ksize) != datas.ksize:
        raise ValueError(f"{name}: inverse with indice_key {key!r} must have kernel size {datas.ksize}, "
                         f"this layer has {list(ksize)}")
    if x.spatial_shape != datas.out_spatial_shape:
        raise ValueError(f"{name}: inverse with indice_key {key!r} expects spatial_shape "
                         f"{datas.out_spatial_shape}, got {x.spatial_shape}")
    if x.indices.shape[0] != datas.out_indices.shape[0]:
        raise ValueError(f"{name}: inverse with indice_key {key!r} expects {datas.out_indices.shape[0]} voxels, "
                         f"got {x.indices.shape[0]}")
    return datas


def _check_subm_reuse(x: SparseConvTensor, datas: IndiceData, ksize, dilation, key, name):
    if not datas.is_subm:
        raise ValueError(f"{name}: indice_key {key!r} holds a regular convolution's rulebook; a submanifold layer "
                         "can only reuse submanifold indices")
    if list(ksize) != datas.ksize:
        raise ValueError(f"{name}: subm with indice_key {key!r} must have kernel size {datas.ksize}, "
                         f"this layer has {list(ksize)}")
    if list(dilation) != datas.dilation:
        raise ValueError(f"{name}: subm with indice_key {key!r} must have dilation {datas.dilation}, "
                         f"this layer has {list(dilation)}")
    if x.spatial_shape != datas.spatial_shape:
        raise ValueError(f"{name}: subm with indice_key {key!r} must have spatial_shape {datas.spatial_shape}, "
                         f"input has {x.spatial_shape}")
    if x.indices.shape[0] != datas.indices.shape[0]:
        raise ValueError(f"{name}: subm with indice_key {key!r} must have {datas.indices.shape[0]} voxels, "
                         f"input has {x.indices.shape[0]}")


def get_rulebook(x: SparseConvTensor, *, ndim, ksize, stride, padding, dilation, output_padding=None,
                 subm=False, transposed=False, inverse=False, indice_key=None, name="conv"):
    """(out_indices, out_spatial_shape, rulebook) for a layer, built or reused through ``x.indice_dict``."""
    if inverse:
        datas = _lookup_inverse(x, indice_key, ksize, name)
        return datas.indices, datas.spatial_shape, datas.rulebook.swapped()
    datas = x.find_indice_pair(indice_key)
    if subm:
        if datas is not None:
            _check_subm_reuse(x, datas, ksize, dilation, indice_key, name)
            return x.indices, x.spatial_shape, datas.rulebook
        rb = build_subm(x.indices, x.spatial_shape, ksize, dilation)
        out_indices, out_shape = x.indices, x.spatial_shape
    else:
        if datas is not None:
            if datas.is_subm:
                raise ValueError(f"{name}: indice_key {indice_key!r} holds a submanifold rulebook; a regular "
                                 "convolution cannot reuse it")
            if x.indices.shape[0] != datas.indices.shape[0]:
                raise ValueError(f"{name}: indice_key {indice_key!r} was built for {datas.indices.shape[0]} "
                                 f"voxels, input has {x.indices.shape[0]}")
            return datas.out_indices, datas.out_spatial_shape, datas.rulebook
        out_indices, out_shape, rb = build_conv(x.indices, x.spatial_shape, ksize, stride, padding, dilation,
                                                transposed, output_padding)
    if indice_key is not None:
        x.indice_dict[indice_key] = IndiceData(out_indices, x.indices, rb, x.spatial_shape, out_shape, subm,
                                               ksize, stride, dilation, padding)
    return out_indices, out_shape, rb


class SparseConvolution(SparseModule):
    """Shared body of every sparse convolution; weight ``[out_channels, *kernel_size, in_channels]`` (KRSC)."""

    def __init__(self, ndim, in_channels, out_channels, kernel_size=3, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, subm=False, output_padding=0, transposed=False, inverse=False, indice_key=None,
                 algo=None, fp32_accum=None, large_kernel_fast_algo=False, name=None, record_voxel_count=False):
        super().__init__()
        if groups != 1:
            raise ValueError(f"groups must be 1 (grouped sparse convolution is not supported), got {groups}")
        for n_, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{n_} must be a positive int, got {v!r}")
        self.ndim = ndim
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _tuple(kernel_size, ndim, "kernel_size")
        self.stride = _tuple(stride, ndim, "stride")
        self.padding = _tuple(padding, ndim, "padding")
        self.dilation = _tuple(dilation, ndim, "dilation")
        self.output_padding = _tuple(output_padding, ndim, "output_padding")
        if any(k <= 0 for k in self.kernel_size) or any(s <= 0 for s in self.stride) or \
                any(d <= 0 for d in self.dilation) or any(p < 0 for p in self.padding):
            raise ValueError(f"kernel_size {self.kernel_size}, stride {self.stride} and dilation {self.dilation} "
                             f"must be positive and padding {self.padding} non-negative")
        if subm and any(s != 1 for s in self.stride):
            raise ValueError(f"submanifold convolution needs stride 1, got {self.stride}")
        self.groups = groups
        self.subm = subm
        self.transposed = transposed
        self.inverse = inverse
        self.indice_key = indice_key
        self.algo = _algo_name(algo)
        self.fp32_accum = fp32_accum
        self.name = name
        self.weight = nn.Parameter(torch.empty(out_channels, *self.kernel_size, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    @property
    def kernel_volume(self) -> int:
        return math.prod(self.kernel_size)

    def reset_parameters(self):
        # nn.Conv3d's default (kaiming-uniform, a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        fan_in = self.in_channels * self.kernel_volume
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}")
        if self.subm:
            s += ", subm=True"
        if self.inverse:
            s += ", inverse=True"
        if self.transposed:
            s += f", transposed=True, output_padding={self.output_padding}"
        if self.indice_key is not None:
            s += f", indice_key={self.indice_key!r}"
        return s

    def forward(self, input: SparseConvTensor) -> SparseConvTensor:
        name = type(self).__name__
        _check_input(input, self.ndim, self.in_channels, name)
        out_indices, out_shape, rb = get_rulebook(
            input, ndim=self.ndim, ksize=self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, output_padding=self.output_padding, subm=self.subm, transposed=self.transposed,
            inverse=self.inverse, indice_key=self.indice_key, name=name)
        feats = input.features
        w = self.weight  # spconv's KRSC layout [Cout, *kernel, Cin]; the Function views it as [K, Cin, Cout]
        if w.dtype != feats.dtype:
            w = w.to(feats.dtype)
        bias = self.bias.to(feats.dtype) if self.bias is not None else None
        out = Fsp.sparse_conv(feats, w, rb, self.algo, bias, krsc=True)
        return SparseConvTensor._derived(out, out_indices, list(out_shape), input.batch_size, input.indice_dict,
                                         input.benchmark)


def _make(cls_name, ndim, **fixed):
    """Build a spconv-named class with its constructor signature."""

    if fixed.get("inverse"):
        def __init__(self, in_channels, out_channels, kernel_size, indice_key, bias=True, algo=None,
                     fp32_accum=None, large_kernel_fast_algo=False, name=None):
            SparseConvolution.__init__(self, ndim, in_channels, out_channels, kernel_size, bias=bias, inverse=True,
                                       indice_key=indice_key, algo=algo, fp32_accum=fp32_accum, name=name)
    elif fixed.get("transposed"):
        def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                     bias=True, indice_key=None, algo=None, fp32_accum=None, large_kernel_fast_algo=False,
                     name=None, output_padding=0):
            SparseConvolution.__init__(self, ndim, in_channels, out_channels, kernel_size, stride, padding,
                                       dilation, groups, bias, transposed=True, output_padding=output_padding,
                                       indice_key=indice_key, algo=algo, fp32_accum=fp32_accum, name=name)
    else:
        subm = fixed.get("subm", False)

        def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                     bias=True, indice_key=None, algo=None, fp32_accum=None, large_kernel_fast_algo=False,
                     name=None, record_voxel_count=False):
            SparseConvolution.__init__(self, ndim, in_channels, out_channels, kernel_size, stride, padding,
                                       dilation, groups, bias, subm=subm, indice_key=indice_key, algo=algo,
                                       fp32_accum=fp32_accum, name=name)
    return type(cls_name, (SparseConvolution,), {"__init__": __init__, "__module__": __name__})


SubMConv1d = _make("SubMConv1d", 1, subm=True)
SubMConv2d = _make("SubMConv2d", 2, subm=True)
SubMConv3d = _make("SubMConv3d", 3, subm=True)
SparseConv1d = _make("SparseConv1d", 1)
SparseConv2d = _make("SparseConv2d", 2)
SparseConv3d = _make("SparseConv3d", 3)
SparseConvTranspose1d = _make("SparseConvTranspose1d", 1, transposed=True)
SparseConvTranspose2d = _make("SparseConvTranspose2d", 2, transposed=True)
SparseConvTranspose3d = _make("SparseConvTranspose3d", 3, transposed=True)
SparseInverseConv1d = _make("SparseInverseConv1d", 1, inverse=True)
SparseInverseConv2d = _make("SparseInverseConv2d", 2, inverse=True)
SparseInverseConv3d = _make("SparseInverseConv3d", 3, inverse=True)
