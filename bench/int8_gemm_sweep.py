"""Tile sweep for kiln's INT8 GEMM kernel on one GPU.

Prints TOP/s per tile config at 8192^3 and 4096^3 next to bf16 cuBLAS, checks every result bit-exact, and names
the best; used to choose GPU_CONFIGS in kiln/ops/gemm.py.   python bench/int8_gemm_sweep.py
(A TMA-descriptor variant was tried on an H200 on 2026-11-26 and lost: best 1,057 TOP/s vs 1,126; see RESULTS.md.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kiln.ops.gemm import _int8_gemm_kernel  # noqa: E402


def ptr_gemm(a, b, bm, bn, bk, group, stages, warps):
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty(M, N, dtype=torch.int32, device=a.device)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _int8_gemm_kernel[grid](a, b, c, c, c, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                            c.stride(0), c.stride(1), SA_PER_ROW=False, SB_PER_COL=False, HAS_BIAS=False, RAW=True,
                            EVEN_K=K % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group,
                            num_stages=stages, num_warps=warps)
    return c


CONFIGS = [(128, 256, 128, 8, 3, 8), (128, 256, 128, 8, 4, 8), (256, 128, 128, 8, 3, 8), (256, 128, 128, 8, 4, 8),
           (128, 128, 128, 8, 4, 4), (128, 128, 128, 8, 5, 8), (128, 256, 64, 8, 4, 8), (256, 256, 64, 8, 3, 8),
           (128, 256, 128, 16, 3, 8), (256, 128, 64, 8, 5, 8)]


def main():
    rows = []
    for n in (8192, 4096):
        a = torch.randint(-128, 128, (n, n), dtype=torch.int8, device="cuda")
        b = torch.randint(-128, 128, (n, n), dtype=torch.int8, device="cuda")
        ref = torch._int_mm(a, b.t())
        ab, bb = a.bfloat16(), b.bfloat16()
        t_bf16 = do_bench(lambda: ab @ bb.t(), warmup=50, rep=300, return_mode="median")
        bf16 = 2 * n**3 / t_bf16 / 1e9
        print(f"\n{n}^3: bf16 cuBLAS {bf16:.0f} TFLOP/s")
        for kind, fn in (("ptr", ptr_gemm),):
            for cfg in CONFIGS:
                try:
                    exact = torch.equal(fn(a, b, *cfg), ref)
                    t = do_bench(lambda: fn(a, b, *cfg), warmup=50, rep=300, return_mode="median")
                    tops = 2 * n**3 / t / 1e9
                    rows.append((n, kind, cfg, tops, tops / bf16, exact))
                    print(f"  {kind} {cfg}: {tops:7.0f} TOP/s  {tops / bf16:5.2f}x bf16  exact={exact}")
                except Exception as exc:  # a config that does not compile on this card is reported and skipped
                    print(f"  {kind} {cfg}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    best = max((r for r in rows if r[0] == 8192 and r[5]), key=lambda r: r[3], default=None)
    if best:
        print(f"\nbest at 8192^3: {best[1]} {best[2]} {best[3]:.0f} TOP/s = {best[4]:.2f}x bf16")


if __name__ == "__main__":
    main()
