"""Sparse max / average pooling (spconv 2.x signatures): windows over the active voxels only."""

from __future__ import annotations

from . import functional as Fsp
from .conv import _check_input, _tuple, get_rulebook
from .modules import SparseModule
from .tensor import SparseConvTensor


class SparsePool(SparseModule):
    """Output sites as a regular convolution with the same window; empty sites never enter the max or the mean."""

    def __init__(self, ndim, kernel_size, stride=None, padding=0, dilation=1, indice_key=None, subm=False,
                 algo=None, record_voxel_count=False, name=None, mode="max"):
        super().__init__()
        self.ndim = ndim
        self.kernel_size = _tuple(kernel_size, ndim, "kernel_size")
        self.stride = _tuple(self.kernel_size if stride is None else stride, ndim, "stride")
        self.padding = _tuple(padding, ndim, "padding")
        self.dilation = _tuple(dilation, ndim, "dilation")
        if any(k <= 0 for k in self.kernel_size) or any(s <= 0 for s in self.stride) or \
                any(d <= 0 for d in self.dilation) or any(p < 0 for p in self.padding):
            raise ValueError(f"kernel_size {self.kernel_size}, stride {self.stride}, dilation {self.dilation} must "
                             f"be positive and padding {self.padding} non-negative")
        if subm and any(s != 1 for s in self.stride):
            raise ValueError(f"submanifold pooling needs stride 1, got {self.stride}")
        self.subm = subm
        self.indice_key = indice_key
        self.mode = mode
        self.name = name

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def forward(self, input: SparseConvTensor) -> SparseConvTensor:
        name = type(self).__name__
        _check_input(input, self.ndim, None, name)
        out_indices, out_shape, rb = get_rulebook(
            input, ndim=self.ndim, ksize=self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, subm=self.subm, indice_key=self.indice_key, name=name)
        f = Fsp.sparse_max_pool if self.mode == "max" else Fsp.sparse_avg_pool
        return SparseConvTensor(f(input.features, rb), out_indices, out_shape, input.batch_size,
                                indice_dict=input.indice_dict, benchmark=input.benchmark, validate=False)


def _make(cls_name, ndim, mode):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, indice_key=None, subm=False, algo=None,
                 record_voxel_count=False, name=None):
        SparsePool.__init__(self, ndim, kernel_size, stride, padding, dilation, indice_key, subm, algo,
                            record_voxel_count, name, mode)
    return type(cls_name, (SparsePool,), {"__init__": __init__, "__module__": __name__})


SparseMaxPool1d = _make("SparseMaxPool1d", 1, "max")
SparseMaxPool2d = _make("SparseMaxPool2d", 2, "max")
SparseMaxPool3d = _make("SparseMaxPool3d", 3, "max")
SparseAvgPool1d = _make("SparseAvgPool1d", 1, "avg")
SparseAvgPool2d = _make("SparseAvgPool2d", 2, "avg")
SparseAvgPool3d = _make("SparseAvgPool3d", 3, "avg")
