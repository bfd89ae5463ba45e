"""
Optional fp8 training matmuls (base_train and mid_train --fp8): the transformer blocks' Linear
layers run their forward and both backward matmuls through torch._scaled_mm with tensorwise
scales, activations and weights in e4m3, gradients in e5m2 (more range, less precision).
Weights stay in their own dtype (the optimizer never sees fp8); embedding and lm_head stay bf16.

    from nanochat.fp8 import use_fp8
    use_fp8(model)   # before torch.compile; undo by loading the checkpoint into a fresh model

Needs a GPU with fp8 tensor cores (H100: compute capability 8.9+); torch also runs it on CPU,
which the tests use.
"""

import torch
import torch.nn as nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def to_fp8(t: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t scaled so its largest magnitude is the format's largest, in fp8; the inverse scale, fp32)."""
    amax = t.detach().abs().max().float().clamp(min=1e-12)  # an all-zero tensor keeps a finite scale
    scale = torch.finfo(dtype).max / amax
    t8 = (t.float() * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    return t8, scale.reciprocal()


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column-major: _scaled_mm's second operand must be."""
    return t.t().contiguous().t()


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ w.T with x (M, K), w (N, K); the three matmuls in fp8, results in out_dtype."""

    @staticmethod
    def forward(ctx, x, w, out_dtype):
        x8, x_inv = to_fp8(x, E4M3)
        w8, w_inv = to_fp8(w, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.out_dtype, ctx.w_dtype = out_dtype, w.dtype
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = to_fp8(grad_y, E5M2)
        # dx = dy @ w: (M, N) @ (N, K); dw = dy.T @ x: (N, M) @ (M, K), accumulated in fp32
        grad_x = torch._scaled_mm(g8, _column_major(w8), scale_a=g_inv, scale_b=w_inv, out_dtype=ctx.out_dtype)
        grad_w = torch._scaled_mm(g8.t().contiguous(), _column_major(x8), scale_a=g_inv, scale_b=x_inv,
                                  out_dtype=torch.float32)
        return grad_x, grad_w.to(ctx.w_dtype), None


class Fp8Linear(nn.Linear):
    """nn.Linear (no bias) whose matmuls run in fp8; the output dtype is what the bf16 layer's would be."""

    def forward(self, x):
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        y = _Fp8Matmul.apply(x.reshape(-1, x.size(-1)), self.weight, out_dtype)
        return y.view(*x.shape[:-1], -1)


def use_fp8(model) -> int:
    """Switch every Linear inside the transformer blocks to Fp8Linear in place; returns how many."""
    count = 0
    for module in model.transformer.h.modules():
        if type(module) is nn.Linear:
            if module.bias is not None or module.in_features % 16 or module.out_features % 16:
                raise ValueError(f"fp8 matmuls need bias-free layers with sizes divisible by 16, got "
                                 f"{module.in_features} -> {module.out_features}")
            module.__class__ = Fp8Linear
            count += 1
    return count
