"""
GRPO's maths for the KAT experiment (scripts/grpo.py): the objective's choices, the step's
rewards and advantages, and the gradient pass.

    objective = Objective(adv_norm="none", kl="seq_reward", beta=0.1, clip_eps=0.2, truncation_penalty=1.0)
    plan = prepare_update(model, reference, prompts, completions, masks, scores, finished, 8, objective, ...)
    stats = gradient_pass(model, plan, objective, old_logprobs=None)     # then clip and step

--kl=token_k3 adds beta * k3 per token to the loss: an estimate of KL(pi || ref) whose gradient
on-policy is that of KL(ref || pi). --kl=seq_reward subtracts beta * sum_t (log pi - log ref) (k1)
from each completion's reward: the REINFORCE gradient of KL(pi || ref), optimum ref * exp(r / beta).
Shared policy-gradient pieces (token layout, log-probs, group_advantages) live in nanochat/rl.py.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from nanochat.rl import CompletionBatch, TokenLayout, completion_batches, completion_logprobs, group_advantages, \
    layout_logprobs

ADV_NORMS = ("none", "group", "batch")
KL_MODES = ("seq_reward", "token_k3")


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        clip_eps: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """
    PPO's clipped surrogate per token, as a loss: -min(r * A, clip(r, 1 - eps, 1 + eps) * A) with
    r = exp(logprobs - old_logprobs), the importance ratio against the policy that sampled the
    tokens. advantages broadcast against the logprobs ((N, 1) for one advantage per sequence).
    Returns (loss, clipped): clipped marks the tokens where the clipped term is the smaller one,
    i.e. the update already moved r past 1 + eps for A > 0 (or below 1 - eps for A < 0); such a
    token passes no gradient.
    """
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """
    Per-token estimate of KL(policy || reference) at tokens the policy sampled (Schulman's "k3"):
    exp(d) - d - 1 with d = ref_logprobs - logprobs. Never negative (e^d >= 1 + d), exactly 0
    where the two agree, and unbiased: under the policy E[exp(d)] = 1, so E[k3] = E[-d] = KL.
    Used as a loss (--kl=token_k3), its gradient on the policy's own samples is
    E_pi[(1 - ref/pi) grad log pi] = -E_ref[grad log pi], the gradient of KL(ref || pi), not of
    KL(pi || ref) (Tang & Munos 2025). Soft-capped logits bound |d| by ~30 + ln(vocab).
    """
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


# -----------------------------------------------------------------------------
# The objective's choices (scripts/grpo.py --adv_norm, --kl): how advantages are scaled, and
# where the KL to the reference enters

def grpo_advantages(rewards: torch.Tensor, norm: str, batch_moments=None, eps: float = 1e-6) -> torch.Tensor:
    """
    Advantages (P, G) from rewards (P, G), each centred on its group's mean, then scaled by
    - "none": nothing (Dr. GRPO, arXiv:2503.20783): a consistent but small reward gap stays small;
    - "group": the group's std (DeepSeekMath's GRPO): any consistent gap is blown up to ~1 as a
      group narrows, whatever its size, which drives the policy onto one answer;
    - "batch": one std over the whole step's centred rewards (all ranks: batch_moments(sum, sum_sq,
      count) reduces them), so groups keep their relative scale.
    A group whose rewards are all equal gets 0.
    """
    if norm not in ADV_NORMS:
        raise ValueError(f"advantage normalisation must be one of {ADV_NORMS}, got {norm!r}")
    if norm == "group":
        return group_advantages(rewards, use_std=True, eps=eps)
    centred = group_advantages(rewards, use_std=False)
    if norm == "none":
        return centred
    moments = torch.stack([centred.sum(), centred.square().sum(), torch.tensor(float(centred.numel()),
                                                                              device=centred.device)]).double()
    total, total_sq, count = (batch_moments(moments) if batch_moments is not None else moments).tolist()
    variance = max(total_sq / count - (total / count) ** 2, 0.0)
    return centred / (variance ** 0.5 + eps)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """
    Per-sequence sum over sampled tokens of log pi - log ref (N,): the "k1" estimate of the
    sequence's KL(pi || ref), unbiased under pi. As a reward penalty (--kl=seq_reward) its
    policy gradient is the gradient of KL(pi || ref), the objective whose optimum is
    pi* ~ ref * exp(reward / beta) (the usual RLHF KL-regularised one).
    """
    return ((logprobs - ref_logprobs) * mask).sum(dim=-1)


@dataclass(frozen=True)
class Objective:
    """What a GRPO step optimises: scripts/grpo.py's --adv_norm, --kl, --beta, --clip_eps, --truncation_penalty."""
    adv_norm: str
    kl: str
    beta: float
    clip_eps: float
    truncation_penalty: float

    def __post_init__(self):
        if self.adv_norm not in ADV_NORMS or self.kl not in KL_MODES:
            raise ValueError(f"need adv_norm in {ADV_NORMS} and kl in {KL_MODES}, got {self.adv_norm!r}, {self.kl!r}")
        if self.beta < 0 or self.clip_eps <= 0 or self.truncation_penalty < 0:
            raise ValueError(f"need beta >= 0, clip_eps > 0, truncation_penalty >= 0; got {self}")


def step_rewards(scores: torch.Tensor, finished: torch.Tensor, objective: Objective,
                 sequence_kl: torch.Tensor | None) -> torch.Tensor:
    """
    What the advantages are computed from (R,): the RM score, minus truncation_penalty where the
    completion was cut at max_new_tokens (it was scored as if it ended there), minus beta times
    the sampling policy's sequence KL (k1, sum over tokens of log pi - log ref) with --kl=seq_reward.
    """
    rewards = scores.to(torch.promote_types(scores.dtype, torch.float32))
    rewards = rewards - objective.truncation_penalty * (~finished).to(rewards.dtype)
    if objective.kl == "seq_reward":
        if sequence_kl is None:
            raise ValueError("--kl=seq_reward needs the sampling policy's sequence KL")
        rewards = rewards - objective.beta * sequence_kl
    return rewards


# -----------------------------------------------------------------------------
# One step's update: everything the gradient passes need, then the passes

@dataclass
class UpdatePlan:
    """One step's rollouts ready for the gradient passes (all per-token tensors in layout's order)."""
    batches: list[CompletionBatch]  # micro-batches of the gradient pass
    layout: TokenLayout
    ref_logprobs: torch.Tensor  # (T,) the frozen reference's
    sampling_logprobs: torch.Tensor | None  # (T,) the sampling policy's, when a no-grad pass computed them
    rewards: torch.Tensor  # (R,) what the advantages were computed from: score - truncation penalty [- beta * KL]
    advantages: torch.Tensor  # (R,)
    loss_scale: float  # world_size / counted tokens over all ranks: the loss is a per-token mean over the step


def _identity(tensor):
    return tensor


def prepare_update(model, reference, prompts, completions, masks, scores: torch.Tensor, finished: torch.Tensor,
                   group_size: int, objective: Objective, *, update_tokens: int, nograd_tokens: int,
                   need_sampling_logprobs: bool, autocast=None, all_reduce=_identity, world_size: int = 1) -> UpdatePlan:
    """
    rows prompt-major (group_size completions per prompt); scores (R,) from the reward model,
    finished (R,) bool. One no-grad pass each for the reference and (when need_sampling_logprobs,
    or --kl=seq_reward needs them for the reward) the sampling policy, in batches of nograd_tokens;
    then rewards and advantages. all_reduce sums a tensor over ranks in place and returns it.
    """
    autocast = autocast or nullcontext()
    device = scores.device
    batches, layout = completion_batches(prompts, completions, device, masks, token_budget=update_tokens)
    nograd_batches, _ = completion_batches(prompts, completions, device, masks, token_budget=nograd_tokens)
    with autocast:
        ref_logprobs, _ = layout_logprobs(reference, nograd_batches, layout)
        sampling_logprobs = None
        if need_sampling_logprobs or objective.kl == "seq_reward":
            sampling_logprobs, _ = layout_logprobs(model, nograd_batches, layout)
    sequence_kl = layout.per_row_sum(sampling_logprobs - ref_logprobs) if sampling_logprobs is not None else None
    rewards = step_rewards(scores, finished, objective, sequence_kl)
    advantages = grpo_advantages(rewards.view(-1, group_size), objective.adv_norm, batch_moments=all_reduce).flatten()
    num_tokens = all_reduce(torch.tensor(float(layout.rows.numel()), dtype=torch.float64, device=device)).item()
    # each rank's gradient is a sum over its tokens / the step's token count; the distributed
    # optimizer averages over ranks, hence the factor world_size
    return UpdatePlan(batches=batches, layout=layout, ref_logprobs=ref_logprobs, sampling_logprobs=sampling_logprobs,
                      rewards=rewards, advantages=advantages, loss_scale=world_size / max(num_tokens, 1.0))


# what gradient_pass returns, summed over tokens: the loss terms first, then what it measures
GRADIENT_PASS_SUMS = ("pg", "k3", "clipped", "log_ratio", "entropy", "entropy_tokens")
# the entropy is measured at positions 0, 4, 8, ... of every completion: a systematic sample over
# rows and positions, the same however rows are batched or split across ranks, that costs a
# quarter of a full extra lm_head product
ENTROPY_SAMPLE_EVERY = 4


def gradient_pass(model, plan: UpdatePlan, objective: Objective, old_logprobs: torch.Tensor | None,
                  entropy_every: int = ENTROPY_SAMPLE_EVERY, autocast=None, forward_hidden=None) -> torch.Tensor:
    """
    Accumulate into .grad the gradient of the step's loss: the mean over every counted token of
    every rank of [-min(r A, clip(r, 1 - eps, 1 + eps) A) + (beta * k3 with --kl=token_k3)],
    r = pi / pi_old (token-level, as DAPO and chat_rl: long answers are not down-weighted).
    old_logprobs None: the policy has not moved since sampling, so pi_old is pi itself, detached
    (r is exactly 1). Returns float64 sums over this rank's tokens, in GRADIENT_PASS_SUMS order:
    the policy-gradient term, k3, clipped tokens, log pi - log ref, and the policy's entropy at
    completion positions 0, k, 2k, ... (k = entropy_every; 0: none) with the number of those tokens.
    forward_hidden: a compiled model.forward_hidden to use instead of the model's own.
    """
    autocast = autocast or nullcontext()
    sums = torch.zeros(len(GRADIENT_PASS_SUMS), dtype=torch.float64, device=plan.ref_logprobs.device)
    for batch in plan.batches:
        entropy_at = None
        if entropy_every:
            entropy_at = torch.nonzero(plan.layout.columns[batch.token_index] % entropy_every == 0).squeeze(1)
        with autocast:
            logprobs, entropy = completion_logprobs(model, batch, entropy_at, forward_hidden)
        old = logprobs.detach() if old_logprobs is None else old_logprobs[batch.token_index]
        ref = plan.ref_logprobs[batch.token_index]
        advantages = plan.advantages[plan.layout.rows[batch.token_index]]
        pg, clipped = clipped_policy_loss(logprobs, old, advantages, objective.clip_eps)
        k3 = k3_kl(logprobs, ref)
        per_token = pg + objective.beta * k3 if objective.kl == "token_k3" else pg
        (per_token.sum() * plan.loss_scale).backward()
        entropy = entropy if entropy is not None else logprobs.new_zeros(0)
        sums += torch.stack([pg.detach().sum(), k3.detach().sum(), clipped.sum(), (logprobs.detach() - ref).sum(),
                             entropy.sum(), torch.tensor(entropy.numel(), device=sums.device)]).double()
    return sums
