"""kiln's engine vs Hugging Face transformers on tiny random checkpoints of every family (fp32, CPU)."""

import pytest
import torch

from kiln.llm import LLM, SamplingParams
from tests.llm.conftest import FAMILIES

PROMPTS = [[0, 5, 9, 33, 100, 7, 12], [0, 3, 200], list(range(2, 70)), [0, 17, 17, 17, 250, 31, 8, 99, 120, 4, 5]]


def hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=1, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_logits_match_transformers(checkpoints, family):
    path, hf = checkpoints[family]
    llm = LLM(str(path), dtype="float32", max_num_seqs=8, block_size=8)
    for prompt, got in zip(PROMPTS, llm.prompt_logits(PROMPTS)):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        got = got.cpu()
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        assert rel <= 1e-4, f"{family}: max relative logit error {rel:.2e}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_matches_transformers_with_chunking_prefix_cache_and_preemption(checkpoints, family):
    path, hf = checkpoints[family]
    n_new = 40
    shared = list(range(3, 40))  # a long shared prefix -> prefix-cache hits
    prompts = [shared + [5, 9, 11], shared + [200, 201], [0, 44, 45], list(range(60, 130))]
    expected = [hf_greedy(hf, p, n_new) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True)

    # (1) roomy pool, chunked prefill with a tiny token budget, prefix caching on
    llm = LLM(str(path), dtype="float32", block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    first = llm.generate(prompts[:1], params)  # warms the prefix cache
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in first + outs] == expected[:1] + expected
    assert llm.engine.block_manager.prefix_hits > 0, "the shared prefix should have hit the cache"
    assert outs[1].num_cached_tokens >= 32
    assert llm.engine.get_stats()["kv_blocks_used"] == 0

    # (2) a pool so small that sequences must be preempted and recomputed
    small = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=40, max_num_batched_tokens=64, max_num_seqs=4)
    outs = small.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert small.engine.scheduler.num_preemptions > 0, "the test must actually preempt"
    assert small.engine.get_stats()["kv_blocks_used"] == 0
