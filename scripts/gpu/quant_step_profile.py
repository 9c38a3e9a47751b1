"""GPU: where a quantized engine's batched step spends its time, next to bf16 (issue 8).

bench/llm_throughput.py (d) (64 requests, 512 in / 256 out) gave w8a8 / fp8 at 0.46x / 0.58x of bf16 on the
Llama-3.2-1B shape, though on the 8B shape they beat it (1.21x / 1.27x). The launch count alone cannot explain a
2x slower step, so this separates prefill from decode and lists the GPU kernels of each:

1. prefill: 64 prompts of 512 tokens, one output token each (wall time, synchronised);
2. decode: the same batch generating ``--decode-tokens`` tokens, minus the prefill (ms per decode step);
3. torch.profiler over a few batched decode steps: the top kernels by GPU time, GPU kernels per step, and whether the
   steps replayed CUDA graphs (``cudaGraphLaunch``) or ran eagerly.

    python3 scripts/gpu/quant_step_profile.py [--model llama-1b] [--modes bf16 w8a8 fp8] [--batch 64]
    python3 scripts/gpu/quant_step_profile.py --model tiny --batch 4 --prompt-len 16 --decode-tokens 4 --device cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.llm_throughput import SHAPES, engine_entry  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_generate(llm, prompts, max_tokens: int, device: str) -> float:
    from kiln.llm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
              for _ in prompts]
    sync(device)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    sync(device)
    return time.perf_counter() - t0


def generate_with_step_times(llm, prompts, max_tokens: int, device: str) -> tuple[float, list[tuple]]:
    """``timed_generate``, also recording (host seconds, running, waiting, tokens) of every engine step."""
    eng, real_step, real_schedule, steps, tokens = llm.engine, llm.engine.step, llm.engine.scheduler.schedule, [], [0]

    def schedule():
        batch = real_schedule()
        tokens[0] = batch.num_tokens
        return batch

    def timed_step():
        t0 = time.perf_counter()
        shape = (len(eng.scheduler.running), len(eng.scheduler.waiting))
        tokens[0] = 0  # a run-ahead decode step does not call the scheduler
        out = real_step()
        steps.append((time.perf_counter() - t0, *shape, tokens[0]))
        return out

    eng.step, eng.scheduler.schedule = timed_step, schedule
    try:
        return timed_generate(llm, prompts, max_tokens, device), steps
    finally:
        del eng.step, eng.scheduler.schedule


def profile_decode(llm, prompts, device: str, top: int) -> tuple[str, int, int]:
    """Profile short generations whose steps are nearly all decode: (kernel table, kernels, graph launches)."""
    from torch.profiler import ProfilerActivity, profile

    from kiln.llm import SamplingParams

    short = [p[:8] for p in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False) for _ in short]
    llm.generate([{"prompt_token_ids": p} for p in short], params)  # warm
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        llm.generate([{"prompt_token_ids": p} for p in short], params)
        sync(device)
    avg = prof.key_averages()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = avg.table(sort_by=sort, row_limit=top, max_name_column_width=60)
    kernels = sum(e.count for e in avg if e.device_type == torch.autograd.DeviceType.CUDA) if device == "cuda" else 0
    graphs = sum(e.count for e in avg if "cudaGraphLaunch" in e.key)
    return table, kernels, graphs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b", choices=list(SHAPES))
    ap.add_argument("--modes", nargs="+", default=["bf16", "w8a8", "fp8"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    from kiln.llm import LLM

    cfg = SHAPES[args.model]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, cfg["vocab_size"] - 10, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.batch)]
    rows = []
    for mode in args.modes:
        d = Path(tempfile.mkdtemp())
        entry = engine_entry(mode, None)
        (d / "config.json").write_text(json.dumps({**cfg, **({"kiln_engine": entry} if entry else {})}))
        llm = LLM(str(d), dtype="bfloat16" if args.device == "cuda" else "float32", device=args.device,
                  load_format="dummy", max_num_seqs=max(args.batch, 1), max_num_batched_tokens=8192,
                  max_model_len=args.prompt_len + args.decode_tokens + 16, gpu_memory_utilization=0.85)
        t0 = time.perf_counter()
        # compile / tune (per M bucket) outside the timings: the timed run's schedule, so every step's M is seen
        timed_generate(llm, prompts, 1 + args.decode_tokens, args.device)
        print(f"{mode}: warm-up (the timed shapes once) {time.perf_counter() - t0:.1f} s", flush=True)
        llm.engine.reset_prefix_cache()
        prefill = timed_generate(llm, prompts, 1, args.device)
        llm.engine.reset_prefix_cache()
        both, steps = generate_with_step_times(llm, prompts, 1 + args.decode_tokens, args.device)
        slow = sorted(range(len(steps)), key=lambda i: -steps[i][0])[:6]
        print(f"{mode}: {len(steps)} steps; slowest (index: ms, running, waiting before it, tokens scheduled): "
              + ", ".join(f"{i}: {1e3 * steps[i][0]:.1f}, {steps[i][1]}, {steps[i][2]}, {steps[i][3]}"
                          for i in sorted(slow)),
              flush=True)
        decode_ms = 1e3 * max(0.0, both - prefill) / args.decode_tokens
        table, kernels, graphs = profile_decode(llm, prompts, args.device, args.top)
        print(f"\n== {args.model} {mode}: prefill {1e3 * prefill:.1f} ms ({args.batch} x {args.prompt_len} tokens), "
              f"decode {decode_ms:.3f} ms per step at batch {args.batch}; profile of 8-token generations: "
              f"{kernels} GPU kernels, {graphs} CUDA-graph launches\n{table}", flush=True)
        rows.append((mode, prefill, decode_ms, kernels, graphs))
        llm.shutdown()
        del llm
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]
    print(f"\n{'mode':8} {'prefill ms':>11} {'x ' + base[0]:>9} {'decode ms/step':>15} {'x ' + base[0]:>9} "
          f"{'kernels':>8} {'graphs':>7}")
    for mode, pre, dec, k, gr in rows:
        print(f"{mode:8} {1e3 * pre:11.1f} {base[1] / pre:9.2f} {dec:15.3f} {base[2] / max(dec, 1e-9):9.2f} "
              f"{k:8d} {gr:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
