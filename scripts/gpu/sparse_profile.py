"""Where kiln.sparse spends its time on the GPU (issue 6): torch.profiler over the rows spconv wins.

Session 5 on an H100 measured kiln at 0.2-0.45x of spconv on "rulebook+fwd" (2.3-5.8 ms vs 0.5-1.9 ms at 150k
voxels) and 0.39-0.59x on the backbone's forward+backward, while the cached convolutions won (up to 3.8x). This
profiles one scene's subm and strided rulebook+fwd and the backbone, and prints per row: wall time, the top ops by
GPU time and by CPU time, and the host syncs (device-to-host copies, stream / device synchronisations) -- a
rulebook whose GPU work is small but whose host side waits is latency-bound, and the fix differs.

    python3 scripts/gpu/sparse_profile.py [--scene nuscenes] [--dtype fp16] [--top 18]   # GPU
    python3 scripts/gpu/sparse_profile.py --scene kitti --voxels 3000 --channels 8         # CPU dry run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import kiln.sparse as ksp  # noqa: E402
from kiln.sparse.backbone import VoxelBackBone8x  # noqa: E402
from kiln.sparse.synthetic import SCENES, synthetic_voxels  # noqa: E402

SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "Memcpy DtoH",
              "cudaMemcpyAsync", "aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::unique")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def wall_ms(fn, dev, repeat=10):
    for _ in range(3):
        fn()
    sync(dev)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def report(name, fn, dev, top):
    ms = wall_ms(fn, dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(5):
            fn()
        sync(dev)
    avg = prof.key_averages()
    print(f"\n== {name}: {ms:.3f} ms per call (median of 10, wall, synchronised); profile of 5 calls")
    if dev.type == "cuda":
        print(avg.table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60))
    print(avg.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60))
    counts = {e.key: e.count for e in avg if any(s in e.key for s in SYNC_NAMES)}
    print("host-sync suspects (calls in 5 iterations): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    kernels = sum(e.count for e in avg if e.device_type == torch.autograd.DeviceType.CUDA) if dev.type == "cuda" else 0
    print(f"GPU kernels per call: {kernels / 5:.0f}")
    return ms


def python_profile(fn, dev, top):
    """cProfile of 5 calls: the backbone is host-bound when its wall time exceeds its GPU time, and this says
    which Python functions (kernel launchers, checks, autograd glue) the host time goes to."""
    import cProfile
    import pstats

    fn()
    sync(dev)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        fn()
    sync(dev)
    prof.disable()
    print("\n== backbone fwd+bwd, Python profile of 5 calls (by own time, then cumulative)")
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top + 12)


def dump_backbone(fn, dev, out_dir: Path, tag: str) -> None:
    """What the host does during the backbone, saved for reading off the machine: the synchronising calls (with
    their Python line), the host time to enqueue one call (no final sync) vs its synchronised wall time, a cProfile
    of 10 calls (``.pstats``) and a gzipped Chrome trace of 2 calls with Python stacks."""
    import cProfile
    import gzip
    import shutil
    import warnings

    out_dir.mkdir(parents=True, exist_ok=True)
    fn()
    sync(dev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cuda = dev.type == "cuda"
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs: dict = {}
    for w in caught:
        key = f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0][:80]}"
        syncs[key] = syncs.get(key, 0) + 1
    enq, wall = [], []
    for _ in range(10):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync(dev)
        enq.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    lines = [f"{tag}: enqueue {1e3 * sorted(enq)[5]:.3f} ms, wall {1e3 * sorted(wall)[5]:.3f} ms (medians of 10)",
             f"synchronising calls in one call: {sum(syncs.values())}"]
    lines += [f"  {v:3d}  {k}" for k, v in sorted(syncs.items(), key=lambda kv: -kv[1])]
    print("\n".join(lines))
    (out_dir / f"{tag}_host.txt").write_text("\n".join(lines) + "\n")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        fn()
    sync(dev)
    prof.disable()
    prof.dump_stats(str(out_dir / f"{tag}.pstats"))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts, with_stack=True) as tp:
        for _ in range(2):
            fn()
        sync(dev)
    # which ops run how often (2 calls): the host pays per launch, so the counts say where launches can go
    with profile(activities=acts) as cp:
        for _ in range(2):
            fn()
        sync(dev)
    (out_dir / f"{tag}_ops.txt").write_text(
        cp.key_averages().table(sort_by="count", row_limit=90, max_name_column_width=70) + "\n")
    trace = out_dir / f"{tag}_trace.json"
    tp.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scene", default="nuscenes", choices=sorted(SCENES))
    ap.add_argument("--voxels", type=int, default=None)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--cprofile", action="store_true",
                    help="also the Python-level profile of the backbone (where host time goes, by function)")
    ap.add_argument("--dump", default=None, help="a folder: write the backbone's host profile files there "
                    "(syncs, enqueue vs wall, .pstats, Chrome trace) and skip the single-layer rows")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if args.dtype == "fp16" and dev.type == "cuda" else torch.float32
    shape, n = SCENES[args.scene]
    idx = synthetic_voxels(shape, args.voxels or n, 1, seed=0).to(dev)
    feats = torch.randn(idx.shape[0], args.channels, device=dev, dtype=dtype)
    print(f"{args.scene}: {idx.shape[0]} voxels in {list(shape)}, {args.channels} ch, {dtype}, {dev} "
          f"({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'})")

    subm = ksp.SubMConv3d(args.channels, args.channels, 3, padding=1, bias=False, indice_key="k").to(dev, dtype)
    strided = ksp.SparseConv3d(args.channels, 2 * args.channels, 3, stride=2, padding=1, bias=False,
                               indice_key="s").to(dev, dtype)

    def make():
        return ksp.SparseConvTensor(feats, idx, shape, 1)

    def subm_fwd():
        with torch.no_grad():
            return subm(make())

    def strided_fwd():
        with torch.no_grad():
            return strided(make())

    x = make()
    with torch.no_grad():
        subm(x)

    def subm_cached():
        with torch.no_grad():
            return subm(x)

    net = VoxelBackBone8x(args.channels, sp=ksp).to(dev).to(dtype).train()
    leaf = feats.clone().requires_grad_()

    def backbone():
        out, _ = net(ksp.SparseConvTensor(leaf, idx, shape, 1))
        out.features.float().sum().backward()
        leaf.grad = None
        net.zero_grad(set_to_none=True)

    if args.dump:
        dump_backbone(backbone, dev, Path(args.dump), f"{args.scene}_{args.dtype}")
        return 0
    rows = [("SparseConvTensor(...) with validation", make), ("subm rulebook+fwd", subm_fwd),
            ("subm cached fwd", subm_cached), ("strided rulebook+fwd", strided_fwd),
            ("backbone fwd+bwd", backbone)]
    summary = [(name, report(name, fn, dev, args.top)) for name, fn in rows]
    if args.cprofile:
        python_profile(backbone, dev, args.top)
    print("\n== summary (ms per call)")
    for name, ms in summary:
        print(f"{name:<40} {ms:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
