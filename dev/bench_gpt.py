"""
Training throughput of the GPT at base_train's shape: tokens/s, MFU and peak memory, with the
reference figures printed beside ours (SPEC section 7: d20, B=32, T=2048 on one H100;
nanochat Oct 2025: 133.9k tok/s, 47.3% MFU, peak 75.4 GB; target >= 154k tok/s, <= 65 GB).

    python -m dev.bench_gpt                                  # chunked loss, cuDNN attention
    python -m dev.bench_gpt --loss_impl=plain --attn=auto    # nanochat's way: all fp32 logits, flash attention

One timed step is what base_train does per optimizer step: gradient accumulation over
total_batch_size tokens (8 micro-batches of 32 x 2048 on one GPU), gradient clipping, then the
real optimizers (Muon + AdamW from GPT.setup_optimizers). Random tokens and a fresh model: the arithmetic is the
same as on real data. Before timing, the chosen loss and attention are checked against the
reference ones (plain loss, PyTorch's attention order) on two sequences, eagerly.
"""

import time
from dataclasses import dataclass

import torch

from nanochat.common import autodetect_device_type, peak_memory_gb, synchronize
from nanochat.flags import opt, parse_flags
from nanochat.fp8 import use_fp8
from nanochat import lm_loss
from nanochat.gpt import ATTENTION_BACKENDS, GPT, config_from_depth
from nanochat.optim import clip_grad_norm_

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s, the MFU denominator nanochat reports against
REFERENCE = "nanochat Oct 2025 (1xH100, d20, B=32, T=2048): 133.9k tok/s | MFU 47.3% | peak 75.4 GB; target >= 154k tok/s, <= 65 GB"


@dataclass
class Config:
    device_type: str = opt("", help="cuda|cpu|mps (empty: autodetect)")
    depth: int = opt(-1, help="model depth (-1: 20 on CUDA, 2 elsewhere)")
    vocab_size: int = opt(-1, help="vocabulary (-1: 65536 on CUDA, 1024 elsewhere)")
    batch_size: int = opt(-1, help="sequences per micro-batch (-1: 32 on CUDA, 2 elsewhere)")
    seq_len: int = opt(-1, help="tokens per sequence (-1: 2048 on CUDA, 64 elsewhere)")
    total_batch_size: int = opt(-1, help="tokens per optimizer step (-1: 524,288 on CUDA as base_train, one micro-batch elsewhere)")
    loss_impl: str = opt("chunked", help="training loss", choices=["chunked", "plain"])
    attn: str = opt("cudnn", help="attention kernel tried first", choices=sorted(ATTENTION_BACKENDS))
    grad_clip: float = opt(1.0, help="gradient-norm clipping before the update, as base_train (0: none)")
    fp8: bool = opt(False, help="fp8 matmuls in the blocks, as base_train --fp8")
    compile: bool = opt(True, help="torch.compile the model (CUDA only)")
    warmup_steps: int = opt(2, help="untimed optimizer steps (compilation happens here)")
    steps: int = opt(4, help="timed optimizer steps")
    chunk_logits: int = opt(0, help="logits per chunk of the chunked loss (0: nanochat.lm_loss.CHUNK_LOGITS)")
    check: bool = opt(True, help="first compare the chosen loss and attention with the reference ones on 2 sequences")
    profile: bool = opt(False, help="print the costliest CUDA kernels of one micro-batch")
    list_saved: bool = opt(False, help="print what one micro-batch keeps for the backward pass, by shape and dtype")


def loss_and_grads(model, x, y, autocast, loss_impl, attn):
    model.loss_impl = loss_impl
    model.set_attention_backend(attn)
    with autocast:
        loss = model(x, y)
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def compare(model, x, y, autocast, reference, candidate):
    """Loss and gradient gaps between two (loss_impl, attn) settings on the same batch."""
    ref_loss, ref_grads = loss_and_grads(model, x, y, autocast, *reference)
    loss, grads = loss_and_grads(model, x, y, autocast, *candidate)
    rel = {n: ((grads[n] - g).norm() / g.norm().clamp(min=1e-30)).item() for n, g in ref_grads.items()}
    worst = max(rel, key=rel.get)
    print(f"check {candidate} vs {reference}: loss {loss:.6f} vs {ref_loss:.6f} | gradient relative error: "
          f"lm_head {rel['lm_head.weight']:.2e}, wte {rel['transformer.wte.weight']:.2e}, worst {worst} {rel[worst]:.2e}")


def print_profile(run_micro_batch, device):
    from torch.profiler import ProfilerActivity, profile
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_micro_batch()
        synchronize(device)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))


def print_saved_tensors(run_micro_batch, tokens, n_layer):
    """Tensors the forward pass hands to autograd, counted once per storage (views share one)."""
    seen, table = set(), {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            entry = table.setdefault((tuple(t.shape), str(t.dtype).removeprefix("torch.")), [0, 0])
            entry[0] += 1
            entry[1] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_micro_batch()
    total = sum(nbytes for _, nbytes in table.values())
    print(f"saved for backward: {total / 1e9:.2f} GB, {total / tokens / n_layer / 1e3:.1f} KB per token per layer")
    for (shape, dtype), (count, nbytes) in sorted(table.items(), key=lambda kv: -kv[1][1]):
        print(f"  {count:4d} x {str(shape):28s} {dtype:9s} {nbytes / 1e9:7.2f} GB")


def main():
    cfg = parse_flags(Config)
    if cfg.chunk_logits > 0:
        lm_loss.CHUNK_LOGITS = cfg.chunk_logits
    device = torch.device(cfg.device_type or autodetect_device_type())
    on_cuda = device.type == "cuda"
    pick = lambda value, cuda_default, cpu_default: value if value > 0 else (cuda_default if on_cuda else cpu_default)
    depth, vocab = pick(cfg.depth, 20, 2), pick(cfg.vocab_size, 65536, 1024)
    B, T = pick(cfg.batch_size, 32, 2), pick(cfg.seq_len, 2048, 64)
    total_batch = pick(cfg.total_batch_size, 524288, B * T)
    if total_batch % (B * T) != 0:
        raise ValueError(f"--total_batch_size={total_batch} must be a multiple of batch_size*seq_len={B * T}")
    grad_accum = total_batch // (B * T)
    if on_cuda:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config_from_depth(depth, vocab, T))
    model.to_empty(device=device)
    model.init_weights()
    optimizers = model.setup_optimizers(ddp=False)
    if cfg.fp8:
        use_fp8(model)
    train_model = torch.compile(model, dynamic=False) if (cfg.compile and on_cuda) else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else torch.autocast("cpu", enabled=False)

    x = torch.randint(0, vocab, (B, T), device=device)
    y = torch.randint(0, vocab, (B, T), device=device)
    if cfg.check:
        if cfg.loss_impl != "plain":
            compare(model, x[:2], y[:2], autocast, ("plain", "auto"), (cfg.loss_impl, "auto"))
        if cfg.attn != "auto":
            compare(model, x[:2], y[:2], autocast, ("plain", "auto"), ("plain", cfg.attn))
    model.loss_impl = cfg.loss_impl
    model.set_attention_backend(cfg.attn)

    activations_gb = []

    def run_micro_batch():
        before = torch.cuda.memory_allocated(device) if on_cuda else 0
        with autocast:
            loss = train_model(x, y)
        if on_cuda:
            activations_gb.append((torch.cuda.memory_allocated(device) - before) / 1e9)
        (loss / grad_accum).backward()
        return loss

    def update():
        if cfg.grad_clip > 0:
            clip_grad_norm_(optimizers, cfg.grad_clip)
        for o in optimizers:
            o.step()
        model.zero_grad(set_to_none=True)

    losses, times = [], []
    for step in range(cfg.warmup_steps + cfg.steps):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(grad_accum):
            loss = run_micro_batch()
        update()  # queued behind the backward pass, as in base_train: no sync in between
        losses.append(loss.item())  # syncs, so the host timer covers the step
        times.append(time.perf_counter() - t0)
    # the update alone, once, for the breakdown (the last step's gradients again)
    for _ in range(grad_accum):
        run_micro_batch()
    synchronize(device)
    t1 = time.perf_counter()
    update()
    synchronize(device)
    optimizer_s = time.perf_counter() - t1
    if cfg.list_saved:
        print_saved_tensors(run_micro_batch, B * T, depth)
        model.zero_grad(set_to_none=True)
    if cfg.profile and on_cuda:
        print_profile(run_micro_batch, device)
        model.zero_grad(set_to_none=True)
    timed = sorted(times[cfg.warmup_steps:])
    step_s = timed[len(timed) // 2]
    tok_per_s = total_batch / step_s
    mfu = model.estimate_flops() * tok_per_s / H100_BF16_PEAK
    print(f"d{depth}, {model.num_params():,} params, vocab {vocab:,}, B={B}, T={T}, grad_accum={grad_accum}, "
          f"loss={cfg.loss_impl}, attn={cfg.attn}, compile={cfg.compile and on_cuda}, fp8={cfg.fp8}, "
          f"device={torch.cuda.get_device_name(device) if on_cuda else device.type}")
    print(f"losses: first {losses[0]:.4f}, last {losses[-1]:.4f}; step times (s): {', '.join(f'{t:.3f}' for t in times)}")
    saved = f" | saved for backward {activations_gb[-1]:.1f} GB" if activations_gb else ""
    print(f"ours:      {tok_per_s:,.0f} tok/s | MFU {100 * mfu:.1f}% of 989 TFLOP/s | peak {peak_memory_gb(device):.1f} GB{saved} "
          f"| median step {step_s * 1000:.0f} ms, clipping and optimizers alone {optimizer_s * 1000:.0f} ms")
    print(f"reference: {REFERENCE}")


if __name__ == "__main__":
    main()
