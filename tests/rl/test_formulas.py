"""PPO math on fixed tensors with padding masks, against the formulas written out element by element (1e-6)."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.rl import (AdaptiveKLController, compute_advantages, compute_rewards, kl_penalty, masked_whiten,
                     policy_loss, value_loss)

# two responses of 3 and 5 tokens, padded to 5
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
LOGP = torch.tensor([[-1.0, -2.0, -0.5, 9.0, 9.0], [-0.3, -1.2, -2.2, -0.7, -1.1]], dtype=torch.float64)
REF = torch.tensor([[-1.5, -1.0, -0.5, -7.0, 3.0], [-0.2, -1.0, -2.9, -0.1, -1.6]], dtype=torch.float64)
SCORES = torch.tensor([2.0, -1.0], dtype=torch.float64)
VALUES = torch.tensor([[0.5, 0.2, -0.3, 4.0, 4.0], [0.1, 0.0, 0.3, -0.2, 0.6]], dtype=torch.float64)


def test_kl_estimators_match_definitions():
    logr = REF - LOGP
    assert torch.allclose(kl_penalty(LOGP, REF, "k1"), -logr, atol=1e-12)
    assert torch.allclose(kl_penalty(LOGP, REF, "k2"), 0.5 * logr ** 2, atol=1e-12)
    assert torch.allclose(kl_penalty(LOGP, REF, "k3"), logr.exp() - 1 - logr, atol=1e-12)
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(LOGP, REF, "k4")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_rewards_are_kl_penalty_plus_score_at_last_token(estimator):
    kl_coef = 0.1
    rewards, non_score, kl = compute_rewards(SCORES, LOGP, REF, MASK, kl_coef, estimator)
    for b in range(2):
        n = int(MASK[b].sum())
        for t in range(5):
            if t >= n:  # padding: nothing, whatever the (garbage) log-probs say
                assert rewards[b, t] == 0 and kl[b, t] == 0 and non_score[b, t] == 0
                continue
            lr = REF[b, t].item() - LOGP[b, t].item()
            k = -lr if estimator == "k1" else math.exp(lr) - 1 - lr
            expected = -kl_coef * k + (SCORES[b].item() if t == n - 1 else 0.0)
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-6)
            assert kl[b, t].item() == pytest.approx(k, abs=1e-6)
            assert non_score[b, t].item() == pytest.approx(-kl_coef * k, abs=1e-6)


def test_gae_advantages_and_returns_match_recursion():
    gamma, lam = 0.9, 0.8
    rewards, _, _ = compute_rewards(SCORES, LOGP, REF, MASK, 0.05, "k1")
    adv, ret = compute_advantages(rewards, VALUES, MASK, gamma, lam, whiten=False)
    for b in range(2):
        n = int(MASK[b].sum())
        r, v = rewards[b, :n].tolist(), VALUES[b, :n].tolist()
        a_next, expected = 0.0, [0.0] * n
        for t in reversed(range(n)):
            v_next = v[t + 1] if t + 1 < n else 0.0  # the episode ends at the last token
            delta = r[t] + gamma * v_next - v[t]
            a_next = delta + gamma * lam * a_next
            expected[t] = a_next
        for t in range(5):
            if t < n:
                assert adv[b, t].item() == pytest.approx(expected[t], abs=1e-6)
                assert ret[b, t].item() == pytest.approx(expected[t] + v[t], abs=1e-6)
            else:
                assert adv[b, t] == 0 and ret[b, t] == 0


def test_gamma_one_lambda_one_advantage_is_reward_to_go_minus_value():
    rewards, _, _ = compute_rewards(SCORES, LOGP, REF, MASK, 0.05, "k1")
    adv, ret = compute_advantages(rewards, VALUES, MASK, 1.0, 1.0, whiten=False)
    for b in range(2):
        n = int(MASK[b].sum())
        for t in range(n):
            to_go = rewards[b, t:n].sum().item()
            assert ret[b, t].item() == pytest.approx(to_go, abs=1e-6)
            assert adv[b, t].item() == pytest.approx(to_go - VALUES[b, t].item(), abs=1e-6)


def test_whitened_advantages_have_zero_mean_unit_variance_over_the_mask():
    rewards, _, _ = compute_rewards(SCORES, LOGP, REF, MASK, 0.05, "k1")
    adv, _ = compute_advantages(rewards, VALUES, MASK, 1.0, 0.95, whiten=True)
    raw, _ = compute_advantages(rewards, VALUES, MASK, 1.0, 0.95, whiten=False)
    x = raw[MASK]
    expected = (x - x.mean()) / torch.sqrt(x.var(unbiased=True) + 1e-8)
    assert torch.allclose(adv[MASK], expected, atol=1e-6)
    assert (adv[~MASK] == 0).all()
    # shift_mean=False keeps the mean (reward whitening)
    w = masked_whiten(raw, MASK, shift_mean=False)[MASK]
    assert torch.allclose(w, expected + x.mean(), atol=1e-6)


def test_clipped_policy_loss_matches_formula():
    old = LOGP
    new = old + torch.tensor([[0.3, -0.4, 0.05, 50.0, -50.0], [0.0, 0.25, -0.1, -0.3, 0.15]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -2.0, 0.5, 7.0, 7.0], [-1.0, 1.5, 2.0, -0.5, 0.3]], dtype=torch.float64)
    c = 0.2
    loss, stats = policy_loss(new, old, adv, MASK, c)
    terms, clipped, sq = [], [], []
    for b in range(2):
        for t in range(int(MASK[b].sum())):
            ratio = math.exp(new[b, t].item() - old[b, t].item())
            l1 = -adv[b, t].item() * ratio
            l2 = -adv[b, t].item() * min(max(ratio, 1 - c), 1 + c)
            terms.append(max(l1, l2))
            clipped.append(float(l2 > l1))
            sq.append((new[b, t].item() - old[b, t].item()) ** 2)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(sum(clipped) / len(clipped), abs=1e-6)
    assert 0 < stats["clipfrac"].item() < 1
    assert stats["approxkl"].item() == pytest.approx(0.5 * sum(sq) / len(sq), abs=1e-6)


def test_clipped_value_loss_matches_formula():
    old = VALUES
    vpred = old + torch.tensor([[0.5, -0.1, 0.3, 99.0, -99.0], [-0.35, 0.05, 0.0, 0.4, -0.25]], dtype=torch.float64)
    returns = torch.tensor([[1.0, 0.0, 0.2, -5.0, 5.0], [0.0, 0.3, 0.1, 0.6, -0.2]], dtype=torch.float64)
    cv = 0.2
    loss, stats = value_loss(vpred, old, returns, MASK, cv)
    terms, clipped = [], []
    for b in range(2):
        for t in range(int(MASK[b].sum())):
            v, vo, r = vpred[b, t].item(), old[b, t].item(), returns[b, t].item()
            vc = min(max(v, vo - cv), vo + cv)
            l1, l2 = (v - r) ** 2, (vc - r) ** 2
            terms.append(max(l1, l2))
            clipped.append(float(l2 > l1))
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(sum(clipped) / len(clipped), abs=1e-6)
    assert 0 < stats["clipfrac"].item() < 1


def test_padding_never_reaches_the_losses():
    """Garbage in padded positions (huge log-probs, values, advantages) must not change any loss."""
    adv = torch.randn(2, 5, dtype=torch.float64)
    new = LOGP + 0.1 * torch.randn(2, 5, dtype=torch.float64)
    base = policy_loss(new, LOGP, adv, MASK, 0.2)[0]
    junk = ~MASK
    noisy_new, noisy_adv = new.clone(), adv.clone()
    noisy_new[junk], noisy_adv[junk] = 1e6, -1e6
    assert policy_loss(noisy_new, LOGP, noisy_adv, MASK, 0.2)[0].item() == pytest.approx(base.item(), abs=1e-9)
    vb = value_loss(VALUES * 2, VALUES, adv, MASK, 0.2)[0]
    noisy_v = (VALUES * 2).clone()
    noisy_v[junk] = 1e6
    assert value_loss(noisy_v, VALUES, adv, MASK, 0.2)[0].item() == pytest.approx(vb.item(), abs=1e-9)


def test_adaptive_kl_controller_moves_towards_target():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=100)  # above target: error clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))
    ctl2 = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl2.update(5.4, n_steps=64)  # below target: error -0.1
    assert ctl2.value == pytest.approx(0.2 * (1 - 0.1 * 64 / 10000))
