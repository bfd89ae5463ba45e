"""
Supervised fine-tuning: teach the midtrained model to answer, one conversation per row.

    python -m scripts.chat_sft
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --source=mid

Unlike midtraining, conversations are not packed: each row holds one, right-padded to the
longest of its micro-batch (nanochat/chat_data.py), so every row starts at <|bos|> the way the
model is prompted at chat time. Only the assistant's tokens are targets. The learning rate
starts at init_lr_frac of the base values and decays linearly to 0. Writes outs/sft/
(ckpt.pt, ckpt_<step>.pt, config.json, training_log.txt, logs/) and the "sft" section of the
report. `--resume=true` continues from the newest checkpoint exactly.
"""

from dataclasses import asdict, dataclass
from pathlib import Path


from nanochat.chat_data import PaddedConversationLoader, backward_token_mean, token_mean_loss
from nanochat.checkpoint_manager import find_stage_checkpoint, load_model, save_checkpoint, start_or_resume
from nanochat.common import (autocast_context, compute_cleanup, compute_init, peak_memory_gb, print0, stage_dir,
                             synchronized_time)
from nanochat.flags import flags_dict, opt, parse_flags
from nanochat.optim import check_finite_loss, grad_accum_steps, step_optimizers
from nanochat.report import get_report
from nanochat.run_logger import RunLogger
from nanochat.schedules import epoch_steps, is_due, lr_multiplier
from tasks.arc import ARC
from tasks.common import Task, TaskMixture
from tasks.customjson import IdentityConversations
from tasks.gsm8k import GSM8K
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

# multiple choice needs no sampling, so these are cheap enough to watch during training
METRIC_TASKS = ("MMLU", "ARC-Easy")


@dataclass
class Config:
    """Supervised fine-tuning on a mixture of conversations."""
    run: str = opt("dummy", help="wandb run name; 'dummy' logs to TensorBoard only")
    device_type: str = opt("", help="cuda|cpu|mps; empty autodetects")
    seed: int = 42
    source: str = opt("mid", help="stage name or checkpoint path to start from (mid, base, ...)")
    # batch
    max_seq_len: int = opt(-1, help="longest row; longer conversations are cut; -1 uses the model's sequence_len",
                           min=1, sentinel=-1)
    device_batch_size: int = opt(4, help="conversations per micro-batch per device", min=1)
    target_examples_per_step: int = opt(32, help="conversations per optimizer step across all ranks", min=1)
    num_epochs: int = opt(1, min=1)
    num_iterations: int = opt(-1, help="optimizer steps; -1 derives them from num_epochs", min=1, sentinel=-1)
    # optimisation
    embedding_lr: float = opt(0.2, min=0)
    unembedding_lr: float = opt(0.004, min=0)
    matrix_lr: float = opt(0.02, min=0)
    init_lr_frac: float = opt(0.02, help="every learning rate starts at this fraction of its base value", above=0)
    weight_decay: float = opt(0.0, min=0)
    grad_clip: float = opt(1.0, help="clip the synchronised gradient norm; 0 disables", min=0)
    # data
    smoltalk_size: int = opt(10_000, help="SmolTalk conversations in the mixture", min=0)
    simple_spelling_size: int = opt(300, min=0)
    spelling_bee_size: int = opt(300, min=0)
    # evaluation, checkpoints
    eval_every: int = opt(100, help="validation loss every this many steps; -1 only at the end", min=1, sentinel=-1)
    eval_steps: int = opt(100, help="micro-batches per validation", min=1)
    eval_metrics_every: int = opt(200, help="MMLU and ARC-Easy accuracy every this many steps; -1 disables",
                                  min=1, sentinel=-1)
    eval_metrics_max_problems: int = opt(1024, help="problems per task in those evaluations", min=1)
    save_every: int = opt(-1, help="intermediate checkpoint interval; -1 saves only at the end", min=1, sentinel=-1)
    keep_checkpoints: int = opt(2, help="intermediate checkpoints kept (the final ckpt.pt always is)", min=1)
    resume: bool = opt(False, help="continue from the newest checkpoint in the output folder")
    log_every: int = opt(1, help="print and log every this many steps", min=1)
    out_dir: str = opt("", help="defaults to outs/sft")


def train_mixture(cfg: Config) -> Task:
    return TaskMixture([
        ARC(subset="ARC-Easy", split="train"),  # 2.3K
        ARC(subset="ARC-Challenge", split="train"),  # 1.1K
        GSM8K(subset="main", split="train"),  # 8K
        SmolTalk(split="train", stop=cfg.smoltalk_size),  # 10K
        IdentityConversations(),  # 1K
        SimpleSpelling(size=cfg.simple_spelling_size, split="train"),
        SpellingBee(size=cfg.spelling_bee_size, split="train"),
    ])


def main(argv=None, config_cls=Config, wrap_mixture=None):
    """A wrapper (scripts/control_sft.py) may add flags (config_cls, a subclass of Config) and
    reshape the data: wrap_mixture(task, cfg) -> (task, extra config.json fields)."""
    cfg = parse_flags(config_cls, argv)
    ddp, rank, local_rank, world_size, device = compute_init(cfg.device_type or None, seed=cfg.seed)
    master = rank == 0
    out_dir = Path(cfg.out_dir) if cfg.out_dir else stage_dir("sft")
    autocast = autocast_context(device)

    source_path = find_stage_checkpoint(cfg.source)
    model, tokenizer, _ = load_model(source_path, device, phase="train")
    max_seq_len = model.fit_seq_len(cfg.max_seq_len)
    print0(f"fine-tuning {source_path}: {model.config} | {model.num_params():,} parameters")

    grad_accum = grad_accum_steps(cfg.target_examples_per_step, cfg.device_batch_size * world_size,
                                  "target_examples_per_step", "device_batch_size * world_size")
    train_data, val_data, mixture_meta = train_mixture(cfg), SmolTalk(split="test"), {}
    if wrap_mixture is not None:
        train_data, mixture_meta = wrap_mixture(train_data, cfg)
    num_iterations = epoch_steps(cfg.num_iterations, len(train_data), cfg.target_examples_per_step, cfg.num_epochs,
                                 what="conversations in the mixture", per_step_flag="target_examples_per_step")
    print0(f"{len(train_data):,} conversations | {cfg.device_batch_size} per micro-batch per rank | "
           f"grad accumulation {grad_accum} | {num_iterations} steps")

    optimizers = model.setup_optimizers(unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                        matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay, ddp=ddp,
                                        init_lr_frac=cfg.init_lr_frac)
    # Not compiled: every micro-batch has its own width, and recompiling for each costs more than it saves.

    meta = {"stage": "sft", "init_from": str(source_path), "model_config": asdict(model.config),
            "train_args": flags_dict(cfg), "max_seq_len": max_seq_len, "num_iterations": num_iterations,
            "world_size": world_size, "conversations": len(train_data), **mixture_meta}
    step, loader_state, extra, resumed_step = start_or_resume(out_dir, cfg.resume, model, optimizers, device,
                                                  num_iterations=num_iterations)
    logger = RunLogger(out_dir, run=cfg.run, config=meta, enabled=master, start_step=step)
    loader = PaddedConversationLoader(tokenizer, train_data, cfg.device_batch_size, max_seq_len, rank=rank,
                                      world_size=world_size, device=device, resume_state=loader_state)

    # what the report sums over the whole run, carried through resumes
    extra = extra or {"min_val_loss": float("inf"), "trained_tokens": 0, "training_time_s": 0.0}
    val_loss, loss_value, accuracy, metric_tasks = float("nan"), float("nan"), {}, None
    while True:
        is_last = step == num_iterations
        # ---- validation loss (mean per assistant token) on the same batches every time
        if is_due(step, cfg.eval_every, is_last, at_start=True):
            model.eval()
            val_loader = PaddedConversationLoader(tokenizer, val_data, cfg.device_batch_size, max_seq_len, rank=rank,
                                                  world_size=world_size, device=device)
            val_loss = token_mean_loss(model, val_loader, cfg.eval_steps, autocast)
            extra["min_val_loss"] = min(extra["min_val_loss"], val_loss)
            print0(f"step {step:05d} | val loss {val_loss:.4f}")
            logger.log(step, {"val/loss": val_loss})
            model.train()
        if cfg.eval_metrics_every > 0 and is_due(step, cfg.eval_metrics_every, is_last):
            from nanochat.task_eval import run_categorical_eval
            from tasks.eval_tasks import build_task
            metric_tasks = metric_tasks or {name: build_task(name) for name in METRIC_TASKS}
            model.eval()
            with autocast:
                for name, task in metric_tasks.items():
                    accuracy[name] = run_categorical_eval(task, tokenizer, model,
                                                          batch_size=2 * cfg.device_batch_size,
                                                          max_problems=cfg.eval_metrics_max_problems)
            print0(f"step {step:05d} | " + " | ".join(f"{name} {acc:.4f}" for name, acc in accuracy.items()))
            logger.log(step, {f"val/{name.lower().replace('-', '_')}_acc": acc for name, acc in accuracy.items()})
            model.train()
        if is_due(step, cfg.save_every, is_last) and step != resumed_step:  # already saved: we resumed from it
            save_checkpoint(out_dir, step, model, optimizers, meta={**meta, "val_loss": val_loss},
                            loader_state=loader.state_dict(), extra=extra, final=is_last, keep=cfg.keep_checkpoints)
        if is_last:
            break

        # ---- one optimizer step over grad_accum micro-batches
        t0 = synchronized_time(device)
        micro_batches = [next(loader) for _ in range(grad_accum)]
        lrm = lr_multiplier(step, num_iterations, warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0)
        loss, num_tokens = backward_token_mean(model, micro_batches, autocast)
        grad_norm = step_optimizers(model, optimizers, lrm, cfg.grad_clip)
        dt = synchronized_time(device) - t0
        step += 1

        loss_value, num_tokens = loss.item(), int(num_tokens.item())
        check_finite_loss(loss_value, step)
        extra["trained_tokens"] += num_tokens
        extra["training_time_s"] += dt
        if step % cfg.log_every == 0 or step == num_iterations:
            print0(f"step {step:05d}/{num_iterations} | loss {loss_value:.4f} | lrm {lrm:.3f} "
                   f"| trained tokens {num_tokens:,} | dt {dt * 1000:.0f}ms")
            logger.log(step, {"train/loss": loss_value, "train/lr": lrm * cfg.init_lr_frac * cfg.matrix_lr,
                              "train/lrm": lrm, "train/num_tokens": num_tokens, "train/dt": dt,
                              "train/grad_norm": grad_norm})

    summary = {
        "Source": str(source_path), "Training conversations": len(train_data), "Iterations": num_iterations,
        "Grad accumulation steps": grad_accum, "DDP world size": world_size,
        "Trained (assistant) tokens": extra["trained_tokens"], "Final training loss": loss_value,
        "Minimum validation loss": extra["min_val_loss"], "Final validation loss": val_loss,
        "Peak memory (GB)": peak_memory_gb(device), "Training time (min)": extra["training_time_s"] / 60,
        # named apart from chat_eval's "MMLU"/"ARC-Easy", which the report's summary table reads
        **{f"{name} accuracy (first {cfg.eval_metrics_max_problems} problems)": acc for name, acc in accuracy.items()},
    }
    print0(summary)
    get_report().log(stage="sft", section="Chat SFT", data=[flags_dict(cfg), summary])
    logger.close()
    compute_cleanup()
    return summary


if __name__ == "__main__":
    main()
