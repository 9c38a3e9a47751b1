"""A/B of the weight-only batch-1 GEMV against an older copy of ``kiln/ops/wo_gemm.py`` (issue 8), per Llama linear,
in alternating rounds on one GPU, with the engine's int4 layout (asymmetric: group zero points) and a tile sweep of
the working tree's kernel.

  git show REV:kiln/ops/wo_gemm.py > kiln/ops/wo_gemm_base.py    # the copy to compare against (untracked)
  python3 scripts/gpu/wo_ab.py [--bits 4] [--sweep]

Timing as in ``wo_gemv_bench.py``: a CUDA graph of back-to-back calls over distinct weight copies (past L2).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.common import copy_bandwidth  # noqa: E402
from decode_gemv_bench import SHAPES, graph_time, linears  # noqa: E402
from wo_gemv_bench import GROUP as G, quantized_copies  # noqa: E402
from kiln.ops import wo_gemm  # noqa: E402

SWEEP4 = [(64, 128, 2), (64, 128, 4), (128, 128, 4), (128, 128, 8), (32, 128, 2), (32, 128, 4)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="kiln.ops.wo_gemm_base", help="module with the older _wo_triton")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--models", nargs="+", default=["llama-8b", "llama-1b"])
    ap.add_argument("--no-zeros", action="store_true", help="int4 without zero points (symmetric)")
    ap.add_argument("--sweep", action="store_true", help="also sweep int4 tiles of the new kernel")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None, help="write every variant's median time per linear (seconds) here")
    args = ap.parse_args()
    base = importlib.import_module(args.base)
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name(0)}: copy bandwidth {bw / 1e12:.2f} TB/s")
    x_of = {}
    medians: dict[str, dict[str, float]] = {}
    for bits in args.bits:
        for model in args.models:
            layers = {"llama-1b": 16, "llama-8b": 32}[model]
            totals: dict[str, float] = {}
            for name, (n, k) in linears(SHAPES[model]).items():
                x = x_of.setdefault(k, torch.randn(1, k, device="cuda", dtype=torch.bfloat16))
                ws, nbytes = quantized_copies(n, k, bits, zeros=not args.no_zeros)
                gs = G if bits == 4 else 0
                variants = {"base": lambda q, s, z, cfg=None: base._wo_triton(x, q, s, z, gs, None, bits),
                            "new": lambda q, s, z, cfg=None: wo_gemm._wo_triton(x, q, s, z, gs, None, bits)}
                if args.sweep and bits == 4:
                    auto = wo_gemm.split_k_for
                    for bn, bk, nw in SWEEP4:
                        a = auto(1, n, k, 1, bn, bk, sms)
                        for split in sorted({1, a, 2 * a, 4 * a} & set(range(1, k // (2 * bk) + 1))):
                            cfg = dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, SPLIT_K=split, num_warps=nw,
                                       INT4_WORDS=True, REDUCE_EACH_TILE=False)
                            variants[f"{bn}x{bk}/w{nw}/s{split}"] = (
                                lambda q, s, z, cfg=cfg: wo_gemm._wo_triton(x, q, s, z, gs, None, bits, config=cfg))
                # correctness of the new kernel against the reference on the first copy
                q, s, z = ws[0]
                ref = (wo_gemm.w4a16_linear_ref(x, q, s, z, gs) if bits == 4 else
                       wo_gemm.w8a16_linear_ref(x, q, s)).float()
                times: dict[str, list[float]] = {}
                for r in range(args.rounds):
                    for label, fn in variants.items():
                        if r == 0:
                            got = fn(q, s, z).float()
                            err = ((got - ref).abs().max() / ref.abs().max()).item()
                            if err > 2e-2:
                                print(f"   {model} {name} w{bits} {label}: WRONG, rel err {err:.2e}")
                        times.setdefault(label, []).append(
                            graph_time(lambda fn=fn: [fn(q, s, z) for q, s, z in ws], len(ws)))
                med = {label: statistics.median(v) for label, v in times.items()}
                medians[f"{model}/{name}/w{bits}"] = med
                best = min(med, key=med.get)
                reps = 1 if name == "lm_head" else layers
                for label in ("base", "new"):
                    totals[label] = totals.get(label, 0.0) + med[label] * reps
                totals["best"] = totals.get("best", 0.0) + med[best] * reps
                top = sorted(med.items(), key=lambda t: t[1])[:6]
                print(f"{model:9} {name:13} w{bits}: base {med['base'] * 1e6:6.1f} us  new {med['new'] * 1e6:6.1f} us "
                      f"({med['base'] / med['new']:.2f}x, {nbytes / med['new'] / bw * 100:.0f}% of copy bw)  fastest: "
                      + ", ".join(f"{lab} {t * 1e6:.1f}" for lab, t in top), flush=True)
                del ws
                torch.cuda.empty_cache()
            print(f"{model} w{bits} step linears: base {totals['base'] * 1e3:.3f} ms, new {totals['new'] * 1e3:.3f} ms "
                  f"({totals['base'] / totals['new']:.2f}x), best tile per linear {totals['best'] * 1e3:.3f} ms",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(medians, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
