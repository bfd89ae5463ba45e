"""Tests for nanochat/rl.py: per-token log-probs of completions (micro-batched and laid out in one
canonical order, or per row) and group-relative advantages."""

import math

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.rl import (completion_batches, completion_logprobs, group_advantages, layout_logprobs, length_sorted_groups,
                         sequence_logprobs)

torch.set_num_threads(1)
VOCAB = 50


@pytest.fixture(scope="module")
def model():
    """Random weights everywhere, so every position attends to (and depends on) its whole prefix."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.size(-1)))
    return model.eval()


PAIRS = [  # (prompt, completion) of different lengths, including a one-token prompt and an empty completion
    ([1, 2, 3, 4, 5], [6, 7, 8]),
    ([9], [10, 11, 12, 13, 14, 15]),
    ([16, 17, 18], []),
    ([19, 20], [21]),
]


def stepwise_logprobs(model, prompt, completion):
    """log p of each completion token from a separate unpadded forward pass over its exact prefix."""
    out = []
    for k, token in enumerate(completion):
        logits = model(torch.tensor([prompt + completion[:k]]))[0, -1]
        out.append(torch.log_softmax(logits.float(), dim=-1)[token].item())
    return out


def test_logprobs_equal_a_step_by_step_computation(model):
    with torch.no_grad():
        logprobs, mask = sequence_logprobs(model, [p for p, _ in PAIRS], [c for _, c in PAIRS], "cpu")
    assert logprobs.shape == mask.shape == (len(PAIRS), 6)
    for row, (prompt, completion) in enumerate(PAIRS):
        assert mask[row].tolist() == [k < len(completion) for k in range(6)]
        expected = stepwise_logprobs(model, prompt, completion)
        assert torch.allclose(logprobs[row, :len(completion)], torch.tensor(expected), atol=1e-5)
        assert (logprobs[row, len(completion):] == 0).all()  # padding is exactly zero, never garbage


def test_padding_never_changes_a_rows_logprobs(model):
    with torch.no_grad():
        together, _ = sequence_logprobs(model, [p for p, _ in PAIRS], [c for _, c in PAIRS], "cpu")
        for row, (prompt, completion) in enumerate(PAIRS):
            alone, _ = sequence_logprobs(model, [prompt], [completion], "cpu", pad_token_id=7)
            assert torch.allclose(together[row, :len(completion)], alone[0], atol=1e-6)
        # a different pad id leaves every real position unchanged
        other_pad, _ = sequence_logprobs(model, [p for p, _ in PAIRS], [c for _, c in PAIRS], "cpu", pad_token_id=33)
    assert torch.allclose(together, other_pad, atol=1e-6)


def test_sampled_masks_drop_forced_tokens_and_gradients_flow(model):
    prompts, completions = [p for p, _ in PAIRS], [c for _, c in PAIRS]
    forced = [[1, 0, 1], [1, 1, 0, 0, 0, 1], [], [1]]
    logprobs, mask = sequence_logprobs(model, prompts, completions, "cpu", sampled_masks=forced)
    assert mask[0, :3].tolist() == [True, False, True] and mask[1, :6].tolist() == [True, True, False, False, False, True]
    assert logprobs[0, 1] == 0 and logprobs[1, 2:5].abs().sum() == 0
    model.zero_grad(set_to_none=True)
    logprobs.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    model.zero_grad(set_to_none=True)


def test_micro_batched_logprobs_and_entropy_match_full_logits(model):
    """Several length-sorted micro-batches (a budget of 12 tokens), tokens in canonical order: each
    counted token's log-prob and entropy equal those of the model's whole next-token distribution
    after its exact prefix; forced tokens are left out; sequence_logprobs agrees."""
    prompts, completions = [p for p, _ in PAIRS], [c for _, c in PAIRS]
    forced = [[1, 0, 1], [1, 1, 0, 0, 0, 1], [], [1]]
    batches, layout = completion_batches(prompts, completions, "cpu", forced, token_budget=12)
    assert len(batches) >= 2 and all(b.inputs.numel() <= 12 or b.inputs.size(0) == 1 for b in batches)
    logprobs, entropy = layout_logprobs(model, batches, layout, entropy=True)
    counted = [(r, k) for r, mask in enumerate(forced) for k, m in enumerate(mask) if m]
    assert list(zip(layout.rows.tolist(), layout.columns.tolist())) == counted  # row by row, forced tokens out
    for t, (row, k) in enumerate(counted):
        prompt, completion = PAIRS[row]
        with torch.no_grad():
            log_p = torch.log_softmax(model(torch.tensor([prompt + completion[:k]]))[0, -1], dim=-1)
        assert logprobs[t].item() == pytest.approx(log_p[completion[k]].item(), abs=1e-5)
        assert entropy[t].item() == pytest.approx(-(log_p.exp() * log_p).sum().item(), abs=1e-5)
    with torch.no_grad():
        per_row, mask = sequence_logprobs(model, prompts, completions, "cpu", sampled_masks=forced)
    assert mask.nonzero().tolist() == [list(c) for c in counted]
    assert torch.allclose(per_row[mask], logprobs, atol=1e-6)
    sums = layout.per_row_sum(logprobs)
    assert torch.allclose(sums, per_row.sum(dim=1), atol=1e-5)


def test_length_sorted_groups_respect_the_budget():
    lengths = [3, 10, 4, 4, 1, 7]
    groups = length_sorted_groups(lengths, token_budget=10)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert groups[0] == [1]  # the longest alone: 2 x 10 > 10
    for group in groups:
        assert [lengths[i] for i in group] == sorted((lengths[i] for i in group), reverse=True)
        assert len(group) == 1 or len(group) * lengths[group[0]] <= 10
    assert length_sorted_groups(lengths, None) == [[1, 5, 2, 3, 0, 4]]


def test_a_batch_without_counted_tokens_still_reaches_every_parameter(model):
    batches, layout = completion_batches([[1, 2]], [[3, 4]], "cpu", [[0, 0]], token_budget=None)
    assert layout.rows.numel() == 0
    values, _ = completion_logprobs(model, batches[0])
    model.zero_grad(set_to_none=True)
    values.sum().backward()
    assert all(p.grad is not None and (p.grad == 0).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_bad_inputs_are_refused(model):
    with pytest.raises(ValueError, match="at least one token"):
        sequence_logprobs(model, [[]], [[1]], "cpu")
    with pytest.raises(ValueError, match="prompts but"):
        sequence_logprobs(model, [[1]], [[1], [2]], "cpu")
    with pytest.raises(ValueError, match="sampled_masks"):
        sequence_logprobs(model, [[1]], [[1, 2]], "cpu", sampled_masks=[[1]])


def test_advantages_are_zero_mean_per_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.2, 0.5, 0.9, 0.4]])
    advantages = group_advantages(rewards)
    assert torch.allclose(advantages.mean(dim=1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(advantages[1], torch.tensor([-0.25, -0.25, -0.25, 0.75]))
    # each row is centred on its own group, not the batch
    assert torch.allclose(advantages[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_std_normalised_advantages_have_unit_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 5.0, 4.0, 10.0]])
    advantages = group_advantages(rewards, use_std=True, eps=0.0)
    assert torch.allclose(advantages.mean(dim=1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(advantages.std(dim=1), torch.ones(2), atol=1e-6)
    expected = (rewards[1] - 5.5) / rewards[1].std()
    assert torch.allclose(advantages[1], expected)


@pytest.mark.parametrize("use_std", [False, True])
def test_a_group_with_identical_rewards_gets_zeros(use_std):
    # 0.1 is not exact in binary: a rounded mean would leave tiny nonzero advantages
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    advantages = group_advantages(rewards, use_std=use_std)
    assert torch.isfinite(advantages).all()
    assert (advantages[:2] == 0).all()
    assert advantages[2, 1] > 0 > advantages[2, 0]


def test_advantages_need_groups_of_two():
    with pytest.raises(ValueError, match="at least 2 samples"):
        group_advantages(torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError, match="shape"):
        group_advantages(torch.tensor([1.0, 0.0]))
