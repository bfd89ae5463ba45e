"""The GRPO objective's choices (nanochat/kat/grpo.py): advantage normalisations, the sequence KL,
and on the toy bandit (nanochat/kat/toy.py) which of them collapse the policy."""

import math

import pytest
import torch

from nanochat.kat.grpo import Objective, clipped_policy_loss, grpo_advantages, k3_kl, sequence_kl, step_rewards
from nanochat.kat.toy import kl_optimum, run_bandit, sampler_control_summary

REWARDS = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])


def test_mean_only_advantages_are_centred_rewards():
    want = torch.tensor([[-2.0, -1.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(grpo_advantages(REWARDS, "none"), want)


def test_group_advantages_divide_by_the_groups_unbiased_std():
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # sample std of 1, 2, 3, 6 (mean 3)
    got = grpo_advantages(REWARDS, "group")
    torch.testing.assert_close(got[0], torch.tensor([-2.0, -1.0, 0.0, 3.0]) / (std + 1e-6))
    assert torch.equal(got[1], torch.zeros(4))  # a constant group carries no signal, never NaN


def test_batch_advantages_share_one_scale_over_every_rank():
    centred = torch.tensor([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    std = centred.square().mean().sqrt()  # population std of the centred rewards (their mean is 0)
    torch.testing.assert_close(grpo_advantages(REWARDS, "batch").flatten(), centred / (std + 1e-6))
    # another rank's groups enter through batch_moments: here a rank holding a group of +-4
    other = torch.tensor([[-4.0, 4.0, -4.0, 4.0]])
    other_moments = torch.tensor([0.0, 64.0, 4.0], dtype=torch.float64)
    joint = torch.cat([centred, other.flatten()])
    got = grpo_advantages(REWARDS, "batch", batch_moments=lambda m: m + other_moments).flatten()
    torch.testing.assert_close(got, centred / (joint.square().mean().sqrt() + 1e-6))


def test_unknown_normalisation_is_an_error():
    with pytest.raises(ValueError, match="one of"):
        grpo_advantages(REWARDS, "zscore")


def test_sequence_kl_sums_log_ratios_over_sampled_tokens():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -0.2, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    torch.testing.assert_close(sequence_kl(logprobs, ref, mask), torch.tensor([0.5 - 1.0 + 0.0, 0.2 + 0.0]))


def test_k3_is_zero_at_the_reference_and_positive_elsewhere():
    logprobs = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.equal(k3_kl(logprobs, logprobs), torch.zeros(3))
    d = torch.tensor([0.3, -0.7, 1.2])
    torch.testing.assert_close(k3_kl(logprobs, logprobs + d), torch.exp(d) - d - 1)


def test_step_rewards_take_off_the_truncation_penalty_and_the_sequence_kl():
    scores = torch.tensor([1.0, 2.0, -0.5, 0.25])
    finished = torch.tensor([True, False, True, False])
    kl = torch.tensor([0.4, -0.2, 3.0, 0.0])  # k1 sums can be negative for one sequence
    seq = Objective(adv_norm="none", kl="seq_reward", beta=0.5, clip_eps=0.2, truncation_penalty=1.5)
    torch.testing.assert_close(step_rewards(scores, finished, seq, kl), torch.tensor([1.0 - 0.2, 2.0 - 1.5 + 0.1,
                                                                                     -0.5 - 1.5, 0.25 - 1.5]))
    token = Objective(adv_norm="none", kl="token_k3", beta=0.5, clip_eps=0.2, truncation_penalty=1.5)
    torch.testing.assert_close(step_rewards(scores, finished, token, kl), torch.tensor([1.0, 0.5, -0.5, -1.25]))
    with pytest.raises(ValueError, match="sequence KL"):
        step_rewards(scores, finished, seq, None)


def _expected_gradient(theta, per_sample_loss):
    """d/dtheta of sum_x pi(x) * loss(x) with pi = softmax(theta) held fixed as the sampling
    distribution: the expectation of the per-sample gradient on the policy's own samples."""
    grads = []
    for x in range(theta.numel()):
        theta.grad = None
        per_sample_loss(x).backward()
        grads.append(theta.grad.clone())
    probs = torch.softmax(theta.detach(), dim=0)
    return sum(p * g for p, g in zip(probs, grads))


def test_token_k3_loss_follows_the_gradient_of_the_reverse_kl():
    """k3 as a loss, on-policy: E_pi[grad k3] = grad KL(ref || pi), not grad KL(pi || ref)."""
    torch.manual_seed(0)
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, dtype=torch.float64), dim=0)
    got = _expected_gradient(theta, lambda x: k3_kl(torch.log_softmax(theta, dim=0)[x], ref[x]))
    reverse = torch.autograd.grad((ref.exp() * (ref - torch.log_softmax(theta, 0))).sum(), theta)[0]
    forward = torch.autograd.grad((torch.softmax(theta, 0) * (torch.log_softmax(theta, 0) - ref)).sum(), theta)[0]
    torch.testing.assert_close(got, reverse)
    assert (got - forward).norm() > 0.1 * forward.norm()


def test_sequence_kl_in_the_reward_follows_the_gradient_of_the_forward_kl():
    """beta * k1 off the reward, through the policy-gradient loss -A log pi (ratio 1): the REINFORCE
    gradient of beta * KL(pi || ref), the objective whose optimum is ref * exp(r / beta)."""
    torch.manual_seed(0)
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, dtype=torch.float64), dim=0)
    beta = 0.3
    with torch.no_grad():
        penalty = beta * (torch.log_softmax(theta, 0) - ref)  # what step_rewards subtracts, per sample

    def loss(x):
        logprob = torch.log_softmax(theta, dim=0)[x]
        return clipped_policy_loss(logprob, logprob.detach(), -penalty[x])[0]

    forward = torch.autograd.grad(beta * (torch.softmax(theta, 0) * (torch.log_softmax(theta, 0) - ref)).sum(), theta)[0]
    torch.testing.assert_close(_expected_gradient(theta, loss), forward)


def test_kl_optimum_is_the_tilted_reference():
    ref = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    rewards = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    got = kl_optimum(ref, rewards, beta=0.5)
    want = ref * torch.exp(rewards / 0.5)
    torch.testing.assert_close(got, want / want.sum())


def test_group_zscoring_collapses_the_bandit_where_mean_only_advantages_do_not():
    """A small consistent reward gap (0.1, beta 0.1): the KL-regularised optimum puts 12.5% on the
    preferred template. Group z-scoring with the k3 loss piles ~96% on it; mean-only advantages
    with the KL in the reward stay at the optimum."""
    collapsed = run_bandit(gap=0.1, adv_norm="group", kl_mode="token_k3", steps=800)
    kept = run_bandit(gap=0.1, adv_norm="none", kl_mode="seq_reward", steps=800)
    assert kept.optimum_prob == pytest.approx(0.125, abs=0.002)
    assert collapsed.best_prob > 0.9
    assert abs(kept.best_prob - kept.optimum_prob) < 0.02


def test_synthetic_sampler_control_passes_for_the_predicted_reason():
    """Density sampling draws the rewarded rare cluster ~4x as often, so its marker rate reaches
    0.3 about that many times sooner, in every seed."""
    summary = sampler_control_summary(steps=80)
    assert summary["passed"]
    assert summary["predicted_speedup"] > 3
    assert 0.5 * summary["predicted_speedup"] < summary["observed_speedup"] < 1.5 * summary["predicted_speedup"]


def test_synthetic_sampler_control_fails_when_the_weights_carry_no_density():
    """beta 0: the density arm's weights are uniform, so the arms draw alike and neither is faster."""
    summary = sampler_control_summary(steps=80, beta=0.0)
    assert summary["predicted_speedup"] == pytest.approx(1.0, abs=1e-9)
    assert 0.6 < summary["observed_speedup"] < 1.6
    assert not summary["passed"] and "nothing to predict" in summary["reason"]
