"""
Train a reward model: the SFT backbone plus a scalar head, on one half of the preference pairs'
train split, with the Bradley-Terry loss (nanochat/kat/reward_model.py says what is scored and where).

    python -m scripts.train_rm                    # the policy RM, GRPO's reward -> outs/rm
    python -m scripts.train_rm --role=judge       # the independent judge -> outs/rm_judge
    torchrun --standalone --nproc_per_node=8 -m scripts.train_rm -- --pair_weighting=density

The train pairs are split in two by a hash of their prompt id (rm_role): the policy RM learns from
one half, the judge from the other, so the judge that scores GRPO's policies never saw a pair GRPO's
reward was fitted to. Reads pairs_all.jsonl and, for --pair_weighting=density or the density
breakdown, prompt_weights.jsonl. Writes the out folder (ckpt.pt, config.json, training_log.txt,
logs/, eval.json) and its report section. Only the head and the last --train_blocks blocks learn.
Both roles are evaluated on every test pair (prompts never trained on): accuracy (a tie counts 1/2),
loss and margin, overall, per source and per density quintile.
"""

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nanochat.chat_data import PAD_TOKEN
from nanochat.checkpoint_manager import find_stage_checkpoint, load_model, save_checkpoint, start_or_resume
from nanochat.common import (atomic_write, autocast_context, compute_cleanup, compute_init, peak_memory_gb,
                             print0, stage_dir, synchronize)
from nanochat.flags import flags_dict, opt, parse_flags
from nanochat.kat.data import NUM_QUINTILES, KatData, density_quintiles
from nanochat.kat.density import kish_ess
from nanochat.kat.pairs import SOURCES
from nanochat.optim import build_adamw, clip_grad_norm_, set_lr_multiplier
from nanochat.report import get_report
from nanochat.kat.reward_model import (KIND, RewardModel, bradley_terry_losses, pad_right, pair_correct, render_for_reward,
                                       reward_margins, rm_eval_table)
from nanochat.run_logger import RunLogger
from nanochat.schedules import lr_multiplier

EVAL_FILE = "eval.json"
ROLE_STAGES = {"policy": "rm", "judge": "rm_judge"}  # the two halves of the train pairs and where each RM goes
ROLE_SECTIONS = {"policy": "Reward model", "judge": "Judge reward model (independent)"}


@dataclass
class Config:
    """Train a Bradley-Terry reward model on the KAT preference pairs."""
    run: str = opt("dummy", help="wandb run name; 'dummy' logs to TensorBoard only")
    device_type: str = opt("", help="cuda|cpu|mps; empty autodetects")
    seed: int = 42
    source: str = opt("sft", help="stage name or checkpoint path of the backbone")
    data_dir: str = opt("", help="KAT data folder (default <kat cache>/data)")
    out_dir: str = opt("", help="defaults to outs/rm (policy) or outs/rm_judge (judge)")
    role: str = opt("policy", help="which half of the train pairs: policy (GRPO's reward) or judge (the independent "
                                   "evaluator); split by a hash of the prompt id", choices=list(ROLE_STAGES))
    # model
    max_seq_len: int = opt(-1, help="longest row; longer ones lose prompt tokens after <|bos|>; -1: the backbone's",
                           min=1, sentinel=-1)
    train_blocks: int = opt(-1, help="train the head and the last N transformer blocks; -1: all blocks, 0: head only",
                            min=0, sentinel=-1)
    pair_weighting: str = opt("uniform", help="weigh each pair's loss by its prompt's density weight, or not",
                              choices=["uniform", "density"])
    # batch
    device_batch_size: int = opt(8, help="pairs per micro-batch per device (two rows each)", min=1)
    pairs_per_step: int = opt(64, help="pairs per optimizer step across all ranks", min=1)
    num_epochs: int = opt(1, min=1)
    num_iterations: int = opt(-1, help="optimizer steps; -1 derives them from num_epochs", min=1, sentinel=-1)
    # optimisation
    lr: float = opt(1e-5, help="AdamW learning rate of the trained blocks", min=0)
    head_lr: float = opt(1e-3, help="AdamW learning rate of the scalar head (new, so it moves faster)", min=0)
    weight_decay: float = opt(0.0, min=0)
    warmup_ratio: float = opt(0.05, help="linear warmup over this first fraction of the steps", min=0, max=1)
    warmdown_ratio: float = opt(0.5, help="linear decay to 0 over this last fraction of the steps", min=0, max=1)
    grad_clip: float = opt(1.0, help="clip the synchronised gradient norm; 0 disables", min=0)
    # evaluation, checkpoints
    eval_every: int = opt(200, help="test accuracy every this many steps; -1 only at the end", min=1, sentinel=-1)
    eval_pairs: int = opt(2000, help="test pairs in the periodic evaluations (the final one uses all); -1: all",
                          min=1, sentinel=-1)
    eval_batch_size: int = opt(32, help="rows per forward pass when scoring test pairs", min=1)
    save_every: int = opt(-1, help="intermediate checkpoint interval; -1 saves only at the end", min=1, sentinel=-1)
    keep_checkpoints: int = opt(2, help="intermediate checkpoints kept (the final ckpt.pt always is)", min=1)
    resume: bool = opt(False, help="continue from the newest checkpoint in the output folder")
    log_every: int = opt(1, help="print and log every this many steps", min=1)


# -----------------------------------------------------------------------------
# Data

def rm_role(prompt_id: str) -> str:
    """Which reward model learns from a prompt's pairs: "policy" or "judge", by a hash of its id (every machine agrees)."""
    return tuple(ROLE_STAGES)[hashlib.sha256(f"rm_role:{prompt_id}".encode()).digest()[0] % 2]


def role_pairs(train: list[dict], role: str) -> list[dict]:
    """The train pairs of one role; all pairs of a prompt go to the same role."""
    if role not in ROLE_STAGES:
        raise ValueError(f"role must be one of {list(ROLE_STAGES)}, got {role!r}")
    return [p for p in train if rm_role(p["prompt_id"]) == role]


def load_split_pairs(data: KatData) -> tuple[list[dict], list[dict]]:
    pairs = data.pairs()
    train, test = [p for p in pairs if p["split"] == "train"], [p for p in pairs if p["split"] == "test"]
    if not train or not test:
        raise ValueError(f"{data.pairs_file} has {len(train)} train and {len(test)} test pairs; the RM needs both")
    return train, test


def train_pair_weights(data: KatData, train: list[dict]) -> np.ndarray:
    """
    Each train pair's prompt density weight (joined by prompt id) over its prompt's number of train
    pairs, so a prompt's pairs sum to its density weight; normalised to mean 1 over the pairs.
    """
    # Density weights are per prompt: a prompt with 3 pairs (Stack Exchange gives up to 3 per question)
    # must not count 3 times. Mean 1 keeps the objective (1/P) sum_i w_i loss_i on the scale of uniform
    # (w_i = 1). With beta = 0 the modes still differ: density weighs every PROMPT equally, uniform every pair.
    prompt_ids = [p["prompt_id"] for p in train]
    weights = data.weights_by_prompt(prompt_ids, split="train")
    if weights.sum() <= 0:
        raise ValueError(f"{data.weights_file}: the train pairs' weights are all zero; rerun python -m scripts.kat_density")
    pairs_of_prompt = Counter(prompt_ids)
    weights = weights / np.array([pairs_of_prompt[pid] for pid in prompt_ids])
    return weights / weights.mean()


def test_prompt_densities(data: KatData, test: list[dict]) -> dict | None:
    """{prompt id: density} for the test prompts, or None when kat_density has not run."""
    if not data.has_weights():
        return None
    ids = sorted({p["prompt_id"] for p in test})
    return dict(zip(ids, data.weights_by_prompt(ids, split="test", field="density").tolist()))


def step_pairs(num_pairs: int, pairs_per_step: int, step: int, seed: int, rank: int, world_size: int) -> np.ndarray:
    """Indices of this rank's train pairs at a step: a fresh shuffle each epoch, the tail of an epoch dropped."""
    # a pure function of (seed, epoch, step): a resume needs only the step; rank r takes every world_size-th
    steps_per_epoch = num_pairs // pairs_per_step
    epoch, position = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_pairs)
    return order[position * pairs_per_step:(position + 1) * pairs_per_step][rank::world_size]


def render_pairs(tokenizer, pairs: list[dict], max_seq_len: int) -> tuple[list[list[int]], int, int]:
    """(rows: every chosen then every rejected, rows truncated, rows that lost response tokens too)."""
    rows, truncated, response_cut = [], 0, 0
    for key in ("chosen", "rejected"):
        for pair in pairs:
            ids, dropped = render_for_reward(tokenizer, pair["prefix"], pair[key], max_seq_len)
            rows.append(ids)
            if dropped:
                truncated += 1
                # the prompt is everything up to <|assistant_start|>; all of it but <|bos|> may go
                response_cut += dropped > len(tokenizer.render_for_completion(pair["prefix"])) - 1
    return rows, truncated, response_cut


def backward_pairs(rm: RewardModel, pairs: list[dict], weights, scale: float, pad_id: int, autocast):
    """
    Backpropagate scale * sum_i w_i * loss_i over one micro-batch of pairs (chosen and rejected in
    one forward pass). Returns ([sum w_i loss_i, correct pairs, sum of margins] float64, rows
    truncated, rows whose response was cut).
    """
    device = rm.backbone.get_device()
    rows, truncated, response_cut = render_pairs(rm.tokenizer, pairs, rm.max_seq_len)
    idx, lengths = pad_right(rows, pad_id)
    with autocast:
        rewards = rm(idx.to(device), lengths.to(device))
    r_chosen, r_rejected = rewards[:len(pairs)], rewards[len(pairs):]
    weighted = (torch.as_tensor(weights, dtype=torch.float32, device=device) * bradley_terry_losses(r_chosen, r_rejected)).sum()
    (weighted * scale).backward()
    sums = torch.stack([weighted.detach(), pair_correct(r_chosen, r_rejected).sum(),
                        reward_margins(r_chosen, r_rejected).detach().sum()])
    return sums.double(), truncated, response_cut


# -----------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def score_test_pairs(rm: RewardModel, pairs: list[dict], batch_size: int, rank: int, world_size: int, device):
    """(r_chosen, r_rejected) float64 [n] on every rank; rank r scores pairs r, r + world_size, ..."""
    mine = list(range(rank, len(pairs), world_size))
    rewards = torch.zeros(2, len(pairs), dtype=torch.float64, device=device)
    if mine:
        rows, _, _ = render_pairs(rm.tokenizer, [pairs[i] for i in mine], rm.max_seq_len)
        values = torch.tensor(rm.rewards_for_rows(rows, batch_size), dtype=torch.float64, device=device)
        rewards[:, mine] = values.view(2, len(mine))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(rewards)  # each pair was scored on exactly one rank, zeros elsewhere
    return rewards[0].cpu(), rewards[1].cpu()


def _group_figures(correct, losses, margins, mask) -> dict:
    n = int(mask.sum())
    if n == 0:
        return {"n_pairs": 0, "accuracy": None, "loss": None, "margin": None}
    return {"n_pairs": n, "accuracy": float(correct[mask].mean()), "loss": float(losses[mask].mean()),
            "margin": float(margins[mask].mean())}


def preference_eval(r_chosen, r_rejected, pairs: list[dict], densities: dict | None, weights_path: Path) -> dict:
    """Accuracy, loss and margin overall, per source and per density quintile of the test prompts."""
    correct = pair_correct(r_chosen, r_rejected).numpy()
    losses = bradley_terry_losses(r_chosen, r_rejected).numpy()
    margins = reward_margins(r_chosen, r_rejected).numpy()
    everything = np.ones(len(pairs), dtype=bool)
    result = {"split": "test", **_group_figures(correct, losses, margins, everything)}
    sources = np.array([p["src"] for p in pairs])
    present = [s for s in SOURCES if s in sources] + sorted(set(sources) - set(SOURCES))
    result["by_source"] = {s: _group_figures(correct, losses, margins, sources == s) for s in present}
    if densities is None:
        result["by_density_quintile"] = {"skipped": f"no {weights_path}; run scripts.kat_embed and scripts.kat_density"}
        return result
    quintile_of = density_quintiles(densities)  # of prompts, not pairs
    pair_quintile = np.array([quintile_of[p["prompt_id"]] for p in pairs])
    quintiles = {}
    for q in range(1, NUM_QUINTILES + 1):
        members = [densities[pid] for pid in densities if quintile_of[pid] == q]
        quintiles[str(q)] = {"n_prompts": len(members), "density_min": min(members, default=None),
                             "density_max": max(members, default=None),
                             **_group_figures(correct, losses, margins, pair_quintile == q)}
    result["by_density_quintile"] = quintiles
    return result


# -----------------------------------------------------------------------------
# Training

def main(argv=None):
    cfg = parse_flags(Config, argv)
    ddp, rank, local_rank, world_size, device = compute_init(cfg.device_type or None, seed=cfg.seed)
    master = rank == 0
    stage = ROLE_STAGES[cfg.role]
    out_dir = Path(cfg.out_dir) if cfg.out_dir else stage_dir(stage)
    data = KatData(cfg.data_dir)
    autocast = autocast_context(device)

    # ---- data: this role's half of the train pairs; every test pair for the evaluation
    all_train, test = load_split_pairs(data)
    train = role_pairs(all_train, cfg.role)
    if not train:
        raise ValueError(f"none of the {len(all_train)} train pairs of {data.pairs_file} fall to --role={cfg.role}")
    if data.has_weights():
        data.check_current()  # the weights describe these prompts and their current embeddings
    weights = train_pair_weights(data, train) if cfg.pair_weighting == "density" else np.ones(len(train))
    densities = test_prompt_densities(data, test)
    eval_subset = test if cfg.eval_pairs < 0 else \
        [test[i] for i in sorted(np.random.default_rng(cfg.seed).permutation(len(test))[:cfg.eval_pairs])]
    pairs_per_rank = cfg.pairs_per_step // world_size
    if cfg.pairs_per_step % (cfg.device_batch_size * world_size) != 0:
        raise ValueError(f"--pairs_per_step={cfg.pairs_per_step} must be a multiple of device_batch_size * world_size "
                         f"= {cfg.device_batch_size * world_size}")
    if len(train) < cfg.pairs_per_step:
        raise ValueError(f"{len(train)} train pairs are fewer than one step of --pairs_per_step={cfg.pairs_per_step}")
    num_iterations = cfg.num_iterations if cfg.num_iterations > 0 else (len(train) // cfg.pairs_per_step) * cfg.num_epochs
    print0(f"{cfg.role} RM: {len(train):,} of {len(all_train):,} train pairs ({len({p['prompt_id'] for p in train}):,} "
           f"prompts), {len(test):,} test pairs from {data.dir} | weighting {cfg.pair_weighting} "
           f"(Kish ESS of pair weights {kish_ess(weights):,.0f}) | {num_iterations} steps of {cfg.pairs_per_step} pairs")

    # ---- model: the backbone as SFT left it, a new head, and only the chosen parts trainable
    source_path = find_stage_checkpoint(cfg.source)
    backbone, tokenizer, _ = load_model(source_path, device, phase="train")
    T = cfg.max_seq_len if cfg.max_seq_len > 0 else backbone.config.sequence_len
    if T > backbone.rotary_seq_len:
        raise ValueError(f"--max_seq_len={T} exceeds the model's rotary table of {backbone.rotary_seq_len} positions")
    rm = RewardModel(backbone, tokenizer, max_seq_len=T)
    block_params, head_params = rm.set_trainable_blocks(cfg.train_blocks)
    num_trainable = sum(p.numel() for p in block_params + head_params)
    print0(f"reward model on {source_path}: {backbone.config} | trainable {num_trainable:,} of "
           f"{sum(p.numel() for p in rm.parameters()):,} parameters (train_blocks={cfg.train_blocks})")
    groups = [dict(params=ps, lr=lr, name=name) for ps, lr, name in
              ((block_params, cfg.lr, "blocks"), (head_params, cfg.head_lr, "head")) if ps]
    # not wrapped in DDP: under torchrun build_adamw gives DistAdamW, which averages the trainable
    # gradients across ranks itself, so clipping below sees the synchronised gradient
    optimizers = [build_adamw(groups, ddp=ddp, weight_decay=cfg.weight_decay)]
    pad_id = tokenizer.encode_special(PAD_TOKEN)

    meta = {"stage": stage, "kind": KIND, "role": cfg.role, "train_pairs": len(train), "source": cfg.source,
            "init_from": str(source_path),
            "model_config": asdict(backbone.config), "backbone_config": asdict(backbone.config),
            "train_blocks": cfg.train_blocks, "max_seq_len": T, "pair_weighting": cfg.pair_weighting,
            "train_args": flags_dict(cfg), "num_iterations": num_iterations, "world_size": world_size}
    step, _, extra, resumed_step = start_or_resume(out_dir, cfg.resume, rm, optimizers, device,
                                                   num_iterations=num_iterations)
    logger = RunLogger(out_dir, run=cfg.run, config=meta, enabled=master, start_step=step)
    extra = extra or {"truncated_rows": 0, "response_cut_rows": 0, "best_val_accuracy": 0.0}

    val, loss_value, total_time = {}, float("nan"), 0.0
    while True:
        is_last = step == num_iterations
        # ---- test-split evaluation: a fixed subset on the way, every test pair at the end
        if is_last or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
            rm.eval()
            eval_pairs = test if is_last else eval_subset
            r_chosen, r_rejected = score_test_pairs(rm, eval_pairs, cfg.eval_batch_size, rank, world_size, device)
            val = preference_eval(r_chosen, r_rejected, eval_pairs, densities, data.weights_file)
            extra["best_val_accuracy"] = max(extra["best_val_accuracy"], val["accuracy"])
            print0(f"step {step:05d} | test accuracy {val['accuracy']:.4f} | loss {val['loss']:.4f} "
                   f"| margin {val['margin']:.4f} ({val['n_pairs']} pairs)")
            logger.log(step, {"val/accuracy": val["accuracy"], "val/loss": val["loss"], "val/margin": val["margin"]})
            rm.train()
        save_now = is_last or (cfg.save_every > 0 and step > 0 and step % cfg.save_every == 0)
        if save_now and step != resumed_step:  # the checkpoint we resumed from already holds this step
            save_checkpoint(out_dir, step, rm, optimizers, meta={**meta, "val_accuracy": val.get("accuracy")},
                            extra=extra, final=is_last, keep=cfg.keep_checkpoints)
        if is_last:
            break

        # ---- one optimizer step: this rank's pairs in micro-batches, losses summed, scaled once
        synchronize(device)
        t0 = time.time()
        lrm = lr_multiplier(step, num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, 0.0)
        set_lr_multiplier(optimizers, lrm)
        mine = step_pairs(len(train), cfg.pairs_per_step, step, cfg.seed, rank, world_size)
        scale = world_size / cfg.pairs_per_step  # DistAdamW averages over ranks: the result is the global mean
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # weighted loss, correct, margin
        for start in range(0, pairs_per_rank, cfg.device_batch_size):
            batch = mine[start:start + cfg.device_batch_size]
            batch_sums, truncated, response_cut = backward_pairs(rm, [train[i] for i in batch], weights[batch],
                                                                 scale, pad_id, autocast)
            sums += batch_sums
            extra["truncated_rows"] += truncated
            extra["response_cut_rows"] += response_cut
        grad_norm = clip_grad_norm_(optimizers, cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizers[0].step()
        rm.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(sums)
        loss_value, accuracy, margin = (sums / cfg.pairs_per_step).tolist()
        synchronize(device)
        dt = time.time() - t0
        step += 1

        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training loss is {loss_value} at step {step}; lower --lr / --head_lr")
        total_time += dt
        if step % cfg.log_every == 0 or step == num_iterations:
            print0(f"step {step:05d}/{num_iterations} | loss {loss_value:.4f} | accuracy {accuracy:.3f} "
                   f"| margin {margin:.4f} | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms")
            # train/loss is the weighted objective; train/accuracy and train/margin stay unweighted
            metrics = {"train/loss": loss_value, "train/accuracy": accuracy, "train/margin": margin,
                       "train/lr": lrm * cfg.lr, "train/head_lr": lrm * cfg.head_lr, "train/dt": dt}
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            logger.log(step, metrics)

    val = {"checkpoint": str(out_dir / "ckpt.pt"), "step": step, "pair_weighting": cfg.pair_weighting, "role": cfg.role,
           "train_pairs": len(train), "train_prompts": len({p["prompt_id"] for p in train}), **val}
    summary = {
        "Role": f"{cfg.role} (its half of the train pairs, split by prompt id)", "Source": str(source_path),
        "Train pairs": f"{len(train)} of {len(all_train)}", "Test pairs": len(test), "Iterations": num_iterations,
        "Pairs per step": cfg.pairs_per_step, "Pair weighting": cfg.pair_weighting, "Train blocks": cfg.train_blocks,
        "Trainable parameters": num_trainable, "DDP world size": world_size, "Max sequence length": T,
        "Rows truncated (train)": extra["truncated_rows"], "Rows with the response cut (train)": extra["response_cut_rows"],
        "Final training loss": loss_value, "Test accuracy": val["accuracy"], "Test loss": val["loss"],
        "Test margin": val["margin"], "Best periodic test accuracy": extra["best_val_accuracy"],
        "Peak memory (GB)": peak_memory_gb(device), "Training time (min)": total_time / 60,
    }
    print0(summary)
    if master:
        atomic_write(out_dir / EVAL_FILE, json.dumps(val, indent=2) + "\n")
        logger.text(f"final test evaluation: {json.dumps(val)}")
    get_report().log(stage=stage, section=ROLE_SECTIONS[cfg.role], data=[flags_dict(cfg), summary, rm_eval_table(val)])
    logger.close()
    compute_cleanup()
    return val


if __name__ == "__main__":
    main()
