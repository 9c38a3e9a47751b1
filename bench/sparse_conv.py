"""kiln.sparse vs spconv 2.3.8 on synthetic LiDAR scenes, in one process, identical voxels and weights.

Rows per scene and dtype: subm 3x3x3 (C->C) and strided 3x3x3 s2 (C->2C) convolution —
rulebook build + forward, forward with a cached rulebook, forward+backward (cached rulebook) — and the whole
VoxelBackBone8x forward+backward (rulebooks built inside, as in training). Times are medians of alternating calls
(kiln, spconv, kiln, ...: drift on a shared machine hits both alike; before session 12 each side's repeats ran in a
block); ratio = spconv / kiln (> 1 means kiln is faster). Without spconv the anchor column is empty ("spconv not
installed").

CPU: both run with the same torch thread count (default 1: spconv's CPU path races with more threads).
    python bench/sparse_conv.py --scenes kitti --dtypes fp32
GPU (full scale):
    python bench/sparse_conv.py --scenes kitti nuscenes waymo --dtypes fp16 fp32 --out $OUT/sparse_conv.json
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Table, device_name, median_time, paired_median_times  # noqa: E402

import kiln.sparse as ksp  # noqa: E402
from kiln.sparse.backbone import VoxelBackBone8x  # noqa: E402
from kiln.sparse.synthetic import SCENES, synthetic_voxels  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_spconv():
    try:
        import spconv.pytorch as spconv
    except Exception as e:  # not installed, or a wheel that does not match this machine
        print(f"spconv not installed ({type(e).__name__}: {e}); running kiln only")
        return None
    if not torch.cuda.is_available():
        # spconv 2.3.8's CPU backward asks for the current CUDA stream even for CPU tensors; it is unused there
        import spconv.pytorch.ops as spops
        spops.get_current_stream = lambda: 0
    return spconv


def make_input(lib, feats, idx, shape, batch):
    return lib.SparseConvTensor(feats, idx, shape, batch)


def conv_rows(lib, feats, idx, shape, batch, cin, dtype, device, seed, kind):
    """Three timed callables for one library: rulebook+fwd, cached fwd, fwd+bwd (cached)."""
    torch.manual_seed(seed)
    if kind == "subm":
        conv = lib.SubMConv3d(cin, cin, 3, padding=1, bias=False, indice_key="k")
    else:
        conv = lib.SparseConv3d(cin, 2 * cin, 3, stride=2, padding=1, bias=False, indice_key="k")
    return conv.to(device=device, dtype=dtype)


def build_callables(lib, conv, feats, idx, shape, batch):
    def rulebook_fwd():
        with torch.no_grad():
            return conv(make_input(lib, feats, idx, shape, batch))

    cached_in = make_input(lib, feats, idx, shape, batch)
    with torch.no_grad():
        conv(cached_in)  # stores the rulebook under the key

    def cached_fwd():
        with torch.no_grad():
            return conv(cached_in)

    leaf = feats.clone().requires_grad_()
    grad_in = cached_in.replace_feature(leaf)
    out = conv(grad_in)
    g = torch.randn_like(out.features)

    def fwd_bwd():
        y = conv(grad_in)
        y.features.backward(g)
        leaf.grad = None

    return rulebook_fwd, cached_fwd, fwd_bwd


def backbone_callable(lib, state, feats, idx, shape, batch, dtype, device):
    net = VoxelBackBone8x(feats.shape[1], sp=lib).to(device)
    net.load_state_dict(state)
    net = net.to(dtype).train()
    leaf = feats.clone().requires_grad_()

    def run():
        out, _ = net(make_input(lib, leaf, idx, shape, batch))
        out.features.float().sum().backward()
        leaf.grad = None
        net.zero_grad(set_to_none=True)
    return run


def ms(fn, repeat, warmup):
    return median_time(fn, repeat=repeat, warmup=warmup) * 1e3


def ms_pair(ours, anchor, repeat, warmup):
    """(ours, anchor) median ms, timed in alternating calls (``paired_median_times``); anchor None: ours alone."""
    if anchor is None:
        return ms(ours, repeat, warmup), None
    a, b = paired_median_times([ours, anchor], repeat=repeat, warmup=warmup)
    return a * 1e3, b * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", nargs="+", default=["kitti"], choices=sorted(SCENES))
    p.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES))
    p.add_argument("--channels", type=int, default=None, help="conv channels (default 64 on GPU, 32 on CPU)")
    p.add_argument("--voxels", type=int, default=None, help="override the scene's voxel count")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU, for both libraries")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--no-backbone", action="store_true")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="skip the remaining rows after this much wall time (the table so far is still printed)")
    p.add_argument("--out", default="bench/sparse_conv.json")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes or (["fp16", "fp32"] if cuda else ["fp32"])
    channels = args.channels or (64 if cuda else 32)
    repeat = args.repeat or (20 if cuda else 3)
    warmup = 3 if cuda else 1
    spconv = load_spconv()
    table = Table(f"sparse conv: kiln.sparse vs spconv 2.3.8 ({channels} ch)", anchor_name="spconv")
    t_start = time.time()
    skipped: list[str] = []

    def over_budget(what: str) -> bool:
        if time.time() - t_start > args.budget_s:
            skipped.append(what)
            return True
        return False

    def on_term(signum, frame):  # `timeout` sends SIGTERM: still print the rows measured so far
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        run_rows(args, spconv, table, device, dtypes, channels, repeat, warmup, over_budget)
    except KeyboardInterrupt as e:
        skipped.append(f"interrupted ({e})")
    finally:
        signal.signal(signal.SIGTERM, previous)
        finish(args, table, cuda, skipped, time.time() - t_start)
    return table


def run_rows(args, spconv, table, device, dtypes, channels, repeat, warmup, over_budget):
    """Measure every row, printing each as it lands; rows past the time budget are skipped."""
    for scene in args.scenes:
        shape, n = SCENES[scene]
        idx = synthetic_voxels(shape, args.voxels or n, 1, seed=0).to(device)
        for dname in dtypes:
            dtype = DTYPES[dname]
            g = torch.Generator().manual_seed(1)
            feats = torch.randn(idx.shape[0], channels, generator=g).to(device=device, dtype=dtype)
            for kind in ("subm", "strided"):
                if over_budget(f"{scene} {kind} {dname}"):
                    continue
                fs = {}
                for name, lib in (("kiln", ksp), ("spconv", spconv)):
                    if lib is None:
                        continue
                    conv = conv_rows(lib, feats, idx, shape, 1, channels, dtype, device, 0, kind)
                    if name == "spconv" and "kiln" in fs:
                        conv.load_state_dict(fs["kiln"][0].state_dict())
                    fs[name] = (conv, build_callables(lib, conv, feats, idx, shape, 1))
                labels = ("rulebook+fwd", "cached fwd", "fwd+bwd")
                for i, label in enumerate(labels):
                    if i and over_budget(f"{scene} {kind} {label} {dname}"):
                        continue
                    ours, anchor = ms_pair(fs["kiln"][1][i], fs["spconv"][1][i] if "spconv" in fs else None, repeat,
                                           warmup)
                    table.add(f"{scene} {kind} {label} {dname}", ours, anchor, "ms", higher_is_better=False,
                              extra={"voxels": int(idx.shape[0]), "channels": channels})
                    print(table.render().splitlines()[-1], flush=True)
            if args.no_backbone or over_budget(f"{scene} backbone {dname}"):
                continue
            torch.manual_seed(0)
            state = VoxelBackBone8x(4).state_dict()
            bfeats = feats[:, :4].contiguous()
            ours, anchor = ms_pair(backbone_callable(ksp, state, bfeats, idx, shape, 1, dtype, device),
                                   backbone_callable(spconv, state, bfeats, idx, shape, 1, dtype, device)
                                   if spconv is not None else None, repeat, warmup)
            table.add(f"{scene} backbone fwd+bwd {dname}", ours, anchor, "ms", higher_is_better=False,
                      extra={"voxels": int(idx.shape[0])})
            print(table.render().splitlines()[-1], flush=True)


def finish(args, table, cuda, skipped, elapsed):
    """The compact table last, then the bars: >= 1.0x on every row (and >= 1.3x backbone fwd+bwd on the GPU)."""
    text = table.render()
    if skipped:
        text += f"\nskipped (time budget {args.budget_s:.0f} s): {', '.join(skipped)}"
    ratios = [(r.workload, r.ratio) for r in table.rows if r.ratio is not None]
    if ratios:
        worst = min(ratios, key=lambda t: t[1])
        verdict = "met" if worst[1] >= 1.0 else "NOT met"
        bars = f"bar >= 1.0x on every row: {verdict} (lowest {worst[1]:.2f}x: {worst[0]})"
        if cuda:
            bb = [r for w, r in ratios if "backbone" in w]
            if bb:
                bars += f"; backbone fwd+bwd >= 1.3x: {'met' if min(bb) >= 1.3 else 'NOT met'} (lowest {min(bb):.2f}x)"
        text += "\n" + bars
    if not cuda:
        text += f"\n(CPU: kiln and spconv both with torch.set_num_threads({args.threads}))"
    print()
    print(text)
    print(f"({elapsed:.0f} s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.save(args.out)
    Path(args.out).with_suffix(".txt").write_text(text + "\n")
    print(f"wrote {args.out} (+ .txt) on {device_name()}")


if __name__ == "__main__":
    main()
