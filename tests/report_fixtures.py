"""
Synthetic GRPO runs for the diversity report's tests (test_eval_diversity.py, test_diversity_arms.py,
test_style_injection.py), in the format /work's interface contract gives GRPO's run folders:
- write_run: a run folder on disk: ckpt.pt and config.json, traj/step_XXXXXX.pt weights-only
  checkpoints, trajectory.jsonl and draws.json, from tiny random models;
- arms_context: responses with known differences per model, put through the real computing code
  (diversity_eval.model_tables, scripts.eval_diversity.compare_arms, arm_stats.collapse_alarm) into
  the part of the report's context the seed-level sections read;
- controls_part: the report's "controls" part as a main run without control runs has it.
"""

import copy
import functools
import json
import math
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.kat.arm_stats import collapse_alarm
from nanochat.kat.diversity_eval import model_tables
from nanochat.kat.reward_model import KIND, RewardModel
from nanochat.kat.runs import ARMS, DRAWS_FILE, TRAJECTORY_FILE, load_runs, stage_name
from nanochat.kat.controls import null_false_positive_rate
from nanochat.kat.toy import sampler_control_summary
from scripts.eval_diversity import compare_arms, plan_matched_kl, run_summary

SETTINGS = {"n_resamples": 400, "confidence": 0.95, "alpha": 0.05, "seed": 0}


def tiny_model(vocab_size: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.size(-1)))
    return model.eval()


def write_reward_model(folder: Path, tokenizer, seed: int, role: str, accuracy: float):
    """A tiny random reward model as scripts.train_rm saves it, with an eval.json in its shape (figures made up)."""
    backbone = tiny_model(tokenizer.get_vocab_size(), seed)
    config = asdict(backbone.config)
    save_checkpoint(folder, 5, RewardModel(backbone, tokenizer, max_seq_len=128), [],
                    meta={"kind": KIND, "role": role, "model_config": config, "backbone_config": config, "max_seq_len": 128},
                    final=True)
    quintile = {"n_prompts": 2, "density_min": 0.1, "density_max": 0.2, "n_pairs": 4, "accuracy": 0.75, "loss": 0.6,
                "margin": 0.2}
    (folder / "eval.json").write_text(json.dumps(
        {"checkpoint": "ckpt.pt", "step": 5, "pair_weighting": "uniform", "role": role, "train_pairs": 100, "split": "test",
         "n_pairs": 20, "accuracy": accuracy, "loss": 0.66, "margin": 0.1,
         "by_source": {"hh-rlhf": {"n_pairs": 20, "accuracy": accuracy, "loss": 0.66, "margin": 0.1}},
         "by_density_quintile": {str(q): quintile for q in range(1, 6)}}))


def trajectory_row(step: int, kl: float, judge: bool = True) -> dict:
    """One trajectory.jsonl row with every field the contract names (figures made up: only KL and step matter here)."""
    return {"step": step, "kl": kl, "policy_reward": 0.1 * step, "judge_reward": 0.05 * step if judge else None,
            "distinct_2": 0.7 - 0.01 * step, "self_bleu": 0.2 + 0.01 * step, "within_prompt_distance": 0.4,
            "across_prompt_distance": 0.6 - 0.005 * step, "em_dash_per_1k_chars": 0.0, "not_x_but_y_per_1k_chars": 0.0,
            "completion_len": 40.0, "truncated_frac": 0.1, "checkpoint": f"traj/step_{step:06d}.pt"}


def draws_record(arm: str, seed_index: int) -> dict:
    skew = {"density": [30, 25, 20, 15, 10], "uniform": [20, 20, 20, 20, 20], "shuffled": [21, 19, 20, 20, 20]}[arm]
    return {"prompt_sampling": arm, "draws": 100, "unique_prompts": 60 + seed_index, "kish_ess": 50.0 + 10 * (arm != "density"),
            "source_mix": {"hh-rlhf": 55 + 5 * (arm == "density"), "ultrafeedback": 45 - 5 * (arm == "density")},
            "density_quintiles": {str(q + 1): n for q, n in enumerate(skew)}}


def write_run(outs: Path, arm: str, seed_index: int, kls: list[float], steps: list[int], vocab_size: int,
              model_seed: int, judge: bool = True) -> Path:
    """A GRPO run folder: a tiny random model per trajectory step (the last is also ckpt.pt) and the run's files."""
    folder = outs / stage_name(arm, seed_index)
    (folder / "traj").mkdir(parents=True, exist_ok=True)
    meta = {"prompt_sampling": arm, "train_args": {"seed": 42 + seed_index, "prompt_sampling": arm}}
    for k, step in enumerate(steps):
        model = tiny_model(vocab_size, model_seed * 100 + k)
        torch.save({"format": 1, "step": step, "world_size": 1, "model": model.state_dict(),
                    "meta": {**meta, "model_config": asdict(model.config), "step": step}},
                   folder / "traj" / f"step_{step:06d}.pt")
    save_checkpoint(folder, steps[-1], model, [], meta={**meta, "model_config": asdict(model.config)}, final=True)
    (folder / TRAJECTORY_FILE).write_text("".join(json.dumps(trajectory_row(s, kl, judge)) + "\n"
                                                  for s, kl in zip(steps, kls)))
    (folder / DRAWS_FILE).write_text(json.dumps(draws_record(arm, seed_index)))
    return folder


# -----------------------------------------------------------------------------
# Synthetic responses through the real computing code

def run_kls(arm: str, seed_index: int) -> list[float]:
    """KL at steps 0, 10, 20, 30: every run rises at its own pace; the density arm's seed 1 moves least."""
    pace = {"density": 0.5, "uniform": 0.6, "shuffled": 0.55}[arm] - 0.05 * seed_index
    return [0.0, pace, 2 * pace, 3 * pace]


def synthetic_responses(rng, num_prompts: int, num_samples: int, vocab: int, collapse: float, directions, common):
    """Texts of 10 words from a vocabulary of `vocab` words (a smaller one repeats bigrams: lower distinct-2); embeddings
    pulled from each prompt's own direction toward one shared direction by `collapse` (1: one template for all)."""
    ids = rng.integers(0, vocab, size=(num_prompts, num_samples, 10))
    texts = [[" ".join(f"w{i}" for i in row) for row in prompt] for prompt in ids]
    token_ids = [[row.tolist() for row in prompt] for prompt in ids]
    vectors = (1 - collapse) * directions[:, None, :] + collapse * common + 0.25 * rng.normal(size=(num_prompts, num_samples,
                                                                                                    directions.shape[1]))
    return texts, token_ids, vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def make_run_folder(folder: Path, arm: str, seed_index: int, kls: list[float] | None, steps=(0, 10, 20, 30)) -> Path:
    """A run folder with the run's files but checkpoints without weights (found, never loaded): for tests of what
    is read from run folders and of the analysis, without models. kls=None: no trajectory."""
    run_dir = folder / stage_name(arm, seed_index)
    (run_dir / "traj").mkdir(parents=True, exist_ok=True)
    torch.save({"format": 1, "step": steps[-1], "world_size": 1, "meta": {}, "model": {}}, run_dir / "ckpt.pt")
    (run_dir / "config.json").write_text(json.dumps({"prompt_sampling": arm, "train_args": {"seed": 42 + seed_index}}))
    if kls is not None:
        rows = [trajectory_row(step, kl) for step, kl in zip(steps, kls)]
        (run_dir / TRAJECTORY_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        for r in rows:
            (run_dir / r["checkpoint"]).write_bytes(b"")
    (run_dir / DRAWS_FILE).write_text(json.dumps(draws_record(arm, seed_index)))
    return run_dir


def arms_context(folder: Path, seeds: dict[str, int], vocab: dict[str, int] | None = None, collapse: dict | None = None,
                 trajectories: bool = True, num_prompts: int = 12, num_samples: int = 3, quintiles=None, seed: int = 0):
    """
    The report context's seed-level part for runs {arm: how many seeds}: run folders under `folder`
    (trajectory.jsonl naming empty traj/ files, draws.json), synthetic responses for SFT and every
    model the analysis needs, and what compare_arms and collapse_alarm make of them. vocab: words
    per arm (SFT uses 60); collapse: {run name: how far its embeddings collapse onto one direction}.
    Returns (context part, per-label inputs {texts, token_ids, embeddings, judge}, tables).
    """
    vocab, collapse = {"density": 40, "uniform": 40, "shuffled": 40, **(vocab or {})}, collapse or {}
    sources = [str(make_run_folder(folder, arm, i, run_kls(arm, i) if trajectories else None) / "ckpt.pt")
               for arm in ARMS for i in range(seeds.get(arm, 0))]
    runs = load_runs(sources)
    matched = plan_matched_kl(runs, -1.0)
    labels = ["sft", *[r.name for r in runs]]
    if matched["available"]:
        labels += [p["label"] for points in matched["points"].values() for p in points]
    arm_of = {r.name: r.arm for r in runs}
    rng = np.random.default_rng(seed)
    directions, common = rng.normal(size=(num_prompts, 16)), rng.normal(size=16)
    texts, token_ids, embeddings, judge, truncated = {}, {}, {}, {}, {}
    for label in labels:
        run_name = label.split("@")[0]
        words = 60 if label == "sft" else vocab[arm_of[run_name]]
        texts[label], token_ids[label], embeddings[label] = synthetic_responses(
            rng, num_prompts, num_samples, words, collapse.get(run_name, 0.0), directions, common)
        judge[label] = rng.normal(size=(num_prompts, num_samples)) + (0.5 if label.startswith("grpo_density") else 0.0)
        truncated[label] = [[False] * num_samples for _ in range(num_prompts)]
    tables = model_tables(labels, texts, token_ids, truncated, embeddings, judge, judge, vocab_size=1000, mattr_window=50)
    quintiles = quintiles if quintiles is not None else [1 + p % 5 for p in range(num_prompts)]
    arms = compare_arms(runs, matched, texts, token_ids, tables, quintiles, 1000, 50, SETTINGS)
    not_found = {"path": "x", "reason": "file does not exist", "data": None}
    context = {"runs": [run_summary(r) for r in runs], "matched": matched, "arms": arms, "tables": tables,
               "alarm": collapse_alarm(tables["sft"], arms), "settings": SETTINGS, "judge": "rm_judge (synthetic)",
               "evaluated": {label: {"checkpoint": f"{label}.pt", "step": 1, "git_commit": "abc"} for label in labels},
               "rm_eval": {"judge": not_found, "policy": not_found}}
    return context, {"texts": texts, "token_ids": token_ids, "embeddings": embeddings, "judge": judge}, tables


@functools.lru_cache(maxsize=None)
def _cached_context_part(seeds: tuple) -> dict:
    with tempfile.TemporaryDirectory() as folder:  # the folders are read once, while the context is built
        return arms_context(Path(folder), dict(seeds))[0]


def seed_context_part(density: int = 1, uniform: int = 1) -> dict:
    """A fresh copy of the seed-level context part of synthetic runs (built once per seed count)."""
    return copy.deepcopy(_cached_context_part((("density", density), ("uniform", uniform))))


@functools.lru_cache(maxsize=None)
def _synthetic_controls() -> dict:
    return {"synthetic": sampler_control_summary(), "null_fpr": null_false_positive_rate(replicates=20, seed_sd=0.05)}


def controls_part(tiny: bool = False) -> dict:
    """The synthetic sampler control and null, and no control run (a fresh copy)."""
    return {"this": "", "tiny": tiny, **copy.deepcopy(_synthetic_controls()), "controls_dir": "x",
            "outcomes": {"sampler": None, "tic": None, "null": None}}


def report_context(labels, seed_part: dict | None = None, strata: dict | None = None, reward_model: str = "rm") -> dict:
    """A whole context for render_markdown around a seed-0 detail of these labels: the seed-level part (by default
    one synthetic run per arm) and made-up models, prompts, sampling and run facts."""
    not_found = {"path": "x", "reason": "file does not exist", "data": None}
    return {**(seed_part if seed_part is not None else seed_context_part()),
            "models": {label: {"source": label, "checkpoint": f"outs/{label}/ckpt.pt", "step": 1, "git_commit": "abc"}
                       for label in labels},
            "prompts": {"file": "prompts_all.jsonl", "num_candidates": 12, "num_too_long": 0, "max_prompt_tokens": 1024,
                        "method": "all", "strata": strata or {}},
            "sampling": {"temperature": 1.0, "top_k": "none", "top_p": 1.0, "max_tokens": 16, "seed": 0, "seed_rule": "rule"},
            "embedding_model": "sft", "reward_model": reward_model, "notes": [], "world_size": 1, "device": "cpu",
            "git_commit": "abc", "seconds": 1.0, "mattr_window": 50, "examples": [], "density_stats": not_found,
            "training_curves": {arm: {"series": {"reward": None, "kl": None}, "reason": {"reward": "none", "kl": "none"}}
                                for arm in ("baseline", "density")},
            "controls": controls_part()}
