"""
GRPO from the SFT model against the KAT reward model, with density-aware or uniform prompt
sampling: the two arms of the experiment, one script.

    python -m scripts.grpo --prompt_sampling=density       # -> outs/grpo_density
    python -m scripts.grpo --prompt_sampling=uniform       # -> outs/grpo_baseline
    torchrun --standalone --nproc_per_node=8 -m scripts.grpo -- --density_aware=True --max_steps=5000

The arms differ only in the prompt sampler (nanochat/kat/density.py): same seeds, steps, batch and
therefore compute. --density_aware=true|false is an alias of --prompt_sampling=density|uniform (given
both, they must agree); --density_k must be the k scripts.kat_density used. One step: draw prompts ->
G completions each from the engine -> RM scores -> group-relative advantages -> token-level clipped
policy-gradient loss plus a k3 KL to the frozen SFT reference. Each logged metric (train/*, val/*)
is described beside the line that logs it. Writes out_dir (ckpt.pt, ckpt_<step>.pt, config.json,
training_log.txt, logs/) and that stage's report section; --resume=true continues.
"""

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import find_stage_checkpoint, load_model, save_checkpoint, start_or_resume
from nanochat.common import (autocast_context, compute_cleanup, compute_init, peak_memory_gb, print0, stage_dir,
                             synchronize)
from nanochat.engine import Engine, row_seed
from nanochat.flags import flags_dict, opt, parse_flags
from nanochat.kat.data import KatData
from nanochat.kat.density import kish_ess
from nanochat.optim import build_adamw, clip_grad_norm_, set_lr_multiplier
from nanochat.report import get_report
from nanochat.kat.reward_model import left_truncate, load_reward_model
from nanochat.kat.grpo import clipped_policy_loss, k3_kl, sampled_token_stats
from nanochat.rl import group_advantages, sequence_logprobs
from nanochat.run_logger import RunLogger
from nanochat.schedules import lr_multiplier

STAGES = {"density": "grpo_density", "uniform": "grpo_baseline"}
EVAL_STREAM = -1  # the engine-seed "step" of evaluations; training steps are >= 0, so they never collide


@dataclass
class Config:
    """GRPO against the reward model, with density-aware or uniform prompt sampling."""
    run: str = opt("dummy", help="wandb run name; 'dummy' logs to TensorBoard only")
    device_type: str = opt("", help="cuda|cpu|mps; empty autodetects")
    seed: int = 42
    source: str = opt("sft", help="stage name or checkpoint path of the policy's and the reference's start")
    reward_model: str = opt("rm", help="reward model stage name or checkpoint path (scripts.train_rm)")
    data_dir: str = opt("", help="KAT data folder (default <kat cache>/data)")
    out_dir: str = opt("", help="defaults to outs/grpo_density or outs/grpo_baseline, by sampler")
    # the one difference between the arms
    prompt_sampling: str = opt("", help="density: prompts drawn by density weight; uniform: the baseline "
                                        "(empty: --density_aware decides, else density)", choices=["", "density", "uniform"])
    density_aware: bool | None = opt(None, help="alias: true = --prompt_sampling=density, false = uniform")
    density_k: int = opt(10, help="the k of scripts.kat_density; checked against prompt_weights.json", min=1)
    # rollouts
    prompts_per_step: int = opt(16, help="prompts per step across all ranks (P)", min=1)
    samples_per_prompt: int = opt(8, help="completions per prompt, the group its advantages are relative to (G); at least 2",
                                  min=2)
    max_new_tokens: int = opt(256, help="longest completion", min=1)
    max_prompt_tokens: int = opt(1024, help="longer prompts keep <|bos|> and lose their oldest tokens", min=2)
    rollout_prompts: int = opt(16, help="prompts per engine call (rows = this * G): bounds KV-cache memory", min=1)
    device_batch_size: int = opt(8, help="sequences per forward/backward pass of the update", min=1)
    rm_batch_size: int = opt(32, help="sequences per reward model forward pass", min=1)
    truncation_penalty: float = opt(0.0, help="subtracted from the reward of a completion cut at max_new_tokens", min=0)
    # objective
    adv_std: bool = opt(True, help="divide advantages by the group's reward std; false: mean-centred only")
    clip_eps: float = opt(0.2, help="importance ratios are clipped to [1 - eps, 1 + eps]", min=0)
    beta: float = opt(0.1, help="weight of the k3 KL estimate to the reference", min=0)
    inner_epochs: int = opt(1, help="optimizer steps on each step's rollouts", min=1)
    # optimisation
    max_steps: int = opt(5000, help="optimizer steps", min=1)
    learning_rate: float = opt(1e-5, help="AdamW learning rate of every parameter", above=0)
    weight_decay: float = opt(0.0, min=0)
    warmup_ratio: float = opt(0.0, help="linear warmup over this first fraction of the steps", min=0, max=1)
    warmdown_ratio: float = opt(0.0, help="linear decay to 0 over this last fraction of the steps (0: constant)",
                                min=0, max=1)
    grad_clip: float = opt(1.0, help="clip the synchronised gradient norm; 0 disables", min=0)
    # evaluation, checkpoints
    eval_every: int = opt(100, help="mean reward on held-out test prompts every this many steps; -1 only at the end",
                          min=1, sentinel=-1)
    eval_prompts: int = opt(256, help="held-out test prompts per evaluation", min=1)
    save_every: int = opt(500, help="intermediate checkpoint interval; -1 saves only at the end", min=1, sentinel=-1)
    keep_checkpoints: int = opt(2, help="intermediate checkpoints kept (the final ckpt.pt always is)", min=1)
    resume: bool = opt(False, help="continue from the newest checkpoint in the output folder")
    log_every: int = opt(1, help="print and log every this many steps", min=1)


def resolve_prompt_sampling(cfg: Config) -> Config:
    """cfg with prompt_sampling decided and density_aware agreeing with it (config.json records both)."""
    from_alias = None if cfg.density_aware is None else ("density" if cfg.density_aware else "uniform")
    if cfg.prompt_sampling and from_alias and cfg.prompt_sampling != from_alias:
        raise ValueError(f"--prompt_sampling={cfg.prompt_sampling} contradicts --density_aware={cfg.density_aware}; "
                         "pass only one of them")
    mode = cfg.prompt_sampling or from_alias or "density"
    return replace(cfg, prompt_sampling=mode, density_aware=mode == "density")


def check_config(cfg: Config, world_size: int):
    if cfg.samples_per_prompt < 2:
        raise ValueError(f"--samples_per_prompt={cfg.samples_per_prompt}: group-relative advantages need at least 2")
    if cfg.prompts_per_step < 1 or cfg.prompts_per_step % world_size != 0:
        raise ValueError(f"--prompts_per_step={cfg.prompts_per_step} must be a positive multiple of the world size {world_size}")
    positive = {"max_steps": cfg.max_steps, "max_new_tokens": cfg.max_new_tokens, "max_prompt_tokens": cfg.max_prompt_tokens,
                "rollout_prompts": cfg.rollout_prompts, "device_batch_size": cfg.device_batch_size,
                "rm_batch_size": cfg.rm_batch_size, "inner_epochs": cfg.inner_epochs, "eval_prompts": cfg.eval_prompts}
    bad = {name: value for name, value in positive.items() if value < 1}
    if bad:
        raise ValueError(f"these flags must be >= 1: {bad}")
    if cfg.max_prompt_tokens < 2:
        raise ValueError("--max_prompt_tokens must be at least 2 (<|bos|> and <|assistant_start|>)")
    if cfg.beta < 0 or cfg.truncation_penalty < 0 or cfg.learning_rate <= 0:
        raise ValueError("need --beta >= 0, --truncation_penalty >= 0 and --learning_rate > 0")


# -----------------------------------------------------------------------------
# Prompts

def load_prompt_pool(data: KatData, density_k: int, seed: int, mode: str):
    """(sampler over the train prompts, {id: prefix} of train prompts, test prompts sorted by id, weights meta)."""
    data.check_current(density_k)  # the weights describe these prompts, their embeddings, and this k
    # Both arms read the same weights file, so they draw from the same train pool.
    sampler = data.prompt_sampler(seed, mode)
    prompts = data.prompts()
    train = {p["id"]: p["prefix"] for p in prompts if p["split"] == "train"}
    test = sorted((p for p in prompts if p["split"] == "test"), key=lambda p: p["id"])
    if not test:
        raise ValueError(f"{data.prompts_file} has no test prompts to evaluate on; rerun scripts.kat_pairs")
    return sampler, train, test, data.weights_meta()


def rank_share(step_ids: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's prompts: its contiguous slice of the step's draw (which every rank makes alike)."""
    per_rank = len(step_ids) // world_size
    return step_ids[rank * per_rank:(rank + 1) * per_rank]


def rollout_seed(seed: int, stream: int, position: int) -> int:
    """
    The engine seed for prompts from `position` on in a step's draw (stream: the step, or
    EVAL_STREAM for evaluations). It depends on nothing else: not on the sampler, so both arms
    share it, and not on the number of ranks, so when rollout_prompts divides each rank's share
    a prompt gets the same samples however the draw is split.
    """
    return row_seed(seed, stream, position)


class PromptCounts:
    """Draw counts of every prompt so far, with their Kish ESS kept up to date in O(1) per draw."""

    def __init__(self):
        self.counts, self.total, self.sum_sq = Counter(), 0, 0

    def add(self, ids):
        for pid in ids:
            c = self.counts[pid]
            self.counts[pid] = c + 1
            self.total += 1
            self.sum_sq += 2 * c + 1  # (c + 1)^2 - c^2

    def ess(self) -> float:
        return self.total ** 2 / self.sum_sq if self.sum_sq else 0.0


# -----------------------------------------------------------------------------
# Rollouts, rewards, evaluation

@torch.no_grad()
def sample_groups(engine, tokenizer, prefixes: list[dict], num_samples: int, cfg: Config, seed: int, stream: int,
                  first_position: int) -> dict:
    """num_samples completions of each prefix, prompt-major; prefixes[0] sits at first_position of
    the draw. Completions keep their stop token (stopping is a choice the policy learns);
    "finished" says whether there is one."""
    stop_tokens = engine.stop_tokens
    out = {"prefixes": [], "prompts": [], "completions": [], "masks": [], "texts": [], "finished": []}
    for start in range(0, len(prefixes), cfg.rollout_prompts):
        chunk = prefixes[start:start + cfg.rollout_prompts]
        # a prompt longer than max_prompt_tokens keeps <|bos|> and loses its oldest tokens
        prompts = [left_truncate(tokenizer.render_for_completion(prefix), cfg.max_prompt_tokens) for prefix in chunk]
        results, masks = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=cfg.max_new_tokens,
                                               temperature=1.0, seed=rollout_seed(seed, stream, first_position + start),
                                               keep_stop_token=True)
        for prefix, prompt, samples, sample_masks in zip(chunk, prompts, results, masks):
            for tokens, mask in zip(samples, sample_masks):
                finished = bool(tokens) and tokens[-1] in stop_tokens
                out["prefixes"].append(prefix)
                out["prompts"].append(prompt)
                out["completions"].append(tokens)
                out["masks"].append(mask)
                out["texts"].append(tokenizer.decode(tokens[:-1] if finished else tokens))
                out["finished"].append(finished)
    return out


# A completion that hit max_new_tokens without <|assistant_end|> is still scored (rendered as if it
# ended there) and loses --truncation_penalty.
def score_rollouts(reward_model, rollouts: dict, cfg: Config) -> list[float]:
    scores = reward_model.score(list(zip(rollouts["prefixes"], rollouts["texts"])), batch_size=cfg.rm_batch_size)
    return [s - (0.0 if done else cfg.truncation_penalty) for s, done in zip(scores, rollouts["finished"])]


def evaluate(engine, tokenizer, reward_model, test_prefixes, cfg, rank, world_size, device):
    """(mean reward, mean completion length, one sample text) over the fixed held-out prompts, all ranks."""
    per_rank = -(-len(test_prefixes) // world_size)
    mine = test_prefixes[rank * per_rank:(rank + 1) * per_rank]
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # reward sum, length sum, count
    sample = ""
    if mine:
        rollouts = sample_groups(engine, tokenizer, mine, 1, cfg, cfg.seed, EVAL_STREAM, first_position=rank * per_rank)
        rewards = score_rollouts(reward_model, rollouts, cfg)
        totals += torch.tensor([sum(rewards), sum(len(c) for c in rollouts["completions"]), len(rewards)],
                               dtype=torch.float64, device=device)
        sample = rollouts["texts"][0]
    if dist.is_initialized():
        dist.all_reduce(totals)
    reward_sum, length_sum, count = totals.tolist()
    return reward_sum / count, length_sum / count, sample


# -----------------------------------------------------------------------------
# The update

def micro_batches(rollouts: dict, size: int):
    n = len(rollouts["completions"])
    for start in range(0, n, size):
        yield slice(start, start + size)


def policy_update(model, reference, optimizers, rollouts, advantages, cfg, device, world_size, autocast) -> dict:
    """inner_epochs optimizer steps on one step's rollouts; returns per-token means over all ranks."""
    # loss = mean over sampled tokens of [-min(r A, clip(r, 1-eps, 1+eps) A) + beta * k3], r = pi / pi_sampling,
    # k3 = exp(ref - logp) - (ref - logp) - 1. The mean is over every sampled token of the step on all
    # ranks (token-level, as DAPO and chat_rl: long answers are not down-weighted); tokens the calculator
    # forced in are not the policy's choices and are masked out.
    prompts, completions, masks = rollouts["prompts"], rollouts["completions"], rollouts["masks"]
    num_tokens = torch.tensor(float(sum(sum(m) for m in masks)), device=device)
    if dist.is_initialized():
        dist.all_reduce(num_tokens)
    # each rank's gradient is a sum over its tokens / the step's token count; the distributed
    # optimizer averages over ranks, hence the factor world_size
    scale = world_size / num_tokens.clamp(min=1)

    # the sampling policy's and the reference's numbers: constants of the update
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # pg, k3, clipped tokens, entropy
    old, ref = [], []
    with torch.no_grad(), autocast:
        for rows in micro_batches(rollouts, cfg.device_batch_size):
            logprobs, entropy, _ = sampled_token_stats(model, prompts[rows], completions[rows], device, masks[rows])
            old.append(logprobs)
            sums[3] += entropy.sum()
            ref.append(sequence_logprobs(reference, prompts[rows], completions[rows], device, sampled_masks=masks[rows])[0])

    grad_norm = None
    for _ in range(cfg.inner_epochs):
        for i, rows in enumerate(micro_batches(rollouts, cfg.device_batch_size)):
            with autocast:
                logprobs, mask = sequence_logprobs(model, prompts[rows], completions[rows], device, sampled_masks=masks[rows])
            pg, clipped = clipped_policy_loss(logprobs, old[i], advantages[rows, None], cfg.clip_eps)
            kl = k3_kl(logprobs, ref[i])
            per_token = (pg + cfg.beta * kl) * mask
            (per_token.sum() * scale).backward()
            sums[:3] += torch.stack([(pg * mask).sum(), (kl * mask).sum(), (clipped & mask).sum()]).detach().double()
        if cfg.grad_clip > 0:  # on the rank-averaged gradient, never a local one (nanochat/optim.py)
            grad_norm = clip_grad_norm_(optimizers, cfg.grad_clip)
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    if dist.is_initialized():
        dist.all_reduce(sums)
    pg_sum, kl_sum, clipped_sum, entropy_sum = sums.tolist()
    passes = num_tokens.item() * cfg.inner_epochs
    pref_loss, kl = pg_sum / passes, kl_sum / passes
    return {"loss": pref_loss + cfg.beta * kl, "pref_loss": pref_loss, "kl_loss": cfg.beta * kl, "kl": kl,
            "clip_frac": clipped_sum / passes, "entropy": entropy_sum / num_tokens.item(),
            "num_tokens": int(num_tokens.item()), "grad_norm": None if grad_norm is None else float(grad_norm)}


def assert_disjoint_parameters(**modules):
    """Policy, reference and RM must not share storage: an update to one would silently move the others."""
    owner = {}
    for name, module in modules.items():
        if not isinstance(module, torch.nn.Module):
            continue  # a scoring object without parameters
        for p in module.parameters():
            key = p.untyped_storage().data_ptr()
            if key in owner and owner[key] != name:
                raise RuntimeError(f"the {name} shares a parameter of shape {tuple(p.shape)} with the {owner[key]}")
            owner[key] = name


# -----------------------------------------------------------------------------

def main(argv=None, reward_model=None):
    """reward_model: any object with score([(prefix, response), ...], batch_size) -> list[float];
    by default the frozen RM named by --reward_model."""
    cfg = resolve_prompt_sampling(parse_flags(Config, argv))
    ddp, rank, local_rank, world_size, device = compute_init(cfg.device_type or None, seed=cfg.seed)
    check_config(cfg, world_size)
    master = rank == 0
    mode, stage = cfg.prompt_sampling, STAGES[cfg.prompt_sampling]
    out_dir = Path(cfg.out_dir) if cfg.out_dir else stage_dir(stage)
    data = KatData(cfg.data_dir)
    autocast = autocast_context(device)

    # ---- models: policy and frozen reference both from --source, and the frozen RM: no parameter is
    # shared (checked below) and only the policy is saved
    source_path = find_stage_checkpoint(cfg.source)
    model, tokenizer, _ = load_model(source_path, device, phase="train")
    reference, _, _ = load_model(source_path, device, phase="eval")
    reference.requires_grad_(False)
    rm_source = "(given to main)"
    if reward_model is None:
        rm_source = str(find_stage_checkpoint(cfg.reward_model))
        reward_model = load_reward_model(rm_source, device)
    if device.type == "cuda":
        # fp32 master weights for the policy, the embedding included (gpt.py stores it in bf16 on CUDA):
        # an update of lr=1e-5 to a weight near 1 is below bf16's resolution and would round away
        model.transformer.wte.float()
        # reference and RM in bf16 (every matmul runs in bf16 under autocast anyway); the reference's
        # embedding in fp32 too, so at step 0 it computes exactly what the policy computes
        reference.to(torch.bfloat16)
        reference.transformer.wte.float()
        if isinstance(reward_model, torch.nn.Module):
            reward_model.to(torch.bfloat16)
    assert_disjoint_parameters(policy=model, reference=reference, reward_model=reward_model)
    engine = Engine(model, tokenizer)
    longest = cfg.max_prompt_tokens + cfg.max_new_tokens
    if longest > model.rotary_seq_len:
        raise ValueError(f"--max_prompt_tokens + --max_new_tokens = {longest} exceeds the model's {model.rotary_seq_len} positions")
    print0(f"GRPO ({mode} prompt sampling) from {source_path}: {model.config} | reward model {rm_source}")

    sampler, train_prefixes, test_prompts, weights_meta = load_prompt_pool(data, cfg.density_k, cfg.seed, mode)
    test_prefixes = [p["prefix"] for p in test_prompts[:cfg.eval_prompts]]
    sampler_ess = kish_ess(sampler.probs) if mode == "density" else float(len(sampler.ids))
    print0(f"{len(sampler.ids):,} train prompts (sampler ESS {sampler_ess:,.1f}) | {len(test_prefixes)} held-out "
           f"test prompts | {cfg.prompts_per_step} prompts x {cfg.samples_per_prompt} samples per step | {cfg.max_steps} steps")

    # plain AdamW on every parameter (DistAdamW under torchrun), not Muon: RLHF learning rates like 1e-5
    # are AdamW step sizes, and Muon's orthogonalised updates have no comparable scale
    optimizers = [build_adamw([dict(params=list(model.parameters()), lr=cfg.learning_rate)], ddp=ddp,
                              weight_decay=cfg.weight_decay)]
    meta = {"stage": stage, "init_from": cfg.source, "init_checkpoint": str(source_path), "reward_model": rm_source,
            "prompt_sampling": mode, "model_config": asdict(model.config), "train_args": flags_dict(cfg),
            "num_iterations": cfg.max_steps, "world_size": world_size,
            "sampler": {"mode": mode, "train_prompts": len(sampler.ids), "kish_ess": sampler_ess,
                        "density_k": weights_meta["flags"]["k"], "density_beta": weights_meta["flags"].get("beta"),
                        "weights_file": str(data.weights_file)}}
    step, _, extra, resumed_step = start_or_resume(out_dir, cfg.resume, model, optimizers, device,
                                                  num_iterations=cfg.max_steps)
    logger = RunLogger(out_dir, run=cfg.run, config=meta, enabled=master, start_step=step)
    extra = extra or {"trained_tokens": 0, "training_time_s": 0.0, "val_reward_start": None}
    seen = PromptCounts()
    for past in range(step):  # the draws are a function of the step, so a resume recounts them exactly
        seen.add(sampler.sample(cfg.prompts_per_step, past))

    val_reward, reward_mean, update = float("nan"), float("nan"), {}
    while True:
        is_last = step == cfg.max_steps
        # ---- held-out reward (val/reward_mean, val/completion_len): one completion per fixed TEST prompt,
        # at T=1 with the same seeds every time and in both arms
        if is_last or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
            model.eval()
            with autocast:
                val_reward, val_length, sample = evaluate(engine, tokenizer, reward_model, test_prefixes, cfg,
                                                          rank, world_size, device)
            if step == 0:
                extra["val_reward_start"] = val_reward
            print0(f"step {step:05d} | val reward {val_reward:.4f} | val completion length {val_length:.1f}")
            logger.log(step, {"val/reward_mean": val_reward, "val/completion_len": val_length})
            logger.text(f"step {step} sample: {sample!r}")
        save_now = is_last or (cfg.save_every > 0 and step > 0 and step % cfg.save_every == 0)
        if save_now and step != resumed_step:  # the checkpoint we resumed from already holds this step
            save_checkpoint(out_dir, step, model, optimizers, meta=meta, extra=extra, final=is_last,
                            keep=cfg.keep_checkpoints)
        if is_last:
            break

        # ---- rollouts: the same draw on every rank (a function of seed and step, with replacement);
        # rank r takes the r-th contiguous slice; G samples per prompt at T=1, no top-k/top-p, so the
        # sampling distribution is the policy's own softmax, which the importance ratio compares against
        synchronize(device)
        t0 = time.time()
        step_ids = sampler.sample(cfg.prompts_per_step, step)
        seen.add(step_ids)
        my_ids = rank_share(step_ids, rank, world_size)
        model.eval()
        with autocast:
            rollouts = sample_groups(engine, tokenizer, [train_prefixes[pid] for pid in my_ids], cfg.samples_per_prompt,
                                     cfg, cfg.seed, step, first_position=rank * len(my_ids))
        synchronize(device)
        t1 = time.time()
        # ---- rewards and advantages: (r - group mean) / (group std + eps), mean only with --adv_std=false;
        # a group whose rewards are all equal gets 0 (nanochat/rl.py)
        rewards = torch.tensor(score_rollouts(reward_model, rollouts, cfg), dtype=torch.float32, device=device)
        rewards = rewards.view(len(my_ids), cfg.samples_per_prompt)
        advantages = group_advantages(rewards, use_std=cfg.adv_std).flatten()
        synchronize(device)
        t2 = time.time()
        # ---- policy update; LR: linear warmup over warmup_ratio, constant, then a linear warmdown
        model.train()
        lrm = lr_multiplier(step, cfg.max_steps, warmup_ratio=cfg.warmup_ratio, warmdown_ratio=cfg.warmdown_ratio)
        set_lr_multiplier(optimizers, lrm)
        update = policy_update(model, reference, optimizers, rollouts, advantages, cfg, device, world_size, autocast)
        synchronize(device)
        t3 = time.time()
        step += 1

        # ---- statistics over every rollout of every rank
        lengths = torch.tensor([len(c) for c in rollouts["completions"]], dtype=torch.float64, device=device)
        rewards = rewards.double()
        stats = torch.stack([rewards.sum(), rewards.square().sum(), torch.tensor(float(rewards.numel()), device=device),
                             (rewards == rewards[:, :1]).all(dim=1).sum().double(),
                             torch.tensor(float(rewards.size(0)), device=device), lengths.sum(),
                             torch.tensor(float(rollouts["finished"].count(False)), device=device)]).double()
        if ddp:
            dist.all_reduce(stats)
        reward_sum, reward_sq, count, zero_std, groups, length_sum, truncated = stats.tolist()
        reward_mean = reward_sum / count
        reward_std = math.sqrt(max(reward_sq / count - reward_mean ** 2, 0.0))
        dt = t3 - t0
        extra["trained_tokens"] += update["num_tokens"]
        extra["training_time_s"] += dt
        if not math.isfinite(update["loss"]):
            raise FloatingPointError(f"GRPO loss is {update['loss']} at step {step}; lower --learning_rate")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            print0(f"step {step:05d}/{cfg.max_steps} | reward {reward_mean:.4f} +- {reward_std:.4f} | kl {update['kl']:.4f} "
                   f"| clip {update['clip_frac']:.3f} | length {length_sum / count:.1f} | rollout {t1 - t0:.2f}s "
                   f"score {t2 - t1:.2f}s update {t3 - t2:.2f}s")
            metrics = {  # over all ranks; the loss terms, KL and clip fraction per sampled token, inner-epoch means
                # loss = pref_loss (the clipped policy-gradient term) + kl_loss (beta * kl); kl: the k3
                # estimate of KL(policy || reference)
                "train/loss": update["loss"], "train/pref_loss": update["pref_loss"], "train/kl_loss": update["kl_loss"],
                "train/kl": update["kl"], "train/lr": cfg.learning_rate * lrm, "train/lrm": lrm,
                # over the step's completions, after any truncation penalty; zero_std_frac: groups with no signal
                "train/reward_mean": reward_mean, "train/reward_std": reward_std, "train/zero_std_frac": zero_std / groups,
                # entropy (nats) of the sampling distribution at sampled tokens; clip_frac: tokens whose ratio was clipped
                "train/entropy": update["entropy"], "train/completion_len": length_sum / count,
                "train/truncated_frac": truncated / count, "train/clip_frac": update["clip_frac"],
                "train/num_tokens": update["num_tokens"],
                # Kish ESS (sum c)^2 / sum c^2 over the draw counts so far: how many distinct prompts the
                # training is worth
                "train/prompt_ess": seen.ess(), "train/unique_prompts": len(seen.counts),
                # seconds: engine, RM, then the no-grad passes + inner epochs + optimizer steps; dt their sum
                "train/time_rollout": t1 - t0, "train/time_score": t2 - t1, "train/time_update": t3 - t2,
                "train/dt": dt, "train/rollout_tok_per_s": length_sum / max(t1 - t0, 1e-9),  # generated, all ranks
            }
            if update["grad_norm"] is not None:  # the last inner epoch's synchronised gradient, before clipping
                metrics["train/grad_norm"] = update["grad_norm"]
            logger.log(step, metrics)

    summary = {
        "Source": str(source_path), "Reward model": rm_source, "Prompt sampling": mode,
        "Train prompts": len(sampler.ids), "Sampler Kish ESS": sampler_ess, "Steps": cfg.max_steps,
        "Prompts per step": cfg.prompts_per_step, "Samples per prompt": cfg.samples_per_prompt,
        "DDP world size": world_size, "Distinct prompts drawn": len(seen.counts), "Kish ESS of prompts drawn": seen.ess(),
        "Trained (sampled) tokens": extra["trained_tokens"], "Final training reward": reward_mean,
        "Final KL to reference (k3, per token)": update.get("kl", float("nan")),
        f"Held-out reward at step 0 ({len(test_prefixes)} test prompts)":
            "not measured (--eval_every=-1)" if extra["val_reward_start"] is None else extra["val_reward_start"],
        f"Held-out reward at the end ({len(test_prefixes)} test prompts)": val_reward,
        "Peak memory (GB)": peak_memory_gb(device), "Training time (min)": extra["training_time_s"] / 60,
    }
    print0(summary)
    get_report().log(stage=stage, section=f"GRPO, {mode} prompt sampling", data=[flags_dict(cfg), summary])
    logger.close()
    compute_cleanup()
    return summary


if __name__ == "__main__":
    main()
