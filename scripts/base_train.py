"""
Pretrain the base model on FineWeb-Edu (or the bundled sample when no shards are present).

    python -m scripts.base_train --depth=20
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20 --run=d20

Writes outs/base/ (ckpt.pt, ckpt_<step>.pt, config.json, training_log.txt, logs/) and the
"base" section of the report. `--resume=true` continues from the newest checkpoint exactly.
`--identical_batches=true` makes any world size train and validate on the tokens one process
would (a check that N processes train like 1; dev/bench_scaling runs it).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import save_checkpoint, start_or_resume
from nanochat.common import (autocast_context, compute_cleanup, compute_init, device_peak_flops, peak_memory_gb, print0,
                             stage_dir, synchronized_time)
from nanochat.dataloader import DistributedTokenLoader
from nanochat.flags import flags_dict, opt, parse_flags
from nanochat.fp8 import use_fp8
from nanochat.gpt import GPT, config_from_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.muon import muon_momentum
from nanochat.optim import check_finite_loss, grad_accum_steps, step_optimizers
from nanochat.report import get_report
from nanochat.run_logger import RunLogger
from nanochat.schedules import is_due, lr_multiplier
from nanochat.tokenizer import get_token_bytes, get_tokenizer


@dataclass
class Config:
    """Pretrain a GPT base model."""
    run: str = opt("dummy", help="wandb run name; 'dummy' logs to TensorBoard only")
    device_type: str = opt("", help="cuda|cpu|mps; empty autodetects")
    seed: int = 42
    # model
    depth: int = opt(20, help="layers; width = 64*depth, head dim 128", min=1)
    n_kv_head: int = opt(-1, help="key/value heads for GQA; -1 means as many as query heads", min=1, sentinel=-1)
    max_seq_len: int = opt(2048, help="tokens per row", min=1)
    # horizon: the first of these that is set wins
    num_iterations: int = opt(-1, help="optimizer steps; -1: set by target_flops, else target_param_data_ratio",
                              min=1, sentinel=-1)
    target_flops: float = opt(-1.0, help="stop after this many training FLOPs; -1: unset", above=0, sentinel=-1)
    target_param_data_ratio: float = opt(20.0, help="tokens per parameter (Chinchilla: 20)", above=0)
    # batch
    device_batch_size: int = opt(32, help="sequences per micro-batch per device", min=1)
    total_batch_size: int = opt(524288, help="tokens per optimizer step across all ranks", min=1)
    identical_batches: bool = opt(False, help="every rank reads the whole stream and takes every world_size-th window, "
                                  "so any world size trains and validates on the same tokens per step as one "
                                  "process (to check that N processes train like 1); each rank tokenizes "
                                  "world_size times the text, so not for the speedrun")
    # optimisation
    embedding_lr: float = opt(0.2, min=0)
    unembedding_lr: float = opt(0.004, min=0)
    matrix_lr: float = opt(0.02, min=0)
    weight_decay: float = opt(0.0, min=0)
    grad_clip: float = opt(1.0, help="clip the synchronised gradient norm; 0 disables", min=0)
    warmup_ratio: float = opt(0.0, min=0, max=1)
    warmdown_ratio: float = opt(0.2, min=0, max=1)
    final_lr_frac: float = opt(0.0, min=0, max=1)
    # evaluation, sampling, checkpoints
    eval_every: int = opt(250, help="validation bpb every this many steps; -1 only at the end", min=1, sentinel=-1)
    eval_tokens: int = opt(20 * 524288, help="validation tokens per evaluation", min=1)
    core_metric_every: int = opt(2000, help="-1 disables CORE during training", min=1, sentinel=-1)
    core_metric_max_per_task: int = opt(500, help="CORE items per task in those evaluations; -1 scores all",
                                        min=1, sentinel=-1)
    sample_every: int = opt(2000, help="-1 disables samples", min=1, sentinel=-1)
    save_every: int = opt(1000, help="intermediate checkpoint interval; -1 saves only at the end", min=1, sentinel=-1)
    keep_checkpoints: int = opt(2, help="intermediate checkpoints kept (the final ckpt.pt always is)", min=1)
    resume: bool = opt(False, help="continue from the newest checkpoint in the output folder")
    fp8: bool = opt(False, help="fp8 matmuls in the transformer blocks (nanochat/fp8.py; needs an H100-class GPU)")
    compile: bool = opt(True, help="torch.compile the model (CUDA only)")
    log_every: int = opt(1, help="print and log every this many steps", min=1)
    out_dir: str = opt("", help="defaults to outs/base")


def main(argv=None):
    cfg = parse_flags(Config, argv)
    ddp, rank, local_rank, world_size, device = compute_init(cfg.device_type or None, seed=cfg.seed)
    master = rank == 0
    out_dir = Path(cfg.out_dir) if cfg.out_dir else stage_dir("base")
    autocast = autocast_context(device)

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device)
    model_config = config_from_depth(cfg.depth, tokenizer.get_vocab_size(), cfg.max_seq_len,
                                     None if cfg.n_kv_head < 0 else cfg.n_kv_head)
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    print0(f"model: {model_config} | {num_params:,} parameters | {flops_per_token:.3e} FLOPs/token")

    # Gradient accumulation reaches the requested total batch from what fits per device.
    tokens_per_micro = cfg.device_batch_size * cfg.max_seq_len * world_size
    grad_accum = grad_accum_steps(cfg.total_batch_size, tokens_per_micro, "total_batch_size",
                                  "device_batch_size * max_seq_len * world_size")
    # Validation takes eval_tokens // tokens_per_micro windows per rank; only when that divides exactly
    # do all world sizes validate on the same tokens, which is what --identical_batches promises.
    if cfg.identical_batches and cfg.eval_tokens % tokens_per_micro != 0:
        raise ValueError(f"--identical_batches needs --eval_tokens={cfg.eval_tokens} to be a multiple of "
                         f"device_batch_size * max_seq_len * world_size = {tokens_per_micro}, so every world size "
                         f"validates on the same tokens")

    if cfg.num_iterations > 0:
        num_iterations = cfg.num_iterations
    elif cfg.target_flops > 0:
        num_iterations = round(cfg.target_flops / (flops_per_token * cfg.total_batch_size))
    else:
        num_iterations = cfg.target_param_data_ratio * num_params // cfg.total_batch_size
    num_iterations = max(1, int(num_iterations))
    total_tokens = num_iterations * cfg.total_batch_size
    print0(f"grad accumulation {grad_accum} | {num_iterations:,} steps | {total_tokens:,} tokens "
           f"| {total_tokens / num_params:.1f} tokens/param | {flops_per_token * total_tokens:.3e} FLOPs")

    optimizers = model.setup_optimizers(unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                        matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay, ddp=ddp)
    if cfg.fp8:
        print0(f"fp8 matmuls in {use_fp8(model)} Linear layers of the blocks")
    train_model = torch.compile(model, dynamic=False) if (cfg.compile and device.type == "cuda") else model

    meta = {"stage": "base", "init_from": None, "model_config": model_config.__dict__, "train_args": flags_dict(cfg),
            "num_iterations": num_iterations, "world_size": world_size}
    step, loader_state, extra, resumed_step = start_or_resume(out_dir, cfg.resume, model, optimizers, device,
                                                              num_iterations=num_iterations)
    logger = RunLogger(out_dir, run=cfg.run, config=meta, enabled=master, start_step=step)

    train_loader = DistributedTokenLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, "train",
                                          rank=rank, world_size=world_size, device=device, resume_state=loader_state,
                                          identical_batches=cfg.identical_batches)

    def make_val_loader():
        return DistributedTokenLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, "val",
                                      rank=rank, world_size=world_size, device=device,
                                      identical_batches=cfg.identical_batches)

    peak_flops = device_peak_flops(device) * world_size
    # The loader runs one batch ahead of training; a checkpoint stores the position of the batch not yet
    # consumed, so a resumed run starts with exactly the batch the uninterrupted run would have used.
    pending_state = train_loader.state_dict()
    x, y = next(train_loader)
    # running figures a resumed run carries on from its checkpoint, so logs and the report cover the whole run
    extra = extra or {"smooth_loss": 0.0, "min_val_bpb": None, "total_time": 0.0}
    smooth_loss, total_time = extra["smooth_loss"], extra["total_time"]
    min_val_bpb = float("inf") if extra["min_val_bpb"] is None else extra["min_val_bpb"]
    val_bpb, core_score = float("nan"), float("nan")
    last_step = num_iterations

    while True:
        is_last = step == last_step
        # ---- periodic evaluation (before the step, so step 0 and the final model are measured)
        if is_due(step, cfg.eval_every, is_last, at_start=True):
            model.eval()
            eval_steps = max(1, cfg.eval_tokens // tokens_per_micro)
            with autocast:
                val_bpb = evaluate_bpb(model, make_val_loader(), eval_steps, token_bytes)
            min_val_bpb = min(min_val_bpb, val_bpb)
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            logger.log(step, {"val/bpb": val_bpb})
            model.train()
        if cfg.core_metric_every > 0 and is_due(step, cfg.core_metric_every, is_last):
            from nanochat.core_eval import evaluate_core
            model.eval()
            with autocast:
                core = evaluate_core(model, tokenizer, device, max_per_task=cfg.core_metric_max_per_task)
            core_score = core["core"]
            print0(f"step {step:05d} | CORE {core_score:.4f}")
            logger.log(step, {"val/core": core_score})
            model.train()
        if master and cfg.sample_every > 0 and is_due(step, cfg.sample_every, is_last):
            from nanochat.engine import Engine
            model.eval()
            prompts = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, "
                       "then tomorrow will be", "The opposite of hot is", "The planets of the solar system are:"]
            bos = tokenizer.get_bos_token_id()
            with autocast:
                outs, _ = Engine(model, tokenizer).generate_batch(
                    [tokenizer.encode(p, prepend=bos) for p in prompts], num_samples=1, max_tokens=16, temperature=0.0)
            for p, o in zip(prompts, outs):
                line = f"sample: {p}{tokenizer.decode(o[0])}"
                print0(line)
                logger.text(line)
            model.train()
        if is_due(step, cfg.save_every, is_last) and step != resumed_step:  # already saved: we resumed from it
            save_checkpoint(out_dir, step, model, optimizers,
                            meta={**meta, "step": step, "val_bpb": val_bpb if math.isfinite(val_bpb) else None},
                            loader_state=pending_state, final=is_last, keep=cfg.keep_checkpoints,
                            extra={"smooth_loss": smooth_loss, "total_time": total_time,
                                   "min_val_bpb": min_val_bpb if math.isfinite(min_val_bpb) else None})
        if is_last:
            break

        # ---- one optimizer step: grad_accum micro-batches, then schedules, clip and update
        t0 = synchronized_time(device)
        loss_sum = torch.zeros((), device=device)  # stays on the device: no host sync per micro-batch
        for micro in range(grad_accum):
            with autocast:
                loss = train_model(x, y)
            train_loss = loss.detach()
            loss_sum += train_loss
            (loss / grad_accum).backward()
            pending_state = train_loader.state_dict()
            x, y = next(train_loader)  # prefetch while the GPU works on the backward pass
        lrm = lr_multiplier(step, num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
        grad_norm = step_optimizers(model, optimizers, lrm, cfg.grad_clip, muon_momentum(step))
        dt = synchronized_time(device) - t0
        step += 1

        # ---- logging: one scalar collective and one host sync per step; tokens/s counts every micro-batch
        # of every rank. The batch loss is the exact mean over the step's whole global batch (every
        # micro-batch has the same token count); gloo has no AVG, so sum and divide.
        if ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        loss_value, batch_loss = torch.stack([train_loss, loss_sum / (grad_accum * world_size)]).tolist()
        check_finite_loss(batch_loss, step)  # the same number on every rank, so all of them stop here together
        smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
        debiased = smooth_loss / (1 - 0.9 ** step) if step < 1000 else smooth_loss
        if step > (resumed_step or 0) + 10:
            total_time += dt  # the first steps of every session include compilation
        tok_per_sec = cfg.total_batch_size / dt
        mfu = 100 * flops_per_token * tok_per_sec / peak_flops
        if step % cfg.log_every == 0 or step == last_step:
            print0(f"step {step:05d}/{num_iterations} | loss {debiased:.4f} | batch loss {batch_loss:.4f} "
                   f"| lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | mfu {mfu:.1f}% "
                   f"| mem {peak_memory_gb(device):.1f}GB")
            logger.log(step, {"train/loss": debiased, "train/batch_loss": batch_loss, "train/lr": lrm * cfg.matrix_lr,
                              "train/lrm": lrm, "train/tok_per_sec": tok_per_sec, "train/mfu": mfu, "train/dt": dt,
                              "train/grad_norm": grad_norm})

    summary = {
        "Parameters": num_params, "Depth": cfg.depth, "FLOPs per token": f"{flops_per_token:e}",
        "Iterations": num_iterations, "Training tokens": total_tokens, "Tokens per parameter": total_tokens / num_params,
        "DDP world size": world_size, "Minimum validation bpb": min_val_bpb, "Final validation bpb": val_bpb,
        # not "CORE": the report's summary table takes CORE from base_eval alone
        "CORE at the last in-training evaluation": core_score if math.isfinite(core_score) else "not measured (--core_metric_every)",
        "Peak memory (GB)": peak_memory_gb(device),
        "Training time (min, excluding each session's first 10 steps)": total_time / 60,
    }
    print0(summary)
    get_report().log(stage="base", section="Base model training", data=[flags_dict(cfg), summary])
    logger.close()
    compute_cleanup()


if __name__ == "__main__":
    main()
