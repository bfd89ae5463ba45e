"""
The arms compared with several GRPO runs (seeds) each: every run, or the two trajectory checkpoints
around a matched KL, was evaluated on the same final prompts, and its per-prompt figures come in
as tables (nanochat/kat/diversity_eval.model_tables). Used by scripts.eval_diversity:

    analysis = analyse_arms(runs, points, target, tables, cut_tables, quintiles, settings)

One pre-registered primary metric decides the verdict: PRIMARY_METRIC, density minus uniform,
hierarchical bootstrap over seeds then prompts (nanochat/kat/stats.py). SECONDARY_METRICS are
Holm-corrected together; quality (the judge's reward, the policy RM's beside it) is reported, not
counted as diversity. Contrasts of single runs (density_i - uniform_i, and uniform_i - uniform_j,
the noise floor) show what a one-seed-per-arm design would have concluded. Figures of the text are
compared at a common length (every GRPO model of the analysis cut to the shortest sample).
"""

import itertools
import math

import numpy as np

from nanochat.kat import stats as ps
from nanochat.kat.diversity_eval import METRIC_BY_NAME

PRIMARY_METRIC = "distinct_2"  # pre-registered: fixed in the code before any run was evaluated
SECONDARY_METRICS = ("self_bleu", "within_prompt_distance", "across_prompt_distance", "ead", "mattr",
                     "em_dash_per_1k_chars", "not_x_but_y_per_1k_chars")
QUALITY_METRICS = ("judge_reward", "reward")  # the independent judge first; the policy RM, which GRPO optimised, beside it
DESCRIPTIVE_METRICS = ("mean_words", "truncated_rate")
COLLAPSE_METRIC, COLLAPSE_FRACTION = "across_prompt_distance", 0.8  # the alarm: below 80% of SFT's
ONE_SEED = "undecidable (one seed per arm)"


def at_common_length(metric: str) -> bool:
    """Figures of the text are compared on responses cut to a common length; embedding distances and rewards raw."""
    return METRIC_BY_NAME[metric].length_control == "prefix"


def run_values(points: list[dict], target: float | None, tables: dict, cut_tables: dict, metrics) -> dict:
    """{metric: [P]} of one run: its one evaluated point, or the two around KL = target interpolated prompt by prompt."""
    values = {}
    for metric in metrics:
        source = cut_tables if at_common_length(metric) else tables
        if any(metric not in source[point["label"]] for point in points):
            continue
        stacked = np.array([source[point["label"]][metric] for point in points], dtype=np.float64)
        values[metric] = stacked[0] if target is None else ps.interpolate_at(target, [p["kl"] for p in points], stacked)
    return values


def _finite_columns(*matrices) -> np.ndarray:
    return np.logical_and.reduce([np.isfinite(m).all(axis=0) for m in matrices])


def arm_contrast(a, b, direction: str, settings: dict) -> dict:
    """
    Arm a minus arm b on per-prompt values a (S_a, P), b (S_b, P); prompts undefined in any run are
    left out. With at least 2 runs per arm: the hierarchical bootstrap and a verdict. With one: the
    paired test over prompts of the runs' means, and no verdict on the sampler (ONE_SEED).
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    keep = _finite_columns(a, b)
    a, b = a[:, keep], b[:, keep]
    result = {"seeds": [len(a), len(b)], "n": int(keep.sum()), "n_dropped": int((~keep).sum()), "direction": direction,
              "mean_a": float(a.mean()) if keep.any() else math.nan, "mean_b": float(b.mean()) if keep.any() else math.nan}
    kwargs = {k: settings[k] for k in ("n_resamples", "confidence", "seed")}
    if min(len(a), len(b)) >= 2 and keep.sum() >= 2:
        h = ps.hierarchical_bootstrap(a, b, **kwargs)
        result.update(diff=h["diff"], ci=h["ci"], p=h["p"], se=h["se"], df=h["df"], method="seeds then prompts")
        result["verdict"] = ps.verdict(h["diff"], h["ci"], h["p"], direction, settings["alpha"])
        return result
    paired = ps.paired_comparison(a.mean(axis=0), b.mean(axis=0), direction, alpha=settings["alpha"], **kwargs)
    result.update(diff=paired["diff"], ci=paired["ci"], p=paired["p"], method="prompts only")
    result["verdict"] = ONE_SEED if min(len(a), len(b)) < 2 else ps.INCONCLUSIVE
    return result


def run_contrast(x, y, direction: str, settings: dict) -> dict:
    """One run minus another, paired over prompts: what a design with one run per arm would conclude."""
    r = ps.paired_comparison(x, y, direction, n_resamples=settings["n_resamples"], confidence=settings["confidence"],
                             alpha=settings["alpha"], seed=settings["seed"])
    return {key: r[key] for key in ("n", "n_dropped", "mean_a", "mean_b", "diff", "ci", "p", "verdict", "direction")}


def analyse_arms(runs: list, points: dict, target: float | None, tables: dict, cut_tables: dict,
                 quintiles: list[int] | None, settings: dict) -> dict:
    """
    runs: objects with name, arm, seed_index; points[run name]: [{"label", "kl"}], one point (an
    endpoint, or a trajectory point at the target) or the two around target. tables / cut_tables:
    {label: {metric: [P]}} raw / at common length. quintiles: each prompt's density quintile (1 =
    rarest) or None. settings: n_resamples, confidence, alpha, seed.
    """
    metrics = (PRIMARY_METRIC, *SECONDARY_METRICS, *QUALITY_METRICS, *DESCRIPTIVE_METRICS)
    values = {run.name: run_values(points[run.name], target, tables, cut_tables, metrics) for run in runs}
    by_arm = {arm: sorted((r for r in runs if r.arm == arm), key=lambda r: r.seed_index)
              for arm in ("density", "uniform", "shuffled")}

    def matrix(arm, metric, columns=slice(None)):
        return np.stack([values[r.name][metric] for r in by_arm[arm]])[:, columns]

    def direction(metric):
        return METRIC_BY_NAME[metric].direction

    primary = arm_contrast(matrix("density", PRIMARY_METRIC), matrix("uniform", PRIMARY_METRIC),
                           direction(PRIMARY_METRIC), settings)
    uniform_of = {r.seed_index: r for r in by_arm["uniform"]}
    per_seed = [{"a": r.name, "b": uniform_of[r.seed_index].name,
                 **run_contrast(values[r.name][PRIMARY_METRIC], values[uniform_of[r.seed_index].name][PRIMARY_METRIC],
                                direction(PRIMARY_METRIC), settings)}
                for r in by_arm["density"] if r.seed_index in uniform_of]
    noise_floor = [{"a": x.name, "b": y.name, **run_contrast(values[x.name][PRIMARY_METRIC], values[y.name][PRIMARY_METRIC],
                                                             direction(PRIMARY_METRIC), settings)}
                   for x, y in itertools.combinations(by_arm["uniform"], 2)]
    other = {}
    if by_arm["shuffled"]:  # the sampler's control: the same weights with the density information shuffled away
        for a, b in (("density", "shuffled"), ("shuffled", "uniform")):
            other[f"{a} - {b}"] = arm_contrast(matrix(a, PRIMARY_METRIC), matrix(b, PRIMARY_METRIC),
                                               direction(PRIMARY_METRIC), settings)

    secondary = {m: arm_contrast(matrix("density", m), matrix("uniform", m), direction(m), settings)
                 for m in SECONDARY_METRICS if all(m in values[r.name] for r in runs)}
    decidable = [m for m, r in secondary.items() if r["verdict"] != ONE_SEED]
    for metric, p_holm in zip(decidable, ps.holm_adjust([secondary[m]["p"] for m in decidable])):
        r = secondary[metric]
        r["p_holm"] = p_holm
        r["verdict_holm"] = ps.verdict(r["diff"], r["ci"], p_holm, r["direction"], settings["alpha"])
    quality = {m: arm_contrast(matrix("density", m), matrix("uniform", m), direction(m), settings)
               for m in QUALITY_METRICS if all(m in values[r.name] for r in runs)}

    by_quintile = None
    if quintiles is not None and all(q > 0 for q in quintiles):
        quintiles = np.asarray(quintiles)
        by_quintile = {}
        for q in range(1, 6):
            columns = np.flatnonzero(quintiles == q)
            if len(columns) >= 2:
                by_quintile[str(q)] = arm_contrast(matrix("density", PRIMARY_METRIC, columns),
                                                   matrix("uniform", PRIMARY_METRIC, columns),
                                                   direction(PRIMARY_METRIC), settings)
    largest_floor = max((abs(r["diff"]) for r in noise_floor if math.isfinite(r["diff"])), default=math.nan)
    # the collapse alarm compares with SFT, which is not among the models cut to a common length: raw figures
    raw = {run.name: run_values(points[run.name], target, tables, tables, (COLLAPSE_METRIC, PRIMARY_METRIC)) for run in runs}
    return {"target": target, "points": points, "values": values,
            "means": {name: {m: _finite_mean(v) for m, v in run.items()} for name, run in values.items()},
            "raw_means": {name: {m: _finite_mean(v) for m, v in run.items()} for name, run in raw.items()},
            "seeds": {arm: [r.name for r in rs] for arm, rs in by_arm.items()},
            "one_seed": min(len(by_arm["density"]), len(by_arm["uniform"])) < 2,
            "primary_metric": PRIMARY_METRIC, "primary": primary, "per_seed": per_seed, "noise_floor": noise_floor,
            "largest_noise_floor": largest_floor, "other_contrasts": other, "secondary": secondary, "quality": quality,
            "by_quintile": by_quintile}


def _finite_mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else math.nan


def collapse_alarm(sft_table: dict, analyses: dict[str, dict]) -> dict:
    """
    Each run's across-prompt embedding distance (and distinct-2, for context) over SFT's, at each
    analysis point (matched KL, endpoint); the alarm fires for a run below COLLAPSE_FRACTION of SFT's
    at any of them.
    """
    sft = {m: _finite_mean(sft_table[m]) for m in (COLLAPSE_METRIC, PRIMARY_METRIC)}
    rows = {}
    for where, analysis in analyses.items():
        for name, means in analysis["raw_means"].items():
            row = rows.setdefault(name, {"fires": False})
            ratio = means[COLLAPSE_METRIC] / sft[COLLAPSE_METRIC] if sft[COLLAPSE_METRIC] > 0 else math.nan
            row[where] = {"value": means[COLLAPSE_METRIC], "ratio": ratio,
                          "distinct_2_ratio": means[PRIMARY_METRIC] / sft[PRIMARY_METRIC] if sft[PRIMARY_METRIC] > 0
                          else math.nan}
            row["fires"] = row["fires"] or ratio < COLLAPSE_FRACTION
    return {"sft": sft, "fraction": COLLAPSE_FRACTION, "runs": rows, "fired": sorted(n for n, r in rows.items() if r["fires"])}
