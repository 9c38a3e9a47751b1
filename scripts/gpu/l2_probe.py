"""How much of a batch-1 decode GEMV's time a weight already in L2 would save (would prefetching weights into L2
during attention pay?). Each Llama linear but the LM head, bf16 (``F.linear``), int8-wo and int4-wo (quads, the
engine's layout), timed back to back over weight copies past L2 (cold) and over one weight (hot: it stays in the
50 MB L2 where it fits).

    python3 scripts/gpu/l2_probe.py

H100, session 21: int4 barely gains (its GEMVs sit on a fixed per-call cost), int8 and bf16 gain 20-35%.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_gemv_bench import SHAPES, graph_time, linears, weights  # noqa: E402
from wo_gemv_bench import GROUP, quantized_copies  # noqa: E402
from kiln.ops import wo_gemm  # noqa: E402


def cold_hot(call, copies) -> tuple[float, float]:
    """us per call over all ``copies`` (cold) and over the first one repeated (hot)."""
    cold = graph_time(lambda: [call(c) for c in copies], len(copies)) * 1e6
    hot = graph_time(lambda: [call(copies[0]) for _ in copies], len(copies)) * 1e6
    return cold, hot


def main() -> int:
    print(torch.cuda.get_device_name(0))
    for model in ("llama-8b", "llama-1b"):
        for name, (n, k) in linears(SHAPES[model]).items():
            if name == "lm_head":
                continue
            glu = name == "gate_up_proj"
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            ws = weights(n, k, torch.bfloat16)
            cold, hot = cold_hot(lambda w: F.linear(x, w), ws)
            row = [f"bf16 {n * k * 2 / 1e6:5.0f}MB cold {cold:6.1f} hot {hot:6.1f}"]
            del ws
            for bits in (8, 4):
                qs, nbytes = quantized_copies(n, k, bits)
                if bits == 4:
                    qs = [(wo_gemm.interleave_int4_rows(q, 4), s, z) for q, s, z in qs]
                g = GROUP if bits == 4 else 0
                cold, hot = cold_hot(lambda w: wo_gemm._wo_triton(x, *w, g, None, bits, glu=glu), qs)
                row.append(f"int{bits} {nbytes / 1e6:5.1f}MB cold {cold:6.1f} hot {hot:6.1f}")
                del qs
            print(f"{model} {name:13s} | " + " | ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
