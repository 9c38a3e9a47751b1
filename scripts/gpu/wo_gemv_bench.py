"""Weight-only decode GEMVs on the GPU (issue 8): kiln's W8A16 / W4A16 Triton kernels vs bf16 (cuBLAS and kiln's
bf16 GEMV) at batch 1 on the Llama shapes, plus a tile sweep, so the heuristic in ``wo_config`` can be checked
against the best tile and the speed-up per linear read off directly.

Timing as in ``decode_gemv_bench.py``: a CUDA graph of back-to-back calls over distinct weight copies (>= 512 MB
of bf16, so L2 cannot serve them). Reported per linear: microseconds, the fraction of the copy bandwidth each
kernel reaches on its own bytes (codes + scales + int4 zero points), and the speed-up over cuBLAS bf16. int4 weights
carry group zero points as the engine stores them (since session 13; earlier RESULTS rows were timed without, which
made the 8B gate_up 44 us where the engine's layout took 58 us).

  python3 scripts/gpu/wo_gemv_bench.py [--models llama-8b llama-1b] [--sweep]
  python3 scripts/gpu/wo_gemv_bench.py --batch 64      # batched decode: the tl.dot paths (int4 split vs joined)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.common import copy_bandwidth  # noqa: E402
from kiln.ops import gemv  # noqa: E402
from kiln.ops.wo_gemm import _wo_triton, split_k_for, wo_config  # noqa: E402
from decode_gemv_bench import SHAPES, graph_time, linears, with_env  # noqa: E402

GROUP = 128
# (BLOCK_N, BLOCK_K, num_warps) tried at M=1; SPLIT_K: the heuristic's, 1, and twice the heuristic's; int4 on
# 32-bit words, reduced once
SWEEP = {8: [(4, 1024, 2), (8, 1024, 2), (4, 2048, 2), (4, 512, 2), (8, 512, 2), (2, 2048, 2), (4, 2048, 4),
             (4, 4096, 4), (8, 2048, 2), (16, 512, 2), (16, 1024, 2), (8, 1024, 1), (4, 1024, 1), (2, 1024, 1),
             (16, 256, 2), (8, 1024, 4)],
         4: [(128, 128, 4), (128, 128, 2), (64, 128, 4), (64, 128, 2), (32, 128, 2), (256, 128, 8), (128, 64, 4),
             (256, 64, 4)]}


def quantized_copies(n: int, k: int, bits: int, zeros: bool = True) -> tuple[list[tuple], int]:
    """Random codes and fp32 scales (int4: with group zero points unless ``zeros`` is False), as ``kiln build
    --quant`` stores them; enough copies (q, s, z) to stream >= 512 MB of bf16-equivalent weights; bytes per copy."""
    copies = max(2, min(64, (512 * 2**20) // (n * k * 2) + 1))
    out = []
    for _ in range(copies):
        if bits == 8:
            q = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
            s = torch.rand(n, device="cuda") / 127
            z = None
        else:
            q = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
            s = torch.rand(n, k // GROUP, device="cuda") / 7
            z = torch.randint(0, 16, (n, k // GROUP), device="cuda", dtype=torch.uint8) if zeros else None
        out.append((q, s, z))
    return out, sum(t.numel() * t.element_size() for t in out[0] if t is not None)


def call(bits: int, x, q, s, z, config=None):
    return _wo_triton(x, q, s, z, GROUP if bits == 4 else 0, None, bits, config=config)


def batched(models: list[str], m: int) -> int:
    """Batched decode (M rows): cuBLAS bf16 against W8A16 and W4A16 through tl.dot, int4 with the nibbles split
    into even / odd half tiles and joined into one tile (INT4_JOIN, the default); us and speed-up per linear."""
    print(f"\n== M = {m}: us per linear (speed-up vs cuBLAS bf16); weights rotated past L2")
    print(f"{'model':9} {'linear':13} {'cublas':>10} {'w8a16':>16} {'w4a16 split':>16} {'w4a16 join':>16}")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for model in models:
        for name, (n, k) in linears(SHAPES[model]).items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
                  for _ in range(max(2, min(64, (512 * 2**20) // (n * k * 2) + 1)))]
            t0 = graph_time(lambda: [F.linear(x, w) for w in ws], len(ws))
            del ws
            cells = []
            for bits, extra in ((8, {}), (4, {"INT4_JOIN": False}), (4, {"INT4_JOIN": True})):
                qs, _ = quantized_copies(n, k, bits)
                cfg = dict(wo_config(m, n, k, bits, GROUP, sms), **extra)
                try:
                    t = graph_time(lambda: [call(bits, x, q, s, z, cfg) for q, s, z in qs], len(qs))
                    cells.append(f"{t * 1e6:8.1f} {t0 / t:5.2f}x")
                except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported
                    cells.append(f"{type(exc).__name__[:14]:>14}")
                del qs
            torch.cuda.empty_cache()
            print(f"{model:9} {name:13} {t0 * 1e6:10.1f} " + " ".join(f"{c:>16}" for c in cells), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llama-8b", "llama-1b"], choices=list(SHAPES))
    ap.add_argument("--sweep", action="store_true", help="tile sweep at M=1 on the first model's shapes")
    ap.add_argument("--sweep-bits", type=int, nargs="+", default=[8, 4], help="the widths the sweep covers")
    ap.add_argument("--no-sweep-split", dest="sweep_split", action="store_false",
                    help="sweep tiles without split-K (one launch per linear)")
    ap.add_argument("--ab", action="store_true", help="also time PDL off, and PDL and prefetch off")
    ap.add_argument("--batch", type=int, default=0, help="time M = BATCH rows (the tl.dot paths) instead of M=1")
    args = ap.parse_args()
    if args.batch:
        return batched(args.models, args.batch)
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name(0)}: copy bandwidth {bw / 1e12:.2f} TB/s, {sms} SMs; torch {torch.__version__}")
    rows = []
    for model in args.models:
        for name, (n, k) in linears(SHAPES[model]).items():
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
                  for _ in range(max(2, min(64, (512 * 2**20) // (n * k * 2) + 1)))]
            t_cub = graph_time(lambda: [F.linear(x, w) for w in ws], len(ws))
            t_kbf = graph_time(lambda: [gemv.linear(x, w) for w in ws], len(ws))
            del ws
            res = {"cublas": (t_cub, n * k * 2), "kiln-bf16": (t_kbf, n * k * 2)}
            for bits in (8, 4):
                qs, nbytes = quantized_copies(n, k, bits)
                t = graph_time(lambda: [call(bits, x, q, s, z) for q, s, z in qs], len(qs))
                res[f"w{bits}a16"] = (t, nbytes)
                if args.ab:  # the default (prefetch + PDL) against PDL off and against neither (the session-8 kernel)
                    pick = dict(wo_config(1, n, k, bits, GROUP, sms))
                    t_nopdl = with_env("KILN_PDL", "0", lambda: graph_time(
                        lambda: [call(bits, x, q, s, z) for q, s, z in qs], len(qs)))
                    t_plain = with_env("KILN_PDL", "0", lambda: graph_time(
                        lambda: [call(bits, x, q, s, z, dict(pick, PREFETCH=False)) for q, s, z in qs], len(qs)))
                    res[f"w{bits} no-pdl"] = (t_nopdl, nbytes)
                    res[f"w{bits} plain"] = (t_plain, nbytes)
                if args.sweep and bits in args.sweep_bits:
                    best = (t, "heuristic")
                    tried = []
                    for bn, bk, nw in SWEEP[bits]:
                        auto = split_k_for(1, n, k, 1, bn, bk, sms)
                        for split in sorted({1, auto, 2 * auto} if args.sweep_split else {1}):
                            cfg = dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, SPLIT_K=split, num_warps=nw)
                            if bits == 4:
                                cfg.update(INT4_WORDS=True, REDUCE_EACH_TILE=False)
                            try:
                                ts = graph_time(lambda: [call(bits, x, q, s, z, cfg) for q, s, z in qs], len(qs))
                            except Exception as exc:  # noqa: BLE001 - a tile that does not compile is skipped
                                print(f"   {name} w{bits} {bn}x{bk}/w{nw}/s{split}: {type(exc).__name__}")
                                continue
                            tried.append((ts, f"{bn}x{bk}/w{nw}/s{split}"))
                            if ts < best[0]:
                                best = (ts, f"{bn}x{bk}/w{nw}/split{split}")
                    res[f"w{bits}a16 best"] = (best[0], nbytes)
                    pick = wo_config(1, n, k, bits, GROUP, sms)
                    print(f"   {model} {name} w{bits}: heuristic {pick['BLOCK_N']}x{pick['BLOCK_K']}/"
                          f"w{pick['num_warps']}/split{pick['SPLIT_K']} {t * 1e6:.1f} us; best {best[1]} "
                          f"{best[0] * 1e6:.1f} us ({nbytes / best[0] / bw * 100:.0f}% of copy bw); fastest tried: "
                          + ", ".join(f"{lab} {ts * 1e6:.1f}" for ts, lab in sorted(tried)[:6]), flush=True)
                del qs
            torch.cuda.empty_cache()
            rows.append((model, name, n, k, res))
            print(f"{model:9} {name:13} " + " | ".join(
                f"{key} {t * 1e6:7.1f} us {b / t / bw * 100:5.1f}%" for key, (t, b) in res.items()), flush=True)

    print("\n== batch-1 decode linears: us (fraction of copy bandwidth on own bytes), speed-up vs cuBLAS bf16")
    keys = (["cublas", "kiln-bf16", "w8a16", "w4a16"] + (["w8a16 best", "w4a16 best"] if args.sweep else [])
            + (["w8 no-pdl", "w4 no-pdl", "w8 plain", "w4 plain"] if args.ab else []))
    print(f"{'model':9} {'linear':13} " + " ".join(f"{k:>22}" for k in keys))
    for model, name, n, k, res in rows:
        t0 = res["cublas"][0]
        cells = []
        for key in keys:
            if key in res:
                t, b = res[key]
                cells.append(f"{t * 1e6:7.1f} ({b / t / bw * 100:3.0f}%) {t0 / t:4.2f}x")
            else:
                cells.append(f"{'-':>22}")
        print(f"{model:9} {name:13} " + " ".join(f"{c:>22}" for c in cells))
    for model in args.models:
        layers = {"llama-1b": 16, "llama-8b": 32}[model]
        sel = [r for r in rows if r[0] == model]
        tot = {key: sum(r[4][key][0] * (1 if r[1] == "lm_head" else layers) for r in sel)
               for key in keys if all(key in r[4] for r in sel)}
        print(f"{model}: one decode step's linears (lm_head once, {layers} layers): "
              + ", ".join(f"{key} {v * 1e3:.3f} ms ({tot['cublas'] / v:.2f}x)" for key, v in tot.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
