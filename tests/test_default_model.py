"""The bundled default model is a real Hugging Face checkpoint that writes recognisable English.

It loads with ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` from ``kiln/models/shakespeare``
(written by ``scripts/train_default_model.py``); the tests skip only where its weights are absent.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from kiln.models import default_model_path

MODEL_DIR = default_model_path()
WEIGHTS = MODEL_DIR / "model.safetensors"
MAX_WEIGHT_BYTES = 16_000_000

pytestmark = pytest.mark.skipif(not WEIGHTS.exists(), reason=f"{WEIGHTS} is absent (train it with "
                                "scripts/train_default_model.py)")

# Frequent English words, modern and Elizabethan. A greedy continuation of "ROMEO:" from a model that has
# learnt English uses several of them; one that has not produces fragments that match none.
COMMON_WORDS = frozenset("""
a about after again against all am an and any are art as at away be been before being but by can come
could day dead death did do does doth done down ear earth even eye eyes fair father for from give go god
good grace great had hand has hast hath have he hear heart heaven her here him his how i if in into is it
king know lady last let life like live lord love made make man may me mine more most much must my name
never night no nor not now o of off on one or our out own peace poor say see shall she should sir so some
speak still such sweet take tell than that the thee their them then there these they thine this those thou
though thus thy time to too true up upon us very was way we well were what when where which while who why
will with word world would ye yet you young your
""".split())


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    m.eval()
    return m


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


def test_files_and_weight_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "training_report.json"):
        assert (MODEL_DIR / name).is_file(), name
    assert WEIGHTS.stat().st_size <= MAX_WEIGHT_BYTES
    cfg = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in cfg["chat_template"]


def test_config_is_llama_gqa_tied(model):
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    cfg = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert cfg.architectures == ["LlamaForCausalLM"] and cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with safe_open(str(WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert sum(p.numel() for p in model.parameters()) * 2 <= MAX_WEIGHT_BYTES


def test_tokenizer_and_chat_template(model, tokenizer):
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.bos_token_id == model.config.bos_token_id
    assert tokenizer.eos_token_id == model.config.eos_token_id
    messages = [{"role": "system", "content": "Speak as a player."},
                {"role": "user", "content": "Who is there?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|bos|><|system|>\nSpeak as a player.<|end|>\n<|user|>\nWho is there?<|end|>\n"
                    "<|assistant|>\n")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    for tag in ("<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert tokenizer.convert_tokens_to_ids(tag) in ids, tag
    assert tokenizer.decode(ids, skip_special_tokens=True).count("Who is there?") == 1
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end in (model.generation_config.eos_token_id or [])


def test_greedy_romeo_is_english(model, tokenizer):
    ids = tokenizer("ROMEO:", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None)
    new = out[0, ids.shape[1]:].tolist()
    assert len(new) == 40
    text = tokenizer.decode(new, skip_special_tokens=True)
    assert "\ufffd" not in text, text
    assert all(ch.isprintable() or ch in "\n\t" for ch in text), repr(text)
    words = re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())
    common = [w for w in words if w in COMMON_WORDS]
    assert len(words) >= 10, repr(text)
    assert len(set(common)) >= 5, repr(text)
    assert len(common) >= 0.3 * len(words), repr(text)


def test_training_report():
    report = json.loads((MODEL_DIR / "training_report.json").read_text())
    assert len(report["held_out_plays"]) >= 3
    assert report["held_out_perplexity"] == pytest.approx(math.exp(report["held_out_loss"]), rel=1e-2)
    assert report["held_out_perplexity"] < 200  # a uniform guess over 4096 tokens scores 4096
    assert report["weights_bytes"] == WEIGHTS.stat().st_size
