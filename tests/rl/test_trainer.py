"""PPOTrainer end to end on tiny checkpoints: KL at the start, weights moving, engine sync, LoRA, bad input, saving."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kiln.data.prompts import JsonlPromptStream, PromptDataset
from kiln.rl import PPOConfig, PPOTrainer, WordListReward

from .conftest import PROMPTS, e_share, make_policy_checkpoint

transformers = pytest.importorskip("transformers")


def small_config(**kw) -> PPOConfig:
    base = dict(response_length=6, per_device_train_batch_size=4, num_mini_batches=2, num_ppo_epochs=1,
                learning_rate=1e-3, temperature=1.0, total_episodes=8, num_sample_generations=0, seed=0)
    base.update(kw)
    return PPOConfig(**base)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


def test_kl_is_zero_when_policy_equals_reference(tiny_policy):
    tr = PPOTrainer(small_config(), model=str(tiny_policy), reward_model=e_share,
                    train_dataset=PromptDataset(PROMPTS))
    ro = tr.generate(PROMPTS[:4])
    fwd = tr._score_rollout(ro)
    assert torch.equal(fwd["logprobs"][ro.mask], fwd["ref_logprobs"][ro.mask])
    stats = tr.step()  # the first iteration samples from the unchanged policy
    assert stats["objective/kl"] == 0.0
    assert stats["objective/non_score_reward"] == 0.0
    assert stats["objective/rlhf_reward"] == pytest.approx(stats["objective/scores"])
    assert torch.all(fwd["values"][ro.mask] == 0)  # zero-initialised value head


def test_one_step_changes_policy_and_value_head_and_resyncs_the_engine(tiny_policy):
    tr = PPOTrainer(small_config(), model=str(tiny_policy), reward_model=e_share,
                    train_dataset=PromptDataset(PROMPTS))
    pol, val, ref = snapshot(tr.model.policy), snapshot(tr.model.value_head), snapshot(tr.ref_model)
    stats = tr.step()
    assert len(changed(pol, tr.model.policy)) == len(pol)  # every policy tensor moved
    assert changed(val, tr.model.value_head) == ["summary.weight", "summary.bias"]
    assert changed(ref, tr.ref_model) == []
    for name in ("objective/kl", "objective/entropy", "objective/scores", "policy/clipfrac_avg",
                 "policy/approxkl_avg", "val/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio"):
        assert math.isfinite(stats[name]), name
    # the phase breakdown covers the iteration
    phases = [stats[f"time/{k}_s"] for k in ("sync", "rollout", "score", "train")]
    assert all(t >= 0 for t in phases) and sum(phases) <= stats["time/iteration_s"]
    # rollouts sample the trained distribution: the engine computes in the training dtype (fp32 here)
    assert tr.llm.engine.dtype == torch.float32
    # the cached copy plan (a direct copy into the engine's tensors, fused q/k/v and gate/up shards included)
    # keeps syncing: a changed policy weight reaches the engine
    assert tr._sync_plan
    with torch.no_grad():
        tr.model.policy.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    # the engine receives the updated weights in memory: its logits match the trained HF policy's
    tr.sync_weights()
    ids = tr.tokenizer.encode(PROMPTS[0])
    engine_logits = tr.llm.prompt_logits([ids])[0]
    with torch.no_grad():
        hf_logits = tr.model.policy(torch.tensor([ids], device=tr.device)).logits[0]
    assert torch.allclose(engine_logits.float(), hf_logits, atol=1e-4, rtol=1e-4)


def test_torch_compile_compiles_the_training_module_once(tiny_policy):
    with pytest.raises(ValueError, match="torch_compile"):
        PPOConfig(torch_compile="yes")
    tr = PPOTrainer(small_config(torch_compile=True), model=str(tiny_policy), reward_model=e_share,
                    train_dataset=PromptDataset(PROMPTS))
    compiled = tr._train_module()  # torch.compile is lazy: nothing compiles until the first call
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled is tr._train_module()
    assert compiled._orig_mod is tr.model
    assert not isinstance(PPOTrainer(small_config(), model=str(tiny_policy), reward_model=e_share,
                                     train_dataset=PromptDataset(PROMPTS))._train_module(),
                          torch._dynamo.eval_frame.OptimizedModule)


@pytest.mark.gpu
def test_compiled_training_step_matches_the_eager_one(tiny_policy):
    """The same iteration (same rollouts: same seed) eager and compiled: the updated weights agree to rounding."""
    after = []
    for compile_ in (False, True):
        tr = PPOTrainer(small_config(torch_compile=compile_), model=str(tiny_policy), reward_model=e_share,
                        train_dataset=PromptDataset(PROMPTS), device="cuda")
        tr.step()
        after.append(snapshot(tr.model))
    for k, v in after[0].items():
        torch.testing.assert_close(after[1][k], v, atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("bf16", [False, True])
def test_padded_training_inputs_give_the_same_losses_and_gradients(tiny_policy, bf16):
    """The CUDA graphs' bucket padding (masked prompt tokens on the left, masked response slots on the right)
    changes no loss, stat or gradient of a micro-step. bf16 on a GPU: 16 + 48 = 64 positions, where cuDNN's SDPA
    backward gave NaN gradients for the fully masked rows before the training forward stopped using it."""
    tr = PPOTrainer(small_config(response_length=40, bf16=bf16), model=str(tiny_policy), reward_model=e_share,
                    train_dataset=PromptDataset(PROMPTS))
    ro = tr.generate(PROMPTS[:4])
    fwd = tr._score_rollout(ro)
    gen = torch.Generator().manual_seed(0)
    adv, ret = (torch.randn(ro.mask.shape, generator=gen).to(tr.device) for _ in range(2))
    fwd["logprobs"] = fwd["logprobs"] - 0.05 * torch.rand(ro.mask.shape, generator=gen).to(tr.device)  # ratio != 1
    idx = torch.tensor([2, 0, 3], device=tr.device)
    results = []
    for bucket in (1, 16):
        inputs = tr._train_inputs(ro, fwd["logprobs"], fwd["values"], adv, ret, bucket)
        if bucket > 1:
            assert inputs["ids"].shape[1] % 16 == 0 and inputs["responses"].shape[1] == 48
            assert inputs["ids"].shape[1] - 48 == -(-ro.context_length // 16) * 16
        tr.model.zero_grad(set_to_none=True)
        stats = tr._micro_step(tr.model, inputs, idx, 0.5)
        results.append((stats, {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}))
    atol, rtol = (2e-4, 2e-2) if bf16 else (1e-6, 1e-4)
    torch.testing.assert_close(results[1][0], results[0][0], atol=atol, rtol=rtol)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name, g in results[0][1].items():
        assert torch.isfinite(results[1][1][name]).all(), name
        torch.testing.assert_close(results[1][1][name], g, atol=atol * 10, rtol=rtol, msg=name)


def test_cuda_graphs_config_is_checked():
    for bad in ({"cuda_graphs": "yes"}, {"cuda_graph_bucket": 0}, {"cuda_graph_bucket": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PPOConfig(**bad)


def _two_iterations(tiny_policy, zero_grads_between=False, policy_forward=None, **cfg):
    tr = PPOTrainer(small_config(total_episodes=16, **cfg), model=str(tiny_policy), reward_model=e_share,
                    train_dataset=PromptDataset(PROMPTS), device="cuda")
    if policy_forward is not None:
        tr.model.forward = policy_forward(tr.model.forward)
    stats = [tr.step()]
    if zero_grads_between:  # a user's set_to_none between steps: the graphs must put their .grad tensors back
        tr.optimizer.zero_grad(set_to_none=True)
    stats.append(tr.step())
    return tr, stats


@pytest.mark.gpu
@pytest.mark.parametrize("bf16, accumulation", [(False, 1), (True, 1), (False, 2)])
def test_cuda_graph_training_steps_match_the_eager_ones(tiny_policy, bf16, accumulation):
    """Two iterations (the second replays the first's graphs with new rollouts), graphed and eager: same rollouts
    (same seed), so the updated weights and the stats agree to rounding (bf16: to its rounding of the padded
    shapes' sums). ``accumulation`` 2: two micro-batches per mini-batch, replays accumulating into one .grad."""
    shape = dict(bf16=bf16)
    if accumulation > 1:
        shape.update(per_device_train_batch_size=2, gradient_accumulation_steps=accumulation, num_mini_batches=1)
    eager, eager_stats = _two_iterations(tiny_policy, cuda_graphs=False, zero_grads_between=True, **shape)
    graphed, graphed_stats = _two_iterations(tiny_policy, zero_grads_between=True, **shape)
    assert graphed.args.local_mini_batch_size // graphed.args.train_micro_batch_size == accumulation
    assert eager._graphs is None
    assert graphed._graphs.failure is None and graphed._graphs.captures >= 1 and graphed._graphs.active
    atol, rel = (1e-2, 1e-2) if bf16 else (1e-5, 1e-4)
    for k, v in snapshot(eager.model).items():
        assert torch.isfinite(graphed.model.state_dict()[k]).all(), k
        torch.testing.assert_close(graphed.model.state_dict()[k], v, atol=atol, rtol=rel, msg=k)
    for s_e, s_g in zip(eager_stats, graphed_stats):
        for name in ("loss/policy_avg", "loss/value_avg", "policy/approxkl_avg", "policy/entropy_avg", "val/ratio"):
            # bf16: the policy loss is a mean of O(1) terms that cancel to ~3e-3, so its rounding is absolute
            assert s_g[name] == pytest.approx(s_e[name], rel=rel, abs=2e-3 if bf16 else 1e-6), name


@pytest.mark.gpu
def test_a_model_that_syncs_in_forward_trains_eagerly_after_a_failed_capture(tiny_policy, caplog):
    def syncing(forward):
        def run(input_ids, attention_mask, position_ids):
            if input_ids.sum().item() < 0:  # a host read of a device value: not capturable
                raise AssertionError("unreachable")
            return forward(input_ids, attention_mask, position_ids)
        return run

    eager, _ = _two_iterations(tiny_policy, cuda_graphs=False, policy_forward=syncing)
    with caplog.at_level("WARNING", logger="kiln.rl.graphs"):
        fallback, _ = _two_iterations(tiny_policy, policy_forward=syncing)
    assert fallback._graphs.failure and not fallback._graphs.active
    assert "CUDA graph capture failed" in caplog.text
    for k, v in snapshot(eager.model).items():  # the failed capture left no gradient behind
        torch.testing.assert_close(fallback.model.state_dict()[k], v, atol=1e-5, rtol=1e-4, msg=k)


def test_separate_value_model_trains(tiny_policy, tmp_path):
    critic_dir = make_policy_checkpoint(tmp_path / "critic", seed=3, hidden=32)
    critic = transformers.AutoModelForCausalLM.from_pretrained(critic_dir)
    tr = PPOTrainer(small_config(), model=str(tiny_policy), reward_model=e_share, value_model=critic,
                    train_dataset=PromptDataset(PROMPTS))
    pol, crit = snapshot(tr.model.policy), snapshot(tr.model.value_model)
    tr.step()
    assert changed(pol, tr.model.policy) and "head.summary.weight" in changed(crit, tr.model.value_model)
    assert len(changed(crit, tr.model.value_model)) == len(crit)


def test_lora_policy_uses_adapter_disabled_reference_and_merged_engine_weights(tiny_policy):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          init_lora_weights=True)
    tr = PPOTrainer(small_config(learning_rate=1e-2), model=str(tiny_policy), reward_model=e_share,
                    train_dataset=PromptDataset(PROMPTS), peft_config=cfg)
    assert tr.ref_model is None and tr.is_peft_model
    base = {k: v.clone() for k, v in tr.model.policy.named_parameters() if "lora_" not in k}
    lora = {k: v.clone() for k, v in tr.model.policy.named_parameters() if "lora_B" in k}
    tr.step()
    now = dict(tr.model.policy.named_parameters())
    assert all(torch.equal(base[k], now[k]) for k in base)          # the base stays frozen
    assert all(not torch.equal(lora[k], now[k]) for k in lora)      # the adapters learn
    ro = tr.generate(PROMPTS[:4])
    fwd = tr._score_rollout(ro)
    assert not torch.allclose(fwd["logprobs"][ro.mask], fwd["ref_logprobs"][ro.mask])
    tr.sync_weights()
    ids = tr.tokenizer.encode(PROMPTS[1])
    with torch.no_grad():
        hf_logits = tr.model.policy(input_ids=torch.tensor([ids], device=tr.device)).logits[0]
    assert torch.allclose(tr.llm.prompt_logits([ids])[0].float(), hf_logits, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("reward, message", [
    (lambda p, r: [float("nan")] + [0.0] * (len(r) - 1), "non-finite"),
    (lambda p, r: [1.0] * (len(r) - 1), "3 scores for 4 responses"),
    (lambda p, r: ["high"] * len(r), "sequence of 4 numbers"),
])
def test_bad_reward_raises_before_any_update(tiny_policy, reward, message):
    tr = PPOTrainer(small_config(), model=str(tiny_policy), reward_model=reward,
                    train_dataset=PromptDataset(PROMPTS))
    before = snapshot(tr.model)
    with pytest.raises(ValueError, match=message):
        tr.step()
    assert changed(before, tr.model) == []


def test_prompt_longer_than_context_raises_at_construction(tiny_policy):
    long_prompt = " ".join(["troubles"] * 200)
    with pytest.raises(ValueError, match=r"train_dataset\[8\].*exceeds the model's context \(128\)"):
        PPOTrainer(small_config(), model=str(tiny_policy), reward_model=e_share,
                   train_dataset=PromptDataset(PROMPTS + [long_prompt]))
    with pytest.raises(ValueError, match="exceeds the model's context"):  # room for the response counts too
        PPOTrainer(small_config(response_length=125), model=str(tiny_policy), reward_model=e_share,
                   train_dataset=PromptDataset(PROMPTS))


def test_a_gpu_that_is_not_there_raises_before_loading_anything(tiny_policy):
    """torchrun with more processes than GPUs sent rank 1 to cuda:1 on a one-GPU machine, where CUDA failed deep in
    set_device ("invalid device ordinal"); now the trainer names the device and the count."""
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"device 'cuda:{n}' " + ("asks for a GPU" if n == 0 else
                                                                   f"is not one of the {n} visible")):
        PPOTrainer(small_config(), model=str(tiny_policy), reward_model=e_share, train_dataset=PromptDataset(PROMPTS),
                   device=f"cuda:{n}")


def test_value_model_with_a_different_tokenizer_raises(tiny_policy, tmp_path):
    other_vocab = make_policy_checkpoint(tmp_path / "v1", hidden=32, vocab=300)
    with pytest.raises(ValueError, match="value model vocabulary"):
        PPOTrainer(small_config(), model=str(tiny_policy), reward_model=e_share, train_dataset=PromptDataset(PROMPTS),
                   value_model=transformers.AutoModelForCausalLM.from_pretrained(other_vocab))
    # same vocabulary size, different tokenizer (read from the value model's directory)
    same_size = make_policy_checkpoint(tmp_path / "v2", hidden=32)
    tok = json.loads((same_size / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (same_size / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="tokenizer differs"):
        PPOTrainer(small_config(), model=str(tiny_policy), reward_model=e_share, train_dataset=PromptDataset(PROMPTS),
                   value_model=transformers.AutoModelForCausalLM.from_pretrained(same_size))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="num_mini_batches"):
        PPOConfig(per_device_train_batch_size=6, num_mini_batches=4)
    with pytest.raises(ValueError, match="stop_token or stop_token_id"):
        PPOConfig(stop_token="eos", stop_token_id=3)
    with pytest.raises(ValueError, match="rollout_dtype"):
        PPOConfig(rollout_dtype="int8")
    from kiln.rl.ppo import _train_dtype

    lin = torch.nn.Linear(2, 2)
    assert (_train_dtype(lin, False), _train_dtype(lin, True), _train_dtype(lin.bfloat16(), False)) == (
        "float32", "bfloat16", "bfloat16")
    defaults = PPOConfig()
    assert (defaults.learning_rate, defaults.kl_coef, defaults.cliprange, defaults.vf_coef, defaults.gamma,
            defaults.lam, defaults.num_ppo_epochs, defaults.response_length, defaults.temperature) == (
        3e-6, 0.05, 0.2, 0.1, 1.0, 0.95, 4, 53, 0.7)


# ------------------------------------------------------------------------------------------------ data, saving
def test_stream_needs_total_episodes_and_trains(tiny_policy, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    with pytest.raises(ValueError, match="total_episodes"):
        PPOTrainer(small_config(total_episodes=None), model=str(tiny_policy), reward_model=e_share,
                   train_dataset=JsonlPromptStream(path))
    tr = PPOTrainer(small_config(total_episodes=12, stop_token="eos", missing_eos_penalty=1.0),
                    model=str(tiny_policy), reward_model=WordListReward(["the", "sea"]),
                    train_dataset=JsonlPromptStream(path, repeat=True))
    history = tr.train(progress=False)
    assert len(history) == 3 and history[-1]["episode"] == 12


def test_save_model_and_plot(tiny_policy, tmp_path):
    out = tmp_path / "run"
    tr = PPOTrainer(small_config(output_dir=str(out), adap_kl_ctrl=True, target=6.0, horizon=10),
                    model=str(tiny_policy), reward_model=e_share, train_dataset=PromptDataset(PROMPTS))
    tr.train(progress=False)
    for name in ("model.safetensors", "config.json", "value_head.safetensors", "tokenizer.json",
                 "trainer_state.json", "ppo_curves.png"):
        assert (out / name).exists(), name
    state = json.loads((out / "trainer_state.json").read_text())
    assert len(state["history"]) == 2 and "objective/kl" in state["history"][0]
    # adaptive KL: iteration 1 has KL 0 (< target), so the coefficient shrinks by 1 - 0.2 * 4 / 10
    assert state["history"][1]["objective/kl_coef"] == pytest.approx(0.05 * (1 - 0.2 * 4 / 10))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for (n, a), (_, b) in zip(reloaded.named_parameters(), tr.model.policy.named_parameters()):
        assert torch.equal(a, b.cpu()), n
    head = tr.model.value_head.summary.weight.detach().clone()
    tr.model.value_head.summary.weight.data.zero_()
    tr.load_value_head(out)
    assert torch.equal(tr.model.value_head.summary.weight, head) and head.abs().sum() > 0
