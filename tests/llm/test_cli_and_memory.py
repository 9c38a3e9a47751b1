"""The LLM CLI on the bundled model, and memory discipline (one KV pool, per-layer views)."""

import subprocess
import sys

import pytest
import torch

from kiln.cli import main
from kiln.llm import LLM
from kiln.models import default_model_path

needs_bundled = pytest.mark.skipif(not (default_model_path() / "model.safetensors").exists(),
                                   reason="bundled model weights absent")


@needs_bundled
def test_kiln_generate_streams_the_bundled_model(capsys):
    assert main(["generate", "ROMEO:", "--max-tokens", "12", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and len(out.strip()) > len("ROMEO:") + 5


@needs_bundled
def test_kiln_chat_answers_each_line_then_quits():
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "chat", "--max-tokens", "8", "--device", "cpu"],
                          input="What light through yonder window breaks?\n\n", capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("bot>") == 1 and "you>" in proc.stdout


def test_kv_cache_is_one_pool_with_per_layer_views(checkpoints):
    path, _ = checkpoints["llama"]
    llm = LLM(str(path), dtype="float32", num_kv_blocks=12, block_size=4)
    runner = llm.engine.runner
    pool = runner.kv_pool
    layers = llm.engine.model.attention_layers()
    assert len(layers) == llm.engine.model_config.num_layers
    base = pool.untyped_storage().data_ptr()
    for i, attn in enumerate(layers):
        for kv, cache in ((0, attn.k_cache), (1, attn.v_cache)):
            assert cache.untyped_storage().data_ptr() == base, "every layer's cache must view the one pool"
            assert cache.data_ptr() == pool[kv, i].data_ptr()
    # and the views are live: a generation writes through them into the pool
    before = pool.clone()
    llm.generate([[0, 5, 6, 7, 8]], None)
    assert not torch.equal(before, pool)
