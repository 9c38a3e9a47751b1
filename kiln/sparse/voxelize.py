"""PointToVoxel (spconv 2.x ``spconv.pytorch.utils.PointToVoxel``): points -> voxels, ZYX int32 coordinates."""

from __future__ import annotations

import torch

from kiln.ops._dispatch import resolve_device


class PointToVoxel:
    """``PointToVoxel(vsize_xyz, coors_range_xyz, num_point_features, max_num_voxels, max_num_points_per_voxel)``.

    Calling it with points [N, F] (x, y, z first) returns ``(voxels [M, P, F], indices [M, 3] int32 (z, y, x),
    num_points_per_voxel [M] int32)``. Voxels come in order of their first point; points beyond
    ``max_num_points_per_voxel`` and voxels beyond ``max_num_voxels`` are dropped, out-of-range points ignored.
    """

    def __init__(self, vsize_xyz, coors_range_xyz, num_point_features, max_num_voxels,
                 max_num_points_per_voxel, device=torch.device("cpu")):
        if len(vsize_xyz) != 3 or any(v <= 0 for v in vsize_xyz):
            raise ValueError(f"vsize_xyz must be 3 positive sizes, got {vsize_xyz}")
        if len(coors_range_xyz) != 6 or any(coors_range_xyz[i + 3] <= coors_range_xyz[i] for i in range(3)):
            raise ValueError(f"coors_range_xyz must be [xmin, ymin, zmin, xmax, ymax, zmax], got {coors_range_xyz}")
        if num_point_features < 3 or max_num_voxels <= 0 or max_num_points_per_voxel <= 0:
            raise ValueError("num_point_features must be >= 3 and the voxel / point limits positive")
        self.vsize = torch.tensor(vsize_xyz, dtype=torch.float32)
        self.range = torch.tensor(coors_range_xyz, dtype=torch.float32)
        grid = torch.round((self.range[3:] - self.range[:3]) / self.vsize).long()
        self.grid_size = grid.tolist()  # xyz
        self.num_point_features = num_point_features
        self.max_num_voxels = max_num_voxels
        self.max_num_points_per_voxel = max_num_points_per_voxel
        self.device = resolve_device(device)

    def __call__(self, pc: torch.Tensor, clear_voxels: bool = True, empty_mean: bool = False):
        if not isinstance(pc, torch.Tensor) or pc.dim() != 2 or pc.shape[1] != self.num_point_features:
            raise ValueError(f"pc must be [N, {self.num_point_features}], got "
                             f"{tuple(pc.shape) if isinstance(pc, torch.Tensor) else type(pc).__name__}")
        dev = pc.device
        vsize, lo = self.vsize.to(dev), self.range[:3].to(dev)
        gx, gy, gz = self.grid_size
        c = torch.floor((pc[:, :3].float() - lo) / vsize).long()  # xyz
        inside = ((c >= 0) & (c < torch.tensor([gx, gy, gz], device=dev))).all(1)
        pidx = torch.nonzero(inside).view(-1)
        c = c[pidx]
        key = (c[:, 2] * gy + c[:, 1]) * gx + c[:, 0]
        uniq, inv = torch.unique(key, return_inverse=True)
        first = torch.full((uniq.numel(),), pidx.numel(), dtype=torch.long, device=dev)
        first = first.scatter_reduce(0, inv, torch.arange(pidx.numel(), device=dev), "amin")
        order = torch.argsort(first)  # voxels in order of first appearance
        rank_of = torch.empty_like(order)
        rank_of[order] = torch.arange(order.numel(), device=dev)
        vid = rank_of[inv]  # voxel id per kept point
        # position of each point within its voxel (stable: point order)
        srt = torch.sort(vid, stable=True)
        counts_all = torch.bincount(vid, minlength=uniq.numel())
        starts = torch.cumsum(counts_all, 0) - counts_all
        slot = torch.empty_like(vid)
        slot[srt.indices] = torch.arange(vid.numel(), device=dev) - starts[srt.values]
        m = min(uniq.numel(), self.max_num_voxels)
        keep = (vid < m) & (slot < self.max_num_points_per_voxel)
        voxels = pc.new_zeros(m, self.max_num_points_per_voxel, self.num_point_features)
        voxels[vid[keep], slot[keep]] = pc[pidx[keep]]
        num = counts_all[:m].clamp(max=self.max_num_points_per_voxel).int()
        k = uniq[order][:m]
        indices = torch.stack([k // (gy * gx), (k // gx) % gy, k % gx], 1).int()
        if empty_mean:
            mean = voxels.sum(1) / num.clamp_min(1).unsqueeze(1).to(voxels.dtype)
            pad = torch.arange(self.max_num_points_per_voxel, device=dev).unsqueeze(0) >= num.unsqueeze(1)
            voxels = torch.where(pad.unsqueeze(-1), mean.unsqueeze(1), voxels)
        return voxels, indices, num
