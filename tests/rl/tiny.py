"""A tiny Llama that has read a few lines of Hamlet (seconds of training on the CPU), saved with a BPE tokenizer.

Random tiny checkpoints either repeat one token or sample near-uniformly; PPO needs a policy that writes words
with some entropy, so the demo tests start from this one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.llm.conftest import TEXT, VOCAB, make_tokenizer


def make_pretrained_tiny(path: Path, steps: int = 120, seed: int = 0) -> Path:
    import transformers
    from tokenizers import Tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    make_tokenizer(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = torch.tensor(tok.encode(TEXT, add_special_tokens=False).ids)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq, batch = 32, 16
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        x = torch.stack([ids[s:s + seq] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(path, safe_serialization=True)
    return path
