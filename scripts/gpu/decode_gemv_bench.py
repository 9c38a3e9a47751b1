"""Per-linear decode bandwidth on the GPU: kiln's Triton GEMV (kiln.ops.gemv) vs cuBLAS (F.linear), batch 1.

Each timing replays a CUDA graph of ``reps`` passes over ``copies`` distinct weight copies (>= 512 MB in all, so
the 50-60 MB L2 cannot serve them), the way the decode step runs: back-to-back kernels in one graph. Reported:
microseconds per call and the fraction of the device-to-device copy bandwidth measured in the same process.
Also: the fused prologues against the two launches they replace, PDL on/off, and (``--sweep``) a sweep of tile
configs for the Llama-3.2-1B shapes, so the heuristic in ``gemv_config`` can be checked against the best.

  python3 scripts/gpu/decode_gemv_bench.py --sweep
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import copy_bandwidth  # noqa: E402
from kiln.ops import gemv  # noqa: E402
from kiln.ops.activation import silu_and_mul  # noqa: E402
from kiln.ops.norm import rms_norm  # noqa: E402

SHAPES = {"llama-1b": dict(h=2048, inter=8192, qkv=3072, vocab=128256),
          "llama-8b": dict(h=4096, inter=14336, qkv=6144, vocab=128256)}
SWEEP = [(4, 2048, 4), (8, 1024, 4), (8, 2048, 4), (8, 2048, 8), (16, 512, 4), (16, 1024, 4), (16, 1024, 8),
         (32, 256, 4), (32, 512, 4), (64, 128, 4)]


def graph_time(fn, calls: int, reps: int = 10) -> float:
    """Seconds per call of ``fn`` (which makes ``calls`` kernel calls), replayed from a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del g
    return statistics.median(times) / (reps * calls)


def linears(s):
    h, inter = s["h"], s["inter"]
    return {"qkv_proj": (s["qkv"], h), "o_proj": (h, h), "gate_up_proj": (2 * inter, h), "down_proj": (h, inter),
            "lm_head": (s["vocab"], h)}


def weights(n, k, dt):
    copies = max(2, min(64, (512 * 2**20) // (n * k * 2) + 1))
    return [torch.randn(n, k, device="cuda", dtype=dt) * k ** -0.5 for _ in range(copies)]


def with_env(key, value, fn):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--m", type=int, nargs="+", default=[1])
    ap.add_argument("--sweep", action="store_true", help="tile sweep on the first model's shapes at M=1")
    args = ap.parse_args()
    dt = torch.bfloat16
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name(0)}: copy bandwidth {bw / 1e12:.2f} TB/s; torch {torch.__version__}")
    rows = []
    for model in args.models:
        for name, (n, k) in linears(SHAPES[model]).items():
            ws = weights(n, k, dt)
            nbytes = n * k * 2
            for m in args.m:
                x = torch.randn(m, k, device="cuda", dtype=dt)

                def run(f):
                    return graph_time(lambda: [f(x, w) for w in ws], len(ws))

                t_cub = run(F.linear)
                t_kiln = run(gemv.linear)
                try:
                    t_pdl = with_env("KILN_PDL", "1", lambda: run(gemv.linear))
                except Exception as exc:  # a driver or capture without PDL support
                    print(f"   PDL failed for {name}: {type(exc).__name__}: {exc}")
                    t_pdl = float("nan")
                cfg = gemv.gemv_config(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count)
                rows.append((model, name, m, n, k, t_cub, t_kiln, t_pdl, cfg))
                pct = [nbytes / t / bw * 100 for t in (t_cub, t_kiln, t_pdl)]
                print(f"{model:9} {name:13} M={m:<2} [{n}x{k}] {nbytes / 1e6:7.1f} MB | cuBLAS {t_cub * 1e6:7.1f} us "
                      f"{pct[0]:5.1f}% | kiln {t_kiln * 1e6:7.1f} us {pct[1]:5.1f}% | kiln+PDL {t_pdl * 1e6:7.1f} us "
                      f"{pct[2]:5.1f}% | BLOCK_N={cfg['BLOCK_N']} BLOCK_K={cfg['BLOCK_K']}", flush=True)
            del ws
            torch.cuda.empty_cache()

        # fused prologues vs the two launches they replace (M=1)
        s = SHAPES[model]
        h, inter = s["h"], s["inter"]
        wq = weights(s["qkv"], h, dt)
        x, r = torch.randn(1, h, device="cuda", dtype=dt), torch.randn(1, h, device="cuda", dtype=dt)
        nw = torch.rand(h, device="cuda", dtype=dt) + 0.5
        t_unf = graph_time(lambda: [F.linear(rms_norm(x, nw, 1e-5, r)[0], w) for w in wq], len(wq))
        t_fus = graph_time(lambda: [gemv.rms_norm_linear(x, nw, 1e-5, w, None, r) for w in wq], len(wq))
        print(f"{model:9} rms_norm(+res) -> qkv: norm kernel + cuBLAS {t_unf * 1e6:6.1f} us | fused GEMV "
              f"{t_fus * 1e6:6.1f} us")
        del wq
        wd = weights(h, inter, dt)
        gu = torch.randn(1, 2 * inter, device="cuda", dtype=dt)
        t_unf = graph_time(lambda: [F.linear(silu_and_mul(gu), w) for w in wd], len(wd))
        t_fus = graph_time(lambda: [gemv.silu_mul_linear(gu, w) for w in wd], len(wd))
        print(f"{model:9} silu_and_mul -> down: silu kernel + cuBLAS {t_unf * 1e6:6.1f} us | fused GEMV "
              f"{t_fus * 1e6:6.1f} us")
        del wd
        torch.cuda.empty_cache()

    print("\n== per-linear decode bandwidth, batch 1 (fraction of copy bandwidth)")
    print(f"{'model':9} {'linear':13} {'M':>2} {'cuBLAS us':>10} {'%':>6} {'kiln us':>8} {'%':>6} "
          f"{'PDL us':>7} {'%':>6}")
    for model, name, m, n, k, tc, tk, tp, _ in rows:
        b = n * k * 2
        print(f"{model:9} {name:13} {m:2d} {tc * 1e6:10.1f} {b / tc / bw * 100:6.1f} {tk * 1e6:8.1f} "
              f"{b / tk / bw * 100:6.1f} {tp * 1e6:7.1f} {b / tp / bw * 100:6.1f}")
    for model in args.models:
        sel = [r for r in rows if r[0] == model and r[2] == 1 and r[1] != "lm_head"]
        if sel:
            layers = {"llama-1b": 16, "llama-8b": 32}[model]
            cub, kil = sum(r[5] for r in sel) * layers, sum(r[6] for r in sel) * layers
            pdl = sum(r[7] for r in sel) * layers
            print(f"{model}: per-step GEMVs without lm_head: cuBLAS {cub * 1e3:.3f} ms, kiln {kil * 1e3:.3f} ms, "
                  f"kiln+PDL {pdl * 1e3:.3f} ms")
    if args.sweep:
        model = args.models[0]
        print(f"\n== tile sweep, {model}, M=1 (us per call; * = the heuristic's pick)")
        for name, (n, k) in linears(SHAPES[model]).items():
            ws = weights(n, k, dt)
            x = torch.randn(1, k, device="cuda", dtype=dt)
            pick = gemv.gemv_config(1, n, k, torch.cuda.get_device_properties(0).multi_processor_count)
            results = []
            for bn, bk, nw_ in SWEEP:
                if bk > max(16, 1 << (k - 1).bit_length()):
                    continue
                cfg = dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, num_warps=nw_)

                def call(x_, w_, cfg=cfg):
                    return gemv._launch(x_, w_, None, gemv.PROLOGUE_NONE, k, config=cfg)[0]

                t = graph_time(lambda: [call(x, w) for w in ws], len(ws))
                star = "*" if (bn, bk, nw_) == (pick["BLOCK_N"], pick["BLOCK_K"], pick["num_warps"]) else " "
                results.append((t, f"{star}{bn}x{bk}/w{nw_}"))
            best = min(results)
            print(f"   {name:13} " + "  ".join(f"{lbl} {t * 1e6:.1f}" for t, lbl in results)
                  + f"   best {best[1].strip('*')} = {n * k * 2 / best[0] / bw * 100:.0f}%", flush=True)
            del ws
            torch.cuda.empty_cache()

    return 0


if __name__ == "__main__":
    sys.exit(main())
