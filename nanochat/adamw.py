"""
DistAdamW: AdamW with ZeRO-2 style sharding, for the embedding and lm_head.

Each parameter is split along its first dimension into world_size equal row
blocks; rank r owns block r. step() reduce-scatters the gradient (so each rank
receives only the average of its own rows), runs AdamW on those rows with
moment buffers of that size alone, and all-gathers the updated rows. Optimizer
memory per rank is 1/world_size of plain AdamW's.

The arithmetic is torch.optim.AdamW's, so a distributed run matches a
single-process one, which uses torch.optim.AdamW itself (fused on CUDA).
"""

import math

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.collectives import all_reduce_mean, reduce_scatter_mean


def adamw_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int,
                  lr: float, beta1: float, beta2: float, eps: float, weight_decay: float):
    """One AdamW step on `param` in place (step counts from 1)."""
    # torch.optim.AdamW's arithmetic: decoupled weight decay, eps added after the bias correction
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


class DistAdamW(torch.optim.Optimizer):
    """AdamW over torch.distributed ranks without DDP: step() averages the gradients itself."""

    def __init__(self, param_groups, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(param_groups, defaults)
        self._pending = None  # per parameter: (group, param, sharded, PendingMean)

    def _launch_gradient_reduce(self):
        world_size = dist.get_world_size()
        self._pending = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    raise RuntimeError(f"DistAdamW: a parameter of shape {tuple(p.shape)} has no gradient; "
                                       "every rank must run backward through every parameter before step()")
                # rows that do not divide by world_size: all-reduced, updated on every rank (replicated state);
                # small tensors only in practice, since nanochat's vocabulary sizes are multiples of 8 or more
                sharded = p.ndim > 0 and p.shape[0] % world_size == 0
                # Both paths average in place into p.grad or a fresh shard; p.grad is spent after step().
                pending = reduce_scatter_mean(p.grad) if sharded else all_reduce_mean(p.grad)
                self._pending.append((group, p, sharded, pending))

    def synchronised_grads(self) -> list[tuple[Tensor, bool]]:
        """Averaged gradients of the rows this rank owns, as (grad, counts_in_norm) pairs.
        A replicated parameter's gradient is on every rank but counts in the norm on rank 0 only.
        Scaling them in place (gradient clipping) changes what step() applies."""
        if self._pending is None:
            self._launch_gradient_reduce()
        rank = dist.get_rank()
        return [(pending.wait(), sharded or rank == 0) for _, _, sharded, pending in self._pending]

    @torch.no_grad()
    def step(self):
        if self._pending is None:
            self._launch_gradient_reduce()
        world_size, rank = dist.get_world_size(), dist.get_rank()
        gathers = []
        for group, p, sharded, pending in self._pending:
            grad = pending.wait()
            rows = p.shape[0] // world_size if sharded else None
            owned = p[rank * rows:(rank + 1) * rows] if sharded else p
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(owned)
                state["exp_avg_sq"] = torch.zeros_like(owned)
            state["step"] += 1
            beta1, beta2 = group["betas"]
            adamw_update_(owned, grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                          group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            if sharded:
                gathers.append(dist.all_gather_into_tensor(p, owned, async_op=True))
        for work in gathers:
            work.wait()
        self._pending = None
