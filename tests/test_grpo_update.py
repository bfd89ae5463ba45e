"""
The GRPO update (nanochat/kat/grpo.py: prepare_update + gradient_pass, micro-batched by a token
budget, lm_head only at completion positions, the ratio's denominator detached when the policy has
not moved) against a straightforward implementation of the same objective: one row at a time,
full logits, the sampling policy's log-probs from a separate pass. Every parameter's gradient and
every logged sum must agree, for each --adv_norm and --kl, in float64 on a tiny random GPT.
"""

import math

import pytest
import torch

from nanochat.gpt import GPT, LOGIT_SOFTCAP, GPTConfig
from nanochat.kat.grpo import ADV_NORMS, GRADIENT_PASS_SUMS, KL_MODES, Objective, gradient_pass, prepare_update

torch.set_num_threads(1)
VOCAB, GROUP = 40, 4


def random_gpt(seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.size(-1)))
    return model.double()


def make_rollouts():
    """3 prompts x 4 samples of mixed lengths: an empty completion, forced (uncounted) tokens, a constant-reward group."""
    gen = torch.Generator().manual_seed(0)
    prompts, completions, masks = [], [], []
    for p in range(3):
        prompt = torch.randint(0, VOCAB, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        for s in range(GROUP):
            length = 0 if (p, s) == (1, 2) else int(torch.randint(1, 12, (1,), generator=gen))
            completions.append(torch.randint(0, VOCAB, (length,), generator=gen).tolist())
            masks.append([0 if (p == 0 and k in (1, 2)) else 1 for k in range(length)])
            prompts.append(prompt)
    scores = torch.randn(3 * GROUP, generator=gen, dtype=torch.float64)
    scores[2 * GROUP:] = 0.7  # the third group: all alike
    finished = torch.tensor([s % 3 != 1 for s in range(3 * GROUP)])
    finished[2 * GROUP:] = True  # ... and none truncated, so with --kl=token_k3 its advantages are 0
    return prompts, completions, masks, scores, finished


def row_logprobs(model, prompt, completion, mask):
    """log p of each counted token of one completion, from the full logits of one unpadded row."""
    if not completion:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    hidden = model.forward_hidden(torch.tensor([prompt + completion[:-1]]))[0, len(prompt) - 1:]
    logits = LOGIT_SOFTCAP * torch.tanh(model.lm_head(hidden) / LOGIT_SOFTCAP)  # in float64 (forward() returns fp32)
    log_p = torch.log_softmax(logits, dim=-1)
    picked = log_p.gather(1, torch.tensor(completion)[:, None]).squeeze(1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    keep = torch.tensor(mask, dtype=torch.bool)
    return picked[keep], entropy[keep].detach()


def straightforward_gradients(model, reference, prompts, completions, masks, scores, finished, objective):
    """The objective written out: returns {name: sum} in GRADIENT_PASS_SUMS order; gradients land in model."""
    rows = range(len(prompts))
    with torch.no_grad():
        ref = [row_logprobs(reference, prompts[r], completions[r], masks[r])[0] for r in rows]
        old = [row_logprobs(model, prompts[r], completions[r], masks[r])[0] for r in rows]
    rewards = scores - objective.truncation_penalty * (~finished).double()
    if objective.kl == "seq_reward":
        rewards = rewards - objective.beta * torch.stack([(o - f).sum() for o, f in zip(old, ref)])
    groups = rewards.view(-1, GROUP)
    centred = groups - groups.mean(dim=1, keepdim=True)
    constant = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    centred = torch.where(constant, torch.zeros_like(centred), centred)
    if objective.adv_norm == "group":
        advantages = centred / (torch.where(constant, torch.zeros_like(centred), groups.std(dim=1, keepdim=True)) + 1e-6)
    elif objective.adv_norm == "batch":
        advantages = centred / (centred.flatten().var(unbiased=False).sqrt() + 1e-6)
    else:
        advantages = centred
    advantages = advantages.flatten()
    num_tokens = sum(len(o) for o in old)
    total = torch.zeros((), dtype=torch.float64)
    sums = dict.fromkeys(GRADIENT_PASS_SUMS, 0.0)
    for r in rows:
        logprobs, entropy = row_logprobs(model, prompts[r], completions[r], masks[r])
        ratio = torch.exp(logprobs - old[r])
        eps = objective.clip_eps
        pg = -torch.minimum(ratio * advantages[r], ratio.clamp(1 - eps, 1 + eps) * advantages[r])
        d = ref[r] - logprobs
        k3 = torch.exp(d) - d - 1
        total = total + (pg + (objective.beta * k3 if objective.kl == "token_k3" else 0.0)).sum()
        sums["pg"] += pg.sum().item()
        sums["k3"] += k3.sum().item()
        sums["log_ratio"] += (logprobs - ref[r]).sum().item()
        sums["entropy"] += entropy.sum().item()
    (total / num_tokens).backward()
    return sums, rewards


@pytest.mark.parametrize("adv_norm", ADV_NORMS)
@pytest.mark.parametrize("kl", KL_MODES)
@pytest.mark.parametrize("inner_epochs", [1, 2])
def test_update_gradients_equal_the_straightforward_objective(adv_norm, kl, inner_epochs):
    model, reference = random_gpt(1), random_gpt(2)
    prompts, completions, masks, scores, finished = make_rollouts()
    objective = Objective(adv_norm=adv_norm, kl=kl, beta=0.3, clip_eps=0.2, truncation_penalty=0.5)

    want, want_rewards = straightforward_gradients(model, reference, prompts, completions, masks, scores, finished, objective)
    want_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    # a budget of 40 tokens: several micro-batches, rows regrouped by length
    plan = prepare_update(model, reference, prompts, completions, masks, scores, finished, GROUP, objective,
                          update_tokens=40, nograd_tokens=80, need_sampling_logprobs=inner_epochs > 1)
    assert len(plan.batches) > 2
    old = plan.sampling_logprobs if inner_epochs > 1 else None  # the first epoch of either: the same gradient
    got = dict(zip(GRADIENT_PASS_SUMS, gradient_pass(model, plan, objective, old, entropy_every=1).tolist()))

    torch.testing.assert_close(plan.rewards, want_rewards, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, want_grads[name], rtol=1e-8, atol=1e-12, msg=name)
    assert got["clipped"] == 0  # the ratio is 1 before any step
    assert got["entropy_tokens"] == sum(sum(m) for m in masks)
    for key in ("pg", "k3", "log_ratio", "entropy"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert abs(want["pg"]) > 1e-3 and want["k3"] > 1e-3  # the comparison is not of zeros
    if kl == "token_k3" and adv_norm != "none":
        assert plan.advantages[2 * GROUP:].abs().max() == 0  # the constant group carries no signal


def test_the_kl_term_moves_the_gradient_only_where_it_should():
    """With beta 0 the two KL modes are the same objective; with beta > 0 they differ."""
    model, reference = random_gpt(1), random_gpt(2)
    prompts, completions, masks, scores, finished = make_rollouts()
    grads = {}
    for kl in KL_MODES:
        for beta in (0.0, 0.3):
            objective = Objective(adv_norm="none", kl=kl, beta=beta, clip_eps=0.2, truncation_penalty=0.5)
            plan = prepare_update(model, reference, prompts, completions, masks, scores, finished, GROUP, objective,
                                  update_tokens=40, nograd_tokens=80, need_sampling_logprobs=False)
            gradient_pass(model, plan, objective, None)
            grads[kl, beta] = torch.cat([p.grad.flatten() for p in model.parameters()])
            model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads["seq_reward", 0.0], grads["token_k3", 0.0], rtol=1e-10, atol=1e-12)
    assert (grads["seq_reward", 0.3] - grads["token_k3", 0.3]).norm() > 1e-3 * grads["token_k3", 0.3].norm()


def test_entropy_is_measured_at_every_fourth_position_of_each_completion():
    model, reference = random_gpt(1), random_gpt(2)
    prompts, completions, masks, scores, finished = make_rollouts()
    objective = Objective(adv_norm="none", kl="seq_reward", beta=0.3, clip_eps=0.2, truncation_penalty=0.5)
    plan = prepare_update(model, reference, prompts, completions, masks, scores, finished, GROUP, objective,
                          update_tokens=40, nograd_tokens=80, need_sampling_logprobs=False)
    got = dict(zip(GRADIENT_PASS_SUMS, gradient_pass(model, plan, objective, None).tolist()))  # the default: every 4th
    entropy, positions = [], []
    with torch.no_grad():  # every counted token's entropy and position, row by row
        for p, c, m in zip(prompts, completions, masks):
            entropy.append(row_logprobs(model, p, c, m)[1])
            positions += [k for k, counted in enumerate(m) if counted]
    entropy, positions = torch.cat(entropy), torch.tensor(positions)
    sampled = positions % 4 == 0
    assert got["entropy_tokens"] == sampled.sum().item() and 0 < sampled.sum() < len(sampled)
    assert got["entropy"] == pytest.approx(entropy[sampled].sum().item(), rel=1e-9)
