"""kiln.sparse: spconv 2.x-compatible 3D sparse convolution on kiln's kernel layer.

``import kiln.sparse as spconv`` works for typical spconv 2.x model code (OpenPCDet backbones): the names below
match ``spconv.pytorch``. kiln adds ``deterministic()`` (bit-reproducible outputs and gradients) and
``algo='gather'|'implicit'`` on every convolution.
"""

from .conv import (ConvAlgo, SparseConv1d, SparseConv2d, SparseConv3d, SparseConvolution, SparseConvTranspose1d,
                   SparseConvTranspose2d, SparseConvTranspose3d, SparseInverseConv1d, SparseInverseConv2d,
                   SparseInverseConv3d, SubMConv1d, SubMConv2d, SubMConv3d)
from .modules import (RemoveGrid, SparseBatchNorm, SparseIdentity, SparseModule, SparseReLU, SparseSequential,
                      ToDense)
from .pool import (SparseAvgPool1d, SparseAvgPool2d, SparseAvgPool3d, SparseMaxPool1d, SparseMaxPool2d,
                   SparseMaxPool3d)
from .rulebook import deterministic, is_deterministic, set_deterministic
from .tensor import IndiceData, SparseConvTensor
from . import utils  # spconv.pytorch.utils' names (PointToVoxel)
from .voxelize import PointToVoxel

__all__ = [
    "ConvAlgo", "IndiceData", "RemoveGrid", "SparseAvgPool1d", "SparseAvgPool2d", "SparseAvgPool3d",
    "SparseBatchNorm", "SparseConv1d", "SparseConv2d", "SparseConv3d", "SparseConvTensor", "SparseConvTranspose1d",
    "SparseConvTranspose2d", "SparseConvTranspose3d", "SparseConvolution", "SparseIdentity", "SparseInverseConv1d",
    "SparseInverseConv2d", "SparseInverseConv3d", "SparseMaxPool1d", "SparseMaxPool2d", "SparseMaxPool3d",
    "SparseModule", "SparseReLU", "SparseSequential", "SubMConv1d", "SubMConv2d", "SubMConv3d", "ToDense",
    "deterministic", "is_deterministic", "set_deterministic", "utils",
]
