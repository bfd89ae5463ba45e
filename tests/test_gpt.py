"""Tests for nanochat/gpt.py and nanochat/lm_loss.py: sizes, attention, causality, KV cache, loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPT, GPTConfig, KVCache, apply_rotary_emb, config_from_depth, norm
from nanochat.lm_loss import chunked_softcap_cross_entropy, plain_softcap_cross_entropy

torch.set_num_threads(1)

TINY = dict(sequence_len=32, vocab_size=101, n_layer=2, n_embd=64)


def scrambled_model(seed=0, **overrides):
    """A tiny model with every weight random and large enough to matter.
    nanochat's init zeroes the output projections and shrinks lm_head, which would make
    attention invisible in the logits and let attention bugs pass."""
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**TINY, "n_head": 4, "n_kv_head": 4, **overrides})
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.size(-1)))
    return model.eval()


def test_d20_size_and_flops_match_nanochat():
    cfg = config_from_depth(20, vocab_size=65536, sequence_len=2048)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_layer) == (1280, 10, 10, 20)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == 560_988_160
    # 6 * (params - wte) + 12 * layers * heads * head_dim * seq_len
    assert model.estimate_flops() == 6 * (560_988_160 - 65536 * 1280) + 12 * 20 * 10 * 128 * 2048


def test_config_from_depth_small_and_gqa():
    cfg = config_from_depth(2, vocab_size=300, sequence_len=64)
    assert (cfg.n_embd, cfg.n_head) == (128, 1)
    assert config_from_depth(20, n_kv_head=5).n_kv_head == 5
    with pytest.raises(ValueError, match="must divide n_head"):
        config_from_depth(20, n_kv_head=3)


def reference_attention(attn, x, cos, sin):
    """Multi-head attention written out by hand from the module's weights (repeats k/v heads for GQA)."""
    B, T, _ = x.shape
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q = (x @ attn.c_q.weight.T).view(B, T, H, D)
    k = (x @ attn.c_k.weight.T).view(B, T, Hkv, D)
    v = (x @ attn.c_v.weight.T).view(B, T, Hkv, D)
    q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * D)
    return y @ attn.c_proj.weight.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_rotates_each_pair_by_its_angle(dtype):
    """(x_i, x_{i+d/2}) -> (x_i cos + x_{i+d/2} sin, x_{i+d/2} cos - x_i sin), bit for bit, in fp32 and bf16."""
    torch.manual_seed(0)
    B, T, H, D = 2, 5, 3, 8
    x = torch.randn(B, T, H, D).to(dtype)
    angles = torch.rand(1, T, 1, D // 2) * 6.0
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    want = torch.empty_like(x)
    for i in range(D // 2):
        a, b = x[..., i], x[..., i + D // 2]
        want[..., i] = a * cos[..., i] + b * sin[..., i]
        want[..., i + D // 2] = b * cos[..., i] - a * sin[..., i]
    got = apply_rotary_emb(x, cos, sin)
    assert got.dtype == dtype and torch.equal(got, want)
    if dtype == torch.float32:  # a rotation: lengths kept, and the opposite angle undoes it
        torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))
        torch.testing.assert_close(apply_rotary_emb(got, cos, -sin), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_equals_handwritten_multi_head_attention(n_kv_head):
    model = scrambled_model(n_kv_head=n_kv_head)
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 10, 64)
    cos_sin = (model.cos[:, :10], model.sin[:, :10])
    with torch.no_grad():
        got = attn(x, cos_sin, None, None)
        want = reference_attention(attn, x, *cos_sin)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_future_tokens_do_not_change_earlier_logits():
    model = scrambled_model(n_kv_head=2)
    idx = torch.randint(0, 101, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = torch.randint(0, 101, (2, 5))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3  # and the later ones do depend on them


def test_logits_are_soft_capped_fp32():
    model = scrambled_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)  # push raw logits far past the cap
        logits = model(torch.randint(0, 101, (1, 8)))
    assert logits.dtype == torch.float32 and logits.shape == (1, 8, 101)
    assert logits.abs().max() <= 15.0 and logits.abs().max() > 14.0


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_kv_cache_decoding_equals_full_forward(n_kv_head):
    model = scrambled_model(n_kv_head=n_kv_head)
    idx = torch.randint(0, 101, (2, 14))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model, batch_size=2, max_seq_len=20, dtype=torch.float32)
        steps = [model(idx[:, :5], kv_cache=cache)]  # prefill 5, then one token at a time
        steps += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(5, 11)]
        steps.append(model(idx[:, 11:14], kv_cache=cache))  # a multi-token chunk after the prefill
    assert cache.pos == 14
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_left_padded_rows_equal_each_row_alone():
    model = scrambled_model(n_kv_head=2)
    prompts = [torch.randint(1, 101, (n,)) for n in (3, 7, 5)]
    continuation = torch.randint(1, 101, (3, 4))
    longest = max(len(p) for p in prompts)
    with torch.no_grad():
        padded = torch.zeros(3, longest, dtype=torch.long)
        for row, p in enumerate(prompts):
            padded[row, longest - len(p):] = p
        cache = KVCache.for_model(model, 3, longest + 4, torch.float32, pad=[longest - len(p) for p in prompts])
        batch_prefill = model(padded, kv_cache=cache)
        batch_steps = torch.cat([model(continuation[:, t:t + 1], kv_cache=cache) for t in range(4)], dim=1)
        for row, p in enumerate(prompts):
            alone = model(torch.cat([p, continuation[row]])[None])[0]
            torch.testing.assert_close(batch_prefill[row, longest - len(p):], alone[:len(p)], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batch_steps[row], alone[len(p):], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(batch_prefill).all()  # padding slots too: an all-masked row would be NaN


def test_device_position_decoding_equals_full_forward():
    """The fixed-shape decode step (the one CUDA graphs replay) on left-padded rows."""
    model = scrambled_model(n_kv_head=2)
    prompts = [torch.randint(1, 101, (n,)) for n in (2, 6)]
    continuation = torch.randint(1, 101, (2, 5))
    with torch.no_grad():
        padded = torch.zeros(2, 6, dtype=torch.long)
        padded[0, 4:], padded[1] = prompts[0], prompts[1]
        cache = KVCache.for_model(model, 2, 12, torch.float32, pad=[4, 0])
        model(padded, kv_cache=cache)
        cache.use_device_position()
        steps = torch.cat([model(continuation[:, t:t + 1], kv_cache=cache) for t in range(5)], dim=1)
        assert cache.pos_t.item() == 11
        for row, p in enumerate(prompts):
            alone = model(torch.cat([p, continuation[row]])[None])[0, len(p):]
            torch.testing.assert_close(steps[row], alone, rtol=1e-5, atol=1e-5)


def test_replicated_cache_continues_like_the_original():
    model = scrambled_model()
    prompts = torch.randint(0, 101, (2, 6))
    nxt = torch.randint(0, 101, (2, 1))
    with torch.no_grad():
        prefill = KVCache.for_model(model, 2, 6, torch.float32, pad=[0, 2])
        model(prompts, kv_cache=prefill)
        big = prefill.replicate([1, 1, 0], max_seq_len=10)
        assert (big.pos, big.batch_size, big.max_seq_len, big.pad.tolist()) == (6, 3, 10, [2, 2, 0])
        rows = model(nxt[[1, 1, 0]], kv_cache=big)
        ref = KVCache.for_model(model, 2, 10, torch.float32, pad=[0, 2])
        model(prompts, kv_cache=ref)
        want = model(nxt, kv_cache=ref)
    torch.testing.assert_close(rows, want[[1, 1, 0]], rtol=1e-6, atol=1e-6)


def test_kv_cache_overflow_is_an_error():
    model = scrambled_model()
    cache = KVCache.for_model(model, 1, 4, torch.float32)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("softcap", [15.0, 50.0])  # 50 takes the max-subtracting log-sum-exp
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_loss_and_gradients_equal_plain(reduction, softcap):
    torch.manual_seed(0)
    N, C, V = 23, 16, 37
    hidden = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(V, C, dtype=torch.float64) * 3).requires_grad_()  # big logits exercise the softcap
    targets = torch.randint(0, V, (N,))
    targets[[0, 5, 6, 22]] = -1
    upstream = torch.randn(N, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    results = []
    for fn in (plain_softcap_cross_entropy, lambda *a: chunked_softcap_cross_entropy(*a, chunk_rows=5)):
        loss = fn(hidden, weight, targets, softcap, reduction)
        gh, gw = torch.autograd.grad(loss, (hidden, weight), upstream)
        results.append((loss, gh, gw))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if reduction == "none":
        assert (results[1][0][[0, 5, 6, 22]] == 0).all()


def test_chunked_loss_under_autocast_matches_plain():
    """Under autocast (base_train on GPU) the chunked loss and its gradients match the plain path's, dtypes included."""
    torch.manual_seed(0)
    hidden = torch.randn(40, 16, requires_grad=True)  # fp32, as a final RMSNorm may hand over
    weight = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 37, (40,))
    results = []
    for fn in (plain_softcap_cross_entropy, lambda *a: chunked_softcap_cross_entropy(*a, chunk_rows=16)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(hidden, weight, targets, 15.0, "mean")
        results.append((loss, *torch.autograd.grad(loss, (hidden, weight))))
    # the same bf16 logits on both paths: the losses agree to fp32 rounding, not just to bf16's
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for got, want in zip(results[1][1:], results[0][1:]):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("loss_impl", ["chunked", "plain"])
def test_fully_masked_batch_gives_zero_loss_not_nan(loss_impl):
    model = scrambled_model()
    model.loss_impl = loss_impl
    idx = torch.randint(0, 101, (2, 6))
    targets = torch.full((2, 6), -1)
    for reduction in ("mean", "sum"):
        model.zero_grad()
        loss = model(idx, targets, loss_reduction=reduction)
        loss.backward()
        assert loss.item() == 0.0
        assert all(torch.isfinite(p.grad).all() and (p.grad == 0).all() for p in model.parameters())
    assert (model(idx, targets, loss_reduction="none") == 0).all()


def test_model_loss_matches_between_chunked_and_plain():
    model = scrambled_model(n_kv_head=2)
    idx, targets = torch.randint(0, 101, (2, 9)), torch.randint(0, 101, (2, 9))
    targets[1, :4] = -1
    grads = []
    for impl in ("chunked", "plain"):
        model.loss_impl = impl
        model.zero_grad()
        loss = model(idx, targets)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 9)
    torch.testing.assert_close(per_token.sum() / 14, grads[0][0], rtol=1e-6, atol=1e-6)


def test_forward_hidden_is_what_lm_head_reads():
    model = scrambled_model()
    idx = torch.randint(0, 101, (2, 5))
    with torch.no_grad():
        hidden = model.forward_hidden(idx)
        logits = model(idx)
    assert hidden.shape == (2, 5, 64)
    torch.testing.assert_close(hidden.pow(2).mean(-1), torch.ones(2, 5), rtol=1e-4, atol=1e-4)  # RMS-normed
    torch.testing.assert_close(15 * torch.tanh(model.lm_head(hidden) / 15), logits)
    torch.testing.assert_close(model.logits_from_hidden(hidden[:, -1:]), logits[:, -1:])


def test_meta_build_then_init_gives_a_working_model():
    cfg = GPTConfig(**TINY, n_head=2, n_kv_head=1)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.cos.abs().max() <= 1.0 and model.cos[0, 0, 0].eq(1).all()  # rotary tables rebuilt, not garbage
    assert model.lm_head.weight.abs().max() > 0  # lm_head small but not zero
    assert all((blk.attn.c_proj.weight == 0).all() and (blk.mlp.c_proj.weight == 0).all() for blk in model.transformer.h)
    loss = model(torch.randint(0, 101, (1, 8)), torch.randint(0, 101, (1, 8)))
    assert abs(loss.item() - math.log(101)) < 0.05  # near-uniform predictions at init


def test_tiny_model_overfits_a_batch_with_adamw():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, n_head=2, n_kv_head=1))  # nanochat's own init, lm_head included
    idx = torch.randint(0, 101, (4, 16))
    targets = torch.roll(idx, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.8, 0.95), weight_decay=0.0)
    first = None
    for _ in range(50):
        loss = model(idx, targets)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.4 and loss.item() < 0.5, (first, loss.item())


def test_setup_optimizers_splits_matrices_from_embedding_and_head():
    model = GPT(GPTConfig(**TINY, n_head=2, n_kv_head=1))
    adamw, muon = model.setup_optimizers(ddp=False)
    adam_params = {id(p) for g in adamw.param_groups for p in g["params"]}
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    assert adam_params == {id(model.lm_head.weight), id(model.transformer.wte.weight)}
    assert muon_params == {id(p) for p in model.transformer.h.parameters()}
    assert all(p.ndim == 2 for p in model.transformer.h.parameters())  # Muon needs matrices only
    # AdamW learning rates scale by (d_model / 768)^-0.5: 64 wide -> x sqrt(12)
    lm_head_group = next(g for g in adamw.param_groups if g["params"][0] is model.lm_head.weight)
    assert abs(lm_head_group["lr"] - 0.004 * math.sqrt(768 / 64)) < 1e-12


def test_training_path_computes_what_inference_computes():
    """With gradients on, relu^2 sits in a checkpoint; the logits must be those of the inference
    path, and the gradients those of the textbook MLP."""
    model = scrambled_model(n_kv_head=2)
    idx = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        inference = model(idx)
    training = model(idx)
    assert training.requires_grad
    torch.testing.assert_close(training.detach(), inference, rtol=1e-5, atol=1e-5)

    mlp = model.transformer.h[0].mlp
    x = torch.randn(2, 9, mlp.c_fc.in_features, requires_grad=True)
    upstream = torch.randn(2, 9, mlp.c_proj.out_features)
    got = torch.autograd.grad(mlp(x), (x, mlp.c_fc.weight, mlp.c_proj.weight), upstream)
    textbook = mlp.c_proj(F.relu(mlp.c_fc(x)).square())
    want = torch.autograd.grad(textbook, (x, mlp.c_fc.weight, mlp.c_proj.weight), upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_mlp_keeps_only_the_pre_activation_for_backward():
    """Compiled for training, the MLP keeps h = c_fc(x) and recomputes relu(h)^2 in the backward
    pass instead of storing it too (a 4x-wide tensor per token and layer: 13 GB at d20, B=32).
    aot_eager_decomp_partition runs the partitioner torch.compile's inductor uses, without a compiler."""
    mlp = scrambled_model().transformer.h[0].mlp
    x = torch.randn(3, 5, mlp.c_fc.in_features, requires_grad=True)
    hidden_numel = 3 * 5 * mlp.c_fc.out_features

    def hidden_sized_saved(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            torch.compile(fn, backend="aot_eager_decomp_partition")(x)
        return sum(n == hidden_numel for n in saved)

    assert hidden_sized_saved(mlp) == 1
    assert hidden_sized_saved(lambda x: mlp.c_proj(F.relu(mlp.c_fc(x)).square())) == 2  # what the check is against


@pytest.mark.parametrize("softcap", [0.0, -15.0, float("inf")])
def test_loss_refuses_a_softcap_that_is_not_positive_and_finite(softcap):
    hidden, weight, targets = torch.randn(4, 8), torch.randn(16, 8), torch.randint(0, 16, (4,))
    for fn in (plain_softcap_cross_entropy, chunked_softcap_cross_entropy):
        with pytest.raises(ValueError, match="softcap must be a positive finite number"):
            fn(hidden, weight, targets, softcap)


def test_relu_squared_avoids_pow():
    """CUDA autocast runs pow in fp32; a pow in relu_squared would put the bf16 cast of its output
    outside the MLP's checkpoint and bring back 13 GB of stored activations at d20 (B=32)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from nanochat.gpt import relu_squared
    graph = make_fx(relu_squared)(torch.randn(3, 4)).graph
    ops = {str(node.target) for node in graph.nodes if node.op == "call_function"}
    assert not any("pow" in op for op in ops), ops
    h = torch.randn(3, 4)
    torch.testing.assert_close(relu_squared(h), F.relu(h).square())


def test_the_compiled_model_is_one_graph_up_to_the_loss():
    """Anything in the forward pass that torch.compile cannot trace (a Python-side query, a .item())
    splits the graph and slows training; the only planned break is the chunked loss."""
    model = scrambled_model()
    idx = torch.randint(0, 101, (2, 9))
    explained = torch._dynamo.explain(model)(idx)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    explained = torch._dynamo.explain(model)(idx, idx)
    reasons = [r.reason for r in explained.break_reasons]
    assert len(reasons) == 1 and "chunked_softcap_cross_entropy" in reasons[0], reasons


def test_attention_order_leaves_out_backends_the_user_switched_off():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        model = scrambled_model()
        from torch.nn.attention import SDPBackend
        assert SDPBackend.CUDNN_ATTENTION not in model.transformer.h[0].attn.attention_order
        model.set_attention_backend("auto")
        assert model.transformer.h[0].attn.attention_order is None
        with pytest.raises(ValueError, match="unknown attention backend"):
            model.set_attention_backend("fa3")
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_fit_seq_len_takes_the_trained_length_for_minus_one_and_refuses_past_the_rotary_table():
    model = GPT(GPTConfig(**TINY, n_head=2, n_kv_head=1))
    assert model.fit_seq_len(-1) == model.config.sequence_len and model.fit_seq_len(7) == 7
    assert model.fit_seq_len(model.rotary_seq_len) == model.rotary_seq_len
    with pytest.raises(ValueError, match=rf"--max_seq_len={model.rotary_seq_len + 1} exceeds the model's rotary table"):
        model.fit_seq_len(model.rotary_seq_len + 1)


def test_randomize_outputs_replaces_the_zero_projections_and_small_lm_head():
    model = GPT(GPTConfig(**TINY, n_head=2, n_kv_head=1))
    model.randomize_outputs(lm_head_std=0.5)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(0.02, rel=0.3)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert model.lm_head.weight.std().item() == pytest.approx(0.5, rel=0.3)
