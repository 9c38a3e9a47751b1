"""PointToVoxel vs spconv's, the synthetic scene generator, and the VoxelBackBone8x example against spconv."""

import pytest
import torch

import kiln.sparse as ksp
from kiln.sparse.backbone import VoxelBackBone8x
from kiln.sparse.synthetic import synthetic_voxels
from kiln.sparse.voxelize import PointToVoxel

from .helpers import rel_err, requires_spconv_cpu


def test_point_to_voxel_matches_spconv():
    utils = pytest.importorskip("spconv.pytorch.utils")
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    pts = torch.rand(3000, 4, generator=g) * torch.tensor([12.0, 10.0, 4.0, 1.0]) - torch.tensor([1.0, 0, 0.5, 0])
    args = ([0.5, 0.5, 0.5], [0, 0, 0, 10, 8, 3], 4, 200, 5)  # more voxels than 200: overflow dropped
    assert ksp.utils.PointToVoxel is PointToVoxel  # spconv.pytorch.utils' name, for `import kiln.sparse as spconv`
    ours = PointToVoxel(*args)(pts)
    theirs = utils.PointToVoxel(*args)(pts)
    assert torch.equal(ours[1], theirs[1].int()), "ZYX coordinates in first-point order"
    assert torch.equal(ours[2], theirs[2].int())
    assert torch.equal(ours[0], theirs[0])


def test_point_to_voxel_rejects_bad_points():
    with pytest.raises(ValueError, match="pc must be"):
        PointToVoxel([1, 1, 1], [0, 0, 0, 4, 4, 4], 4, 10, 2)(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="kiln runs on 'cpu' or 'cuda', not 'mps'"):  # spconv's device argument
        PointToVoxel([1, 1, 1], [0, 0, 0, 4, 4, 4], 4, 10, 2, device="mps")


def test_synthetic_voxels_are_unique_in_range_and_lidar_like():
    idx = synthetic_voxels([41, 400, 352], 3000, batch_size=2, seed=3)
    assert idx.dtype == torch.int32 and idx.shape == (6000, 4)
    x = ksp.SparseConvTensor(torch.zeros(6000, 1), idx, [41, 400, 352], 2)  # validates range and uniqueness
    assert x.indices[:, 1].float().median() < 12, "most voxels are on the ground band"


@requires_spconv_cpu
def test_voxel_backbone_matches_spconv_with_same_state_dict():
    spconv = pytest.importorskip("spconv.pytorch")
    idx = synthetic_voxels([41, 160, 144], 1500, seed=torch.randint(0, 1000, ()).item())
    feats = torch.randn(idx.shape[0], 4)
    ours = VoxelBackBone8x(4).eval()
    theirs = VoxelBackBone8x(4, sp=spconv).eval()
    theirs.load_state_dict(ours.state_dict())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref, _ = theirs(spconv.SparseConvTensor(feats, idx, [41, 160, 144], 1))
        torch.set_num_threads(2)
        got, _ = ours(ksp.SparseConvTensor(feats, idx, [41, 160, 144], 1))
    finally:
        torch.set_num_threads(threads)
    assert got.spatial_shape == list(ref.spatial_shape) == [2, 20, 18]
    assert rel_err(got.dense(), ref.dense()) <= 1e-5
