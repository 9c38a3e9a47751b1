"""Tile and schedule sweep for kiln's INT8 GEMM on one GPU.

Prints TOP/s per variant at 8192^3 and 4096^3 next to bf16 cuBLAS (timed the same way, in the same loop), checks
every result bit-exact against ``torch._int_mm``, and names the best; used to choose the schedule and GPU_CONFIGS
in kiln/ops/gemm.py.     python bench/int8_gemm_sweep.py [--sizes 8192 4096] [--quick]

Variants: ``tile`` = kiln's one-tile-per-program kernel (pointer loads); ``tma`` = kiln's persistent kernel (one
program per SM walking tiles in grouped order) whose operand tiles come through TMA tensor descriptors.
History (H100, 2026-11-26): a persistent pointer-load kernel lost to both (1,044 TOP/s best at 8192^3) and was
dropped; persistent TMA 256x128x128 reached 1,157 TOP/s = 1.58x bf16 and became the library's large-M path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kiln.ops import gemm as kg  # noqa: E402


def tile_gemm(a, b, bm, bn, bk, group, stages, warps):
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty(M, N, dtype=torch.int32, device=a.device)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    kg._int8_gemm_kernel[grid](a, b, c, c, c, c, M, N, K, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                               c.stride(0), c.stride(1), 0, SA_PER_ROW=False, SB_PER_COL=False, HAS_BIAS=False,
                               RAW=True, EVEN_K=K % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group,
                               num_stages=stages, num_warps=warps)
    return c


def tma_gemm(a, b, bm, bn, bk, group, stages, warps):
    """kiln's persistent TMA kernel with one fixed config."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = a.shape
    N = b.shape[0]
    c = torch.empty(M, N, dtype=torch.int32, device=a.device)
    n_sm = torch.cuda.get_device_properties(a.device).multi_processor_count
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(b, [bn, bk])
    kg._int8_gemm_tma_kernel[(min(n_sm, tiles),)](
        a_desc, b_desc, c, c, c, c, M, N, K, c.stride(0), c.stride(1), SA_PER_ROW=False, SB_PER_COL=False,
        HAS_BIAS=False, RAW=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group,
        num_stages=stages, num_warps=warps)
    return c


TILE_CONFIGS = [(128, 256, 128, 16, 3, 8), (128, 256, 128, 16, 4, 8), (256, 128, 128, 16, 4, 8),
                (128, 256, 256, 16, 2, 8), (256, 128, 128, 8, 3, 8), (128, 128, 128, 8, 4, 4)]
TMA_CONFIGS = [(256, 128, 128, 8, 3, 8), (256, 128, 128, 16, 3, 8), (128, 128, 128, 8, 4, 4),
               (128, 128, 128, 8, 3, 8), (128, 256, 64, 8, 3, 8), (256, 128, 64, 8, 4, 8)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 4096])
    p.add_argument("--quick", action="store_true", help="first two configs of each variant")
    args = p.parse_args(argv)
    variants = [("tile", tile_gemm, TILE_CONFIGS), ("tma", tma_gemm, TMA_CONFIGS)]
    rows = []
    for n in args.sizes:
        a = torch.randint(-128, 128, (n, n), dtype=torch.int8, device="cuda")
        b = torch.randint(-128, 128, (n, n), dtype=torch.int8, device="cuda")
        ref = torch._int_mm(a, b.t())
        ab, bb = a.bfloat16(), b.bfloat16()

        def bench(fn):
            return 2 * n**3 / do_bench(fn, warmup=50, rep=300, return_mode="median") / 1e9

        bf16 = bench(lambda: ab @ bb.t())
        print(f"\n{n}^3: bf16 cuBLAS {bf16:.0f} TFLOP/s", flush=True)
        for kind, fn, configs in variants:
            for cfg in configs[:2] if args.quick else configs:
                try:
                    exact = torch.equal(fn(a, b, *cfg), ref)
                    tops = bench(lambda: fn(a, b, *cfg))
                    bf16_again = bench(lambda: ab @ bb.t())  # the anchor next to each variant: clocks drift
                    rows.append((n, kind, cfg, tops, tops / bf16_again, exact))
                    print(f"  {kind:10s} {cfg}: {tops:7.0f} TOP/s  {tops / bf16_again:5.2f}x bf16 "
                          f"({bf16_again:.0f})  exact={exact}", flush=True)
                except Exception as exc:  # a config that does not compile on this card is reported and skipped
                    print(f"  {kind:10s} {cfg}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})",
                          flush=True)
        lib = bench(lambda: kg.int8_gemm_i32(a, b))
        print(f"  library int8_gemm_i32 (autotuned): {lib:.0f} TOP/s  {lib / bench(lambda: ab @ bb.t()):.2f}x",
              flush=True)
    print("\nbest per size and variant (bit-exact only):")
    for n in args.sizes:
        for kind, _, _ in variants:
            cand = [r for r in rows if r[0] == n and r[1] == kind and r[5]]
            if cand:
                r = max(cand, key=lambda r: r[3])
                print(f"  {n}^3 {kind:10s} {r[2]}: {r[3]:.0f} TOP/s = {r[4]:.2f}x bf16")


if __name__ == "__main__":
    main()
