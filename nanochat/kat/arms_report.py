"""
The seed-level half of the diversity report (nanochat/kat/diversity_report.py assembles the whole):
the pre-registration, the collapse alarm, the verdict, the contrasts at matched KL and at the
endpoints with their noise floor, effects by prompt density quintile, frontier plots from the
runs' trajectories and what each sampler drew. It reads the context scripts.eval_diversity builds:
"runs" (nanochat/kat/runs.py), "matched" (the KL plan), "arms" and "alarm" (arm_stats.py).
"""

import math

import numpy as np

from nanochat.kat.arm_stats import (COLLAPSE_FRACTION, PRIMARY_METRIC, QUALITY_METRICS, SECONDARY_METRICS,
                                    at_common_length)
from nanochat.kat.diversity_eval import METRIC_BY_NAME
from nanochat.kat.report_format import better_word, fmt, fmt_ci, fmt_p, fmt_signed, table

ARM_COLOURS = {"density": "tab:blue", "uniform": "tab:orange", "shuffled": "tab:green"}
WHERE_WORDS = {"matched_kl": "at matched KL", "endpoint": "at the endpoints"}
ONE_SEED_WARNING = ("**One seed per arm: this report cannot separate the sampler from seed noise.** Every difference "
                    "below is between two training runs, and two runs of one sampler with different seeds differ too. "
                    "Run at least 2 seeds per arm (3 at full size) for a verdict on the sampler.")
# Kish ESS / train prompts above this: the density weights hardly differ from uniform sampling
NEARLY_UNIFORM_ESS_FRACTION = 0.95


def primary_analysis(context: dict) -> tuple[str, dict]:
    """("matched_kl" or "endpoint", its analysis): the matched-KL comparison when it could run."""
    where = "matched_kl" if context["matched"]["available"] else "endpoint"
    return where, context["arms"][where]


def where_words(context: dict, where: str) -> str:
    if where == "matched_kl":
        return f"matched KL {context['matched']['target']:.4g} nats"
    return "the endpoints"


def _label(metric: str) -> str:
    return METRIC_BY_NAME[metric].label


def _arm_of(context: dict) -> dict:
    return {run["name"]: run["arm"] for run in context["runs"]}


def _result_words(r: dict) -> str:
    return f"{fmt_signed(r['diff'])} {fmt_ci(r['ci'])}, p {fmt_p(r['p'])}"


def preregistration() -> list[str]:
    """What the report decides and how, stated before any figure."""
    primary = METRIC_BY_NAME[PRIMARY_METRIC]
    return [f"**Pre-registered analysis** (constants in nanochat/kat/arm_stats.py, fixed before any run was evaluated): "
            f"primary metric **{primary.label}** (`{PRIMARY_METRIC}`: {primary.definition}; "
            f"{better_word(primary.direction)} is better), compared at a common response length; the contrast is the "
            "density arm minus the uniform arm at a matched KL to the reference along each run's trajectory (endpoints "
            "second), with a hierarchical bootstrap over seeds, then prompts. Secondary metrics, Holm-corrected together: "
            + ", ".join(_label(m) for m in SECONDARY_METRICS)
            + ". Quality: the independent judge's reward, with the policy RM's (which GRPO maximised) beside it."]


def headline(context: dict) -> dict:
    """The report card's first bullets: the pre-registered verdict, seeds, noise floor, alarm and quality."""
    where, analysis = primary_analysis(context)
    r = analysis["primary"]
    seeds = r["seeds"]
    lines = {"primary verdict (pre-registered)": f"{r['verdict']}: {_label(PRIMARY_METRIC)} density - uniform "
                                                 f"{_result_words(r)} at {where_words(context, where)} "
                                                 f"({seeds[0]} density, {seeds[1]} uniform runs)"}
    if analysis["one_seed"]:
        lines["seeds"] = "one seed per arm: cannot separate the sampler from seed noise"
    floor = analysis["largest_noise_floor"]
    lines["noise floor (uniform vs uniform)"] = (f"largest |diff| {fmt(floor)}" if math.isfinite(floor)
                                                 else "not measured (needs 2 uniform runs)")
    fired = context["alarm"]["fired"]
    lines["collapse alarm"] = (f"FIRED for {', '.join(fired)}" if fired else
                               f"none (every run's across-prompt distance >= {COLLAPSE_FRACTION:.0%} of SFT's)")
    judge = analysis["quality"].get("judge_reward")
    lines["quality (judge)"] = f"density - uniform {_result_words(judge)} ({judge['verdict']})" if judge else "no judge"
    return lines


# -----------------------------------------------------------------------------
# Sections

def collapse_section(context: dict) -> list[str]:
    alarm, arm_of = context["alarm"], _arm_of(context)
    wheres = [w for w in ("matched_kl", "endpoint") if w in context["arms"]]
    sft = alarm["sft"]["across_prompt_distance"]
    if alarm["fired"]:
        lines = [f"**COLLAPSE ALARM: {', '.join(alarm['fired'])}: across-prompt embedding distance more than "
                 f"{1 - COLLAPSE_FRACTION:.0%} below SFT's ({fmt(sft)}); responses to different prompts have converged "
                 "on a template. Read every diversity figure below with that in mind.**"]
    else:
        lines = [f"No alarm: every run's across-prompt embedding distance is at least {COLLAPSE_FRACTION:.0%} of SFT's "
                 f"({fmt(sft)})."]
    header = ["run", "arm"] + [cell for w in wheres for cell in (f"across-prompt distance {WHERE_WORDS[w]}", "/ SFT")]
    header += ["distinct-2 / SFT (endpoint, raw)", "alarm"]
    rows = []
    for name, row in alarm["runs"].items():
        cells = [name, arm_of[name]]
        for w in wheres:
            cells += [fmt(row[w]["value"]), f"{row[w]['ratio']:.0%}" if math.isfinite(row[w]["ratio"]) else "n/a"]
        end = row["endpoint"]["distinct_2_ratio"]
        cells += [f"{end:.0%}" if math.isfinite(end) else "n/a", "**ALARM**" if row["fires"] else "no"]
        rows.append(cells)
    return lines + ["", "Mean 1 - cos between samples of different prompts (SFT's embedder), on the final prompts; the "
                        f"alarm fires below {COLLAPSE_FRACTION:.0%} of SFT's at either point.", "", table(header, rows)]


def verdict_section(context: dict) -> list[str]:
    where, analysis = primary_analysis(context)
    r = analysis["primary"]
    lines = []
    if not context["matched"]["available"]:
        lines += [f"**The matched-KL comparison could not run ({context['matched']['reason']}): the verdict below is at "
                  "the endpoints, which the pre-registration puts second.**", ""]
    if analysis["one_seed"]:
        lines += [ONE_SEED_WARNING, ""]
    lines += [f"**Primary (pre-registered): {r['verdict']}.** {_label(PRIMARY_METRIC)} at a common length at "
              f"{where_words(context, where)}, density minus uniform over {r['seeds'][0]} density and {r['seeds'][1]} "
              f"uniform runs ({r['method']}): {_result_words(r)}; {r['n']} prompts."]
    floor = analysis["largest_noise_floor"]
    if math.isfinite(floor):
        pairs = len(analysis["noise_floor"])
        lines.append(f"- Noise floor: two uniform runs that differ only in their seed differ by up to {fmt(floor)} "
                     f"(|uniform_i - uniform_j|, {pairs} pair{'s' if pairs > 1 else ''}), against |{fmt(r['diff'])}| "
                     "between the arms.")
    else:
        lines.append("- Noise floor: not measured (it needs 2 uniform runs).")
    if where == "matched_kl":
        end = context["arms"]["endpoint"]["primary"]
        lines.append(f"- At the endpoints (second): {end['verdict']}, {_result_words(end)}.")
    secondary = [s for s in analysis["secondary"].values() if "verdict_holm" in s]
    if secondary:
        counts = {word: sum(s["verdict_holm"] == word for s in secondary) for word in ("supported", "contradicted")}
        lines.append(f"- Secondary metrics (Holm over {len(secondary)}): {counts['supported']} supported, "
                     f"{counts['contradicted']} contradicted, {len(secondary) - sum(counts.values())} inconclusive.")
    for metric in QUALITY_METRICS:
        q = analysis["quality"].get(metric)
        if q is not None:
            lines.append(f"- {_label(metric)}: density - uniform {_result_words(q)} ({q['verdict']}).")
    if "judge_reward" not in analysis["quality"]:
        lines.append("- Quality by an independent judge: not measured (no judge).")
    for name, c in analysis["other_contrasts"].items():
        lines.append(f"- {name} ({_label(PRIMARY_METRIC)}): {_result_words(c)} ({c['verdict']}).")
    density = (context.get("density_stats") or {}).get("data")
    if density is not None and density["kish_ess_fraction"] > NEARLY_UNIFORM_ESS_FRACTION:
        lines += ["", f"**The density weights were nearly uniform: Kish effective sample size {fmt(density['kish_ess'], 4)} "
                      f"of {density['n_train']} train prompts ({density['kish_ess_fraction']:.1%} of n). The two arms sampled "
                      "almost the same prompts, so they barely differ, and a null result says little about density "
                      "sampling.**"]
    return lines + [""] + [f"**{note}**" for note in context.get("notes", [])]


def runs_table(context: dict) -> str:
    rows = []
    for run in context["runs"]:
        trajectory = run["trajectory"]
        rows.append([run["name"], run["arm"], str(run["seed_index"]), fmt(run["seed"]), run["checkpoint"],
                     f"{len(trajectory)} (steps {trajectory[0]['step']}..{trajectory[-1]['step']})" if trajectory
                     else f"none ({run['trajectory_missing']})",
                     fmt(trajectory[-1]["kl"]) if trajectory else "n/a",
                     "yes" if run["draws"] else f"none ({run['draws_missing']})"])
    return table(["run", "arm", "seed index", "--seed", "final checkpoint", "trajectory points", "final KL (dev)",
                  "draws.json"], rows)


def _bracket_rows(context: dict) -> list[list[str]]:
    arm_of, rows = _arm_of(context), []
    for name, points in context["matched"]["points"].items():
        if len(points) == 1:
            rows.append([name, arm_of[name], f"step {points[0]['step']}", fmt(points[0]["kl"]), "(the same: at the target)",
                         "", "1"])
            continue
        before, after = points
        weight = (context["matched"]["target"] - before["kl"]) / (after["kl"] - before["kl"])
        rows.append([name, arm_of[name], f"step {before['step']}", fmt(before["kl"]), f"step {after['step']}",
                     fmt(after["kl"]), fmt(weight, 3)])
    return rows


def primary_lines(analysis: dict, context: dict) -> list[str]:
    """Each run's primary figure, and the contrasts: the arms (primary), seed by seed, the noise floor."""
    label, arm_of = _label(PRIMARY_METRIC), _arm_of(context)
    means = analysis["means"]
    has_judge = any("judge_reward" in m for m in means.values())
    run_rows = [[name, arm_of[name], fmt(m.get(PRIMARY_METRIC)), fmt(m.get("judge_reward")) if has_judge else "no judge",
                 fmt(m.get("mean_words"), 3)] for name, m in means.items()]
    r = analysis["primary"]
    rows = [["**density - uniform (primary)**", f"{r['seeds'][0]} x {r['seeds'][1]} runs, {r['method']}",
             fmt_signed(r["diff"]), fmt_ci(r["ci"]), fmt_p(r["p"]), str(r["n"]), f"**{r['verdict']}**"]]
    for name, c in analysis["other_contrasts"].items():
        rows.append([name, f"{c['seeds'][0]} x {c['seeds'][1]} runs, {c['method']}", fmt_signed(c["diff"]),
                     fmt_ci(c["ci"]), fmt_p(c["p"]), str(c["n"]), c["verdict"]])
    for kind, contrasts in (("one run each, paired over prompts", analysis["per_seed"]),
                            ("noise floor: same sampler, other seed", analysis["noise_floor"])):
        rows += [[f"{c['a']} - {c['b']}", kind, fmt_signed(c["diff"]), fmt_ci(c["ci"]), fmt_p(c["p"]), str(c["n"]),
                  f"{c['verdict']} (as a one-seed design would read it)"] for c in contrasts]
    return [f"{label} (common length), judge reward and words per response of each run, mean over prompts:", "",
            table(["run", "arm", label, "judge reward", "words per response"], run_rows), "",
            f"Contrasts of {label} ({better_word(METRIC_BY_NAME[PRIMARY_METRIC].direction)} is better). The noise-floor "
            "rows are what a paired test over prompts says of two runs that differ only in their seed: where it calls "
            "them different, a design with one run per arm would have read seed noise as a sampler effect.", "",
            table(["contrast", "what", "diff", "95% CI", "p", "prompts", "verdict"], rows)]


def secondary_lines(analysis: dict) -> list[str]:
    rows = []
    for metric, r in analysis["secondary"].items():
        rows.append([_label(metric), better_word(r["direction"]), "common length" if at_common_length(metric) else "raw",
                     fmt(r["mean_b"]), fmt(r["mean_a"]), fmt_signed(r["diff"]), fmt_ci(r["ci"]), fmt_p(r["p"]),
                     fmt_p(r.get("p_holm")), r.get("verdict_holm", r["verdict"])])
    return [f"Secondary metrics, density minus uniform, Holm-corrected over the {len(rows)} of them:", "",
            table(["metric", "better", "compared", "uniform", "density", "diff", "95% CI", "p", "Holm p",
                   "verdict (Holm)"], rows)]


def quality_lines(analysis: dict) -> list[str]:
    if not analysis["quality"]:
        return ["Quality: not measured (no judge and no policy RM)."]
    rows = [[_label(m), fmt(r["mean_b"]), fmt(r["mean_a"]), fmt_signed(r["diff"]), fmt_ci(r["ci"]), fmt_p(r["p"]),
             r["verdict"]] for m, r in analysis["quality"].items()]
    lines = ["Quality, density minus uniform (raw, not length-controlled; reward models tend to favour longer answers). "
             "The judge never saw a pair the policy RM was fitted to; the policy RM's reward is what GRPO maximised, so "
             "it rises as the policy exploits it and is shown for contrast, not as a measure of quality:", "",
             table(["reward", "uniform", "density", "diff", "95% CI", "p", "verdict"], rows)]
    if "judge_reward" not in analysis["quality"]:
        lines += ["", "**No judge: quality is only the policy RM's.**"]
    return lines


def matched_primary_section(context: dict) -> list[str]:
    matched = context["matched"]
    if not matched["available"]:
        return [f"Not available: {matched['reason']}. GRPO writes trajectory.jsonl and traj/ checkpoints (--traj_every); "
                "the endpoints below are the only comparison of this report."]
    return [f"KL target: **{matched['target']:.4g} nats** ({matched['how']}): the mean sequence KL to the reference over "
            "the dev prompts' completions, as each run's trajectory.jsonl records it. Each run is evaluated at the two "
            "trajectory checkpoints around the target (where it first got there), on the final prompts, and every "
            "prompt's figures are interpolated linearly in KL between them:", "",
            table(["run", "arm", "checkpoint before", "KL", "checkpoint after", "KL", "weight of after"],
                  _bracket_rows(context)), "", *primary_lines(context["arms"]["matched_kl"], context)]


def matched_secondary_section(context: dict) -> list[str]:
    if not context["matched"]["available"]:
        return [f"Not available: {context['matched']['reason']}."]
    analysis = context["arms"]["matched_kl"]
    return [*secondary_lines(analysis), "", *quality_lines(analysis)]


def endpoint_section(context: dict) -> list[str]:
    analysis = context["arms"]["endpoint"]
    second = ("The pre-registration puts this second: a run that drifted further from the reference is compared with one "
              "that drifted less." if context["matched"]["available"] else
              "**Without a matched-KL comparison this is the report's verdict**, with the caveat that runs which drifted "
              "different distances from the reference are compared.")
    return [f"Each run's final checkpoint. {second}", "", *primary_lines(analysis, context), "",
            *secondary_lines(analysis), "", *quality_lines(analysis)]


def quintile_section(context: dict) -> list[str]:
    where, analysis = primary_analysis(context)
    if analysis["by_quintile"] is None:
        return ["Not available: the final prompts have no density quintile (no prompt_weights.jsonl; run "
                "scripts.kat_embed and scripts.kat_density)."]
    rows = [[f"Q{q}" + {"1": " (rarest)", "5": " (densest)"}.get(q, ""), str(r["n"]), fmt(r["mean_b"]), fmt(r["mean_a"]),
             fmt_signed(r["diff"]), fmt_ci(r["ci"]), fmt_p(r["p"]), r["verdict"]] for q, r in analysis["by_quintile"].items()]
    return [f"{_label(PRIMARY_METRIC)} {WHERE_WORDS[where]}, density minus uniform, within each density quintile of the "
            "final prompts (quintiles among the evaluated prompts). Exploratory: five uncorrected tests on fifths of the "
            "prompts; density sampling, if it helps, should help most where it draws more, in the rare quintiles.", "",
            table(["quintile", "prompts", "uniform", "density", "diff", "95% CI", "p", "verdict (uncorrected)"], rows)]


def frontier_section(context: dict, plots: dict) -> list[str]:
    runs = [run for run in context["runs"] if run["trajectory"]]
    if not runs:
        return ["Not available: no run has a trajectory.jsonl."]
    rows = []
    for run in runs:
        first, last = run["trajectory"][0], run["trajectory"][-1]
        rows.append([run["name"], run["arm"], str(len(run["trajectory"])), fmt(last["kl"]), fmt(last["policy_reward"]),
                     fmt(last["judge_reward"]), f"{fmt(first['distinct_2'])} -> {fmt(last['distinct_2'])}",
                     f"{fmt(first['across_prompt_distance'])} -> {fmt(last['across_prompt_distance'])}"])
    lines = ["From each run's trajectory.jsonl: the dev prompts (disjoint from the final prompts above), every --traj_every "
             "steps. A sampler that resists collapse keeps more diversity at the same KL, or at the same judge reward. "
             "The over-optimisation curve plots the judge's reward against the policy RM's: where the policy RM keeps "
             "rising and the judge's does not, the policy is exploiting its reward model.", "",
             table(["run", "arm", "points", "final KL", "final policy reward", "final judge reward", "distinct-2",
                    "across-prompt distance"], rows), ""]
    for name, caption in (("frontiers", "Diversity against KL and against the judge's reward"),
                          ("overoptimisation", "Over-optimisation: judge reward against policy reward")):
        lines += [f"![{caption}]({plots[name]})" if name in plots else f"({caption}: nothing to plot)", ""]
    return lines


def draws_section(context: dict) -> list[str]:
    runs = [run for run in context["runs"] if run["draws"]]
    missing = [f"{run['name']} ({run['draws_missing']})" for run in context["runs"] if not run["draws"]]
    if not runs:
        return [f"Not available: {', '.join(missing)}."]
    rows = []
    for run in runs:
        d = run["draws"]
        quintiles = d["density_quintiles"]
        total = max(sum(quintiles.values()), 1)
        rows.append([run["name"], run["arm"], fmt(d["draws"]), fmt(d["unique_prompts"]), fmt(d["kish_ess"]),
                     *[f"{quintiles[q] / total:.0%}" for q in "12345"]])
    sources = sorted({src for run in runs for src in run["draws"]["source_mix"]})
    arms = [arm for arm in ARM_COLOURS if any(run["arm"] == arm for run in runs)]
    pooled = {arm: {src: sum(run["draws"]["source_mix"].get(src, 0) for run in runs if run["arm"] == arm)
                    for src in sources} for arm in arms}
    source_rows = [[src, *[f"{pooled[arm][src] / max(sum(pooled[arm].values()), 1):.1%}" for arm in arms]]
                   for src in sources]
    lines = ["What each run's sampler drew over its whole run (draws.json): how many draws, distinct prompts, the "
             "weights' Kish effective sample size, and the share of draws per density quintile of the train prompts "
             "(Q1 = rarest). At full size each prompt is drawn well under once on average, so an arm mostly changes "
             "*which* prompts are trained on.", "",
             table(["run", "arm", "draws", "unique prompts", "Kish ESS", "Q1", "Q2", "Q3", "Q4", "Q5"], rows), "",
             "Source mix of the draws, pooled over each arm's runs:", "",
             table(["source", *arms], source_rows)]
    if missing:
        lines += ["", f"No draws.json: {', '.join(missing)}."]
    return lines


# -----------------------------------------------------------------------------
# Plots

def make_frontier_plots(context: dict, out_dir, stem: str, plt) -> dict[str, str]:
    """Diversity against KL and against the judge's reward, and the over-optimisation curve: one line per run."""
    runs = [run for run in context["runs"] if run["trajectory"]]
    if not runs:
        return {}
    files = {}
    styles = ["-", "--", ":", "-."]

    def series(run, x_key, y_key):
        points = [(p[x_key], p[y_key]) for p in run["trajectory"] if p[x_key] is not None and p[y_key] is not None
                  and math.isfinite(p[x_key]) and math.isfinite(p[y_key])]
        return np.array(points).T if points else None

    def draw(ax, x_key, y_key):
        for run in runs:
            xy = series(run, x_key, y_key)
            if xy is not None:
                ax.plot(*xy, marker=".", color=ARM_COLOURS[run["arm"]], linestyle=styles[run["seed_index"] % len(styles)],
                        label=run["name"])
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {x_key} in the trajectories", ha="center", transform=ax.transAxes)

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (x_key, y_key) in zip(axes.flat, [("kl", "distinct_2"), ("kl", "across_prompt_distance"),
                                               ("judge_reward", "distinct_2"), ("judge_reward", "across_prompt_distance")]):
        draw(ax, x_key, y_key)
        if x_key == "kl" and context["matched"]["available"]:
            ax.axvline(context["matched"]["target"], color="gray", linewidth=0.8, label="matched KL")
        ax.set(xlabel={"kl": "sequence KL to the reference (nats, dev prompts)", "judge_reward": "judge reward"}[x_key],
               ylabel=y_key.replace("_", " "))
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Diversity frontiers (dev prompts; colour: arm, line style: seed)")
    fig.tight_layout()
    files["frontiers"] = f"{stem}_frontiers.png"
    fig.savefig(out_dir / files["frontiers"], dpi=100)
    plt.close(fig)

    if any(series(run, "policy_reward", "judge_reward") is not None for run in runs):
        fig, ax = plt.subplots(figsize=(7, 5))
        draw(ax, "policy_reward", "judge_reward")
        ax.set(xlabel="policy RM reward (what GRPO maximised)", ylabel="judge reward (independent)",
               title="Over-optimisation (dev prompts, one line per run)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        files["overoptimisation"] = f"{stem}_overoptimisation.png"
        fig.savefig(out_dir / files["overoptimisation"], dpi=100)
        plt.close(fig)
    return files
