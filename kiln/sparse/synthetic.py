"""Synthetic LiDAR-like voxel scenes: a ground band whose density falls off with range, plus object surfaces.

Scales (spatial shape [Z, Y, X], voxel count): KITTI [41, 1600, 1408] ~20k, nuScenes [41, 1440, 1440] ~150k,
Waymo [41, 1504, 1504] ~150k. Voxels are unique; the sensor sits at the centre of the grid at ground height.
"""

from __future__ import annotations

import math

import torch

from .tensor import SparseConvTensor

SCENES = {
    "kitti": ([41, 1600, 1408], 20_000),
    "nuscenes": ([41, 1440, 1440], 150_000),
    "waymo": ([41, 1504, 1504], 150_000),
}


def _ground(g, n, shape):
    Z, Y, X = shape
    # LiDAR rings: returns lie on concentric beams (radii growing geometrically), contiguous along each ring,
    # so ground voxels form connected arcs as in real scans; more returns per ring close to the sensor
    rings = 64
    radii = 6 * (min(Y, X) * 0.5 / 6) ** (torch.arange(rings, dtype=torch.float32) / (rings - 1))
    ring = torch.multinomial(1.0 / radii.sqrt(), n, replacement=True, generator=g)
    r = radii[ring] + torch.rand(n, generator=g) * 1.5
    a = torch.rand(n, generator=g) * 2 * math.pi
    y = (Y / 2 + r * torch.sin(a)).long()
    x = (X / 2 + r * torch.cos(a)).long()
    # a gently rolling ground surface a few voxels thick
    h = 3 + 1.5 * torch.sin(y.float() / 97.0) + 1.5 * torch.cos(x.float() / 131.0)
    z = (h + torch.rand(n, generator=g) * 2).long()
    return torch.stack([z, y, x], 1)


def _objects(g, n, shape, count):
    Z, Y, X = shape
    per = max(1, n // max(count, 1))
    pts = []
    for _ in range(count):
        cy, cx = torch.randint(20, Y - 60, (1,), generator=g).item(), torch.randint(20, X - 60, (1,), generator=g).item()
        ly, lx, lz = (torch.randint(15, 45, (1,), generator=g).item(), torch.randint(15, 45, (1,), generator=g).item(),
                      torch.randint(8, 18, (1,), generator=g).item())
        # points on the box faces (a LiDAR sees surfaces, not volumes)
        u = torch.rand(per, 3, generator=g)
        face = torch.randint(0, 5, (per,), generator=g)
        oy = (u[:, 0] * ly).long()
        ox = (u[:, 1] * lx).long()
        oz = (u[:, 2] * lz).long()
        oy = torch.where(face == 0, torch.zeros_like(oy), torch.where(face == 1, torch.full_like(oy, ly - 1), oy))
        ox = torch.where(face == 2, torch.zeros_like(ox), torch.where(face == 3, torch.full_like(ox, lx - 1), ox))
        oz = torch.where(face == 4, torch.full_like(oz, lz - 1), oz)
        pts.append(torch.stack([4 + oz, cy + oy, cx + ox], 1))
    return torch.cat(pts) if pts else torch.zeros(0, 3, dtype=torch.long)


def synthetic_voxels(spatial_shape=(41, 1600, 1408), num_voxels=20_000, batch_size=1, seed=0,
                     objects: int = 40) -> torch.Tensor:
    """int32 [~num_voxels * batch_size, 4] unique batch-first (b, z, y, x) indices of a LiDAR-like scene."""
    shape = [int(s) for s in spatial_shape]
    if len(shape) != 3 or min(shape) < 8 or shape[1] < 100 or shape[2] < 100:
        raise ValueError(f"spatial_shape must be [Z >= 8, Y >= 100, X >= 100], got {shape}")
    if num_voxels <= 0 or batch_size <= 0:
        raise ValueError(f"num_voxels ({num_voxels}) and batch_size ({batch_size}) must be positive")
    g = torch.Generator().manual_seed(seed)
    out = []
    Z, Y, X = shape
    for b in range(batch_size):
        keys = torch.zeros(0, dtype=torch.long)
        want = num_voxels
        while keys.numel() < num_voxels:
            n = int(want * 1.3) + 64
            pts = torch.cat([_ground(g, int(n * 0.7), shape), _objects(g, n - int(n * 0.7), shape, objects)])
            for d, s in enumerate(shape):
                pts[:, d] = pts[:, d].clamp(0, s - 1)
            k = (pts[:, 0] * Y + pts[:, 1]) * X + pts[:, 2]
            keys = torch.unique(torch.cat([keys, k]))
            want = num_voxels - keys.numel()
        keys = keys[torch.randperm(keys.numel(), generator=g)[:num_voxels]]
        keys = torch.sort(keys).values
        z, rem = keys // (Y * X), keys % (Y * X)
        out.append(torch.stack([torch.full_like(z, b), z, rem // X, rem % X], 1))
    return torch.cat(out).int()


def synthetic_scene(scene: str = "kitti", channels: int = 4, batch_size: int = 1, seed: int = 0,
                    dtype=torch.float32, device="cpu", num_voxels: int | None = None) -> SparseConvTensor:
    """A SparseConvTensor at one of ``SCENES``' scales with random features."""
    if scene not in SCENES:
        raise ValueError(f"scene must be one of {sorted(SCENES)}, got {scene!r}")
    shape, n = SCENES[scene]
    idx = synthetic_voxels(shape, num_voxels or n, batch_size, seed)
    g = torch.Generator().manual_seed(seed + 1)
    feats = torch.randn(idx.shape[0], channels, generator=g).to(dtype)
    return SparseConvTensor(feats.to(device), idx.to(device), shape, batch_size)
