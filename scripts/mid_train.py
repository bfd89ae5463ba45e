"""
Midtrain the base model on conversations: chat format, multiple choice, tool use, spelling.

    python -m scripts.mid_train
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --device_batch_size=16

Like pretraining, but the documents are conversations rendered with the chat special tokens
and packed end to end (nanochat/chat_data.py), and only the assistant's tokens are targets.
One epoch of the mixture by default; the learning rate is constant, then decays linearly to 0
over the last 20% of the epoch. Writes outs/mid/ (ckpt.pt, ckpt_<step>.pt, config.json,
training_log.txt, logs/) and the "mid" section of the report. `--resume=true` continues from
the newest checkpoint exactly (weights, optimizer, data position, RNG, step).
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.chat_data import PackedConversationLoader, backward_token_mean
from nanochat.checkpoint_manager import find_stage_checkpoint, load_model, save_checkpoint, start_or_resume
from nanochat.common import (autocast_context, compute_cleanup, compute_init, device_peak_flops, peak_memory_gb, print0, stage_dir,
                             synchronized_time)
from nanochat.flags import flags_dict, opt, parse_flags
from nanochat.fp8 import use_fp8
from nanochat.loss_eval import evaluate_bpb
from nanochat.muon import muon_momentum
from nanochat.optim import check_finite_loss, grad_accum_steps, step_optimizers
from nanochat.report import get_report
from nanochat.run_logger import RunLogger
from nanochat.schedules import is_due, lr_multiplier, lr_multiplier_at_progress
from nanochat.tokenizer import get_token_bytes
from tasks.common import TaskMixture
from tasks.customjson import IdentityConversations
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee


@dataclass
class Config:
    """Midtrain a base model on a mixture of conversations."""
    run: str = opt("dummy", help="wandb run name; 'dummy' logs to TensorBoard only")
    device_type: str = opt("", help="cuda|cpu|mps; empty autodetects")
    seed: int = 42
    source: str = opt("base", help="stage name or checkpoint path to start from")
    # batch
    max_seq_len: int = opt(-1, help="tokens per row; -1 uses the source model's sequence_len", min=1, sentinel=-1)
    device_batch_size: int = opt(32, help="rows per micro-batch per device", min=1)
    total_batch_size: int = opt(524288, help="tokens per optimizer step across all ranks", min=1)
    num_iterations: int = opt(-1, help="optimizer steps; -1 runs one epoch of the mixture", min=1, sentinel=-1)
    # optimisation
    embedding_lr: float = opt(0.2, min=0)
    unembedding_lr: float = opt(0.004, min=0)
    matrix_lr: float = opt(0.02, min=0)
    init_lr_frac: float = opt(1.0, help="every learning rate starts at this fraction of its base value", above=0)
    weight_decay: float = opt(0.0, min=0)
    warmdown_ratio: float = opt(0.2, help="linear decay to final_lr_frac over this last fraction of training",
                                min=0, max=1)
    final_lr_frac: float = opt(0.0, min=0, max=1)
    grad_clip: float = opt(1.0, help="clip the synchronised gradient norm; 0 disables", min=0)
    # data: the generated spelling tasks have no natural size
    simple_spelling_size: int = opt(200_000, help="'spell the word' conversations in the mixture", min=0)
    spelling_bee_size: int = opt(80_000, help="'how many r in strawberry' conversations in the mixture", min=0)
    # evaluation, checkpoints
    eval_every: int = opt(150, help="validation bpb every this many steps; -1 only at the end", min=1, sentinel=-1)
    eval_tokens: int = opt(20 * 524288, help="validation tokens per evaluation", min=1)
    save_every: int = opt(-1, help="intermediate checkpoint interval; -1 saves only at the end", min=1, sentinel=-1)
    keep_checkpoints: int = opt(2, help="intermediate checkpoints kept (the final ckpt.pt always is)", min=1)
    resume: bool = opt(False, help="continue from the newest checkpoint in the output folder")
    fp8: bool = opt(False, help="fp8 matmuls in the transformer blocks (nanochat/fp8.py; needs an H100-class GPU)")
    compile: bool = opt(True, help="torch.compile the model (CUDA only)")
    log_every: int = opt(1, help="print and log every this many steps", min=1)
    out_dir: str = opt("", help="defaults to outs/mid")


def train_mixture(cfg: Config) -> TaskMixture:
    return TaskMixture([
        SmolTalk(split="train"),  # 460K general conversations
        MMLU(subset="auxiliary_train", split="train"),  # 100K multiple choice (ARC, MCTest, OBQA, RACE)
        GSM8K(subset="main", split="train"),  # 8K grade-school math with calculator calls
        IdentityConversations(),  # who the model is, twice: it is small and matters
        IdentityConversations(),
        SimpleSpelling(size=cfg.simple_spelling_size, split="train"),
        SpellingBee(size=cfg.spelling_bee_size, split="train"),
    ])


def val_mixture() -> TaskMixture:
    # MMLU and GSM8K cut so that the sources weigh about what they weigh in training
    return TaskMixture([SmolTalk(split="test"), MMLU(subset="all", split="test", stop=5200),
                        GSM8K(subset="main", split="test", stop=420)])


def global_max(value: float, device) -> float:
    """The largest value over all ranks (every rank gets the same answer)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def main(argv=None):
    cfg = parse_flags(Config, argv)
    ddp, rank, local_rank, world_size, device = compute_init(cfg.device_type or None, seed=cfg.seed)
    master = rank == 0
    out_dir = Path(cfg.out_dir) if cfg.out_dir else stage_dir("mid")
    autocast = autocast_context(device)

    source_path = find_stage_checkpoint(cfg.source)
    model, tokenizer, _ = load_model(source_path, device, phase="train")
    token_bytes = get_token_bytes(device)
    T = model.fit_seq_len(cfg.max_seq_len)
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    print0(f"midtraining {source_path}: {model.config} | {num_params:,} parameters")

    tokens_per_micro = cfg.device_batch_size * T * world_size
    grad_accum = grad_accum_steps(cfg.total_batch_size, tokens_per_micro, "total_batch_size",
                                  "device_batch_size * max_seq_len * world_size")
    print0(f"{cfg.device_batch_size} x {T} tokens per micro-batch per rank | grad accumulation {grad_accum}")

    optimizers = model.setup_optimizers(unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                        matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay, ddp=ddp,
                                        init_lr_frac=cfg.init_lr_frac)
    if cfg.fp8:
        print0(f"fp8 matmuls in {use_fp8(model)} Linear layers of the blocks")
    train_model = torch.compile(model, dynamic=False) if (cfg.compile and device.type == "cuda") else model

    meta = {"stage": "mid", "init_from": str(source_path), "model_config": asdict(model.config),
            "train_args": flags_dict(cfg), "max_seq_len": T, "world_size": world_size}
    step, loader_state, extra, resumed_step = start_or_resume(out_dir, cfg.resume, model, optimizers, device,
                                                  num_iterations=cfg.num_iterations if cfg.num_iterations > 0 else None)
    logger = RunLogger(out_dir, run=cfg.run, config=meta, enabled=master, start_step=step)

    train_data, val_data = train_mixture(cfg), val_mixture()
    print0(f"mixture: {len(train_data):,} training and {len(val_data):,} validation conversations")
    loader = PackedConversationLoader(tokenizer, train_data, cfg.device_batch_size, T, rank=rank,
                                      world_size=world_size, device=device, resume_state=loader_state)
    eval_steps = max(1, cfg.eval_tokens // tokens_per_micro)
    peak_flops = device_peak_flops(device) * world_size

    # what the report sums over the whole run, carried through resumes
    extra = extra or {"min_val_bpb": float("inf"), "trained_tokens": 0, "training_time_s": 0.0}
    val_bpb, loss_value = float("nan"), float("nan")
    while True:
        # The epoch ends when any rank's walk has wrapped; every rank must agree to stop together.
        progress = global_max(loader.progress, device)
        is_last = step == cfg.num_iterations if cfg.num_iterations > 0 else progress >= 1.0
        # ---- evaluation before the step, so step 0 and the final model are both measured
        if is_due(step, cfg.eval_every, is_last, at_start=True):
            model.eval()
            val_loader = PackedConversationLoader(tokenizer, val_data, cfg.device_batch_size, T, rank=rank,
                                                  world_size=world_size, device=device)
            with autocast:
                val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
            extra["min_val_bpb"] = min(extra["min_val_bpb"], val_bpb)
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            logger.log(step, {"val/bpb": val_bpb})
            model.train()
        if is_due(step, cfg.save_every, is_last) and step != resumed_step:  # already saved: we resumed from it
            save_checkpoint(out_dir, step, model, optimizers, meta={**meta, "val_bpb": val_bpb},
                            loader_state=loader.state_dict(), extra=extra, final=is_last, keep=cfg.keep_checkpoints)
        if is_last:
            break

        # ---- one optimizer step over grad_accum micro-batches
        t0 = synchronized_time(device)
        micro_batches = [next(loader) for _ in range(grad_accum)]
        if cfg.num_iterations > 0:
            lrm = lr_multiplier(step, cfg.num_iterations, 0.0, cfg.warmdown_ratio, cfg.final_lr_frac)
        else:
            lrm = lr_multiplier_at_progress(min(progress, 1.0), 0.0, cfg.warmdown_ratio, cfg.final_lr_frac)
        loss, num_tokens = backward_token_mean(train_model, micro_batches, autocast)
        grad_norm = step_optimizers(model, optimizers, lrm, cfg.grad_clip, muon_momentum(step))
        dt = synchronized_time(device) - t0
        step += 1

        # ---- logging: the loss is the mean over every trainable token of the step
        loss_value, num_tokens = loss.item(), int(num_tokens.item())
        check_finite_loss(loss_value, step)
        extra["trained_tokens"] += num_tokens
        if step > 10:
            extra["training_time_s"] += dt  # the first steps include compilation
        tok_per_sec = cfg.total_batch_size / dt  # every token processed, trainable or not
        if step % cfg.log_every == 0 or step == cfg.num_iterations:
            print0(f"step {step:05d} ({100 * min(progress, 1.0):.1f}%) | loss {loss_value:.4f} | lrm {lrm:.3f} "
                   f"| trained tokens {num_tokens:,} | dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f}")
            mfu = 100 * flops_per_token * tok_per_sec / peak_flops
            logger.log(step, {"train/loss": loss_value, "train/lr": lrm * cfg.init_lr_frac * cfg.matrix_lr,
                              "train/lrm": lrm, "train/num_tokens": num_tokens, "train/progress": progress,
                              "train/tok_per_sec": tok_per_sec, "train/dt": dt,
                              "train/mfu": mfu if math.isfinite(mfu) else None,  # no peak FLOPs figure for CPUs
                              "train/grad_norm": grad_norm})

    summary = {
        "Source": str(source_path), "Iterations": step, "Training conversations": len(train_data),
        "Sequence length": T, "Grad accumulation steps": grad_accum, "DDP world size": world_size,
        "Trained (assistant) tokens": extra["trained_tokens"], "Final training loss": loss_value,
        "Minimum validation bpb": extra["min_val_bpb"], "Final validation bpb": val_bpb,
        "Peak memory (GB)": peak_memory_gb(device), "Training time (min, excluding first 10 steps)": extra["training_time_s"] / 60,
    }
    print0(summary)
    get_report().log(stage="mid", section="Midtraining", data=[flags_dict(cfg), summary])
    logger.close()
    compute_cleanup()
    return summary


if __name__ == "__main__":
    main()
