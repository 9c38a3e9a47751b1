"""PPO with DistributedDataParallel under torchrun (gloo, 2 CPU processes) follows the same loss trajectory as one
process with the same global batch: rollouts are sharded across ranks, advantages and stats are global.

The test runs this file under ``torch.distributed.run``; ``main()`` is what each rank executes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TRAJECTORY = ("loss/policy_avg", "loss/value_avg", "objective/kl", "objective/scores", "objective/entropy",
              "policy/approxkl_avg", "policy/clipfrac_avg", "val/clipfrac_avg", "policy/entropy_avg", "val/ratio",
              "rollout/response_length")


def ppo_config(processes: int, **overrides):
    """Global batch 8 in micro-batches of 2, two mini-batches of 4: 1 process accumulates 4 micro-batches per
    iteration, each of 2 processes 2 (HF/TRL semantics: global batch = per device x accumulation x processes)."""
    from kiln.rl import PPOConfig

    kw = dict(response_length=6, per_device_train_batch_size=2, gradient_accumulation_steps=4 // processes,
              num_mini_batches=2, num_ppo_epochs=2, learning_rate=3e-3, temperature=1.0, total_episodes=24,
              num_sample_generations=0, seed=0, logging_steps=0)
    return PPOConfig(**{**kw, **overrides})


def run_trainer(policy: Path, processes: int, **overrides):
    from kiln.data.prompts import PromptDataset
    from kiln.rl import PPOTrainer
    from tests.rl.conftest import PROMPTS, e_share

    # gloo on the CPU, on GPU machines too (one GPU cannot hold two ranks)
    trainer = PPOTrainer(ppo_config(processes, **overrides), model=str(policy), reward_model=e_share,
                         train_dataset=PromptDataset(PROMPTS), engine_kwargs={"block_size": 8}, device="cpu")
    seen: list[list[str]] = []
    original = trainer.generate

    def recording_generate(batch, *a, **kw):
        seen.append(list(batch))
        return original(batch, *a, **kw)

    trainer.generate = recording_generate
    history = trainer.train(progress=False)
    return trainer, history, seen


def main() -> int:
    """One rank under torchrun: train, then write its trajectory, prompts and final weights."""
    policy, out = Path(sys.argv[1]), Path(sys.argv[2])
    trainer, history, seen = run_trainer(policy, int(os.environ["WORLD_SIZE"]))
    rank = trainer.rank
    from torch.nn.parallel import DistributedDataParallel

    assert isinstance(trainer.ddp_model, DistributedDataParallel)
    torch.save({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}, out / f"weights{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"history": history, "prompts": seen,
                                                      "world_size": trainer.world_size}))
    leave_process_group()
    return 0


def leave_process_group() -> None:
    """Every rank leaves the group before it exits: a gloo group torn down at interpreter exit aborted a rank now
    and then ("terminate called without an active exception", 1 run in 3 of the FSDP test on a 2-core machine)."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def launch_two_ranks(script: Path, *args: str) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node=2 script args...`` (gloo on the CPU), output captured."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_ranks(proc: subprocess.Popen, out: Path, timeout: float = 240) -> list[dict]:
    """Wait for torchrun to exit cleanly; each rank's ``rank{r}.json``."""
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"torchrun did not finish in {timeout:.0f} s")
    assert proc.returncode == 0, log[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    return ranks


def assert_same_trajectory(ranks: list[dict], ref_history: list[dict], ref_prompts: list[list[str]]) -> None:
    """Both ranks follow the single process's stats; each generated its own half of every global batch."""
    assert len(ref_history) == 3 and all(len(r["history"]) == 3 for r in ranks)
    for it in range(3):
        assert ranks[0]["prompts"][it] + ranks[1]["prompts"][it] == ref_prompts[it]
        assert ranks[0]["prompts"][it] != ranks[1]["prompts"][it]
    for it, ref in enumerate(ref_history):
        for r in ranks:
            got = r["history"][it]
            for k in TRAJECTORY:
                assert got[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), f"iteration {it + 1}: {k}"
    losses = [h["loss/policy_avg"] for h in ref_history]
    assert len(set(losses)) == 3 and ref_history[-1]["objective/kl"] > 0  # the policy moved: not a trivial match


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tiny_policy, tmp_path):
    pytest.importorskip("transformers")
    proc = launch_two_ranks(Path(__file__), str(tiny_policy), str(tmp_path))
    # the single-process reference runs here while the two ranks run
    torch.set_num_threads(1)
    trainer, ref_history, ref_prompts = run_trainer(tiny_policy, 1)
    ranks = wait_for_ranks(proc, tmp_path)
    assert_same_trajectory(ranks, ref_history, ref_prompts)
    # the trained weights agree: across ranks (DDP) and with the single process
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt", weights_only=True) for r in range(2))
    ref_w = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
    for k, v in ref_w.items():
        assert torch.equal(w0[k], w1[k]), k
        torch.testing.assert_close(w0[k], v, rtol=1e-4, atol=1e-5, msg=k)


if __name__ == "__main__":
    sys.exit(main())
