"""GPU: A/B of the one-row int8 GEMV's tiles inside the engine (issue 8's batch-1 int8-wo bars).

One dummy int8-wo engine per model; each variant swaps ``kiln.ops.wo_gemm._wo_config`` for the one-row int8
linears, re-captures the decode graphs and replays the greedy graph back to back. Variants interleave over rounds
on the same engine, so the table compares like with like. Each variant's logits for one fixed token are compared
with the first variant's (greedy tokens are no check: a random-weight model's logits are nearly tied, and a request
that reuses cached prefix blocks already decodes differently from the first one). A variant spec is a comma list of:

  main                 the shipped rule (the default for anything not named)
  wide:BNxBKxST        the pipelined tile of the wide weights (gate_up, LM head)
  narrow:BNxBKxST      the other one-row int8 linears (qkv, o_proj, down_proj) pipelined too, K split until the
                       grid has about two CTAs per SM (at least ST K tiles per split)
  down:BNxBKxST        only down_proj (K > 2 N) pipelined that way
  glu:BNxBKxSTxW       the pipelined tile of the gate_up GEMVs (SiLU-and-mul epilogue) alone, with its warps
                       (``wide:`` also moves the LM head, at 4 warps)
  qkv:BNxBKxW          the register-prefetch tile (BLOCK_N, BLOCK_K, warps) of the unpipelined one-row int8 linears
                       wider than long (qkv_proj); ``o:BNxBKxW`` the same for square ones (o_proj)
  env:NAME=VALUE       an environment variable set while the variant's graphs are captured (e.g.
                       KILN_WO_NORM_FOLD=0: the RMSNorm kernel in front of the int8 GEMVs)
  normk:K              ``wo_gemm.MAX_WO_NORM_K``: the longest row the int8 GEMV folds the RMSNorm into
  unfold               the layers' norms taken as if their gains were not 1: the norm kernels (or the qkv
                       prologue) and separate residual adds, not the 1 / rms and residual epilogues
  late:glu|all         PDL's trigger after the K loop (``TRIGGER_LATE``) in the one-row int8 GEMVs with the
                       SiLU-and-mul epilogue (gate_up), or in all of them
  q4nopdl:glu|qkv|res|all  those int4 quads GEMVs launched without PDL (qkv: the 1 / rms epilogue alone; res:
                       o_proj and down_proj, the residual epilogue)
  q4split:S            the int4 quads GEMV with the SiLU-and-mul epilogue (gate_up) split S ways
  int4fold:H           ``kiln.quant.llm.MAX_INT4_FOLDED_HIDDEN``: the widest int4 model that runs the norm-free layer

    python3 scripts/gpu/int8_pipe_ab.py --models llama-8b llama-1b --variants main down:16x512x6 narrow:8x512x4

(Session 26 also ran ``early:E``, the pipelined tiles loading their first E K tiles before gdc_wait, and
``fold:glu``, the RMSNorm folded into gate_up; session 28 ran ``q4late``, PDL's trigger after the int4 quads
GEMV's K loop, which no norm-free 8B int4 layer came near the shipped one with. They left with their kernel knobs
or policies, see bench/RESULTS.md. ``late:glu`` with ``down:16x512x6`` is now the shipped 8B rule.)

A replay of one fixed step is a fair A/B for the GEMVs, not for attention: session 27's floor of keys per decode
split (branch exp/decode-min-chunk) replayed 94 us faster per 8B step here and ran 270 us slower per token in
bench/llm_throughput.py, whose context grows every step. Check attention changes there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.llm_throughput import SHAPES, engine_entry  # noqa: E402
from decode_step_probe import back_to_back  # noqa: E402


def parse(spec: str) -> dict:
    out: dict = {}
    for part in filter(None, spec.split(",")):
        key, _, val = part.partition(":")
        if key == "main":
            continue
        if key == "env":
            name, _, value = val.partition("=")
            out.setdefault("env", {})[name] = value
        elif key == "unfold":
            out["unfold"] = True
        elif key in ("normk", "int4fold", "q4split"):
            out[key] = int(val)
        elif key in ("late", "q4nopdl"):
            if val not in ("glu", "all") + (("qkv", "res") if key != "late" else ()):
                raise ValueError(f"{key} does not take {val!r}")
            out[key] = val
        elif key in ("wide", "narrow", "down", "qkv", "o", "glu"):
            out[key] = tuple(int(v) for v in val.split("x"))
        else:
            raise ValueError(f"unknown variant part {part!r}")
    return out


def make_config(original, spec: dict):
    from kiln.ops.split_k import cdiv

    def pipelined(N, K, sms, tile, glu):
        bn, bk, st, warps = (*tile, 4) if len(tile) == 3 else tile
        tiles = cdiv(N, bn)  # (with glu: N / 2 outputs, bn / 2 per program)
        split = 1 if glu else max(1, min(2 * sms // max(1, tiles), K // (st * bk), 16))
        return dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, SPLIT_K=split, num_warps=warps,
                    PREFETCH=False, STAGES=st)

    def tiles(M, N, K, bits, group_size, sms, interp, glu=False):
        cfg = original(M, N, K, bits, group_size, sms, interp, glu)
        if interp or M != 1 or bits != 8:
            return cfg
        long_k = K > 2 * N  # a down_proj (the 8B's is pipelined as shipped: INT8_LONG_K_TILE)
        if "STAGES" in cfg and not long_k:  # a wide weight
            if glu and "glu" in spec:
                return {**pipelined(N, K, sms, spec["glu"], glu),
                        **({"TRIGGER_LATE": True} if cfg.get("TRIGGER_LATE") else {})}
            return pipelined(N, K, sms, spec["wide"], glu) if "wide" in spec else cfg
        if "narrow" in spec:
            return pipelined(N, K, sms, spec["narrow"], glu)
        if "down" in spec and long_k:
            return pipelined(N, K, sms, spec["down"], glu)
        role = "qkv" if N > K and not glu else "o" if N == K and not glu else None
        if role in spec and "STAGES" not in cfg:
            bn, bk, warps = spec[role]
            return {**cfg, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps}
        return cfg

    def config(M, N, K, bits, group_size, sms, interp, glu=False):
        cfg = tiles(M, N, K, bits, group_size, sms, interp, glu)
        if not interp and M == 1 and bits == 8 and (spec.get("late") == "all" or (glu and spec.get("late"))):
            cfg = {**cfg, "TRIGGER_LATE": True}
        return cfg

    return config


def wrap_quads_gemv(original, spec: dict):
    """``wo_gemm._int4_quads_gemv`` with the spec's int4 knobs applied to its config: ``q4split`` (gate_up's
    split), ``q4nopdl`` (launched without PDL). The linear is known by its epilogue: qkv_proj takes the 1 / rms
    alone, gate_up the SiLU-and-mul, o_proj / down_proj the residual."""
    from kiln.ops import wo_gemm

    def role(glu, rms_eps, add):
        return "glu" if glu else "qkv" if rms_eps is not None else "res" if add is not None else "plain"

    def gemv(x2, words, scales, zeros, group_size, bias, y, config, glu, rms_eps=None, add=None):
        if config is None:
            N, K = wo_gemm.int4_weight_shape(words)
            sms = wo_gemm._num_sms(x2.device.index or 0)
            config = wo_gemm.quads_config(N, K, words.shape[2], group_size, sms, glu)
            r = role(glu, rms_eps, add)
            if glu and "q4split" in spec:
                config["SPLIT_K"] = spec["q4split"]
            if spec.get("q4nopdl") in ("all", r):
                config["PDL"] = False
        return original(x2, words, scales, zeros, group_size, bias, y, config, glu, rms_eps, add)

    return gemv


def profile_replays(graph, replays: int = 5, top: int = 16) -> list[str]:
    """The graph's kernels by GPU time per replay (torch profiler). Under PDL a kernel's time includes its wait
    for the previous one, so the rows overlap and do not add up to the replay."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0)]
    rows.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in rows) / replays
    out = [f"    {len(rows)} kernel names, {sum(e.count for e in rows) / replays:.0f} launches, "
           f"summed {total:.1f} us per replay"]
    for e in rows[:top]:
        out.append(f"    {e.self_device_time_total / replays:8.1f} us  x{e.count // replays:3d}  "
                   f"{e.self_device_time_total / max(1, e.count):6.2f} us each  {e.key[:70]}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llama-8b", "llama-1b"], choices=list(SHAPES))
    ap.add_argument("--variants", nargs="+", default=["main", "down:16x512x6"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--replays", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128, help="the context is about this plus --tokens")
    ap.add_argument("--quant", default="int8-wo", choices=["int8-wo", "int4-wo"],
                    help="the engine's mode (the tile variants touch int8 linears only; unfold and env: work on both)")
    ap.add_argument("--profile", action="store_true", help="also list each variant's kernels (last round)")
    args = ap.parse_args()
    if len(set(args.variants)) != len(args.variants):
        raise ValueError(f"variants repeat: {args.variants}")
    from kiln.llm import LLM, SamplingParams
    from kiln.llm.layers.norm import RMSNorm
    from kiln.ops import wo_gemm
    from kiln.quant import llm as quant_llm

    original, normk = wo_gemm._wo_config, wo_gemm.MAX_WO_NORM_K
    original_quads, int4_hidden = wo_gemm._int4_quads_gemv, quant_llm.MAX_INT4_FOLDED_HIDDEN
    profiles: dict[tuple[str, str], list[str]] = {}
    table = []
    for model in args.models:
        d = Path(tempfile.mkdtemp())
        entry = engine_entry(args.quant, None)
        (d / "config.json").write_text(json.dumps({**SHAPES[model], "kiln_engine": entry}))
        llm = LLM(str(d), dtype="bfloat16", device="cuda", load_format="dummy", max_num_seqs=1,
                  max_num_batched_tokens=4096, max_model_len=max(2048, args.prompt_len + args.tokens + 64),
                  gpu_memory_utilization=0.85)
        eng = llm.engine
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, SHAPES[model]["vocab_size"], (args.prompt_len,), generator=g).tolist()
        params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True, detokenize=False)
        llm.generate([{"prompt_token_ids": prompt}], [params])  # (later requests reuse its prefix blocks)
        times: dict[str, list[float]] = {v: [] for v in args.variants}
        logits: dict[str, torch.Tensor] = {}
        for _ in range(args.rounds):
            for v in args.variants:
                spec = parse(v)
                wo_gemm._wo_config = make_config(original, spec)
                wo_gemm._wo_config_cached.cache_clear()
                wo_gemm.MAX_WO_NORM_K = spec.get("normk", normk)
                wo_gemm._int4_quads_gemv = wrap_quads_gemv(original_quads, spec)
                quant_llm.MAX_INT4_FOLDED_HIDDEN = spec.get("int4fold", int4_hidden)
                saved = {k: os.environ.get(k) for k in spec.get("env", {})}
                os.environ.update(spec.get("env", {}))
                for m in eng.runner.model.modules():
                    if isinstance(m, RMSNorm):
                        m.unit_gain = False if spec.get("unfold") else m.check_unit_gain()
                eng.runner.release_graphs()
                eng.runner.capture_decode_graphs()
                for k, old in saved.items():
                    if old is None:
                        os.environ.pop(k)
                    else:
                        os.environ[k] = old
                llm.generate([{"prompt_token_ids": prompt}], [params])  # the new graphs run in the engine
                logits.setdefault(v, first_token_logits(eng.runner))
                times[v].append(back_to_back(eng.runner.greedy_graphs[1], args.replays))
                if args.profile:
                    profiles[(model, v)] = profile_replays(eng.runner.greedy_graphs[1])
        wo_gemm._wo_config, wo_gemm.MAX_WO_NORM_K = original, normk
        wo_gemm._int4_quads_gemv, quant_llm.MAX_INT4_FOLDED_HIDDEN = original_quads, int4_hidden
        wo_gemm._wo_config_cached.cache_clear()
        base = statistics.median(times[args.variants[0]])
        for v in args.variants:
            t = statistics.median(times[v])
            diff = (logits[v].float() - logits[args.variants[0]].float()).abs().max().item()
            table.append((model, v, t, base / t, " ".join(f"{1e3 * x:.3f}" for x in times[v])))
            print(f"{model:9s} {v:34s} {1e3 * t:.3f} ms  x{base / t:.3f}  rounds {table[-1][4]}  "
                  f"logits differ from the first variant's by at most {diff:.3g}", flush=True)
        llm.shutdown()
        del llm, eng
        torch.cuda.empty_cache()
    for (model, v), lines in profiles.items():
        print(f"\n{model} {v}: kernels of the greedy graph")
        print("\n".join(lines))
    print("\n| model | variant | greedy graph replay (ms) | vs first |")
    print("|---|---|---|---|")
    for model, v, t, r, _ in table:
        print(f"| {model} | {v} | {1e3 * t:.3f} | {r:.3f}x |")


@torch.inference_mode()
def first_token_logits(runner) -> torch.Tensor:
    """The decode graph's logits for token 1 at position 0, alone in its sequence in the pool's last KV block:
    inputs that no earlier request's cache contents reach, so two variants differ only by their kernels'
    arithmetic."""
    last = runner.num_blocks - 1
    runner.g_ids[0], runner.g_pos[0], runner.g_slots[0], runner.g_lens[0] = 1, 0, last * runner.block_size, 1
    runner.g_tables[0, 0] = last
    runner.graphs[1].replay()
    torch.cuda.synchronize()
    return runner.g_out[0].clone()


if __name__ == "__main__":
    main()
