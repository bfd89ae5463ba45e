"""
The experiment's controls: checks that can fail, each passing only when the pipeline can see what it
is meant to see. Computing here; the report's "Controls" section is nanochat/kat/controls_report.py.

- The planted reward (scripts/grpo.py --plant_marker): GRPO's reward gains a bonus for completions
  that contain a marker, on the train prompts of one density quintile (the sampler control) or on a
  fixed fraction of all of them (the tic control's dose). The marker's base rate on the starting
  policy's own samples is measured before training; a marker it never writes cannot be amplified.
- sampler control (scripts.eval_diversity --control=sampler): the marker rate on held-out rare prompts,
  density arm minus uniform arm, over seeds then prompts.
- tic control (scripts.tic_control): the em-dash rate at a matched KL along each run's trajectory, per dose.
- null control (scripts.eval_diversity --control=null): the primary verdict on two uniform samplers.
- synthetic (synthetic_controls): nanochat/kat/toy.py's sampler control, and the primary verdict's
  false-positive rate on synthetic null tables (python -m dev.null_control_fpr measures it at length).
"""

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanochat.common import atomic_write, get_outs_dir
from nanochat.kat import stats as ps
from nanochat.kat.arm_stats import ONE_SEED, PRIMARY_METRIC, analyse_arms, arm_contrast
from nanochat.kat.diversity import EM_DASH
from nanochat.kat.toy import sampler_control_summary

KINDS = ("sampler", "tic", "null")
OUTCOME_FILE = "control_outcome.json"  # in a control root's KAT cache: what the main report reads
CONTROLS_DIR_ENV = "NANOCHAT_CONTROL_DIR"
# markers --plant_marker=auto chooses from: ordinary punctuation and words, none of the diversity tics
MARKER_CANDIDATES = ("!", "?", ":", ";", "(", '"', "also", "because", "example", "important")
TIC_MARKER = EM_DASH
TARGET_BASE_RATE = 0.25  # auto: the candidate whose base rate is closest to this (room to rise, often seen)
UNIFORM_ESS_FRACTION = 0.999  # the null control's density arm must sample uniformly: Kish ESS = n
PASSED, FAILED, INCOMPLETE = "passed", "failed", "incomplete"
REPORT_NULL_REPLICATES = 100  # the synthetic null in every control report: seconds of CPU (dev.null_control_fpr: more)


def controls_dir() -> Path:
    """Where the control roots live: $NANOCHAT_CONTROL_DIR, else control_run/ beside the run's outs/."""
    configured = os.environ.get(CONTROLS_DIR_ENV)
    return Path(configured).expanduser().resolve() if configured else get_outs_dir().parent / "control_run"


# -----------------------------------------------------------------------------
# The planted reward

def planted_prompt_ids(quintile_of: dict[str, int], quintile: int, fraction: float) -> frozenset[str]:
    """
    The train prompts where the planted term pays: those of density quintile `quintile` (1 = rarest;
    0 = every quintile), of which the first round(fraction * n) in the order of a hash of the id. The
    pick depends on nothing else, so a smaller fraction's prompts are among a larger one's.
    """
    if quintile not in range(6) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"need quintile in 0..5 and fraction in [0, 1], got {quintile} and {fraction}")
    pool = sorted((pid for pid, q in quintile_of.items() if quintile == 0 or q == quintile),
                  key=lambda pid: (hashlib.blake2b(f"plant:{pid}".encode(), digest_size=8).digest(), pid))
    return frozenset(pool[:math.floor(fraction * len(pool) + 0.5)])


@dataclass(frozen=True)
class PlantedReward:
    """The rule term added to GRPO's reward: `bonus` for a completion containing `marker`, on the planted prompts."""
    marker: str
    bonus: float
    prompt_ids: frozenset

    def bonuses(self, prompt_ids: list[str], texts: list[str]) -> list[float]:
        if len(prompt_ids) != len(texts):
            raise ValueError(f"one prompt id per completion: got {len(prompt_ids)} ids and {len(texts)} texts")
        return [self.bonus if pid in self.prompt_ids and self.marker in text else 0.0
                for pid, text in zip(prompt_ids, texts)]


def marker_rate(texts: list[str], marker: str) -> float:
    """The share of completions that contain the marker."""
    return sum(marker in text for text in texts) / len(texts) if texts else math.nan


def pooled_within_std(scores: np.ndarray) -> float:
    """The reward model's spread among the samples of one prompt, pooled over prompts: scores (P, G)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"need scores of shape (prompts, samples >= 2), got {scores.shape}")
    return float(np.sqrt(scores.var(axis=1, ddof=1).mean()))


def choose_marker(texts: list[str], requested: str, min_rate: float, max_rate: float) -> tuple[str, dict]:
    """
    (the marker, every candidate's base rate) from the starting policy's samples. requested "auto":
    of MARKER_CANDIDATES within [min_rate, max_rate], the one whose rate is closest to TARGET_BASE_RATE.
    A marker outside that range is refused: below it GRPO has nothing to amplify, above it no room
    to rise, so the control could not pass and would only cost its GPU time.
    """
    candidates = MARKER_CANDIDATES if requested == "auto" else (requested,)
    rates = {marker: marker_rate(texts, marker) for marker in candidates}
    fitting = [m for m in candidates if min_rate <= rates[m] <= max_rate]
    where = f"{len(texts)} completions of the starting policy on the planted prompts"
    if requested != "auto" and not fitting:
        raise ValueError(f"--plant_marker={requested!r} is in {rates[requested]:.1%} of {where}, outside "
                         f"[--plant_min_rate={min_rate:g}, --plant_max_rate={max_rate:g}]: GRPO can only amplify a marker "
                         "the policy writes, and one it always writes cannot rise, so this control could not pass. "
                         "Choose another marker (--plant_marker=auto picks one from the policy's own samples)")
    if not fitting:
        raise ValueError(f"no marker candidate is in [--plant_min_rate={min_rate:g}, --plant_max_rate={max_rate:g}] "
                         f"of {where} (" + ", ".join(f"{m!r} {r:.1%}" for m, r in rates.items()) + "): the control "
                         "could not pass. Pass one the policy writes with --plant_marker=<text>, or sample longer "
                         "completions (--max_new_tokens)")
    return min(fitting, key=lambda m: (abs(rates[m] - TARGET_BASE_RATE), candidates.index(m))), rates


def plant_record(runs) -> dict:
    """The planted reward every run trained with (config.json's "plant"), checked to be one and the same."""
    keys = ("marker", "quintile", "fraction", "bonus")
    records = {}
    for run in runs:
        plant = run.config.get("plant")
        if not plant:
            raise ValueError(f"{run.folder / 'config.json'} records no planted reward: this control's GRPO runs need "
                             "--plant_marker (runs/control.sh passes it)")
        records[run.name] = plant
    first_name, first = next(iter(records.items()))
    for name, plant in records.items():
        differ = [k for k in keys if plant.get(k) != first.get(k)]
        if differ:
            raise ValueError(f"{name} and {first_name} planted different rewards ({', '.join(differ)}: "
                             f"{[plant.get(k) for k in differ]} vs {[first.get(k) for k in differ]}); rerun them alike")
    return {**{k: first[k] for k in keys}, "runs": records}


# -----------------------------------------------------------------------------
# The sampler control: the marker rate on held-out rare prompts, density minus uniform

def per_prompt_marker_rates(texts: dict, marker: str) -> dict:
    """{label: [P]} the share of each prompt's samples that contain the marker, from texts {label: [P][N]}."""
    return {label: np.array([marker_rate(samples, marker) for samples in rows]) for label, rows in texts.items()}


def _at_target(points: list[dict], target: float | None, per_label: dict) -> np.ndarray:
    """A run's per-prompt values: its one point, or its two points around KL = target interpolated."""
    stacked = np.array([per_label[point["label"]] for point in points], dtype=np.float64)
    return stacked[0] if target is None else ps.interpolate_at(target, [p["kl"] for p in points], stacked)


def q1_draw_share(draws: dict | None) -> float:
    """The share of a run's draws from density quintile 1 (the rarest) of the train prompts; nan without draws.json."""
    if not draws:
        return math.nan
    counts = draws["density_quintiles"]
    return counts["1"] / max(sum(counts.values()), 1)


def sampler_control(runs, plans: dict, rates: dict, quintiles, settings: dict) -> dict:
    """
    runs: the GRPO runs (name, arm, seed_index, config, draws); plans {where: (points, target)} as the
    arms analysis uses them (matched_kl first when it ran, then endpoint); rates {label: [P]} of every
    evaluated model (SFT as "sft"); quintiles: each final prompt's density quintile among the final
    prompts (1 = rarest). Pass: density - uniform on the rare prompts, supported over seeds then prompts,
    with the density arm drawing quintile 1 more often than the uniform arm.
    """
    plant = plant_record(runs)
    quintiles = np.asarray(quintiles)
    rare, common = np.flatnonzero(quintiles == 1), np.flatnonzero(quintiles > 1)
    by_arm = {arm: sorted((r for r in runs if r.arm == arm), key=lambda r: r.seed_index) for arm in ("density", "uniform")}
    result = {"plant": plant, "rare_prompts": len(rare), "common_prompts": len(common),
              "sft": {"rare": float(np.mean(rates["sft"][rare])) if len(rare) else math.nan,
                      "common": float(np.mean(rates["sft"][common])) if len(common) else math.nan},
              "draws_q1": {arm: [q1_draw_share(r.draws) for r in rs] for arm, rs in by_arm.items()},
              "seeds": {arm: [r.name for r in rs] for arm, rs in by_arm.items()}, "where": {}}
    for where, (points, target) in plans.items():
        values = {r.name: _at_target(points[r.name], target, rates) for r in runs}
        figures = {"target": target, "means": {arm: {part: float(np.mean([values[r.name][cols] for r in rs]))
                                                    for part, cols in (("rare", rare), ("common", common)) if len(cols)}
                                              for arm, rs in by_arm.items()}}
        for part, cols in (("rare", rare), ("common", common)):
            if len(cols) >= 2:
                figures[part] = arm_contrast(np.stack([values[r.name][cols] for r in by_arm["density"]]),
                                             np.stack([values[r.name][cols] for r in by_arm["uniform"]]), "higher", settings)
        result["where"][where] = figures
    result["primary"] = next(iter(plans))
    result["status"], result["passed"] = _sampler_status(result)
    return result


def _sampler_status(result: dict) -> tuple[str, bool | None]:
    rare = result["where"][result["primary"]].get("rare")
    if rare is None:
        return f"{INCOMPLETE}: only {result['rare_prompts']} final prompts in the rarest quintile (need 2)", None
    if rare["verdict"] == ONE_SEED:
        return f"{INCOMPLETE}: one seed per arm (the pass needs the seed-level interval)", None
    shares = {arm: np.nanmean(s) if any(math.isfinite(x) for x in s) else math.nan for arm, s in result["draws_q1"].items()}
    if all(math.isfinite(s) for s in shares.values()) and shares["density"] <= shares["uniform"]:
        return (f"{FAILED}: the density arm drew the rarest quintile no more often than the uniform arm "
                f"({shares['density']:.1%} vs {shares['uniform']:.1%}): its weights do not favour rare prompts"), False
    if rare["verdict"] == ps.SUPPORTED:
        return PASSED, True
    return (f"{FAILED}: density - uniform marker rate on rare prompts {rare['diff']:+.3g} "
            f"[{rare['ci'][0]:+.3g}, {rare['ci'][1]:+.3g}] ({rare['verdict']})"), False


# -----------------------------------------------------------------------------
# The null control: the primary verdict on two uniform samplers

def null_control(runs, analysis: dict, where: str, density_stats: dict | None) -> dict:
    """
    analysis: the arms analysis at `where` (its primary contrast is the report's verdict). The density
    arm must have sampled uniformly (weights density^0: Kish ESS = n) with other seeds than the
    uniform arm. Pass: the primary verdict is inconclusive ("no difference").
    """
    data = (density_stats or {}).get("data")
    ess_fraction = data["kish_ess_fraction"] if data else math.nan
    seeds = {arm: sorted(r.seed for r in runs if r.arm == arm) for arm in ("density", "uniform")}
    primary = analysis["primary"]
    result = {"where": where, "primary": primary, "kish_ess_fraction": ess_fraction, "seeds": seeds,
              "largest_noise_floor": analysis["largest_noise_floor"], "metric": PRIMARY_METRIC}
    if not ess_fraction >= UNIFORM_ESS_FRACTION:
        result["status"] = (f"{INCOMPLETE}: not a null control: the density arm's weights are not uniform (Kish ESS "
                            f"{ess_fraction:.1%} of n; run scripts.kat_density --beta=0 for it)")
        result["passed"] = None
    elif set(seeds["density"]) & set(seeds["uniform"]):
        result["status"], result["passed"] = f"{INCOMPLETE}: the two arms share seeds {seeds}; give them different ones", None
    elif primary["verdict"] == ONE_SEED:
        result["status"], result["passed"] = f"{INCOMPLETE}: one seed per arm (the verdict needs 2 or more)", None
    elif primary["verdict"] == ps.INCONCLUSIVE:
        result["status"], result["passed"] = PASSED, True
    else:
        result["status"] = (f"{FAILED}: the primary verdict is '{primary['verdict']}' for two uniform samplers "
                            f"({primary['diff']:+.3g} [{primary['ci'][0]:+.3g}, {primary['ci'][1]:+.3g}])")
        result["passed"] = False
    return result


@dataclass
class SyntheticRun:
    name: str
    arm: str
    seed_index: int


def synthetic_arm_tables(rng, seeds: int, prompts: int, mean: float = 0.6, prompt_sd: float = 0.1,
                         seed_sd: float = 0.02, noise_sd: float = 0.06, drift: float = 0.05, effect: float = 0.0):
    """
    Two arms of `seeds` runs, drawn alike but for `effect` added to the density arm (0: the null):
    per-prompt primary-metric values = mean + a prompt effect + a run (seed) offset + run-by-prompt
    noise, clipped to [0, 1], at two trajectory points (the second `drift` lower) with each run's own
    KLs around a common target. Returns (runs, points, target, tables) in analyse_arms' shapes.
    """
    shared = rng.normal(0.0, prompt_sd, prompts)
    runs, points, tables = [], {}, {}
    target = 1.0
    for arm in ("density", "uniform"):
        for i in range(seeds):
            run = SyntheticRun(name=f"{arm}_{i}", arm=arm, seed_index=i)
            level = mean + (effect if arm == "density" else 0.0) + shared + rng.normal(0.0, seed_sd) \
                + rng.normal(0.0, noise_sd, prompts)
            kls = [rng.uniform(0.2, 0.9), rng.uniform(1.1, 2.0)]  # one trajectory point below the target, one above
            points[run.name] = []
            for k, kl in enumerate(kls):
                label = f"{run.name}@{k}"
                tables[label] = {PRIMARY_METRIC: np.clip(level - drift * k + rng.normal(0.0, noise_sd / 2, prompts), 0, 1)}
                points[run.name].append({"label": label, "kl": kl})
            runs.append(run)
    return runs, points, target, tables


def null_false_positive_rate(replicates: int = 200, seeds: int = 3, prompts: int = 100, n_resamples: int = 1000,
                             alpha: float = 0.05, seed: int = 0, **synthetic) -> dict:
    """
    How often the report's primary verdict (analyse_arms at matched KL) declares a difference between
    two arms drawn alike (or, with effect=, how often it finds that effect): replicates of
    synthetic_arm_tables, with the Clopper-Pearson 95% interval of the rate.
    """
    from scipy import stats as scipy_stats

    rng = np.random.default_rng(seed)
    settings = {"n_resamples": n_resamples, "confidence": 0.95, "alpha": alpha, "seed": seed}
    positives = 0
    for r in range(replicates):
        runs, points, target, tables = synthetic_arm_tables(rng, seeds, prompts, **synthetic)
        verdict = analyse_arms(runs, points, target, tables, tables, None, {**settings, "seed": seed + r})["primary"]["verdict"]
        positives += verdict in (ps.SUPPORTED, ps.CONTRADICTED)
    low = float(scipy_stats.beta.ppf(0.025, positives, replicates - positives + 1)) if positives else 0.0
    high = float(scipy_stats.beta.ppf(0.975, positives + 1, replicates - positives)) if positives < replicates else 1.0
    se = math.sqrt(alpha * (1 - alpha) / replicates)
    return {"replicates": replicates, "false_positives": positives, "rate": positives / replicates, "ci": (low, high),
            "seeds": seeds, "prompts": prompts, "alpha": alpha, "binomial_se": se, "bound": alpha + 2 * se,
            "passed": positives / replicates <= alpha + 2 * se, **synthetic}


def synthetic_controls() -> dict:
    """What every control report opens with: the toy sampler control (nanochat/kat/toy.py) and the primary
    verdict's false-positive rate on synthetic null pairs whose seeds differ as much as real runs' do."""
    return {"synthetic": sampler_control_summary(),
            "null_fpr": null_false_positive_rate(replicates=REPORT_NULL_REPLICATES, seed_sd=0.05)}


# -----------------------------------------------------------------------------
# The tic control: the em-dash rate at a matched KL along each run's trajectory, per dose

def _t_interval(mean: float, se: float, df: int, confidence: float) -> tuple[tuple[float, float], float]:
    from scipy import stats as scipy_stats

    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, df)) * se
    p = 1.0 if se == 0 and mean == 0 else float(2 * scipy_stats.t.sf(abs(mean) / max(se, 1e-300), df))
    return (mean - half, mean + half), p


def seed_mean(values, confidence: float = 0.95) -> dict:
    """Mean over runs (seeds) with its Student t interval on S - 1 degrees of freedom and two-sided p for mean 0."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return {"n": len(v), "mean": float(v.mean()) if len(v) else math.nan, "ci": (math.nan, math.nan), "p": math.nan}
    ci, p = _t_interval(float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))), len(v) - 1, confidence)
    return {"n": len(v), "mean": float(v.mean()), "ci": ci, "p": p}


def dose_slope(doses, values, confidence: float = 0.95) -> dict:
    """Least-squares slope of values on doses (one point per run) with its t interval on n - 2 degrees of freedom."""
    x, y = np.asarray(doses, dtype=np.float64), np.asarray(values, dtype=np.float64)
    sxx = float(((x - x.mean()) ** 2).sum())
    if len(x) < 3 or sxx == 0:
        return {"slope": math.nan, "ci": (math.nan, math.nan), "p": math.nan, "n": len(x)}
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
    residuals = y - y.mean() - slope * (x - x.mean())
    se = math.sqrt(float((residuals ** 2).sum()) / (len(x) - 2) / sxx)
    ci, p = _t_interval(slope, se, len(x) - 2, confidence)
    return {"slope": slope, "ci": ci, "p": p, "n": len(x)}


def trajectory_value_at(run, target: float, key: str, bracket) -> float:
    """run's trajectory figure `key` at KL = target: the rows around where it first got there (bracket), interpolated."""
    by_step = {row["step"]: row for row in run.trajectory}
    points = bracket(run, target)
    values = np.array([[by_step[p["step"]][key]] for p in points], dtype=np.float64)
    if len(points) == 1:
        return float(values[0, 0])
    return float(ps.interpolate_at(target, [p["kl"] for p in points], values)[0])


def tic_dose_response(runs_by_dose: dict, target: float, how: str, bracket, key: str = "em_dash_per_1k_chars",
                      confidence: float = 0.95) -> dict:
    """
    runs_by_dose {dose: [runs]}: each run's tic rate at KL = target (dev prompts, its trajectory)
    minus its step-0 rate (the starting policy on the same prompts and seeds). Pass: amplified at the
    largest dose (interval above 0), not at dose 0, and rising with the dose (slope interval above 0).
    """
    doses = sorted(runs_by_dose)
    per_run, by_dose = {}, {}
    for dose in doses:
        changes = []
        for run in runs_by_dose[dose]:
            start = run.trajectory[0]
            if start["step"] != 0:
                raise ValueError(f"{run.folder}: the trajectory has no step-0 row (the starting policy); rerun the run")
            at = trajectory_value_at(run, target, key, bracket)
            per_run[run.name] = {"dose": dose, "run": str(run.folder), "start": start[key], "at_target": at,
                                 "change": at - start[key]}
            changes.append(at - start[key])
        by_dose[dose] = seed_mean(changes, confidence)
    slope = dose_slope([r["dose"] for r in per_run.values()], [r["change"] for r in per_run.values()], confidence)
    result = {"key": key, "target": target, "how": how, "doses": doses, "by_dose": by_dose, "runs": per_run,
              "slope": slope, "confidence": confidence}
    result["status"], result["passed"] = _tic_status(result)
    return result


def _tic_status(result: dict) -> tuple[str, bool | None]:
    doses, by_dose = result["doses"], result["by_dose"]
    if 0 not in by_dose or len(doses) < 2:
        return f"{INCOMPLETE}: needs dose 0 and at least one dose above it, got {doses}", None
    if any(figures["n"] < 2 for figures in by_dose.values()):
        return f"{INCOMPLETE}: every dose needs 2 or more seeds ({ {d: f['n'] for d, f in by_dose.items()} })", None
    top = by_dose[doses[-1]]
    amplified = {dose: figures["ci"][0] > 0 for dose, figures in by_dose.items()}
    if not amplified[doses[-1]]:
        return (f"{FAILED}: no amplification detected at the largest dose {doses[-1]:g} "
                f"({top['mean']:+.3g} [{top['ci'][0]:+.3g}, {top['ci'][1]:+.3g}])"), False
    if amplified[0]:
        return f"{FAILED}: amplification at dose 0 too: the reward model alone rewards the tic", False
    if not result["slope"]["ci"][0] > 0:
        s = result["slope"]
        return f"{FAILED}: the tic rate does not measurably rise with the dose (slope {s['slope']:+.3g} " \
               f"[{s['ci'][0]:+.3g}, {s['ci'][1]:+.3g}])", False
    return PASSED, True


# -----------------------------------------------------------------------------
# Outcomes: each control writes one, the main report reads them

def write_outcome(cache_dir: Path, kind: str, result: dict, report: Path, tiny: bool, git_commit: str) -> Path:
    """<cache_dir>/control_outcome.json: the control's status, the report it is in, when and where it ran."""
    if kind not in KINDS:
        raise ValueError(f"unknown control {kind!r}; one of {KINDS}")
    path = Path(cache_dir) / OUTCOME_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"kind": kind, "status": result["status"], "passed": result["passed"], "report": str(report), "tiny": tiny,
              "git_commit": git_commit, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write(path, json.dumps(record, indent=2) + "\n")
    return path


def read_outcomes(root: Path) -> dict:
    """{kind: its outcome record, or None when <root>/<kind>/.cache/control_outcome.json does not exist}."""
    outcomes = {}
    for kind in KINDS:
        path = Path(root) / kind / ".cache" / OUTCOME_FILE
        if not path.is_file():
            outcomes[kind] = None
            continue
        try:
            outcomes[kind] = {**json.loads(path.read_text(encoding="utf-8")), "path": str(path)}
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not JSON ({err.msg}); rerun that control's last stage") from None
    return outcomes
