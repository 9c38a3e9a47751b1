"""GPU: the sparse weight-gradient kernel's schedule on real rulebooks (issue 6).

The weight gradient reads the forward pair map densely, or (``lists``) only its valid pairs, compacted once per
rulebook (``sparse_gemm.compact_pairs``; the library picks with ``sparse_gemm.wgrad_from_lists``); the rows per
program (the chunk) trade parallelism against the fp32 partials written. (Rows in the forward's mask order, so blocks could skip unused offsets, measured slower on an
H100: 0.14-0.40 ms against 0.11-0.30 ms plain, 16/64 channels -- two more dependent loads per block.) Times each variant next to the forward implicit GEMM
on the same map, for the submanifold and strided rulebooks of the synthetic nuScenes scene.

    python3 scripts/gpu/wgrad_sweep.py [--channels 16 64] [--dtype fp16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kiln.ops import sparse_gemm as sg  # noqa: E402
from kiln.sparse.rulebook import build_conv, build_subm  # noqa: E402
from kiln.sparse.synthetic import SCENES, synthetic_voxels  # noqa: E402

from hash_sweep import time_ms  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scene", default="nuscenes")
    ap.add_argument("--channels", nargs="+", type=int, default=[16, 64])
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--chunks", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--list-chunks", nargs="+", type=int, default=[128, 256, 512, 1024, 2048],
                    help="pairs per program for the weight gradient from compacted lists")
    ap.add_argument("--precisions", nargs="+", default=[None],
                    help="fp32 only: tl.dot precisions to time (default: the library's choice)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    shape, n = SCENES[args.scene]
    idx = synthetic_voxels(shape, n, seed=0).to(dev)
    books = {"subm": build_subm(idx, shape, [3, 3, 3], [1, 1, 1]),
             "strided": build_conv(idx, shape, [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1])[2]}
    default_chunk, default_precision = sg._wgrad_chunk, sg._precision
    print(f"{'rulebook':8} {'ch':>3} {'variant':24} {'ms':>7}")
    for name, rb in books.items():
        pm = rb.pair_fwd()
        order, masks = rb.fwd_schedule()
        fill = float((pm >= 0).float().mean())
        for c in args.channels:
            g = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(rb.n_in, c, device=dev, dtype=dtype, generator=g)
            w = torch.randn(rb.kernel_volume, c, c, device=dev, dtype=dtype, generator=g)
            dy = torch.randn(rb.n_out, c, device=dev, dtype=dtype, generator=g)
            ref = sg.weight_grad(x, dy, pm).float()
            print(f"{name:8} {c:3d} {'forward implicit GEMM':24} {time_ms(lambda: sg.implicit_gemm(x, w, pm, order, masks)):7.3f}"
                  f"   (rows {pm.shape[0]}, K {pm.shape[1]}, map filled {fill:.1%})")
            for prec in args.precisions:
                if prec is not None:
                    sg._precision = lambda x_, p_=prec: p_ if x_.dtype == torch.float32 else "tf32"
                for chunk in [None] + args.chunks:
                    sg._wgrad_chunk = default_chunk if chunk is None else (lambda R, K, c_=chunk: c_)
                    got = sg.weight_grad(x, dy, pm).float()
                    err = float((got - ref).abs().max() / ref.abs().max())
                    t = time_ms(lambda: sg.weight_grad(x, dy, pm))
                    label = f"wgrad chunk {chunk or 'auto'} {prec or ''}"
                    print(f"{name:8} {c:3d} {label:24} {t:7.3f}   err {err:.1e}", flush=True)
                sg._wgrad_chunk = default_chunk
                # the compacted lists (once per rulebook) and the weight gradient reading only valid pairs
                lists = sg.compact_pairs(pm)
                t_c = time_ms(lambda: sg.compact_pairs(pm))
                default_lists_chunk = sg._wgrad_lists_chunk
                for chunk in [None] + args.list_chunks:
                    sg._wgrad_lists_chunk = default_lists_chunk if chunk is None else (lambda R, K, c_=chunk: c_)
                    got = sg.weight_grad(x, dy, pm, lists).float()
                    err = float((got - ref).abs().max() / ref.abs().max())
                    t = time_ms(lambda: sg.weight_grad(x, dy, pm, lists))
                    label = f"wgrad lists {chunk or 'auto'} {prec or ''}"
                    print(f"{name:8} {c:3d} {label:24} {t:7.3f}   err {err:.1e}   "
                          f"(compact_pairs {t_c:.3f} ms per rulebook)", flush=True)
                sg._wgrad_lists_chunk = default_lists_chunk
            sg._precision = default_precision


if __name__ == "__main__":
    main()
