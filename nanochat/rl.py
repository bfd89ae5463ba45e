"""
Pieces every policy-gradient stage shares (scripts/chat_rl.py on GSM8K, the KAT GRPO script):

- sequence_logprobs: the log-probability the model gives each sampled completion token, with
  a mask of the tokens that count, for a batch of (prompt, completion) pairs of any lengths;
- group_advantages: each sample's reward relative to the other samples of its prompt.

The loss built from them is the script's choice (plain REINFORCE for chat_rl, a clipped
ratio with a KL term for GRPO); both normalise by the number of counted tokens.
"""

import torch


def sequence_logprobs(model, prompt_ids_list, completion_ids_list, device, sampled_masks=None,
                      pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Per-token log-probabilities of completions given their prompts, in one forward pass.

    prompt_ids_list, completion_ids_list: N lists of token ids (a prompt needs at least one
    token; a completion may be empty). sampled_masks: optional N lists as long as the
    completions, 0 for tokens the policy did not choose (the engine's forced calculator
    output), which are then left out of the mask.

    Returns (logprobs, mask), both (N, C) with C the longest completion: logprobs[i, k] is
    log p(completion_i[k] | prompt_i, completion_i[:k]) in fp32, 0 where mask[i, k] is False.
    Rows are right-padded, so with causal attention padding never reaches a real position.
    The cross-entropy runs through the model's own (chunked) loss, so no (N, T, vocab)
    logits are held. Gradients flow unless the caller disables them (e.g. for a reference model).
    """
    if len(prompt_ids_list) != len(completion_ids_list):
        raise ValueError(f"{len(prompt_ids_list)} prompts but {len(completion_ids_list)} completions")
    if not prompt_ids_list:
        raise ValueError("sequence_logprobs needs at least one (prompt, completion) pair")
    if any(len(p) == 0 for p in prompt_ids_list):
        raise ValueError("every prompt needs at least one token: the first completion token is predicted from it")
    if sampled_masks is not None:
        if len(sampled_masks) != len(completion_ids_list) or \
                any(len(m) != len(c) for m, c in zip(sampled_masks, completion_ids_list)):
            raise ValueError("sampled_masks must hold one mask per completion, each as long as its completion")

    num_rows = len(prompt_ids_list)
    prompt_lens = [len(p) for p in prompt_ids_list]
    completion_lens = [len(c) for c in completion_ids_list]
    width = max(p + c for p, c in zip(prompt_lens, completion_lens)) - 1  # inputs predict the next token
    longest_completion = max(completion_lens)
    inputs = torch.full((num_rows, max(width, 1)), pad_token_id, dtype=torch.long)
    targets = torch.full((num_rows, max(width, 1)), -1, dtype=torch.long)  # -1: not scored
    for row, (prompt, completion) in enumerate(zip(prompt_ids_list, completion_ids_list)):
        sequence = list(prompt) + list(completion)
        inputs[row, :len(sequence) - 1] = torch.tensor(sequence[:-1], dtype=torch.long)
        start = len(prompt) - 1  # the position whose output predicts completion[0]
        if completion:
            targets[row, start:start + len(completion)] = torch.tensor(completion, dtype=torch.long)
    inputs, targets = inputs.to(device), targets.to(device)

    token_nll = model(inputs, targets, loss_reduction="none")  # (N, width), 0 where target is -1
    offsets = torch.arange(longest_completion, device=device)
    positions = torch.tensor(prompt_lens, device=device)[:, None] - 1 + offsets[None, :]
    mask = offsets[None, :] < torch.tensor(completion_lens, device=device)[:, None]
    if sampled_masks is not None:
        sampled = torch.zeros(num_rows, longest_completion, dtype=torch.bool)
        for row, row_mask in enumerate(sampled_masks):
            sampled[row, :len(row_mask)] = torch.tensor(row_mask, dtype=torch.bool)
        mask = mask & sampled.to(device)
    logprobs = -token_nll.float().gather(1, positions.clamp(max=token_nll.size(1) - 1))
    return logprobs * mask, mask


def group_advantages(rewards: torch.Tensor, use_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """
    rewards (P, G): G samples for each of P prompts. Returns (P, G) advantages: the reward
    minus its group's mean (nanochat's chat_rl), divided by the group's standard deviation
    (+ eps) when use_std (GRPO's z-score; unbiased std, as TRL computes it). A group whose
    samples all got the same reward carries no signal about which is better: its advantages
    are exactly 0, never NaN.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (prompts, samples per prompt), got shape {tuple(rewards.shape)}")
    if rewards.size(1) < 2:
        raise ValueError(f"group-relative advantages need at least 2 samples per prompt, got {rewards.size(1)}")
    rewards = rewards.float()
    # rounding in the mean would leave a constant group with tiny nonzero advantages (which the
    # std division then inflates), so such groups are set to 0 outright
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    centred = (rewards - rewards.mean(dim=1, keepdim=True)).masked_fill(constant, 0.0)
    if not use_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True).masked_fill(constant, 0.0) + eps)
