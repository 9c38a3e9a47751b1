"""KL between the policy and the reference, per token, and the KL coefficient controllers.

Estimators follow http://joschu.net/blog/kl-approx.html with ``logr = ref_logprob - logprob`` evaluated at tokens
sampled from the policy:

- ``k1 = -logr``                  unbiased, can be negative per token (TRL's default)
- ``k2 = logr**2 / 2``            biased, low variance (logging only, as in TRL)
- ``k3 = (exp(logr) - 1) - logr`` unbiased, never negative
"""

from __future__ import annotations

import torch


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate, same shape as the inputs."""
    logr = ref_logprobs - logprobs
    if estimator == "k1":
        return -logr
    if estimator == "k2":
        return 0.5 * logr.square()
    if estimator == "k3":
        return torch.expm1(logr) - logr
    raise ValueError(f"kl estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


class FixedKLController:
    """A constant KL coefficient (TRL 1.12's ``kl_coef``)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        return None


class AdaptiveKLController:
    """Ziegler et al. (2019): move the coefficient so the KL approaches ``target`` over ``horizon`` episodes.

    ``value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
