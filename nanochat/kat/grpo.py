"""
GRPO's maths for the KAT experiment (scripts/grpo.py): the sampling policy's per-token
statistics, the clipped policy-gradient term and the KL estimate to the reference.
Shared policy-gradient pieces (sequence_logprobs, group_advantages) live in nanochat/rl.py.
"""

import torch

from nanochat.rl import group_advantages

# logits alive at once in sampled_token_stats (0.5 GB per fp32 temporary), as in nanochat/lm_loss.py
STATS_CHUNK_LOGITS = 2 ** 27


@torch.no_grad()
def sampled_token_stats(model, prompt_ids_list, completion_ids_list, device, sampled_masks=None,
                        pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    (logprobs, entropy, mask), each (N, C) as sequence_logprobs lays them out: the log-probability
    of each completion token, the entropy (nats) of the model's whole next-token distribution at
    that position, and the mask of counted tokens (entries off the mask are 0). Never builds a
    graph: it is for the sampling policy, whose numbers are constants of the update.

    Unlike sequence_logprobs this needs full distributions, so it projects only the completion
    positions through lm_head, a few rows at a time (at most STATS_CHUNK_LOGITS logits at once).
    """
    if len(prompt_ids_list) != len(completion_ids_list) or not prompt_ids_list:
        raise ValueError(f"need one completion per prompt and at least one pair, got {len(prompt_ids_list)} prompts "
                         f"and {len(completion_ids_list)} completions")
    if any(len(p) == 0 for p in prompt_ids_list):
        raise ValueError("every prompt needs at least one token: the first completion token is predicted from it")
    if sampled_masks is not None and (len(sampled_masks) != len(completion_ids_list) or
                                      any(len(m) != len(c) for m, c in zip(sampled_masks, completion_ids_list))):
        raise ValueError("sampled_masks must hold one mask per completion, each as long as its completion")

    num_rows = len(prompt_ids_list)
    prompt_lens = torch.tensor([len(p) for p in prompt_ids_list])
    completion_lens = torch.tensor([len(c) for c in completion_ids_list])
    longest_completion = int(completion_lens.max())
    width = max(1, int((prompt_lens + completion_lens).max()) - 1)  # inputs predict the next token
    inputs = torch.full((num_rows, width), pad_token_id, dtype=torch.long)
    targets = torch.zeros((num_rows, longest_completion), dtype=torch.long)
    mask = torch.zeros((num_rows, longest_completion), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(zip(prompt_ids_list, completion_ids_list)):
        sequence = list(prompt) + list(completion)
        inputs[row, :len(sequence) - 1] = torch.tensor(sequence[:-1], dtype=torch.long)
        if completion:
            targets[row, :len(completion)] = torch.tensor(completion, dtype=torch.long)
            row_mask = sampled_masks[row] if sampled_masks is not None else [1] * len(completion)
            mask[row, :len(completion)] = torch.tensor(row_mask, dtype=torch.bool)
    inputs, targets, mask = inputs.to(device), targets.to(device), mask.to(device)

    hidden = model.forward_hidden(inputs)  # (N, width, D)
    # right-padded rows: position len(prompt) - 1 + k predicts completion[k]
    positions = (prompt_lens[:, None] - 1 + torch.arange(longest_completion)[None, :]).clamp(max=width - 1).to(device)
    completion_hidden = hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.size(-1)))  # (N, C, D)
    logprobs = torch.zeros((num_rows, longest_completion), dtype=torch.float32, device=device)
    entropy = torch.zeros_like(logprobs)
    rows_per_chunk = max(1, STATS_CHUNK_LOGITS // (max(1, longest_completion) * model.config.vocab_size))
    for start in range(0, num_rows, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        log_p = torch.log_softmax(model.logits_from_hidden(completion_hidden[rows]), dim=-1)  # (n, C, V) fp32
        logprobs[rows] = log_p.gather(-1, targets[rows, :, None]).squeeze(-1)
        entropy[rows] = -(log_p.exp() * log_p).sum(dim=-1)
    return logprobs * mask, entropy * mask, mask


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

ADV_NORMS = ("none", "group", "batch")
KL_MODES = ("seq_reward", "token_k3")


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
