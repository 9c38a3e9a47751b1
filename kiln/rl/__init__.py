"""kiln.rl: PPO for language models with TRL's config and stat names, and kiln.llm for fast rollouts.

    from kiln.rl import PPOConfig, PPOTrainer, WordListReward
    from kiln.data.prompts import PromptDataset

    trainer = PPOTrainer(PPOConfig(response_length=24, total_episodes=512), model="path/to/hf_checkpoint",
                         reward_model=WordListReward(["love", "sweet"]), train_dataset=PromptDataset(prompts))
    trainer.train()
"""

from .config import PPOConfig
from .kl import AdaptiveKLController, FixedKLController, kl_penalty
from .ppo import (PPOTrainer, compute_advantages, entropy_from_logits, logprobs_from_logits, plot_stats, policy_loss,
                  value_loss)
from .rewards import (WordListReward, check_scores, compute_rewards, masked_mean, masked_var, masked_whiten,
                      model_scores)
from .value_head import PolicyAndValue, ValueHead, ValueModel

__all__ = ["PPOConfig", "PPOTrainer", "AdaptiveKLController", "FixedKLController", "kl_penalty",
           "compute_advantages", "compute_rewards", "policy_loss", "value_loss", "logprobs_from_logits",
           "entropy_from_logits", "plot_stats", "WordListReward", "check_scores", "masked_mean", "masked_var",
           "masked_whiten", "model_scores", "PolicyAndValue", "ValueHead", "ValueModel"]
