"""SparseConvTensor: features of the active voxels plus their batch-first integer coordinates (spconv 2.x API)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kiln.ops import hashing
from kiln.ops._dispatch import FLOAT_DTYPES


class IndiceData:
    """What a convolution stores under its ``indice_key`` (spconv's field names), so later layers can reuse it."""

    def __init__(self, out_indices, indices, rulebook, spatial_shape, out_spatial_shape, is_subm, ksize, stride,
                 dilation, padding):
        self.out_indices = out_indices
        self.indices = indices
        self.rulebook = rulebook
        self.spatial_shape = list(spatial_shape)
        self.out_spatial_shape = list(out_spatial_shape)
        self.is_subm = is_subm
        self.ksize = list(ksize)
        self.stride = list(stride)
        self.dilation = list(dilation)
        self.padding = list(padding)

    @property
    def indice_pairs(self) -> torch.Tensor:
        return self.rulebook.indice_pairs()[0]

    @property
    def indice_pair_num(self) -> torch.Tensor:
        return self.rulebook.indice_pairs()[1]


def _shape_list(spatial_shape, name="spatial_shape") -> list[int]:
    if isinstance(spatial_shape, torch.Tensor):
        spatial_shape = spatial_shape.tolist()
    if isinstance(spatial_shape, np.ndarray):
        spatial_shape = spatial_shape.tolist()
    try:
        shape = [int(s) for s in spatial_shape]
    except TypeError as e:
        raise ValueError(f"{name} must be a sequence of ints, got {spatial_shape!r}") from e
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"{name} must be non-empty with positive sizes, got {shape}")
    return shape


def validate_sparse_input(features, indices, spatial_shape, batch_size) -> None:
    """Raise ValueError naming the problem: shapes, dtypes, out-of-range, negative or duplicate coordinates."""
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not isinstance(indices, torch.Tensor):
        raise ValueError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if features.dim() != 2:
        raise ValueError(f"features must be [N, C], got shape {tuple(features.shape)}")
    ndim = len(spatial_shape)
    if indices.dim() != 2 or indices.shape[1] != ndim + 1:
        raise ValueError(f"indices must be [N, {ndim + 1}] (batch index then {ndim} coordinates for spatial_shape "
                         f"{spatial_shape}), got shape {tuple(indices.shape)}")
    if indices.dtype != torch.int32:
        raise ValueError(f"indices must have dtype int32, got {str(indices.dtype).replace('torch.', '')}")
    if features.shape[0] != indices.shape[0]:
        raise ValueError(f"features has {features.shape[0]} rows but indices has {indices.shape[0]}: "
                         "features and indices length mismatch")
    if features.dtype not in FLOAT_DTYPES:
        raise ValueError(f"features must be float32/float16/bfloat16, got {features.dtype}")
    if features.device != indices.device:
        raise ValueError(f"features is on {features.device} but indices is on {indices.device}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if indices.shape[0] == 0:
        return
    from .rulebook import encode
    # one device sync for the three checks (one kernel on the GPU)
    n = indices.shape[0]
    negative, outside, ascending = hashing.voxel_checks(indices, spatial_shape, batch_size)
    if negative < n:
        raise ValueError(f"indices has negative entries, e.g. row {negative}: {indices[negative].tolist()}")
    if outside < n:
        raise ValueError(f"indices row {outside} = {indices[outside].tolist()} is outside batch_size {batch_size} / "
                         f"spatial_shape {list(spatial_shape)}")
    if ascending:
        return  # strictly increasing (sorted input, e.g. a layer's output): no duplicates, no sort needed
    keys = encode(indices[:, 1:].long(), indices[:, 0], spatial_shape)
    sk = torch.sort(keys).values
    dup = sk[1:] == sk[:-1]
    if bool(dup.any()):
        k = int(sk[1:][dup][0])
        raise ValueError(f"indices has duplicate coordinates ({int(dup.sum())} repeats), e.g. key {k}; "
                         "merge duplicate voxels before building a SparseConvTensor")


class SparseConvTensor:
    """``SparseConvTensor(features [N, C], indices [N, ndim+1] int32 (batch, z, y, x), spatial_shape, batch_size)``.

    ``indice_dict`` maps an ``indice_key`` to the rulebook a layer built, shared (same dict object) by every tensor
    derived from this one, so later layers with the same key reuse it. ``validate=False`` skips the input checks
    (internal use: layer outputs are valid by construction).
    """

    def __init__(self, features: torch.Tensor, indices: torch.Tensor, spatial_shape, batch_size: int,
                 grid: torch.Tensor | None = None, voxel_num: torch.Tensor | None = None,
                 indice_dict: dict | None = None, benchmark: bool = False, validate: bool = True, **_ignored: Any):
        shape = _shape_list(spatial_shape)
        if validate:
            validate_sparse_input(features, indices, shape, batch_size)
        self.features = features
        self.indices = indices
        self.spatial_shape = shape
        self.batch_size = int(batch_size)
        self.indice_dict = {} if indice_dict is None else indice_dict
        self.grid = grid
        self.voxel_num = voxel_num
        self.benchmark = benchmark
        self.benchmark_record: dict = {}

    @classmethod
    def _derived(cls, features: torch.Tensor, indices: torch.Tensor, spatial_shape: list[int], batch_size: int,
                 indice_dict: dict, benchmark: bool = False, grid=None, voxel_num=None) -> "SparseConvTensor":
        """A layer's output, built without ``__init__``'s parsing and checks: every argument comes from a tensor
        that passed them (or from a rulebook built from one). A backbone makes a few dozen of these per step."""
        new = cls.__new__(cls)
        new.features, new.indices, new.spatial_shape, new.batch_size = features, indices, spatial_shape, batch_size
        new.indice_dict, new.grid, new.voxel_num, new.benchmark = indice_dict, grid, voxel_num, benchmark
        new.benchmark_record = {}
        return new

    @property
    def spatial_size(self) -> int:
        return int(np.prod(self.spatial_shape))

    def find_indice_pair(self, key):
        if key is None:
            return None
        return self.indice_dict.get(key)

    def replace_feature(self, feature: torch.Tensor) -> "SparseConvTensor":
        """Same coordinates and shared ``indice_dict``, new features (must have the same number of rows)."""
        if not isinstance(feature, torch.Tensor) or feature.dim() != 2 or feature.shape[0] != self.indices.shape[0]:
            shape = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature).__name__
            raise ValueError(f"replace_feature needs features [{self.indices.shape[0]}, C], got {shape}")
        new = SparseConvTensor._derived(feature, self.indices, self.spatial_shape, self.batch_size, self.indice_dict,
                                        self.benchmark, self.grid, self.voxel_num)
        new.benchmark_record = self.benchmark_record
        return new

    def shadow_copy(self) -> "SparseConvTensor":
        return self.replace_feature(self.features)

    def dense(self, channels_first: bool = True) -> torch.Tensor:
        """[B, C, *spatial] (or [B, *spatial, C]) with zeros where no voxel is active; differentiable."""
        c = self.features.shape[1]
        out = self.features.new_zeros([self.batch_size] + self.spatial_shape + [c])
        idx = tuple(self.indices[:, i].long() for i in range(self.indices.shape[1]))
        out = out.index_put(idx, self.features)
        if channels_first:
            nd = len(self.spatial_shape)
            out = out.permute(0, nd + 1, *range(1, nd + 1)).contiguous()
        return out

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> "SparseConvTensor":
        """From a channels-last dense tensor [B, *spatial, C]: every site with a non-zero channel is active."""
        if not isinstance(x, torch.Tensor) or x.dim() < 3:
            raise ValueError(f"from_dense needs a channels-last tensor [B, *spatial, C], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        active = (x != 0).any(-1)
        idx = torch.nonzero(active)
        features = x[active]
        return cls(features, idx.int(), list(x.shape[1:-1]), x.shape[0], validate=False)

    def __repr__(self) -> str:
        return (f"SparseConvTensor(features={tuple(self.features.shape)} {self.features.dtype}, "
                f"spatial_shape={self.spatial_shape}, batch_size={self.batch_size})")
