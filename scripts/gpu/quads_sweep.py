"""The one-row int4 GEMV on row-interleaved words (``kiln.ops.wo_gemm``'s quads kernel) against the usual packing's
GEMV, per Llama linear, and a sweep of the quads tiles and splits around ``quads_config`` (issue 8).

    python3 scripts/gpu/quads_sweep.py [--json F]
    python3 scripts/gpu/quads_sweep.py --m 16 64 256    # batched: the joined dot on both layouts, no sweep

Timing as in ``wo_ab.py``: a CUDA graph of back-to-back calls over distinct weight copies (past L2), engine
layouts (fp32 scales, group zero points, group 128), gate_up with the SiLU-and-mul epilogue as the engine runs it.
Prints per linear: the usual GEMV, the quads default, the fastest swept config; then one decode step's linears.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_gemv_bench import SHAPES, graph_time, linears  # noqa: E402
from wo_gemv_bench import GROUP, quantized_copies  # noqa: E402
from kiln.ops import wo_gemm  # noqa: E402

SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)
TILES = ((8, 2), (16, 2), (16, 4), (32, 4))  # (BLOCK_Q quads of 4 rows, warps)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llama-8b", "llama-1b"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--m", type=int, nargs="+", default=None, help="rows: time the joined dot on both layouts")
    ap.add_argument("--tiles", nargs="+", default=None, help="BLOCK_QxWARPS pairs to sweep, e.g. 1x1 4x2")
    ap.add_argument("--splits", type=int, nargs="+", default=None)
    args = ap.parse_args()
    global TILES, SPLITS
    if args.tiles:
        TILES = tuple(tuple(int(v) for v in t.split("x")) for t in args.tiles)
    if args.splits:
        SPLITS = tuple(args.splits)
    if args.m:
        return batched(args.models, args.m)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(0))
    results: dict = {}
    for model in args.models:
        layers = {"llama-1b": 16, "llama-8b": 32}[model]
        step = {"usual": 0.0, "quads": 0.0, "best": 0.0}
        print(f"== {model}: {'linear':13s} {'usual us':>9s} {'quads us':>9s} (default) {'best us':>8s} (config)")
        for name, (n, k) in linears(SHAPES[model]).items():
            ws, _ = quantized_copies(n, k, 4)
            quads = [wo_gemm.interleave_int4_rows(q, 4) for q, _, _ in ws]
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            glu = name == "gate_up_proj"
            ref = wo_gemm._wo_triton(x, *ws[0], GROUP, None, 4, glu=glu).float()

            def timed(cfg, use_quads=True):
                got = wo_gemm._wo_triton(x, quads[0] if use_quads else ws[0][0], ws[0][1], ws[0][2], GROUP, None, 4,
                                         config=cfg, glu=glu).float()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                if err > 2e-2:
                    print(f"   {name} {cfg}: WRONG, rel diff {err:.2e}")
                w = quads if use_quads else [q for q, _, _ in ws]
                return graph_time(lambda: [wo_gemm._wo_triton(x, qw, s, z, GROUP, None, 4, config=cfg, glu=glu)
                                           for qw, (_, s, z) in zip(w, ws)], len(ws)) * 1e6

            usual = timed(None, use_quads=False)
            default_cfg = wo_gemm.quads_config(n, k, 4, GROUP, sms, glu)
            default = timed(None)
            sweep = {}
            for bq, warps in TILES:
                rows = bq * 4 * (2 if glu else 1)
                for split in SPLITS:
                    if split > 1 and k // split < 2 * 128:
                        continue
                    cfg = dict(BLOCK_Q=bq, BLOCK_W=16, SPLIT_K=split, num_warps=warps)
                    sweep[f"{bq}x16x4/w{warps}/s{split}"] = timed(cfg)
            best = min(sweep, key=sweep.get)
            print(f"{'':26s}" + ", ".join(f"{k} {v:.1f}" for k, v in sorted(sweep.items(), key=lambda kv: kv[1])[:6]))
            times = 1 if name == "lm_head" else layers
            for key, t in (("usual", usual), ("quads", default), ("best", sweep[best])):
                step[key] += t * times
            print(f"{'':13s}{name:13s} {usual:9.1f} {default:9.1f} ({default_cfg['BLOCK_Q']}/s{default_cfg['SPLIT_K']})"
                  f" {sweep[best]:8.1f} ({best})")
            results[f"{model}/{name}"] = dict(usual_us=usual, quads_us=default, default=default_cfg, sweep=sweep)
            del ws, quads
        print(f"{'':13s}{'step':13s} {step['usual'] / 1e3:8.3f}ms {step['quads'] / 1e3:8.3f}ms"
              f"{'':10s}{step['best'] / 1e3:7.3f}ms  (usual / quads {step['usual'] / step['quads']:.2f}x)")
        results[f"{model}/step_ms"] = {key: v / 1e3 for key, v in step.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def batched(models: list[str], ms: list[int]) -> int:
    """M > 1: the joined dot reading the usual packing and the row-interleaved words (engine tiles, forced), and the
    large-M path (dequantize the interleaved words to bf16 once, cuBLAS GEMM)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m in ms:
        print(f"== M = {m}: us per linear: dot on usual / dot on interleaved / dequantize + GEMM")
        for model in models:
            for name, (n, k) in linears(SHAPES[model]).items():
                ws, _ = quantized_copies(n, k, 4)
                quads = [wo_gemm.interleave_int4_rows(q, 4) for q, _, _ in ws]
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                glu = name == "gate_up_proj" and m <= 16  # the engine's decode-sized calls fuse the SiLU
                cfg = wo_gemm.wo_config(m, n, k, 4, GROUP, sms, glu)
                t = []
                for w in ([q for q, _, _ in ws], quads):
                    t.append(graph_time(lambda w=w: [wo_gemm._wo_triton(x, qw, s, z, GROUP, None, 4, config=cfg,
                                                                        glu=glu) for qw, (_, s, z) in zip(w, ws)],
                                        len(ws)) * 1e6)

                def dequant_mm(qw, s, z):
                    return x @ wo_gemm.dequantize_int4_triton(qw, s, z, GROUP, x.dtype).t()

                if not glu:
                    t.append(graph_time(lambda: [dequant_mm(qw, s, z) for qw, (_, s, z) in zip(quads, ws)],
                                        len(ws)) * 1e6)
                    a = dequant_mm(quads[0], ws[0][1], ws[0][2]).float()
                    b = wo_gemm._wo_triton(x, quads[0], ws[0][1], ws[0][2], GROUP, None, 4, config=cfg).float()
                    err = f"; dequant vs dot rel diff {((a - b).abs().max() / b.abs().max()).item():.1e}"
                else:
                    t.append(float("nan"))
                    err = ""
                print(f"   {model:9s} {name:13s} {t[0]:8.1f} {t[1]:8.1f} {t[2]:8.1f}{err}")
                del ws, quads
    return 0


if __name__ == "__main__":
    sys.exit(main())
