"""Tiny seeded checkpoints for the PPO tests (with the BPE tokenizer of tests/llm), saved to tmp dirs."""

from __future__ import annotations

import pytest
import torch

from tests.llm.conftest import VOCAB, make_tokenizer


def make_policy_checkpoint(path, seed: int = 0, hidden: int = 64, emb_std: float = 0.1, vocab: int = VOCAB):
    """A tiny Llama whose sampling distribution is spread out (not one-hot like tests/llm's, not uniform)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=0,
                                   eos_token_id=1)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, emb_std)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory):
    return make_policy_checkpoint(tmp_path_factory.mktemp("rl") / "policy")


PROMPTS = ["To be, or not", "whether 'tis nobler", "the slings and", "a sea of troubles", "outrageous fortune",
           "take arms against", "that is the question", "in the mind"]


def e_share(prompts, responses):
    """A dense rule reward a random tiny model can learn fast: the share of response characters that are 'e'."""
    return [r.count("e") / max(len(r), 1) for r in responses]


@pytest.fixture(scope="session")
def eos_heavy_policy(tmp_path_factory):
    """A tiny checkpoint that often samples its EOS tokens mid-response, as the bundled model's
    ``generation_config.json`` lists two: token 1 (the tokenizer's and config.json's EOS) and token 3 (an extra
    end-of-turn id, like ``<|end|>``). Their (tied) embedding rows are scaled up, so their logits dominate in about
    half of the contexts."""
    import json

    transformers = pytest.importorskip("transformers")
    path = make_policy_checkpoint(tmp_path_factory.mktemp("rl") / "eos_heavy")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight[[1, 3]] *= 8.0
    model.save_pretrained(path, safe_serialization=True)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 3]}))
    return path
