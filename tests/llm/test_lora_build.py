"""kiln build: engine directories, LoRA merge vs peft's merge_and_unload, loader errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.cli import main
from kiln.llm import LLM, build_engine
from tests.llm.conftest import make_checkpoint

peft = pytest.importorskip("peft")


def make_adapter(hf_model, path, targets, r=4, alpha=8, rslora=False, seed=0, fan_in_fan_out=False):
    import copy

    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0,
                          fan_in_fan_out=fan_in_fan_out, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(hf_model), cfg)
    model.save_pretrained(str(path))
    return model


def rel(a, b):
    a = a.to(b.device)
    return ((a - b).abs().max() / b.abs().max()).item()


def test_lora_merge_at_build_matches_peft_merge_and_unload(checkpoints, tmp_path):
    path, hf = checkpoints["llama"]
    a1 = make_adapter(hf, tmp_path / "a1", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"], r=4, alpha=8)
    make_adapter(hf, tmp_path / "a2", ["q_proj", "down_proj"], r=2, alpha=3, rslora=True, seed=1)  # on disk only
    engine = tmp_path / "engine"
    assert main(["build", str(path), "-o", str(engine), "--lora", f"{tmp_path / 'a1'}",
                 "--lora", f"{tmp_path / 'a2'}:0.5"]) == 0
    cfg = json.loads((engine / "config.json").read_text())
    assert cfg["kiln_engine"]["loras"][1]["weight"] == 0.5 and cfg["kiln_engine"]["kiln_version"]
    weights = load_file(str(engine / "model.safetensors"))
    assert "model.layers.0.self_attn.qkv_proj.weight" in weights  # the engine's fused layout
    assert "model.layers.0.mlp.gate_up_proj.weight" in weights

    # reference: peft merges adapter 1 fully and adapter 2 at weight 0.5
    merged = a1.merge_and_unload()
    sd2 = load_file(str(tmp_path / "a2" / "adapter_model.safetensors"))
    scale2 = 3 / 2 ** 0.5 * 0.5
    with torch.no_grad():
        for name, p in merged.named_parameters():
            key = "base_model.model." + name.replace(".weight", "")
            if key + ".lora_A.weight" in sd2:
                p += scale2 * sd2[key + ".lora_B.weight"] @ sd2[key + ".lora_A.weight"]
    llm = LLM(str(engine), dtype="float32")
    prompts = [[0, 5, 9, 33, 100], list(range(1, 40))]
    for prompt, got in zip(prompts, llm.prompt_logits(prompts)):
        with torch.no_grad():
            ref = merged(torch.tensor([prompt])).logits[0]
        assert rel(got, ref) <= 1e-5


def test_gpt2_lora_with_conv1d_layout(checkpoints, tmp_path):
    path, hf = checkpoints["gpt2"]
    adapter = make_adapter(hf, tmp_path / "g", ["c_attn", "c_proj", "c_fc"], r=4, alpha=16, fan_in_fan_out=True)
    merged = adapter.merge_and_unload()
    engine = build_engine(path, tmp_path / "engine", loras=[(str(tmp_path / "g"), 1.0)], show_progress=False)
    got = LLM(str(engine), dtype="float32").prompt_logits([[0, 4, 8, 15, 16, 23, 42]])[0]
    with torch.no_grad():
        ref = merged(torch.tensor([[0, 4, 8, 15, 16, 23, 42]])).logits[0]
    assert rel(got, ref) <= 1e-5


def test_engine_directory_and_hf_checkpoint_give_same_outputs(checkpoints, tmp_path):
    path, _ = checkpoints["qwen2"]
    engine = build_engine(path, tmp_path / "e", show_progress=False)
    assert (engine / "tokenizer.json").exists()
    a = LLM(str(path), dtype="float32").prompt_logits([[0, 1, 2, 3]])[0]
    b = LLM(str(engine), dtype="float32").prompt_logits([[0, 1, 2, 3]])[0]
    assert torch.equal(a.cpu(), b.cpu())


def test_sharded_checkpoint_loads(tmp_path):
    path = tmp_path / "sharded"
    hf = make_checkpoint(path, "llama", shard_size="60KB")
    assert (path / "model.safetensors.index.json").exists()
    got = LLM(str(path), dtype="float32").prompt_logits([[0, 9, 8, 7]])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([[0, 9, 8, 7]])).logits[0]
    assert rel(got, ref) <= 1e-4


def test_mismatched_adapter_shapes_are_named(checkpoints, tmp_path):
    path, hf = checkpoints["llama"]
    make_adapter(hf, tmp_path / "a", ["q_proj"])
    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = next(k for k in sd if k.endswith("lora_B.weight"))
    sd[key] = torch.randn(sd[key].shape[0] + 3, sd[key].shape[1])
    save_file(sd, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="delta for .*q_proj.weight has shape"):
        build_engine(path, tmp_path / "e", loras=[(str(tmp_path / "a"), 1.0)], show_progress=False)
    sd[key] = torch.randn(sd[key].shape[0] - 3, 7)
    save_file(sd, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="mismatched shapes lora_A"):
        build_engine(path, tmp_path / "e", loras=[(str(tmp_path / "a"), 1.0)], show_progress=False)


def test_loader_names_every_missing_unexpected_and_misshaped_tensor(checkpoints, tmp_path):
    path, _ = checkpoints["qwen2"]
    sd = load_file(str(path / "model.safetensors"))
    del sd["model.layers.0.self_attn.k_proj.weight"]
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    sd["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text())
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        LLM(str(bad), dtype="float32")
    msg = str(err.value)
    assert "missing tensors: model.layers.0.self_attn.qkv_proj.weight (shard 'k')" in msg
    assert "unexpected tensors: model.layers.0.self_attn.extra.weight" in msg
    assert "model.layers.1.mlp.down_proj.weight: expected (64, 96), got (3, 3)" in msg


def test_missing_and_corrupt_weight_files(checkpoints, tmp_path):
    path, _ = checkpoints["llama"]
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        LLM(str(d), dtype="float32")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="corrupt weight file"):
        LLM(str(d), dtype="float32")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nowhere"), dtype="float32")


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported architecture.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(str(tmp_path), dtype="float32")
