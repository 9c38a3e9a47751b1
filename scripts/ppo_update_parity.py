"""One PPO update, kiln vs TRL 1.12, on ONE identical rollout batch (issue 9's reward gap).

Both trainers start from the same policy / value / reference weights (``bench/ppo_vs_trl.py``'s setup: the bundled
model, a separate ``AutoModelForSequenceClassification`` critic with a zero ``score``, ``WordListReward``). TRL runs
first with its generation replaced by fixed responses (sampled once by kiln's engine) and its per-epoch
``np.random.permutation`` recorded; kiln then runs ``step()`` on the same prompts in TRL's order, with the same
responses and the same permutations. Printed: the max differences of old logprobs, ref logprobs, values, rewards,
advantages, returns (captured where each side computes them), per-optimizer-step losses and gradient norms, the
learning rate each step used, and the parameter deltas after the iteration.

    python scripts/ppo_update_parity.py [--batch-size 16 --response-length 24 --seed 0]

``--rollout-samples K`` (K > 0) first compares the part before the update, the rollouts, from the same initial
policy: TRL's own rollout code (``batch_generation`` with the generation config its ``train()`` builds, the policy's
``generation_config`` as its ``__init__`` leaves it, ``truncate_response``, ``sequence_lengths`` from the first pad,
``get_reward`` through the bench's reward-model wrapper) against kiln's ``PPOTrainer.generate`` + ``score``, K
samples of every training prompt each: how many responses end before ``response_length``, how many hold an EOS id
(``<|eos|>``, ``<|end|>``) before their last token, tokens trained per response, the mean score and the mean
per-token log-probability of the sampled tokens under the policy (mean +- s.e.). The two samplers draw different
random numbers, so only the distributions compare. ``--rollout-only`` stops after it.

    python scripts/ppo_update_parity.py --rollout-samples 8 --response-length 48 --rollout-only
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-mini-batches", type=int, default=2)
    p.add_argument("--response-length", type=int, default=24)
    p.add_argument("--iterations", type=int, default=1, help="total_episodes / batch_size on both sides (LR schedule)")
    p.add_argument("--learning-rate", type=float, default=3e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rollout-samples", type=int, default=0, help="K > 0: the rollout comparison, K per prompt")
    p.add_argument("--rollout-only", action="store_true", help="stop after the rollout comparison")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda: both trainers run there (the GPU runs' numerics)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.rollout_samples > 0:
        rollout_check(a)
        if a.rollout_only:
            return 0

    from datasets import Dataset
    from transformers import AutoTokenizer
    import trl.experimental.ppo.ppo_trainer as trl_mod
    from trl.experimental.ppo import PPOConfig as TRLConfig, PPOTrainer as TRLTrainer

    from bench.ppo_vs_trl import TextRewardModel, load_models
    from kiln.data.prompts import PromptDataset
    from kiln.models import default_model_path
    from kiln.rl import PPOConfig, PPOTrainer, WordListReward
    from kiln.rl import ppo as kiln_ppo
    from kiln.rl.cli import DEMO_WORDS, demo_prompts

    model_dir = default_model_path()
    reward = WordListReward(DEMO_WORDS)
    texts = demo_prompts()[32:32 + a.batch_size * a.iterations]
    B, T = a.batch_size, a.response_length

    # ---- kiln: the trainer (also samples the fixed responses with its engine)
    dev = a.device
    policy0, value0 = load_models(model_dir, dev, a.seed)
    init_policy, init_value = copy.deepcopy(policy0.state_dict()), copy.deepcopy(value0.state_dict())
    kcfg = PPOConfig(per_device_train_batch_size=B, num_mini_batches=a.num_mini_batches, num_ppo_epochs=4,
                     response_length=T, learning_rate=a.learning_rate, kl_coef=0.02, temperature=1.0, seed=a.seed,
                     total_episodes=a.iterations * B, num_sample_generations=0, local_rollout_forward_batch_size=B,
                     lr_scheduler_type="linear", adam_epsilon=1e-8, weight_decay=0.0)
    kt = PPOTrainer(kcfg, model=policy0, model_path=model_dir, reward_model=reward, value_model=value0,
                    train_dataset=PromptDataset(texts), device=dev)
    kt.sync_weights()
    sampled = kt.generate(texts, seed=12345)  # one fixed response per prompt, reused whenever it is drawn
    resp_of = {tuple(pid): list(r) for pid, r in zip(sampled.prompt_ids, sampled.response_ids)}
    special = sum(t in (0, 1, 2, 3) for r in sampled.response_ids for t in r)
    print(f"fixed rollout: {B} responses x {T} tokens, special tokens (bos/eos/pad) in responses: {special}")

    # ---- TRL, generation replaced by the fixed responses
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tpol, tval = load_models(model_dir, dev, a.seed)
    tpol.load_state_dict(init_policy)
    tval.load_state_dict(init_value)
    ref = copy.deepcopy(tpol).eval()
    ids = [tok(t)["input_ids"] for t in texts]
    rm = TextRewardModel(reward, tok, {tuple(i): t for i, t in zip(ids, texts)})
    order, perms, trl_cap = [], [], {}

    def fake_batch_generation(model, queries, bs, pad_token_id, gen_cfg):
        rows = []
        for q in queries.tolist():
            real = [t for t in q if t != pad_token_id]
            order.append(real)
            rows.append(q + resp_of[tuple(real)])
        qr = torch.tensor(rows, device=queries.device)
        out = trl_mod.forward(model, qr, pad_token_id)
        ctx = queries.shape[1]
        return qr, out.logits[:, ctx - 1:-1] / (1.0 + 1e-7)

    orig_whiten, orig_perm = trl_mod.masked_whiten, np.random.permutation

    def rec_whiten(values, mask, shift_mean=True):
        trl_cap.setdefault("advantages_raw", values.clone())
        return orig_whiten(values, mask, shift_mean)

    def rec_perm(n):
        out = orig_perm(n)
        perms.append(out.copy())
        return out

    trl_mod.batch_generation = fake_batch_generation
    trl_mod.masked_whiten = rec_whiten
    np.random.permutation = rec_perm
    tcfg = TRLConfig(output_dir=tempfile.mkdtemp(prefix="trl_parity_"), per_device_train_batch_size=B,
                     gradient_accumulation_steps=1, num_mini_batches=a.num_mini_batches, num_ppo_epochs=4,
                     response_length=T, learning_rate=a.learning_rate, kl_coef=0.02, temperature=1.0, seed=a.seed,
                     total_episodes=a.iterations * B, num_sample_generations=0, local_rollout_forward_batch_size=B,
                     gradient_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no",
                     use_cpu=dev == "cpu", disable_tqdm=True, stop_token=None)
    from transformers import TrainerCallback
    trl_logs = []

    class _Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "objective/scores" in logs:
                trl_logs.append(dict(logs))
    tt = TRLTrainer(callbacks=[_Logs()], args=tcfg, processing_class=tok, model=tpol, ref_model=ref, reward_model=rm,
                    train_dataset=Dataset.from_dict({"input_ids": ids}), value_model=tval,
                    eval_dataset=Dataset.from_dict({"input_ids": ids[:2]}))
    trl_steps = []

    def hook_optimizer(opt, params_named, log):
        orig_step = opt.step

        def step(*args, **kw):
            g = {n: p.grad.detach().clone() for n, p in params_named if p.grad is not None}
            log.append({"lr": opt.param_groups[0]["lr"], "grads": g})
            return orig_step(*args, **kw)
        opt.step = step

    named_trl = [("policy." + n, p) for n, p in tpol.named_parameters()] + \
                [("value." + n, p) for n, p in tval.named_parameters()]
    hook_optimizer(tt.optimizer, named_trl, trl_steps)
    trl_n_params = sum(p.numel() for g in tt.optimizer.param_groups for p in g["params"])
    try:
        tt.train()
    finally:
        np.random.permutation = orig_perm
        trl_mod.masked_whiten = orig_whiten
    trl_steps = [s for s in trl_steps if s.get("grads")]  # accelerate may wrap; keep real steps
    print(f"TRL: {len(trl_steps)} optimizer steps, prompts order taken, {len(perms)} permutations recorded, "
          f"optimizer holds {trl_n_params} params")

    # ---- kiln step() on the same prompts (TRL's order), same responses, same permutations
    text_of = {tuple(i): t for i, t in zip(ids, texts)}
    fixed = {}

    def fixed_generate(batch, seed=None, temperature=None):
        return fixed["ro"]
    kt.generate = fixed_generate
    kit = iter(perms)

    class _Rng:
        def permutation(self, n):
            return next(kit)
    kt._np_rng = _Rng()
    kcap = {}
    orig_adv = kiln_ppo.compute_advantages

    def rec_adv(rewards, values, mask, gamma, lam, whiten=True):
        adv, ret = orig_adv(rewards, values, mask, gamma, lam, whiten)
        kcap.setdefault("advantages_raw", (ret - values.masked_fill(~mask.bool(), 0.0)).clone())
        return adv, ret
    kiln_ppo.compute_advantages = rec_adv
    kiln_steps = []
    named_kiln = [("policy." + n, p) for n, p in kt.model.policy.named_parameters()] + \
                 [("value." + n, p) for n, p in kt.model.value_model.model.named_parameters()]
    hook_optimizer(kt.optimizer, named_kiln, kiln_steps)
    kiln_n_params = sum(p.numel() for g in kt.optimizer.param_groups for p in g["params"])
    kiln_stats = []
    try:
        for it in range(a.iterations):
            rows = order[it * B:(it + 1) * B]
            batch = [text_of[tuple(r)] for r in rows]
            resps = [resp_of[tuple(r)] for r in rows]
            fixed["ro"] = kt._pack(batch, [list(r) for r in rows], resps, kt._decode(resps), ["length"] * B)
            kiln_stats.append(kt.step(batch))
    finally:
        kiln_ppo.compute_advantages = orig_adv
    print(f"kiln: {len(kiln_steps)} optimizer steps, optimizer holds {kiln_n_params} params")

    # ---- compare
    print(f"\nlearning rate per step  TRL: {[s['lr'] for s in trl_steps]}\n"
          f"                        kiln: {[s['lr'] for s in kiln_steps]}")
    for i, (ts, ks) in enumerate(zip(trl_steps, kiln_steps)):
        worst, worst_rel = 0.0, 0.0
        for n, g in ts["grads"].items():
            kg = ks["grads"].get(n)
            if kg is None:
                continue
            d = (g - kg).abs().max().item()
            worst = max(worst, d)
            worst_rel = max(worst_rel, d / max(g.abs().max().item(), 1e-12))
        only_t = set(ts["grads"]) - set(ks["grads"])
        only_k = set(ks["grads"]) - set(ts["grads"])
        gn_t = torch.sqrt(sum(g.double().square().sum() for g in ts["grads"].values())).item()
        gn_k = torch.sqrt(sum(g.double().square().sum() for g in ks["grads"].values())).item()
        print(f"step {i}: grad norm TRL {gn_t:.6e} kiln {gn_k:.6e}; max |dgrad| {worst:.3e} (rel {worst_rel:.2e}); "
              f"grads only in TRL {len(only_t)}, only in kiln {len(only_k)}")
    d = (trl_cap["advantages_raw"] - kcap["advantages_raw"]).abs().max().item()
    print(f"iteration 1 GAE advantages before whitening (rewards, values, KL and score folded in): max |TRL - kiln| "
          f"{d:.3e} (max |A| {trl_cap['advantages_raw'].abs().max().item():.3e})")
    keys = ("objective/scores", "objective/kl", "objective/entropy", "policy/approxkl_avg", "policy/clipfrac_avg",
            "loss/policy_avg", "loss/value_avg", "policy/entropy_avg", "lr")
    for it, (tl, kl_) in enumerate(zip(trl_logs, kiln_stats)):
        print(f"iteration {it + 1}: " + ", ".join(f"{k.split('/')[-1]} {float(tl[k]):.5g}/{kl_[k]:.5g}" for k in keys)
              + "  (TRL/kiln)")
    worst = {}
    for (n, pt), (_, pk) in zip(named_trl, named_kiln):
        init = (init_policy if n.startswith("policy.") else init_value)[n.split(".", 1)[1]]
        dt, dk = (pt.detach() - init), (pk.detach() - init)
        worst[n] = ((dt - dk).abs().max().item(), dt.abs().max().item(), dk.abs().max().item())
    top = sorted(worst.items(), key=lambda kv: -kv[1][0])[:5]
    print("\nparameter deltas after the run: max |delta_TRL - delta_kiln| (max |delta_TRL|, max |delta_kiln|)")
    for n, (d, t_, k_) in top:
        print(f"  {n}: {d:.3e} ({t_:.3e}, {k_:.3e})")
    tot_t = torch.sqrt(sum(((pt.detach() - (init_policy if n.startswith('policy.') else init_value)[n.split('.', 1)[1]])
                            .double().square().sum()) for n, pt in named_trl)).item()
    tot_k = torch.sqrt(sum(((pk.detach() - (init_policy if n.startswith('policy.') else init_value)[n.split('.', 1)[1]])
                            .double().square().sum()) for n, pk in named_kiln)).item()
    print(f"||delta|| TRL {tot_t:.6e}  kiln {tot_k:.6e}")
    return 0


def _mean_se(xs: list[float]) -> str:
    t = torch.tensor(xs, dtype=torch.float64)
    se = (t.std() / len(xs) ** 0.5).item() if len(xs) > 1 else float("nan")
    return f"{t.mean().item():.4f} +- {se:.4f}"


def rollout_check(a) -> None:
    """TRL's rollout + post-processing code vs kiln's generate + score, from the same initial policy (see the
    module docstring)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, GenerationConfig
    import trl.experimental.ppo.ppo_trainer as trl_mod
    from trl.experimental.ppo import PPOConfig as TRLConfig, PPOTrainer as TRLTrainer
    from trl.experimental.utils import first_true_indices, get_reward
    from trl.trainer.utils import selective_log_softmax

    from bench.ppo_vs_trl import TextRewardModel, load_models
    from kiln.data.prompts import PromptDataset
    from kiln.models import default_model_path
    from kiln.rl import PPOConfig, PPOTrainer, WordListReward
    from kiln.rl.cli import DEMO_WORDS, demo_prompts

    model_dir = default_model_path()
    reward = WordListReward(DEMO_WORDS)
    texts = demo_prompts()[32:]
    K, T, n = a.rollout_samples, a.response_length, len(demo_prompts()[32:])
    eos_ids = (1, 3)

    # ---- TRL: the trainer's __init__ (it sets the policy's generation_config.eos_token_id to the stop token), then
    # the rollout part of its train(), lines 620-627 and 690-736 of trl 1.12.0's ppo_trainer.py
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    pad = tok.pad_token_id
    tpol, tval = load_models(model_dir, "cpu", a.seed)
    ids = [tok(t)["input_ids"] for t in texts]
    rm = TextRewardModel(reward, tok, {tuple(i): t for i, t in zip(ids, texts)})
    tcfg = TRLConfig(output_dir=tempfile.mkdtemp(prefix="trl_rollout_"), per_device_train_batch_size=n,
                     response_length=T, temperature=1.0, seed=a.seed, total_episodes=n, num_sample_generations=0,
                     local_rollout_forward_batch_size=n, gradient_checkpointing=False, report_to=[],
                     save_strategy="no", use_cpu=True, disable_tqdm=True, stop_token=None)
    tt = TRLTrainer(args=tcfg, processing_class=tok, model=tpol, ref_model=copy.deepcopy(tpol).eval(),
                    reward_model=rm, train_dataset=Dataset.from_dict({"input_ids": ids}), value_model=tval)
    gen_cfg = GenerationConfig(max_new_tokens=T, temperature=tcfg.temperature + 1e-7, top_k=0.0, top_p=1.0,
                               do_sample=True)
    collate = tt.data_collator
    trl_rows = {"len": [], "eos_inside": [], "trained": [], "score": [], "logprob": []}
    torch.manual_seed(a.seed)
    with torch.no_grad():
        for _ in range(K):
            queries = collate([{"input_ids": i} for i in ids])["input_ids"]
            ctx = queries.shape[1]
            qr, logitss = trl_mod.batch_generation(tt.model.policy, queries, n, pad, gen_cfg)
            resp = qr[:, ctx:]
            logprob = selective_log_softmax(logitss, resp)
            post = resp if tt.stop_token_id is None else trl_mod.truncate_response(tt.stop_token_id, pad, resp)
            seq_len = first_true_indices(post == pad) - 1
            _, score, _ = get_reward(rm, torch.cat((queries, post), 1), pad, ctx)
            for r, sl, sc, lp in zip(post.tolist(), seq_len.tolist(), score.tolist(), logprob):
                real = r[:sl + 1]
                trl_rows["len"].append(len(real))
                trl_rows["eos_inside"].append(float(any(t in eos_ids for t in real[:-1])))
                trl_rows["trained"].append(sl + 1)
                trl_rows["score"].append(sc)
                trl_rows["logprob"].append(lp[:sl + 1].mean().item())

    # ---- kiln: generate + score, the same prompts, K seeded samples each
    kpol, kval = load_models(model_dir, "cpu", a.seed)
    kcfg = PPOConfig(per_device_train_batch_size=n, response_length=T, temperature=1.0, seed=a.seed,
                     total_episodes=n, num_sample_generations=0, local_rollout_forward_batch_size=n)
    kt = PPOTrainer(kcfg, model=kpol, model_path=model_dir, reward_model=reward, value_model=kval,
                    train_dataset=PromptDataset(texts), device="cpu")
    kt.sync_weights()
    kiln_rows = {k: [] for k in trl_rows}
    with torch.no_grad():
        for k in range(K):
            ro = kt.generate(texts, seed=1_000 + k * n)
            scores = kt.score(ro)
            lp = kt._score_rollout(ro)["logprobs"]
            for i, r in enumerate(ro.response_ids):
                kiln_rows["len"].append(len(r))
                kiln_rows["eos_inside"].append(float(any(t in eos_ids for t in r[:-1])))
                kiln_rows["trained"].append(int(ro.mask[i].sum()))
                kiln_rows["score"].append(scores[i].item())
                kiln_rows["logprob"].append(lp[i][ro.mask[i]].mean().item())

    print(f"rollouts from the initial policy: {n} prompts x {K} samples x up to {T} tokens (mean +- s.e.)")
    print(f"{'':34s}{'TRL 1.12':>22s}{'kiln':>22s}")
    for name, key, f in [("responses shorter than the limit", "len", lambda v: float(v < T)),
                         ("responses with an EOS id inside", "eos_inside", float),
                         ("tokens trained per response", "trained", float),
                         ("score (WordListReward)", "score", float),
                         ("log-prob per sampled token", "logprob", float)]:
        t_, k_ = _mean_se([f(v) for v in trl_rows[key]]), _mean_se([f(v) for v in kiln_rows[key]])
        print(f"{name:34s}{t_:>22s}{k_:>22s}")
    print()


if __name__ == "__main__":
    sys.exit(main())
