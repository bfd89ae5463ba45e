"""
The diversity report: markdown, PNG plots and a JSON of every figure. It opens with the controls
(nanochat/kat/controls_report.py). Its first half, the arms over
seeds (nanochat/kat/arms_report.py), comes from the context scripts.eval_diversity builds; its
second half, the seed-0 final models in detail, from what nanochat/kat/diversity_eval.evaluate
returns, plus models, prompts, sampling, reward-model, density and training-curve figures.
"""

import json
import math
from pathlib import Path

import numpy as np

from nanochat.common import atomic_write

from nanochat.kat import arms_report
from nanochat.kat import stats as ps
from nanochat.kat.arm_stats import PRIMARY_METRIC
from nanochat.kat.controls_report import controls_section
from nanochat.kat.diversity import TIC_PATTERNS
from nanochat.kat.diversity_eval import HYPOTHESIS, METRIC_BY_NAME, METRICS, REFERENCE, model_means, verdict_basis
from nanochat.kat.report_format import (better_word, cell_text, fmt, fmt_ci, fmt_p, fmt_signed,  # noqa: F401 (re-exported)
                                        jsonable, table)
from nanochat.kat.reward_model import rm_eval_table
from nanochat.kat.style_injection import PLANTED_METRICS

headline = arms_report.headline  # the report card's first bullets
ARM_SECTIONS = ["Controls", "Collapse alarm", "Verdict", "Setup", "Matched KL: primary contrast and noise floor",
                "Matched KL: secondary metrics and quality", "Endpoints", "Effects by prompt density quintile",
                "Frontiers and over-optimisation", "What the samplers drew"]
DETAIL_SECTIONS = ["Summary: density vs baseline", "Length-controlled differences", "Each model vs SFT",
                   "Quality (RM reward)", "Plots", "Example responses", "RM held-out accuracy by density quintile",
                   "Density statistics", "GRPO training curves", "Metric definitions", "Statistical methods"]
SECTIONS = ARM_SECTIONS + DETAIL_SECTIONS
BOXPLOT_METRICS = ["em_dash_per_1k_chars", "not_x_but_y_per_1k_chars", "distinct_1", "distinct_2", "distinct_3", "ead",
                   "unigram_gini", "ttr", "mattr", "self_bleu", "compression_ratio", "within_prompt_distance",
                   "judge_reward", "reward"]
VS_REFERENCE_WORDS = {ps.SUPPORTED: "better", ps.CONTRADICTED: "worse", ps.INCONCLUSIVE: "no clear difference"}
POSITIVE_CONTROL = "Positive control"  # kat_inject's planted pairs: a section of its own after the collapse alarm


def section_titles(context: dict) -> list[str]:
    """The report's sections: SECTIONS, plus the positive control after the collapse alarm when a tic was planted."""
    if not context.get("positive_control"):
        return list(SECTIONS)
    return SECTIONS[:2] + [POSITIVE_CONTROL] + SECTIONS[2:]


# -----------------------------------------------------------------------------
# Plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def make_plots(results: dict, context: dict, out_dir: Path, stem: str) -> dict[str, str]:
    """Write the PNGs beside the report; returns {plot name: file name}."""
    plt = _pyplot()
    labels = results["labels"]
    curves = context["training_curves"]
    files = arms_report.make_frontier_plots(context, out_dir, stem, plt)

    names = [n for n in BOXPLOT_METRICS if n in results["per_prompt"][labels[0]]]
    columns = 4
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        data = [[v for v in results["per_prompt"][label][name] if math.isfinite(v)] for label in labels]
        ax.boxplot(data, tick_labels=labels, showmeans=True)
        metric = METRIC_BY_NAME[name]
        ax.set_title(f"{metric.label} ({better_word(metric.direction)} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Per-prompt values (box: quartiles, line: median, triangle: mean)")
    fig.tight_layout()
    files["metrics"] = f"{stem}_metrics.png"
    fig.savefig(out_dir / files["metrics"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    longest = max(max(results["response_words"][label], default=0) for label in labels)
    bins = np.linspace(0, max(longest, 1) + 1, 41)
    for label in labels:
        ax.hist(results["response_words"][label], bins=bins, histtype="step", linewidth=1.5, label=label)
    ax.set(xlabel="words per response", ylabel="responses", title="Response lengths")
    ax.legend()
    fig.tight_layout()
    files["lengths"] = f"{stem}_lengths.png"
    fig.savefig(out_dir / files["lengths"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for offset, name, color in ((-width / 2, "em_dash_per_1k_chars", "tab:red"), (width / 2, "en_dash_per_1k_chars", "tab:gray")):
        means, errors = [], [[], []]
        for label in labels:
            values = np.array([v for v in results["per_prompt"][label][name] if math.isfinite(v)])
            mean = values.mean() if len(values) else float("nan")
            low, high = ps.bootstrap_ci(values, 2000, results["settings"]["confidence"], seed=results["settings"]["seed"])
            means.append(mean)
            errors[0].append(max(mean - low, 0) if math.isfinite(low) else 0)
            errors[1].append(max(high - mean, 0) if math.isfinite(high) else 0)
        ax.bar(np.arange(len(labels)) + offset, means, width, yerr=errors, capsize=4, color=color,
               label=METRIC_BY_NAME[name].label)
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set(ylabel="per 1,000 characters", title="Em (U+2014) and en (U+2013) dashes: mean over prompts, 95% CI")
    ax.legend()
    fig.tight_layout()
    files["em_dash"] = f"{stem}_em_dash.png"
    fig.savefig(out_dir / files["em_dash"], dpi=100)
    plt.close(fig)

    found = {(arm, key): series for arm, info in curves.items() for key, series in info["series"].items() if series}
    if found:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key, title in ((axes[0], "reward", "mean reward"), (axes[1], "kl", "KL to the reference")):
            for arm in curves:
                series = curves[arm]["series"].get(key)
                if series:
                    ax.plot(series["steps"], series["values"], label=f"{arm} ({series['tag']})")
            ax.set(xlabel="step", title=f"GRPO {title}")
            if ax.lines:
                ax.legend()
        fig.tight_layout()
        files["training_curves"] = f"{stem}_training_curves.png"
        fig.savefig(out_dir / files["training_curves"], dpi=100)
        plt.close(fig)
    return files


# -----------------------------------------------------------------------------
# Markdown

def _detail_verdict_lines(results: dict) -> list[str]:
    """The seed-0 detail's own reading: the core metrics (*), each at equal length, Holm-corrected together."""
    summary = results["hypothesis"]
    counts = summary["counts"]
    n = len(summary["primary"])
    names = ", ".join(METRIC_BY_NAME[m].label for m in summary["primary"])
    words = {label: model_means(results, label)["mean_words"] for label in HYPOTHESIS}
    return [f"The final models of seed index 0 only ({results['num_prompts']} final prompts, paired): one run per arm, "
            "so these rows cannot separate the sampler from seed noise; the verdict on the sampler is the one above. "
            "They are kept for their detail: every metric, length control two ways, each model against SFT.", "",
            f"**Overall: {summary['overall']}.** Hypothesis: density-aware prompt sampling in GRPO reduces mode collapse "
            f"compared with uniform sampling (density arm minus baseline arm, paired over {results['num_prompts']} "
            "held-out prompts).", "",
            "**Primary verdicts are length-controlled**: each rests on the density - baseline difference expected at equal "
            "response length (see Length-controlled differences), not on the raw difference, because most diversity "
            "figures move with response length alone and GRPO changes it (here density writes "
            f"{fmt(words['density'], 3)} words per response, baseline {fmt(words['baseline'], 3)}). Raw differences are "
            "still shown in the table below; they decide no verdict. Here 'primary' means the core family (*) of this "
            f"detail; the report's one pre-registered primary metric is {METRIC_BY_NAME[PRIMARY_METRIC].label}, above.", "",
            f"Of {n} core metrics ({names}), at equal length and after Holm correction for {n} comparisons: "
            f"{counts[ps.SUPPORTED]} supported, {counts[ps.CONTRADICTED]} contradicted, {counts[ps.INCONCLUSIVE]} inconclusive.",
            *[f"- {word}: " + ", ".join(METRIC_BY_NAME[m].label for m in summary["primary"]
                                        if summary["holm"][m]["verdict_holm"] == word)
              for word in (ps.SUPPORTED, ps.CONTRADICTED) if counts[word]],
            "", f"Quality: {summary['quality']}.", ""]


def _setup_section(results: dict, context: dict) -> list[str]:
    primary = METRIC_BY_NAME[PRIMARY_METRIC]
    rows = [[label, info["checkpoint"], str(info.get("step", "n/a")), info.get("git_commit", "n/a")]
            for label, info in context["evaluated"].items()]
    sampling = context["sampling"]
    lines = [f"- pre-registered primary metric: **{primary.label}** (`{PRIMARY_METRIC}`, {primary.definition}), "
             "density minus uniform at matched KL, seeds then prompts", "",
             "GRPO runs:", "", arms_report.runs_table(context), "",
             "Every model sampled (SFT, each run's final checkpoint, the trajectory checkpoints around the matched KL):", "",
             table(["model", "checkpoint", "step", "git commit at save"], rows), "",
             f"- prompts: {results['num_prompts']} held-out prompts of the final half of the test split "
             f"({context['prompts']['file']}, split == \"test\", final by a hash of the id; never used by the RMs or GRPO, "
             f"and disjoint from the dev half GRPO's trajectories use), {context['prompts']['num_candidates']} candidates, "
             f"{context['prompts']['num_too_long']} left out as longer than {context['prompts']['max_prompt_tokens']} tokens",
             f"- selection: {context['prompts']['method']}",
             f"- sampling: {results['num_samples']} samples per prompt, temperature {sampling['temperature']}, "
             f"top_k {sampling['top_k']}, top_p {sampling['top_p']}, max {sampling['max_tokens']} new tokens, seed {sampling['seed']}; "
             "the same prompts, seeds and settings for every model (" + sampling["seed_rule"] + ")",
             f"- embeddings: {context['embedding_model']}; judge: {context['judge']}; policy RM: {context['reward_model']}",
             f"- run: {context['world_size']} process(es) on {context['device']}, evaluation commit {context['git_commit']}, "
             f"{context['seconds']:.0f} s", ""]
    strata = context["prompts"]["strata"]
    if strata:
        quintiles = sorted({q for counts in strata.values() for q in counts})
        lines += ["Prompts per source and density quintile (Q1 = least dense, Q5 = most dense among the final prompts):", "",
                  table(["source", *[f"Q{q}" if q else "no density" for q in quintiles], "total"],
                        [[src, *[str(counts.get(q, 0)) for q in quintiles], str(sum(counts.values()))]
                         for src, counts in sorted(strata.items())])]
    return lines


def _summary_rows(results: dict, comparison: dict, holm: dict) -> list[list[str]]:
    """density vs baseline, one row per metric with a better direction: raw and equal-length differences,
    and the verdict the metric's basis gives (Holm-corrected for the primary metrics)."""
    rows = []
    sft_means = model_means(results, REFERENCE)
    for metric in METRICS:
        raw = comparison["rows"].get(metric.name)
        if raw is None or metric.direction is None:
            continue
        basis, basis_name = verdict_basis(comparison, metric.name)
        adjusted = comparison["length_controlled"].get(metric.name)
        cells = [metric.label + (" *" if metric.primary else ""), better_word(metric.direction), fmt(sft_means[metric.name]),
                 fmt(raw["mean_b"]), fmt(raw["mean_a"]),  # over the prompts the difference uses
                 fmt_signed(raw["diff"]), fmt_ci(raw["ci"]), fmt_p(raw["p"])]
        cells += ([fmt_signed(adjusted["diff"]), fmt_ci(adjusted["ci"]), fmt_p(adjusted["p"])] if adjusted
                  else ["not computed", "", ""])
        primary = holm.get(metric.name)
        cells += [fmt_p(primary["p_holm"]) if primary else "", fmt_signed(raw["d_z"], 3), str(basis["n"]), basis_name,
                  primary["verdict_holm"] if primary else basis["verdict"]]
        rows.append(cells)
    return rows


def _vs_reference_rows(results: dict, comparison: dict) -> list[list[str]]:
    rows = []
    for metric in METRICS:
        r = comparison["rows"].get(metric.name)
        if r is None or metric.direction is None:
            continue
        rows.append([metric.label, better_word(metric.direction), fmt(r["mean_b"]), fmt(r["mean_a"]), fmt_signed(r["diff"]),
                     fmt_ci(r["ci"]), fmt_p(r["p"]), fmt_signed(r["d_z"], 3), str(r["n"]), VS_REFERENCE_WORDS[r["verdict"]]])
    return rows


def _summary_section(results: dict) -> list[str]:
    comparison = results["comparisons"]["density_vs_baseline"]
    header = ["metric", "better", "SFT", "baseline", "density", "raw diff (density - baseline)", "95% CI", "p",
              "diff at equal length", "95% CI", "p", "Holm p", "d_z", "prompts", "verdict on",
              "verdict (* Holm-corrected)"]
    descriptive = [[m.label, fmt(comparison["rows"][m.name]["mean_b"]), fmt(comparison["rows"][m.name]["mean_a"]),
                    fmt_signed(comparison["rows"][m.name]["diff"]), fmt_ci(comparison["rows"][m.name]["ci"]),
                    fmt_p(comparison["rows"][m.name]["p"])]
                   for m in METRICS if m.direction is None and m.name in comparison["rows"]]
    return [*_detail_verdict_lines(results),
            "Each row: the better direction, each model's value (mean over prompts, or the corpus figure), the raw paired "
            "difference density - baseline with its bootstrap CI and sign-flip permutation p-value (prompt-level "
            "resampling for corpus figures), the difference at equal length with its CI and p (see Length-controlled "
            "differences), the Holm-adjusted p over the core metrics (*), Cohen's d_z of the raw differences, the "
            "prompts used (a prompt where the metric is undefined for either model is left out) and the verdict. "
            "**Verdicts rest on the difference at equal length wherever one is computed** (column 'verdict on'), on the raw "
            "difference only for figures without a length control; for the core metrics (*) the verdict is the "
            "Holm-corrected one the overall verdict counts. supported = better direction, CI excludes 0 and p < alpha; "
            "contradicted = worse direction, CI excludes 0 and p < alpha; otherwise inconclusive. A negative difference "
            "is an improvement exactly where lower is better.", "",
            table(header, _summary_rows(results, comparison, results["hypothesis"]["holm"])), "",
            "Descriptive figures (no better direction, no verdict):", "",
            table(["figure", "baseline", "density", "diff", "95% CI", "p"], descriptive)]


LENGTH_CONTROL_WORDS = {"prefix": "equal-length prefixes", "regression": "regression on log length"}


def _length_section(results: dict) -> list[str]:
    comparison = results["comparisons"]["density_vs_baseline"]
    holm = results["hypothesis"]["holm"]
    rows = [[METRIC_BY_NAME[name].label + (" *" if name in holm else ""), better_word(r["direction"]),
             LENGTH_CONTROL_WORDS[r["method"]], fmt_signed(r["diff"]), fmt_ci(r["ci"]), fmt_p(r["p"]),
             fmt_signed(r["slope"], 3) if "slope" in r else "", str(r["n"]), r["verdict"],
             fmt_p(holm[name]["p_holm"]) if name in holm else "", holm[name]["verdict_holm"] if name in holm else ""]
            for name, r in comparison["length_controlled"].items()]
    return ["The differences the verdicts rest on: density - baseline at equal response length, two ways.", "",
            "- Equal-length prefixes (every figure computed from the text, per prompt or over all prompts): sample s of a "
            "prompt of both arms is cut to the word count of the shorter of the two (BPE ids to the shorter id count, for "
            f"EAD) and the figure recomputed; the cut responses average {fmt(comparison['equal_length_words'], 3)} words. "
            "Arms that write alike and differ only in when they stop give cut texts alike in distribution, so the paired "
            "test keeps its level whatever the figure's shape in length. Bootstrap CI and p over prompts, as for the raw "
            "figures.",
            "- Regression on log length (the embedding distance and the reward, which would need the models to recompute "
            "on cut text): the per-prompt difference is regressed on the difference of log(1 + mean words per "
            "response); the intercept is the difference expected at equal length (slope: the part length explains). "
            "Bootstrap CI and p over prompts. It assumes a line in log length, so it is the rougher of the two.", "",
            "The core metrics' (*) Holm-corrected verdicts are the ones this detail's overall word counts.", "",
            table(["metric", "better", "length control", "diff at equal length", "95% CI", "p", "slope per log-length",
                   "prompts", "verdict (uncorrected)", "Holm p", "verdict (Holm-corrected)"], rows)]


def _vs_reference_section(results: dict) -> list[str]:
    lines = []
    for name, comparison in results["comparisons"].items():
        if comparison["b"] != REFERENCE:
            continue
        a = comparison["a"]
        lines += [f"### {a} vs {REFERENCE} (diff = {a} - {REFERENCE})", "",
                  table(["metric", "better", REFERENCE, a, f"diff ({a} - {REFERENCE})", "95% CI", "p", "d_z", "prompts",
                         f"{a} is"], _vs_reference_rows(results, comparison)), ""]
    words = {label: fmt(model_means(results, label)["mean_words"], 3) for label in results["labels"]}
    return ["Raw differences, not length-controlled: where a model writes longer or shorter than SFT (words per response: "
            + ", ".join(f"{label} {n}" for label, n in words.items()) + "), part of each difference is length alone.", "",
            *lines]


def _quality_section(results: dict, context: dict) -> list[str]:
    present = [name for name, has in (("judge_reward", results.get("has_judge")), ("reward", results["has_rewards"])) if has]
    if not present:
        return ["**No judge and no policy RM: quality not measured.** Read the diversity figures with that in mind: "
                "a model can look diverse by writing worse text."]
    rows = [[label, *[fmt(model_means(results, label)[name]) for name in present]] for label in results["labels"]]
    lines = ["Mean score per model (mean over prompts of the mean over samples): the independent judge's, and the policy "
             "RM's (the reward GRPO maximised, which flatters GRPO):", "",
             table(["model", *[METRIC_BY_NAME[name].label for name in present]], rows)]
    for name in present:
        lines += ["", f"**{METRIC_BY_NAME[name].label}**:"]
        for comparison in results["comparisons"].values():
            r = comparison["rows"][name]
            lines.append(f"- {comparison['a']} - {comparison['b']}: {fmt_signed(r['diff'])} {fmt_ci(r['ci'])}, p {fmt_p(r['p'])}")
        adjusted = results["comparisons"]["density_vs_baseline"]["length_controlled"].get(name)
        if adjusted:
            lines.append(f"- density - baseline at equal length: {fmt_signed(adjusted['diff'])} {fmt_ci(adjusted['ci'])}, "
                         f"p {fmt_p(adjusted['p'])} (reward models tend to favour longer answers)")
    if "judge_reward" not in present:
        lines += ["", "**No judge: quality is only the policy RM's, which GRPO optimised.**"]
    return lines


def _examples_section(context: dict, labels: list[str]) -> list[str]:
    lines = [f"Sample 0 of each model for {len(context['examples'])} prompts drawn at random (seed {context['sampling']['seed']}); "
             "texts cut at 600 characters.", ""]
    for example in context["examples"]:
        lines += [f"**Prompt {example['prompt_id']}** ({example['src']}): {cell_text(example['prompt'], 300)}", "",
                  table(labels, [[cell_text(example["responses"][label], 600) for label in labels]]), ""]
    return lines


def _not_found(info: dict) -> list[str]:
    """A section's one line when the file it reads from another stage is missing."""
    return [f"not found ({info['path']}: {info['reason']})"]


def _rm_eval_section(context: dict) -> list[str]:
    """scripts.train_rm's eval.json of the judge and of the policy RM: held-out accuracy overall, per source, per quintile."""
    lines = ["Both reward models on every test pair (prompts neither was trained on); each learned from its own half of "
             "the train pairs, split by prompt.", ""]
    for role, title in (("judge", "Judge"), ("policy", "Policy RM (GRPO's reward)")):
        info, data = context["rm_eval"][role], context["rm_eval"][role]["data"]
        if data is None:
            lines += [f"**{title}**: {_not_found(info)[0]}", ""]
            continue
        lines += [f"**{title}**, from {info['path']} (step {data.get('step', 'n/a')}, {fmt(data.get('train_pairs'))} train "
                  f"pairs, pair weighting {data.get('pair_weighting', 'n/a')}): {fmt(data.get('n_pairs'))} held-out pairs, "
                  f"accuracy {fmt(data.get('accuracy'))}, loss {fmt(data.get('loss'))}, margin {fmt(data.get('margin'))}.",
                  "", rm_eval_table(data), ""]
    return lines


def _density_section(context: dict) -> list[str]:
    info, d = context["density_stats"], context["density_stats"]["data"]
    if d is None:
        return _not_found(info)
    rows = [["train prompts", fmt(d["n_train"])], ["test prompts", fmt(d["n_test"])],
            ["Kish effective sample size", f"{fmt(d['kish_ess'])} ({fmt(d['kish_ess_fraction'] * 100, 3)}% of train)"],
            ["largest / smallest weight", fmt(d["max_over_min"])], ["largest weight x n_train", fmt(d["max_x_n"])],
            *[[f"weight x n_train, q{q}", fmt(v)] for q, v in d["weight_x_n_quantiles"].items()],
            *[[f"{key} (used)", fmt(value) if isinstance(value, float) else str(value)]
              for key, value in d.get("used", {}).items()],
            ["flags", ", ".join(f"{k}={v}" for k, v in d["flags"].items())]]
    return [f"From {info['path']} (weight x n_train = 1 is uniform sampling).", "", table(["figure", "value"], rows)]


def _curves_section(context: dict, plots: dict) -> list[str]:
    lines = []
    for arm, info in context["training_curves"].items():
        for key, series in info["series"].items():
            if series:
                lines.append(f"- {arm} {key} ({series['tag']}): {len(series['steps'])} points, first {fmt(series['values'][0])}, "
                             f"last {fmt(series['values'][-1])}, steps {series['steps'][0]}..{series['steps'][-1]}")
            else:
                lines.append(f"- {arm} {key}: not found ({info['reason'][key]})")
    if "training_curves" in plots:
        lines += ["", f"![GRPO training curves]({plots['training_curves']})"]
    return lines


def _definitions_section(context: dict) -> list[str]:
    rows = [[m.name, m.label, better_word(m.direction), "yes" if m.primary else "", m.definition] for m in METRICS]
    patterns = [f"- `{name}`: `{pattern.pattern}` (case-insensitive)" for name, pattern in TIC_PATTERNS.items()]
    return [table(["key", "metric", "better", "primary", "definition"], rows), "",
            "Words: lowercased runs of letters/digits/underscore, and each other non-space character, as tokens. "
            f"MATTR window {context['mattr_window']} words; a prompt's samples are pooled for the distinct, EAD, Gini and "
            "compression figures (n-grams never cross samples); responses with no text are left out of TTR/MATTR. "
            "Embeddings: the SFT model's final-norm hidden states averaged over the response tokens (after <|bos|>), L2-normalised; "
            "an empty response embeds as the <|bos|> state.", "", "Tic regexes:", *patterns]


def _methods_section(results: dict) -> list[str]:
    s = results["settings"]
    return ["Seeds per arm (the sections before the detail):",
            "- Each arm's S runs give per-prompt values (S, P) on the same prompts. The density - uniform difference of "
            "means gets a hierarchical bootstrap: seeds resampled within each arm, then one set of prompts shared by both "
            "arms; seed deviations scaled by sqrt(S / (S - 1)); CI and p from the bootstrap standard error with Student "
            "t quantiles on S_a + S_b - 2 degrees of freedom (nanochat/kat/stats.hierarchical_bootstrap). With one run in "
            "an arm there is no seed-level test: the paired test over prompts is shown, with no verdict on the sampler.",
            "- Matched KL: the target is --kl_budget, or the largest KL every run reached along its trajectory (dev "
            "prompts). Each run is taken where its KL first reaches the target: the trajectory checkpoints before and "
            "after are evaluated on the final prompts and each prompt's figure is interpolated linearly in KL "
            "(stats.interpolate_at).",
            "- Common length: every GRPO model of a comparison (all runs' points at matched KL, or all final models) has "
            "sample s of prompt p cut to the word count of the shortest of them (the BPE id count, for EAD) and its text "
            "figures recomputed; embedding distances and rewards are compared raw. The across-prompt distance is split "
            "into per-prompt values (a prompt's mean distance to the other prompts' samples), whose mean is the corpus "
            "figure.",
            "- The primary metric decides the verdict alone; the secondary metrics are Holm-corrected together; quality "
            "and the density-quintile breakdown are not corrected. Noise floor: each pair of uniform runs, paired over "
            "prompts (bootstrap CI, sign-flip p), as a one-seed design would test two arms.",
            "- Collapse alarm: a run's across-prompt embedding distance (raw) below 80% of SFT's, at matched KL or at "
            "the end.", "",
            "Seed-0 detail (the sections after the divider):",
            f"- Pairing: the unit is the prompt; every model answered the same {results['num_prompts']} prompts with the same "
            "seeds, so prompt difficulty cancels in each per-prompt difference. Prompts where a metric is undefined for "
            "either model (e.g. no text) are left out of that row and the row's prompt count says so.",
            f"- CI: percentile bootstrap over prompts, {s['n_resamples']} resamples ({s['corpus_resamples']} for corpus figures), "
            f"{s['confidence']:.0%}.",
            f"- p: two-sided sign-flip permutation test of the mean paired difference ({s['n_resamples']} random sign "
            "patterns, or all 2^n when fewer; p = (1 + hits)/(1 + resamples) for random patterns). Corpus figures: "
            "each prompt's two responses sets are swapped at random and the figure recomputed.",
            "- Effect size: Cohen's d_z = mean difference / sd of the differences.",
            f"- Verdicts use alpha = {s['alpha']}. Density vs baseline: a metric's verdict rests on its difference at equal "
            "length where one is computed (every primary metric has one), on the raw difference otherwise. The overall "
            "verdict uses Holm-adjusted p over the primary metrics' (*) equal-length p-values: supported (or "
            "contradicted) when more than half of them are and none goes the other way; mixed when some go each way; "
            "weakly supported (contradicted) when some but not most go one way and none the other; otherwise "
            "inconclusive.",
            "- Length control (density vs baseline): figures of the text, per prompt and over all prompts, are recomputed "
            "on each sample pair cut to the shorter one's word count (BPE id count for EAD) and compared as above; the "
            "within-prompt embedding distance and the reward by the intercept of the difference regressed on the "
            "log-length difference, bootstrap CI and p. The across-prompt embedding distance has no length control: its "
            "verdict rests on the raw difference and it is not primary.",
            "- Self-BLEU leaves empty samples out (an empty sample would score 0 and read as more diverse); a prompt "
            "with fewer than 2 non-empty samples has no self-BLEU and is left out of that row."]


# -----------------------------------------------------------------------------
# Positive control: a tic planted by scripts.kat_inject, and whether the pipeline saw it

PLACEMENT_WORDS = {"dense": "the densest prompts first", "rare": "the rarest prompts first", "random": "picked at random"}
STYLE_WORDS = {"emdash": "em dashes", "not_just": '"not just X, but also Y" constructions',
               "both": 'em dashes and "not just X, but also Y" constructions'}
EXPECTED_BY_PLACEMENT = {
    "dense": "The tic was planted in the densest prompts, which density-aware sampling draws less often: if it "
             "protects against collapse concentrated in crowded regions, the density arm shows fewer tics than the "
             "baseline (a negative difference).",
    "rare": "The tic was planted in the rarest prompts, which density-aware sampling draws more often: the density "
            "arm is expected to show more tics than the baseline (a positive difference).",
    "random": "The tic was planted at random across prompt space: no difference between the arms is expected.",
}
BETWEEN_ARMS_WORDS = {ps.SUPPORTED: "the density arm has fewer of the planted tic",
                      ps.CONTRADICTED: "the density arm has more of the planted tic",
                      ps.INCONCLUSIVE: "no clear difference between the arms"}


def control_outcome(results: dict, control: dict) -> dict:
    """
    Did the control pass? The RM must reward the tic on held-out probes (verdict "supported") and
    at least one GRPO arm must carry more of the planted tic than SFT with a CI excluding zero
    ("contradicted" on a lower-is-better metric).
    """
    metric = PLANTED_METRICS[control["record"]["flags"]["inject_style"]][0]
    probe = control.get("probe")
    rm_ok = probe is not None and probe["verdict"] == ps.SUPPORTED
    amplified = {arm: results["comparisons"][f"{arm}_vs_{REFERENCE}"]["rows"][metric]["verdict"] == ps.CONTRADICTED
                 for arm in HYPOTHESIS}
    if probe is None:
        status = "incomplete (the RM's preference was not measured)"
    elif not rm_ok:
        status = "failed at the reward model"
    elif not any(amplified.values()):
        status = "failed at GRPO"
    else:
        status = "passed"
    return {"metric": metric, "rm_ok": rm_ok, "amplified": amplified, "status": status}


def _probe_rows(probe: dict, what: str = "probes") -> list[list[str]]:
    rows = [[f"{what} where the tic version scores higher (of {probe['n']})", fmt(probe["prefer_tic"]),
             fmt_ci(probe["prefer_tic_ci"]), ""],
            ["mean reward difference, tic - clean", fmt_signed(probe["mean_diff"]), fmt_ci(probe["mean_diff_ci"]),
             fmt_p(probe["p"])]]
    for half, figures in (probe.get("by_density") or {}).items():
        rows.append([f"mean reward difference, {half} of the test prompts ({figures['n']} probes)",
                     fmt_signed(figures["mean_diff"]), fmt_ci(figures["mean_diff_ci"]), fmt_p(figures["p"])])
    return rows


def _tic_rate_rows(results: dict) -> list[list[str]]:
    settings = results["settings"]
    names = ["em_dash_per_1k_chars", "not_x_but_y_per_1k_chars"]
    rows = []
    for label in results["labels"]:
        cells = [label]
        for name in names:
            values = np.array([v for v in results["per_prompt"][label][name] if math.isfinite(v)])
            cells += [fmt(values.mean() if len(values) else float("nan")),
                      fmt_ci(ps.bootstrap_ci(values, settings["n_resamples"], settings["confidence"], settings["seed"]))]
        rows.append(cells)
    return rows


def _positive_control_section(results: dict, context: dict) -> list[str]:
    control = context["positive_control"]
    record, flags = control["record"], control["record"]["flags"]
    planted = PLANTED_METRICS[flags["inject_style"]]
    outcome = control_outcome(results, control)
    share = record["num_injected"] / max(record["num_train"], 1)
    lines = [f"This run planted a known tic to check that the pipeline can see an effect that is there. scripts.kat_inject "
             f"rewrote the chosen response of {record['num_injected']} of {record['num_train']} train pairs ({share:.0%}, "
             f"{PLACEMENT_WORDS[flags['inject_where']]}) to carry {STYLE_WORDS[flags['inject_style']]} (style "
             f"`{flags['inject_style']}`, seed {flags['seed']}); rejected responses and all {record['num_test']} test pairs "
             f"were left as they were. {record['rejected_with_tic']} train pairs whose rejected response already carried a "
             f"tic were not eligible and still teach the reward model the opposite preference. Record: {control['path']}.", ""]
    density = record.get("density") or {}
    if "injected_median" in density:
        lines += [f"The injected pairs' prompts span density percentiles {density['injected_percentile_min']:.0f}.."
                  f"{density['injected_percentile_max']:.0f} of the train pairs (100 = densest).", ""]
    start = control.get("starting_policy")
    if start is not None:
        if start["tic_style"] and start["tic_rate"] > 0:
            share = (f"{start['tic_conversations']:,} of its {start['conversations']:,} conversations"
                     if start.get("tic_conversations") is not None else "some of its conversations")
            lines += [f"The starting policy ({REFERENCE}, {start['source']}) is {start['init_from']} fine-tuned with "
                      f"{STYLE_WORDS[start['tic_style']]} in {share} (control_sft --tic_style={start['tic_style']} "
                      f"--tic_rate={start['tic_rate']:g}: a seeded share is picked, and those without prose the tic can "
                      "go into stay clean), so that it samples the tic at a base rate (table 2) GRPO can amplify.", ""]
        else:
            lines += [f"The starting policy ({REFERENCE}, {start['source']}) was fine-tuned without a planted tic: if it "
                      "never samples the tic, GRPO has nothing to amplify and the control fails for that reason alone.", ""]
    lines += [f"**Outcome: {outcome['status']}.**", "", "**1. Does the reward model reward the tic?**", ""]
    probe = control.get("probe")
    if probe is None:
        lines += [f"Not measured: {control['reason']}.", ""]
    else:
        lines += [f"{probe['n']} held-out probes: each takes a tic-free chosen response of a TEST pair and the same response "
                  "with the tic injected by the same rules; neither was ever trained on. The share counts a tie as 1/2; "
                  f"the CIs are {probe['confidence']:.0%} bootstrap intervals over probes, p is the sign-flip test of the "
                  "mean difference.", "",
                  table(["figure", "value", f"{probe['confidence']:.0%} CI", "p"], _probe_rows(probe)), ""]
    own = control.get("policy_probe")
    if own is not None:
        lines += [f"On the starting policy's own samples (what GRPO's reward sees): {own['n']} tic-free {REFERENCE} "
                  "samples of the evaluation, each scored as written and with the tic injected by the same rules. An RM "
                  "that learned the rules' words rather than the tic rewards the test probes above but not these.", "",
                  table(["figure", "value", f"{own['confidence']:.0%} CI", "p"], _probe_rows(own, "samples")), ""]
    elif control.get("policy_reason"):
        lines += [f"On the starting policy's own samples: not measured ({control['policy_reason']}).", ""]
    n_prompts = results["num_prompts"]
    lines += [f"**2. Tic rates** (mean over the same {n_prompts} held-out prompts, {results['num_samples']} samples each; "
              "95% bootstrap CI over prompts; the planted tic is marked *)", "",
              table(["model", "Em dashes / 1k chars" + (" *" if "em_dash_per_1k_chars" in planted else ""), "95% CI",
                     '"Not X but Y" / 1k chars' + (" *" if "not_x_but_y_per_1k_chars" in planted else ""), "95% CI"],
                    _tic_rate_rows(results)), ""]
    rows = []
    for key in (f"{HYPOTHESIS[1]}_vs_{REFERENCE}", f"{HYPOTHESIS[0]}_vs_{REFERENCE}", "density_vs_baseline"):
        comparison = results["comparisons"][key]
        for name in planted:
            r = comparison["rows"][name]
            reading = {ps.CONTRADICTED: f"more in {comparison['a']}", ps.SUPPORTED: f"fewer in {comparison['a']}",
                       ps.INCONCLUSIVE: "no clear difference"}[r["verdict"]]
            rows.append([f"{comparison['a']} - {comparison['b']}", METRIC_BY_NAME[name].label, fmt_signed(r["diff"]),
                         fmt_ci(r["ci"]), fmt_p(r["p"]), reading])
    lines += ["Paired differences in the planted tic (a positive difference: more tics in the first model):", "",
              table(["comparison", "metric", "diff", "95% CI", "p", "reading"], rows), "",
              "**3. What this implies for the main comparison**", "", *_control_implications(results, control, outcome)]
    return lines


def _control_implications(results: dict, control: dict, outcome: dict) -> list[str]:
    metric, label = outcome["metric"], METRIC_BY_NAME[outcome["metric"]].label
    probe = control.get("probe")
    lines = []
    if probe is None:
        lines.append(f"- The RM's preference for the tic was not measured ({control['reason']}); the control is incomplete.")
    elif outcome["rm_ok"]:
        lines.append(f"- The RM learned the planted preference: the tic version scores higher on {probe['prefer_tic']:.0%} "
                     f"of {probe['n']} held-out probes (mean difference {fmt_signed(probe['mean_diff'])} "
                     f"{fmt_ci(probe['mean_diff_ci'])}).")
        own = control.get("policy_probe")
        if own is not None and own["verdict"] != ps.SUPPORTED:
            lines.append(f"- But on the starting policy's own samples the RM does not measurably reward it (mean difference "
                         f"{fmt_signed(own['mean_diff'])} {fmt_ci(own['mean_diff_ci'])}, p {fmt_p(own['p'])}): GRPO's "
                         "reward barely sees the tic where this policy writes, so GRPO has little reason to amplify it.")
    else:
        lines.append(f"- The RM did not learn to reward the tic (mean difference {fmt_signed(probe['mean_diff'])} "
                     f"{fmt_ci(probe['mean_diff_ci'])}, p {fmt_p(probe['p'])}): nothing downstream had a reason to amplify "
                     "it. Raise --inject_rate, train the RM longer, or check the pairs the injection left ineligible.")
    for arm in HYPOTHESIS[::-1]:
        r = results["comparisons"][f"{arm}_vs_{REFERENCE}"]["rows"][metric]
        amplified = "exceeds" if outcome["amplified"][arm] else "does not measurably exceed"
        lines.append(f"- {arm}'s rate ({label}) {amplified} SFT's: {fmt_signed(r['diff'])} {fmt_ci(r['ci'])}, "
                     f"p {fmt_p(r['p'])}.")
    if outcome["status"] == "passed":
        lines.append("- Positive control passed: the planted preference went through the RM and GRPO and the evaluation "
                     "measured it with a CI excluding zero. A null result in the main comparison at this scale means the "
                     "density effect is smaller than this planted one, not that the pipeline is blind to effects.")
    elif outcome["status"] == "failed at GRPO":
        lines.append("- Positive control failed at GRPO: the RM rewards the tic but neither arm carries measurably more of it "
                     "than SFT. At this scale (steps, learning rate, KL weight, evaluation prompts) a null result in the main "
                     "comparison is uninformative: it cannot be told apart from a pipeline that cannot see an effect.")
    else:
        lines.append("- Positive control not passed: this run says nothing about density sampling either way.")
    between = results["comparisons"]["density_vs_baseline"]["rows"][metric]
    lines.append(f"- {EXPECTED_BY_PLACEMENT[control['record']['flags']['inject_where']]} Observed (density - baseline, "
                 f"{label}): {fmt_signed(between['diff'])} {fmt_ci(between['ci'])}, p {fmt_p(between['p'])}: "
                 f"{BETWEEN_ARMS_WORDS[between['verdict']]}"
                 + ("." if outcome["status"] == "passed" else " (only informative when the control passed)."))
    return lines


def render_markdown(results: dict, context: dict, plots: dict) -> str:
    labels = results["labels"]
    body = {
        "Controls": controls_section(context["controls"]),
        "Collapse alarm": arms_report.collapse_section(context),
        "Verdict": arms_report.verdict_section(context),
        "Setup": _setup_section(results, context),
        "Matched KL: primary contrast and noise floor": arms_report.matched_primary_section(context),
        "Matched KL: secondary metrics and quality": arms_report.matched_secondary_section(context),
        "Endpoints": arms_report.endpoint_section(context),
        "Effects by prompt density quintile": arms_report.quintile_section(context),
        "Frontiers and over-optimisation": arms_report.frontier_section(context, plots),
        "What the samplers drew": arms_report.draws_section(context),
        "Summary: density vs baseline": _summary_section(results),
        "Length-controlled differences": _length_section(results),
        "Each model vs SFT": _vs_reference_section(results),
        "Quality (RM reward)": _quality_section(results, context),
        "Plots": [f"![Per-prompt metric distributions]({plots['metrics']})", "",
                  f"![Response length histograms]({plots['lengths']})", "", f"![Em-dash rates]({plots['em_dash']})"],
        "Example responses": _examples_section(context, labels),
        "RM held-out accuracy by density quintile": _rm_eval_section(context),
        "Density statistics": _density_section(context),
        "GRPO training curves": _curves_section(context, plots),
        "Metric definitions": _definitions_section(context),
        "Statistical methods": _methods_section(results),
    }
    if context.get("positive_control"):
        body[POSITIVE_CONTROL] = _positive_control_section(results, context)
    models = context["models"]
    lines = ["# Diversity evaluation: density-aware vs uniform prompt sampling in GRPO", "", *arms_report.preregistration(), ""]
    for title in section_titles(context):
        if title == DETAIL_SECTIONS[0]:
            lines += [f"# Detail: the final models of seed index 0 ({models['density']['source']} as density, "
                      f"{models['baseline']['source']} as baseline)", ""]
        lines += [f"## {title}", "", *body[title], ""]
    return "\n".join(lines)


def write_report(results: dict, context: dict, report_path: Path) -> dict[str, Path]:
    """Write the markdown, its plots and the JSON; returns the paths written."""
    report_path = Path(report_path)
    out_dir = report_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = make_plots(results, context, out_dir, report_path.stem)
    markdown = render_markdown(results, context, plots)
    json_path = report_path.with_suffix(".json")
    payload = jsonable({"results": results, "context": context, "plots": plots,
                        "metrics": {m.name: {"label": m.label, "direction": m.direction, "kind": m.kind,
                                             "primary": m.primary, "definition": m.definition} for m in METRICS}})
    for path, text in ((report_path, markdown), (json_path, json.dumps(payload, indent=1, allow_nan=False) + "\n")):
        atomic_write(path, text)
    return {"report": report_path, "json": json_path, **{name: out_dir / file for name, file in plots.items()}}
