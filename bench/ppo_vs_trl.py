"""PPO: kiln.rl (kiln.llm rollouts) vs TRL's PPOTrainer (trl==1.12.0, ``trl.experimental.ppo``).

Both sides get the same model (policy, frozen reference, a separate value model: the checkpoint loaded as a
``AutoModelForSequenceClassification`` with a zero ``score`` head), the same rule-based reward (``WordListReward``;
on TRL's side wrapped as a module whose backbone returns the score as its hidden state and whose ``score`` head is
the identity, TRL's reward-model layout), the same prompts and the same hyper-parameters (fixed-length responses:
with no stop token both sample ``response_length`` tokens through EOS; fp32 unless --bf16 (then bf16 autocast on both
sides, see below), no gradient checkpointing on either side, AdamW (fused, eps 1e-8, no weight decay) with TRL's
default linear learning-rate decay to 0 over the run on both sides). kiln's rollout engine computes in the training
dtype (fp32, or bf16 under --bf16), so it samples the policy being trained, as TRL's ``generate`` on the policy
itself does.

--bf16 on TRL's side: TRL's PPOTrainer builds its own ``Accelerator`` without a precision, which reads
``ACCELERATE_MIXED_PRECISION`` only (with transformers 5, ``bf16=True`` in the config alone leaves TRL in plain fp32),
so the bench sets that variable while it builds TRL's trainer, as ``accelerate launch --mixed_precision bf16`` would.
accelerate then autocasts only the top-level module's forward, TRL's training forward: TRL's rollouts (``generate``
on the policy itself), reference and value forwards stay fp32, where kiln's (rollout_dtype "auto") run in bf16.

TRL runs twice: as shipped, and with ``gc.freeze()`` before training (TRL calls ``gc.collect()`` twice per
iteration, which walks every live object unless frozen).

Measured: wall time per PPO iteration (median over the iterations after the first) and kiln's phase breakdown
(weight sync, rollout, scoring, PPO updates), rollout tokens/s (the sampling step alone), the mean training reward
per iteration, and the final policy's mean reward on held-out prompts (every policy sampled by one fp32 kiln engine
with the same seeds). Run ``python bench/ppo_vs_trl.py --help``; it prints the tables and writes JSON next to this
file.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
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


def eval_reward(engine, named_params, eval_prompt_ids, eval_texts, reward, response_length, temperature, seed,
                samples: int = 1):
    """Mean reward of ``samples`` responses per held-out prompt (fixed seeds: every policy sees the same noise)."""
    from kiln.llm import SamplingParams

    engine.update_weights(named_params)
    n = len(eval_prompt_ids)
    params = [SamplingParams(temperature=temperature, max_tokens=response_length, seed=seed + i, ignore_eos=True)
              for i in range(n * samples)]
    outs = engine.generate([{"prompt_token_ids": eval_prompt_ids[i % n]} for i in range(n * samples)], params)
    return statistics.mean(reward([eval_texts[i % n] for i in range(n * samples)], [o.outputs[0].text for o in outs]))


# ----------------------------------------------------------------------------------------------- kiln side
def run_kiln(a, model_dir, device, train_texts, reward):
    from kiln.data.prompts import PromptDataset
    from kiln.rl import PPOConfig, PPOTrainer

    policy, value = load_models(model_dir, device, a.seed)
    cfg = PPOConfig(per_device_train_batch_size=a.batch_size, num_mini_batches=a.num_mini_batches,
                    num_ppo_epochs=a.num_ppo_epochs, response_length=a.response_length,
                    learning_rate=a.learning_rate, kl_coef=a.kl_coef, temperature=a.temperature, seed=a.seed,
                    total_episodes=a.iterations * a.batch_size, num_sample_generations=0,
                    local_rollout_forward_batch_size=a.batch_size, bf16=a.bf16, lr_scheduler_type="linear",
                    adam_epsilon=1e-8, weight_decay=0.0, rollout_dtype=a.kiln_rollout_dtype,
                    torch_compile=a.kiln_compile, cuda_graphs=not a.kiln_eager)
    tr = PPOTrainer(cfg, model=policy, model_path=model_dir, reward_model=reward, value_model=value,
                    train_dataset=PromptDataset(train_texts), device=device)
    if a.kiln_rollouts == "hf":
        tr.generate = hf_rollouts(tr)
    iter_s, tok_s, scores, kls, phases = [], [], [], [], {k: [] for k in PHASES}
    for _ in range(cfg.num_total_batches):
        s = tr.step()
        iter_s.append(s["time/iteration_s"])
        tok_s.append(s["rollout/tokens_per_s"])
        scores.append(s["objective/scores"])
        kls.append(s["objective/kl"])
        for k in PHASES:
            phases[k].append(s[f"time/{k}_s"])
    return {"iteration_s": iter_s, "tokens_per_s": tok_s, "scores": scores, "kl": kls, "policy": tr.model.policy,
            "phases": phases, "rollout_dtype": str(tr.llm.engine.dtype).replace("torch.", ""),
            "engine_vs_policy": engine_policy_gap(tr, train_texts[:a.batch_size]),
            "train_step": ("torch.compile" if a.kiln_compile else "eager" if tr._graphs is None
                           else f"eager (graph capture failed: {tr._graphs.failure})" if tr._graphs.failure
                           else f"CUDA graphs ({tr._graphs.captures} captured in {tr._graphs.capture_s:.2f} s)")}


def hf_rollouts(tr):
    """A diagnostic: kiln's trainer with TRL's rollouts (the policy's own Hugging Face ``generate``: left-padded
    batch, global RNG, sampling at the trainer's temperature; as TRL 1.12 does, the policy's
    ``generation_config.eos_token_id`` is the stop token for the call, so with no stop token every response runs
    ``response_length`` tokens through EOS, and with one it ends at that id), so that a reward gap between kiln and
    TRL can be pinned on the rollout engine or on the update."""

    @torch.no_grad()
    def generate(batch, temperature=None, seed=None):
        texts, ids = zip(*[tr._encode(item, f"prompt {i}") for i, item in enumerate(batch)])
        pad = tr.tokenizer.pad_token_id if getattr(tr.tokenizer, "pad_token_id", None) is not None else 0
        ctx = max(map(len, ids))
        q = torch.tensor([[pad] * (ctx - len(p)) + list(p) for p in ids], device=tr.device)
        mask = torch.tensor([[0] * (ctx - len(p)) + [1] * len(p) for p in ids], device=tr.device)
        policy = tr.model.policy
        was_training = policy.training
        policy.eval()
        stop = tr.stop_token_id
        saved_eos = policy.generation_config.eos_token_id
        policy.generation_config.eos_token_id = stop  # TRL's PPOTrainer.__init__ does this (None: no stop at all)
        try:
            out = policy.generate(input_ids=q.masked_fill(mask == 0, 0), attention_mask=mask, do_sample=True,
                                  temperature=temperature or tr.args.temperature, top_k=0, top_p=1.0,
                                  max_new_tokens=tr.args.response_length, pad_token_id=pad)
        finally:
            policy.generation_config.eos_token_id = saved_eos
            policy.train(was_training)
        responses = []
        for row in out[:, ctx:].tolist():  # TRL's truncate_response: cut after the first stop token
            end = next((i + 1 for i, t in enumerate(row) if t == stop), len(row)) if stop is not None else len(row)
            responses.append(row[:end])
        return tr._pack(list(texts), [list(p) for p in ids], responses, tr._decode(responses),
                        ["stop" if stop is not None and r and r[-1] == stop else "length" for r in responses])

    return generate


@torch.no_grad()
def engine_policy_gap(tr, prompts) -> dict:
    """Is the rollout engine on-policy? Sample with the synced engine (which reports each sampled token's
    log-prob), recompute the same tokens' log-probs in the fp32 training policy, and compare: the mean difference
    estimates KL(engine || policy) per token (0 for an engine that samples exactly the trained policy)."""
    from kiln.llm import SamplingParams

    tr.sync_weights()
    ids = [tr.tokenizer.encode(t) for t in prompts]
    params = [SamplingParams(temperature=1.0, max_tokens=tr.args.response_length, seed=777 + i, ignore_eos=True,
                             logprobs=0) for i in range(len(ids))]
    outs = tr.llm.generate([{"prompt_token_ids": p} for p in ids], params)
    resp = [list(o.outputs[0].token_ids) for o in outs]
    eng = torch.tensor([[o.outputs[0].logprobs[j][t].logprob for j, t in enumerate(r)] for o, r in zip(outs, resp)])
    ro = tr._pack(list(prompts), ids, resp, [""] * len(ids), [""] * len(ids))
    ctx = ro.context_length
    logits = tr.model.policy(input_ids=ro.query_responses, attention_mask=ro.attention_mask,
                             position_ids=ro.position_ids, use_cache=False).logits[:, ctx - 1:-1].float()
    pol = torch.log_softmax(logits, -1).gather(-1, ro.responses.unsqueeze(-1)).squeeze(-1).cpu()
    diff = (eng - pol)[ro.mask.cpu()]
    return {"kl_engine_policy_per_token": diff.mean().item(), "mean_abs_logprob_diff": diff.abs().mean().item(),
            "max_abs_logprob_diff": diff.abs().max().item()}


PHASES = ("sync", "rollout", "score", "train")


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

    # TRL's own Accelerator() takes its precision from the environment only (see the module docstring)
    saved_mp = os.environ.get("ACCELERATE_MIXED_PRECISION")
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if a.bf16 else "no"
    try:
        trainer = TRLTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                             train_dataset=train, value_model=value, eval_dataset=train.select(range(a.batch_size)),
                             callbacks=[Timer()])
    finally:
        if saved_mp is None:
            os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = saved_mp
    if trainer.accelerator.mixed_precision != ("bf16" if a.bf16 else "no"):
        raise RuntimeError(f"TRL's accelerator runs in {trainer.accelerator.mixed_precision!r}, not the bench's "
                           f"precision ({'bf16' if a.bf16 else 'fp32'})")
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
    p.add_argument("--trl-runs", default="shipped,gc_freeze",
                   help="which TRL runs: shipped, gc_freeze or both (comma-separated); learning checks need one")
    p.add_argument("--eval-samples", type=int, default=4, help="responses per held-out prompt for the final reward")
    p.add_argument("--kiln-rollout-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="kiln's rollout engine dtype (auto: the training dtype)")
    p.add_argument("--kiln-rollouts", default="engine", choices=["engine", "hf"],
                   help="hf: a diagnostic run of kiln's trainer with TRL-style rollouts (the policy's HF generate)")
    p.add_argument("--kiln-compile", action="store_true",
                   help="kiln's PPOConfig.torch_compile (the training forward compiled; its first iterations pay "
                        "the compile, which the median over iterations leaves out and the mean keeps)")
    p.add_argument("--kiln-eager", action="store_true",
                   help="kiln's training steps eager (PPOConfig.cuda_graphs=False), not replayed from CUDA graphs")
    p.add_argument("--json", default=None, help="where to write the JSON (default: bench/ppo_vs_trl.json)")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = Path(a.model) if a.model else default_model_path()
    reward = WordListReward(DEMO_WORDS)
    texts = demo_prompts()
    train_texts, eval_texts = texts[32:], texts[:32]

    from kiln.llm import LLM
    from kiln.llm.tokenizer import Tokenizer

    results = {"kiln": run_kiln(a, model_dir, device, train_texts, reward)}
    # one fp32 engine samples every final policy (the fp32 weights themselves, whatever the training dtype)
    n_eval = len(eval_texts) * a.eval_samples
    eval_ids = [Tokenizer(model_dir).encode(t) for t in eval_texts]
    per_seq = -(-(max(map(len, eval_ids)) + a.response_length) // 16)
    engine = LLM(model_dir, dtype="float32", device=device, max_num_seqs=n_eval, block_size=16,
                 num_kv_blocks=n_eval * per_seq + 1)
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
        runs = {r.strip() for r in a.trl_runs.split(",") if r.strip()}
        if runs - {"shipped", "gc_freeze"}:
            p.error(f"--trl-runs takes shipped and/or gc_freeze, got {a.trl_runs!r}")
        if "shipped" in runs:
            results["trl"] = run_trl(a, model_dir, device, train_texts, reward, freeze=False)
        if "gc_freeze" in runs:
            results["trl_gc_freeze"] = run_trl(a, model_dir, device, train_texts, reward, freeze=True)

    def final_reward(name):
        return eval_reward(engine, results[name]["policy"].named_parameters(), eval_ids, eval_texts, reward,
                           a.response_length, a.temperature, seed=4242, samples=a.eval_samples)

    finals = {name: final_reward(name) for name in results}
    # the same policies again in reverse order: the shared engine must score a policy the same whichever policy
    # it held before (a stale weight or cached state would favour or penalise the one evaluated first)
    finals_reversed = {name: final_reward(name) for name in reversed(list(results))}
    summary = {}
    for name, r in results.items():
        steady = r["iteration_s"][1:] or r["iteration_s"]
        final = finals[name]
        summary[name] = {"s_per_iteration": statistics.median(steady),
                         "rollout_tokens_per_s": statistics.median(r["tokens_per_s"][1:] or r["tokens_per_s"]),
                         "train_scores": r["scores"], "train_kl": r["kl"], "final_eval_reward": final,
                         "final_eval_reward_reverse_order": finals_reversed[name],
                         "iteration_s": r["iteration_s"]}
    k = summary["kiln"]
    kp = results["kiln"]["phases"]
    k["phases_s"] = {ph: statistics.median(kp[ph][1:] or kp[ph]) for ph in PHASES}
    k["rollout_dtype"] = results["kiln"]["rollout_dtype"]
    k["engine_vs_policy"] = results["kiln"]["engine_vs_policy"]
    k["train_step"] = results["kiln"]["train_step"]
    table = Table(f"PPO iteration, {model_dir.name}, batch {a.batch_size} x {a.response_length} tokens, "
                  f"{a.num_ppo_epochs} epochs x {a.num_mini_batches} minibatches"
                  f"{', bf16 autocast' if a.bf16 else ', fp32'}", anchor_name="TRL 1.12")
    trl_names = [n for n in ("trl", "trl_gc_freeze") if n in summary] or [None]
    for name in trl_names:
        label = {"trl": "TRL as shipped", "trl_gc_freeze": "TRL + gc.freeze()", None: "-"}[name]
        t = summary.get(name) if name else None
        table.add(f"s / iteration vs {label}", k["s_per_iteration"], t and t["s_per_iteration"], "s",
                  higher_is_better=False)
        table.add(f"rollout tokens/s vs {label}", k["rollout_tokens_per_s"], t and t["rollout_tokens_per_s"],
                  "tok/s")
        table.add(f"final eval reward vs {label}", k["final_eval_reward"], t and t["final_eval_reward"], "reward")
    print(table.render())
    ph = k["phases_s"]
    other = k["s_per_iteration"] - sum(ph.values())
    print(f"kiln phases (median s/iteration; rollout engine {k['rollout_dtype']}; training {k['train_step']}): "
          + ", ".join(f"{n} {v:.4f}" for n, v in ph.items()) + f", other {max(other, 0.0):.4f}")
    for name, r in summary.items():  # the median leaves the first iteration out; the mean of all keeps it
        print(f"{name}: mean s/iteration over all {len(r['iteration_s'])} iterations "
              f"{statistics.mean(r['iteration_s']):.4f} (first {r['iteration_s'][0]:.3f})")
    gap = k["engine_vs_policy"]
    print(f"kiln rollout engine vs fp32 policy after training: KL(engine || policy) ~ "
          f"{gap['kl_engine_policy_per_token']:.2e} nats/token, mean |d logprob| {gap['mean_abs_logprob_diff']:.2e}, "
          f"max {gap['max_abs_logprob_diff']:.2e}")
    for name, r in summary.items():
        print(f"train scores {name:>14}: " + " ".join(f"{x:.3f}" for x in r["train_scores"])
              + f" | final eval {r['final_eval_reward']:.4f} (reverse order {r['final_eval_reward_reverse_order']:.4f})")
    path = Path(a.json) if a.json else Path(__file__).with_suffix(".json")
    table.save(path)
    data = json.loads(path.read_text())
    data.update({"args": vars(a), "summary": summary, "device_name": device_name()})
    path.write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
