"""How much of a decode GEMV's time an L2-resident weight would save (scratch probe for an L2-prefetch idea): each
Llama linear at batch 1, bf16 (F.linear), int8-wo and int4-wo (quads, engine layout), timed back to back over weight
copies past L2 (cold) and over one weight (hot: it stays in the 50 MB L2 where it fits)."""
import sys
from pathlib import Path
import torch
import torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parents[2])); sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_gemv_bench import SHAPES, graph_time, linears, weights
from wo_gemv_bench import GROUP, quantized_copies
from kiln.ops import wo_gemm
print(torch.cuda.get_device_name(0))
for model in ("llama-8b", "llama-1b"):
    for name, (n, k) in linears(SHAPES[model]).items():
        if name == "lm_head":
            continue
        glu = name == "gate_up_proj"
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        row = []
        ws = weights(n, k, torch.bfloat16)
        mb = n * k * 2 / 1e6
        cold = graph_time(lambda: [F.linear(x, w) for w in ws], len(ws)) * 1e6
        hot = graph_time(lambda: [F.linear(x, ws[0]) for _ in ws], len(ws)) * 1e6
        row.append(f"bf16 {mb:5.0f}MB cold {cold:6.1f} hot {hot:6.1f}")
        del ws
        for bits in (8, 4):
            qs, nbytes = quantized_copies(n, k, bits)
            if bits == 4:
                qs = [(wo_gemm.interleave_int4_rows(q, 4), s, z) for q, s, z in qs]
            g = GROUP if bits == 4 else 0
            cold = graph_time(lambda: [wo_gemm._wo_triton(x, q, s, z, g, None, bits, glu=glu) for q, s, z in qs], len(qs)) * 1e6
            hot = graph_time(lambda: [wo_gemm._wo_triton(x, *qs[0], g, None, bits, glu=glu) for _ in qs], len(qs)) * 1e6
            row.append(f"int{bits} {nbytes / 1e6:5.1f}MB cold {cold:6.1f} hot {hot:6.1f}")
            del qs
        print(f"{model} {name:13s} | " + " | ".join(row), flush=True)
