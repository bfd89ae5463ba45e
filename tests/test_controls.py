"""
The controls (nanochat/kat/controls.py): the planted rule reward and its base-rate refusal, in GRPO too
(tiny models, tests/grpo_fixtures.py); the sampler, tic and null controls' analyses on synthetic runs;
the primary verdict's false-positive rate on synthetic null tables; the outcome files.
"""

import json
import math

import numpy as np
import pytest
import torch

from nanochat.kat import controls
from nanochat.kat.arm_stats import ONE_SEED
from nanochat.kat.controls import (PlantedReward, choose_marker, null_false_positive_rate, planted_prompt_ids,
                                   pooled_within_std)
from nanochat.kat.data import KatData
from scripts import grpo
from tests.grpo_fixtures import FLAGS, LetterCount, build_kat_run, logged, point_env_at

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
