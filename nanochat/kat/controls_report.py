"""
The "Controls" section that opens the diversity report (scripts.eval_diversity) and the tic control's
report (scripts.tic_control): which controls ran, whether each passed, what that means for trusting
the main result, then each control's figures. It renders the "controls" part of the report context
(nanochat/kat/controls.py computes it): {"this", "tiny", "synthetic", "null_fpr", "sampler", "null",
"tic", "outcomes", "controls_dir"}.
"""

import math

from nanochat.kat.controls import FAILED, INCOMPLETE, PASSED
from nanochat.kat.report_format import fmt, fmt_ci, fmt_p, fmt_signed, table

TITLE = "Controls"
COMMANDS = {"sampler": "bash kat_speedrun.sh --control=sampler", "tic": "bash kat_speedrun.sh --control=tic",
            "null": "bash kat_speedrun.sh --control=null"}
CHECKS = {
    "synthetic": "the project's sampler, advantages and loss on a toy policy: a preference planted in a rare cluster "
                 "rises faster under density sampling, by about the ratio of the draw probabilities",
    "null_fpr": "the primary verdict on synthetic pairs of arms drawn alike (seeds, then prompts, as in real runs): "
                "it may declare a difference in at most 5% of them, plus the binomial error",
    "sampler": "the whole pipeline: a rule reward planted only in the rarest density quintile must leave more of its "
               "marker on held-out rare prompts in the density arm than in the uniform arm (seeds, then prompts)",
    "tic": "reward -> GRPO -> evaluation: an em dash rewarded on a fraction 0, 0.25, 0.5 of the prompts must be "
           "amplified at 0.5, not at 0, and more with the dose (at a matched KL along the trajectories)",
    "null": "the verdict: the density arm on uniform weights against the uniform arm, other seeds, must come out "
            "'no difference'",
}
MEANING = {
    ("synthetic", True): "the code does what the experiment assumes of it",
    ("synthetic", False): "the code does not do what the experiment assumes: no difference between the arms below can "
                          "be read as a sampler effect",
    ("null_fpr", True): "the verdict's false-positive rate is what its 5% level promises, where its assumptions hold",
    ("null_fpr", False): "the verdict declares differences between identical arms too often: a 'supported' or "
                         "'contradicted' main verdict may be noise",
    ("sampler", True): "the pipeline can see a sampler effect of the planted size: a null main result means a smaller "
                       "effect, not a blind pipeline",
    ("sampler", False): "the pipeline did not see a planted sampler effect: a null main result is uninformative at this "
                        "size (too few steps, seeds or prompts to see such effects)",
    ("tic", True): "a known reward is amplified, in proportion, and measured: GRPO and the evaluation respond to reward",
    ("tic", False): "a known reward was not seen amplified as planted: differences in tics between the arms say "
                    "little about what GRPO rewarded",
    ("null", True): "two identical samplers came out 'no difference': the primary verdict does not read seed noise "
                    "as a sampler effect",
    ("null", False): "the verdict declared a difference between two identical samplers: treat a 'supported' or "
                     "'contradicted' main verdict as unreliable",
}
NOT_RUN = {"sampler": "no evidence that this pipeline can see a sampler effect at all",
           "tic": "no evidence that GRPO and the evaluation respond to a known reward",
           "null": "the false-positive rate of the verdict on real runs is not measured (the synthetic one is "
                   "in the table above; python -m dev.null_control_fpr measures it at length)"}
TINY_WARNING = ("**Tiny preset: a 2-layer model trained for minutes on a few MB. Every outcome in this report, the "
                "controls' included, shows that the stages run and fit together; none of it is evidence about "
                "density sampling.**")


def _word(passed) -> str:
    return {True: PASSED, False: FAILED, None: INCOMPLETE}[passed]


def _meaning(kind: str, passed) -> str:
    if passed is None:
        return "incomplete: it neither supports nor undermines the main result"
    return MEANING[(kind, passed)]


def _status_rows(controls: dict) -> list[list[str]]:
    synthetic = controls["synthetic"]
    rows = [["synthetic sampler control (computed for this report, CPU)", CHECKS["synthetic"],
             f"**{_word(synthetic['passed'])}**: {synthetic['reason']}", _meaning("synthetic", synthetic["passed"])]]
    null = controls["null_fpr"]
    rows.append(["synthetic null control (computed for this report, CPU)", CHECKS["null_fpr"],
                 f"**{_word(null['passed'])}**: {null['false_positives']} of {null['replicates']} pairs "
                 f"({null['rate']:.1%}, Clopper-Pearson 95% [{null['ci'][0]:.1%}, {null['ci'][1]:.1%}]; bound {null['bound']:.1%}; "
                 f"python -m dev.null_control_fpr for more)",
                 _meaning("null_fpr", null["passed"])])
    kinds = [controls["this"]] if controls["this"] else list(COMMANDS)
    for kind in kinds:
        result = controls.get(kind)
        if result is not None:  # this report is that control's own
            rows.append([f"{kind} control (this run)", CHECKS[kind], f"**{result['status']}**", _meaning(kind, result["passed"])])
            continue
        outcome = controls["outcomes"].get(kind)
        if outcome is None:
            rows.append([f"{kind} control", CHECKS[kind], f"not run (`{COMMANDS[kind]}`)", NOT_RUN[kind]])
            continue
        tiny = " (tiny preset: not evidence)" if outcome["tiny"] else ""
        rows.append([f"{kind} control", CHECKS[kind], f"**{outcome['status']}**{tiny}; {outcome['report']}, "
                     f"{outcome['written']}, commit {outcome['git_commit']}", _meaning(kind, outcome["passed"])])
    return rows


def controls_headline(controls: dict) -> str:
    """One line for the report card: each control's outcome."""
    null = controls["null_fpr"]
    words = [f"synthetic sampler control {_word(controls['synthetic']['passed'])}",
             f"synthetic null control {_word(null['passed'])} ({null['false_positives']}/{null['replicates']} false positives)"]
    for kind in [controls["this"]] if controls["this"] else list(COMMANDS):
        result = controls.get(kind) or controls["outcomes"].get(kind)
        words.append(f"{kind} control " + (result["status"] if result else "not run"))
    return "; ".join(words) + (" (tiny preset: not evidence)" if controls["tiny"] else "")


def controls_section(controls: dict) -> list[str]:
    """The section's lines: the status table, then each control's figures."""
    lines = ["A control is a run whose answer is known. The main result deserves trust only as far as the controls "
             "that bear on it passed; each can fail, and a failure says where the pipeline is blind.", ""]
    if controls["tiny"]:
        lines += [TINY_WARNING, ""]
    lines += [table(["control", "what it checks", "outcome", "what it means for the main result"], _status_rows(controls)),
              "", *synthetic_lines(controls["synthetic"])]
    for kind, render in (("sampler", sampler_lines), ("tic", tic_lines), ("null", null_lines)):
        if controls.get(kind) is not None:
            lines += ["", *render(controls[kind])]
    return lines


def synthetic_lines(summary: dict) -> list[str]:
    rows = [[mode, fmt(summary["draw_prob"][mode], 3), ", ".join(str(s) if s is not None else "never"
                                                                 for s in summary["steps_to_level"][mode]),
             ", ".join(fmt(r, 3) for r in summary["final_rate"][mode])] for mode in ("density", "uniform")]
    return ["**Synthetic sampler control** (nanochat/kat/toy.py: prompts in clusters of known density, a policy with "
            "shared and per-cluster logits, a reward for a marker only in the rarest cluster; the project's own "
            f"sampler, advantages and loss; seeds {summary['seeds']}, {summary['steps']} steps):", "",
            table(["sampler", "P(draw from the rare cluster)", f"steps to a marker rate of {summary['level']}, per seed",
                   f"marker rate after {summary['steps']} steps"], rows), "",
            f"Speed-up of density sampling: observed {fmt(summary['observed_speedup'], 3)}x, predicted "
            f"{fmt(summary['predicted_speedup'], 3)}x (the ratio of the draw probabilities). "
            f"**{_word(summary['passed'])}**: {summary['reason']}."]


def sampler_lines(result: dict) -> list[str]:
    plant = result["plant"]
    first = next(iter(plant["runs"].values()))
    candidates = first.get("candidate_rates") or {}
    chosen = (" (--plant_marker=auto chose it from the starting policy's samples: "
              + ", ".join(f"{m!r} {r:.1%}" for m, r in candidates.items()) + ")") if first.get("requested") == "auto" else ""
    lines = ["**Sampler control** (scripts.grpo --plant_marker): GRPO's reward gained "
             f"{fmt(first['bonus_abs'])} ({plant['bonus']:g} x the policy RM's spread among one prompt's samples) for a "
             f"completion containing {plant['marker']!r}, only on the {first['planted_prompts']} train prompts of density "
             f"quintile {plant['quintile']} (1 = rarest). The starting policy wrote it in {first['base_rate']:.1%} of "
             f"{first['probe_prompts'] * first['probe_samples']} probe completions on those prompts{chosen}.", ""]
    draw_rows = [[arm, ", ".join(f"{s:.1%}" if math.isfinite(s) else "n/a" for s in shares)]
                 for arm, shares in result["draws_q1"].items()]
    lines += ["Share of each run's draws from the rarest quintile (draws.json; the density arm should draw it more):", "",
              table(["arm", "per run"], draw_rows), ""]
    rows, contrasts = [["sft", fmt(result["sft"]["rare"], 3), fmt(result["sft"]["common"], 3), ""]], []
    for where, figures in result["where"].items():
        label = "matched KL " + fmt(figures["target"]) if figures["target"] is not None else "endpoints"
        rows += [[f"{arm} ({label})", fmt(means.get("rare"), 3), fmt(means.get("common"), 3),
                  ", ".join(result["seeds"][arm])] for arm, means in figures["means"].items()]
        for part in ("rare", "common"):
            r = figures.get(part)
            if r is not None:
                contrasts.append([label + (" (primary)" if where == result["primary"] and part == "rare" else ""), part,
                                  str(r["n"]), fmt_signed(r["diff"]), fmt_ci(r["ci"]), fmt_p(r["p"]), r["verdict"]])
    lines += [f"Marker rate on the final held-out prompts: the share of each prompt's samples containing "
              f"{plant['marker']!r}, mean over the {result['rare_prompts']} rare (density quintile 1 among the final "
              f"prompts) and {result['common_prompts']} common prompts:", "", table(["model", "rare", "common", "runs"], rows),
              "", "Density minus uniform, hierarchical bootstrap over seeds then prompts (the pass needs the primary row "
              "supported: above 0, its interval excluding 0):", "",
              table(["at", "prompts", "n", "diff", "95% CI", "p", "verdict"], contrasts), "",
              f"**Sampler control: {result['status']}.**"]
    return lines


def null_lines(result: dict) -> list[str]:
    r = result["primary"]
    floor = result["largest_noise_floor"]
    return ["**Null control**: the density arm ran on weights density^0 (kat_density --beta=0: Kish ESS "
            f"{result['kish_ess_fraction']:.1%} of n), so both arms sample uniformly; seeds "
            f"{result['seeds']['density']} against {result['seeds']['uniform']}. Its verdict is the report's primary "
            f"verdict below: {result['metric']} {fmt_signed(r['diff'])} {fmt_ci(r['ci'])}, p {fmt_p(r['p'])}, "
            f"'{r['verdict']}' at {result['where'].replace('_', ' ')}"
            + (f"; the largest uniform-vs-uniform pair differs by {fmt(floor)}" if math.isfinite(floor) else "") + ".",
            "", f"**Null control: {result['status']}.** Every 'density' below means the uniform sampler with the seeds above."]


def tic_lines(result: dict) -> list[str]:
    rows = []
    for dose in result["doses"]:
        f = result["by_dose"][dose]
        rows.append([f"{dose:g}", str(f["n"]), fmt_signed(f["mean"]), fmt_ci(f["ci"]), fmt_p(f["p"]),
                     "yes" if f["ci"][0] > 0 else "no"])
    run_rows = [[name, f"{r['dose']:g}", fmt(r["start"], 3), fmt(r["at_target"], 3), fmt_signed(r["change"], 3)]
                for name, r in result["runs"].items()]
    s = result["slope"]
    return ["**Tic control**: the starting policy writes em dashes now and then (control_sft); GRPO's reward gained a "
            "bonus for a completion with an em dash on a fraction (the dose) of the train prompts. Each run's em dashes "
            f"per 1k characters on the dev prompts at KL {fmt(result['target'])} ({result['how']}), minus its step-0 "
            "value (the starting policy on the same prompts and seeds); Student t intervals over seeds:", "",
            table(["dose", "runs", "change", f"{result['confidence']:.0%} CI", "p", "amplified"], rows), "",
            f"Slope of the change on the dose: {fmt_signed(s['slope'])} per unit dose {fmt_ci(s['ci'])}, p {fmt_p(s['p'])} "
            f"({s['n']} runs).", "", table(["run", "dose", "step 0", "at the KL", "change"], run_rows), "",
            f"**Tic control: {result['status']}.**"]
