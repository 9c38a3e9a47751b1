"""kiln.llm vs Hugging Face ``generate`` on random bf16 checkpoints with real model shapes.

Workloads (pre-tokenized prompts, ignore_eos, fixed output lengths; warm-up and graph capture untimed):
  (a) 256 requests, input and output lengths uniform in [100, 1024] (nano-vllm's benchmark)
  (b) batch-1 decode, 128 in / 512 out, with the fraction of the memory roofline
  (c) 512 requests of 1000 in / 1000 out
  (d) 64 requests of 512 in / 256 out, all at once (batch-64 throughput)
HF runs the same prompts with sdpa in bf16; for (a) on one sorted batch of ``--hf-batch`` requests (its rate is
what is compared: padding waste is not charged to it). Also prints the per-GEMV bandwidth of the decode linears.

  python bench/llm_throughput.py --models llama-1b qwen3-0.6b --workloads a b
  python bench/llm_throughput.py --models llama-8b --workloads b c --no-hf c

Quantized engines (``--quant``): each mode's engine (random weights, quantized as ``kiln build --quant`` would)
against our bf16 engine on the same workloads, plus the engine size (bytes of the tensors the engine file holds:
``model.engine_state_dict()``; the safetensors header adds well under 1 MB). One engine per mode serves every
workload; the HF anchor is not run.

  python bench/llm_throughput.py --models llama-1b llama-8b --workloads b d --quant int8-wo int4-wo w8a8 fp8
  python bench/llm_throughput.py --models tiny --workloads b d --quant int8-wo int4-wo w8a8 fp8 --device cpu
  python bench/llm_throughput.py --models llama-1b --workloads b --quant int8-wo int4-wo --interleave --repeat 7

``--interleave`` times the batch-1 row (b) and the batch-64 row (d) in alternating rounds over every mode's engine
at once (one set of engines per workload, each holding only that workload's KV cache) and reports the median of the
per-round ratios (TPOT for (b), output tok/s for (d)), so drift between runs cannot land on one side of the ratio
only.

Tensor parallelism (``--tensor-parallel-size 1 2``): the same workloads at each size (dummy weights, one engine
per size, its worker processes started by the engine), each size against the first; the HF anchor is not run.

  python bench/llm_throughput.py --models llama-8b --workloads c --tensor-parallel-size 1 2 --repeat 1
  python bench/llm_throughput.py --models tiny --workloads b c --tensor-parallel-size 1 2 --device cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Table, alternating_rounds, copy_bandwidth, device_name  # noqa: E402

SHAPES = {
    "llama-1b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                 "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
                 "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True, "hidden_act": "silu",
                 "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                 "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"},
    "qwen3-0.6b": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
                   "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                   "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 151643,
                   "eos_token_id": 151645, "torch_dtype": "bfloat16"},
    "llama-8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                 "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
                 "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
                 "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                 "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"},
    # CPU dry runs of the script (scripts/gpu/quant_engine.sh DRY_RUN=1)
    "tiny": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
             "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 32, "vocab_size": 512, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 0,
             "eos_token_id": 1, "torch_dtype": "bfloat16"},
}
QUANT_MODES = ("bf16", "int8-wo", "int4-wo", "w8a8", "fp8")


def make_workload(name: str, vocab: int, seed: int = 0, small: bool = False):
    """``small``: the same shapes scaled down for CPU dry runs."""
    g = torch.Generator().manual_seed(seed)
    if small:
        n, i, o = {"a": (8, 48, 16), "b": (1, 16, 16), "c": (8, 32, 32), "d": (8, 32, 16)}[name]
        ins, outs = [i] * n, [o] * n
    elif name == "a":
        n = 256
        ins = torch.randint(100, 1025, (n,), generator=g).tolist()
        outs = torch.randint(100, 1025, (n,), generator=g).tolist()
    elif name == "b":
        ins, outs = [128], [512]
    elif name == "c":
        ins, outs = [1000] * 512, [1000] * 512
    elif name == "d":
        ins, outs = [512] * 64, [256] * 64
    else:
        raise ValueError(f"unknown workload {name!r}")
    prompts = [torch.randint(10, vocab - 10, (L,), generator=g).tolist() for L in ins]
    return prompts, outs


def gemv_bandwidth(cfg: dict, bw: float) -> list[tuple[str, float, float]]:
    """Per-linear batch-1 bandwidth, rotating weight copies so L2 cannot serve them."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd
    shapes = {"qkv_proj": (qkv, h), "o_proj": (h, cfg["num_attention_heads"] * hd), "gate_up_proj": (2 * inter, h),
              "down_proj": (h, inter), "lm_head": (v, h)}
    rows = []
    for name, (n, k) in shapes.items():
        copies = max(2, int(4 * 2**30 // (n * k * 2)))
        copies = min(copies, 16)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for w in ws:
            torch.nn.functional.linear(x, w)
        torch.cuda.synchronize()
        reps = 5
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            for w in ws:
                torch.nn.functional.linear(x, w)
        e.record()
        torch.cuda.synchronize()
        t = s.elapsed_time(e) / 1e3 / (reps * copies)
        rows.append((name, t * 1e6, n * k * 2 / t / bw))
        del ws
    torch.cuda.empty_cache()
    return rows


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def engine_bytes(model) -> int:
    """Bytes of the tensors an engine directory stores for this model (tied weights once)."""
    return sum(t.numel() * t.element_size() for t in model.engine_state_dict().values())


def streamed_bytes(model) -> int:
    """Bytes one batch-1 decode step must read: every stored tensor once, except an input embedding table not
    tied to the LM head, of which a step reads one row (Llama-3.1-8B: 1.05 of 16.06 GB). The roofline uses this;
    counting the unread table would flatter the fraction by 7% on the 8B shape."""
    emb = model.input_embeddings()
    head = getattr(model, "lm_head", None)
    head_ptrs = {t.data_ptr() for t in head.state_dict().values()} if head is not None else set()
    emb_tensors = list(emb.state_dict().values())
    if any(t.data_ptr() in head_ptrs for t in emb_tensors):
        return engine_bytes(model)  # tied: the LM head streams the table every step
    return engine_bytes(model) - sum(t.numel() * t.element_size() for t in emb_tensors)


def run_kiln(model_dir: Path, prompts, outs, repeat: int, max_num_seqs: int, tag: str, llm=None):
    from kiln.llm import LLM

    own = llm is None
    if own:
        llm = LLM(str(model_dir), dtype="bfloat16", load_format="dummy", max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=8192, max_model_len=4096, gpu_memory_utilization=0.85)
    stats = time_generate(llm, prompts, outs, repeat)
    if own:
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return stats


def time_generate(llm, prompts, outs, repeat: int, warmup: bool = True) -> dict:
    from kiln.llm import SamplingParams

    temp = 0.0 if len(prompts) == 1 else 0.6  # (b) is a greedy latency run; (a)/(c)/(d) sample as nano-vllm's
    params = [SamplingParams(temperature=temp, max_tokens=o, ignore_eos=True, detokenize=False) for o in outs]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    if warmup:  # (graphs already captured)
        llm.generate(inputs[: min(4, len(inputs))], params[: min(4, len(inputs))])
    walls, last = [], None
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        last = llm.generate(inputs, params)
        sync()
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in last)
    assert out_tokens == sum(outs), "every request must produce exactly its output length"
    in_tokens = sum(len(p) for p in prompts)
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in last]
    tpot = [(o.metrics.finished_time - o.metrics.first_token_time) / max(1, len(o.outputs[0].token_ids) - 1)
            for o in last]
    weight_bytes = engine_bytes(llm.engine.model)  # quantized weights are buffers: count what the engine stores
    step_bytes = streamed_bytes(llm.engine.model)
    return {"wall_s": walls, "out_tok_s": out_tokens / wall, "total_tok_s": (in_tokens + out_tokens) / wall,
            "ttft_p50_ms": 1e3 * statistics.median(ttft), "tpot_p50_ms": 1e3 * statistics.median(tpot),
            "weight_bytes": weight_bytes, "streamed_bytes": step_bytes, "preemptions": llm.engine.scheduler.num_preemptions}


def engine_entry(mode: str, kv_cache_dtype: str | None, lm_head: bool = True, embedding: bool = True) -> dict | None:
    """The ``kiln_engine`` entry ``kiln build --quant mode`` writes, for a dummy-weight engine of that mode
    (weight-only modes: the LM head and the embedding quantized as the build's defaults, or not:
    ``--no-quantize-lm-head`` / ``--no-quantize-embedding``; ``embedding=True`` lets the loader store it as a
    build would)."""
    if mode == "bf16" and kv_cache_dtype is None:
        return None
    quant = None
    if mode in ("int8-wo", "int4-wo"):
        quant = {"mode": mode, "group_size": 128 if mode == "int4-wo" else None, "lm_head": lm_head,
                 "embedding": embedding}
    elif mode == "w8a8":
        from kiln.llm.quantize import RUNTIME_SMOOTH

        quant = {"mode": mode, "group_size": None, "smoothquant": {"alpha": 0.5,
                                                                  "runtime_smooth": list(RUNTIME_SMOOTH)}}
    elif mode == "fp8":
        quant = {"mode": mode, "group_size": None}
    return {"quant": quant, "kv_cache": {"dtype": kv_cache_dtype} if kv_cache_dtype else None, "dtype": "bfloat16"}


def build_quant_engine(args, model: str, mode: str, device: str, max_num_seqs: int = 64, max_model_len: int = 2048):
    """(label, LLM) of one --quant mode's dummy-weight engine. Engines built while others are alive size their KV
    cache from what those left (the runner counts the process's allocations), so several fit at once."""
    from kiln.llm import LLM

    small = device == "cpu"
    kv = args.kv_cache_dtype if mode != "bf16" else None
    d = Path(tempfile.mkdtemp())
    tied_float_head = args.no_quantize_lm_head and SHAPES[model].get("tie_word_embeddings", False)
    entry = engine_entry(mode, kv, lm_head=not args.no_quantize_lm_head,
                         embedding=not (args.no_quantize_embedding or tied_float_head))
    (d / "config.json").write_text(json.dumps({**SHAPES[model], **({"kiln_engine": entry} if entry else {})}))
    label = mode + (f"+kv-{kv}" if kv else "")
    t0 = time.perf_counter()
    llm = LLM(str(d), dtype="bfloat16" if device == "cuda" else "float32", device=device,
              load_format="dummy", max_num_seqs=min(8, max_num_seqs) if small else max_num_seqs,
              max_num_batched_tokens=8192, max_model_len=max_model_len, gpu_memory_utilization=0.85)
    print(f"   {model} {label}: engine {engine_bytes(llm.engine.model) / 1e9:.3f} GB, ready in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return label, llm


def interleaved(args, model: str, device: str, modes: list[str], workload: str, table: Table, details: dict,
                sizes_row: bool) -> None:
    """Workload (b) or (d) for every mode in alternating rounds (``bench.common.alternating_rounds``) on engines
    that are all alive at once, each with the KV cache of that workload only (4 sequences for (b); 64 of 1024
    tokens for (d)), plus each engine's size (``sizes_row``). The bf16 TPOT moved between 1.16 and 1.27 ms across
    runs on one H100 model (session 13) while int8-wo's held at 0.80 ms, and on an H200 (session 24) the same
    bf16 engine's batch-64 TPOT ranged 2.54-3.23 ms between processes, so a ratio from separate timings carries that
    drift; here each round gives every mode the same conditions, and the row's ratio is the median of the
    per-round ratios: bf16's TPOT over the mode's for (b), the mode's output tok/s over bf16's for (d)."""
    seqs, model_len = (4, 2048) if workload == "b" else (64, 1024)
    engines = dict(build_quant_engine(args, model, m, device, max_num_seqs=seqs, max_model_len=model_len)
                   for m in modes)
    labels = list(engines)
    if sizes_row:
        sizes = {lab: engine_bytes(llm.engine.model) for lab, llm in engines.items()}
        for lab in labels:
            table.add(f"{model} engine size {lab}", sizes[lab] / 1e9, sizes[labels[0]] / 1e9, "GB",
                      higher_is_better=False)
    prompts, outs = make_workload(workload, SHAPES[model]["vocab_size"], small=device == "cpu")
    for llm in engines.values():  # warm-up, untimed: the whole workload once (every prefill shape it compiles)
        time_generate(llm, prompts, outs, 1)
    rounds = alternating_rounds([lambda llm=llm: time_generate(llm, prompts, outs, 1, warmup=False)
                                 for llm in engines.values()], args.repeat)
    stats = dict(zip(labels, rounds))
    base = labels[0]
    key, unit, name = (("tpot_p50_ms", "ms", "TPOT p50") if workload == "b" else ("out_tok_s", "tok/s", "out tok/s"))
    for lab in labels:
        vals = [st[key] for st in stats[lab]]
        base_vals = [st[key] for st in stats[base]]
        ratios = [b / q if workload == "b" else q / b for b, q in zip(base_vals, vals)]
        row = table.add(f"{model} ({workload}) {lab} {name}, interleaved", statistics.median(vals),
                        statistics.median(base_vals), unit, higher_is_better=workload != "b")
        row.extra = {f"{key}_per_round": vals, "ratio_per_round": ratios, "median_ratio": statistics.median(ratios),
                     "tpot_ms_per_round": [st["tpot_p50_ms"] for st in stats[lab]]}
        details["runs"][f"{model}/{workload}-interleaved/{lab}"] = row.extra
        print(f"   {model} ({workload}) {lab}, interleaved: {name} per round {[round(v, 3) for v in vals]} {unit}, "
              f"median ratio to bf16 {statistics.median(ratios):.3f}x (rounds {min(ratios):.3f}-{max(ratios):.3f})",
              flush=True)
    table.save(args.json)
    engines.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_quant(args, device: str) -> Table:
    """Every --quant mode against our bf16 engine: workloads' output tok/s and the engine size."""
    small = device == "cpu"
    modes = ["bf16"] + [m for m in args.quant if m != "bf16"]
    table = Table(f"kiln quantized engines vs kiln bf16 (dummy weights{', CPU dry run' if small else ''})",
                  anchor_name="kiln bf16")
    details = {"runs": {}}
    for model in args.models:
        cfg = SHAPES[model]
        workloads = list(args.workloads)
        alternated = [w for w in ("b", "d") if w in workloads] if args.interleave else []
        sized = bool(alternated)  # the first interleaved workload adds the engine-size rows
        for w in alternated:
            interleaved(args, model, device, modes, w, table, details, sizes_row=w == alternated[0])
            workloads.remove(w)
        if not workloads:
            continue
        base: dict[str, float] = {}
        for mode in modes:
            label, llm = build_quant_engine(args, model, mode, device)
            size = engine_bytes(llm.engine.model)
            base.setdefault("size", size)
            if not sized:
                table.add(f"{model} engine size {label}", size / 1e9, base["size"] / 1e9, "GB",
                          higher_is_better=False)
            for w in workloads:
                prompts, outs = make_workload(w, cfg["vocab_size"], small=small)
                # (b) and (d) take seconds: the median of --repeat runs keeps a first run's one-time kernel compiles
                # (new prefill shapes on a fresh machine) out of the figure; (a) and (c) run once
                st = time_generate(llm, prompts, outs, args.repeat if w in ("b", "d") else 1)
                base.setdefault(w, st["out_tok_s"])
                base.setdefault(f"{w} tpot", st["tpot_p50_ms"])
                row = table.add(f"{model} ({w}) {label} out tok/s", st["out_tok_s"], base[w], "tok/s")
                row.extra = {"tpot_p50_ms": st["tpot_p50_ms"], "ttft_p50_ms": st["ttft_p50_ms"]}
                if w == "b":  # batch-1 decode speed, issue 8's bar: bf16's TPOT over this engine's (out tok/s
                    # also carries the prefill)
                    table.add(f"{model} ({w}) {label} TPOT p50", st["tpot_p50_ms"], base[f"{w} tpot"], "ms",
                              higher_is_better=False)
                details["runs"][f"{model}/{w}/{label}"] = st
                print(f"   {model} ({w}) {label}: {st['out_tok_s']:.0f} out tok/s "
                      f"({st['out_tok_s'] / base[w]:.2f}x bf16), TPOT p50 {st['tpot_p50_ms']:.2f} ms "
                      f"({base[f'{w} tpot'] / st['tpot_p50_ms']:.2f}x bf16)", flush=True)
                table.save(args.json)  # after every run: a later timeout keeps what was measured
            del llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    Path(args.json).with_suffix(".details.json").write_text(json.dumps(details, indent=2, default=str))
    return table


def run_tp(args, device: str) -> Table:
    """Every --tensor-parallel-size on the same workloads: output tok/s against the first size."""
    from kiln.llm import LLM

    small = device == "cpu"
    sizes = list(dict.fromkeys(args.tensor_parallel_size))
    table = Table(f"kiln tensor parallelism: tp={'/'.join(map(str, sizes))} vs tp={sizes[0]} (dummy weights"
                  f"{', CPU dry run' if small else ''})", anchor_name=f"tp={sizes[0]}")
    details = {"runs": {}}
    for model in args.models:
        cfg = SHAPES[model]
        d = Path(tempfile.mkdtemp())
        (d / "config.json").write_text(json.dumps(cfg))
        base: dict[str, float] = {}
        for tp in sizes:
            t0 = time.perf_counter()
            llm = LLM(str(d), dtype="bfloat16" if device == "cuda" else "float32", device=device,
                      load_format="dummy", tensor_parallel_size=tp, max_num_seqs=8 if small else args.max_num_seqs,
                      max_num_batched_tokens=8192, max_model_len=4096 if not small else 512,
                      gpu_memory_utilization=0.85)
            print(f"   {model} tp={tp}: ready in {time.perf_counter() - t0:.1f} s "
                  f"({llm.engine.get_stats()['kv_blocks_total']} KV blocks per rank)", flush=True)
            try:
                for w in args.workloads:
                    prompts, outs = make_workload(w, cfg["vocab_size"], small=small)
                    st = time_generate(llm, prompts, outs, args.repeat)
                    base.setdefault(w, st["out_tok_s"])
                    row = table.add(f"{model} ({w}) tp={tp} out tok/s", st["out_tok_s"], base[w], "tok/s")
                    row.extra = {"total_tok_s": st["total_tok_s"], "tpot_p50_ms": st["tpot_p50_ms"],
                                 "ttft_p50_ms": st["ttft_p50_ms"], "preemptions": st["preemptions"]}
                    details["runs"][f"{model}/{w}/tp{tp}"] = st
                    print(f"   {model} ({w}) tp={tp}: {st['out_tok_s']:.0f} out tok/s, {st['total_tok_s']:.0f} total "
                          f"tok/s, TTFT p50 {st['ttft_p50_ms']:.1f} ms, TPOT p50 {st['tpot_p50_ms']:.2f} ms "
                          f"({st['out_tok_s'] / base[w]:.2f}x tp={sizes[0]})", flush=True)
                    table.save(args.json)  # after every run: a later timeout keeps what was measured
            finally:
                llm.shutdown()
                del llm
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    Path(args.json).with_suffix(".details.json").write_text(json.dumps(details, indent=2, default=str))
    return table


def run_hf(cfg: dict, prompts, outs, batch: int, repeat: int):
    import transformers

    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                          attn_implementation="sdpa").cuda().eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))[:batch]
    sel = [prompts[i] for i in order]
    want = [outs[i] for i in order]
    L = max(len(p) for p in sel)
    ids = torch.full((len(sel), L), 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(sel):  # left padding, as generate expects for decoder-only models
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    ids, mask = ids.cuda(), mask.cuda()
    n_new = max(want)
    with torch.no_grad():
        model.generate(ids[:, :32], attention_mask=mask[:, :32], max_new_tokens=4, do_sample=False,
                       pad_token_id=0)
        walls = []
        for _ in range(repeat):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sample = dict(do_sample=True, temperature=0.6, top_k=0) if len(sel) > 1 else dict(do_sample=False)
            model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0,
                           **sample)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"wall_s": walls, "out_tok_s": sum(want) / wall, "batch": len(sel), "decode_steps": n_new}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama-1b", "qwen3-0.6b"], choices=list(SHAPES))
    ap.add_argument("--workloads", nargs="+", default=["a", "b"], choices=["a", "b", "c", "d"])
    ap.add_argument("--no-hf", nargs="*", default=[], help="workloads to run without the HF anchor")
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--json", default="bench/llm_throughput.json")
    ap.add_argument("--quant", nargs="+", default=None, choices=QUANT_MODES,
                    help="compare these quantized engine modes with our bf16 engine (no HF anchor)")
    ap.add_argument("--kv-cache-dtype", default=None, choices=["int8", "fp8"],
                    help="with --quant: the quantized modes also use this KV-cache dtype")
    ap.add_argument("--no-quantize-lm-head", action="store_true",
                    help="with --quant: weight-only engines keep the LM head float (kiln build --no-quantize-lm-head)")
    ap.add_argument("--no-quantize-embedding", action="store_true",
                    help="with --quant: weight-only engines keep the input embedding float (kiln build "
                         "--no-quantize-embedding)")
    ap.add_argument("--interleave", action="store_true",
                    help="with --quant: time workloads (b) and (d) in alternating rounds over all modes' engines, "
                         "alive at once (--repeat rounds); the ratio is the median of the per-round ratios")
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu (dry runs, --models tiny)")
    ap.add_argument("--tensor-parallel-size", type=int, nargs="+", default=None, metavar="N",
                    help="compare these tensor-parallel sizes (one GPU per rank) on the workloads (no HF anchor)")
    args = ap.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tensor_parallel_size:
        if args.quant:
            print("--tensor-parallel-size and --quant are separate comparisons; run them one at a time")
            return 2
        if device == "cpu" and any(m != "tiny" for m in args.models):
            print("CPU runs take --models tiny only (a dry run of the script)")
            return 2
        print(device_name(), flush=True)
        table = run_tp(args, device)
        print()
        print(table.render())
        table.save(args.json)
        return 0
    if args.quant:
        if device == "cpu" and any(m != "tiny" for m in args.models):
            print("CPU runs take --models tiny only (a dry run of the script)")
            return 2
        table = run_quant(args, device)
        print()
        print(table.render())
        table.save(args.json)
        return 0
    if device != "cuda" or not torch.cuda.is_available():
        print("llm_throughput needs a CUDA device")
        return 2
    bw = copy_bandwidth()
    print(f"{device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s")
    table = Table("kiln.llm vs HF generate (bf16, sdpa)", anchor_name="hf")
    details = {"copy_bw": bw, "runs": {}}
    for model in args.models:
        cfg = SHAPES[model]
        tmp = Path(tempfile.mkdtemp())
        (tmp / "config.json").write_text(json.dumps(cfg))
        print(f"\n== {model}: GEMV bandwidth at batch 1 (fraction of copy bandwidth)")
        for name, us, frac in gemv_bandwidth(cfg, bw):
            print(f"   {name:<14}{us:9.1f} us   {frac * 100:5.1f}%")
        for w in args.workloads:
            prompts, outs = make_workload(w, cfg["vocab_size"])
            ours = run_kiln(tmp, prompts, outs, args.repeat, args.max_num_seqs if w != "b" else 8, f"{model}/{w}")
            hf = None
            if w not in args.no_hf:
                hf = run_hf(cfg, prompts, outs, 1 if w == "b" else args.hf_batch, args.repeat if w == "b" else 1)
            details["runs"][f"{model}/{w}"] = {"kiln": ours, "hf": hf}
            row = table.add(f"{model} ({w}) output tok/s", ours["out_tok_s"], hf["out_tok_s"] if hf else None,
                            "tok/s")
            row.extra = {"total_tok_s": ours["total_tok_s"], "ttft_p50_ms": ours["ttft_p50_ms"],
                         "tpot_p50_ms": ours["tpot_p50_ms"]}
            print(f"   {model} ({w}): kiln {ours['out_tok_s']:.0f} out tok/s, {ours['total_tok_s']:.0f} total tok/s, "
                  f"TTFT p50 {ours['ttft_p50_ms']:.1f} ms, TPOT p50 {ours['tpot_p50_ms']:.2f} ms"
                  + (f"; HF {hf['out_tok_s']:.0f} tok/s (batch {hf['batch']})" if hf else ""))
            if w == "b":
                roofline = bw / ours["streamed_bytes"]
                decode = 1e3 / ours["tpot_p50_ms"]
                frac = decode / roofline
                details["runs"][f"{model}/{w}"]["roofline_fraction"] = frac
                table.add(f"{model} (b) decode % of roofline", 100 * frac, None, "%")
                print(f"   batch-1 decode {decode:.0f} tok/s; roofline {roofline:.0f} tok/s "
                      f"({ours['streamed_bytes'] / 1e9:.2f} GB read per step of {ours['weight_bytes'] / 1e9:.2f} GB "
                      f"weights) -> {100 * frac:.1f}%")
    print()
    print(table.render())
    table.save(args.json)
    Path(args.json).with_suffix(".details.json").write_text(json.dumps(details, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
