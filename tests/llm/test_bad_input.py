"""Bad input gets a clear error naming the problem, and the engine keeps serving afterwards."""

import pytest
import torch

from kiln.llm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(checkpoints):
    path, _ = checkpoints["qwen3"]
    return LLM(str(path), dtype="float32", max_num_seqs=8, block_size=8, max_model_len=64)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"temperature": -0.5}, ValueError, "temperature must be >= 0"),
    ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\]"),
    ({"n": 0}, ValueError, "n must be >= 1"),
    ({"max_tokens": 0}, ValueError, "max_tokens must be >= 1"),
    ({"stop": 5}, TypeError, "stop must be a string or a list of strings"),
    ({"stop": ["ok", 3]}, TypeError, "stop must be a string or a list of strings"),
    ({"top_k": -3}, ValueError, "top_k must be"),
    ({"min_p": 2.0}, ValueError, "min_p must be"),
    ({"logprobs": 50}, ValueError, "logprobs must be in"),
    ({"min_tokens": 9, "max_tokens": 3}, ValueError, "min_tokens"),
    ({"repetition_penalty": 0}, ValueError, "repetition_penalty must be > 0"),
    ({"temperature": "hot"}, TypeError, "temperature must be a number"),
    ({"stop_token_ids": [-1]}, TypeError, "stop_token_ids"),
])
def test_invalid_sampling_params(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SamplingParams(**kwargs)


def test_bad_prompts_are_rejected_and_engine_keeps_serving(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate("", SamplingParams())
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate({"prompt_token_ids": []}, SamplingParams())
    with pytest.raises(ValueError, match="prompt has 80 tokens.*max_model_len=64"):
        llm.generate({"prompt_token_ids": list(range(80))}, SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [0, 10**6]}, SamplingParams())
    with pytest.raises(TypeError, match="prompt must be"):
        llm.generate([3.5], SamplingParams())
    # a batch with one bad prompt is rejected whole, leaving nothing queued
    with pytest.raises(ValueError):
        llm.generate(["To be", ""], SamplingParams())
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(["To be", "or not"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)


def test_abort_frees_blocks_and_other_requests_finish(llm):
    eng = llm.engine
    eng.add_request("a", "To be, or not to be", SamplingParams(max_tokens=30, ignore_eos=True))
    eng.add_request("b", "that is the question", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.abort("a") and not eng.abort("a")
    finished = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == {"b"} and len(finished["b"].outputs[0].token_ids) == 10
    assert eng.get_stats()["kv_blocks_used"] == 0
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("x", "To be", SamplingParams())
        eng.add_request("x", "To be", SamplingParams())
    eng.abort("x")


def test_engine_config_errors(checkpoints):
    path, _ = checkpoints["qwen3"]
    with pytest.raises(ValueError, match="max_model_len \\(100000\\) exceeds the model's context"):
        LLM(str(path), dtype="float32", max_model_len=100000)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        LLM(str(path), dtype="float32", block_size=12)
    with pytest.raises(ValueError, match="unknown dtype"):
        LLM(str(path), dtype="float7")
    # a device kiln cannot run on, or a GPU that is not there: named before anything loads (torch said "Torch not
    # compiled with CUDA enabled" or "invalid device ordinal" from the first allocation)
    with pytest.raises(ValueError, match="kiln runs on 'cpu' or 'cuda', not 'mps'"):
        LLM(str(path), device="mps")
    with pytest.raises(ValueError, match="'tpu' is not a device name"):
        LLM(str(path), device="tpu")
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match="asks for a GPU, but" if n == 0 else f"is not one of the {n} visible GPU"):
        LLM(str(path), device=f"cuda:{n}")
    small = LLM(str(path), dtype="float32", num_kv_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="needs .* KV blocks but the cache has only 2"):
        small.generate([[0, 1, 2]], SamplingParams(max_tokens=40))
