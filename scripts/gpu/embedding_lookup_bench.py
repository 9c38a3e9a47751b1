"""GPU: one decode step's input-embedding lookup (one token), float table against the quantized ones
(``kiln.ops.wo_embedding``: int8 rows, or an int4-wo head's row-interleaved table) and against the torch chain the
kernel replaces, at the Llama table shapes. Timed as a CUDA graph of back-to-back calls (per-call microseconds).

    python3 scripts/gpu/embedding_lookup_bench.py [--calls 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_attn_bench import time_us  # noqa: E402  (CUDA graph of back-to-back calls, best of 5 replays)

SHAPES = {"llama-1b": (128256, 2048), "llama-8b": (128256, 4096)}  # vocabulary, hidden


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    from kiln.ops.wo_embedding import wo_embedding, wo_embedding_ref
    from kiln.ops.wo_gemm import WeightOnly, interleave_int4_rows
    from kiln.quant.llm import quantize_int4_weight, quantize_int8_weight

    print(f"== one token's embedding lookup, us per call ({torch.cuda.get_device_name()})")
    print(f"{'shape':10s} {'bf16':>8s} {'int8':>8s} {'int4':>8s} {'int4 torch':>11s}")
    for name, (V, H) in SHAPES.items():
        table = torch.randn(V, H, device="cuda", dtype=torch.bfloat16) * 0.02
        q8, s8 = quantize_int8_weight(table)
        q4, s4, z4 = quantize_int4_weight(table, 128)
        int8 = WeightOnly(q8, s8)
        int4 = WeightOnly(interleave_int4_rows(q4, 4), s4, z4, 128, 4)
        ids = torch.tensor([V // 3], device="cuda")
        for t in (int8, int4):
            assert torch.equal(wo_embedding(ids, t, torch.bfloat16), wo_embedding_ref(ids, t, torch.bfloat16))
        row = [time_us(lambda: F.embedding(ids, table), args.calls),
               time_us(lambda: wo_embedding(ids, int8, torch.bfloat16), args.calls),
               time_us(lambda: wo_embedding(ids, int4, torch.bfloat16), args.calls),
               time_us(lambda: wo_embedding_ref(ids, int4, torch.bfloat16), args.calls)]
        print(f"{name:10s} " + " ".join(f"{t:8.2f}" for t in row[:3]) + f" {row[3]:11.2f}", flush=True)


if __name__ == "__main__":
    main()
