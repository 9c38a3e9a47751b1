"""The one-row int8 weight-only GEMV with its loads pipelined by the compiler (``STAGES``) against the register
prefetch (``PREFETCH``), per Llama linear, through ``wo_gemm._wo_triton`` as the engine calls it (issue 8). The
engine's own choice (``wo_config``) is the "default" column: since session 25 it is the pipelined tile for wide
weights. (The int4 half of this sweep, which lost everywhere, is on branch ``exp/int4-quads-stages``.)

``STAGES=S`` with ``PREFETCH=False`` makes the K loop ``tl.range(..., num_stages=S)``: Triton issues the weight
loads S - 1 steps ahead as ``cp.async`` copies into shared memory, so the bytes in flight no longer hold
registers. Every config is checked against the engine's default output first; gate_up runs with the SiLU-and-mul
epilogue. Timing as in ``wo_gemv_bench.py``: a CUDA graph over weight copies past L2.

  python3 scripts/gpu/pipelined_gemv_sweep.py [--models llama-8b llama-1b]
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
from wo_gemv_bench import quantized_copies  # noqa: E402


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llama-8b", "llama-1b"], choices=list(SHAPES))
    args = ap.parse_args()
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name(0)}: copy bandwidth {bw / 1e12:.2f} TB/s, {sms} SMs", flush=True)
    steps = {}
    for model in args.models:
        layers = {"llama-1b": 16, "llama-8b": 32}[model]
        for name, (n, k) in linears(SHAPES[model]).items():
            glu = name == "gate_up_proj"
            ws, nbytes = quantized_copies(n, k, 8)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)

            def run(cfg, w):
                return wo_gemm._wo_triton(x, w[0], w[1], None, 0, None, 8, config=cfg, glu=glu)

            ref = run(None, ws[0]).float()
            t_default = graph_time(lambda: [run(None, w) for w in ws], len(ws))
            tried = []
            for lab, cfg in int8_configs(n, k, sms, glu):
                try:
                    got = run(cfg, ws[0]).float()
                    torch.cuda.synchronize()
                except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is skipped
                    print(f"   {lab}: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
                    continue
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                if err > 2e-2:
                    print(f"   {model} {name} {lab}: WRONG (rel diff {err:.2e})", flush=True)
                    continue
                tried.append((graph_time(lambda: [run(cfg, w) for w in ws], len(ws)), lab))
            tried.sort()
            best_t, best_lab = tried[0] if tried else (t_default, "-")
            mult = 1 if name == "lm_head" else layers
            for key, t in (("default", t_default), ("pipelined", best_t), ("best", min(best_t, t_default))):
                steps[(model, key)] = steps.get((model, key), 0.0) + t * mult
            print(f"w8 {model:9} {name:13} default {t_default * 1e6:6.1f} us ({nbytes / t_default / bw:4.0%})"
                  f" | pipelined {best_lab} {best_t * 1e6:6.1f} ({nbytes / best_t / bw:4.0%}) | "
                  + ", ".join(f"{lab} {t * 1e6:.1f}" for t, lab in tried[1:5]), flush=True)
            del ws
            torch.cuda.empty_cache()
    print("\n== one decode step's int8 linears (lm_head once), ms")
    for model in args.models:
        print(f"w8 {model}: " + ", ".join(f"{key} {steps[(model, key)] * 1e3:.3f}"
                                         for key in ("default", "pipelined", "best")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
