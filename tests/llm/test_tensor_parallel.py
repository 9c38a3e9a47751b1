"""Tensor parallelism on the CPU (gloo, 2 processes; on GPU machines too, where scripts/gpu/tp_check.py runs
NCCL): TP=2 equals TP=1 for every family, float and weight-only quantized; each rank reads only its slice of the
checkpoint; a dead worker stops the engine; bad sizes fail early."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kiln.llm import LLM, SamplingParams
from kiln.llm.config import ModelConfig
from kiln.llm.distributed import EngineDeadError, TensorParallel, check_tensor_parallel_size
from kiln.llm.loader import checkpoint_files, load_weights
from kiln.llm.models import model_class
from tests.llm.conftest import FAMILIES

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[0, 5, 9, 33, 100, 7, 12], [0, 3, 200], list(range(2, 45))]
ENGINE = dict(device="cpu", dtype="float32", block_size=4, max_num_seqs=4, max_num_batched_tokens=16,
              num_kv_blocks=64)


def max_rel(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(got, ref))


def greedy(llm: LLM, n: int = 12) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp2_logits_and_greedy_generation_equal_tp1(checkpoints, family):
    path, hf = checkpoints[family]
    one = LLM(str(path), **ENGINE)
    ref_logits, ref_tokens = one.prompt_logits(PROMPTS), greedy(one)
    two = LLM(str(path), tensor_parallel_size=2, **ENGINE)
    try:
        assert len(two.engine.workers.procs) == 1 and two.engine.workers.procs[0].is_alive()
        # rank 0 really holds half the heads and half the vocabulary
        cfg = two.engine.model_config
        attn = two.engine.model.attention_layers()[0]
        assert attn.num_heads == cfg.num_heads // 2
        assert attn.num_kv_heads == max(1, cfg.num_kv_heads // 2)
        assert two.engine.model.input_embeddings().weight.shape[0] == -(-cfg.vocab_size // 2)
        assert two.engine.runner.kv_pool.shape[-2] == attn.num_kv_heads
        rel = max_rel(two.prompt_logits(PROMPTS), ref_logits)
        assert rel <= 1e-5, f"{family}: TP=2 logits differ from TP=1 by {rel:.2e} (relative)"
        assert greedy(two) == ref_tokens  # chunked prefill (16-token budget), decode and the prefix cache
        if family == "llama":  # in-memory weight updates reach every rank's shard
            new = [(n, p.detach() * 0.9) for n, p in hf.named_parameters()]
            one.update_weights(new)
            two.update_weights(new)
            rel = max_rel(two.prompt_logits(PROMPTS), one.prompt_logits(PROMPTS))
            assert rel <= 1e-5
            assert max_rel(one.prompt_logits(PROMPTS), ref_logits) > 1e-2  # the update changed the model
    finally:
        two.shutdown()
    assert not two.engine.workers.procs[0].is_alive()


@pytest.mark.parametrize("mode, family, group_size, emb", [("int8-wo", "qwen2", None, False),
                                                            ("int4-wo", "mistral", 32, True),
                                                            ("int8-wo", "llama", None, True),
                                                            ("int4-wo", "mistral-tied", 32, True)])
def test_tp2_weight_only_quantized_engine_equals_tp1(checkpoints, tmp_path, mode, family, group_size, emb):
    """Quantized body, quantized vocab-parallel LM head (each rank its vocabulary rows, logits gathered) and with
    ``emb`` the quantized vocab-parallel embedding (tied: the head's int8 or int4 table read by the embedding;
    mistral: its own int8 rows); without it the embedding stays float. ``mistral-tied`` is the mistral checkpoint
    with tied embeddings (llama's MLP, 48 inputs per rank, takes no int4 group size)."""
    import shutil

    from kiln.llm.build import build_engine
    from kiln.llm.layers.parallel import QuantizedVocabParallelEmbedding
    from kiln.quant.llm import WEIGHT_ONLY_MODULES

    tied = family in ("llama", "mistral-tied")
    source = checkpoints[family.removesuffix("-tied")][0]
    if family.endswith("-tied"):
        source = Path(shutil.copytree(source, tmp_path / family))
        cfg = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    engine = build_engine(source, tmp_path / "engine", dtype="float32", quant=mode,
                          group_size=group_size, show_progress=False, quantize_embedding=emb)
    one = LLM(str(engine), **ENGINE)
    ref = one.prompt_logits(PROMPTS)
    assert isinstance(one.engine.model.lm_head, WEIGHT_ONLY_MODULES)
    two = LLM(str(engine), tensor_parallel_size=2, **ENGINE)
    try:
        model = two.engine.model
        layer = model.model.layers[0]
        assert isinstance(layer.self_attn.o_proj, WEIGHT_ONLY_MODULES)
        assert layer.self_attn.o_proj.in_features == two.engine.model_config.num_heads * 16 // 2
        vocab = two.engine.model_config.vocab_size
        assert isinstance(model.lm_head, WEIGHT_ONLY_MODULES) and model.lm_head.out_features == -(-vocab // 2)
        assert isinstance(model.model.embed_tokens, QuantizedVocabParallelEmbedding) == emb
        if emb:
            assert model.model.embed_tokens.num_embeddings == -(-vocab // 2)
            assert model.model.embed_tokens.shared == tied
            if tied:
                assert model.model.embed_tokens.table().qweight is model.lm_head.qweight
        assert max_rel(two.prompt_logits(PROMPTS), ref) <= 1e-5
    finally:
        two.shutdown()


class RecordingSlice:
    """A safetensors slice that records which rows were read (proves no rank reads a whole sharded tensor)."""

    def __init__(self, inner, reads: list):
        self.inner, self.reads = inner, reads

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, key):
        self.reads.append(key)
        return self.inner[key]


@pytest.mark.parametrize("family", ["mistral", "gpt2"])
def test_each_rank_reads_only_its_slice_and_holds_the_right_heads(checkpoints, family):
    """Rank 1 of 2, built in-process (loading needs no process group): MQA's one KV head is replicated to it, and
    GPT-2's transposed fused c_attn gives it the second half of q, of k and of v."""
    path, hf = checkpoints[family]
    cfg = ModelConfig.from_file(path / "config.json")
    tp = TensorParallel(rank=1, size=2)
    with torch.device("meta"):
        model = model_class(cfg)(cfg, tp)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    reads: dict[str, list] = {}

    def tensors():
        for f in checkpoint_files(path):
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    yield name, RecordingSlice(h.get_slice(name), reads.setdefault(name, []))

    load_weights(model, tensors(), model.map_hf_name)
    sd = hf.state_dict()
    if family == "mistral":
        D, H = cfg.head_dim, cfg.num_heads
        attn = model.model.layers[0].self_attn
        q, k, v = attn.qkv_proj.weight.split([H // 2 * D, D, D])
        assert torch.equal(q, sd["model.layers.0.self_attn.q_proj.weight"][H // 2 * D:])
        assert torch.equal(k, sd["model.layers.0.self_attn.k_proj.weight"])  # the one KV head, replicated
        assert torch.equal(v, sd["model.layers.0.self_attn.v_proj.weight"])
        down = sd["model.layers.0.mlp.down_proj.weight"]
        assert torch.equal(model.model.layers[0].mlp.down_proj.weight, down[:, down.shape[1] // 2:])
        assert reads["model.layers.0.mlp.down_proj.weight"] == [(slice(None), slice(64, 128))]
        assert reads["model.layers.0.self_attn.q_proj.weight"] == [slice(32, 64)]
        emb = sd["model.embed_tokens.weight"]
        assert torch.equal(model.model.embed_tokens.weight, emb[emb.shape[0] // 2:])
    else:
        h = cfg.hidden_size
        w = sd["transformer.h.0.attn.c_attn.weight"]  # Conv1D: [in, 3h]
        got = model.transformer.h[0].attn.c_attn.weight
        for i in range(3):
            assert torch.equal(got[i * h // 2:(i + 1) * h // 2], w[:, i * h + h // 2:(i + 1) * h].t())
        assert torch.equal(model.transformer.h[0].attn.c_proj.bias, torch.zeros(h))  # rank 0 adds the bias
        assert len(reads["transformer.h.0.attn.c_attn.weight"]) == 3
    full_reads = [n for n, keys in reads.items() if any(k == slice(None) for k in keys)]
    sharded = [n for n in full_reads if n.endswith(("q_proj.weight", "c_attn.weight", "down_proj.weight",
                                                    "embed_tokens.weight", "wte.weight", "c_fc.weight"))]
    assert sharded == [], f"read whole on rank 1: {sharded}"


def _run_with_deadline(fn, seconds: float):
    """Run fn in a thread; fail (instead of hanging the suite) if it has not returned in time."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"no result after {seconds} s: the engine hangs on a dead worker"
    return box


def test_dead_worker_stops_the_engine_with_a_clear_error_not_a_hang(checkpoints):
    path = str(checkpoints["llama"][0])
    params = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)
    # (1) killed between steps
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    pid = llm.engine.workers.procs[0].pid
    os.kill(pid, signal.SIGKILL)
    llm.engine.workers.procs[0].join(10)
    box = _run_with_deadline(lambda: llm.generate(PROMPTS, params), 60)
    err = box.get("error")
    assert isinstance(err, EngineDeadError), box
    assert f"worker rank 1 (pid {pid}) was killed by signal {signal.SIGKILL.value}" in str(err)
    with pytest.raises(EngineDeadError, match="engine is stopped"):
        llm.generate(PROMPTS[:1], params)
    # (2) killed while steps run (the collective in flight on rank 0 must fail, not wait forever), in a child
    # process: on CUDA the collective stuck on the dead rank may stay queued on this GPU's stream
    child = Path(__file__).with_name("tp_killed_mid_step.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    run = subprocess.run([sys.executable, str(child), path, json.dumps(ENGINE)], capture_output=True, text=True,
                         timeout=150, env=env)
    lines = run.stdout.splitlines()
    assert lines and lines[0].startswith("killed "), (run.stdout, run.stderr[-3000:])
    pid2 = int(lines[0].split()[1])
    assert len(lines) >= 2 and lines[1].startswith("EngineDeadError after"), (run.stdout, run.stderr[-3000:])
    assert f"worker rank 1 (pid {pid2}) was killed by signal {signal.SIGKILL.value}" in lines[1]
    assert time.time() - t0 < 150


def test_a_step_waiting_on_the_device_stops_when_a_worker_dies(checkpoints):
    """On CUDA, rank 0 waits for each step by polling (``wait_for_device`` -> ``wait_until``) rather than in a
    blocking synchronise that a dead rank's NCCL peers would never release; here a wait that never completes on
    its own (standing in for the stuck collective) must end with EngineDeadError once the worker is killed."""
    llm = LLM(str(checkpoints["llama"][0]), tensor_parallel_size=2, **ENGINE)
    workers = llm.engine.workers
    pid = workers.procs[0].pid
    threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
    t0 = time.time()
    box = _run_with_deadline(lambda: workers.wait_until(lambda: False), 30)
    assert isinstance(box.get("error"), EngineDeadError), box
    assert f"pid {pid}" in str(box["error"]) and time.time() - t0 < 30
    llm.shutdown()


def _cfg(heads: int, kv: int, inter: int = 96) -> ModelConfig:
    return ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 16 * heads,
                                "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": kv,
                                "intermediate_size": inter, "max_position_embeddings": 64})


@pytest.mark.parametrize("size, cfg, device, match", [
    (0, _cfg(4, 2), "cpu", "tensor_parallel_size must be an int >= 1, got 0"),
    (-2, _cfg(4, 2), "cpu", "tensor_parallel_size must be an int >= 1, got -2"),
    ("2", _cfg(4, 2), "cpu", "tensor_parallel_size must be an int >= 1, got '2'"),
    (3, _cfg(4, 2), "cpu", r"tensor_parallel_size=3 does not divide the number of attention heads .* \(4\)"),
    (6, _cfg(12, 4), "cpu", "tensor_parallel_size=6 and the model's 4 KV heads: one must divide the other"),
    (4, _cfg(4, 4, inter=90), "cpu", r"tensor_parallel_size=4 does not divide the MLP intermediate size .* \(90\)"),
    # one rank more than the GPUs, rounded up to a size that splits the heads: only the GPU count is wrong
    (max(2, 1 << torch.cuda.device_count().bit_length()), _cfg(64, 64, inter=1024), "cuda", "GPUs .* visible"),
])
def test_bad_tensor_parallel_sizes_fail_at_start_up(size, cfg, device, match):
    with pytest.raises(ValueError, match=match):
        check_tensor_parallel_size(size, cfg, torch.device(device))


def test_llm_rejects_bad_tensor_parallel_size_before_starting_workers(checkpoints):
    path = str(checkpoints["llama"][0])  # 4 heads, 2 KV heads
    for size in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"tensor_parallel_size must be an int >= 1, got {size!r}"):
            LLM(path, tensor_parallel_size=size, **ENGINE)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the number of attention heads"):
        LLM(path, tensor_parallel_size=3, **ENGINE)
    # rank 0 on the last GPU: rank 1 would need one past it, on any machine; sizes that split the model. Without
    # a GPU the device itself is the error.
    n = torch.cuda.device_count()
    match = r"tensor_parallel_size=2 needs 2 GPUs \(one per rank, from cuda:" if n else "asks for a GPU, but"
    with pytest.raises(ValueError, match=match):
        LLM(path, tensor_parallel_size=2, **{**ENGINE, "device": f"cuda:{max(n - 1, 0)}"})


def test_int4_group_must_divide_each_ranks_row_parallel_input(checkpoints):
    from kiln.llm.layers.parallel import quantize_parallel_

    cfg = ModelConfig.from_file(checkpoints["qwen2"][0] / "config.json")  # intermediate 96 -> 48 per rank
    with torch.device("meta"):
        model = model_class(cfg)(cfg, TensorParallel(rank=0, size=2))
    with pytest.raises(ValueError, match=r"group size 32 does not divide the per-rank input .*down_proj \(48"):
        quantize_parallel_(model, "int4-wo", 32, quantize_weights=False)


def test_cli_flags_carry_tensor_parallel_size():
    import argparse

    from kiln.llm.cli import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    for cmd in (["generate", "hi"], ["chat"], ["serve"]):
        try:
            args = parser.parse_args(cmd + ["--tensor-parallel-size", "2"])
        except SystemExit:  # serve needs the [server] extra
            assert cmd == ["serve"]
            continue
        assert args.tensor_parallel_size == 2
    pytest.importorskip("fastapi")  # the [server] extra
    from kiln.llm.server.cli import engine_kwargs

    args = parser.parse_args(["serve", "--tensor-parallel-size", "2"])
    assert engine_kwargs(args)["tensor_parallel_size"] == 2


def test_each_worker_lands_on_its_own_gpu_index():
    """A worker's spec carries rank 0's device and build_rank adds the rank once: rank r of an engine on cuda:k
    runs on cuda:(k + r). (Adding it twice sent rank 1 to cuda:2 on a two-GPU machine.) Pure device arithmetic,
    so it runs without CUDA."""
    from kiln.llm.distributed import rank_device, worker_spec

    for first in (0, 2):
        base = torch.device("cuda", first)
        for rank in (1, 2, 3):
            spec = worker_spec(rank, 4, 0, "m", None, "auto", {}, base, 0)
            assert rank_device(torch.device(spec.device), rank) == torch.device("cuda", first + rank)
    assert rank_device(torch.device("cpu"), 1) == torch.device("cpu")
