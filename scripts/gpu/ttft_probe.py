"""GPU: time to first token of single requests, one at a time, with the Triton GEMV off or on (issue 4).

bench/llm_throughput.py (b) showed TTFT p50 ~200 ms with ``KILN_GEMV=on`` against 28 ms off on the Llama-3.1-8B
shape after the same warm-up. This times TTFT and the whole request for several consecutive requests, and profiles
one request's prefill step, to see whether the cost recurs and where it goes. Odd requests resend the previous
prompt (as the bench's timed run resends its warm-up prompt), so their prefill is a prefix-cache hit.

    KILN_GEMV=on python3 scripts/gpu/ttft_probe.py [--model llama-1b] [--requests 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.llm_throughput import SHAPES  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b", choices=list(SHAPES))
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    from kiln.llm import LLM, SamplingParams

    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(json.dumps(SHAPES[args.model]))
    llm = LLM(str(d), dtype="bfloat16", device="cuda", load_format="dummy", max_num_seqs=8,
              max_num_batched_tokens=8192, max_model_len=4096, gpu_memory_utilization=0.85)
    g = torch.Generator().manual_seed(0)
    vocab = SHAPES[args.model]["vocab_size"]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False)
    print(f"KILN_GEMV={os.environ.get('KILN_GEMV', 'on (default)')} {args.model}")
    ids = None
    for i in range(args.requests):
        repeat = i % 2 == 1  # odd requests resend the previous prompt: a prefix-cache hit leaves a few rows to prefill
        ids = ids if repeat else torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], [params])[0]
        wall = time.perf_counter() - t0
        m = out.metrics
        print(f"request {i} ({'same prompt again' if repeat else 'new prompt'}): TTFT {1e3 * (m.first_token_time - m.arrival_time):8.1f} ms, whole request "
              f"{1e3 * wall:8.1f} ms", flush=True)
    ids = torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate([{"prompt_token_ids": ids}], [SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                                                                  detokenize=False)])
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=50))
    llm.shutdown()


if __name__ == "__main__":
    main()
