"""GPU: upper bounds on what fusing away a decode step's RMSNorms or its attention could save (issue 8).

Builds a dummy-weight engine of a bench shape and mode three times in one process: as is, with every RMSNorm
replaced by the identity (no kernel), and with every attention layer replaced by the identity (no KV store, no
attention kernel). The outputs of the last two are wrong; only their timing means anything: the batch-1 decode graph
(the greedy twin, what a plain-greedy step replays) timed back to back. The difference to "as is" is the most that
any fusion of that op into its neighbours could take out of a step.

    python3 scripts/gpu/step_bounds.py --model llama-1b --quant int4-wo [--replays 200]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.llm_throughput import SHAPES, engine_entry  # noqa: E402
from decode_step_probe import back_to_back  # noqa: E402


def build(model: str, quant: str):
    from kiln.llm import LLM

    d = Path(tempfile.mkdtemp())
    entry = engine_entry(quant, None)
    (d / "config.json").write_text(json.dumps({**SHAPES[model], **({"kiln_engine": entry} if entry else {})}))
    return LLM(str(d), dtype="bfloat16", load_format="dummy", max_num_seqs=8, max_model_len=2048,
               num_kv_blocks=256)


def replay_time(model: str, quant: str, replays: int) -> float:
    llm = build(model, quant)
    runner = llm.engine.runner
    graph = runner.greedy_graphs.get(1) or runner.graphs[1]
    t = back_to_back(graph, replays)
    llm.shutdown()
    del llm, runner, graph
    gc.collect()
    torch.cuda.empty_cache()
    return t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b", choices=list(SHAPES))
    ap.add_argument("--quant", default="int4-wo", choices=["bf16", "int8-wo", "int4-wo"])
    ap.add_argument("--replays", type=int, default=200)
    args = ap.parse_args()
    from kiln.llm.layers.attention import PagedAttention
    from kiln.llm.layers.norm import RMSNorm

    base = replay_time(args.model, args.quant, args.replays)
    norm_forward = RMSNorm.forward
    RMSNorm.forward = lambda self, x, residual=None: x if residual is None else (x, residual)
    no_norm = replay_time(args.model, args.quant, args.replays)
    RMSNorm.forward = norm_forward
    PagedAttention.forward = lambda self, q, k, v, rotary=None: q.reshape(q.shape[0], -1)
    no_attn = replay_time(args.model, args.quant, args.replays)
    print(f"{args.model} {args.quant} ({torch.cuda.get_device_name(0)}), batch-1 greedy graph back to back:")
    print(f"  as is            {1e3 * base:.3f} ms")
    print(f"  no RMSNorm       {1e3 * no_norm:.3f} ms  (bound on norm fusion: {1e6 * (base - no_norm):.1f} us)")
    print(f"  no attention     {1e3 * no_attn:.3f} ms  (attention's share: {1e6 * (base - no_attn):.1f} us)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
