"""nanochat/fp8.py: fp8 matmuls close to the bf16 ones, gradients included, and a model that still learns."""

import copy

import pytest
import torch

from nanochat.fp8 import E4M3, Fp8Linear, to_fp8, use_fp8
from nanochat.gpt import GPT, config_from_depth


def test_to_fp8_uses_the_whole_range_and_round_trips():
    t = torch.tensor([[0.5, -2.0], [0.001, 1.0]])
    t8, inv = to_fp8(t, E4M3)
    assert t8.dtype == E4M3 and t8.float().abs().max() == torch.finfo(E4M3).max
    torch.testing.assert_close(t8.float() * inv, t, rtol=0.07, atol=1e-3)  # e4m3 keeps 3 mantissa bits
    zeros8, zeros_inv = to_fp8(torch.zeros(2, 2), E4M3)
    assert torch.isfinite(zeros_inv) and (zeros8.float() == 0).all()


def test_fp8_linear_matches_the_plain_layer_forward_and_backward():
    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 48, bias=False)
    fp8 = copy.deepcopy(plain)
    fp8.__class__ = Fp8Linear
    x = torch.randn(4, 8, 64, requires_grad=True)
    x8 = x.detach().clone().requires_grad_()
    y, y8 = plain(x), fp8(x8)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (y8 * upstream).sum().backward()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert y8.shape == y.shape and y8.dtype == y.dtype
    assert rel(y8, y) < 0.05  # e4m3 x e4m3: a few percent
    assert rel(x8.grad, x.grad) < 0.1  # e5m2 gradients: less precision
    assert rel(fp8.weight.grad, plain.weight.grad) < 0.1
    assert fp8.weight.grad.dtype == torch.float32


def test_use_fp8_swaps_only_the_block_layers_and_the_model_still_learns():
    torch.manual_seed(0)
    model = GPT(config_from_depth(2, vocab_size=128, sequence_len=32))
    assert use_fp8(model) == 6 * 2  # q, k, v, proj, fc, mlp proj per block
    assert type(model.lm_head) is torch.nn.Linear
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 128, (8, 33))
    losses = []
    for _ in range(30):
        loss = model(data[:, :-1], data[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses  # it memorises the batch as a bf16 model would


def test_use_fp8_refuses_layers_it_cannot_run():
    model = GPT(config_from_depth(2, vocab_size=128, sequence_len=32))
    model.transformer.h[0].mlp.c_fc = torch.nn.Linear(model.config.n_embd, 100, bias=False)
    with pytest.raises(ValueError, match="divisible by 16"):
        use_fp8(model)
