"""
Toy GRPO problems that run in seconds on a CPU with the project's own advantage and loss code:
what the objective's choices do, without a language model in the way.

    python -m nanochat.kat.toy          # the bandit table, then the synthetic sampler control

The bandit: one prompt, K answer templates, a softmax policy over them, a reference policy, and a
reward that prefers one template by a fixed gap (a learned RM's consistent preference). Each
step draws groups of G samples, scores them, and takes one optimizer step of GRPO's loss.

The sampler control: prompts in clusters of known size (so of known density), a policy that
writes a marker with probability sigmoid(shared + per-cluster logit), and a reward for the
marker only in the rarest cluster. Density sampling draws that cluster more often, so its marker
rate must rise faster than under uniform sampling, by about the ratio of the draw probabilities.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from nanochat.kat.density import (PromptSampler, adaptive_tau, center_embeddings, density_weights, knn_cosine,
                                  knn_log_density)
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


# -----------------------------------------------------------------------------
# The synthetic sampler control

CLUSTER_SIZES = (400, 200, 100, 50, 25)  # the last one is the rare cluster that carries the reward
CLUSTER_SPREADS = (0.1, 0.15, 0.2, 0.3, 0.5)  # larger clusters are tighter: denser in embedding space


@dataclass
class SamplerControlResult:
    mode: str  # the prompt sampler: density or uniform
    draw_prob: float  # probability that a draw lands in the rare cluster
    marker_rate: list  # the rare cluster's marker probability after each step (starts near base_rate)


def clustered_prompts(sizes=CLUSTER_SIZES, spreads=CLUSTER_SPREADS, dim: int = 16, seed: int = 0):
    """(unit embeddings (N, dim), cluster of each prompt): clusters of the given sizes and spreads
    around random unit centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    clusters = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[clusters] + np.asarray(spreads)[clusters, None] * rng.normal(size=(len(clusters), dim)) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True), clusters


def prompt_weights(embeddings, k: int = 10, beta: float = 1.0) -> np.ndarray:
    """kat_density's weights: kNN similarities, adaptive kernel, density^-beta, clipped, normalised."""
    train = np.ones(len(embeddings), dtype=bool)
    sims, _ = knn_cosine(center_embeddings(embeddings, train), k)
    return density_weights(knn_log_density(sims, adaptive_tau(sims, train)), train, beta=beta)


def run_sampler_control(mode: str, steps: int = 60, prompts_per_step: int = 32, group_size: int = 8,
                        base_rate: float = 0.1, lr: float = 0.5, beta: float = 1.0, seed: int = 0) -> SamplerControlResult:
    """GRPO (mean-only advantages, clipped loss, SGD) with the given sampler on the clustered prompts."""
    embeddings, clusters = clustered_prompts(seed=seed)
    rare = len(CLUSTER_SIZES) - 1
    ids = [str(i) for i in range(len(clusters))]
    sampler = PromptSampler(ids, prompt_weights(embeddings, beta=beta), seed=seed, mode=mode)
    draw_prob = float(sampler.probs[clusters == rare].sum()) if mode == "density" else float(np.mean(clusters == rare))
    shared = torch.full((1,), math.log(base_rate / (1 - base_rate)), dtype=torch.float64, requires_grad=True)
    per_cluster = torch.zeros(len(CLUSTER_SIZES), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([shared, per_cluster], lr=lr)  # SGD: a step's pull is proportional to the draws
    gen = torch.Generator().manual_seed(seed)
    rates = []
    for step in range(steps):
        drawn = torch.tensor([clusters[int(i)] for i in sampler.sample(prompts_per_step, step)])
        logit = (shared + per_cluster[drawn])[:, None].expand(-1, group_size)
        with torch.no_grad():
            marker = torch.bernoulli(torch.sigmoid(logit), generator=gen)
        logprobs = torch.where(marker.bool(), torch.nn.functional.logsigmoid(logit),
                               torch.nn.functional.logsigmoid(-logit))
        rewards = marker * (drawn == rare)[:, None]  # the planted, prompt-conditional preference
        advantages = grpo_advantages(rewards, "none")
        loss, _ = clipped_policy_loss(logprobs, logprobs.detach(), advantages)
        optimizer.zero_grad()
        (loss.sum() / prompts_per_step).backward()
        optimizer.step()
        rates.append(float(torch.sigmoid(shared + per_cluster[rare]).detach()))
    return SamplerControlResult(mode=mode, draw_prob=draw_prob, marker_rate=rates)


def steps_to_reach(rates, level: float) -> int | None:
    """The first step (1-based) at which the marker rate reached level; None if it never did."""
    return next((step + 1 for step, rate in enumerate(rates) if rate >= level), None)


SPEEDUP_TOLERANCE = (0.5, 1.5)  # the observed speed-up must lie within these multiples of the predicted one
MIN_PREDICTED_SPEEDUP = 1.5  # below it the samplers barely differ and there is no prediction to test


def sampler_control_summary(seeds=(0, 1, 2), steps: int = 120, level: float = 0.3, beta: float = 1.0) -> dict:
    """
    Both samplers over seeds. The dynamics depend only on how often the rare cluster is drawn, so
    reaching a marker rate takes about draw_prob(uniform) / draw_prob(density) as many steps under
    density sampling: the predicted speed-up is the ratio of the draw probabilities. Passed, for the
    predicted reason: the prediction is a real difference, density gets there first in every seed, and
    the observed speed-up lies within SPEEDUP_TOLERANCE of the predicted one.
    """
    runs = {mode: [run_sampler_control(mode, steps=steps, beta=beta, seed=s) for s in seeds]
            for mode in ("density", "uniform")}
    reached = {mode: [steps_to_reach(r.marker_rate, level) for r in rs] for mode, rs in runs.items()}
    draw = {mode: float(np.mean([r.draw_prob for r in rs])) for mode, rs in runs.items()}
    final = {mode: [r.marker_rate[-1] for r in rs] for mode, rs in runs.items()}
    both = [(d, u) for d, u in zip(reached["density"], reached["uniform"]) if d is not None and u is not None]
    observed = float(np.mean([u / d for d, u in both])) if both else float("nan")
    predicted = draw["density"] / draw["uniform"]
    first = all(d is not None and (u is None or d < u) for d, u in zip(reached["density"], reached["uniform"]))
    low, high = SPEEDUP_TOLERANCE
    if predicted < MIN_PREDICTED_SPEEDUP:
        reason = f"the density weights draw the rare cluster only {predicted:.2f}x as often: nothing to predict"
    elif not first:
        reason = "density sampling did not reach the level first in every seed"
    elif not low * predicted <= observed <= high * predicted:
        reason = f"the observed speed-up {observed:.2f}x is not within {low}-{high}x of the predicted {predicted:.2f}x"
    else:
        reason = "density sampling reached the level first in every seed, about as much sooner as predicted"
    return {"steps": steps, "seeds": list(seeds), "level": level, "draw_prob": draw, "steps_to_level": reached,
            "final_rate": final, "predicted_speedup": predicted, "observed_speedup": observed,
            "passed": predicted >= MIN_PREDICTED_SPEEDUP and first and low * predicted <= observed <= high * predicted,
            "reason": reason}


def main():
    print("bandit: 20 templates, uniform reference, groups of 8, beta 0.1; P(preferred template) at the end")
    print(f"{'gap':>6} | {'optimum':>8} | " + " | ".join(f"{n + '/' + k:>17}" for n in ("group", "none", "batch")
                                                     for k in ("token_k3", "seq_reward")))
    for gap in (0.01, 0.1, 1.0):
        cells = [run_bandit(gap, norm, kl) for norm in ("group", "none", "batch") for kl in ("token_k3", "seq_reward")]
        print(f"{gap:>6} | {cells[0].optimum_prob:>8.3f} | " + " | ".join(f"{c.best_prob:>17.3f}" for c in cells))
    summary = sampler_control_summary()
    print(f"\nsampler control: the rare cluster ({CLUSTER_SIZES[-1]} of {sum(CLUSTER_SIZES)} prompts) is drawn with "
          f"p = {summary['draw_prob']['density']:.3f} (density) vs {summary['draw_prob']['uniform']:.3f} (uniform)")
    for mode, reached in summary["steps_to_level"].items():
        print(f"  {mode:>8}: steps to a marker rate of {summary['level']} in the rare cluster, seeds {summary['seeds']}: "
              f"{reached}; rate after {summary['steps']} steps: " + ", ".join(f"{r:.3f}" for r in summary["final_rate"][mode]))
    print(f"  speed-up of density sampling {summary['observed_speedup']:.2f}x (predicted ~{summary['predicted_speedup']:.2f}x); "
          f"{'PASS' if summary['passed'] else 'FAIL'}: {summary['reason']}")


if __name__ == "__main__":
    main()
