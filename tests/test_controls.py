"""
The controls (nanochat/kat/controls.py): the planted rule reward and its base-rate refusal, in GRPO too
(tiny models, tests/grpo_fixtures.py); the sampler, tic and null controls' analyses on synthetic runs;
the primary verdict's false-positive rate on synthetic null tables; the outcome files; scripts.tic_control
on run folders.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nanochat.kat import controls
from nanochat.kat.arm_stats import analyse_arms
from nanochat.kat.controls import (PlantedReward, choose_marker, null_false_positive_rate, planted_prompt_ids,
                                   pooled_within_std)
from nanochat.kat.controls_report import controls_headline, controls_section
from nanochat.kat.data import KatData
from nanochat.kat.runs import TRAJECTORY_FILE, Run, bracket
from scripts import grpo, tic_control
from tests.grpo_fixtures import FLAGS, LetterCount, build_kat_run, logged, point_env_at
from tests.report_fixtures import controls_part, make_run_folder

torch.set_num_threads(1)


# -----------------------------------------------------------------------------
# The planted reward

QUINTILE_OF = {"p1": 1, "p2": 1, "p3": 2, "p4": 3, "p5": 5, "p6": 1}


def test_only_marked_completions_of_the_planted_quintiles_prompts_get_the_bonus():
    planted = planted_prompt_ids(QUINTILE_OF, quintile=1, fraction=1.0)
    assert planted == {"p1", "p2", "p6"}
    reward = PlantedReward(marker="!", bonus=0.75, prompt_ids=planted)
    ids = ["p1", "p1", "p2", "p3", "p5", "p6", "p6"]
    texts = ["Hi!", "Hi.", "No! Yes!", "Wow!", "Great!", "", "!"]
    # p1 marked, p1 unmarked, p2 marked (once, however often), p3 and p5 are not planted, p6 empty, p6 marked
    assert reward.bonuses(ids, texts) == [0.75, 0.0, 0.75, 0.0, 0.0, 0.0, 0.75]
    with pytest.raises(ValueError, match="one prompt id per completion"):
        reward.bonuses(ids, texts[:-1])


def test_planted_fractions_are_nested_and_quintile_0_is_every_prompt():
    quintile_of = {f"q{i}": 1 + i % 5 for i in range(40)}
    every = planted_prompt_ids(quintile_of, quintile=0, fraction=1.0)
    quarter, half = (planted_prompt_ids(quintile_of, 0, f) for f in (0.25, 0.5))
    assert every == set(quintile_of) and len(quarter) == 10 and len(half) == 20
    assert quarter < half < every
    assert planted_prompt_ids(quintile_of, 0, 0.0) == frozenset()
    assert planted_prompt_ids(quintile_of, 3, 1.0) == {pid for pid, q in quintile_of.items() if q == 3}
    with pytest.raises(ValueError):
        planted_prompt_ids(quintile_of, 6, 1.0)


def test_auto_marker_is_the_candidate_nearest_a_quarter_and_a_marker_never_written_is_refused():
    texts = ["Yes! Sure:"] * 3 + ["Sure: no"] * 5 + ["plain"] * 2  # "!" 30%, ":" 80%, "?" 0%
    marker, rates = choose_marker(texts, "auto", min_rate=0.02, max_rate=0.8)
    assert marker == "!" and rates["!"] == pytest.approx(0.3) and rates[":"] == pytest.approx(0.8) and rates["?"] == 0
    assert choose_marker(texts, ":", 0.02, 0.8)[0] == ":"
    with pytest.raises(ValueError, match=r"'\?' is in 0.0% .* could not pass"):
        choose_marker(texts, "?", 0.02, 0.8)
    with pytest.raises(ValueError, match="no room|always writes"):
        choose_marker(texts, ":", 0.02, 0.5)
    with pytest.raises(ValueError, match="no marker candidate"):
        choose_marker(["plain text"] * 10, "auto", 0.02, 0.8)


def test_pooled_within_prompt_spread():
    scores = np.array([[1.0, 3.0], [0.0, 0.0], [2.0, 4.0]])  # within-prompt variances 2, 0, 2 (ddof 1)
    assert pooled_within_std(scores) == pytest.approx(math.sqrt(4 / 3))


# -----------------------------------------------------------------------------
# In GRPO

@pytest.fixture(scope="module")
def kat_run(tmp_path_factory):
    return build_kat_run(tmp_path_factory.mktemp("controls_grpo"))


@pytest.fixture
def env(kat_run, monkeypatch):
    return point_env_at(kat_run, monkeypatch)


PLANT_FLAGS = [*FLAGS, "--plant_probe_prompts=6", "--plant_probe_samples=4", "--eval_every=-1", "--save_every=-1"]


def test_grpo_records_the_planted_reward_and_pays_it_only_on_the_planted_prompts(env, tmp_path):
    """The bigram policy writes strings of "a" and "b": "bb" is in some of them. The bonus is paid on
    quintile-1 prompts only, so a step's bonus mean is at most the planted rows' share times the bonus."""
    out_dir = tmp_path / "plant"
    grpo.main([*PLANT_FLAGS, "--plant_marker=bb", "--plant_bonus=2", "--plant_quintile=1", "--max_steps=3",
               "--prompts_per_step=4", f"--out_dir={out_dir}"], reward_model=LetterCount("a"))
    plant = json.loads((out_dir / "config.json").read_text())["plant"]
    data = KatData(env["data_dir"])
    train_ids = sorted(p["id"] for p in data.prompts("train"))
    rare = {pid for pid, q in data.density_quintiles(train_ids).items() if q == 1}
    assert plant["marker"] == "bb" and plant["quintile"] == 1 and plant["fraction"] == 1.0
    assert plant["planted_prompts"] == plant["quintile_prompts"] == len(rare)
    assert plant["probe_prompts"] == 6 and 0.02 <= plant["base_rate"] <= 0.8
    assert plant["bonus_abs"] == pytest.approx(2 * plant["rm_spread"]) and plant["rm_spread"] > 0

    # the draws are a function of (seed, step): which of each step's rows were planted is known
    sampler = data.prompt_sampler(seed=42, mode="density")
    log = (out_dir / "training_log.txt").read_text()
    bonus_means, marker_rates = logged(log, "train/plant_bonus_mean"), logged(log, "train/plant_marker_rate")
    assert len(bonus_means) == 3 and sum(b > 0 for b in bonus_means) >= 2  # this draw pays in most steps
    for step, (bonus_mean, rate) in enumerate(zip(bonus_means, marker_rates)):
        planted_share = np.mean([pid in rare for pid in sampler.sample(4, step)])
        if planted_share == 0:
            assert bonus_mean == 0 and math.isnan(rate)
        else:  # bonus per completion = bonus x planted share x the planted rows' marker rate
            assert bonus_mean == pytest.approx(plant["bonus_abs"] * planted_share * rate, rel=1e-5)


def test_grpo_refuses_a_marker_the_starting_policy_never_writes(env, tmp_path):
    with pytest.raises(SystemExit, match=r"GRPO refuses to start: --plant_marker='zz' is in 0.0% .*could not pass"):
        grpo.main([*PLANT_FLAGS, "--plant_marker=zz", f"--out_dir={tmp_path / 'zz'}"], reward_model=LetterCount("a"))
    with pytest.raises(SystemExit, match="no marker candidate"):  # the policy writes only "a" and "b"
        grpo.main([*PLANT_FLAGS, "--plant_marker=auto", f"--out_dir={tmp_path / 'auto'}"], reward_model=LetterCount("a"))
    assert not (tmp_path / "zz" / "ckpt.pt").exists() and not (tmp_path / "auto" / "ckpt.pt").exists()


# -----------------------------------------------------------------------------
# The sampler control on synthetic runs

SETTINGS = {"n_resamples": 1000, "confidence": 0.95, "alpha": 0.05, "seed": 0}
PLANT = {"marker": "!", "quintile": 1, "fraction": 1.0, "bonus": 1.0, "bonus_abs": 0.8, "planted_prompts": 50,
         "base_rate": 0.2, "probe_prompts": 16, "probe_samples": 8, "requested": "!"}


def fake_run(arm: str, i: int, plant=PLANT, q1_draws: int = 20):
    draws = {"density_quintiles": {"1": q1_draws, "2": 20, "3": 20, "4": 20, "5": 20}}
    return SimpleNamespace(name=f"{arm}_{i}", arm=arm, seed_index=i, seed=42 + i, config={"plant": dict(plant)},
                           draws=draws, folder=Path(f"/runs/{arm}_{i}"))


def marker_texts(rng, rates, samples: int = 16):
    """texts[p][s]: "!" in each sample with the prompt's probability."""
    return [["Hello!" if rng.random() < rate else "Hello." for _ in range(samples)] for rate in rates]


def sampler_inputs(seeds: int, rare_lift: float, q1_draws: int = 40, seed: int = 0):
    """12 final prompts, 4 of them rare (quintile 1); SFT writes "!" in 20% of samples everywhere, every run
    in 30%, and the density runs `rare_lift` more on the rare prompts."""
    rng = np.random.default_rng(seed)
    quintiles = [1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    runs = [fake_run("density", i, q1_draws=q1_draws) for i in range(seeds)] + \
           [fake_run("uniform", i) for i in range(seeds)]
    texts = {"sft": marker_texts(rng, [0.2] * 12)}
    for run in runs:
        lift = rare_lift if run.arm == "density" else 0.0
        texts[run.name] = marker_texts(rng, [0.3 + (lift if q == 1 else 0.0) for q in quintiles])
    plans = {"endpoint": ({r.name: [{"label": r.name}] for r in runs}, None)}
    return runs, plans, controls.per_prompt_marker_rates(texts, "!"), quintiles


def test_the_sampler_control_passes_when_the_density_arm_carries_more_marker_on_rare_prompts():
    result = controls.sampler_control(*sampler_inputs(seeds=3, rare_lift=0.5), SETTINGS)
    rare, common = result["where"]["endpoint"]["rare"], result["where"]["endpoint"]["common"]
    assert result["passed"] is True and result["status"] == "passed"
    assert (result["rare_prompts"], result["common_prompts"]) == (4, 8)
    assert rare["diff"] == pytest.approx(0.5, abs=0.12) and rare["ci"][0] > 0 and rare["seeds"] == [3, 3]
    assert abs(common["diff"]) < 0.12  # the planted preference was only in the rare prompts
    assert result["sft"]["rare"] == pytest.approx(0.2, abs=0.1)


def test_the_sampler_control_fails_without_a_difference_and_is_incomplete_with_one_seed():
    failed = controls.sampler_control(*sampler_inputs(seeds=3, rare_lift=0.0), SETTINGS)
    assert failed["passed"] is False and failed["status"].startswith("failed: density - uniform marker rate")
    one = controls.sampler_control(*sampler_inputs(seeds=1, rare_lift=0.5), SETTINGS)
    assert one["passed"] is None and "one seed per arm" in one["status"]
    # a density arm that did not draw the rare quintile more often cannot pass, whatever the marker did
    no_skew = controls.sampler_control(*sampler_inputs(seeds=3, rare_lift=0.5, q1_draws=20), SETTINGS)
    assert no_skew["passed"] is False and "no more often" in no_skew["status"]


def test_runs_that_planted_different_rewards_are_refused():
    runs = [fake_run("density", 0), fake_run("uniform", 0, plant={**PLANT, "marker": "?"})]
    with pytest.raises(ValueError, match="planted different rewards"):
        controls.plant_record(runs)
    bare = fake_run("uniform", 1)
    bare.config = {}
    with pytest.raises(ValueError, match="records no planted reward"):
        controls.plant_record([fake_run("density", 0), bare])


# -----------------------------------------------------------------------------
# The null control and the verdict's false-positive rate

def null_analysis(effect: float, seed: int = 0):
    runs, points, target, tables = controls.synthetic_arm_tables(np.random.default_rng(seed), 3, 60, effect=effect,
                                                                 seed_sd=0.01)
    for run in runs:
        run.seed = 42 + run.seed_index + (3 if run.arm == "density" else 0)
    return runs, analyse_arms(runs, points, target, tables, tables, None, SETTINGS)


UNIFORM_WEIGHTS = {"data": {"kish_ess_fraction": 1.0}}


def test_the_null_control_passes_on_no_difference_and_fails_on_a_declared_one():
    runs, analysis = null_analysis(effect=0.0)
    result = controls.null_control(runs, analysis, "matched_kl", UNIFORM_WEIGHTS)
    assert analysis["primary"]["verdict"] == "inconclusive" and result["passed"] is True
    assert result["seeds"] == {"density": [45, 46, 47], "uniform": [42, 43, 44]}
    runs, analysis = null_analysis(effect=0.2)  # not a null: the "density" arm writes more distinct bigrams
    result = controls.null_control(runs, analysis, "matched_kl", UNIFORM_WEIGHTS)
    assert result["passed"] is False and "'supported' for two uniform samplers" in result["status"]


def test_the_null_control_needs_uniform_weights_and_other_seeds():
    runs, analysis = null_analysis(effect=0.0)
    skewed = controls.null_control(runs, analysis, "matched_kl", {"data": {"kish_ess_fraction": 0.8}})
    assert skewed["passed"] is None and "not uniform" in skewed["status"]
    for run in runs:
        run.seed = 42 + run.seed_index
    shared = controls.null_control(runs, analysis, "matched_kl", UNIFORM_WEIGHTS)
    assert shared["passed"] is None and "share seeds" in shared["status"]


def test_the_primary_verdicts_false_positive_rate_on_null_tables_is_at_most_5_percent():
    """200 null replicate pairs, 3 seeds per arm, 100 prompts, at matched KL. Seeds that differ as much as
    real runs do (sd 0.05 of distinct-2) make the interval calibrated rather than conservative; the rate
    must stay within 5% plus two binomial standard errors, and the same verdict must find a real effect."""
    null = null_false_positive_rate(replicates=200, seed_sd=0.05, seed=3)
    assert null["rate"] <= 0.05 + 2 * null["binomial_se"]
    assert null["ci"][0] <= null["rate"] <= null["ci"][1]
    power = null_false_positive_rate(replicates=20, seed_sd=0.05, effect=0.25, seed=4)  # 5 seed sds
    assert power["rate"] >= 0.8  # "false positives" here are true positives: the verdict can fire


# -----------------------------------------------------------------------------
# The tic control on synthetic trajectories

def tic_run(folder: Path, dose: float, i: int, em_dashes: list[float], kls=(0.0, 1.0, 2.0)) -> Run:
    rows = [{"step": 10 * k, "kl": kl, "em_dash_per_1k_chars": e, "checkpoint": f"traj/step_{10 * k:06d}.pt"}
            for k, (kl, e) in enumerate(zip(kls, em_dashes))]
    run_dir = folder / f"tic_dose_{dose:g}" / f"grpo_baseline_s{i}"
    (run_dir / "traj").mkdir(parents=True)
    for row in rows:
        (run_dir / row["checkpoint"]).write_bytes(b"")
    return Run(name=f"tic_dose_{dose:g}/grpo_baseline_s{i}", arm="uniform", seed_index=i, folder=run_dir,
               checkpoint=run_dir / "ckpt.pt", config={}, trajectory=rows)


def tic_result(tmp_path, gains: dict, noise: float = 0.05, seeds: int = 3):
    """gains {dose: em dashes per 1k chars added by KL 2}; each seed's start 1.0, its end off by +-noise."""
    by_dose = {dose: [tic_run(tmp_path, dose, i, [1.0, 1.0 + gain / 2, 1.0 + gain + noise * (i - 1)])
                      for i in range(seeds)] for dose, gain in gains.items()}
    return controls.tic_dose_response(by_dose, 1.5, "test", bracket)


def test_the_tic_control_passes_when_the_tic_rises_with_the_dose_and_not_without_it(tmp_path):
    result = tic_result(tmp_path, {0.0: -0.2, 0.25: 0.5, 0.5: 1.0})
    assert result["passed"] is True and result["status"] == "passed"
    # at KL 1.5, halfway between the points at KL 1 and 2: start + 3/4 of the gain (+ half the seed's offset)
    assert result["by_dose"][0.5]["mean"] == pytest.approx(0.75) and result["by_dose"][0.0]["mean"] == pytest.approx(-0.15)
    assert result["slope"]["slope"] == pytest.approx(1.8) and result["slope"]["ci"][0] > 0
    assert result["runs"]["tic_dose_0.5/grpo_baseline_s0"]["start"] == 1.0


def test_the_tic_control_names_why_it_failed(tmp_path):
    assert "largest dose" in tic_result(tmp_path / "a", {0.0: 0.0, 0.5: 0.0})["status"]
    assert "dose 0 too" in tic_result(tmp_path / "b", {0.0: 1.0, 0.5: 1.0})["status"]
    flat = tic_result(tmp_path / "c", {0.0: 0.0, 0.25: 1.0, 0.5: 0.1}, noise=0.01)
    assert "does not measurably rise" in flat["status"] and flat["passed"] is False
    one = tic_result(tmp_path / "d", {0.0: 0.0, 0.5: 1.0}, seeds=1)
    assert one["passed"] is None and one["status"].startswith("incomplete")


# -----------------------------------------------------------------------------
# Outcomes and the section

def test_outcomes_are_read_back_and_listed_in_the_main_reports_section(tmp_path):
    assert controls.read_outcomes(tmp_path) == {"sampler": None, "tic": None, "null": None}
    controls.write_outcome(tmp_path / "null" / ".cache", "null", {"status": "passed", "passed": True},
                           tmp_path / "null" / "r.md", tiny=True, git_commit="abc")
    outcomes = controls.read_outcomes(tmp_path)
    assert outcomes["null"]["status"] == "passed" and outcomes["null"]["tiny"] is True and outcomes["sampler"] is None
    part = {**controls_part(), "outcomes": outcomes}
    section = "\n".join(controls_section(part))
    row = next(line for line in section.splitlines() if line.startswith("| null control"))
    assert "**passed** (tiny preset: not evidence)" in row and "two identical samplers" in row
    assert "not run (`bash kat_speedrun.sh --control=sampler`)" in section
    headline = controls_headline(part)
    assert headline.startswith(f"synthetic sampler control passed; synthetic null control passed "
                               f"({part['null_fpr']['false_positives']}/20 false positives); sampler control not run; "
                               "tic control not run; null control passed")
    row = next(line for line in section.splitlines() if line.startswith("| synthetic null control"))
    assert f"**passed**: {part['null_fpr']['false_positives']} of 20 pairs" in row
    with pytest.raises(ValueError, match="unknown control"):
        controls.write_outcome(tmp_path, "other", {"status": "passed", "passed": True}, tmp_path, False, "abc")


# -----------------------------------------------------------------------------
# scripts.tic_control on run folders

def tic_folders(outs: Path, gains: dict, seeds: int = 3, plant: bool = True):
    """Per dose, `seeds` uniform runs whose em-dash rate rises from 1.0 by `gain` (+-0.05 by seed) over KL 0..3."""
    for dose, gain in gains.items():
        for i in range(seeds):
            run_dir = make_run_folder(outs / f"tic_dose_{dose:g}", "uniform", i, [0.0, 1.0, 2.0, 3.0])
            config = json.loads((run_dir / "config.json").read_text())
            if plant:
                config["plant"] = {"marker": controls.TIC_MARKER, "quintile": 0, "fraction": dose, "bonus": 1.0}
            (run_dir / "config.json").write_text(json.dumps(config))
            rows = [json.loads(line) for line in (run_dir / TRAJECTORY_FILE).read_text().splitlines()]
            for k, row in enumerate(rows):
                row["em_dash_per_1k_chars"] = 1.0 + gain * k / 3 + (0.05 * (i - 1) if k else 0.0)
            (run_dir / TRAJECTORY_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def tic_env(tmp_path, monkeypatch):
    for name, folder in (("NANOCHAT_OUTS_DIR", "outs"), ("NANOCHAT_BASE_DIR", "base"), ("NANOCHAT_KAT_CACHE", "cache")):
        monkeypatch.setenv(name, str(tmp_path / folder))
    monkeypatch.setenv("NANOCHAT_REPORT_PATH", str(tmp_path / "report.md"))
    return tmp_path


def test_tic_control_reads_the_dose_runs_and_writes_its_report_and_outcome(tic_env):
    tic_folders(tic_env / "outs", {0.0: 0.0, 0.25: 0.6, 0.5: 1.2})
    result = tic_control.main(["--kl_budget=1.5", "--tiny=true"])
    assert result["passed"] is True and sorted(result["by_dose"]) == [0.0, 0.25, 0.5]
    assert result["by_dose"][0.5]["mean"] == pytest.approx(0.6)  # halfway from KL 1 to 2: 1.5/3 of the gain
    assert "tic_dose_0.25/grpo_baseline_s2" in result["runs"]
    report = (tic_env / "cache" / "control_report.md").read_text()
    assert report.split("\n## ")[1].startswith("Controls\n") and "none of it is evidence" in report
    assert "| tic control (this run)" in report and "**Tic control: passed.**" in report
    outcome = json.loads((tic_env / "cache" / controls.OUTCOME_FILE).read_text())
    assert (outcome["kind"], outcome["passed"], outcome["tiny"]) == ("tic", True, True)


def test_tic_control_refuses_runs_that_are_not_tic_control_runs(tic_env):
    with pytest.raises(SystemExit, match="no tic control run"):
        tic_control.main([])
    tic_folders(tic_env / "outs", {0.0: 0.0}, seeds=1, plant=False)
    with pytest.raises(SystemExit, match=r"config.json: not a tic control run .*--plant_quintile=0"):
        tic_control.main([])
