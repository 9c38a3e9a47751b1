"""Tiny seeded Hugging Face checkpoints of every supported family, saved to tmp dirs for parity tests."""

from __future__ import annotations

import json

import pytest
import torch

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows "
        "of outrageous fortune, or to take arms against a sea of troubles. Ünïcödé ✓ 日本語 — émigré café. ") * 20
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
VOCAB = 384


def make_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256}))


FAMILIES = {
    # GQA, Llama-3 rope scaling, tied embeddings
    "llama": lambda t: t.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_theta=500000.0, bos_token_id=0, eos_token_id=1,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}),
    # MQA (one KV head)
    "mistral": lambda t: t.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=256, sliding_window=None, bos_token_id=0, eos_token_id=1),
    # qkv bias, GQA
    "qwen2": lambda t: t.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=1),
    # q/k RMSNorm, head_dim != hidden / heads
    "qwen3": lambda t: t.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=1),
    # MHA, learned positions, Conv1D weights
    "gpt2": lambda t: t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                   bos_token_id=0, eos_token_id=1),
}
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def make_checkpoint(path, family: str, seed: int = 0, shard_size: str | None = None):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = FAMILIES[family](transformers)
    model = getattr(transformers, HF_CLASSES[family])(cfg).eval()
    # random init is small: scale the weights up so logits are not near-uniform and argmax is well separated
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15 if "emb" not in name and "wte" not in name and "wpe" not in name else 1.0)
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    make_tokenizer(path)
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{family: (path, hf_model)} built once per session."""
    root = tmp_path_factory.mktemp("ckpts")
    return {f: (root / f, make_checkpoint(root / f, f, seed=i)) for i, f in enumerate(FAMILIES)}
