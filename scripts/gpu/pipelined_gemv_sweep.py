"""The one-row weight-only GEMVs with their loads pipelined by the compiler (``STAGES``) against the register
prefetch (``PREFETCH``), per Llama linear, through ``wo_gemm._wo_triton`` as the engine calls it (issue 8).

``STAGES=S`` with ``PREFETCH=False`` makes the K loop ``tl.range(..., num_stages=S)``: Triton issues the weight
(and, for int4, zero-point and scale) loads S - 1 steps ahead as ``cp.async`` copies into shared memory, so the
bytes in flight no longer hold registers. Every config is checked against the engine's default output first.
gate_up runs with the SiLU-and-mul epilogue, int4 on row-interleaved words with group zero points (group 128), as
the engine stores them. Timing as in ``wo_gemv_bench.py``: a CUDA graph over weight copies past L2.

  python3 scripts/gpu/pipelined_gemv_sweep.py [--bits 8 4] [--models llama-8b llama-1b]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.common import copy_bandwidth  # noqa: E402
from kiln.ops import wo_gemm  # noqa: E402
from kiln.ops.split_k import split_k_for  # noqa: E402
from decode_gemv_bench import SHAPES, graph_time, linears  # noqa: E402
from wo_gemv_bench import GROUP, quantized_copies  # noqa: E402


def int8_configs(n, k, sms, glu):
    """(label, config): BLOCK_N x BLOCK_K, warps, stages, split (never with the epilogue)."""
    out = []
    for bn, bk, nw, st in itertools.product((16, 32), (256, 512), (4,), (4, 6)):
        auto = split_k_for(1, n, k, 1, bn, bk, sms)
        for split in sorted({1} if glu else {1, auto, 2 * auto}):
            out.append((f"{bn}x{bk}/w{nw}/st{st}/s{split}",
                        dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, SPLIT_K=split, num_warps=nw,
                             PREFETCH=False, STAGES=st)))
    return out


def int4_configs(n, k, sms, glu):
    """(label, config): BLOCK_Q quads of 4 rows, warps, stages, split."""
    out = []
    for bq, nw, st in itertools.product((8, 16, 32), (2, 4), (3, 5)):
        rows = bq * 4 * (2 if glu else 1)
        auto = split_k_for(1, n, k, 1, rows, 128, sms, programs_per_sm=6, min_k_tiles=2)
        for split in sorted({1, auto, 2 * auto}):
            if split > 1 and k // split < 2 * 128:
                continue
            out.append((f"{bq}q/w{nw}/st{st}/s{split}",
                        dict(BLOCK_Q=bq, BLOCK_W=16, SPLIT_K=split, num_warps=nw, PREFETCH=False, STAGES=st)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llama-8b", "llama-1b"], choices=list(SHAPES))
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=[8, 4])
    args = ap.parse_args()
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name(0)}: copy bandwidth {bw / 1e12:.2f} TB/s, {sms} SMs", flush=True)
    steps = {}
    for bits in args.bits:
        for model in args.models:
            layers = {"llama-1b": 16, "llama-8b": 32}[model]
            for name, (n, k) in linears(SHAPES[model]).items():
                glu = name == "gate_up_proj"
                ws, nbytes = quantized_copies(n, k, bits)
                if bits == 4:
                    ws = [(wo_gemm.interleave_int4_rows(q, 4), s, z) for q, s, z in ws]
                x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
                group = GROUP if bits == 4 else 0

                def run(cfg, w):
                    return wo_gemm._wo_triton(x, w[0], w[1], w[2], group, None, bits, config=cfg, glu=glu)

                ref = run(None, ws[0]).float()
                t_default = graph_time(lambda: [run(None, w) for w in ws], len(ws))
                tried = []
                for lab, cfg in (int8_configs if bits == 8 else int4_configs)(n, k, sms, glu):
                    try:
                        got = run(cfg, ws[0]).float()
                        torch.cuda.synchronize()
                    except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is skipped
                        print(f"   {lab}: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
                        continue
                    err = ((got - ref).abs().max() / ref.abs().max()).item()
                    if err > 2e-2:
                        print(f"   {model} {name} w{bits} {lab}: WRONG (rel diff {err:.2e})", flush=True)
                        continue
                    tried.append((graph_time(lambda: [run(cfg, w) for w in ws], len(ws)), lab))
                tried.sort()
                best_t, best_lab = tried[0] if tried else (t_default, "-")
                mult = 1 if name == "lm_head" else layers
                for key, t in (("default", t_default), ("pipelined", best_t), ("best", min(best_t, t_default))):
                    steps[(bits, model, key)] = steps.get((bits, model, key), 0.0) + t * mult
                print(f"w{bits} {model:9} {name:13} default {t_default * 1e6:6.1f} us ({nbytes / t_default / bw:4.0%})"
                      f" | pipelined {best_lab} {best_t * 1e6:6.1f} ({nbytes / best_t / bw:4.0%}) | "
                      + ", ".join(f"{lab} {t * 1e6:.1f}" for t, lab in tried[1:5]), flush=True)
                del ws
                torch.cuda.empty_cache()
    print("\n== one decode step's linears (lm_head once), ms")
    for bits in args.bits:
        for model in args.models:
            print(f"w{bits} {model}: " + ", ".join(f"{key} {steps[(bits, model, key)] * 1e3:.3f}"
                                                  for key in ("default", "pipelined", "best")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
