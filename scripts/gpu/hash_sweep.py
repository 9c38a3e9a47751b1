"""GPU: the rulebook hash kernels at full scale against the probes each program handles (issue 6).

A probe loop in ``kiln.ops.hashing`` runs until the longest chain of its program ends, so the (voxel, offset)
probes per program (``hashing.PROBES_PER_PROGRAM``) trade waiting on unlucky lanes against launch width. Times
the table build, the submanifold neighbour map (3x3x3) and the strided conv maps (3x3x3, stride 2) on the
synthetic nuScenes / KITTI scenes for each setting, and the whole subm / strided rulebook build.

    python3 scripts/gpu/hash_sweep.py [--scenes nuscenes kitti] [--probes 128 256 512 1024 2048]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import cuda_time  # noqa: E402
from kiln.ops import hashing  # noqa: E402
from kiln.sparse.rulebook import build_conv, build_subm, conv_output_size, offset_table  # noqa: E402
from kiln.sparse.synthetic import SCENES, synthetic_voxels  # noqa: E402


def time_ms(fn) -> float:
    """ms per call: CUDA events around one call, median of 20 (bench.common.cuda_time)."""
    return cuda_time(fn, repeat=20, warmup=3, calls=1) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", nargs="+", default=["nuscenes", "kitti"])
    ap.add_argument("--probes", nargs="+", type=int, default=[128, 256, 512, 1024, 2048])
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for scene in args.scenes:
        shape, n = SCENES[scene]
        idx = synthetic_voxels(shape, n, seed=0).to(dev)
        rel = offset_table([3, 3, 3], [1, 1, 1], dev)
        out_shape = conv_output_size(shape, [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1])
        table = hashing.hash_build_voxels(idx, shape)
        for probes in args.probes:
            hashing.PROBES_PER_PROGRAM = probes
            t_build = time_ms(lambda: hashing.hash_build_voxels(idx, shape))
            t_nb = time_ms(lambda: hashing.neighbor_map(table, idx, shape, rel))
            t_cm = time_ms(lambda: hashing.conv_maps(idx, out_shape, [3, 3, 3], [2, 2, 2], [1, 1, 1],
                                                        [1, 1, 1], False, False))
            t_subm = time_ms(lambda: build_subm(idx, shape, [3, 3, 3], [1, 1, 1]))
            t_conv = time_ms(lambda: build_conv(idx, shape, [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1]))
            rows.append((scene, idx.shape[0], probes, t_build, t_nb, t_cm, t_subm, t_conv))
            print(rows[-1], flush=True)
    print("\nms (CUDA events, median of 20)")
    print(f"{'scene':9} {'voxels':>7} {'probes':>6} {'build':>7} {'nbmap':>7} {'convmap':>8} {'subm rb':>8} "
          f"{'conv rb':>8}")
    for scene, n, p, *t in rows:
        print(f"{scene:9} {n:7d} {p:6d} " + " ".join(f"{v:7.3f} " for v in t))


if __name__ == "__main__":
    main()
