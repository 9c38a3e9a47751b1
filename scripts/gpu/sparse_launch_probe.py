"""Where the host time of kiln.sparse's backbone goes, without a profiler's distortion (issue 6).

Two parts, both on the GPU:
1. One small implicit-GEMM call, taken apart: the whole call, the tuned launch alone (JIT dispatch vs
   ``DirectLauncher``), the compiled kernel's launcher alone, and the Python wrapper with the launch stubbed out.
2. The backbone's forward+backward with wall-clock timers wrapped around its pieces (rulebook builds, convolution
   forward and backward, weight gradients, BatchNorm, ReLU, tensor construction, every Triton launch): inclusive
   host time per piece per call. Each timer costs ~1 µs.

    python3 scripts/gpu/sparse_launch_probe.py [--scene nuscenes] [--dtype fp16]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import kiln.sparse as ksp  # noqa: E402
from kiln.ops import _triton, sparse_gemm  # noqa: E402
from kiln.sparse.backbone import VoxelBackBone8x  # noqa: E402
from kiln.sparse.synthetic import SCENES, synthetic_voxels  # noqa: E402


def per_call_us(fn, calls=2000, rounds=3) -> float:
    best = float("inf")
    for _ in range(rounds):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return best


def launch_parts(dtype):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    R, K, C = 4096, 27, 16
    x = torch.randn(R, C, device=dev, dtype=dtype, generator=g)
    w = torch.randn(K, C, C, device=dev, dtype=dtype, generator=g)
    pm = torch.randint(-1, R, (R, K), dtype=torch.int32, device=dev, generator=g)
    ref = sparse_gemm.implicit_gemm(x, w, pm, None, None)
    kern, _ = sparse_gemm._tuned()
    captured = {}
    real_call = _triton.TunedLauncher.__call__

    def capture(self, key, grid, *args, **kwargs):
        captured.update(key=key, grid=grid, args=args, kwargs=kwargs)
        return real_call(self, key, grid, *args, **kwargs)

    _triton.TunedLauncher.__call__ = capture
    sparse_gemm.implicit_gemm(x, w, pm, None, None)
    _triton.TunedLauncher.__call__ = real_call
    cfg = kern.best[captured["key"]]
    args, kwargs, grid = captured["args"], {**captured["kwargs"], **cfg}, captured["grid"]
    gt = grid({**dict(zip(kern.tuned.fn.arg_names, args)), **kwargs})
    kern.direct[grid](*args, **kwargs)
    compiled = next(iter(kern.direct.cache.values()))[0]  # (compiled kernel, keyword tail)
    names = kern.tuned.fn.arg_names
    full = list(args) + [kwargs[n] for n in names[len(args):]]
    stream = torch.cuda.current_stream().cuda_stream
    rows = {
        "implicit_gemm(), JIT dispatch": lambda: sparse_gemm.implicit_gemm(x, w, pm, None, None),
        "implicit_gemm(), direct": lambda: sparse_gemm.implicit_gemm(x, w, pm, None, None),
        "tuned.fn[grid](...) (JIT)": lambda: kern.tuned.fn[grid](*args, **kwargs),
        "DirectLauncher[grid](...)": lambda: kern.direct[grid](*args, **kwargs),
        "compiled.run(...) alone": lambda: compiled.run(gt[0], gt[1], 1, stream, compiled.function,
                                                        compiled.packed_metadata, None, None, None, *full),
        "torch.add": lambda: torch.add(x, x),
    }
    out = {}
    for name, fn in rows.items():
        _triton.DIRECT_LAUNCH = "JIT" not in name
        out[name] = per_call_us(fn)
    _triton.DIRECT_LAUNCH = True
    _triton.TunedLauncher.__call__ = lambda *a, **k: None
    out["implicit_gemm() wrapper, launch stubbed"] = per_call_us(lambda: sparse_gemm.implicit_gemm(x, w, pm))
    _triton.TunedLauncher.__call__ = real_call
    same = torch.equal(ref, sparse_gemm.implicit_gemm(x, w, pm, None, None))
    print(f"\n== host µs per call, small implicit GEMM ({dtype}; direct result bit-identical: {same}; "
          f"direct cache {len(kern.direct.cache)} variants)")
    for k, v in out.items():
        print(f"  {k:42} {v:7.1f}")


class Timers:
    """Inclusive wall time per wrapped function, and call counts."""

    def __init__(self):
        self.t = defaultdict(float)
        self.n = defaultdict(int)
        self.undo = []

    def wrap(self, owner, attr, label):
        orig = getattr(owner, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                self.t[label] += time.perf_counter() - t0
                self.n[label] += 1
        setattr(owner, attr, timed)
        self.undo.append((owner, attr, orig))

    def restore(self):
        for owner, attr, orig in reversed(self.undo):
            setattr(owner, attr, orig)


def breakdown(scene, dtype, calls=10):
    from triton.runtime.jit import JITFunction

    from kiln.sparse import conv, functional, rulebook, tensor
    dev = torch.device("cuda")
    shape, n = SCENES[scene]
    idx = synthetic_voxels(shape, n, seed=0).to(dev)
    feats = torch.randn(idx.shape[0], 64, device=dev, dtype=dtype)
    net = VoxelBackBone8x(64).to(dev).to(dtype).train()
    leaf = feats.clone().requires_grad_()

    def step():
        out, _ = net(ksp.SparseConvTensor(leaf, idx, shape, 1))
        out.features.float().sum().backward()
        leaf.grad = None
        net.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    T = Timers()
    T.wrap(conv, "get_rulebook", "get_rulebook (fwd)")
    T.wrap(conv, "build_subm", "  build_subm")
    T.wrap(conv, "build_conv", "  build_conv")
    T.wrap(functional.SparseConvFunction, "forward", "conv Function.forward")
    T.wrap(functional.SparseConvFunction, "backward", "conv Function.backward")
    T.wrap(functional, "_apply", "  _apply (fwd + dx)")
    T.wrap(sparse_gemm, "weight_grad", "  weight_grad")
    T.wrap(rulebook.Rulebook, "fwd_schedule", "  fwd_schedule (masks, sort)")
    T.wrap(rulebook.Rulebook, "compact_pairs", "  compact_pairs")
    T.wrap(tensor.SparseConvTensor, "__init__", "SparseConvTensor.__init__")
    T.wrap(torch.nn.BatchNorm1d, "forward", "BatchNorm1d.forward")
    T.wrap(torch.nn.ReLU, "forward", "ReLU.forward")
    T.wrap(JITFunction, "run", "Triton JIT run (any)")
    T.wrap(_triton.DirectLauncher, "launch", "DirectLauncher.launch (any)")
    from triton.backends.nvidia.driver import CudaLauncher
    T.wrap(CudaLauncher, "__call__", "  compiled launcher (any)")
    T.wrap(torch.nn.functional, "batch_norm", "  F.batch_norm")
    fwd_t, bwd_t, wall = [], [], []
    try:
        for _ in range(calls):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out, _ = net(ksp.SparseConvTensor(leaf, idx, shape, 1))
            t1 = time.perf_counter()
            out.features.float().sum().backward()
            t2 = time.perf_counter()
            leaf.grad = None
            net.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            fwd_t.append(t1 - t0)
            bwd_t.append(t2 - t1)
            wall.append(time.perf_counter() - t0)
    finally:
        T.restore()
    med = lambda v: 1e3 * sorted(v)[len(v) // 2]  # noqa: E731
    print(f"\n== {scene} {dtype} backbone: forward enqueue {med(fwd_t):.2f} ms, backward enqueue {med(bwd_t):.2f} ms, "
          f"wall {med(wall):.2f} ms (medians of {calls}); timers: ms per call (calls per call)")
    for label in T.t:
        print(f"  {label:36} {1e3 * T.t[label] / calls:7.3f}  ({T.n[label] / calls:.0f})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", nargs="*", default=["nuscenes"], choices=sorted(SCENES),
                    help="backbones to break down (none: the launch timings only)")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--gc-off", action="store_true",
                    help="also break the backbone down with Python's cyclic GC disabled (what GC pauses cost)")
    args = ap.parse_args()
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    launch_parts(dtype)
    for s in args.scenes:
        for direct_on in (True, False):
            _triton.DIRECT_LAUNCH = direct_on
            print(f"\n(direct launch {'on' if direct_on else 'off'})")
            breakdown(s, dtype)
        if args.gc_off:
            import gc
            _triton.DIRECT_LAUNCH = True
            gc.collect()
            gc.disable()
            print("\n(direct launch on, cyclic GC off)")
            breakdown(s, dtype)
            gc.enable()
    _triton.DIRECT_LAUNCH = True


if __name__ == "__main__":
    main()
