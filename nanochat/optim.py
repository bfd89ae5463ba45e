"""
The optimizer setup and update step every training stage shares, and gradient clipping
that is correct under the distributed optimizers.

build_optimizers: Muon for the block matrices, AdamW for embedding and lm_head
(nanochat's split). Under DDP these are DistMuon and DistAdamW, which average the
gradients themselves inside step(): the model is not wrapped in DDP, so after
backward each rank holds only its local gradient.

clip_grad_norm_: clipping must see the averaged gradient. Clipping the local one
(torch.nn.utils.clip_grad_norm_ before step) would use a different scale on each
rank and a norm that is not the norm of the gradient being applied.
"""

import math

import torch
import torch.distributed as dist

from nanochat.adamw import DistAdamW
from nanochat.muon import DistMuon, Muon

# AdamW learning rates were tuned at d_model = 768; wider models take lr * (768/d)^0.5.
LR_REFERENCE_DIM = 768
ADAMW_BETAS = (0.8, 0.95)
ADAMW_EPS = 1e-10


def build_optimizers(matrix_params, embedding_params, lm_head_params, model_dim: int, *, ddp: bool,
                     unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                     weight_decay: float = 0.0, init_lr_frac: float = 1.0) -> list[torch.optim.Optimizer]:
    """
    [adamw, muon] for a GPT: matrix_params (transformer.h, all 2D) go to Muon at
    matrix_lr; embedding_params (wte) and lm_head_params go to AdamW at their lr
    times (model_dim/768)^-0.5. Every group records initial_lr for the LR schedule
    and kind ("adamw" or "muon"). init_lr_frac scales every learning rate (fine-tuning stages
    start from a fraction of the pretraining rates).
    ddp=True gives DistAdamW + DistMuon (needs torch.distributed initialised).
    """
    matrix_params, embedding_params, lm_head_params = list(matrix_params), list(embedding_params), list(lm_head_params)
    seen = set()
    for p in matrix_params + embedding_params + lm_head_params:
        if id(p) in seen:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} was given to two optimizer groups")
        seen.add(id(p))
    if ddp and not dist.is_initialized():
        raise RuntimeError("build_optimizers(ddp=True) needs torch.distributed initialised (run under torchrun)")

    dmodel_lr_scale = (model_dim / LR_REFERENCE_DIM) ** -0.5
    adam_groups = [
        dict(params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale),
        dict(params=embedding_params, lr=embedding_lr * dmodel_lr_scale),
    ]
    adamw_kwargs = dict(betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=weight_decay)
    if ddp:
        adamw = DistAdamW(adam_groups, **adamw_kwargs)
        muon = DistMuon(matrix_params, lr=matrix_lr, momentum=0.95)
    else:
        on_cuda = all(p.is_cuda for group in adam_groups for p in group["params"])
        adamw = torch.optim.AdamW(adam_groups, fused=on_cuda or None, **adamw_kwargs)
        muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95)
    optimizers = [adamw, muon]
    for opt, kind in zip(optimizers, ("adamw", "muon")):
        for group in opt.param_groups:
            group["lr"] *= init_lr_frac
            group["initial_lr"] = group["lr"]  # the LR schedule multiplies this
            group["kind"] = kind  # lets a training loop find the Muon groups (momentum warmup)
    return optimizers


def build_adamw(param_groups: list[dict], *, ddp: bool, betas=(0.9, 0.95), eps: float = 1e-8,
                weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """
    Plain AdamW over the given groups (each with params and lr): DistAdamW under torchrun,
    torch's fused AdamW on CUDA otherwise. Every group records initial_lr for set_lr_multiplier.
    Used where every parameter gets AdamW (the reward model, GRPO), not nanochat's Muon split.
    """
    if ddp and not dist.is_initialized():
        raise RuntimeError("build_adamw(ddp=True) needs torch.distributed initialised (run under torchrun)")
    kwargs = dict(betas=betas, eps=eps, weight_decay=weight_decay)
    if ddp:
        optimizer = DistAdamW(param_groups, **kwargs)
    else:
        on_cuda = all(p.is_cuda for group in param_groups for p in group["params"])
        optimizer = torch.optim.AdamW(param_groups, fused=on_cuda or None, **kwargs)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def set_lr_multiplier(optimizers, lrm: float):
    """Every group's learning rate to lrm times its initial_lr (the schedules' one way to move the LR)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm


def set_muon_momentum(optimizers, momentum: float):
    """The momentum of every Muon group (build_optimizers marks them kind "muon"); nanochat warms it up."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if group.get("kind") == "muon":
                group["momentum"] = momentum


def grad_accum_steps(total: int, per_micro: int, total_flag: str, per_micro_terms: str) -> int:
    """Micro-batches per optimizer step: the step's total (--total_flag) must be a whole number of them."""
    if total % per_micro != 0:
        raise ValueError(f"--{total_flag}={total} must be a multiple of {per_micro_terms} = {per_micro}")
    return total // per_micro


def step_optimizers(model, optimizers, lrm: float, grad_clip: float, muon_momentum: float | None = None):
    """
    One update from the accumulated gradients: the scheduled learning rate (and Muon momentum), the
    synchronised gradient clipped when grad_clip > 0, every optimizer stepped, the gradients cleared.
    Returns the gradient norm before clipping, or None when grad_clip is 0.
    """
    set_lr_multiplier(optimizers, lrm)
    if muon_momentum is not None:
        set_muon_momentum(optimizers, muon_momentum)
    grad_norm = clip_grad_norm_(optimizers, grad_clip) if grad_clip > 0 else None
    for optimizer in optimizers:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return grad_norm


def check_finite_loss(loss: float, step: int):
    """Stop a diverging run at the step where its loss stopped being a number."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss} at step {step}; lower the learning rates")


def _is_distributed(opt) -> bool:
    return isinstance(opt, (DistAdamW, DistMuon))


@torch.no_grad()
def clip_grad_norm_(optimizers, max_norm: float) -> torch.Tensor:
    """
    Scale gradients so the global L2 norm of the synchronised gradient is at most
    max_norm; returns that norm before clipping. Call after backward, before step().

    Plain optimizers (one process): torch.nn.utils.clip_grad_norm_ on their params.
    Distributed optimizers: this triggers their gradient reduce early, sums the
    squared norms of the averaged shards each rank owns, all-reduces that sum (so
    every rank gets the same norm and scale), scales the owned shards in place, and
    step() then applies those. Mixing the two kinds is refused.
    """
    distributed = [_is_distributed(opt) for opt in optimizers]
    if not any(distributed):
        params = [p for opt in optimizers for group in opt.param_groups for p in group["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not all(distributed):
        raise ValueError("clip_grad_norm_ got a mix of distributed and plain optimizers; "
                         "use build_optimizers(ddp=...) so they are all of one kind")
    owned = [item for opt in optimizers for item in opt.synchronised_grads()]
    device = owned[0][0].device if owned else torch.device("cpu")
    squared = torch.zeros((), dtype=torch.float32, device=device)
    for grad, counts in owned:
        if counts:
            squared += grad.float().pow(2).sum()
    dist.all_reduce(squared, op=dist.ReduceOp.SUM)
    total_norm = squared.sqrt()
    # Same rule as torch.nn.utils.clip_grad_norm_, so single- and multi-process runs agree.
    scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for grad, _ in owned:
        grad.mul_(scale.to(grad.dtype))
    return total_norm
