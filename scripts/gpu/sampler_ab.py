"""Seeded random sampling: the one-launch Philox Gumbel kernel vs per-request ``torch.Generator`` draws.

Every request is seeded, as an RL rollout's are (``kiln.rl`` seeds each prompt of a batch): B requests of
``--tokens`` sampled tokens at temperature 1, timed as whole ``generate`` calls in alternating rounds (the same
engine; "generators" patches the sampler onto its non-Triton path, the exponential race with one generator call
per row and step). Models: the bundled one (fp32, vocab 4K, as in the PPO bench) and a Llama-3.2-1B-shaped dummy
engine (bf16, vocab 128K).

    python scripts/gpu/sampler_ab.py [--batch 64 --tokens 48 --repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import alternating_rounds, synced_seconds  # noqa: E402


def engines(batch: int):
    from bench.llm_throughput import SHAPES
    from kiln.llm import LLM
    from kiln.models import default_model_path

    yield "bundled fp32", LLM(default_model_path(), dtype="float32", max_num_seqs=batch, seed=0), 4096
    if not torch.cuda.is_available():
        return
    d = Path(tempfile.mkdtemp(prefix="kiln_sampler_ab_"))
    (d / "config.json").write_text(json.dumps(SHAPES["llama-1b"]))
    yield "llama-1b bf16 (dummy)", LLM(str(d), dtype="bfloat16", load_format="dummy", max_num_seqs=batch,
                                       max_model_len=1024, gpu_memory_utilization=0.5, seed=0), 128256


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    import kiln.llm.sampler as sampler_mod
    from kiln.llm import SamplingParams

    rows = []
    for name, llm, vocab in engines(a.batch):
        g = torch.Generator().manual_seed(0)
        prompts = [{"prompt_token_ids": torch.randint(3, vocab, (8,), generator=g).tolist()} for _ in range(a.batch)]
        seed = iter(range(10**9))

        def run(path: str):
            params = [SamplingParams(temperature=1.0, max_tokens=a.tokens, ignore_eos=True, seed=next(seed),
                                     detokenize=False) for _ in prompts]
            saved = sampler_mod.backend_for
            if path == "generators":
                sampler_mod.backend_for = lambda *t: "ref"
            try:
                return synced_seconds(lambda: llm.generate(prompts, params, use_tqdm=False))
            finally:
                sampler_mod.backend_for = saved

        for path in ("kernel", "generators"):
            run(path)  # warm-up (graph capture, compiles)
        kern, gens = alternating_rounds([lambda: run("kernel"), lambda: run("generators")], a.repeat)
        k, gm = statistics.median(kern), statistics.median(gens)
        n_tok = a.batch * a.tokens
        rows.append((name, gm * 1e3, k * 1e3, n_tok / gm, n_tok / k, gm / k))
        del llm
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print(f"{a.batch} seeded requests x {a.tokens} tokens, median of {a.repeat} alternating rounds")
    print(f"{'engine':24} {'generators ms':>14} {'kernel ms':>10} {'gen tok/s':>10} {'kern tok/s':>11} {'speed-up':>9}")
    for r in rows:
        print(f"{r[0]:24} {r[1]:14.1f} {r[2]:10.1f} {r[3]:10.0f} {r[4]:11.0f} {r[5]:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
