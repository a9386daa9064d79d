"""ppo.core against numbers worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from ppo import core


def close(actual, expected, tol=1e-5):
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64), atol=tol)


def test_logprobs_from_logits():
    # softmax([0, ln 3]) = [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])
    labels = torch.tensor([[1, 0]])
    assert close(core.logprobs_from_logits(logits, labels), [[math.log(0.75), math.log(0.25)]])


def test_entropy_from_logits_by_hand_and_against_trl():
    # p = [1/4, 3/4]: H = 0.25 ln 4 + 0.75 ln(4/3) = 0.346574 + 0.215762 = 0.562335
    logits = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]])
    # second row uniform over 2: ln 2 = 0.693147
    assert close(core.entropy_from_logits(logits), [0.562335, 0.693147])
    from trl.trainer.utils import entropy_from_logits

    random_logits = torch.randn(3, 5, 11)
    assert close(core.entropy_from_logits(random_logits), entropy_from_logits(random_logits))


X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_mean():
    # unmasked: 1, 2, 4 -> 7/3; per row: (1+2)/2 = 1.5 and 4/1 = 4
    assert close(core.masked_mean(X, M), 7 / 3)
    assert close(core.masked_mean(X, M, dim=1), [1.5, 4.0])


def test_masked_var():
    # deviations from 7/3: -4/3, -1/3, 5/3 -> squares 16/9 + 1/9 + 25/9 = 42/9
    # biased: 42/9 / 3 = 14/9; unbiased: 42/9 / 2 = 7/3
    assert close(core.masked_var(X, M, unbiased=False), 14 / 9)
    assert close(core.masked_var(X, M), 7 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        core.masked_var(X, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_masked_whiten():
    # std = sqrt(7/3) = 1.527525: (1 - 7/3)/std = -0.872872, (2 - 7/3)/std = -0.218218,
    # (4 - 7/3)/std = 1.091089; padding stays 0
    expected = [[-0.872872, -0.218218, 0.0], [1.091089, 0.0, 0.0]]
    assert close(core.masked_whiten(X, M), expected)
    # shift_mean=False puts the mean 7/3 = 2.333333 back on the real entries
    expected_kept = [[-0.872872 + 7 / 3, -0.218218 + 7 / 3, 0.0], [1.091089 + 7 / 3, 0.0, 0.0]]
    assert close(core.masked_whiten(X, M, shift_mean=False), expected_kept)
    w = core.masked_whiten(X, M)
    assert close(core.masked_mean(w, M), 0.0) and close(core.masked_var(w, M), 1.0)


def test_gae_with_gamma_lam_and_mask():
    gamma, lam = 0.9, 0.5  # gamma * lam = 0.45
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.9, 0.9]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv, ret = core.gae(values, rewards, mask, gamma, lam)
    # row 0, backwards:
    #   t=2: delta = 1 + 0.9*0 - 0.3 = 0.7                    A = 0.7
    #   t=1: delta = 0 + 0.9*0.3 - 0.4 = -0.13                A = -0.13 + 0.45*0.7 = 0.185
    #   t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14                A = -0.14 + 0.45*0.185 = -0.05675
    #   returns = A + V = 0.44325, 0.585, 1.0
    # row 1 ends at t=0, so the padded value 0.9 must not be bootstrapped from:
    #   t=0: delta = 0.5 + 0 - 0.2 = 0.3                      A = 0.3, return 0.5; padding 0
    assert close(adv, [[-0.05675, 0.185, 0.7], [0.3, 0.0, 0.0]])
    assert close(ret, [[0.44325, 0.585, 1.0], [0.5, 0.0, 0.0]])


def test_gae_lam_one_is_discounted_return_minus_value():
    # lam = 1: A_0 = sum_t gamma^t r_t - V_0 = (1 + 0.5*2 + 0.25*4) - 1 = 2
    adv, ret = core.gae(torch.tensor([[1.0, 7.0, -3.0]]), torch.tensor([[1.0, 2.0, 4.0]]), torch.ones(1, 3), 0.5, 1.0)
    assert close(adv[0, 0], 2.0) and close(ret[0, 0], 3.0)


def test_kl_estimators_k1_k3():
    # policy p = [0.5, 0.2] on the sampled tokens, reference q = [0.25, 0.4]
    logp = torch.log(torch.tensor([0.5, 0.2]))
    ref = torch.log(torch.tensor([0.25, 0.4]))
    # k1 = log(p/q) = ln 2 = 0.693147 and ln 0.5 = -0.693147
    assert close(core.kl_per_token(logp, ref, "k1"), [0.693147, -0.693147])
    # k3 = (q/p - 1) + log(p/q): (0.5 - 1) + 0.693147 = 0.193147; (2 - 1) - 0.693147 = 0.306853
    assert close(core.kl_per_token(logp, ref, "k3"), [0.193147, 0.306853])
    with pytest.raises(ValueError, match="'k1' or 'k3'"):
        core.kl_per_token(logp, ref, "k2")


def test_kl_estimators_are_unbiased_for_exact_kl():
    # Sampling from p, both estimators average to KL(p||q) = sum p log(p/q).
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum()  # 0.6 ln 3 + 0.3 ln 0.6 + 0.1 ln(1/3) = 0.396...
    assert close(exact, 0.6 * math.log(3) + 0.3 * math.log(0.6) + 0.1 * math.log(1 / 3))
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    for est in ("k1", "k3"):
        assert close(core.kl_per_token(p.log()[x], q.log()[x], est).mean(), exact, tol=0.01)


def test_penalised_rewards_put_score_on_last_real_token():
    scores = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards, non_score = core.penalised_rewards(scores, kl, 0.5, mask)
    # row 0: -0.5*0.1 = -0.05, -0.5*0.2 + 2.0 = 1.9, padding 0
    # row 1: -0.2, -0.25, -0.5*0.6 - 1.0 = -1.3
    assert close(rewards, [[-0.05, 1.9, 0.0], [-0.2, -0.25, -1.3]])
    assert close(non_score, [[-0.05, -0.1, 0.0], [-0.2, -0.25, -0.3]])


def test_clipped_policy_loss_clip_fraction_and_approx_kl():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.5, 10.0]])
    old = torch.zeros(1, 5)
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # the last token is padding and must not count
    loss, clipfrac, approx_kl = core.policy_loss(ratios.log(), old, adv, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   A=1,  r=1.5: max(-1.5, -1.2) = -1.2  (clipped term larger)
    #   A=1,  r=0.5: max(-0.5, -0.8) = -0.5
    #   A=-2, r=1.1: max(2.2, 2.2)   = 2.2   (inside the range: not clipped)
    #   A=-1, r=0.5: max(0.5, 0.8)   = 0.8   (clipped term larger)
    # loss = (-1.2 - 0.5 + 2.2 + 0.8) / 4 = 0.325; clip fraction 2/4
    assert close(loss, 0.325) and close(clipfrac, 0.5)
    # approx KL = 0.5 * mean(ln r ^ 2) = 0.5 * (0.164402 + 0.480453 + 0.009084 + 0.480453) / 4 = 0.141799
    assert close(approx_kl, 0.141799)


def test_clipped_policy_loss_gradient_is_zero_when_clipped():
    logp = torch.tensor([[math.log(1.5)]], requires_grad=True)
    loss, _, _ = core.policy_loss(logp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    loss.backward()
    assert logp.grad.abs().item() == 0.0


def test_clipped_value_loss_and_clip_fraction():
    old = torch.tensor([[1.0, 1.0, 1.0]])
    new = torch.tensor([[1.5, 0.9, 2.0]])
    returns = torch.tensor([[2.0, 0.0, 1.0]])
    loss, clipfrac = core.value_loss(new, old, returns, torch.ones(1, 3), cliprange_value=0.2)
    # V_clip = 1.2, 0.9, 1.2
    #   (1.5-2)^2 = 0.25 vs (1.2-2)^2 = 0.64 -> 0.64 (clipped larger)
    #   (0.9-0)^2 = 0.81 vs 0.81            -> 0.81
    #   (2.0-1)^2 = 1.00 vs (1.2-1)^2 = 0.04 -> 1.00
    # loss = 0.5 * (0.64 + 0.81 + 1.00) / 3 = 0.408333; clip fraction 1/3
    assert close(loss, 0.408333) and close(clipfrac, 1 / 3)


def test_adaptive_kl_controller_over_three_steps():
    ctl = core.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    # kl 9:   error 9/6 - 1 = 0.5 clipped to 0.2; coef = 0.2 * (1 + 0.2 * 64/10000) = 0.2 * 1.00128 = 0.200256
    ctl.update(9.0, n_steps=64)
    assert close(ctl.value, 0.200256, tol=1e-10)
    # kl 6.6: error 0.1; coef = 0.200256 * 1.00064 = 0.20038416384
    ctl.update(6.6, n_steps=64)
    assert close(ctl.value, 0.20038416384, tol=1e-10)
    # kl 0:   error -1 clipped to -0.2; coef = 0.20038416384 * 0.99872 = 0.20012767211
    ctl.update(0.0, n_steps=64)
    assert close(ctl.value, 0.20012767211, tol=1e-10)
    restored = core.AdaptiveKLController(0.5, 6.0, 10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_fixed_kl_controller_never_moves():
    ctl = core.FixedKLController(0.05)
    ctl.update(100.0, n_steps=64)
    assert ctl.value == 0.05


def test_running_moments_match_the_whole_stream():
    rm = core.RunningMoments()
    # batch [1, 2, 3]: its own mean 2, unbiased std 1
    assert rm.update(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx((2.0, 1.0))
    rm.update(torch.tensor([4.0, 5.0]))
    # all of 1..5: mean 3, unbiased variance 10/4 = 2.5
    assert rm.mean == pytest.approx(3.0) and rm.std == pytest.approx(math.sqrt(2.5))
    # normalise(5) = (5 - 3) / sqrt(2.5) = 1.264911
    assert close(rm.normalise(torch.tensor([5.0])), [1.264911])
