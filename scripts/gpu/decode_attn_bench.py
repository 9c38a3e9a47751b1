"""GPU: the batch-1 decode attention launch (``decode_attention_rope``: rotary + KV store + split-K + merge) at the
Llama shapes and a range of context lengths, timed as a CUDA graph of back-to-back calls (per-call microseconds).

A decode step runs this once per layer; on an H100 it took 7 us (Llama-3.2-1B heads) and 10 us (Llama-3.1-8B) per
layer at 128-256 keys, about a tenth of a quantized 8B step (scripts/gpu/decode_step_probe.py with KILN_PDL=0).
Run it on two revisions of kiln/ops in one session to compare them.

    python3 scripts/gpu/decode_attn_bench.py [--lens 64 256 1024 4096] [--calls 50]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPES = {"llama-1b": (32, 8, 64), "llama-8b": (32, 8, 128)}  # query heads, KV heads, head dim


def inputs(hq: int, hkv: int, d: int, L: int, block_size: int = 16, dtype=torch.bfloat16):
    from kiln.ops.rotary import rope_cos_sin_cache

    g = torch.Generator(device="cuda").manual_seed(0)
    nblocks = -(-L // block_size)
    kc = torch.randn(nblocks + 4, block_size, hkv, d, device="cuda", dtype=dtype, generator=g)
    vc = torch.randn_like(kc)
    table = torch.randperm(nblocks + 4, device="cuda", generator=g)[:nblocks].to(torch.int32)[None]
    slot = int(table[0, (L - 1) // block_size]) * block_size + (L - 1) % block_size
    qkv = torch.randn(1, (hq + 2 * hkv) * d, device="cuda", dtype=dtype, generator=g)
    q = qkv[:, : hq * d].view(1, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(1, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(1, hkv, d)
    cs = rope_cos_sin_cache(d, L + 8, 500000.0, device="cuda")
    return (q, k, v, torch.tensor([L - 1], device="cuda"), cs, kc, vc, torch.tensor([slot], device="cuda"),
            torch.tensor([L], device="cuda", dtype=torch.int32), table, d ** -0.5)


def time_us(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / calls)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--label", default="")
    ap.add_argument("--warps", type=int, nargs="+", default=None, metavar="N",
                    help="also time the kernel launched with each of these warp counts (an A/B of num_warps; the "
                         "outputs are checked against the shipped launch's)")
    args = ap.parse_args()
    from kiln.ops import fused_decode
    from kiln.ops.fused_decode import decode_attention_rope

    shipped = fused_decode._decode_rope_kernel

    class Warps:
        """``_decode_rope_kernel`` launched with another ``num_warps``."""

        def __init__(self, warps: int):
            self.warps = warps

        def __getitem__(self, grid):
            launch = shipped[grid]
            return lambda *a, **k: launch(*a, **{**k, "num_warps": self.warps})

    print(f"== decode attention per call, us ({args.label or 'this tree'}; {torch.cuda.get_device_name()})")
    print(f"{'shape':10s} " + " ".join(f"{'L=' + str(L):>8s}" for L in args.lens))
    for name, (hq, hkv, d) in SHAPES.items():
        for warps in [None] + (args.warps or []):
            fused_decode._decode_rope_kernel = shipped if warps is None else Warps(warps)
            row, worst = [], 0.0
            for L in args.lens:
                a = inputs(hq, hkv, d, L)
                if warps is not None:  # same inputs (the call stores k, v into the cache: idempotent)
                    fused_decode._decode_rope_kernel = shipped
                    ref = decode_attention_rope(*a).float()
                    fused_decode._decode_rope_kernel = Warps(warps)
                    worst = max(worst, ((decode_attention_rope(*a).float() - ref).abs().max()
                                        / ref.abs().max()).item())
                row.append(time_us(lambda: decode_attention_rope(*a), args.calls))
            label = name + ("" if warps is None else f" w{warps}")
            check = "" if warps is None else f"   (max rel diff vs shipped {worst:.1e})"
            print(f"{label:10s} " + " ".join(f"{t:8.2f}" for t in row) + check, flush=True)
    fused_decode._decode_rope_kernel = shipped


if __name__ == "__main__":
    main()
