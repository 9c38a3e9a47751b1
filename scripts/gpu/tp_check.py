"""TP=N greedy output equals TP=1 on a random-weight checkpoint with a bench shape (fewer layers), read from
safetensors files (so every rank's sliced load is exercised), in fp32: argmax ties are the only thing that could
flip a token, and the weights are scaled so the logits are well separated. Also reports the largest logit
difference and, informationally, how many greedy sequences stay identical in bf16 (where summing partial results
across ranks in another order may flip a near-tie).

  python scripts/gpu/tp_check.py --model llama-8b --layers 2 --tp 2                  # two GPUs
  python scripts/gpu/tp_check.py --model tiny --tp 2 --device cpu                      # CPU dry run (gloo)

Exit status 1 if the fp32 greedy outputs differ or a logit differs by more than --rtol (relative to the largest).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.llm_throughput import SHAPES  # noqa: E402


def write_checkpoint(cfg: dict, out: Path, seed: int = 0) -> Path:
    """A Hugging Face-layout Llama checkpoint in two safetensors shards with an index; weights ~ N(0, 1/fan_in)
    (embeddings N(0, 1); the LM head 4x wider so logits are sharp), stored in bf16."""
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def w(n: int, k: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(n, k, generator=g) * (scale / math.sqrt(k))

    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    shards[0]["model.embed_tokens.weight"] = torch.randn(v, h, generator=g)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shard = shards[0] if i < cfg["num_hidden_layers"] // 2 else shards[1]
        shard.update({p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
                      p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
                      p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
                      p + "mlp.down_proj.weight": w(h, inter), p + "input_layernorm.weight": torch.ones(h),
                      p + "post_attention_layernorm.weight": torch.ones(h)})
    shards[1]["model.norm.weight"] = torch.ones(h)
    if not cfg.get("tie_word_embeddings"):
        shards[1]["lm_head.weight"] = w(v, h, 4.0)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        # stored in bf16 (half the bytes to write and read); both runs load the same values
        save_file({k: t.to(torch.bfloat16).contiguous() for k, t in shard.items()}, str(out / name))
        weight_map.update({k: name for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))
    return out


def run(path: Path, tp: int, dtype: str, device: str, prompts: list[list[int]], tokens: int):
    from kiln.llm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(str(path), dtype=dtype, device=device, tensor_parallel_size=tp, max_num_seqs=len(prompts),
              max_model_len=512, kv_cache_memory_bytes=2 * 2**30 if device == "cuda" else 64 * 2**20)
    ready = time.perf_counter() - t0
    try:
        logits = [x.float().cpu() for x in llm.prompt_logits(prompts)]
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=False)
        t1 = time.perf_counter()
        out = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
        gen = time.perf_counter() - t1
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return logits, out, ready, gen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-8b", choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (the shape's widths, fewer layers)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu (gloo dry run)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rtol", type=float, default=1e-4, help="fp32 logit tolerance, relative to the largest logit")
    ap.add_argument("--bf16", action="store_true", help="also compare in bf16 (reported, not checked)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = {**SHAPES[args.model], "num_hidden_layers": args.layers}
    g = torch.Generator().manual_seed(1)
    lengths = [int(x) for x in torch.randint(8, 200, (args.prompts,), generator=g)]
    prompts = [torch.randint(10, cfg["vocab_size"] - 10, (n,), generator=g).tolist() for n in lengths]
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = write_checkpoint(cfg, Path(tmp) / "ckpt")
        print(f"random {args.model} checkpoint, {args.layers} layers, written in {time.perf_counter() - t0:.1f} s",
              flush=True)
        for dtype in ["float32"] + (["bfloat16"] if args.bf16 else []):
            ref_logits, ref_out, r1, g1 = run(path, 1, dtype, device, prompts, args.tokens)
            logits, out, r2, g2 = run(path, args.tp, dtype, device, prompts, args.tokens)
            rel = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(logits, ref_logits))
            same = sum(a == b for a, b in zip(out, ref_out))
            first = min((next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                         for a, b in zip(out, ref_out)), default=args.tokens)
            checked = dtype == "float32"
            passed = same == len(prompts) and rel <= args.rtol
            ok &= passed or not checked
            rows.append({"dtype": dtype, "tp": args.tp, "identical_sequences": same, "sequences": len(prompts),
                         "first_divergence": first, "max_rel_logit_diff": rel, "checked": checked,
                         "passed": passed, "ready_s": [r1, r2], "generate_s": [g1, g2]})
            print(f"   {dtype}: tp={args.tp} vs tp=1: {same}/{len(prompts)} greedy sequences identical "
                  f"({args.tokens} tokens; first divergence at token {first}), max relative logit difference "
                  f"{rel:.2e}" + ("" if checked else " (informational)"), flush=True)
    print(f"\n{'dtype':<10}{'greedy identical':>18}{'max rel logit diff':>20}{'result':>10}")
    for r in rows:
        result = ("PASS" if r["passed"] else "FAIL") if r["checked"] else "info"
        print(f"{r['dtype']:<10}{r['identical_sequences']:>11}/{r['sequences']:<6}{r['max_rel_logit_diff']:>20.2e}"
              f"{result:>10}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
