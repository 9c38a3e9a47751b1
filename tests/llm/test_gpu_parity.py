"""On a GPU in bf16: every family's logits within bf16 tolerance of transformers', and the trained bundled model's
greedy continuations identical to transformers' for 32 tokens on >= 90% of prompts."""

import copy

import pytest
import torch

from kiln.llm import LLM, SamplingParams
from tests.llm.conftest import FAMILIES

pytestmark = pytest.mark.gpu

PROMPTS = [[0, 5, 9, 33, 100, 7, 12], list(range(2, 150)), [0, 3, 200]]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_logits_match_transformers(checkpoints, family):
    path, hf = checkpoints[family]
    hf = copy.deepcopy(hf).to("cuda", torch.bfloat16)  # the session fixture's model stays on the CPU in fp32
    llm = LLM(str(path), dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3)
    for prompt, got in zip(PROMPTS, llm.prompt_logits(PROMPTS)):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt], device="cuda")).logits[0].float()
        rel = ((got.float() - ref).norm() / ref.norm()).item()
        assert rel <= 2e-2, f"{family}: relative logit error {rel:.3e} in bf16"


BUNDLED_PROMPTS = ["ROMEO:", "JULIET:", "KING HENRY:", "HAMLET:\nTo be", "First Citizen:\n", "O, what a",
                   "MACBETH:\nIs this a", "Enter the KING", "LEAR:\nBlow, winds", "My lord, I",
                   "What say you", "Good morrow", "PORTIA:\nThe quality", "Now is the winter", "Friends, Romans",
                   "If music be", "All the world's", "Once more unto", "Alas, poor", "Shall I compare"]


def test_bundled_model_greedy_matches_transformers_bf16():
    transformers = pytest.importorskip("transformers")
    from kiln.models import default_model_path

    path = default_model_path()
    if not (path / "model.safetensors").exists():
        pytest.fail("the bundled model is missing")
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).cuda().eval()
    llm = LLM(str(path), dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3)
    ours = llm.generate(BUNDLED_PROMPTS, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    same = 0
    for prompt, out in zip(BUNDLED_PROMPTS, ours):
        ids = tok(prompt, return_tensors="pt").input_ids.cuda()
        assert out.prompt_token_ids == ids[0].tolist()
        ref = hf.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
        same += ref == out.outputs[0].token_ids
    assert same >= 0.9 * len(BUNDLED_PROMPTS), f"only {same}/{len(BUNDLED_PROMPTS)} greedy continuations match"
