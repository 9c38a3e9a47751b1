"""PPO with FSDP2 (``PPOConfig.fsdp``) under torchrun (gloo, 2 CPU processes) follows the same loss trajectory and
ends at the same weights as one process with the same global batch, with gradient clipping on; its checkpoint holds
whole tensors that load into a plain Hugging Face model.

The test runs this file under ``torch.distributed.run``; ``main()`` is what each rank executes. The launch and the
trajectory checks are tests/rl/test_ddp.py's.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.rl.test_ddp import (assert_same_trajectory, launch_two_ranks, leave_process_group, run_trainer,
                               wait_for_ranks)

MAX_GRAD_NORM = 0.05  # small enough that every mini-batch is clipped: the DTensor norm path is exercised
EVAL_PROMPTS = 5      # odd, so the two ranks evaluate unequal shares


def record_grad_norms(norms: list[float]) -> None:
    """Wrap ``torch.nn.utils.clip_grad_norm_`` (looked up at each call by the trainer) to record the total norms."""
    clip = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *a, **kw):
        total = clip(params, max_norm, *a, **kw)
        norms.append(float(total.full_tensor() if hasattr(total, "full_tensor") else total))
        return total

    torch.nn.utils.clip_grad_norm_ = recording


def eval_prompts():
    from kiln.data.prompts import PromptDataset
    from tests.rl.conftest import PROMPTS

    return PromptDataset(PROMPTS[:EVAL_PROMPTS])


def main() -> int:
    """One rank under torchrun: train sharded, then write its trajectory, prompts, grad norms, evaluation, the whole
    trained weights (rank 0) and a checkpoint."""
    from torch.distributed.tensor import DTensor

    from kiln.rl.ppo import _full_state_dict

    policy, out = Path(sys.argv[1]), Path(sys.argv[2])
    norms: list[float] = []
    record_grad_norms(norms)
    trainer, history, seen = run_trainer(policy, int(os.environ["WORLD_SIZE"]), fsdp=True, max_grad_norm=MAX_GRAD_NORM)
    rank = trainer.rank
    assert trainer.fsdp and trainer.ddp_model is None
    assert all(isinstance(p, DTensor) for p in trainer.model.parameters())
    assert all(isinstance(p, DTensor) for p in trainer.ref_model.parameters())
    # a shard, not a replica: the embedding's rows are split over the two ranks
    emb = trainer.model.policy.model.embed_tokens.weight
    assert emb.to_local().shape[0] < emb.shape[0]
    scores = trainer.evaluate(eval_prompts())
    weights = _full_state_dict(trainer.model, rank == 0)
    trainer.save_model(out / "ckpt")
    trainer.load_value_head(out / "ckpt")  # each rank keeps its shard of the whole file
    value_after = _full_state_dict(trainer.model.value_head, rank == 0)
    if rank == 0:
        torch.save(weights, out / "weights.pt")
        for k, v in value_after.items():
            assert torch.equal(v, weights[f"value_head.{k}"]), k
    (out / f"rank{rank}.json").write_text(json.dumps({"history": history, "prompts": seen, "norms": norms,
                                                      "eval": scores, "world_size": trainer.world_size}))
    leave_process_group()
    return 0


def test_fsdp_two_processes_match_one_process_and_save_a_plain_checkpoint(tiny_policy, tmp_path, caplog):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    proc = launch_two_ranks(Path(__file__), str(tiny_policy), str(tmp_path))
    # the single-process reference runs here while the two ranks run: fsdp=True with one process trains unsharded
    torch.set_num_threads(1)
    norms: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_
    try:
        record_grad_norms(norms)
        with caplog.at_level(logging.WARNING, logger="kiln.rl.ppo"):
            trainer, ref_history, ref_prompts = run_trainer(tiny_policy, 1, fsdp=True, max_grad_norm=MAX_GRAD_NORM)
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    assert "nothing to shard" in caplog.text and not trainer.fsdp
    ref_eval = trainer.evaluate(eval_prompts())
    ranks = wait_for_ranks(proc, tmp_path)
    assert_same_trajectory(ranks, ref_history, ref_prompts)

    # clipping is on (every total norm exceeds the limit) and the sharded norm is the whole model's
    assert len(norms) == 3 * 2 * 2 and min(norms) > MAX_GRAD_NORM
    for r in ranks:
        assert r["norms"] == pytest.approx(norms, rel=1e-4)
        assert r["eval"] == pytest.approx(ref_eval, rel=1e-5)
        assert r["eval"]["eval/num_prompts"] == EVAL_PROMPTS

    # the trained weights equal the single process's, within fp32 tolerance
    ref_w = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    got = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert got.keys() == ref_w.keys()
    for k, v in ref_w.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)

    # the FSDP checkpoint is whole: a plain model loads it and holds exactly the trained weights
    ckpt = tmp_path / "ckpt"
    plain = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, got[f"policy.{k}"]), k
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()  # still tied
    for k, v in load_file(str(ckpt / "value_head.safetensors")).items():
        assert torch.equal(v, got[f"value_head.{k}"]), k


def test_fsdp_with_a_peft_config_or_a_bad_value_raises(tiny_policy, monkeypatch):
    from kiln.rl import PPOConfig, PPOTrainer, ppo

    with pytest.raises(ValueError, match="fsdp must be True or False"):
        PPOConfig(fsdp="yes")
    peft = pytest.importorskip("peft")
    monkeypatch.setattr(ppo, "_init_distributed", lambda device=None: (0, 2))  # as if under torchrun; fails first
    with pytest.raises(ValueError, match="fsdp with peft_config is not supported"):
        PPOTrainer(PPOConfig(fsdp=True), model=str(tiny_policy), reward_model=lambda p, r: [0.0] * len(r),
                   train_dataset=["a"], peft_config=peft.LoraConfig(r=2, target_modules=["q_proj"]))


if __name__ == "__main__":
    sys.exit(main())
