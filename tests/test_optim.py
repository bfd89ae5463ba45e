"""
Muon, DistMuon, DistAdamW, build_optimizers and clip_grad_norm_ (nanochat/muon.py,
nanochat/adamw.py, nanochat/optim.py, nanochat/collectives.py).

The distributed optimizers run in 2 CPU processes over gloo, once per module
(the `two_rank_results` fixture), and are compared with single-process training
on the full batch computed here.
"""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nanochat.collectives import reduce_scatter_mean
from nanochat.muon import Muon, muon_momentum, zeropower_via_newtonschulz5
from nanochat.optim import (build_optimizers, check_finite_loss, clip_grad_norm_, grad_accum_steps, set_lr_multiplier,
                            set_muon_momentum, step_optimizers)
from tests.dist_fixtures import end_rank

torch.set_num_threads(1)
NS = (3.4445, -4.7750, 2.0315)


def newton_schulz_reference(G: np.ndarray, steps: int = 5) -> np.ndarray:
    """The quintic iteration written out in float64 numpy, independent of the module."""
    a, b, c = NS
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / (np.linalg.norm(X) + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


def matrix_with_singular_values(rows, cols, singular_values, seed):
    g = np.random.default_rng(seed)
    u, _ = np.linalg.qr(g.standard_normal((rows, rows)))
    v, _ = np.linalg.qr(g.standard_normal((cols, cols)))
    k = min(rows, cols)
    return u[:, :k] @ np.diag(singular_values) @ v[:, :k].T


# -----------------------------------------------------------------------------
# Newton-Schulz and single-process Muon

@pytest.mark.parametrize("rows,cols", [(48, 48), (96, 32), (32, 96)])
def test_newton_schulz_lands_singular_values_in_band(rows, cols):
    # What the quintic guarantees after 5 steps: every singular value that is at least
    # 0.002 of the Frobenius norm ends up in [0.68, 1.21] (solved from the scalar
    # polynomial); the singular vectors are untouched. Spread over a 100x range.
    k = min(rows, cols)
    s = np.logspace(0, 2, k)[::-1].copy()
    G = matrix_with_singular_values(rows, cols, s, seed=rows + cols)
    assert s.min() / np.linalg.norm(s) > 0.002
    X = zeropower_via_newtonschulz5(torch.tensor(G, dtype=torch.float32), steps=5).double().numpy()
    sv = np.linalg.svd(X, compute_uv=False)
    assert X.shape == (rows, cols)
    assert sv.min() > 0.68 and sv.max() < 1.21, (sv.min(), sv.max())
    # Same singular vectors: the output is U f(S) V^T, exactly what the reference iteration gives.
    np.testing.assert_allclose(X, newton_schulz_reference(G), atol=2e-4)
    # And far from the raw input: the spread of 100x collapsed to under 2x.
    assert sv.max() / sv.min() < 1.8


def test_newton_schulz_on_random_gradient_is_near_orthogonal():
    G = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    X = zeropower_via_newtonschulz5(G)
    sv = torch.linalg.svdvals(X)
    # A Gaussian 64x128 matrix is well conditioned (smallest/largest singular value ~0.3), so all land in band.
    assert sv.min() > 0.68 and sv.max() < 1.21
    # (X X^T) is close to the identity in the sense that matters for an update: no direction dominates.
    gram = X @ X.T
    assert (gram.diagonal() - 1).abs().max() < 0.35


def test_muon_steps_match_hand_computed_reference():
    torch.manual_seed(0)
    p_tall = torch.randn(12, 4)  # tall: transposed inside, update scaled by sqrt(12/4)
    p_wide = torch.randn(4, 12)
    params = [torch.nn.Parameter(p_tall.clone()), torch.nn.Parameter(p_wide.clone())]
    lr, momenta = 0.05, [0.85, 0.9]
    opt = Muon(params, lr=lr, momentum=momenta[0])
    grads = [[torch.randn(12, 4), torch.randn(4, 12)] for _ in momenta]

    ref = [p_tall.double().numpy(), p_wide.double().numpy()]
    bufs = [np.zeros_like(r) for r in ref]
    for step, m in enumerate(momenta):
        for group in opt.param_groups:
            group["momentum"] = m
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads[step]):
            g = g.double().numpy()
            bufs[i] = m * bufs[i] + (1 - m) * g  # momentum buffer (an EMA of gradients)
            nesterov = (1 - m) * g + m * bufs[i]  # look ahead along the momentum
            scale = math.sqrt(max(1.0, ref[i].shape[0] / ref[i].shape[1]))
            ref[i] = ref[i] - lr * scale * newton_schulz_reference(nesterov)
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.detach().double().numpy(), r, atol=1e-5)


def test_muon_momentum_warmup():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)


def test_muon_groups_by_shape_and_rejects_vectors():
    mats = [torch.nn.Parameter(torch.randn(s)) for s in [(8, 4), (4, 8), (8, 4)]]
    opt = Muon(mats)
    assert sorted(len(g["params"]) for g in opt.param_groups) == [1, 2]
    with pytest.raises(ValueError, match="2D"):
        Muon([torch.nn.Parameter(torch.randn(8))])


# -----------------------------------------------------------------------------
# A toy model shaped like the GPT split: embeddings to AdamW, block matrices to Muon.
# 3 matrices of one shape exercise DistMuon's padded block; pos (3 rows) cannot be
# split over 2 ranks and exercises DistAdamW's all-reduce path.

VOCAB, DIM, T, BATCH, STEPS = 8, 16, 3, 8, 4


def toy_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"wte": (VOCAB, DIM), "pos": (T, DIM), "w0": (DIM, DIM), "w1": (DIM, DIM), "w2": (DIM, DIM),
              "up": (2 * DIM, DIM), "down": (DIM, 2 * DIM), "lm_head": (VOCAB, DIM)}
    return {k: torch.nn.Parameter(torch.randn(s, generator=g) / math.sqrt(s[-1])) for k, s in shapes.items()}


def toy_loss(P, idx, targets):
    x = P["wte"][idx] + P["pos"]
    for name in ("w0", "w1", "w2"):
        x = x + torch.tanh(x @ P[name].T)
    x = x + torch.relu(x @ P["up"].T) @ P["down"].T
    return F.cross_entropy((x @ P["lm_head"].T).flatten(0, 1), targets.flatten())


def toy_optimizers(P, ddp):
    return build_optimizers([P[k] for k in ("w0", "w1", "w2", "up", "down")], [P["wte"], P["pos"]], [P["lm_head"]],
                            model_dim=DIM, ddp=ddp, weight_decay=0.1)


def toy_batches():
    g = torch.Generator().manual_seed(123)
    return [(torch.randint(0, VOCAB, (BATCH, T), generator=g), torch.randint(0, VOCAB, (BATCH, T), generator=g))
            for _ in range(STEPS)]


def train_toy(ddp, clip, rank=0, world_size=1):
    """STEPS steps with LR decay and momentum warmup; each rank uses its share of the batch."""
    P = toy_params()
    opts = toy_optimizers(P, ddp)
    norms = []
    for step, (idx, targets) in enumerate(toy_batches()):
        rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
        toy_loss(P, idx[rows], targets[rows]).backward()
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * (1 - step / 10)
                if group["kind"] == "muon":
                    group["momentum"] = muon_momentum(100 * step)
        if clip is not None:
            norms.append(float(clip_grad_norm_(opts, clip)))
        for opt in opts:
            opt.step()
        for p in P.values():
            p.grad = None
    return {k: p.detach().clone() for k, p in P.items()}, norms


def clip_disagreeing_ranks(ddp, rank=0, world_size=1):
    """Gradients that nearly cancel across ranks: local norms ~900, synchronised norm ~4.6."""
    P = toy_params()
    opts = toy_optimizers(P, ddp)
    g = torch.Generator().manual_seed(7)
    for p in P.values():
        common = torch.randn(p.shape, generator=g) * 0.1
        opposing = torch.randn(p.shape, generator=g) * 20
        # rank 0 gets common + opposing, rank 1 common - opposing: the average is `common`
        p.grad = common + opposing * (1 if rank == 0 else -1) if ddp else common.clone()
    norm = float(clip_grad_norm_(opts, max_norm=1.0))
    for opt in opts:
        opt.step()
    return {k: p.detach().clone() for k, p in P.items()}, norm


def _two_rank_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    results = {
        "plain": train_toy(ddp=True, clip=None, rank=rank, world_size=world_size),
        "clipped": train_toy(ddp=True, clip=0.5, rank=rank, world_size=world_size),
        "disagree": clip_disagreeing_ranks(ddp=True, rank=rank, world_size=world_size),
    }
    # reduce-scatter: NCCL-style native call and the gloo fallback must agree
    x = torch.arange(12.0).reshape(4, 3) * (rank + 1)
    results["rs_native"] = reduce_scatter_mean(x.clone(), native=True).wait()
    results["rs_fallback"] = reduce_scatter_mean(x.clone(), native=False).wait()
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    end_rank()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_two_rank_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_distributed_optimizers_match_single_process(two_rank_results):
    expected, _ = train_toy(ddp=False, clip=None)
    for rank_result in two_rank_results:
        params, _ = rank_result["plain"]
        for name in expected:
            torch.testing.assert_close(params[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # and training actually moved every parameter
    start = toy_params()
    assert all((expected[k] - start[k]).abs().max() > 1e-3 for k in start)


@pytest.mark.slow
def test_ranks_end_bitwise_identical(two_rank_results):
    for name, p in two_rank_results[0]["plain"][0].items():
        assert torch.equal(p, two_rank_results[1]["plain"][0][name]), name


@pytest.mark.slow
def test_clipping_uses_synchronised_gradient_across_training(two_rank_results):
    expected, expected_norms = train_toy(ddp=False, clip=0.5)
    assert max(expected_norms) > 0.5  # clipping was active
    for rank_result in two_rank_results:
        params, norms = rank_result["clipped"]
        np.testing.assert_allclose(norms, expected_norms, rtol=1e-5)
        for name in expected:
            torch.testing.assert_close(params[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_clipping_scale_comes_from_the_averaged_gradient(two_rank_results):
    expected, expected_norm = clip_disagreeing_ranks(ddp=False)
    assert 1.5 < expected_norm < 10  # the averaged gradient's norm, far below the local ~900
    for rank_result in two_rank_results:
        params, norm = rank_result["disagree"]
        assert norm == pytest.approx(expected_norm, rel=1e-5)
        for name in expected:
            torch.testing.assert_close(params[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_reduce_scatter_fallback_matches_native(two_rank_results):
    full_mean = torch.arange(12.0).reshape(4, 3) * 1.5  # mean of x*1 and x*2
    for rank, rank_result in enumerate(two_rank_results):
        torch.testing.assert_close(rank_result["rs_native"], full_mean[2 * rank:2 * rank + 2])
        torch.testing.assert_close(rank_result["rs_fallback"], full_mean[2 * rank:2 * rank + 2])


# -----------------------------------------------------------------------------
# build_optimizers and single-process clipping

def test_build_optimizers_groups_and_learning_rates():
    P = toy_params()
    adamw, muon = build_optimizers([P["w0"], P["up"]], [P["wte"]], [P["lm_head"]], model_dim=1280, ddp=False)
    scale = (1280 / 768) ** -0.5
    lm_head_group, embedding_group = adamw.param_groups
    assert lm_head_group["params"] == [P["lm_head"]] and lm_head_group["lr"] == pytest.approx(0.004 * scale)
    assert embedding_group["params"] == [P["wte"]] and embedding_group["lr"] == pytest.approx(0.2 * scale)
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-10 for g in adamw.param_groups)
    assert isinstance(muon, Muon) and len(muon.param_groups) == 2  # one per shape
    for g in adamw.param_groups + muon.param_groups:
        assert g["initial_lr"] == g["lr"]
    assert all(g["lr"] == 0.02 and g["momentum"] == 0.95 and g["kind"] == "muon" for g in muon.param_groups)
    with pytest.raises(ValueError, match="two optimizer groups"):
        build_optimizers([P["w0"]], [P["w0"]], [P["lm_head"]], model_dim=DIM, ddp=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        build_optimizers([P["w0"]], [P["wte"]], [P["lm_head"]], model_dim=DIM, ddp=True)


def test_single_process_clip_matches_torch():
    P, Q = toy_params(), toy_params()
    idx, targets = toy_batches()[0]
    toy_loss(P, idx, targets).backward()
    toy_loss(Q, idx, targets).backward()
    norm = clip_grad_norm_(toy_optimizers(P, ddp=False), 0.1)
    expected = torch.nn.utils.clip_grad_norm_(list(Q.values()), 0.1)
    assert float(norm) == pytest.approx(float(expected))
    for k in P:
        torch.testing.assert_close(P[k].grad, Q[k].grad)
    total = torch.sqrt(sum(P[k].grad.pow(2).sum() for k in P))
    assert float(total) == pytest.approx(0.1, rel=1e-4)


def test_step_optimizers_is_the_update_every_stage_wrote_out():
    P, Q = toy_params(), toy_params()
    idx, targets = toy_batches()[0]
    opts_p, opts_q = toy_optimizers(P, ddp=False), toy_optimizers(Q, ddp=False)
    toy_loss(P, idx, targets).backward()
    toy_loss(Q, idx, targets).backward()
    norm = step_optimizers(torch.nn.ParameterDict(P), opts_p, lrm=0.5, grad_clip=0.1, muon_momentum=0.9)
    set_lr_multiplier(opts_q, 0.5)  # what the stages wrote before the helper
    set_muon_momentum(opts_q, 0.9)
    expected = clip_grad_norm_(opts_q, 0.1)
    for opt in opts_q:
        opt.step()
    assert float(norm) == float(expected)
    for k in P:
        assert torch.equal(P[k], Q[k]) and P[k].grad is None, k
    assert all(g["momentum"] == 0.9 for g in opts_p[1].param_groups)
    assert all(g["lr"] == 0.5 * g["initial_lr"] for opt in opts_p for g in opt.param_groups)
    toy_loss(P, idx, targets).backward()
    assert step_optimizers(torch.nn.ParameterDict(P), opts_p, lrm=1.0, grad_clip=0.0) is None  # no clipping, no norm


def test_grad_accum_steps_and_a_diverged_loss_say_what_to_change():
    assert grad_accum_steps(32, 8, "target_examples_per_step", "device_batch_size * world_size") == 4
    with pytest.raises(ValueError, match=r"--total_batch_size=100 must be a multiple of device_batch_size \* "
                                         r"max_seq_len \* world_size = 64"):
        grad_accum_steps(100, 64, "total_batch_size", "device_batch_size * max_seq_len * world_size")
    check_finite_loss(3.5, 7)
    with pytest.raises(FloatingPointError, match="training loss is nan at step 7; lower the learning rates"):
        check_finite_loss(float("nan"), 7)
