"""GPU A/B of host-side choices in kiln.sparse, interleaved in one process (issue 6).

The backbone is host-bound on the device machines and its time moves by tens of percent between machine starts,
so variants are only compared inside one process, round-robin: each round times every variant once per row,
starting each round with the next variant (the first one timed in a round runs slower).

Variants:
* ``default`` -- as shipped.
* ``unordered`` -- rows not sorted by offset mask (no ``torch.sort`` per rulebook; the kernels still skip the
  offsets a tile does not use, but unsorted tiles skip fewer).
* ``no-validate`` -- ``SparseConvTensor(..., validate=False)``: what the input checks (one kernel, one host sync)
  cost; spconv does not check its input.
* ``sort-min-64k`` / ``sort-all`` -- rulebooks under 65,536 output rows skip the mask sort (the default since
  session 8), or every rulebook is sorted (``rulebook.SORT_MIN_ROWS`` = 0, the earlier default).
* ``wgrad-map`` / ``wgrad-lists`` -- weight gradients from the dense pair map, or from its compacted pairs
  (``sparse_gemm.WGRAD_MODE``; the default, ``auto``, takes the lists for fp32 only).
* ``lists-all-fp32`` -- fp32 weight gradients from compacted lists at every size (``LISTS_MIN_ROWS`` = 0, the
  default before session 11; it is 65,536 since).
* ``sort-any-work`` -- large rulebooks sorted whatever the channels of the layer asking (``SORT_MIN_WORK`` = 0, the
  default before session 11).
* ``sort-work-1g`` / ``sort-work-256m`` -- the mask sort only where rows x Cin x Cout >= 2**30 (``SORT_MIN_WORK``,
  the default since session 16: a 64-channel layer at 150k voxels runs unsorted) or >= 2**28 (sessions 11-15).
* ``direct-off`` -- every Triton launch through Triton's JIT dispatch instead of ``_triton.DirectLauncher``.

Per-launch host costs (JIT dispatch vs direct launch) are timed by ``scripts/gpu/sparse_launch_probe.py``.

    python3 scripts/gpu/sparse_host_ab.py [--scene nuscenes] [--dtype fp16] [--rounds 5] [--variants ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import kiln.sparse as ksp  # noqa: E402
from bench.common import median_time  # noqa: E402
from kiln.ops import _triton, sparse_gemm  # noqa: E402
from kiln.sparse import rulebook as rbmod  # noqa: E402
from kiln.sparse.backbone import VoxelBackBone8x  # noqa: E402
from kiln.sparse.synthetic import SCENES, synthetic_voxels  # noqa: E402

ORIGINAL_SCHEDULE = rbmod.Rulebook.fwd_schedule


def _unordered(self, channels=None):
    if "fwd_sched" not in self._cache:
        m = self._cache.get("fwd_masks")
        self._cache["fwd_sched"] = (None, rbmod.offset_masks(self.pair_fwd()) if m is None else m)
    return self._cache["fwd_sched"]


def wall_ms(fn) -> float:
    """ms per call, wall clock synchronised around each call (host time included: the point here)."""
    return median_time(fn, repeat=7, warmup=2) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scene", default="nuscenes", choices=sorted(SCENES))
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["default", "unordered", "no-validate"],
                    choices=["default", "unordered", "no-validate", "sort-min-64k", "sort-all", "wgrad-map",
                             "wgrad-lists", "lists-all-fp32", "sort-any-work", "sort-work-1g", "sort-work-256m", "direct-off"])
    args = ap.parse_args()
    dev = torch.device("cuda")
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    shape, n = SCENES[args.scene]
    idx = synthetic_voxels(shape, n, seed=0).to(dev)
    feats = torch.randn(idx.shape[0], args.channels, device=dev, dtype=dtype)
    validate = {"on": True}

    def make(f=feats):
        return ksp.SparseConvTensor(f, idx, shape, 1, validate=validate["on"])

    subm = ksp.SubMConv3d(args.channels, args.channels, 3, padding=1, bias=False, indice_key="k").to(dev, dtype)
    strided = ksp.SparseConv3d(args.channels, 2 * args.channels, 3, stride=2, padding=1, bias=False,
                               indice_key="s").to(dev, dtype)
    net = VoxelBackBone8x(args.channels).to(dev).to(dtype).train()
    leaf = feats.clone().requires_grad_()

    def subm_rb():
        with torch.no_grad():
            subm(make())

    def strided_rb():
        with torch.no_grad():
            strided(make())

    def strided_fwd_bwd():
        x = make(leaf)
        y = strided(x)
        y.features.float().sum().backward()
        leaf.grad = None

    def backbone():
        out, _ = net(make(leaf))
        out.features.float().sum().backward()
        leaf.grad = None
        net.zero_grad(set_to_none=True)

    def subm_cached():  # the rulebook (and its schedule) built once per variant, then reused
        with torch.no_grad():
            subm(cached["x"])

    def subm_fwd_bwd():
        x = make(leaf)
        y = subm(x)
        y.features.float().sum().backward()
        leaf.grad = None

    cached = {}
    rows = {"subm rulebook+fwd": subm_rb, "subm cached fwd": subm_cached, "subm rb+fwd+bwd": subm_fwd_bwd,
            "strided rulebook+fwd": strided_rb, "strided rb+fwd+bwd": strided_fwd_bwd, "backbone fwd+bwd": backbone}

    shipped_mode = sparse_gemm.WGRAD_MODE
    shipped_sort_min = rbmod.SORT_MIN_ROWS
    shipped_lists_min = sparse_gemm.LISTS_MIN_ROWS
    shipped_sort_work = rbmod.SORT_MIN_WORK

    def set_variant(v):
        rbmod.Rulebook.fwd_schedule = _unordered if v == "unordered" else ORIGINAL_SCHEDULE
        validate["on"] = v != "no-validate"
        sparse_gemm.WGRAD_MODE = {"wgrad-map": "map", "wgrad-lists": "lists"}.get(v, shipped_mode)
        rbmod.SORT_MIN_ROWS = {"sort-min-64k": 65536, "sort-all": 0}.get(v, shipped_sort_min)
        _triton.DIRECT_LAUNCH = v != "direct-off"
        sparse_gemm.LISTS_MIN_ROWS = 0 if v == "lists-all-fp32" else shipped_lists_min
        rbmod.SORT_MIN_WORK = {"sort-any-work": 0, "sort-work-1g": 2**30, "sort-work-256m": 2**28}.get(
            v, shipped_sort_work)

    variants = args.variants
    res = {(r, v): [] for r in rows for v in variants}
    for rnd in range(args.rounds):
        # each round starts with the next variant: in session 11 the variant timed first in a round ran 5-10%
        # slower on single-layer rows, whichever it was; rotating spreads that over all variants
        for v in variants[rnd % len(variants):] + variants[:rnd % len(variants)]:
            set_variant(v)
            cached["x"] = make()
            with torch.no_grad():
                subm(cached["x"])  # builds this variant's rulebook and schedule, untimed
            for r, fn in rows.items():
                res[(r, v)].append(wall_ms(fn))
    set_variant("default")
    print(f"\n{args.scene} {args.dtype}, {args.channels} ch, {torch.cuda.get_device_name(0)}: ms, median of "
          f"{args.rounds} interleaved rounds (each a median of 7)")
    print(f"{'row':24}" + "".join(f"{v:>14}" for v in variants))
    for r in rows:
        base = statistics.median(res[(r, variants[0])])
        cells = []
        for v in variants:
            m = statistics.median(res[(r, v)])
            cells.append(f"{m:8.3f} {base / m:4.2f}x")
        print(f"{r:24}" + "".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    main()
