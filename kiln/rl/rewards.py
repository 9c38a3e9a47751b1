"""Rewards: the per-token KL-penalised reward, masked statistics, rule-based reward functions and reward models.

Tensors are ``[batch, response_length]`` with a bool ``mask`` that is True on response tokens (the stop token
included) and False on padding after the response ends.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import torch

from .kl import kl_penalty

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


# ----------------------------------------------------------------------------------------------- masked statistics
def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked elements (Bessel-corrected when ``unbiased``)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean).square(), mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"the masked variance needs at least 2 elements, got {int(n)}; use a larger batch")
        var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(values - mean) / sqrt(var + 1e-8)`` over the masked elements; ``shift_mean=False`` adds the mean back."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


# ----------------------------------------------------------------------------------------------- PPO reward
def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                    kl_coef: float, kl_estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * kl`` on every response token, plus the sequence score at its last token.

    Returns ``(rewards, non_score_reward, kl)``, each ``[B, T]`` and zero where ``mask`` is False.
    ``scores`` is ``[B]``; every row of ``mask`` must hold at least one token and be a prefix (True then False).
    """
    mask = mask.bool()
    lengths = mask.sum(1)
    if (lengths == 0).any():
        raise ValueError("every response needs at least one token")
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator).masked_fill(~mask, 0.0)
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, lengths - 1] += scores.to(rewards.dtype)
    return rewards, non_score_reward, kl


# ----------------------------------------------------------------------------------------------- reward functions
_WORD = re.compile(r"[a-z']+")


class WordListReward:
    """Rule-based reward of (prompt, response) texts: how much of the response uses words from ``words``.

    ``score = hits / max(words_in_response, min_words)``, in [0, 1]: the share of the response's words that are in
    the list, where a short or empty response counts as ``min_words`` long (so stopping early does not pay).
    """

    def __init__(self, words: Sequence[str], min_words: int = 8):
        cleaned = {w.strip().lower() for w in words if w.strip()}
        if not cleaned:
            raise ValueError("WordListReward needs at least one word")
        if min_words < 1:
            raise ValueError(f"min_words must be >= 1, got {min_words}")
        self.words = frozenset(cleaned)
        self.min_words = min_words

    def score(self, response: str) -> float:
        tokens = _WORD.findall(response.lower())
        hits = sum(t in self.words for t in tokens)
        return hits / max(len(tokens), self.min_words)

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.score(r) for r in responses]

    def __repr__(self) -> str:
        return f"WordListReward({sorted(self.words)!r}, min_words={self.min_words})"


def check_scores(scores, n: int, source: str = "reward function") -> torch.Tensor:
    """Turn a reward output into a float tensor ``[n]``; ValueError on a wrong count, NaN or infinity."""
    if isinstance(scores, torch.Tensor):
        values = scores.detach().float().reshape(-1).cpu()
        if scores.dim() > 1 and not (scores.dim() == 2 and scores.shape[1] == 1):
            raise ValueError(f"{source} returned a tensor of shape {tuple(scores.shape)}; expected [{n}] or [{n}, 1]")
    else:
        try:
            values = torch.tensor([float(s) for s in scores], dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source} must return a sequence of {n} numbers: {exc}") from exc
    if values.numel() != n:
        raise ValueError(f"{source} returned {values.numel()} scores for {n} responses")
    bad = [i for i, v in enumerate(values.tolist()) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{source} returned non-finite scores (NaN or inf) at positions {bad[:8]}: "
                         f"{[values[i].item() for i in bad[:8]]}")
    return values


@torch.no_grad()
def model_scores(reward_model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 last_index: torch.Tensor) -> torch.Tensor:
    """Score ``[B]`` from a reward model at each row's last token (``last_index``).

    Accepts TRL's layout (a ``base_model_prefix`` backbone returning hidden states and a ``score`` head giving
    ``[B, T, 1]``) and plain models whose output ``logits`` are ``[B, T, 1]``, ``[B, 1]`` or ``[B]``.
    """
    position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    prefix = getattr(reward_model, "base_model_prefix", None)
    if hasattr(reward_model, "score") and prefix and hasattr(reward_model, prefix):
        out = getattr(reward_model, prefix)(input_ids=input_ids, attention_mask=attention_mask,
                                            position_ids=position_ids, output_hidden_states=True, return_dict=True,
                                            use_cache=False)
        logits = reward_model.score(out.hidden_states[-1])
    else:
        out = reward_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        logits = out.logits if hasattr(out, "logits") else out
    if logits.dim() == 3:
        if logits.shape[-1] != 1:
            raise ValueError(f"reward model gives {logits.shape[-1]} outputs per token; expected 1")
        return logits[rows, last_index, 0].float()
    if logits.dim() == 2 and logits.shape[1] == 1:
        return logits[:, 0].float()
    if logits.dim() == 1:
        return logits.float()
    raise ValueError(f"reward model output has shape {tuple(logits.shape)}; expected [B, T, 1], [B, 1] or [B]")
