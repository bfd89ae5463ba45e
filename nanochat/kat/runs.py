"""
The GRPO runs a diversity evaluation compares: one folder per (arm, seed index), what GRPO wrote
there (trajectory.jsonl, traj/ checkpoints, draws.json; /work's interface contract), and the plan
for comparing them at a matched KL.

    runs = load_runs(discover_runs())        # grpo_density, grpo_baseline_s1, ... under outs/
    target, how = kl_target(runs, budget=-1) # the largest KL every run reached
    points = bracket(runs[0], target)        # the trajectory checkpoints around it, with their KLs

Folders: grpo_density, grpo_baseline, grpo_shuffled for seed index 0; <that>_s<i> for seed index i.
The arm is the sampler recorded in config.json (prompt_sampling), checked against the folder name.
"""

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from nanochat.checkpoint_manager import find_stage_checkpoint
from nanochat.common import get_outs_dir
from nanochat.kat.data import NUMBER, iter_jsonl, row_problem

ARMS = ("density", "uniform", "shuffled")  # prompt_sampling values; "uniform" is the baseline arm
STAGE_OF_ARM = {"density": "grpo_density", "uniform": "grpo_baseline", "shuffled": "grpo_shuffled"}
STAGE_NAME = re.compile(r"^(grpo_density|grpo_baseline|grpo_shuffled)(?:_s([1-9]\d*))?$")
TRAJECTORY_FILE, DRAWS_FILE = "trajectory.jsonl", "draws.json"
RERUN = "rerun that GRPO run (python -m scripts.grpo ... --out_dir <folder>)"

_NUMBER_OR_NULL = (lambda v: v is None or NUMBER[0](v), "a finite number or null")
_COUNT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0")
TRAJECTORY_FIELDS = {
    "step": _COUNT, "kl": NUMBER, "policy_reward": NUMBER, "judge_reward": _NUMBER_OR_NULL,
    **{name: _NUMBER_OR_NULL for name in ("distinct_2", "self_bleu", "within_prompt_distance", "across_prompt_distance",
                                          "em_dash_per_1k_chars", "not_x_but_y_per_1k_chars", "completion_len",
                                          "truncated_frac")},
    "checkpoint": (lambda v: isinstance(v, str) and v != "", "a checkpoint path relative to the run folder"),
}
_COUNTS = (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _COUNT[0](n) for k, n in v.items()),
           "an object {name: count}")
DRAWS_FIELDS = {"prompt_sampling": (lambda v: v in ARMS, f"one of {list(ARMS)}"), "draws": _COUNT,
                "unique_prompts": _COUNT, "kish_ess": NUMBER, "source_mix": _COUNTS,
                "density_quintiles": (lambda v: _COUNTS[0](v) and sorted(v) == list("12345"),
                                      'an object {"1": count, ..., "5": count}')}


@dataclass
class Run:
    name: str  # the folder's name, e.g. grpo_density_s1
    arm: str
    seed_index: int
    folder: Path
    checkpoint: Path  # the final model (or the newest intermediate one)
    config: dict
    trajectory: list[dict] | None = None  # rows by step; None with the reason in trajectory_missing
    trajectory_missing: str = ""
    draws: dict | None = None
    draws_missing: str = ""
    seed: int | None = None  # --seed of the run, as config.json records it


def stage_name(arm: str, seed_index: int) -> str:
    return STAGE_OF_ARM[arm] + (f"_s{seed_index}" if seed_index else "")


def discover_runs(outs_dir: Path | None = None) -> list[str]:
    """The GRPO run folders under outs/ (grpo_density[_sN], grpo_baseline[_sN], grpo_shuffled[_sN]), as stage names."""
    outs_dir = Path(outs_dir) if outs_dir else get_outs_dir()
    return sorted(p.name for p in outs_dir.iterdir() if p.is_dir() and STAGE_NAME.match(p.name)) if outs_dir.is_dir() else []


def read_trajectory(path: Path) -> list[dict]:
    """trajectory.jsonl's rows, checked as they load, by step (a step logged twice, as after a resume, keeps its last row)."""
    by_step = {}
    for line_number, row in iter_jsonl(path):
        problem = f"not JSON ({row})" if isinstance(row, json.JSONDecodeError) else row_problem(row, TRAJECTORY_FIELDS)
        if problem:
            raise ValueError(f"{path}:{line_number}: {problem}; {RERUN}")
        by_step[row["step"]] = {k: (math.nan if v is None and k != "judge_reward" else v) for k, v in row.items()}
    if not by_step:
        raise ValueError(f"{path} holds no trajectory point; {RERUN}")
    return [by_step[step] for step in sorted(by_step)]


def read_draws(path: Path) -> dict:
    try:
        draws = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not JSON ({err.msg}); {RERUN}") from None
    problem = row_problem(draws, DRAWS_FIELDS)
    if problem:
        raise ValueError(f"{path}: {problem}; {RERUN}")
    return draws


def load_run(source: str) -> Run:
    """A run from a stage name (grpo_density_s1), its folder or its checkpoint file."""
    checkpoint = find_stage_checkpoint(source).resolve()
    folder = checkpoint.parent
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    match = STAGE_NAME.match(folder.name)
    named_arm = next((arm for arm, stage in STAGE_OF_ARM.items() if match and match[1] == stage), None)
    arm = config.get("prompt_sampling") or named_arm
    if arm not in ARMS:
        raise ValueError(f"{folder}: cannot tell the run's sampler: config.json has no prompt_sampling and the folder is "
                         "not named grpo_density|grpo_baseline|grpo_shuffled[_s<i>]; pass a GRPO run folder")
    if named_arm is not None and named_arm != arm:
        raise ValueError(f"{folder} is named for the {named_arm} arm but its config.json says prompt_sampling={arm}")
    run = Run(name=folder.name, arm=arm, seed_index=int(match[2] or 0) if match else 0, folder=folder,
              checkpoint=checkpoint, config=config, seed=config.get("train_args", {}).get("seed"))
    path = folder / TRAJECTORY_FILE
    if path.is_file():
        run.trajectory = read_trajectory(path)
    else:
        run.trajectory_missing = f"no {path}"
    path = folder / DRAWS_FILE
    if path.is_file():
        run.draws = read_draws(path)
        if run.draws["prompt_sampling"] != arm:
            raise ValueError(f"{path} records prompt_sampling={run.draws['prompt_sampling']} for a {arm} run; {RERUN}")
    else:
        run.draws_missing = f"no {path}"
    return run


def load_runs(sources: list[str]) -> list[Run]:
    """Every run, checked: a density and a uniform arm, one run per (arm, seed index), no checkpoint twice."""
    if not sources:
        raise ValueError(f"no GRPO run folder (grpo_density, grpo_baseline, ...) under {get_outs_dir()}: run "
                         "scripts.grpo for both arms first, or pass --runs")
    runs, seen_checkpoints, otherwise_named = [], {}, Counter()
    for source in sources:
        run = load_run(source)
        if not STAGE_NAME.match(run.folder.name):  # its seed index: its place among such runs of its arm
            run.seed_index = otherwise_named[run.arm]
            otherwise_named[run.arm] += 1
        if run.checkpoint in seen_checkpoints:
            raise ValueError(f"{seen_checkpoints[run.checkpoint]} and {source} both resolve to {run.checkpoint}: that "
                             "would compare a model with itself")
        seen_checkpoints[run.checkpoint] = source
        runs.append(run)
    keys = [(r.arm, r.seed_index) for r in runs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"two runs claim the same arm and seed index {repeated}: give each run its own folder")
    missing = [arm for arm in ("density", "uniform") if arm not in {r.arm for r in runs}]
    if missing:
        raise ValueError(f"no {' and no '.join(missing)} run among {[r.name for r in runs]}: the experiment compares "
                         f"both arms (folders {', '.join(STAGE_OF_ARM[a] for a in missing)})")
    return sorted(runs, key=lambda r: (ARMS.index(r.arm), r.seed_index))


# -----------------------------------------------------------------------------
# Matched KL

def kl_target(runs: list[Run], budget: float = -1.0) -> tuple[float, str]:
    """(the KL every run is compared at, how it was chosen): --kl_budget when >= 0, else the largest KL every run reached."""
    lacking = [f"{r.name} ({r.trajectory_missing})" for r in runs if r.trajectory is None]
    if lacking:
        raise ValueError(f"no trajectory for {', '.join(lacking)}")
    reached = {r.name: max(point["kl"] for point in r.trajectory) for r in runs}
    if budget >= 0:
        short = {name: kl for name, kl in reached.items() if kl < budget}
        if short:
            raise ValueError(f"--kl_budget={budget:g} is beyond what these runs reached: "
                             + ", ".join(f"{name} at most {kl:.4g}" for name, kl in short.items())
                             + "; lower it, or pass -1 for the largest KL every run reached")
        return float(budget), "--kl_budget"
    least = min(reached, key=reached.get)
    if reached[least] <= 0:
        raise ValueError(f"{least}'s KL never rose above 0 along its trajectory: there is no KL to match the runs at")
    return float(reached[least]), f"the largest KL every run reached (the maximum of {least}, the run that moved least)"


def bracket(run: Run, target: float) -> list[dict]:
    """
    The trajectory points to interpolate between at KL = target: the first point whose KL reaches the
    target and the one before it (KL need not rise monotonically; the run is taken where it first got
    there), or that one point alone when it sits at the target. Each: step, kl, checkpoint (a Path).
    """
    points = run.trajectory
    first = next((j for j, point in enumerate(points) if point["kl"] >= target), None)
    if first is None:
        raise ValueError(f"{run.name} never reached KL {target:g} (at most {max(p['kl'] for p in points):.4g})")
    if points[first]["kl"] > target and first == 0:
        raise ValueError(f"{run.name}'s first trajectory point (step {points[0]['step']}) already has KL "
                         f"{points[0]['kl']:.4g} > {target:g}: it cannot be interpolated there")
    chosen = points[first:first + 1] if points[first]["kl"] == target else points[first - 1:first + 1]
    result = []
    for point in chosen:
        path = run.folder / point["checkpoint"]
        if not path.is_file():
            raise FileNotFoundError(f"{run.folder / TRAJECTORY_FILE} names {point['checkpoint']} for step {point['step']}, "
                                    f"which does not exist; {RERUN}")
        result.append({"step": point["step"], "kl": point["kl"], "checkpoint": path})
    return result
