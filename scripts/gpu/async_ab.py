"""GPU: run-ahead decode (``async_scheduling``) on and off, alternating on one engine, on a bench workload.

The decode-step probe shows the batch-1 gain; this checks the batched workloads (a) and (d) of
bench/llm_throughput.py, where mixed prefill/decode steps run synchronously either way and a request finishing by
length stops the run-ahead for a step.

    python3 scripts/gpu/async_ab.py --model llama-1b --workload a [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.llm_throughput import SHAPES, make_workload  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b", choices=list(SHAPES))
    ap.add_argument("--workload", default="a", choices=["a", "b", "d"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    from kiln.llm import LLM, SamplingParams

    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(json.dumps(SHAPES[args.model]))
    small = args.device == "cpu"
    llm = LLM(str(d), dtype="bfloat16" if not small else "float32", device=args.device, load_format="dummy",
              max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=4096, gpu_memory_utilization=0.85)
    prompts, outs = make_workload(args.workload, SHAPES[args.model]["vocab_size"], small=small)
    temp = 0.0 if len(prompts) == 1 else 0.6
    params = [SamplingParams(temperature=temp, max_tokens=o, ignore_eos=True, detokenize=False) for o in outs]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs, params)  # warm-up: every shape of the workload once
    rates = {False: [], True: []}
    for _ in range(args.rounds):
        for mode in (False, True):
            llm.engine.async_scheduling = mode
            llm.engine.reset_prefix_cache()
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = llm.generate(inputs, params)
            if args.device == "cuda":
                torch.cuda.synchronize()
            rates[mode].append(sum(len(r.outputs[0].token_ids) for r in res) / (time.perf_counter() - t0))
    off, on = (max(rates[m]) for m in (False, True))
    print(f"{args.model} ({args.workload}) output tok/s, best of {args.rounds}: synchronous {off:,.0f} "
          f"({', '.join(f'{r:,.0f}' for r in rates[False])}); run-ahead {on:,.0f} "
          f"({', '.join(f'{r:,.0f}' for r in rates[True])}); ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
