"""PPO: kiln.rl (kiln.llm rollouts) vs TRL's PPOTrainer (trl==1.12.0, ``trl.experimental.ppo``).

Both sides get the same model (policy, frozen reference, a separate value model: the checkpoint loaded as a
``AutoModelForSequenceClassification`` with a zero ``score`` head), the same rule-based reward (``WordListReward``;
on TRL's side wrapped as a module whose backbone returns the score as its hidden state and whose ``score`` head is
the identity, TRL's reward-model layout), the same prompts and the same hyper-parameters (fixed-length responses,
fp32 unless --bf16 (then bf16 autocast on both sides), no gradient checkpointing on either side). TRL runs twice:
as shipped, and with ``gc.freeze()`` before training (TRL calls ``gc.collect()`` twice per iteration, which walks
every live object unless frozen).

Measured: wall time per PPO iteration (median over the iterations after the first), rollout tokens/s (the sampling
step alone), and the final policy's mean reward on held-out prompts (sampled by one engine for all policies, with
the same seeds). Run ``python bench/ppo_vs_trl.py --help``; it prints the table and writes JSON next to this file.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Table, device_name  # noqa: E402


# ----------------------------------------------------------------------------------------------- shared setup
def load_models(model_dir: Path, device: str, seed: int):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        value.score.weight.zero_()
        if getattr(value.score, "bias", None) is not None:
            value.score.bias.zero_()
    if value.config.pad_token_id is None:
        value.config.pad_token_id = policy.config.pad_token_id
    return policy.to(device), value.to(device)


class TextRewardModel(torch.nn.Module):
    """TRL's reward-model layout around a Python reward of (prompt, response) texts.

    ``backbone(input_ids, attention_mask, ...)`` decodes each row's real tokens, splits off the prompt (the longest
    known prompt that is a prefix), scores the response text and returns the score at every position as a
    ``[B, T, 1]`` hidden state; ``score`` is the identity, so TRL's ``get_reward`` picks it up at the last token.
    """

    base_model_prefix = "backbone"

    class _Backbone(torch.nn.Module):
        def __init__(self, outer):
            super().__init__()
            self.outer = [outer]

        def forward(self, input_ids, attention_mask, **_):
            o = self.outer[0]
            prompts, responses = [], []
            for ids, m in zip(input_ids.tolist(), attention_mask.tolist()):
                real = [t for t, keep in zip(ids, m) if keep]
                plen = max((n for n in o.prompt_lengths if tuple(real[:n]) in o.prompts), default=0)
                prompts.append(o.prompts.get(tuple(real[:plen]), ""))
                responses.append(o.tokenizer.decode(real[plen:], skip_special_tokens=True))
            scores = torch.tensor(o.fn(prompts, responses), dtype=torch.float32, device=input_ids.device)
            hidden = scores.view(-1, 1, 1).expand(-1, input_ids.shape[1], 1)

            class Out:
                hidden_states = (hidden,)
            return Out()

    def __init__(self, fn, tokenizer, prompts: dict[tuple, str]):
        super().__init__()
        self.fn, self.tokenizer, self.prompts = fn, tokenizer, prompts
        self.prompt_lengths = sorted({len(k) for k in prompts}, reverse=True)
        self.backbone = self._Backbone(self)
        self.score = torch.nn.Identity()
        self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # gives .to() and .device something


def eval_reward(engine, named_params, eval_prompt_ids, eval_texts, reward, response_length, temperature, seed):
    from kiln.llm import SamplingParams

    engine.update_weights(named_params)
    params = [SamplingParams(temperature=temperature, max_tokens=response_length, seed=seed + i, ignore_eos=True)
              for i in range(len(eval_prompt_ids))]
    outs = engine.generate([{"prompt_token_ids": p} for p in eval_prompt_ids], params)
    return statistics.mean(reward(eval_texts, [o.outputs[0].text for o in outs]))


# ----------------------------------------------------------------------------------------------- kiln side
def run_kiln(a, model_dir, device, train_texts, reward):
    from kiln.data.prompts import PromptDataset
    from kiln.rl import PPOConfig, PPOTrainer

    policy, value = load_models(model_dir, device, a.seed)
    cfg = PPOConfig(per_device_train_batch_size=a.batch_size, num_mini_batches=a.num_mini_batches,
                    num_ppo_epochs=a.num_ppo_epochs, response_length=a.response_length,
                    learning_rate=a.learning_rate, kl_coef=a.kl_coef, temperature=a.temperature, seed=a.seed,
                    total_episodes=a.iterations * a.batch_size, num_sample_generations=0,
                    local_rollout_forward_batch_size=a.batch_size, bf16=a.bf16)
    tr = PPOTrainer(cfg, model=policy, model_path=model_dir, reward_model=reward, value_model=value,
                    train_dataset=PromptDataset(train_texts), device=device)
    iter_s, tok_s, scores, kls = [], [], [], []
    for _ in range(cfg.num_total_batches):
        s = tr.step()
        iter_s.append(s["time/iteration_s"])
        tok_s.append(s["rollout/tokens_per_s"])
        scores.append(s["objective/scores"])
        kls.append(s["objective/kl"])
    return {"iteration_s": iter_s, "tokens_per_s": tok_s, "scores": scores, "kl": kls, "policy": tr.model.policy,
            "engine": tr.llm}


# ----------------------------------------------------------------------------------------------- TRL side
def run_trl(a, model_dir, device, train_texts, reward, freeze: bool):
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig as TRLConfig
    from trl.experimental.ppo import PPOTrainer as TRLTrainer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    policy, value = load_models(model_dir, device, a.seed)
    ref = copy.deepcopy(policy).eval()
    ids = [tok(t)["input_ids"] for t in train_texts]
    rm = TextRewardModel(reward, tok, {tuple(i): t for i, t in zip(ids, train_texts)})
    train = Dataset.from_dict({"input_ids": ids})
    out = tempfile.mkdtemp(prefix="trl_ppo_")
    cfg = TRLConfig(output_dir=out, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
                    num_mini_batches=a.num_mini_batches, num_ppo_epochs=a.num_ppo_epochs,
                    response_length=a.response_length, learning_rate=a.learning_rate, kl_coef=a.kl_coef,
                    temperature=a.temperature, seed=a.seed, total_episodes=a.iterations * a.batch_size,
                    num_sample_generations=0, local_rollout_forward_batch_size=a.batch_size, bf16=a.bf16,
                    gradient_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no",
                    use_cpu=device == "cpu", disable_tqdm=True, stop_token=None)
    stamps, scores, kls = [], [], []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "objective/scores" in logs:
                scores.append(logs["objective/scores"])
                kls.append(logs["objective/kl"])

    trainer = TRLTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         train_dataset=train, value_model=value, eval_dataset=train.select(range(a.batch_size)),
                         callbacks=[Timer()])
    gen_times = []
    orig_generate = policy.generate

    def timed_generate(*args, **kw):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = orig_generate(*args, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        gen_times.append(time.perf_counter() - t0)
        return r

    policy.generate = timed_generate
    if freeze:
        gc.collect()
        gc.freeze()
    try:
        trainer.train()
    finally:
        if freeze:
            gc.unfreeze()
    iter_s = [b - a_ for a_, b in zip(stamps, stamps[1:])]
    tokens = a.batch_size * a.response_length
    return {"iteration_s": iter_s, "tokens_per_s": [tokens / t for t in gen_times], "scores": scores, "kl": kls,
            "policy": policy}


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    from kiln.models import default_model_path
    from kiln.rl import WordListReward
    from kiln.rl.cli import DEMO_WORDS, demo_prompts

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-mini-batches", type=int, default=2)
    p.add_argument("--num-ppo-epochs", type=int, default=4)
    p.add_argument("--response-length", type=int, default=24)
    p.add_argument("--learning-rate", type=float, default=3e-5)
    p.add_argument("--kl-coef", type=float, default=0.02)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for training forwards on both sides")
    p.add_argument("--device", default=None)
    p.add_argument("--skip-trl", action="store_true", help="kiln only (e.g. where trl is not installed)")
    p.add_argument("--json", default=None, help="where to write the JSON (default: bench/ppo_vs_trl.json)")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = Path(a.model) if a.model else default_model_path()
    reward = WordListReward(DEMO_WORDS)
    texts = demo_prompts()
    train_texts, eval_texts = texts[32:], texts[:32]

    results = {"kiln": run_kiln(a, model_dir, device, train_texts, reward)}
    engine = results["kiln"]["engine"]
    eval_ids = [engine.tokenizer.encode(t) for t in eval_texts]
    has_trl = False
    if not a.skip_trl:
        try:
            import trl

            has_trl = True
            if trl.__version__ != "1.12.0":
                print(f"note: trl {trl.__version__} is not the pinned 1.12.0")
        except ImportError:
            print("trl is not installed: kiln side only (pip install trl==1.12.0 for the anchor)")
    if has_trl:
        results["trl"] = run_trl(a, model_dir, device, train_texts, reward, freeze=False)
        results["trl_gc_freeze"] = run_trl(a, model_dir, device, train_texts, reward, freeze=True)

    summary = {}
    for name, r in results.items():
        steady = r["iteration_s"][1:] or r["iteration_s"]
        final = eval_reward(engine, r["policy"].named_parameters(), eval_ids, eval_texts, reward,
                            a.response_length, a.temperature, seed=4242)
        summary[name] = {"s_per_iteration": statistics.median(steady),
                         "rollout_tokens_per_s": statistics.median(r["tokens_per_s"][1:] or r["tokens_per_s"]),
                         "train_scores": r["scores"], "train_kl": r["kl"], "final_eval_reward": final,
                         "iteration_s": r["iteration_s"]}
    k = summary["kiln"]
    table = Table(f"PPO iteration, {model_dir.name}, batch {a.batch_size} x {a.response_length} tokens, "
                  f"{a.num_ppo_epochs} epochs x {a.num_mini_batches} minibatches", anchor_name="TRL 1.12")
    for name, label in (("trl", "TRL as shipped"), ("trl_gc_freeze", "TRL + gc.freeze()")):
        t = summary.get(name)
        table.add(f"s / iteration vs {label}", k["s_per_iteration"], t and t["s_per_iteration"], "s",
                  higher_is_better=False)
        table.add(f"rollout tokens/s vs {label}", k["rollout_tokens_per_s"], t and t["rollout_tokens_per_s"],
                  "tok/s")
        table.add(f"final eval reward vs {label}", k["final_eval_reward"], t and t["final_eval_reward"], "reward")
        if t is None:
            break
    print(table.render())
    path = Path(a.json) if a.json else Path(__file__).with_suffix(".json")
    table.save(path)
    data = json.loads(path.read_text())
    data.update({"args": vars(a), "summary": summary, "device_name": device_name()})
    path.write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
