"""Rollouts end where TRL 1.12's do (``trl/experimental/ppo/ppo_trainer.py``).

TRL sets the policy's ``generation_config.eos_token_id`` to the stop token (``None`` unless ``stop_token`` or
``stop_token_id`` is set), so Hugging Face ``generate`` samples ``response_length`` tokens through any EOS token
unless a stop token is set, and then stops at that one id only; ``truncate_response`` cuts after its first
occurrence. The reward sees the whole (truncated) response, EOS tokens included in the mask.
"""

from __future__ import annotations

import pytest

from kiln.data.prompts import PromptDataset
from kiln.rl import PPOConfig, PPOTrainer

from .conftest import PROMPTS, e_share

transformers = pytest.importorskip("transformers")

LENGTH = 8
EOS_IDS = (1, 3)  # the checkpoint's EOS ids: config.json / tokenizer (1) and generation_config.json (1, 3)


def config(**kw) -> PPOConfig:
    base = dict(response_length=LENGTH, per_device_train_batch_size=len(PROMPTS), num_mini_batches=2,
                num_ppo_epochs=1, learning_rate=1e-3, temperature=1.0, total_episodes=len(PROMPTS),
                num_sample_generations=0, seed=0)
    base.update(kw)
    return PPOConfig(**base)


def trainer(path, reward=e_share, **kw) -> PPOTrainer:
    return PPOTrainer(config(**kw), model=str(path), reward_model=reward, train_dataset=PromptDataset(PROMPTS))


def free_rollout(path) -> list[list[int]]:
    return trainer(path).generate(PROMPTS, seed=0).response_ids


def test_without_a_stop_token_rollouts_run_through_eos_to_response_length(eos_heavy_policy):
    tr = trainer(eos_heavy_policy)
    assert set(EOS_IDS) <= tr.llm.engine.eos_token_ids  # the engine ends a plain request at either
    ro = tr.generate(PROMPTS, seed=0)
    assert [len(r) for r in ro.response_ids] == [LENGTH] * len(PROMPTS)
    # EOS tokens were sampled before the last position (else this test would show nothing)
    assert sum(any(t in EOS_IDS for t in r[:-1]) for r in ro.response_ids) >= 2
    assert ro.mask.all() and tuple(ro.responses.shape) == (len(PROMPTS), LENGTH)
    # the reward function sees the whole response, special tokens skipped, as TRL's reward model does
    hf_tok = transformers.AutoTokenizer.from_pretrained(eos_heavy_policy)
    assert ro.texts == [hf_tok.decode(r, skip_special_tokens=True) for r in ro.response_ids]


@pytest.mark.parametrize("stop", [dict(stop_token="eos"), dict(stop_token_id=3)])
def test_a_stop_token_ends_the_response_at_that_id_only(eos_heavy_policy, stop):
    stop_id = 1 if stop.get("stop_token") == "eos" else stop["stop_token_id"]
    other = 4 - stop_id  # the checkpoint's other EOS id
    full = free_rollout(eos_heavy_policy)
    got = trainer(eos_heavy_policy, **stop).generate(PROMPTS, seed=0).response_ids
    # the same seeded draws, cut after the first stop token (TRL's truncate_response)
    assert any(other in r[:-1] for r in got)                        # the other EOS id ended none
    assert got == [r[:r.index(stop_id) + 1] if stop_id in r else r for r in full]
    assert any(stop_id in r[:-1] for r in full)                     # some responses do end early


def test_step_trains_on_full_length_responses_and_counts_eos_tokens_as_trl(eos_heavy_policy):
    penalty = 0.5
    tr = trainer(eos_heavy_policy, missing_eos_penalty=penalty, reward=lambda p, r: [0.0] * len(r))
    seen = {}
    generate = tr.generate

    def spy(*args, **kw):
        seen["ro"] = generate(*args, **kw)
        return seen["ro"]

    tr.generate = spy
    stats = tr.step()
    responses = seen["ro"].response_ids
    assert stats["rollout/response_length"] == LENGTH
    # TRL: val/num_eos_tokens = (responses == eos_token_id).sum(); the penalty hits rows without the tokenizer's EOS
    n_eos = sum(r.count(1) for r in responses)
    assert n_eos >= 2
    assert stats["val/num_eos_tokens"] == n_eos
    without = sum(1 not in r for r in responses)
    assert stats["objective/scores"] == pytest.approx(-penalty * without / len(responses))
