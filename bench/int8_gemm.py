"""INT8 GEMM and INT8 conv (im2col + GEMM) against bf16 cuBLAS, torch._int_mm and cuDNN fp16.

    python3 bench/int8_gemm.py [--out bench/int8_gemm.json] [--quick]

GEMM rows: ours = kiln's Triton int8 GEMM (int32 output, the raw kernel; and with the fused per-row/per-channel
rescale to bf16), anchor = bf16 ``torch.matmul`` (cuBLAS) on the same shape; ``torch._int_mm`` is reported in
``extra`` with a row-major and a column-major B. Units: TOP/s (2*M*N*K / time). Conv rows: kiln's Int8ConvNd
(quantize input, im2col, int8 GEMM, rescale) vs ``F.conv2d`` fp16 (cuDNN, channels_last) on ResNet-like 3x3
layers; unit ms, lower is better. Needs CUDA; on a CPU it runs tiny shapes through the reference (a smoke run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Table, cuda_time  # noqa: E402
from kiln.ops.gemm import int8_gemm, int8_gemm_i32  # noqa: E402


def gemm_rows(table: Table, shapes, dev):
    for name, (M, N, K) in shapes:
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=dev)
        b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
        sa = torch.rand(M, device=dev) * 0.01 + 1e-3
        sb = torch.rand(N, device=dev) * 0.01 + 1e-3
        ab = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        bb = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        ops = 2.0 * M * N * K
        t_i32 = cuda_time(lambda: int8_gemm_i32(a, b))
        t_scaled = cuda_time(lambda: int8_gemm(a, b, sa, sb, out_dtype=torch.bfloat16))
        t_bf16 = cuda_time(lambda: ab @ bb.T)
        extra = {"M": M, "N": N, "K": K, "scaled_bf16_out_tops": ops / t_scaled / 1e12}
        if dev.type == "cuda":
            exact = torch.equal(int8_gemm_i32(a, b), (a.double() @ b.double().T).round().int())
            extra["bit_exact"] = exact
            try:  # _int_mm: B as given (row-major [K, N] copy) and column-major (a transposed view of [N, K])
                b_row = b.T.contiguous()
                b_col = b.T
                extra["int_mm_rowmajor_tops"] = ops / cuda_time(lambda: torch._int_mm(a, b_row)) / 1e12
                extra["int_mm_colmajor_tops"] = ops / cuda_time(lambda: torch._int_mm(a, b_col)) / 1e12
            except RuntimeError as exc:  # shape limits (e.g. M <= 16)
                extra["int_mm_error"] = str(exc).splitlines()[0][:120]
        row = table.add(f"gemm {name} {M}x{N}x{K}", ops / t_i32 / 1e12, ops / t_bf16 / 1e12, "TOP/s", True, extra)
        print(f"  {row.workload}: int8 {row.ours:.1f}  bf16 {row.anchor:.1f}  ratio {row.ratio:.2f}x  "
              f"scaled {extra['scaled_bf16_out_tops']:.1f}  "
              f"_int_mm row/col {extra.get('int_mm_rowmajor_tops', float('nan')):.1f}/"
              f"{extra.get('int_mm_colmajor_tops', float('nan')):.1f}  exact={extra.get('bit_exact')}", flush=True)


def conv_rows(table: Table, layers, dev):
    import torch.nn as nn

    from kiln.quant import Int8Config, calibrate, convert, quantize_

    for name, (n, c, hw, k) in layers:
        conv = nn.Conv2d(c, k, 3, padding=1, bias=True).to(dev)
        x = torch.randn(n, c, hw, hw, device=dev)
        model = quantize_(nn.Sequential(conv), Int8Config())
        calibrate(model, [x])
        i8 = convert(model).to(dev)
        x16 = x.half().to(memory_format=torch.channels_last)
        w16 = conv.weight.detach().half().to(memory_format=torch.channels_last)
        b16 = conv.bias.detach().half()
        with torch.no_grad():
            t_i8 = cuda_time(lambda: i8(x16))
            t_fp16 = cuda_time(lambda: torch.nn.functional.conv2d(x16, w16, b16, padding=1))
        macs = n * k * hw * hw * c * 9
        row = table.add(f"conv3x3 {name} N{n} C{c}->{k} {hw}x{hw}", t_i8 * 1e3, t_fp16 * 1e3, "ms", False,
                        {"int8_tops": 2 * macs / t_i8 / 1e12, "fp16_tflops": 2 * macs / t_fp16 / 1e12})
        print(f"  {row.workload}: int8 {row.ours:.3f} ms  cuDNN fp16 {row.anchor:.3f} ms  ratio {row.ratio:.2f}x",
              flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/int8_gemm.json")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        shapes = [("square", (4096, 4096, 4096)), ("square", (8192, 8192, 8192))]
        llm = [(4096, 4096), (14336, 4096), (4096, 14336)]  # Llama-3.1-8B: qkv/o-like, up, down
        for M in (1, 16, 128, 2048):
            for N, K in (llm[:1] if args.quick else llm):
                shapes.append((f"llm M={M}", (M, N, K)))
        layers = [("res2", (32, 64, 56, 64)), ("res3", (32, 128, 28, 128)), ("res4", (32, 256, 14, 256)),
                  ("res5", (32, 512, 7, 512))]
    else:
        shapes = [("smoke", (64, 64, 64)), ("smoke llm M=1", (1, 128, 128))]
        layers = [("smoke", (2, 8, 8, 8))]
    table = Table("INT8 GEMM (kiln Triton, int32 out) vs bf16 cuBLAS; INT8 conv vs cuDNN fp16",
                  ours_name="kiln int8", anchor_name="bf16/fp16")
    print("GEMM:", flush=True)
    gemm_rows(table, shapes, dev)
    print("conv:", flush=True)
    conv_rows(table, layers, dev)
    print()
    print(table.render())
    out = table.save(args.out)
    print(f"\nJSON -> {out}")


if __name__ == "__main__":
    main()
