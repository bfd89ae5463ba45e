"""
Reinforcement learning on GSM8K, the optional last stage of the speedrun: nanochat's "GRPO",
which is closer to plain REINFORCE with a per-question baseline.

    python -m scripts.chat_rl
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run=default

Each step, every rank samples num_samples answers to its share of examples_per_step training
questions (temperature 1, top-k 50); an answer earns 1 if its "#### N" matches the reference, else 0.
The advantage is the reward minus the mean of the question's samples; no KL penalty and no ratio
clipping; the loss is averaged over every sampled token of the step. Every eval_every steps:
pass@1..pass@eval_samples on GSM8K test questions. Writes outs/rl/ (ckpt.pt, ckpt_<step>.pt,
config.json, training_log.txt, logs/) and the "rl" report section; `--resume=true` continues
exactly.
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import find_stage_checkpoint, load_model, save_checkpoint, start_or_resume
from nanochat.common import (autocast_context, compute_cleanup, compute_init, peak_memory_gb, print0, stage_dir,
                             synchronized_time)
from nanochat.engine import Engine, row_seed
from nanochat.flags import flags_dict, opt, parse_flags
from nanochat.optim import step_optimizers
from nanochat.report import get_report
from nanochat.rl import group_advantages, sequence_logprobs
from nanochat.run_logger import RunLogger
from nanochat.schedules import epoch_steps, is_due, lr_multiplier
from nanochat.task_eval import run_pass_at_k
from tasks.gsm8k import GSM8K


@dataclass
class Config:
    """Reinforcement learning on GSM8K from the SFT model."""
    run: str = opt("dummy", help="wandb run name; 'dummy' logs to TensorBoard only")
    device_type: str = opt("", help="cuda|cpu|mps; empty autodetects")
    seed: int = 42
    source: str = opt("sft", help="stage name or checkpoint path to start from")
    # rollouts
    examples_per_step: int = opt(16, help="questions per optimizer step across all ranks", min=1)
    num_samples: int = opt(16, help="answers sampled per question, the group its baseline is taken over: at least 2 samples",
                           min=2)
    max_new_tokens: int = opt(256, help="longest sampled answer", min=1)
    temperature: float = opt(1.0, min=0)
    top_k: int = opt(50, help="sample among the k most likely tokens; -1 disables", min=1, sentinel=-1)
    rollout_questions: int = opt(8, help="questions per engine call (rows = this * num_samples): bounds KV-cache memory",
                                 min=1)
    device_batch_size: int = opt(8, help="sequences per forward/backward pass", min=1)
    num_epochs: int = opt(1, min=1)
    num_iterations: int = opt(-1, help="optimizer steps; -1 derives them from num_epochs over GSM8K train",
                              min=1, sentinel=-1)
    # optimisation
    embedding_lr: float = opt(0.2, min=0)
    unembedding_lr: float = opt(0.004, min=0)
    matrix_lr: float = opt(0.02, min=0)
    init_lr_frac: float = opt(0.05, help="every learning rate starts at this fraction of its base value", above=0)
    weight_decay: float = opt(0.0, min=0)
    grad_clip: float = opt(0.0, help="clip the synchronised gradient norm; 0 disables (nanochat does not clip)", min=0)
    # evaluation, checkpoints
    eval_every: int = opt(60, help="pass@k on GSM8K test every this many steps; -1 only at the end", min=1, sentinel=-1)
    eval_examples: int = opt(400, help="GSM8K test questions per evaluation", min=1)
    eval_samples: int = opt(8, help="samples per evaluation question: pass@1 .. pass@eval_samples", min=1)
    save_every: int = opt(60, help="intermediate checkpoint interval; -1 saves only at the end", min=1, sentinel=-1)
    keep_checkpoints: int = opt(2, help="intermediate checkpoints kept (the final ckpt.pt always is)", min=1)
    resume: bool = opt(False, help="continue from the newest checkpoint in the output folder")
    log_every: int = opt(1, help="print and log every this many steps", min=1)
    out_dir: str = opt("", help="defaults to outs/rl")


@torch.no_grad()
def sample_rollouts(engine, tokenizer, task, indices, cfg: Config, seed: int):
    """
    num_samples answers to each question task[i], i in indices. Returns (prompts, completions,
    sampled masks, rewards): one entry per answer, question-major; rewards is (questions, samples).
    Completions keep their final <|assistant_end|>: stopping is a choice the policy must learn.
    """
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    top_k = None if cfg.top_k < 0 else cfg.top_k
    prompts, completions, masks, rewards = [], [], [], []
    for start in range(0, len(indices), cfg.rollout_questions):
        conversations = [task[i] for i in indices[start:start + cfg.rollout_questions]]
        chunk_prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
        results, result_masks = engine.generate_batch(chunk_prompts, num_samples=cfg.num_samples,
                                                      max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                                      top_k=top_k, seed=seed + start, keep_stop_token=True)
        for conversation, prompt, samples, sample_masks in zip(conversations, chunk_prompts, results, result_masks):
            group = []
            for tokens, mask in zip(samples, sample_masks):
                answer = tokens[:-1] if tokens and tokens[-1] == assistant_end else tokens
                group.append(task.reward(conversation, tokenizer.decode(answer)))
                prompts.append(prompt)
                completions.append(tokens)
                masks.append(mask)
            rewards.append(group)
    return prompts, completions, masks, torch.tensor(rewards, dtype=torch.float32)


def main(argv=None):
    cfg = parse_flags(Config, argv)
    ddp, rank, local_rank, world_size, device = compute_init(cfg.device_type or None, seed=cfg.seed)
    master = rank == 0
    out_dir = Path(cfg.out_dir) if cfg.out_dir else stage_dir("rl")
    autocast = autocast_context(device)

    source_path = find_stage_checkpoint(cfg.source)
    model, tokenizer, _ = load_model(source_path, device, phase="train")
    engine = Engine(model, tokenizer)
    print0(f"RL from {source_path}: {model.config} | {model.num_params():,} parameters")

    if cfg.examples_per_step % world_size != 0:
        raise ValueError(f"--examples_per_step={cfg.examples_per_step} must be a multiple of the world size {world_size}")
    examples_per_rank = cfg.examples_per_step // world_size
    train_task, val_task = GSM8K(subset="main", split="train"), GSM8K(subset="main", split="test")
    num_iterations = epoch_steps(cfg.num_iterations, len(train_task), cfg.examples_per_step, cfg.num_epochs,
                                 what="GSM8K train questions", per_step_flag="examples_per_step")
    print0(f"{len(train_task):,} training questions | {cfg.examples_per_step} questions x {cfg.num_samples} samples "
           f"per step | {num_iterations} steps")

    optimizers = model.setup_optimizers(unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                        matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay, ddp=ddp,
                                        init_lr_frac=cfg.init_lr_frac)

    meta = {"stage": "rl", "init_from": str(source_path), "model_config": asdict(model.config),
            "train_args": flags_dict(cfg), "num_iterations": num_iterations, "world_size": world_size}
    step, _, extra, resumed_step = start_or_resume(out_dir, cfg.resume, model, optimizers, device,
                                                  num_iterations=num_iterations)
    logger = RunLogger(out_dir, run=cfg.run, config=meta, enabled=master, start_step=step)

    extra = extra or {"trained_tokens": 0}
    passes, reward_mean, total_time = [], float("nan"), 0.0
    while True:
        is_last = step == num_iterations
        # ---- pass@k on held-out questions, with the same seed every time so evaluations are comparable
        if is_due(step, cfg.eval_every, is_last, at_start=True):
            model.eval()
            with autocast:
                passes = run_pass_at_k(val_task, tokenizer, engine, cfg.eval_samples, cfg.eval_examples,
                                       cfg.max_new_tokens, cfg.temperature, None if cfg.top_k < 0 else cfg.top_k,
                                       cfg.rollout_questions, cfg.seed)
            print0(f"step {step:05d} | " + " | ".join(f"pass@{k} {p:.4f}" for k, p in enumerate(passes, 1)))
            logger.log(step, {f"val/pass@{k}": p for k, p in enumerate(passes, 1)})
        if is_due(step, cfg.save_every, is_last) and step != resumed_step:  # already saved: we resumed from it
            save_checkpoint(out_dir, step, model, optimizers, meta={**meta, "pass_at_k": passes}, extra=extra,
                            final=is_last, keep=cfg.keep_checkpoints)
        if is_last:
            break

        # ---- rollouts: this rank's questions are fixed by the step, so a resumed run samples the same ones
        t0 = synchronized_time(device)
        positions = [step * cfg.examples_per_step + e * world_size + rank for e in range(examples_per_rank)]
        model.eval()
        with autocast:
            prompts, completions, masks, rewards = sample_rollouts(
                engine, tokenizer, train_task, [p % len(train_task) for p in positions], cfg,
                seed=row_seed(cfg.seed, step, rank))
        advantages = group_advantages(rewards).flatten().to(device)  # reward - group mean, not divided by the std

        # ---- one policy-gradient step: sum(logp * advantage) over every sampled token, / their count.
        # No KL penalty or ratio clipping: the samples come from the current weights and serve exactly one
        # update, so the gradient is on-policy. Every token weighs the same (token-level normalisation, as
        # in DAPO): long answers are not down-weighted. Calculator results the engine forced in are not trained.
        model.train()
        num_tokens = torch.tensor(sum(sum(mask) for mask in masks), dtype=torch.float32, device=device)
        if ddp:
            dist.all_reduce(num_tokens)
        scale = world_size / num_tokens.clamp(min=1)  # the distributed optimizers average gradients over ranks
        # from init_lr_frac of the base values (setup_optimizers) down to 0, linearly
        lrm = lr_multiplier(step, num_iterations, warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0)
        for start in range(0, len(completions), cfg.device_batch_size):
            end = start + cfg.device_batch_size
            with autocast:
                logprobs, _ = sequence_logprobs(model, prompts[start:end], completions[start:end], device,
                                                sampled_masks=masks[start:end])
            objective = (logprobs * advantages[start:end, None]).sum()  # logprobs are 0 off the mask
            (-objective * scale).backward()
        grad_norm = step_optimizers(model, optimizers, lrm, cfg.grad_clip)
        dt = synchronized_time(device) - t0
        step += 1

        # ---- statistics over every rollout of every rank
        rewards = rewards.to(device)
        no_signal = (rewards == rewards[:, :1]).all(dim=1).sum()  # questions whose answers all scored alike
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32, device=device)
        stats = torch.stack([rewards.sum(), rewards.square().sum(), torch.tensor(float(rewards.numel()), device=device),
                             lengths.sum(), no_signal.float(), torch.tensor(float(rewards.size(0)), device=device)])
        if ddp:
            dist.all_reduce(stats)
        reward_sum, reward_sq, count, length_sum, no_signal_count, questions = stats.tolist()
        reward_mean = reward_sum / count
        reward_std = math.sqrt(max(reward_sq / count - reward_mean ** 2, 0.0))
        extra["trained_tokens"] += int(num_tokens.item())
        total_time += dt
        if step % cfg.log_every == 0 or step == num_iterations:
            print0(f"step {step:05d}/{num_iterations} | reward {reward_mean:.4f} +- {reward_std:.4f} "
                   f"| answer length {length_sum / count:.1f} | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms")
            metrics = {"train/reward_mean": reward_mean, "train/reward_std": reward_std,
                       "train/seq_len": length_sum / count, "train/no_signal_frac": no_signal_count / questions,
                       "train/num_tokens": num_tokens, "train/lr": lrm * cfg.init_lr_frac * cfg.matrix_lr,
                       "train/lrm": lrm, "train/dt": dt, "train/grad_norm": grad_norm}
            logger.log(step, metrics)

    summary = {
        "Source": str(source_path), "Iterations": num_iterations, "Questions per step": cfg.examples_per_step,
        "Samples per question": cfg.num_samples, "DDP world size": world_size,
        "Trained (sampled) tokens": extra["trained_tokens"], "Final training reward": reward_mean,
        **{f"GSM8K test pass@{k} ({min(cfg.eval_examples, len(val_task))} questions, T={cfg.temperature})": p
           for k, p in enumerate(passes, 1)},
        "Peak memory (GB)": peak_memory_gb(device), "Training time (min)": total_time / 60,
    }
    print0(summary)
    get_report().log(stage="rl", section="Chat RL", data=[flags_dict(cfg), summary])
    logger.close()
    compute_cleanup()
    return summary


if __name__ == "__main__":
    main()
