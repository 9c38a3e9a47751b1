"""Check and time the CUDA graphs of PPO's training micro-step against the eager step, fp32 and bf16 autocast.

For one rollout of the bench's setting (bundled model, separate value model, batch 64 x 48 tokens), one micro-batch:
gradients of the eager step unpadded, the eager step bucket-padded, the first graphed step (capture + replay) and
a second replay; max |difference| to the unpadded eager gradients, NaN counts, and the time of each.

    python3 scripts/gpu/ppo_graph_probe.py [--batch-size 64] [--response-length 48]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.ppo_vs_trl import load_models  # noqa: E402


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(ref: dict, got: dict) -> str:
    diff = max(((got[n].float() - g.float()).abs().max().item() for n, g in ref.items() if n in got), default=-1)
    scale = max(g.abs().max().item() for g in ref.values())
    nan = sum(int(torch.isnan(g).sum()) for g in got.values())
    return f"max|d| {diff:.3e} (max|g| {scale:.3e}), NaN {nan}, missing {len(set(ref) - set(got))}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--response-length", type=int, default=48)
    a = p.parse_args()
    from kiln.data.prompts import PromptDataset
    from kiln.models import default_model_path
    from kiln.rl import PPOConfig, PPOTrainer, WordListReward
    from kiln.rl.cli import DEMO_WORDS, demo_prompts
    from kiln.rl.graphs import MicroStepGraphs

    model_dir = default_model_path()
    texts = demo_prompts()[32:]
    for bf16 in (False, True):
        policy, value = load_models(model_dir, "cuda", 0)
        cfg = PPOConfig(per_device_train_batch_size=a.batch_size, num_mini_batches=2, num_ppo_epochs=4,
                        response_length=a.response_length, learning_rate=3e-5, kl_coef=0.02, temperature=1.0,
                        seed=0, total_episodes=10 * a.batch_size, num_sample_generations=0,
                        local_rollout_forward_batch_size=a.batch_size, bf16=bf16)
        tr = PPOTrainer(cfg, model=policy, model_path=model_dir, reward_model=WordListReward(DEMO_WORDS),
                        value_model=value, train_dataset=PromptDataset(texts), device="cuda")
        tr.sync_weights()
        ro = tr.generate(texts[:a.batch_size])
        fwd = tr._score_rollout(ro)
        gen = torch.Generator(device="cuda").manual_seed(0)
        adv = torch.randn(ro.mask.shape, device="cuda", generator=gen)
        ret = torch.randn(ro.mask.shape, device="cuda", generator=gen) * 0.1
        lp = fwd["logprobs"] - 0.05 * torch.rand(ro.mask.shape, device="cuda", generator=gen)
        idx = torch.randperm(a.batch_size, device="cuda", generator=gen)[:a.batch_size // 2]
        plain = tr._train_inputs(ro, lp, fwd["values"], adv, ret, 1)
        padded = tr._train_inputs(ro, lp, fwd["values"], adv, ret, 16)
        rows = []

        def timed(label, fn):
            tr.model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            stats = fn()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            rows.append((label, dt, stats.detach().clone(), grads(tr.model)))

        timed("eager, unpadded", lambda: tr._micro_step(tr.model, plain, idx, 1.0))
        timed("eager, unpadded (again)", lambda: tr._micro_step(tr.model, plain, idx, 1.0))
        timed("eager, padded", lambda: tr._micro_step(tr.model, padded, idx, 1.0))
        graphs = MicroStepGraphs(lambda i, r, s: tr._micro_step(tr.model, i, r, s), list(tr.model.parameters()))
        timed("graph: capture + replay", lambda: graphs.run(padded, idx, 1.0))
        timed("graph: replay", lambda: graphs.run(padded, idx, 1.0))
        timed("graph: replay", lambda: graphs.run(padded, idx, 1.0))
        ref_stats, ref_grads = rows[0][2], rows[0][3]
        print(f"== {'bf16 autocast' if bf16 else 'fp32'}: ctx {ro.context_length}, padded "
              f"{padded['ids'].shape[1] - padded['responses'].shape[1]}, failure {graphs.failure}")
        for label, dt, stats, g in rows:
            print(f"{label:26s} {dt * 1e3:9.2f} ms  stats max|d| {(stats - ref_stats).abs().max().item():.2e}  "
                  f"{compare(ref_grads, g)}")
        print("stats", [round(x, 5) for x in rows[0][2].tolist()], "/", [round(x, 5) for x in rows[-1][2].tolist()])
        del tr, graphs, policy, value
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
