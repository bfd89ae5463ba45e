"""
Toy GRPO problems that run in seconds on a CPU with the project's own advantage and loss code:
what the objective's choices do, without a language model in the way.

    python -m nanochat.kat.toy          # the bandit table: collapse by advantage norm and KL mode

The bandit: one prompt, K answer templates, a softmax policy over them, a reference policy, and a
reward that prefers one template by a fixed gap (a learned RM's consistent preference). Each
step draws groups of G samples, scores them, and takes one optimizer step of GRPO's loss.
"""

import math
from dataclasses import dataclass

import torch

from nanochat.kat.grpo import clipped_policy_loss, grpo_advantages, k3_kl


@dataclass
class BanditResult:
    best_prob: float  # the policy's probability of the preferred template at the end
    optimum_prob: float  # the KL-regularised optimum's: ref * exp(r / beta), normalised
    kl: float  # KL(policy || reference) at the end, nats


def kl_optimum(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """argmax_pi E_pi[r] - beta * KL(pi || ref) = ref * exp(r / beta), normalised."""
    logits = ref_probs.log() + rewards / beta
    return torch.softmax(logits, dim=0)


def run_bandit(gap: float, adv_norm: str, kl_mode: str, beta: float = 0.1, num_templates: int = 20,
               group_size: int = 8, groups_per_step: int = 4, steps: int = 1500, lr: float = 0.05,
               seed: int = 0) -> BanditResult:
    """GRPO on the bandit (uniform reference, template 0 preferred by `gap`); see the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    rewards_by_template = torch.zeros(num_templates, dtype=torch.float64)
    rewards_by_template[0] = gap
    ref_logprobs = torch.full((num_templates,), -math.log(num_templates), dtype=torch.float64)
    theta = torch.zeros(num_templates, dtype=torch.float64, requires_grad=True)  # starts at the reference
    optimizer = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        with torch.no_grad():
            probs = torch.softmax(theta, dim=0)
            samples = torch.multinomial(probs.expand(groups_per_step, -1), group_size, replacement=True, generator=gen)
        logprobs = torch.log_softmax(theta, dim=0)[samples]  # (groups, G): one "token" per sample
        old = logprobs.detach()
        ref = ref_logprobs[samples]
        rewards = rewards_by_template[samples]
        if kl_mode == "seq_reward":
            rewards = rewards - beta * (old - ref)  # the sequence's k1 KL estimate, as a reward penalty
        advantages = grpo_advantages(rewards, adv_norm)
        loss, _ = clipped_policy_loss(logprobs, old, advantages)
        if kl_mode == "token_k3":
            loss = loss + beta * k3_kl(logprobs, ref)
        elif kl_mode != "seq_reward":
            raise ValueError(f"unknown kl_mode {kl_mode!r}")
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    with torch.no_grad():
        probs = torch.softmax(theta, dim=0)
        kl = float((probs * (probs.log() - ref_logprobs)).sum())
        optimum = kl_optimum(ref_logprobs.exp(), rewards_by_template, beta)
    return BanditResult(best_prob=float(probs[0]), optimum_prob=float(optimum[0]), kl=kl)


def main():
    print("bandit: 20 templates, uniform reference, groups of 8, beta 0.1; P(preferred template) at the end")
    print(f"{'gap':>6} | {'optimum':>8} | " + " | ".join(f"{n + '/' + k:>17}" for n in ("group", "none", "batch")
                                                     for k in ("token_k3", "seq_reward")))
    for gap in (0.01, 0.1, 1.0):
        cells = [run_bandit(gap, norm, kl) for norm in ("group", "none", "batch") for kl in ("token_k3", "seq_reward")]
        print(f"{gap:>6} | {cells[0].optimum_prob:>8.3f} | " + " | ".join(f"{c.best_prob:>17.3f}" for c in cells))


if __name__ == "__main__":
    main()
