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


def test_graph_decode_inputs_are_staged_into_the_flat_buffers_with_padding_rows():
    """A CUDA-graph decode step's inputs go into the flat buffers the graph reads (one copy each per step): the
    step's rows, then padding rows up to the bucket (token 0, position 0, slot -1, length 1, block 0); table
    columns past the step's width and rows past the bucket are left as they were."""
    from kiln.llm.runner import StepInput, stage_graph_inputs

    bmax, max_blocks = 8, 5
    i64 = torch.full((3 * bmax,), 77, dtype=torch.long)
    i32 = torch.full((bmax * (1 + max_blocks),), 55, dtype=torch.int32)
    ids, pos, slots = i64.view(3, bmax)
    lens, tables = i32[:bmax], i32[bmax:].view(bmax, max_blocks)
    inp = StepInput(input_ids=torch.tensor([5, 6, 7]), positions=torch.tensor([10, 11, 12]),
                    slot_mapping=torch.tensor([100, 200, 300]), seqlens_k=torch.tensor([11, 12, 13], dtype=torch.int32),
                    block_tables=torch.tensor([[1, 2], [3, 4], [5, 6]], dtype=torch.int32), is_decode=True, graph=True)
    stage_graph_inputs(inp, 4, ids, pos, slots, lens, tables)
    assert ids.tolist() == [5, 6, 7, 0] + [77] * 4 and pos.tolist() == [10, 11, 12, 0] + [77] * 4
    assert slots.tolist() == [100, 200, 300, -1] + [77] * 4
    assert lens.tolist() == [11, 12, 13, 1] + [55] * 4
    assert tables[:4, :2].tolist() == [[1, 2], [3, 4], [5, 6], [0, 0]]
    assert (tables[:, 2:] == 55).all() and (tables[4:] == 55).all()
