"""GPU: where a batch-1 decode step's time goes (issue 4's roofline bar).

Prints, for one engine on a random checkpoint of a bench shape:
  * the engine's TPOT for one 128-in / N-out greedy request (what bench/llm_throughput.py (b) reports), with
    synchronous steps and with run-ahead decode (``async_scheduling``), alternating on one engine;
  * the host time of each phase of ``LLMEngine.step`` during that request (schedule, execute = pack + launch,
    execute_ahead (run-ahead decode), sample = queue the sampling, complete = wait for the GPU + read the
    token + append + collect);
  * the GPU time of the decode graph alone, replayed back to back (no host work in between), so
    ``TPOT - replay`` is the time the GPU sits idle per step;
  * the kernels of one replay (torch profiler): count and the largest by total time.

    python3 scripts/gpu/decode_step_probe.py --model llama-1b [--tokens 512] [--quant int8-wo]

``--quant`` builds the dummy engine of a ``kiln build --quant`` mode (bench/llm_throughput.py's ``engine_entry``,
the LM head quantized as the build's default), so the quantized engines' steps list their kernels the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import copy_bandwidth  # noqa: E402
from bench.llm_throughput import SHAPES, engine_entry, streamed_bytes  # noqa: E402


def timed(obj, name: str, totals: dict) -> None:
    """Wrap ``obj.name`` so each call adds its host time to ``totals[name]``."""
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            totals[name].append(time.perf_counter() - t0)

    setattr(obj, name, wrapper)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b", choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--replays", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quant", default="bf16", choices=["bf16", "int8-wo", "int4-wo", "w8a8", "fp8"])
    args = ap.parse_args()
    from kiln.llm import LLM, SamplingParams

    d = Path(tempfile.mkdtemp())
    entry = engine_entry(args.quant, None)
    (d / "config.json").write_text(json.dumps({**SHAPES[args.model], **({"kiln_engine": entry} if entry else {})}))
    llm = LLM(str(d), dtype="bfloat16", device="cuda", load_format="dummy", max_num_seqs=8,
              max_num_batched_tokens=8192, max_model_len=4096, gpu_memory_utilization=0.85)
    eng = llm.engine
    vocab = SHAPES[args.model]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True, detokenize=False)

    def request():
        ids = torch.randint(0, vocab, (128,), generator=g).tolist()
        return llm.generate([{"prompt_token_ids": ids}], [params])[0]

    request()  # warm-up
    bw = copy_bandwidth()
    nbytes = streamed_bytes(eng.model)
    print(f"{args.model} {args.quant}: roofline {nbytes / 1e9:.3f} GB at {bw / 1e12:.2f} TB/s = {1e3 * nbytes / bw:.3f} ms")
    tpots: dict[bool, list[float]] = defaultdict(list)
    totals: dict[bool, dict[str, list[float]]] = {m: defaultdict(list) for m in (False, True)}
    for _ in range(args.rounds):
        for mode in (False, True):  # alternating on one engine: synchronous steps, then run-ahead decode
            eng.async_scheduling = mode
            wrapped = [(obj, name, getattr(obj, name)) for obj, name in (
                (eng.scheduler, "schedule"), (eng.runner, "execute"), (eng.runner, "execute_ahead"),
                (eng.sampler, "sample"), (eng, "_complete"), (eng, "_append_token"), (eng, "_collect_outputs"),
                (eng, "step"))]
            for obj, name, _ in wrapped:
                timed(obj, name, totals[mode])
            out = request()
            for obj, name, fn in wrapped:
                setattr(obj, name, fn)
            m = out.metrics
            tpots[mode].append((m.finished_time - m.first_token_time) / (len(out.outputs[0].token_ids) - 1))
    for mode in (False, True):
        t = statistics.median(tpots[mode])
        print(f"async_scheduling={mode}: TPOT {' '.join(f'{1e3 * x:.3f}' for x in tpots[mode])} ms -> "
              f"{100 * nbytes / bw / t:.1f}% of the roofline (median)")
        print("  host time per call (median / mean us):")
        for k, v in totals[mode].items():
            v = v[1:] or v  # the first step is the prefill
            print(f"    {k:18s} {1e6 * statistics.median(v):8.1f} {1e6 * statistics.fmean(v):8.1f}  (n={len(v)})")
    tpot = statistics.median(tpots[False])

    graph = eng.runner.graphs[1]
    replay = back_to_back(graph, args.replays)
    print(f"graph replay back to back: {1e3 * replay:.3f} ms ({100 * nbytes / bw / replay:.1f}% of the roofline); "
          f"GPU idle per synchronous step ~{1e3 * (tpot - replay):.3f} ms")
    twin = getattr(eng.runner, "greedy_graphs", {}).get(1)
    if twin is not None:  # what a plain-greedy step replays: the graph ending in the argmax
        greedy = back_to_back(twin, args.replays)
        print(f"greedy twin replay back to back: {1e3 * greedy:.3f} ms; run-ahead TPOT - greedy replay = "
              f"{1e6 * (statistics.median(tpots[True]) - greedy):.1f} us per step outside the graph")

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    total = sum(getattr(e, "self_device_time_total", 0) for e in rows) / 5
    kernels = sum(e.count for e in rows) / 5
    print(f"kernels per replay: {kernels:.0f}, summed kernel time {total / 1e3:.3f} ms")
    rows.sort(key=lambda e: -getattr(e, "self_device_time_total", 0))
    for e in rows[:24]:
        t = getattr(e, "self_device_time_total", 0) / 5
        print(f"  {t:8.1f} us  x{e.count // 5:3d}  {e.key[:90]}")
    gaps_in_run_ahead(llm, eng, request, args.tokens)
    llm.shutdown()


def back_to_back(graph, replays: int) -> float:
    """Seconds per replay of ``graph``, replayed back to back (GPU time only, no host work in between)."""
    torch.cuda.synchronize()
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / replays


def gaps_in_run_ahead(llm, eng, request, tokens: int) -> None:
    """Profile one run-ahead request and split each decode step's GPU time into the graph's kernels, the work
    outside the graph (copies, sampling) and idle gaps, so ``TPOT - replay`` is accounted for."""
    from torch.profiler import ProfilerActivity, profile

    eng.async_scheduling = True
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        request()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    if len(ev) < 10:
        print("run-ahead trace: too few device events")
        return
    ev = ev[len(ev) // 4:]  # skip the prefill and the first steps
    span = ev[-1].time_range.end - ev[0].time_range.start
    busy = sum(e.time_range.end - e.time_range.start for e in ev)
    layers = eng.runner.mcfg.num_layers
    steps = max(1.0, sum(1 for e in ev if "_decode_rope_kernel" in e.name or "_decode_split_kernel" in e.name)
                / layers)
    outside: dict[str, list[float]] = defaultdict(list)
    gaps: dict[str, list[float]] = defaultdict(list)
    for a, b in zip(ev, ev[1:]):
        gap = b.time_range.start - a.time_range.end
        if gap > 0:
            gaps[f"{a.name[:40]} -> {b.name[:40]}"].append(gap)
    for e in ev:
        if "memcpy" in e.name.lower() or "memset" in e.name.lower() or "argmax" in e.name.lower() or \
                "sampl" in e.name.lower() or "copy" in e.name.lower() or "index" in e.name.lower():
            outside[e.name[:60]].append(e.time_range.end - e.time_range.start)
    print(f"run-ahead trace: {span / steps:.1f} us per step, device busy {busy / steps:.1f} us, "
          f"idle {(span - busy) / steps:.1f} us")
    print("  copies / sampling ops (per step us, count):")
    for k, v in sorted(outside.items(), key=lambda kv: -sum(kv[1]))[:8]:
        print(f"    {sum(v) / steps:7.2f}  x{len(v) / steps:4.1f}  {k}")
    print("  largest idle gaps by neighbours (per step us, count):")
    for k, v in sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[:10]:
        print(f"    {sum(v) / steps:7.2f}  x{len(v) / steps:4.1f}  {k}")


if __name__ == "__main__":
    main()
