"""
The language-model loss: lm_head projection, logit soft-cap, cross-entropy, in one function.

The plain way (lm_head -> fp32 logits -> softcap -> F.cross_entropy) keeps several (N, V)
tensors alive for the backward pass: at d20, B=32, T=2048 and V=65,536 that is 4.3 billion
logits, 17 GB per fp32 copy. chunked_softcap_cross_entropy walks the N rows in chunks of
CHUNK_LOGITS logits and, for "mean" and "sum", writes the gradients of hidden states and lm_head
while each chunk's softmax is at hand, so nothing of size (N, V) outlives a chunk and no logit is
computed twice. Per chunk: one matmul, one fused kernel for the log-sum-exp, one for the
gradient at the logits (bf16), and the two gradient matmuls. On one H100 at d20 this is as fast
as the fully compiled plain loss and peaks 5 GB lower (python -m dev.bench_gpt). For "none" the per-row weights of the incoming gradient are unknown until
backward, so backward recomputes each chunk's logits instead.

Both functions count only targets != IGNORE_INDEX. "mean" divides by max(count, 1), so a
batch whose targets are all ignored has loss 0 and zero gradients, never NaN.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1


CHUNK_LOGITS = 2 ** 29  # logits per chunk: 8192 rows at V=65,536; bf16 logits and gradient, 1 GB each


def _softmax_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)  # fp32 for bf16/fp32 matmuls; fp64 stays fp64


def _check(hidden, weight, targets, softcap, reduction):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if hidden.dim() != 2 or targets.dim() != 1 or hidden.size(0) != targets.size(0):
        raise ValueError(f"expected hidden (N, C) and targets (N,), got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if not (0.0 < softcap < float("inf")):
        raise ValueError(f"softcap must be a positive finite number (logits are softcap*tanh(z/softcap)), got {softcap}")
    if weight.size(1) != hidden.size(1):
        raise ValueError(f"lm_head weight {tuple(weight.shape)} does not match hidden width {hidden.size(1)}")


def _reduce(row_losses, valid, reduction):
    if reduction == "none":
        return row_losses
    total = row_losses.sum()
    return total if reduction == "sum" else total / valid.sum().clamp(min=1)


def plain_softcap_cross_entropy(hidden, weight, targets, softcap, reduction="mean"):
    """Reference implementation: materialises all (N, V) logits in fp32."""
    _check(hidden, weight, targets, softcap, reduction)
    logits = F.linear(hidden, weight.to(hidden.dtype)).to(_softmax_dtype(hidden.dtype))
    logits = softcap * torch.tanh(logits / softcap)
    row_losses = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    return _reduce(row_losses, targets != IGNORE_INDEX, reduction)


def _softcapped(z, softcap):
    return softcap * torch.tanh(z.to(_softmax_dtype(z.dtype)) / softcap)


def _row_logsumexp(z, softcap):
    """
    logsumexp over the vocabulary of the soft-capped logits: (n, V) matmul output -> (n,) fp32.
    The soft-cap bounds every logit by softcap, so exp cannot overflow and the usual pass that
    subtracts the row maximum first is not needed: one read of z instead of two.
    """
    if softcap > 30.0:
        return torch.logsumexp(_softcapped(z, softcap), dim=-1)  # exp(softcap) would near fp32's range
    return torch.exp(_softcapped(z, softcap)).sum(dim=-1).log()


def _logit_grads(z, lse, tgt, softcap, row_weight):
    """
    d(sum_i row_weight_i * loss_i) / dz for one chunk, in z's dtype, where z is the matmul
    output before the soft-cap: (softmax - onehot(target)) * row_weight * (1 - tanh^2).
    Rows whose target is IGNORE_INDEX must have row_weight 0.
    """
    s = _softcapped(z, softcap)
    probs = torch.exp(s - lse.unsqueeze(1))
    is_target = torch.arange(z.size(1), device=z.device).unsqueeze(0) == tgt.unsqueeze(1)
    probs = torch.where(is_target, probs - 1.0, probs)
    tanh = s / softcap
    return (probs * row_weight.unsqueeze(1) * (1.0 - tanh * tanh)).to(z.dtype)


def _row_losses(z, lse, tgt, softcap):
    valid = tgt != IGNORE_INDEX
    target_logit = _softcapped(z.gather(1, tgt.clamp(min=0).unsqueeze(1)).squeeze(1), softcap)
    return (lse - target_logit) * valid


_compiled = {}


def _kernel(fn, device):
    """fn compiled on CUDA, eager elsewhere. The log-sum-exp and the gradient are compiled as two
    separate functions on purpose: each becomes one fused kernel that reads the (rows, V) bf16
    logits and writes nothing of that size (the gradient: one bf16 tensor). Compiled together,
    inductor kept the fp32 tanh of every logit in memory between them, 2.5x the traffic."""
    if device.type != "cuda":
        return fn
    if fn not in _compiled:
        # default dynamic=None: static for base_train's fixed chunks; SFT, RL and the evals vary
        # the row count, and after the first recompile the kernels turn shape-generic
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


def _chunk(h, w, tgt, softcap, row_weight=None):
    """Per-row losses of one chunk and, with row_weight (n,), the gradient at the logits (see _logit_grads)."""
    z = F.linear(h, w)
    lse = _kernel(_row_logsumexp, h.device)(z, softcap)
    row_losses = _row_losses(z, lse, tgt, softcap)
    if row_weight is None:
        return row_losses, None
    row_weight = row_weight * (tgt != IGNORE_INDEX)  # an ignored row has loss 0 whatever its logits
    return row_losses, _kernel(_logit_grads, h.device)(z, lse, tgt, softcap, row_weight)


def _add_weight_grad(grad_weight, grad_z, h):
    """grad_weight + grad_z.T @ h, grad_weight in fp32. On CUDA the bf16 product accumulates into
    fp32 inside the matmul (cuBLAS's C += A @ B); elsewhere the product is formed, then added."""
    if grad_z.is_cuda and grad_z.dtype != grad_weight.dtype:
        return torch.addmm(grad_weight, grad_z.t(), h, out_dtype=grad_weight.dtype)
    return grad_weight.add_(grad_z.t() @ h)


def _num_chunk_rows(vocab_size):
    return max(1, CHUNK_LOGITS // vocab_size)


class _ChunkedSoftcapCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, reduction, chunk_rows):
        w = weight.to(hidden.dtype)
        N = hidden.size(0)
        valid = targets != IGNORE_INDEX
        acc_dtype = _softmax_dtype(hidden.dtype)
        row_losses = torch.empty(N, dtype=acc_dtype, device=hidden.device)
        ctx.softcap, ctx.reduction, ctx.chunk_rows = softcap, reduction, chunk_rows
        ctx.weight_dtype = weight.dtype
        if reduction == "none":
            for start in range(0, N, chunk_rows):
                sl = slice(start, start + chunk_rows)
                row_losses[sl], _ = _chunk(hidden[sl], w, targets[sl], softcap, None)
            ctx.save_for_backward(hidden, weight, targets)
            return row_losses
        # mean/sum: the gradient of a scalar loss is known now up to the incoming scalar factor
        count = valid.sum().clamp(min=1).to(acc_dtype)
        scale = 1.0 / count if reduction == "mean" else torch.ones((), dtype=acc_dtype, device=hidden.device)
        row_scale = scale.expand(N)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        for start in range(0, N, chunk_rows):
            sl = slice(start, start + chunk_rows)
            h = hidden[sl]
            row_losses[sl], grad_z = _chunk(h, w, targets[sl], softcap, row_scale[sl])
            grad_hidden[sl] = grad_z @ w
            grad_weight = _add_weight_grad(grad_weight, grad_z, h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return _reduce(row_losses, valid, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction != "none":
            grad_hidden, grad_weight = ctx.saved_tensors
            return grad_hidden * grad_output.to(grad_hidden.dtype), (grad_weight * grad_output).to(ctx.weight_dtype), None, None, None, None
        hidden, weight, targets = ctx.saved_tensors
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden)
        acc_dtype = _softmax_dtype(hidden.dtype)
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        for start in range(0, hidden.size(0), ctx.chunk_rows):
            sl = slice(start, start + ctx.chunk_rows)
            h = hidden[sl]
            _, grad_z = _chunk(h, w, targets[sl], ctx.softcap, grad_output[sl].to(acc_dtype))
            grad_hidden[sl] = grad_z @ w
            grad_weight = _add_weight_grad(grad_weight, grad_z, h)
        return grad_hidden, grad_weight.to(ctx.weight_dtype), None, None, None, None


# Left out of an enclosing torch.compile graph on purpose: inductor treats the chunks as
# independent work and schedules their (rows, V) temporaries to be alive together, which
# ran out of memory at d20 (B=32, T=2048) on an 80 GB H100. Each chunk is compiled on its own.
@torch.compiler.disable
def chunked_softcap_cross_entropy(hidden, weight, targets, softcap, reduction="mean", chunk_rows=None):
    """
    Cross-entropy of softcap*tanh(hidden @ weight.T / softcap) against targets, computed in
    chunks of rows. hidden (N, C), weight (V, C), targets (N,) with IGNORE_INDEX to skip.
    The matmul runs in hidden's dtype (bf16 under autocast), the softmax in fp32.
    """
    _check(hidden, weight, targets, softcap, reduction)
    if torch.is_autocast_enabled(hidden.device.type):
        # what autocast would do to lm_head's matmul (the final RMSNorm may hand over fp32)
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    chunk_rows = chunk_rows or _num_chunk_rows(weight.size(0))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedSoftcapCrossEntropy.apply(hidden, weight, targets, softcap, reduction, chunk_rows)
    # evaluation: the same arithmetic without keeping anything for a backward pass
    w = weight.to(hidden.dtype)
    row_losses = torch.cat([
        _chunk(hidden[s:s + chunk_rows], w, targets[s:s + chunk_rows], softcap, None)[0]
        for s in range(0, hidden.size(0), chunk_rows)
    ])
    return _reduce(row_losses, targets != IGNORE_INDEX, reduction)
