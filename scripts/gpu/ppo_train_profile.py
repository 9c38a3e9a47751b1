"""Where a kiln PPO iteration's training phase spends its time (issue 9's per-iteration bar).

Builds the bench's kiln side (``bench/ppo_vs_trl.py``: bundled model, separate critic, word-list reward), runs
warm-up iterations, then profiles a few with ``torch.profiler``: the phase times, how many CUDA kernels one
iteration launches and how long they run, and the operators with the most host time. A training phase whose
kernels take a fraction of its wall time is bound by the host (Python, autograd, launches), not by the GPU.

    python scripts/gpu/ppo_train_profile.py [--batch-size 64 --response-length 48 --iterations 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--response-length", type=int, default=48)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the profiler table and a Chrome trace here")
    a = p.parse_args(argv)

    from bench.ppo_vs_trl import load_models
    from kiln.data.prompts import PromptDataset
    from kiln.models import default_model_path
    from kiln.rl import PPOConfig, PPOTrainer, WordListReward
    from kiln.rl.cli import DEMO_WORDS, demo_prompts

    model_dir = default_model_path()
    policy, value = load_models(model_dir, a.device, 0)
    iters = a.warmup + a.iterations
    cfg = PPOConfig(per_device_train_batch_size=a.batch_size, num_mini_batches=2, num_ppo_epochs=4,
                    response_length=a.response_length, learning_rate=3e-5, kl_coef=0.02, seed=0,
                    total_episodes=iters * a.batch_size, num_sample_generations=0,
                    local_rollout_forward_batch_size=a.batch_size, lr_scheduler_type="linear", adam_epsilon=1e-8,
                    weight_decay=0.0)
    tr = PPOTrainer(cfg, model=policy, model_path=model_dir, reward_model=WordListReward(DEMO_WORDS),
                    value_model=value, train_dataset=PromptDataset(demo_prompts()[32:]), device=a.device)
    for _ in range(a.warmup):
        tr.step()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if a.device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    stats = []
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(a.iterations):
            stats.append(tr.step())
    if a.device == "cuda":
        torch.cuda.synchronize()
    phases = {k: statistics.median(s[f"time/{k}_s"] for s in stats)
              for k in ("sync", "rollout", "score", "train", "iteration")}
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels) / a.iterations if kernels else 0.0
    table = events.table(sort_by="self_cpu_time_total", row_limit=30)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ppo_profile.txt").write_text(table)
        prof.export_chrome_trace(str(out / "ppo_trace.json"))
    print(table)
    print(f"per iteration (median of {a.iterations}): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in phases.items()))
    print(f"CUDA kernels per iteration: {len(kernels) / a.iterations:.0f}, their time {gpu_us / 1e3:.1f} ms "
          f"(the iteration's wall time {phases['iteration'] * 1e3:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
