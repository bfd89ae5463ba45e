"""
Seeds per arm in the diversity evaluation: GRPO run folders as the interface contract gives them
(nanochat/kat/runs.py), the matched-KL target and its brackets, the arm contrasts and the collapse
alarm (nanochat/kat/arm_stats.py), the report's seed-level sections on synthetic runs with 1-3 seeds
per arm, and scripts.eval_diversity end to end on tiny models with 2 seeds per arm, trajectories,
draws.json and an independent judge.
"""

import json
import math
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.kat import stats as ps
from nanochat.kat.arm_stats import ONE_SEED, PRIMARY_METRIC, SECONDARY_METRICS, arm_contrast, collapse_alarm
from nanochat.kat.data import KatData, held_out_part
from nanochat.kat.diversity_eval import METRIC_BY_NAME, evaluate
from nanochat.kat.diversity_report import SECTIONS, render_markdown
from nanochat.kat.pairs import prompt_id
from nanochat.kat.runs import TRAJECTORY_FILE, bracket, discover_runs, kl_target, load_runs, read_trajectory
from nanochat.tokenizer import Tokenizer
from scripts import eval_diversity
from tests.report_fixtures import (arms_context, make_run_folder, report_context, tiny_model, trajectory_row,
                                   write_reward_model, write_run)

torch.set_num_threads(1)
PLOTS = {"metrics": "m.png", "lengths": "l.png", "em_dash": "e.png"}


def section_of(markdown: str, title: str) -> str:
    return markdown.split(f"\n## {title}\n")[1].split("\n## ")[0].strip()


# -----------------------------------------------------------------------------
# Run folders

def test_run_folders_are_found_by_name_and_their_sampler_checked(tmp_path):
    for arm, i in (("density", 0), ("uniform", 0), ("uniform", 1), ("shuffled", 0)):
        make_run_folder(tmp_path, arm, i, [0.0, 0.5, 1.0, 1.5])
    (tmp_path / "sft").mkdir()
    (tmp_path / "grpo_density_s0").mkdir()  # seed index 0 has no suffix: not a run folder
    assert discover_runs(tmp_path) == ["grpo_baseline", "grpo_baseline_s1", "grpo_density", "grpo_shuffled"]
    runs = load_runs([str(tmp_path / name) for name in discover_runs(tmp_path)])
    assert [(r.name, r.arm, r.seed_index, r.seed) for r in runs] == [
        ("grpo_density", "density", 0, 42), ("grpo_baseline", "uniform", 0, 42), ("grpo_baseline_s1", "uniform", 1, 43),
        ("grpo_shuffled", "shuffled", 0, 42)]
    assert [p["kl"] for p in runs[0].trajectory] == [0.0, 0.5, 1.0, 1.5] and runs[0].draws["draws"] == 100

    with pytest.raises(ValueError, match="compare a model with itself"):
        load_runs([str(tmp_path / "grpo_density"), str(tmp_path / "grpo_density" / "ckpt.pt"), str(tmp_path / "grpo_baseline")])
    with pytest.raises(ValueError, match="no uniform run"):
        load_runs([str(tmp_path / "grpo_density"), str(tmp_path / "grpo_shuffled")])
    # a folder named for one arm whose config.json records another sampler
    (tmp_path / "grpo_density" / "config.json").write_text(json.dumps({"prompt_sampling": "uniform"}))
    with pytest.raises(ValueError, match="named for the density arm but its config.json says prompt_sampling=uniform"):
        load_runs([str(tmp_path / "grpo_density"), str(tmp_path / "grpo_baseline")])


def test_a_bad_trajectory_row_names_its_file_line_and_field(tmp_path):
    path = tmp_path / TRAJECTORY_FILE
    good, bad = trajectory_row(0, 0.0), {**trajectory_row(10, 0.5), "kl": "high"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2: field 'kl' must be a finite number"):
        read_trajectory(path)
    missing = {k: v for k, v in trajectory_row(10, 0.5).items() if k != "checkpoint"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(missing) + "\n")
    with pytest.raises(ValueError, match=":2: field 'checkpoint' is missing"):
        read_trajectory(path)
    # a step logged twice (a resumed run) keeps its last row; rows come out by step; null diversity figures are nan
    again = {**trajectory_row(0, 0.0), "self_bleu": None, "judge_reward": None}
    path.write_text("".join(json.dumps(r) + "\n" for r in (trajectory_row(10, 0.5), good, again)))
    rows = read_trajectory(path)
    assert [r["step"] for r in rows] == [0, 10] and math.isnan(rows[0]["self_bleu"]) and rows[0]["judge_reward"] is None


def test_matched_kl_is_the_largest_every_run_reached_and_each_run_is_bracketed_where_it_first_got_there(tmp_path):
    make_run_folder(tmp_path, "density", 0, [0.0, 1.0, 0.5, 2.0])  # KL need not rise monotonically
    make_run_folder(tmp_path, "uniform", 0, [0.0, 0.4, 0.8, 1.2])
    make_run_folder(tmp_path, "uniform", 1, [0.0, 0.8, 1.6, 2.4])
    runs = load_runs([str(tmp_path / n) for n in ("grpo_density", "grpo_baseline", "grpo_baseline_s1")])
    target, how = kl_target(runs)
    assert target == 1.2 and "grpo_baseline" in how  # the maximum of the run that moved least
    density, baseline, baseline_s1 = (bracket(r, target) for r in runs)
    assert [(p["step"], p["kl"]) for p in bracket(runs[0], 0.8)] == [(0, 0.0), (10, 1.0)]  # first crossing, not (20, 30)
    assert [(p["step"], p["kl"]) for p in density] == [(20, 0.5), (30, 2.0)]  # 1.2 is first reached after step 20
    assert [(p["step"], p["kl"]) for p in baseline] == [(30, 1.2)]  # at the target: one checkpoint, no interpolation
    assert [(p["step"], p["kl"]) for p in baseline_s1] == [(10, 0.8), (20, 1.6)]
    assert baseline_s1[0]["checkpoint"] == tmp_path / "grpo_baseline_s1" / "traj" / "step_000010.pt"
    assert kl_target(runs, budget=0.5) == (0.5, "--kl_budget")
    with pytest.raises(ValueError, match=r"--kl_budget=2 is beyond what these runs reached: grpo_baseline at most 1.2"):
        kl_target(runs, budget=2.0)
    (tmp_path / "grpo_baseline_s1" / "traj" / "step_000020.pt").unlink()
    with pytest.raises(FileNotFoundError, match="names traj/step_000020.pt for step 20, which does not exist"):
        bracket(runs[2], target)


# -----------------------------------------------------------------------------
# Contrasts and the alarm

def test_a_verdict_on_the_sampler_needs_two_runs_per_arm():
    rng = np.random.default_rng(0)
    settings = {"n_resamples": 1000, "confidence": 0.95, "alpha": 0.05, "seed": 0}
    shared = rng.normal(size=40)
    density = shared + 1.0 + rng.normal(0, 0.3, (3, 40))
    uniform = shared + rng.normal(0, 0.3, (3, 40))
    result = arm_contrast(density, uniform, "higher", settings)
    expected = ps.hierarchical_bootstrap(density, uniform, n_resamples=1000, seed=0)
    assert result["method"] == "seeds then prompts" and result["diff"] == pytest.approx(expected["diff"])
    assert result["ci"] == pytest.approx(expected["ci"]) and result["verdict"] == ps.SUPPORTED
    assert arm_contrast(density, uniform, "lower", settings)["verdict"] == ps.CONTRADICTED
    one = arm_contrast(density[:1], uniform, "higher", settings)
    assert one["method"] == "prompts only" and one["verdict"] == ONE_SEED and one["seeds"] == [1, 3]
    with_nan = density.copy()
    with_nan[1, 5] = np.nan  # a prompt undefined in one run drops out of every run's values
    assert arm_contrast(with_nan, uniform, "higher", settings)["n_dropped"] == 1


def test_the_collapse_alarm_fires_below_80_percent_of_sfts_across_prompt_distance():
    sft = {"across_prompt_distance": [0.4, 0.6], "distinct_2": [0.8, 0.8]}  # SFT's mean: 0.5

    def point(across):
        return {"raw_means": {"run": {"across_prompt_distance": across, "distinct_2": 0.8}}}

    for across, fires in ((0.39, True), (0.399, True), (0.401, False), (0.45, False), (0.6, False)):
        alarm = collapse_alarm(sft, {"endpoint": point(across)})
        assert alarm["runs"]["run"]["fires"] == fires and alarm["fired"] == (["run"] if fires else []), across
        assert alarm["runs"]["run"]["endpoint"]["ratio"] == pytest.approx(across / 0.5)
    # either point counts: collapsed at matched KL, recovered by the end
    assert collapse_alarm(sft, {"matched_kl": point(0.3), "endpoint": point(0.5)})["fired"] == ["run"]


# -----------------------------------------------------------------------------
# The report on synthetic runs

def detail_results(inputs: dict) -> dict:
    """The seed-0 detail of the synthetic runs: sft, grpo_baseline as baseline, grpo_density as density."""
    source = {"sft": "sft", "baseline": "grpo_baseline", "density": "grpo_density"}

    def remap(by_label):
        return {label: by_label[name] for label, name in source.items()}

    truncated = {label: [[False] * len(row) for row in inputs["texts"]["sft"]] for label in source}
    return evaluate(list(source), remap(inputs["texts"]), remap(inputs["token_ids"]), truncated,
                    remap(inputs["embeddings"]), None, 1000, n_resamples=200, corpus_resamples=20,
                    judge_rewards=remap(inputs["judge"]))


def synthetic_report(tmp_path, seeds, **kwargs) -> tuple[str, dict, dict]:
    part, inputs, tables = arms_context(tmp_path, seeds, **kwargs)
    context = report_context(["sft", "baseline", "density"], seed_part=part, reward_model="none")
    return render_markdown(detail_results(inputs), context, PLOTS), context, tables


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory):
    """3 density, 3 uniform and 1 shuffled run; the density arm writes from a larger vocabulary (more distinct bigrams)."""
    return synthetic_report(tmp_path_factory.mktemp("three_seeds"), {"density": 3, "uniform": 3, "shuffled": 1},
                            vocab={"density": 200, "uniform": 6})


def test_sections_come_in_order_with_the_primary_metric_named_before_any_result(three_seeds):
    markdown, _, _ = three_seeds
    assert re.findall(r"^## (.+)$", markdown, flags=re.MULTILINE) == SECTIONS
    primary = METRIC_BY_NAME[PRIMARY_METRIC].label
    first_result = markdown.index("\n## ")
    preamble = markdown[:first_result]
    assert f"primary metric **{primary}** (`{PRIMARY_METRIC}`" in preamble and "Pre-registered analysis" in preamble
    assert all(METRIC_BY_NAME[m].label in preamble for m in SECONDARY_METRICS)
    assert re.search(r"\d\.\d|\d%", preamble) is None  # no figure yet
    assert f"pre-registered primary metric: **{primary}**" in section_of(markdown, "Setup")
    assert "# Detail: the final models of seed index 0" in markdown  # the seed-0 detail comes after every arm section


def test_the_density_arm_with_more_distinct_bigrams_is_supported_over_seeds_then_prompts(three_seeds):
    markdown, context, _ = three_seeds
    primary = context["arms"]["matched_kl"]["primary"]
    assert primary["seeds"] == [3, 3] and primary["method"] == "seeds then prompts" and primary["df"] == 4
    assert primary["diff"] > 0 and primary["ci"][0] > 0 and primary["verdict"] == ps.SUPPORTED
    verdict = section_of(markdown, "Verdict")
    assert verdict.startswith("**Primary (pre-registered): supported.** Distinct-2 at a common length at matched KL")
    assert "cannot separate the sampler from seed noise" not in verdict
    assert "- At the endpoints (second): supported" in verdict


def test_matched_kl_uses_the_common_target_and_interpolates_every_prompt(three_seeds):
    markdown, context, tables = three_seeds
    matched = context["matched"]
    kls = {run["name"]: [p["kl"] for p in run["trajectory"]] for run in context["runs"]}
    assert matched["target"] == pytest.approx(min(max(k) for k in kls.values()))  # grpo_density_s2 moved least
    section = section_of(markdown, "Matched KL: primary contrast and noise floor")
    assert f"KL target: **{matched['target']:.4g} nats** (the largest KL every run reached" in section
    values = context["arms"]["matched_kl"]["values"]
    for name, points in matched["points"].items():
        if len(points) == 1:  # exactly at the target
            assert points[0]["kl"] == matched["target"]
            np.testing.assert_allclose(values[name]["judge_reward"], tables[points[0]["label"]]["judge_reward"])
            continue
        before, after = points
        assert before["kl"] < matched["target"] <= after["kl"]
        weight = (matched["target"] - before["kl"]) / (after["kl"] - before["kl"])
        expected = ((1 - weight) * np.array(tables[before["label"]]["judge_reward"])
                    + weight * np.array(tables[after["label"]]["judge_reward"]))
        np.testing.assert_allclose(values[name]["judge_reward"], expected)  # prompt by prompt
        assert f"| {name} | " in section and f"| step {before['step']} | {before['kl']:.4g} | step {after['step']} |" in section
    assert sum(len(points) == 2 for points in matched["points"].values()) >= 5  # interpolation is the common case here


def test_the_noise_floor_rows_stand_beside_the_primary_contrast(three_seeds):
    markdown, context, _ = three_seeds
    section = section_of(markdown, "Matched KL: primary contrast and noise floor")
    rows = [line for line in section.splitlines() if line.startswith("| ") and " - " in line.split("|")[1]]
    names = [row.split("|")[1].strip() for row in rows]
    assert names[0] == "**density - uniform (primary)**"
    floor = [row for row in rows if "noise floor: same sampler, other seed" in row]
    assert [row.split("|")[1].strip() for row in floor] == ["grpo_baseline - grpo_baseline_s1",
                                                            "grpo_baseline - grpo_baseline_s2",
                                                            "grpo_baseline_s1 - grpo_baseline_s2"]
    assert {"density - shuffled", "shuffled - uniform", "grpo_density_s2 - grpo_baseline_s2"} <= set(names)
    largest = context["arms"]["matched_kl"]["largest_noise_floor"]
    assert largest == max(abs(r["diff"]) for r in context["arms"]["matched_kl"]["noise_floor"])
    assert "- Noise floor: two uniform runs that differ only in their seed differ by up to" in section_of(markdown, "Verdict")


def test_the_collapse_alarm_opens_the_report_when_a_run_collapses(tmp_path):
    markdown, context, _ = synthetic_report(tmp_path / "a", {"density": 2, "uniform": 2},
                                            collapse={"grpo_baseline_s1": 0.97})
    alarm = section_of(markdown, "Collapse alarm")
    assert alarm.lstrip().startswith("**COLLAPSE ALARM: grpo_baseline_s1: across-prompt embedding distance more than 20% "
                                     "below SFT's")
    assert context["alarm"]["fired"] == ["grpo_baseline_s1"]
    assert "| grpo_baseline_s1 | uniform |" in alarm and alarm.count("**ALARM**") == 1
    calm, context, _ = synthetic_report(tmp_path / "b", {"density": 2, "uniform": 2})
    assert context["alarm"]["fired"] == [] and "No alarm" in section_of(calm, "Collapse alarm")
    assert markdown.index("## Collapse alarm") < markdown.index("## Verdict")


def test_one_seed_per_arm_says_plainly_it_cannot_separate_the_sampler_from_seed_noise(tmp_path):
    markdown, context, _ = synthetic_report(tmp_path / "one", {"density": 1, "uniform": 1}, vocab={"density": 200, "uniform": 6})
    verdict = section_of(markdown, "Verdict")
    assert "**One seed per arm: this report cannot separate the sampler from seed noise.**" in verdict
    assert context["arms"]["matched_kl"]["primary"]["verdict"] == ONE_SEED
    assert f"**Primary (pre-registered): {ONE_SEED}.**" in verdict
    assert "- Noise floor: not measured (it needs 2 uniform runs)." in verdict
    two, _, _ = synthetic_report(tmp_path / "two", {"density": 2, "uniform": 2})
    assert "cannot separate the sampler from seed noise" not in section_of(two, "Verdict")


def test_without_trajectories_the_endpoints_decide_and_the_report_says_so(tmp_path):
    markdown, context, _ = synthetic_report(tmp_path, {"density": 2, "uniform": 2}, trajectories=False)
    assert not context["matched"]["available"] and "matched_kl" not in context["arms"]
    verdict = section_of(markdown, "Verdict")
    assert verdict.lstrip().startswith("**The matched-KL comparison could not run (no trajectory for grpo_density")
    assert "at the endpoints" in verdict and "- At the endpoints (second)" not in verdict
    assert section_of(markdown, "Matched KL: primary contrast and noise floor").strip().startswith("Not available: no trajectory")
    assert "**Without a matched-KL comparison this is the report's verdict**" in section_of(markdown, "Endpoints")


def test_draws_and_density_quintiles_per_arm(three_seeds):
    markdown, _, _ = three_seeds
    section = section_of(markdown, "What the samplers drew")
    assert "| grpo_density | density | 100 | 60 | 50 | 30% | 25% | 20% | 15% | 10% |" in section
    assert "| source | density | uniform | shuffled |" in section and "| hh-rlhf | 60.0% | 55.0% | 55.0% |" in section
    quintiles = section_of(markdown, "Effects by prompt density quintile")
    assert all(f"| Q{q}" in quintiles for q in range(1, 6)) and "| Q1 (rarest) | 3 |" in quintiles


# -----------------------------------------------------------------------------
# End to end: tiny models, 2 seeds per arm, trajectories, an independent judge

TEXT = ("The quick brown fox \u2014 it's not just quick, it's clever \u2014 jumps over the lazy dog. "
        "Not only does it jump but also it runs \u2013 fast. ") * 40 + "".join(f"token{i} word{i % 7} " for i in range(300))


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("arms")
    base, outs, data = root / "base", root / "outs", root / "cache" / "data"
    tokenizer = Tokenizer.train_from_iterator(iter([TEXT]), vocab_size=320)
    tokenizer.save(base / "tok")
    vocab = tokenizer.get_vocab_size()
    sft = tiny_model(vocab, seed=0)
    save_checkpoint(outs / "sft", 5, sft, [], meta={"model_config": asdict(sft.config)}, final=True)
    write_reward_model(outs / "rm", tokenizer, seed=7, role="policy", accuracy=0.65)
    write_reward_model(outs / "rm_judge", tokenizer, seed=8, role="judge", accuracy=0.6)
    steps = [0, 5, 10]
    for arm, i, kls in (("density", 0, [0.0, 0.3, 0.9]), ("density", 1, [0.0, 0.5, 0.7]),
                        ("uniform", 0, [0.0, 0.2, 0.8]), ("uniform", 1, [0.0, 0.6, 1.1])):
        write_run(outs, arm, i, kls, steps, vocab, model_seed=10 * (arm == "density") + i + 1)
    data.mkdir(parents=True)
    rows = []
    for i in range(24):
        messages = [{"role": "user", "content": f"Tell me about topic {i}: the fox \u2014 and the dog."}]
        rows.append({"id": prompt_id(messages), "prefix": {"messages": messages}, "src": ["hh-rlhf", "ultrafeedback"][i % 2],
                     "n_pairs": 1, "split": "test" if i < 20 else "train"})
    (data / "prompts_all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    splits = [r["split"] for r in rows]
    log_density = np.linspace(-3, 0, len(rows))
    weights = np.where(np.array(splits) == "train", np.exp(-log_density), 0.0)
    KatData(data).save_prompt_weights([r["id"] for r in rows], splits, log_density, np.full(len(rows), 0.9),
                                      weights / weights.sum(), {"flags": {"beta": 1.0, "k": 3}})
    return {"base": base, "outs": outs, "cache": root / "cache", "test_ids": [r["id"] for r in rows if r["split"] == "test"]}


def test_eval_diversity_compares_seeded_arms_at_matched_kl_end_to_end(seeded_runs, monkeypatch):
    for name, key in (("NANOCHAT_BASE_DIR", "base"), ("NANOCHAT_OUTS_DIR", "outs"), ("NANOCHAT_KAT_CACHE", "cache")):
        monkeypatch.setenv(name, str(seeded_runs[key]))
    written = eval_diversity.main(["--num_prompts=8", "--num_samples=2", "--max_tokens=10", "--batch_size=4",
                                   "--num_resamples=200", "--num_corpus_resamples=20", "--device_type=cpu",
                                   "--max_prompt_tokens=100", "--seed=1"])
    report = written["report"].read_text(encoding="utf-8")
    assert re.findall(r"^## (.+)$", report, flags=re.MULTILINE) == SECTIONS
    context = json.loads(written["json"].read_text(encoding="utf-8"))["context"]

    # the final half of the test prompts, never the dev half GRPO's trajectories use
    ids = context["prompts"]["ids"]
    assert len(ids) == 8 and all(held_out_part(pid) == "final" for pid in ids) and set(ids) <= set(seeded_runs["test_ids"])

    # matched KL: the largest every run reached (0.7, grpo_density_s1's last point), each run bracketed there
    matched = context["matched"]
    assert matched["available"] and matched["target"] == pytest.approx(0.7)
    assert {name: [p["step"] for p in points] for name, points in matched["points"].items()} == {
        "grpo_density": [5, 10], "grpo_density_s1": [10], "grpo_baseline": [5, 10], "grpo_baseline_s1": [5, 10]}
    # every bracket checkpoint was sampled, and its per-prompt judge rewards interpolate to the run's matched values
    tables, values = context["tables"], context["arms"]["matched_kl"]["values"]
    before, after = matched["points"]["grpo_baseline"]
    weight = (0.7 - 0.2) / (0.8 - 0.2)
    np.testing.assert_allclose(values["grpo_baseline"]["judge_reward"],
                               (1 - weight) * np.array(tables[before["label"]]["judge_reward"])
                               + weight * np.array(tables[after["label"]]["judge_reward"]))
    assert set(context["evaluated"]) == {"sft", "grpo_density", "grpo_density_s1", "grpo_baseline", "grpo_baseline_s1",
                                         "grpo_density@step5", "grpo_density@step10", "grpo_density_s1@step10",
                                         "grpo_baseline@step5", "grpo_baseline@step10", "grpo_baseline_s1@step5",
                                         "grpo_baseline_s1@step10"}
    assert context["evaluated"]["grpo_baseline@step5"]["step"] == 5

    primary = context["arms"]["matched_kl"]["primary"]
    assert primary["seeds"] == [2, 2] and primary["method"] == "seeds then prompts"
    assert len(context["arms"]["matched_kl"]["noise_floor"]) == 1
    assert "judge_reward" in context["arms"]["matched_kl"]["quality"] and "reward" in context["arms"]["matched_kl"]["quality"]
    assert "cannot separate the sampler from seed noise" not in section_of(report, "Verdict")
    for name in ("frontiers", "overoptimisation"):
        assert written[name].stat().st_size > 1000 and f"]({written[name].name})" in report
    rm_eval = section_of(report, "RM held-out accuracy by density quintile")
    assert "**Judge**, from" in rm_eval and "accuracy 0.6," in rm_eval and "accuracy 0.65," in rm_eval
    samples = written["samples"].read_text(encoding="utf-8").splitlines()
    assert len(samples) == 8 * 5 * 2  # SFT and each run's final model
    card = (seeded_runs["base"] / "report" / "diversity_report.md").read_text(encoding="utf-8")
    assert "primary verdict (pre-registered)" in card and "noise floor (uniform vs uniform)" in card


def test_a_missing_judge_stops_the_evaluation_before_sampling(seeded_runs, monkeypatch):
    for name, key in (("NANOCHAT_BASE_DIR", "base"), ("NANOCHAT_OUTS_DIR", "outs"), ("NANOCHAT_KAT_CACHE", "cache")):
        monkeypatch.setenv(name, str(seeded_runs[key]))
    monkeypatch.setattr(eval_diversity, "sample_all", lambda *a, **k: pytest.fail("sampled before finding the judge"))
    with pytest.raises(SystemExit, match=r"python -m scripts.train_rm --role=judge, or pass --judge= "):
        eval_diversity.main(["--judge=rm_judge_missing", "--device_type=cpu"])
    with pytest.raises(SystemExit, match="--kl_budget=5 is beyond what these runs reached"):
        eval_diversity.main(["--kl_budget=5", "--device_type=cpu"])
