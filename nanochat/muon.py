"""
Muon: momentum, then orthogonalise the update with a Newton-Schulz iteration
(Keller Jordan et al., modded-nanogpt). Used for the 2D weight matrices of the
transformer blocks; embeddings and lm_head stay with AdamW (nanochat/adamw.py).

Why orthogonalise: the raw momentum of a weight matrix is dominated by a few
directions; replacing it by the nearest (semi-)orthogonal matrix U V^T of its
SVD U S V^T gives every direction the same step size. Newton-Schulz gets close to
U V^T with five matrix products and no SVD, and runs well in bf16.

Muon      one process, or a model whose gradients something else already synchronised.
DistMuon  each rank owns every world_size-th matrix: the gradients are averaged with a
          reduce-scatter so only the owner receives them, the owner computes the update,
          and an all-gather sends the updated matrices to every rank.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.collectives import reduce_scatter_mean

# Quintic coefficients tuned to push every singular value in (0, 1] into a band
# around 1 in few steps. They trade exactness for speed: the result is U S' V^T
# with S' roughly in [0.7, 1.2], not exactly U V^T, which training does not mind.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5) -> Tensor:
    """
    Approximately orthogonalise the last two dims of G: U S V^T -> U S' V^T with S' near 1.
    bf16 on CUDA (fast, and precise enough for an update direction), fp32 elsewhere.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = G.bfloat16() if G.is_cuda else G.float()
    # Iterate on the wide orientation so X @ X^T is the smaller Gram matrix.
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    # The Frobenius norm bounds the spectral norm from above, so after this every
    # singular value is at most 1, inside the region where the iteration converges.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X


_compiled_newtonschulz = None


def orthogonalise(G: Tensor, steps: int) -> Tensor:
    """Newton-Schulz, compiled on CUDA (it is a handful of small matmuls, launch-bound otherwise)."""
    global _compiled_newtonschulz
    if not G.is_cuda:
        return zeropower_via_newtonschulz5(G, steps)
    if _compiled_newtonschulz is None:
        _compiled_newtonschulz = torch.compile(zeropower_via_newtonschulz5)
    return _compiled_newtonschulz(G, steps)


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Momentum warmup: linear from 0.85 to 0.95 over the first 300 steps, then flat.
    The training script sets group["momentum"] = muon_momentum(step) before each step."""
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end


def muon_lr_scale(p: Tensor) -> float:
    # A tall matrix's orthogonal update has smaller entries (its rows cannot all be
    # orthonormal); scale by sqrt(rows/cols) so every shape moves about equally.
    return max(1.0, p.size(-2) / p.size(-1)) ** 0.5


def _momentum_direction(grad: Tensor, buf: Tensor, momentum: float, nesterov: bool) -> Tensor:
    buf.lerp_(grad, 1 - momentum)
    return grad.lerp(buf, momentum) if nesterov else buf


def _group_by_shape(params) -> list[dict]:
    params = list(params)
    for p in params:
        if p.ndim != 2:
            raise ValueError(f"Muon takes 2D weight matrices only, got a parameter of shape {tuple(p.shape)}; "
                             "give embeddings, norms and biases to AdamW")
    # Sorted so every rank builds the same groups in the same order.
    shapes = sorted({tuple(p.shape) for p in params})
    return [dict(params=[p for p in params if tuple(p.shape) == shape]) for shape in shapes]


class Muon(torch.optim.Optimizer):
    """Single-process Muon. Parameters are grouped by shape so each group is one batched Newton-Schulz."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(_group_by_shape(params), defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buffers.append(state["momentum_buffer"])
            # _momentum_direction for the whole group at once: one kernel per op, not one per matrix
            momentum = group["momentum"]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            directions = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            updates = orthogonalise(torch.stack(directions), group["ns_steps"]).to(params[0].dtype)
            torch._foreach_add_(params, list(updates.unbind(0)), alpha=-group["lr"] * muon_lr_scale(params[0]))


class DistMuon(torch.optim.Optimizer):
    """
    Muon over torch.distributed ranks, without DDP: step() averages the gradients itself.
    Within each shape group, parameters are taken world_size at a time; parameter
    base + r of such a block is owned by rank r (blocks are padded with zeros).
    Only owners keep momentum state, so optimizer state is sharded across ranks.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(_group_by_shape(params), defaults)
        self._pending = None  # per block: (group, block params, owned param or None, PendingMean)

    def _launch_gradient_reduce(self):
        world_size, rank = dist.get_world_size(), dist.get_rank()
        self._pending = []
        for group in self.param_groups:
            params = group["params"]
            missing = [tuple(p.shape) for p in params if p.grad is None]
            if missing:
                raise RuntimeError(f"DistMuon: {len(missing)} parameter(s) of shape {missing[0]} have no gradient; "
                                   "every rank must run backward through every parameter before step()")
            for base in range(0, len(params), world_size):
                block = params[base:base + world_size]
                grads = [p.grad for p in block]
                grads += [torch.zeros_like(grads[0])] * (world_size - len(block))
                pending = reduce_scatter_mean(torch.stack(grads))
                owned = block[rank] if rank < len(block) else None
                self._pending.append((group, block, owned, pending))

    def synchronised_grads(self) -> list[tuple[Tensor, bool]]:
        """Averaged gradients of the matrices this rank owns, as (grad, counts_in_norm) pairs.
        Scaling them in place (gradient clipping) changes what step() applies."""
        if self._pending is None:
            self._launch_gradient_reduce()
        return [(pending.wait()[0], True) for _, _, owned, pending in self._pending if owned is not None]

    @torch.no_grad()
    def step(self):
        if self._pending is None:
            self._launch_gradient_reduce()
        world_size = dist.get_world_size()
        gathers = []
        for group, block, owned, pending in self._pending:
            grad = pending.wait()[0]
            if owned is not None:
                state = self.state[owned]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                direction = _momentum_direction(grad, state["momentum_buffer"], group["momentum"], group["nesterov"])
                update = orthogonalise(direction, group["ns_steps"])
                owned.add_(update.to(owned.dtype), alpha=-group["lr"] * muon_lr_scale(owned))
                source = owned
            else:
                source = torch.empty_like(block[0])  # this rank owns nothing in a padded block
            targets = list(block) + [torch.empty_like(block[0]) for _ in range(world_size - len(block))]
            gathers.append(dist.all_gather(targets, source, async_op=True))
        for work in gathers:
            work.wait()
        self._pending = None
