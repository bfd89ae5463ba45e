"""
Pieces every policy-gradient stage shares (scripts/chat_rl.py on GSM8K, the KAT GRPO script):

- completion_batches / completion_logprobs: the log-probability the model gives each counted
  completion token, computed in length-sorted micro-batches of at most a token budget, with
  lm_head applied only where a completion token is predicted;
- sequence_logprobs: the same for a few rows at once, laid out (rows, longest completion);
- group_advantages: each sample's reward relative to the other samples of its prompt.

The loss built from them is the script's choice (plain REINFORCE for chat_rl, a clipped
ratio with a KL term for GRPO); both normalise by the number of counted tokens.
"""

from dataclasses import dataclass

import torch

from nanochat.gpt import LOGIT_SOFTCAP
from nanochat.lm_loss import chunked_softcap_cross_entropy

ENTROPY_CHUNK_LOGITS = 2 ** 27  # logits alive at once for the entropy (0.5 GB per fp32 temporary)


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # log-probs in fp32 at least (fp64 stays fp64: exact tests)


@dataclass
class CompletionBatch:
    """Some rows (prompt + completion), right-padded into one input, and where their counted tokens sit."""
    inputs: torch.Tensor  # (B, W) token ids; position t predicts token t + 1
    positions: torch.Tensor  # (n,) index into the flattened (B * W) outputs of the position predicting each token
    targets: torch.Tensor  # (n,) the counted tokens
    token_index: torch.Tensor  # (n,) each token's place in the canonical order (see TokenLayout)


@dataclass
class TokenLayout:
    """
    The counted completion tokens of N rows in canonical order: row by row, position by position,
    tokens the engine forced (sampled mask 0) left out. Every per-token tensor of a step (log-probs
    of policy, reference, sampling policy) is 1-D in this order, whatever the micro-batching.
    """
    rows: torch.Tensor  # (T,) the row of each token
    columns: torch.Tensor  # (T,) its position within its completion
    num_rows: int

    def per_row_sum(self, values: torch.Tensor) -> torch.Tensor:
        """(num_rows,) sums of per-token values over each row's tokens, in the values' dtype."""
        return torch.zeros(self.num_rows, dtype=values.dtype, device=values.device).index_add_(0, self.rows, values)


def _check_rows(prompt_ids_list, completion_ids_list, sampled_masks):
    if len(prompt_ids_list) != len(completion_ids_list):
        raise ValueError(f"{len(prompt_ids_list)} prompts but {len(completion_ids_list)} completions")
    if not prompt_ids_list:
        raise ValueError("need at least one (prompt, completion) pair")
    if any(len(p) == 0 for p in prompt_ids_list):
        raise ValueError("every prompt needs at least one token: the first completion token is predicted from it")
    if sampled_masks is not None and (len(sampled_masks) != len(completion_ids_list) or
                                      any(len(m) != len(c) for m, c in zip(sampled_masks, completion_ids_list))):
        raise ValueError("sampled_masks must hold one mask per completion, each as long as its completion")


def length_sorted_groups(lengths: list[int], token_budget: int | None) -> list[list[int]]:
    """
    Indices grouped for padded batches, longest first: each group holds as many as fit
    size x (its longest) <= token_budget (one longer than the budget goes alone; None: one group).
    Sorting by length keeps the padding small, whatever order the rows come in.
    """
    groups, current = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if current and token_budget is not None and (len(current) + 1) * lengths[current[0]] > token_budget:
            groups.append(current)
            current = []
        current.append(i)
    return groups + [current] if current else groups


def completion_batches(prompt_ids_list, completion_ids_list, device, sampled_masks=None, token_budget: int | None = None,
                       pad_token_id: int = 0) -> tuple[list[CompletionBatch], TokenLayout]:
    """
    The rows in micro-batches of at most token_budget tokens with padding (length_sorted_groups),
    and the layout of their counted tokens. The tensors are on device.
    """
    _check_rows(prompt_ids_list, completion_ids_list, sampled_masks)
    masks = sampled_masks if sampled_masks is not None else [[1] * len(c) for c in completion_ids_list]
    counted = [[k for k, m in enumerate(mask) if m] for mask in masks]
    first_token = [0]  # canonical index of each row's first counted token
    for columns in counted:
        first_token.append(first_token[-1] + len(columns))
    layout = TokenLayout(rows=torch.tensor([r for r, cols in enumerate(counted) for _ in cols], dtype=torch.long),
                         columns=torch.tensor([k for cols in counted for k in cols], dtype=torch.long),
                         num_rows=len(counted))

    widths = [max(1, len(p) + len(c) - 1) for p, c in zip(prompt_ids_list, completion_ids_list)]
    batches = []
    for rows in length_sorted_groups(widths, token_budget):
        width = widths[rows[0]]
        inputs = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        positions, targets, token_index = [], [], []
        for b, row in enumerate(rows):
            prompt, completion = prompt_ids_list[row], completion_ids_list[row]
            sequence = list(prompt) + list(completion)
            inputs[b, :len(sequence) - 1] = torch.tensor(sequence[:-1], dtype=torch.long)
            # position len(prompt) - 1 + k of the row predicts completion[k]
            positions.extend(b * width + len(prompt) - 1 + k for k in counted[row])
            targets.extend(completion[k] for k in counted[row])
            token_index.extend(range(first_token[row], first_token[row + 1]))
        batches.append(CompletionBatch(inputs=inputs.to(device), positions=torch.tensor(positions, dtype=torch.long).to(device),
                                       targets=torch.tensor(targets, dtype=torch.long).to(device),
                                       token_index=torch.tensor(token_index, dtype=torch.long).to(device)))
    layout.rows, layout.columns = layout.rows.to(device), layout.columns.to(device)
    return batches, layout


def completion_logprobs(model, batch: CompletionBatch, entropy_at=None, forward_hidden=None):
    """
    (logprobs, entropy): (n,) fp32 log p(target | its prefix) of the batch's counted tokens and,
    when entropy_at picks some of them (an index tensor, or slice(None) for all), the entropy
    (nats) of the model's whole next-token distribution there (never part of the graph; else None). One forward pass;
    lm_head runs only at the n predicting positions, through the model's own chunked loss, so no
    (n, vocab) logits outlive a chunk. Gradients flow unless the caller disables them.
    forward_hidden: model.forward_hidden or a compiled version of it (the default: the model's own).
    """
    hidden = (forward_hidden or model.forward_hidden)(batch.inputs)
    hidden = hidden.flatten(0, 1).index_select(0, batch.positions)  # (n, D)
    if hidden.size(0) == 0:  # no counted token: still a graph through every parameter (DistAdamW needs a grad for each)
        empty = torch.zeros(0, dtype=_float_dtype(model.lm_head.weight.dtype), device=hidden.device)
        tied = empty + 0.0 * (hidden.sum() + model.lm_head.weight.sum()).to(empty.dtype)
        return tied, (empty if entropy_at is not None else None)
    logprobs = -chunked_softcap_cross_entropy(hidden, model.lm_head.weight, batch.targets, LOGIT_SOFTCAP, "none")
    logprobs = logprobs.to(_float_dtype(logprobs.dtype))
    return logprobs, (token_entropy(model, hidden.detach()[entropy_at]) if entropy_at is not None else None)


@torch.no_grad()
def token_entropy(model, hidden: torch.Tensor) -> torch.Tensor:
    """(n,) entropy (fp32, fp64 for an fp64 model) of the model's next-token distribution at hidden states (n, D)."""
    out = torch.empty(hidden.size(0), dtype=_float_dtype(model.lm_head.weight.dtype), device=hidden.device)
    rows = max(1, ENTROPY_CHUNK_LOGITS // model.config.vocab_size)
    for start in range(0, hidden.size(0), rows):
        logits = model.lm_head(hidden[start:start + rows])
        logits = LOGIT_SOFTCAP * torch.tanh(logits.to(_float_dtype(logits.dtype)) / LOGIT_SOFTCAP)  # as logits_from_hidden
        log_p = torch.log_softmax(logits, dim=-1)
        out[start:start + rows] = -(log_p.exp() * log_p).sum(dim=-1)
    return out


def layout_logprobs(model, batches: list[CompletionBatch], layout: TokenLayout, entropy: bool = False):
    """completion_logprobs over every batch, gathered into the canonical order (T,); no graph is kept."""
    num_tokens, device, dtype = layout.rows.numel(), layout.rows.device, _float_dtype(model.lm_head.weight.dtype)
    logprobs = torch.zeros(num_tokens, dtype=dtype, device=device)
    entropies = torch.zeros(num_tokens, dtype=dtype, device=device) if entropy else None
    with torch.no_grad():
        for batch in batches:
            values, batch_entropy = completion_logprobs(model, batch, slice(None) if entropy else None)
            logprobs[batch.token_index] = values
            if entropy:
                entropies[batch.token_index] = batch_entropy
    return logprobs, entropies


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
    Gradients flow unless the caller disables them (e.g. for a reference model).
    """
    (batch,), layout = completion_batches(prompt_ids_list, completion_ids_list, device, sampled_masks,
                                          token_budget=None, pad_token_id=pad_token_id)
    values, _ = completion_logprobs(model, batch)
    longest_completion = max(len(c) for c in completion_ids_list)
    flat = values.new_zeros(len(completion_ids_list) * longest_completion)
    cells = layout.rows[batch.token_index] * longest_completion + layout.columns[batch.token_index]
    logprobs = flat.index_put((cells,), values).view(len(completion_ids_list), longest_completion)
    mask = torch.zeros(len(completion_ids_list) * longest_completion, dtype=torch.bool, device=values.device)
    mask[cells] = True
    return logprobs, mask.view_as(logprobs)


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
    rewards = rewards.to(_float_dtype(rewards.dtype))
    # rounding in the mean would leave a constant group with tiny nonzero advantages (which the
    # std division then inflates), so such groups are set to 0 outright
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    centred = (rewards - rewards.mean(dim=1, keepdim=True)).masked_fill(constant, 0.0)
    if not use_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True).masked_fill(constant, 0.0) + eps)
