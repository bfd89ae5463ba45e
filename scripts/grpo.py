"""
GRPO from the SFT model against the KAT reward model, the prompts drawn by density weight, uniformly,
or by the density weights shuffled across prompts: the arms of the experiment, one script.

    python -m scripts.grpo --prompt_sampling=density       # -> outs/grpo_density
    python -m scripts.grpo --prompt_sampling=uniform       # -> outs/grpo_baseline
    torchrun --standalone --nproc_per_node=8 -m scripts.grpo -- --prompt_sampling=shuffled --seed=43

The arms differ only in the sampler (same seeds, steps, batch, compute). One step: draw prompts ->
G completions each from the engine -> RM scores -> one no-grad pass for the reference's (and, for
--kl=seq_reward or --inner_epochs>1, the sampling policy's) log-probs -> rewards (truncation penalty,
KL) -> advantages -> gradient pass(es). The maths is nanochat/kat/grpo.py's. Every --traj_every steps
the dev prompts are sampled and scored by the RM and the independent judge (never trained on): a row
of trajectory.jsonl and a weights-only checkpoint in traj/ (nanochat/kat/trajectory.py). Writes out_dir
(ckpt.pt, ckpt_<step>.pt, config.json, training_log.txt, logs/, trajectory.jsonl, traj/, draws.json) and
the report section; --resume=true continues. --plant_marker adds the controls' rule reward for a marker
on one density quintile's prompts (nanochat/kat/controls.py), its base rate measured on the start first.
"""

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import (find_stage_checkpoint, load_model, save_checkpoint, save_model_weights,
                                         start_or_resume)
from nanochat.common import (atomic_write, autocast_context, compute_cleanup, compute_init, peak_memory_gb, print0,
                             stage_dir, synchronize)
from nanochat.engine import Engine, row_seed
from nanochat.flags import flags_dict, opt, parse_flags
from nanochat.kat.controls import PlantedReward, choose_marker, planted_prompt_ids, pooled_within_std
from nanochat.kat.data import KatData
from nanochat.kat.density import kish_ess
from nanochat.kat.embed import response_embeddings
from nanochat.kat.grpo import (ADV_NORMS, ENTROPY_SAMPLE_EVERY, GRADIENT_PASS_SUMS, KL_MODES, Objective, gradient_pass,
                               prepare_update)
from nanochat.kat.reward_model import left_truncate, load_reward_model
from nanochat.kat.trajectory import (DRAWS_FILE, DrawCounts, TrajectoryLog, checkpoint_name, trajectory_row)
from nanochat.optim import build_adamw, clip_grad_norm_, set_lr_multiplier
from nanochat.report import get_report
from nanochat.rl import completion_batches, layout_logprobs, length_sorted_groups
from nanochat.run_logger import RunLogger
from nanochat.schedules import lr_multiplier

STAGES = {"density": "grpo_density", "uniform": "grpo_baseline", "shuffled": "grpo_shuffled"}
EVAL_STREAM = -1  # the engine-seed "step" of evaluations; training steps are >= 0, so they never collide
PLANT_PROBE_STREAM = -2  # the engine-seed "step" of the planted marker's base-rate probe
TRAJECTORY_SEED = 0  # evaluation seeds ignore --seed: every run, arm and seed index samples the dev prompts alike
DEFAULT_JUDGE, DEFAULT_TRAJ_EVERY, DEFAULT_TRAJ_PROMPTS = "rm_judge", 250, 128


@dataclass
class Config:
    """GRPO against the reward model, with density-aware, uniform or shuffled-weight prompt sampling."""
    run: str = opt("dummy", help="wandb run name; 'dummy' logs to TensorBoard only")
    device_type: str = opt("", help="cuda|cpu|mps; empty autodetects")
    seed: int = opt(42, help="prompt draws and rollout sampling; both arms of a seed index share it", min=0)
    source: str = opt("sft", help="stage name or checkpoint path of the policy's and the reference's start")
    reward_model: str = opt("rm", help="reward model stage name or checkpoint path (scripts.train_rm)")
    judge: str = opt(DEFAULT_JUDGE, help="independent judge RM for the trajectory only (scripts.train_rm --role=judge); "
                                         "'' disables; the default is skipped with a note when it does not exist")
    data_dir: str = opt("", help="KAT data folder (default <kat cache>/data)")
    out_dir: str = opt("", help="defaults to outs/grpo_density, outs/grpo_baseline or outs/grpo_shuffled, by sampler")
    # the one difference between the arms
    prompt_sampling: str = opt("", help="density: prompts drawn by density weight; uniform: the baseline; shuffled: the "
                                        "density weights permuted across prompts (same ESS, no density information) "
                                        "(empty: --density_aware decides, else density)",
                               choices=["", "density", "uniform", "shuffled"])
    density_aware: bool | None = opt(None, help="alias: true = --prompt_sampling=density, false = uniform")
    density_k: int = opt(10, help="the k of scripts.kat_density; checked against prompt_weights.json", min=1)
    # rollouts
    prompts_per_step: int = opt(16, help="prompts per step across all ranks (P)", min=1)
    samples_per_prompt: int = opt(8, help="completions per prompt, the group its advantages are relative to (G); at least 2",
                                  min=2)
    max_new_tokens: int = opt(256, help="longest completion", min=1)
    max_prompt_tokens: int = opt(1024, help="longer prompts keep <|bos|> and lose their oldest tokens", min=2)
    rollout_prompts: int = opt(16, help="prompts per engine call (rows = this * G): bounds KV-cache memory", min=1)
    # how the update and the scoring are batched: rows sorted by length, rows x longest row <= the budget
    update_tokens: int = opt(16384, help="tokens (with padding) per forward/backward micro-batch of the update; "
                                         "activation memory grows with it", min=1)
    nograd_tokens: int = opt(65536, help="tokens per no-grad pass (reference, sampling policy, evaluation)", min=1)
    rm_tokens: int = opt(65536, help="tokens per reward model forward pass", min=1)
    compile: bool = opt(False, help="torch.compile the policy's forward for the gradient pass (CUDA only; shapes "
                                    "vary with each micro-batch, so dynamic)")
    # objective (nanochat/kat/grpo.py)
    adv_norm: str = opt("", help="advantages: none = reward - group mean (Dr. GRPO, Liu et al. 2025; default), group = "
                                 "/ group std (DeepSeekMath), batch = / the step's std (empty: --adv_std decides, else none)",
                        choices=["", *ADV_NORMS])
    adv_std: bool | None = opt(None, help="alias: true = --adv_norm=group, false = none")
    kl: str = opt("seq_reward", help="seq_reward: beta * sum_t (log pi - log ref) off each reward, the RLHF KL penalty "
                                     "(Ziegler et al. 2019, Stiennon et al. 2020); token_k3: beta * k3 per token in "
                                     "the loss (DeepSeekMath)", choices=list(KL_MODES))
    beta: float = opt(0.1, help="weight of the KL to the reference", min=0)
    truncation_penalty: float = opt(1.0, help="subtracted from the reward of a completion cut at max_new_tokens, which "
                                              "is scored as if it ended there (cf. DAPO's overlong penalty)", min=0)
    clip_eps: float = opt(0.2, help="importance ratios are clipped to [1 - eps, 1 + eps]", above=0)
    inner_epochs: int = opt(1, help="optimizer steps on each step's rollouts", min=1)
    # optimisation
    max_steps: int = opt(5000, help="optimizer steps", min=1)
    learning_rate: float = opt(1e-6, help="AdamW learning rate of every parameter (DeepSeekMath's GRPO, Shao et al. 2024)",
                               above=0)
    weight_decay: float = opt(0.0, min=0)
    warmup_ratio: float = opt(0.0, help="linear warmup over this first fraction of the steps", min=0, max=1)
    warmdown_ratio: float = opt(0.0, help="linear decay to 0 over this last fraction of the steps (0: constant)",
                                min=0, max=1)
    grad_clip: float = opt(1.0, help="clip the synchronised gradient norm; 0 disables", min=0)
    # trajectory evaluation on the dev prompts, checkpoints
    traj_every: int | None = opt(None, help=f"trajectory evaluation every this many steps, and at step 0 and the end "
                                            f"(-1: only those; unset: --eval_every, else {DEFAULT_TRAJ_EVERY})",
                                 min=1, sentinel=-1)
    traj_prompts: int | None = opt(None, help=f"dev prompts per trajectory evaluation (unset: --eval_prompts, else "
                                              f"{DEFAULT_TRAJ_PROMPTS})", min=2)
    traj_samples: int = opt(4, help="samples per dev prompt at T=1", min=2)
    traj_checkpoints: bool = opt(True, help="keep a weights-only checkpoint (traj/step_XXXXXX.pt) at each evaluation")
    eval_every: int | None = opt(None, help="alias of --traj_every", min=1, sentinel=-1)
    eval_prompts: int | None = opt(None, help="alias of --traj_prompts", min=2)
    save_every: int = opt(500, help="intermediate checkpoint interval; -1 saves only at the end", min=1, sentinel=-1)
    keep_checkpoints: int = opt(2, help="intermediate checkpoints kept (the final ckpt.pt always is)", min=1)
    resume: bool = opt(False, help="continue from the newest checkpoint in the output folder")
    log_every: int = opt(1, help="print and log every this many steps", min=1)
    # the controls' planted rule reward (nanochat/kat/controls.py); empty --plant_marker: none
    plant_marker: str = opt("", help="completions containing this text earn --plant_bonus on the planted prompts; "
                                     "'auto': the candidate whose base rate on the starting policy is nearest 25%")
    plant_bonus: float = opt(1.0, help="the bonus, in units of the policy RM's score spread among one prompt's "
                                       "samples of the starting policy (pooled over the probe prompts)", min=0)
    plant_quintile: int = opt(1, help="the planted prompts: train prompts of this density quintile (1 = rarest); "
                                      "0: every quintile", min=0, max=5)
    plant_fraction: float = opt(1.0, help="of those, this fraction (a fixed pick by a hash of the id; the tic "
                                          "control's dose)", min=0, max=1)
    plant_min_rate: float = opt(0.02, help="refuse to start when the starting policy writes the marker in fewer of "
                                           "its probe completions: GRPO could not amplify it", min=0, max=1)
    plant_max_rate: float = opt(0.8, help="... or in more: the marker would have no room to rise", min=0, max=1)
    plant_probe_prompts: int = opt(64, help="planted-quintile prompts sampled to measure the base rate", min=2)
    plant_probe_samples: int = opt(8, help="samples per probe prompt (at T=1, fixed seeds)", min=2)


def _alias(name: str, value, alias: str, from_alias, default):
    """The flag's value given it, its alias's (converted) value and the default; both given must agree."""
    if value not in (None, "") and from_alias is not None and value != from_alias:
        raise ValueError(f"--{name}={value} contradicts --{alias}; pass only one of them")
    return value if value not in (None, "") else (from_alias if from_alias is not None else default)


def resolve_flags(cfg: Config) -> Config:
    """cfg with every aliased flag decided and its alias agreeing with it (config.json records both)."""
    mode = _alias("prompt_sampling", cfg.prompt_sampling, "density_aware",
                  None if cfg.density_aware is None else ("density" if cfg.density_aware else "uniform"), "density")
    adv_norm = _alias("adv_norm", cfg.adv_norm, "adv_std",
                      None if cfg.adv_std is None else ("group" if cfg.adv_std else "none"), "none")
    traj_every = _alias("traj_every", cfg.traj_every, "eval_every", cfg.eval_every, DEFAULT_TRAJ_EVERY)
    traj_prompts = _alias("traj_prompts", cfg.traj_prompts, "eval_prompts", cfg.eval_prompts, DEFAULT_TRAJ_PROMPTS)
    return replace(cfg, prompt_sampling=mode, density_aware=mode == "density" if mode != "shuffled" else None,
                   adv_norm=adv_norm, adv_std=adv_norm == "group" if adv_norm != "batch" else None,
                   traj_every=traj_every, eval_every=traj_every, traj_prompts=traj_prompts, eval_prompts=traj_prompts)


def check_config(cfg: Config, world_size: int):
    if cfg.prompts_per_step % world_size != 0:
        raise ValueError(f"--prompts_per_step={cfg.prompts_per_step} must be a positive multiple of the world size {world_size}")


def objective_of(cfg: Config) -> Objective:
    return Objective(adv_norm=cfg.adv_norm, kl=cfg.kl, beta=cfg.beta, clip_eps=cfg.clip_eps,
                     truncation_penalty=cfg.truncation_penalty)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


# -----------------------------------------------------------------------------
# Prompts

def load_prompt_pool(data: KatData, density_k: int, seed: int, mode: str):
    """(sampler over the train prompts, {id: train prompt row}, dev prompts sorted by id, weights meta)."""
    data.check_current(density_k)  # the weights describe these prompts, their embeddings, and this k
    # Every arm reads the same weights file, so they draw from the same train pool.
    sampler = data.prompt_sampler(seed, mode)
    train = {p["id"]: p for p in data.prompts("train")}
    dev = sorted(data.held_out_prompts("dev"), key=lambda p: p["id"])
    if len(dev) < 2:
        raise ValueError(f"{data.prompts_file} has {len(dev)} dev prompts (test prompts of the 'dev' half); the "
                         "trajectory evaluation needs 2 or more: rerun scripts.kat_pairs with more test prompts")
    return sampler, train, dev, data.weights_meta()


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


# -----------------------------------------------------------------------------
# Rollouts, rewards

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


def score_rollouts(reward_model, rollouts: dict, token_budget: int) -> list[float]:
    """The RM's score of each completion, in the given order; a completion cut at max_new_tokens is
    scored as rendered. Rows of similar length go together, about token_budget tokens per pass."""
    lengths = [len(p) + len(c) for p, c in zip(rollouts["prompts"], rollouts["completions"])]
    pairs = list(zip(rollouts["prefixes"], rollouts["texts"]))
    scores = [0.0] * len(pairs)
    for rows in length_sorted_groups(lengths, token_budget):
        for row, score in zip(rows, reward_model.score([pairs[r] for r in rows], batch_size=len(rows))):
            scores[row] = score
    return scores


@torch.no_grad()
def planted_reward(cfg: Config, reference, tokenizer, reward_model, train_prompts: dict, quintile_of: dict, autocast):
    """
    (the planted rule reward, its record for config.json), or (None, None) without --plant_marker.
    The starting policy (the frozen reference, so a resumed run measures the same) samples up to
    --plant_probe_prompts prompts of the planted quintile with fixed seeds; the marker's share of those
    completions is its base rate (refused outside [--plant_min_rate, --plant_max_rate]), and the RM's
    spread among a prompt's samples sets the bonus's scale. Every rank computes it; rank 0's is kept.
    """
    if not cfg.plant_marker:
        return None, None
    pool = sorted(pid for pid, q in quintile_of.items() if cfg.plant_quintile in (0, q))
    probe_ids = [pool[i] for i in sorted(np.random.default_rng(0).permutation(len(pool))[:cfg.plant_probe_prompts])]
    with autocast:
        probe = sample_groups(Engine(reference, tokenizer), tokenizer, [train_prompts[pid]["prefix"] for pid in probe_ids],
                              cfg.plant_probe_samples, cfg, TRAJECTORY_SEED, PLANT_PROBE_STREAM, first_position=0)
    try:
        marker, rates = choose_marker(probe["texts"], cfg.plant_marker, cfg.plant_min_rate, cfg.plant_max_rate)
    except ValueError as err:
        raise SystemExit(f"GRPO refuses to start: {err}") from None
    spread = pooled_within_std(np.reshape(score_rollouts(reward_model, probe, cfg.rm_tokens), (len(probe_ids), -1)))
    if not spread > 0:
        raise SystemExit(f"GRPO refuses to start: the policy RM scores every probe sample of a prompt alike (spread "
                         f"{spread}), so --plant_bonus (in units of that spread) would be 0")
    record = {"marker": marker, "requested": cfg.plant_marker, "bonus": cfg.plant_bonus, "rm_spread": spread,
              "bonus_abs": cfg.plant_bonus * spread, "quintile": cfg.plant_quintile, "fraction": cfg.plant_fraction,
              "quintile_prompts": len(pool), "base_rate": rates[marker], "candidate_rates": rates,
              "probe_prompts": len(probe_ids), "probe_samples": cfg.plant_probe_samples}
    if dist.is_initialized():
        shared = [record]
        dist.broadcast_object_list(shared, src=0)
        record = shared[0]
    planted = planted_prompt_ids(quintile_of, cfg.plant_quintile, cfg.plant_fraction)
    record["planted_prompts"] = len(planted)
    print0(f"planted reward: +{record['bonus_abs']:.4g} ({cfg.plant_bonus:g} x RM spread {spread:.4g}) for {marker!r} on "
           f"{len(planted)} train prompts; base rate {record['base_rate']:.1%} of {len(probe['texts'])} probe completions")
    return PlantedReward(marker=marker, bonus=record["bonus_abs"], prompt_ids=planted), record


# -----------------------------------------------------------------------------
# The update

def policy_update(model, reference, optimizers, rollouts, scores, cfg, device, world_size, autocast,
                  forward_hidden=None) -> dict:
    """inner_epochs optimizer steps on one step's rollouts (nanochat/kat/grpo.py); returns figures over all ranks."""
    objective = objective_of(cfg)
    finished = torch.tensor(rollouts["finished"], device=device)
    plan = prepare_update(model, reference, rollouts["prompts"], rollouts["completions"], rollouts["masks"], scores,
                          finished, cfg.samples_per_prompt, objective, update_tokens=cfg.update_tokens,
                          nograd_tokens=cfg.nograd_tokens, need_sampling_logprobs=cfg.inner_epochs > 1,
                          autocast=autocast, all_reduce=all_reduce_sum, world_size=world_size)
    # after the first optimizer step the policy is no longer the one that sampled: later epochs compare with it
    old_logprobs = plan.sampling_logprobs if cfg.inner_epochs > 1 else None
    sums, grad_norm = None, None
    for epoch in range(cfg.inner_epochs):
        epoch_sums = gradient_pass(model, plan, objective, old_logprobs, autocast=autocast, forward_hidden=forward_hidden,
                                   entropy_every=ENTROPY_SAMPLE_EVERY if epoch == 0 else 0)
        if sums is None:
            sums = epoch_sums  # log_ratio and entropy: the first pass's, i.e. the sampling policy's
        else:
            sums[:3] += epoch_sums[:3]  # pg, k3, clipped: summed over the inner epochs
        if cfg.grad_clip > 0:  # on the rank-averaged gradient, never a local one (nanochat/optim.py)
            grad_norm = clip_grad_norm_(optimizers, cfg.grad_clip)
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    counts = torch.tensor([plan.layout.rows.numel(), plan.layout.num_rows], dtype=torch.float64, device=device)
    totals = all_reduce_sum(torch.cat([sums, counts, plan.rewards.double().sum()[None]]))
    named = dict(zip(GRADIENT_PASS_SUMS, totals[:len(GRADIENT_PASS_SUMS)].tolist()))
    num_tokens, num_rows, objective_reward_sum = totals[len(GRADIENT_PASS_SUMS):].tolist()
    passes = num_tokens * cfg.inner_epochs
    pref_loss, k3 = named["pg"] / passes, named["k3"] / passes
    kl_seq = named["log_ratio"] / num_rows
    kl_loss = cfg.beta * k3 if cfg.kl == "token_k3" else 0.0
    return {"loss": pref_loss + kl_loss, "pref_loss": pref_loss, "kl_loss": kl_loss, "kl": k3, "kl_seq": kl_seq,
            "kl_penalty": cfg.beta * kl_seq if cfg.kl == "seq_reward" else 0.0,
            "objective_reward": objective_reward_sum / num_rows, "clip_frac": named["clipped"] / passes,
            "entropy": named["entropy"] / max(named["entropy_tokens"], 1), "num_tokens": int(num_tokens),
            "grad_norm": None if grad_norm is None else float(grad_norm)}


def assert_disjoint_parameters(**modules):
    """Policy, reference, RM and judge must not share storage: an update to one would silently move the others."""
    owner = {}
    for name, module in modules.items():
        if not isinstance(module, torch.nn.Module):
            continue  # a scoring object without parameters, or no judge
        for p in module.parameters():
            key = p.untyped_storage().data_ptr()
            if key in owner and owner[key] != name:
                raise RuntimeError(f"the {name} shares a parameter of shape {tuple(p.shape)} with the {owner[key]}")
            owner[key] = name


def assert_not_trained(module, optimizers, name: str = "judge"):
    """The judge (or any evaluation-only model) has no trainable parameter and none in an optimizer."""
    if not isinstance(module, torch.nn.Module):
        return
    ours = {id(p) for p in module.parameters()}
    if any(p.requires_grad for p in module.parameters()):
        raise RuntimeError(f"the {name} has trainable parameters; it must stay frozen")
    if any(id(p) in ours for opt in optimizers for group in opt.param_groups for p in group["params"]):
        raise RuntimeError(f"a parameter of the {name} is in an optimizer; it must never be trained")


def load_judge(cfg: Config, rm_source: str, device):
    """(the judge RM or None, where it came from); never the policy's own reward model (rm_source)."""
    if not cfg.judge:
        return None, "disabled (--judge='')"
    try:
        path = find_stage_checkpoint(cfg.judge)
    except FileNotFoundError:
        if cfg.judge != DEFAULT_JUDGE:
            raise
        print0(f"no judge: stage {DEFAULT_JUDGE} does not exist (python -m scripts.train_rm --role=judge makes it); "
               "trajectory rows get judge_reward null")
        return None, f"none (no {DEFAULT_JUDGE} stage)"
    if Path(rm_source).is_file() and Path(rm_source).resolve() == path.resolve():
        raise ValueError(f"--judge={cfg.judge} is the policy's reward model {path}; the judge must be independent")
    return load_reward_model(path, device), str(path)


# -----------------------------------------------------------------------------
# Trajectory evaluation (nanochat/kat/trajectory.py)

@torch.no_grad()
def evaluate_trajectory(step, engine, tokenizer, model, reference, reward_model, judge, dev_prefixes, cfg, rank,
                        world_size, device, autocast) -> dict | None:
    """One row of trajectory.jsonl (rank 0; None elsewhere): traj_samples completions of each dev
    prompt at T=1 with the same seeds every time and in every run, prompts split across ranks."""
    per_rank = -(-len(dev_prefixes) // world_size)
    mine = dev_prefixes[rank * per_rank:(rank + 1) * per_rank]
    share = {"texts": [], "token_ids": [], "truncated": [], "kl": [], "policy": [], "judge": [], "embeddings": []}
    if mine:
        with autocast:
            rollouts = sample_groups(engine, tokenizer, mine, cfg.traj_samples, cfg, TRAJECTORY_SEED, EVAL_STREAM,
                                     first_position=rank * per_rank)
        share["policy"] = score_rollouts(reward_model, rollouts, cfg.rm_tokens)
        share["judge"] = score_rollouts(judge, rollouts, cfg.rm_tokens) if judge is not None else []
        batches, layout = completion_batches(rollouts["prompts"], rollouts["completions"], device, rollouts["masks"],
                                             token_budget=cfg.nograd_tokens)
        with autocast:
            policy_logprobs, _ = layout_logprobs(model, batches, layout)
            ref_logprobs, _ = layout_logprobs(reference, batches, layout)
        share["kl"] = layout.per_row_sum(policy_logprobs - ref_logprobs).tolist()
        responses = [c[:-1] if done else c for c, done in zip(rollouts["completions"], rollouts["finished"])]
        share["embeddings"] = response_embeddings(reference, tokenizer.get_bos_token_id(), responses,
                                                  max(1, cfg.nograd_tokens // (cfg.max_new_tokens + 1)), device)
        n = cfg.traj_samples
        share["texts"] = [rollouts["texts"][i:i + n] for i in range(0, len(responses), n)]
        share["token_ids"] = [responses[i:i + n] for i in range(0, len(responses), n)]
        share["truncated"] = [[not done for done in rollouts["finished"][i:i + n]] for i in range(0, len(responses), n)]
    shares = [share]
    if dist.is_initialized():
        shares = [None] * world_size
        dist.all_gather_object(shares, share)
    if rank != 0:
        return None
    joined = {key: [item for s in shares for item in s[key]] for key in share}
    return trajectory_row(step, joined["texts"], joined["token_ids"], joined["truncated"],
                          [joined["embeddings"][i:i + cfg.traj_samples]
                           for i in range(0, len(joined["embeddings"]), cfg.traj_samples)],
                          joined["kl"], joined["policy"], joined["judge"] if judge is not None else None,
                          tokenizer.get_vocab_size(),
                          checkpoint_name(step) if cfg.traj_checkpoints else None)


# -----------------------------------------------------------------------------

def main(argv=None, reward_model=None):
    """reward_model: any object with score([(prefix, response), ...], batch_size) -> list[float];
    by default the frozen RM named by --reward_model."""
    cfg = resolve_flags(parse_flags(Config, argv))
    ddp, rank, local_rank, world_size, device = compute_init(cfg.device_type or None, seed=cfg.seed)
    check_config(cfg, world_size)
    master = rank == 0
    mode = cfg.prompt_sampling
    out_dir = Path(cfg.out_dir) if cfg.out_dir else stage_dir(STAGES[mode])
    stage = out_dir.name  # grpo_density, or a further seed's grpo_density_s1: its own report section and meta
    data = KatData(cfg.data_dir)
    autocast = autocast_context(device)

    # ---- models: policy and frozen reference both from --source, the frozen RM and the judge: no parameter
    # is shared (checked below), the judge is in no optimizer, and only the policy is saved
    source_path = find_stage_checkpoint(cfg.source)
    model, tokenizer, _ = load_model(source_path, device, phase="train")
    reference, _, _ = load_model(source_path, device, phase="eval")
    reference.requires_grad_(False)
    rm_source = "(given to main)"
    if reward_model is None:
        rm_source = str(find_stage_checkpoint(cfg.reward_model))
        reward_model = load_reward_model(rm_source, device)
    judge, judge_source = load_judge(cfg, rm_source, device)
    if device.type == "cuda":
        # fp32 master weights for the policy, the embedding included (gpt.py stores it in bf16 on CUDA):
        # an update of lr=1e-6 to a weight near 1 is below bf16's resolution and would round away
        model.transformer.wte.float()
        # reference and RMs in bf16 (every matmul runs in bf16 under autocast anyway); the reference's
        # embedding in fp32 too, so at step 0 it computes exactly what the policy computes
        reference.to(torch.bfloat16)
        reference.transformer.wte.float()
        for scorer in (reward_model, judge):
            if isinstance(scorer, torch.nn.Module):
                scorer.to(torch.bfloat16)
    assert_disjoint_parameters(policy=model, reference=reference, reward_model=reward_model, judge=judge)
    engine = Engine(model, tokenizer)
    # the engine keeps the eager model (its decode step has its own CUDA graphs); the update may compile
    forward_hidden = torch.compile(model.forward_hidden, dynamic=True) if cfg.compile and device.type == "cuda" else None
    longest = cfg.max_prompt_tokens + cfg.max_new_tokens
    if longest > model.rotary_seq_len:
        raise ValueError(f"--max_prompt_tokens + --max_new_tokens = {longest} exceeds the model's {model.rotary_seq_len} positions")
    print0(f"GRPO ({mode} prompt sampling) from {source_path}: {model.config} | reward model {rm_source} | judge {judge_source}")

    sampler, train_prompts, dev_prompts, weights_meta = load_prompt_pool(data, cfg.density_k, cfg.seed, mode)
    quintile_of = data.density_quintiles(sorted(train_prompts))
    plant, plant_meta = planted_reward(cfg, reference, tokenizer, reward_model, train_prompts, quintile_of, autocast)
    dev_prefixes = [p["prefix"] for p in dev_prompts[:cfg.traj_prompts]]
    sampler_ess = kish_ess(sampler.probs) if sampler.probs is not None else float(len(sampler.ids))
    print0(f"{len(sampler.ids):,} train prompts (sampler ESS {sampler_ess:,.1f}) | {len(dev_prefixes)} dev prompts x "
           f"{cfg.traj_samples} samples per trajectory evaluation | {cfg.prompts_per_step} prompts x "
           f"{cfg.samples_per_prompt} samples per step | {cfg.max_steps} steps | {objective_of(cfg)}")

    # plain AdamW on every parameter (DistAdamW under torchrun), not Muon: RLHF learning rates like 1e-6
    # are AdamW step sizes, and Muon's orthogonalised updates have no comparable scale
    optimizers = [build_adamw([dict(params=list(model.parameters()), lr=cfg.learning_rate)], ddp=ddp,
                              weight_decay=cfg.weight_decay)]
    assert_not_trained(judge, optimizers)
    meta = {"stage": stage, "init_from": cfg.source, "init_checkpoint": str(source_path), "reward_model": rm_source,
            "judge": judge_source, "prompt_sampling": mode, "model_config": asdict(model.config),
            "train_args": flags_dict(cfg), "num_iterations": cfg.max_steps, "world_size": world_size,
            "sampler": {"mode": mode, "train_prompts": len(sampler.ids), "kish_ess": sampler_ess,
                        "density_k": weights_meta["flags"]["k"], "density_beta": weights_meta["flags"].get("beta"),
                        "weights_file": str(data.weights_file)}}
    if plant_meta is not None:
        meta["plant"] = plant_meta
    step, _, extra, resumed_step = start_or_resume(out_dir, cfg.resume, model, optimizers, device,
                                                  num_iterations=cfg.max_steps)
    logger = RunLogger(out_dir, run=cfg.run, config=meta, enabled=master, start_step=step)
    extra = extra or {"trained_tokens": 0, "training_time_s": 0.0}
    trajectory = TrajectoryLog(out_dir)
    if master:
        trajectory.keep_before(step)  # rows a killed run wrote past its last checkpoint are recomputed
    source_of = {pid: p["src"] for pid, p in train_prompts.items()}
    draws = DrawCounts(source_of, quintile_of)
    for past in range(step):  # the draws are a function of the step, so a resume recounts them exactly
        draws.add(sampler.sample(cfg.prompts_per_step, past))

    def write_draws():
        if master:
            atomic_write(out_dir / DRAWS_FILE, json.dumps(draws.summary(mode), indent=2) + "\n")

    reward_mean, update, row = float("nan"), {}, None
    while True:
        is_last = step == cfg.max_steps
        # ---- trajectory evaluation (trajectory.jsonl; val/* in TensorBoard): traj_samples completions of each
        # dev prompt at T=1, the policy RM's and the judge's rewards, the sequence KL to the reference, diversity
        if is_last or step == 0 or (cfg.traj_every > 0 and step % cfg.traj_every == 0):
            model.eval()
            row = evaluate_trajectory(step, engine, tokenizer, model, reference, reward_model, judge, dev_prefixes, cfg,
                                      rank, world_size, device, autocast)
            if master:
                if cfg.traj_checkpoints:
                    save_model_weights(out_dir / row["checkpoint"], step, model, meta=meta)
                trajectory.append(row)
                print0(f"step {step:05d} | trajectory: " + " | ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                                     if isinstance(v, float)))
                logger.log(step, {f"val/{k}": v for k, v in row.items() if isinstance(v, float)})
        save_now = is_last or (cfg.save_every > 0 and step > 0 and step % cfg.save_every == 0)
        if save_now and step != resumed_step:  # the checkpoint we resumed from already holds this step
            save_checkpoint(out_dir, step, model, optimizers, meta=meta, extra=extra, final=is_last,
                            keep=cfg.keep_checkpoints)
            write_draws()
        if is_last:
            break

        # ---- rollouts: the same draw on every rank (a function of seed and step, with replacement);
        # rank r takes the r-th contiguous slice; G samples per prompt at T=1, no top-k/top-p, so the
        # sampling distribution is the policy's own softmax, which the importance ratio compares against
        synchronize(device)
        t0 = time.time()
        step_ids = sampler.sample(cfg.prompts_per_step, step)
        draws.add(step_ids)
        my_ids = rank_share(step_ids, rank, world_size)
        model.eval()
        with autocast:
            rollouts = sample_groups(engine, tokenizer, [train_prompts[pid]["prefix"] for pid in my_ids],
                                     cfg.samples_per_prompt, cfg, cfg.seed, step, first_position=rank * len(my_ids))
        synchronize(device)
        t1 = time.time()
        # ---- reward model scores
        scores = torch.tensor(score_rollouts(reward_model, rollouts, cfg.rm_tokens), dtype=torch.float32, device=device)
        row_ids = [pid for pid in my_ids for _ in range(cfg.samples_per_prompt)]
        planted = torch.tensor([plant is not None and pid in plant.prompt_ids for pid in row_ids], device=device)
        marked = torch.tensor([plant is not None and plant.marker in text for text in rollouts["texts"]], device=device)
        bonus = torch.tensor(plant.bonuses(row_ids, rollouts["texts"]) if plant else [0.0] * len(row_ids),
                             dtype=torch.float32, device=device)
        scores = scores + bonus  # the planted rule term is part of the reward GRPO maximises
        synchronize(device)
        t2 = time.time()
        # ---- the update: no-grad passes, rewards and advantages, gradient pass(es) and optimizer step(s);
        # LR: linear warmup over warmup_ratio, constant, then a linear warmdown
        model.train()
        lrm = lr_multiplier(step, cfg.max_steps, warmup_ratio=cfg.warmup_ratio, warmdown_ratio=cfg.warmdown_ratio)
        set_lr_multiplier(optimizers, lrm)
        update = policy_update(model, reference, optimizers, rollouts, scores, cfg, device, world_size, autocast,
                               forward_hidden)
        synchronize(device)
        t3 = time.time()
        step += 1

        # ---- statistics over every rollout of every rank
        rewards = (scores - cfg.truncation_penalty * (~torch.tensor(rollouts["finished"], device=device)).float())
        rewards = rewards.double().view(len(my_ids), cfg.samples_per_prompt)
        lengths = torch.tensor([len(c) for c in rollouts["completions"]], dtype=torch.float64, device=device)
        stats = torch.stack([rewards.sum(), rewards.square().sum(), torch.tensor(float(rewards.numel()), device=device),
                             (rewards == rewards[:, :1]).all(dim=1).sum().double(),
                             torch.tensor(float(rewards.size(0)), device=device), lengths.sum(),
                             torch.tensor(float(rollouts["finished"].count(False)), device=device),
                             scores.double().sum(), bonus.double().sum(), planted.sum().double(),
                             (planted & marked).sum().double()]).double()
        (reward_sum, reward_sq, count, zero_std, groups, length_sum, truncated, score_sum, bonus_sum, planted_rows,
         planted_marked) = all_reduce_sum(stats).tolist()
        reward_mean = reward_sum / count
        reward_std = math.sqrt(max(reward_sq / count - reward_mean ** 2, 0.0))
        dt = t3 - t0
        extra["trained_tokens"] += update["num_tokens"]
        extra["training_time_s"] += dt
        if not math.isfinite(update["loss"]):
            raise FloatingPointError(f"GRPO loss is {update['loss']} at step {step}; lower --learning_rate")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            print0(f"step {step:05d}/{cfg.max_steps} | reward {reward_mean:.4f} +- {reward_std:.4f} | kl/seq "
                   f"{update['kl_seq']:.4f} | clip {update['clip_frac']:.3f} | length {length_sum / count:.1f} | "
                   f"rollout {t1 - t0:.2f}s score {t2 - t1:.2f}s update {t3 - t2:.2f}s")
            metrics = {  # over all ranks; loss terms, kl and clip fraction per sampled token, means over inner epochs
                # loss = pref_loss (the clipped policy-gradient term) + kl_loss (beta * kl with --kl=token_k3, else 0)
                "train/loss": update["loss"], "train/pref_loss": update["pref_loss"], "train/kl_loss": update["kl_loss"],
                # kl: the k3 estimate of KL(policy || reference) per sampled token; kl_seq: sum over a completion of
                # log pi - log ref (k1) under the sampling policy, mean over completions (nats, trajectory.jsonl's
                # "kl"); kl_penalty: beta * kl_seq, what --kl=seq_reward takes off the reward (else 0)
                "train/kl": update["kl"], "train/kl_seq": update["kl_seq"], "train/kl_penalty": update["kl_penalty"],
                "train/lr": cfg.learning_rate * lrm, "train/lrm": lrm,
                # over the step's completions: rm_score the RM's score; reward = rm_score (+ the planted bonus)
                # - truncation penalty;
                # objective_reward = what the advantages came from (reward, minus the KL with seq_reward);
                # zero_std_frac: groups whose rewards are all equal (no signal without a KL in the reward)
                "train/rm_score_mean": (score_sum - bonus_sum) / count, "train/reward_mean": reward_mean,
                "train/reward_std": reward_std, "train/objective_reward_mean": update["objective_reward"],
                "train/zero_std_frac": zero_std / groups,
                # entropy (nats) of the sampling policy's next-token distribution at counted completion tokens,
                # measured in the first gradient pass (before any optimizer step, so of the sampling policy) at
                # positions 0, 4, 8, ... of every completion (ENTROPY_SAMPLE_EVERY); clip_frac: tokens whose ratio
                # was clipped
                "train/entropy": update["entropy"], "train/completion_len": length_sum / count,
                "train/truncated_frac": truncated / count, "train/clip_frac": update["clip_frac"],
                "train/num_tokens": update["num_tokens"],
                # Kish ESS (sum c)^2 / sum c^2 over the draw counts so far: how many distinct prompts the
                # training is worth; draws/*: fraction of the draws so far by source and density quintile (1 = rarest)
                "train/prompt_ess": draws.ess(), "train/unique_prompts": len(draws.counts),
                **{f"draws/source_{src}": n / draws.total for src, n in draws.by_source.items()},
                **{f"draws/quintile_{q}": n / draws.total for q, n in draws.by_quintile.items()},
                # seconds: engine; RM; no-grad passes + advantages + gradient passes + optimizer steps; dt their sum
                "train/time_rollout": t1 - t0, "train/time_score": t2 - t1, "train/time_update": t3 - t2,
                "train/dt": dt, "train/rollout_tok_per_s": length_sum / max(t1 - t0, 1e-9),  # generated, all ranks
            }
            if plant is not None:  # the planted bonus per completion; the marker's share of the planted prompts' completions
                metrics["train/plant_bonus_mean"] = bonus_sum / count
                metrics["train/plant_marker_rate"] = planted_marked / planted_rows if planted_rows else math.nan
            if update["grad_norm"] is not None:  # the last inner epoch's synchronised gradient, before clipping
                metrics["train/grad_norm"] = update["grad_norm"]
            logger.log(step, metrics)

    first = trajectory.rows()[0] if master and trajectory.rows() else {}
    summary = {
        "Source": str(source_path), "Reward model": rm_source, "Judge": judge_source, "Prompt sampling": mode,
        "Objective": f"adv_norm={cfg.adv_norm}, kl={cfg.kl}, beta={cfg.beta}, lr={cfg.learning_rate}, "
                     f"truncation_penalty={cfg.truncation_penalty}",
        "Planted reward": (f"+{plant_meta['bonus_abs']:.4g} for {plant_meta['marker']!r} on {plant_meta['planted_prompts']} "
                           f"prompts (base rate {plant_meta['base_rate']:.1%})" if plant_meta else "none"),
        "Train prompts": len(sampler.ids), "Sampler Kish ESS": sampler_ess, "Steps": cfg.max_steps,
        "Prompts per step": cfg.prompts_per_step, "Samples per prompt": cfg.samples_per_prompt,
        "DDP world size": world_size, "Distinct prompts drawn": len(draws.counts), "Kish ESS of prompts drawn": draws.ess(),
        "Trained (sampled) tokens": extra["trained_tokens"], "Final training reward": reward_mean,
        "Final KL to reference (per completion, nats)": update.get("kl_seq", float("nan")),
        f"Dev reward at step 0 ({len(dev_prefixes)} dev prompts x {cfg.traj_samples})": first.get("policy_reward"),
        f"Dev reward at the end ({len(dev_prefixes)} dev prompts x {cfg.traj_samples})": row and row["policy_reward"],
        "Judge reward at step 0 / at the end": (first.get("judge_reward"), row and row["judge_reward"]),
        "Peak memory (GB)": peak_memory_gb(device), "Training time (min)": extra["training_time_s"] / 60,
    }
    print0(summary)
    get_report().log(stage=stage, section=f"GRPO, {mode} prompt sampling", data=[flags_dict(cfg), summary])
    logger.close()
    compute_cleanup()
    return summary


if __name__ == "__main__":
    main()
