"""Several seeds per arm (nanochat/kat/stats.py): the hierarchical bootstrap's coverage and false
positives on synthetic runs with known seed and prompt variance, and matched-KL interpolation."""

import numpy as np
import pytest

from nanochat.kat.stats import hierarchical_bootstrap, interpolate_at


def synthetic_arms(rng, effect, seed_sd, seeds=3, prompts=60, interaction_sd=0.3, noise_sd=1.0):
    """Per-prompt values of two arms: a shared prompt effect, an arm x prompt interaction, a per-run
    (seed) offset and per-value noise. The population difference is `effect`."""
    shared = rng.normal(0, 1, prompts)
    arms = []
    for shift in (effect, 0.0):
        arms.append(shift + shared + rng.normal(0, interaction_sd, prompts)
                    + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, noise_sd, (seeds, prompts)))
    return arms


def coverage_and_false_positives(effect, seed_sd, replicates=300):
    rng = np.random.default_rng(1)
    covered = positives = 0
    for r in range(replicates):
        a, b = synthetic_arms(rng, effect, seed_sd)
        result = hierarchical_bootstrap(a, b, n_resamples=1000, seed=r)
        covered += result["ci"][0] <= effect <= result["ci"][1]
        positives += result["p"] < 0.05
    return covered / replicates, positives / replicates


def test_three_seeds_per_arm_cover_the_truth_at_the_nominal_rate():
    """Seeds that differ (sd 1, as much as the per-value noise): 95% intervals cover the true effect
    in 95% of replicates up to binomial error (2.5 standard errors at 300 replicates: +-0.032)."""
    coverage, _ = coverage_and_false_positives(effect=0.7, seed_sd=1.0)
    assert 0.95 - 0.032 <= coverage <= 0.95 + 0.032


def test_null_arms_come_out_significant_about_5_percent_of_the_time():
    _, false_positive_rate = coverage_and_false_positives(effect=0.0, seed_sd=1.0)
    assert false_positive_rate <= 0.05 + 0.032


def test_identical_seeds_make_it_conservative_never_anticonservative():
    """With no seed variance the crossed resampling counts the noise twice: wider, never narrower."""
    coverage, false_positive_rate = coverage_and_false_positives(effect=0.0, seed_sd=0.0, replicates=150)
    assert coverage >= 0.95 and false_positive_rate <= 0.05


def test_a_real_effect_with_seed_noise_is_found():
    rng = np.random.default_rng(5)
    a, b = synthetic_arms(rng, effect=3.0, seed_sd=0.3)
    result = hierarchical_bootstrap(a, b, n_resamples=2000)
    assert result["ci"][0] > 0 and result["p"] < 0.01 and result["df"] == 4
    assert result["diff"] == pytest.approx(a.mean() - b.mean())


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="same prompts"):
        hierarchical_bootstrap(np.zeros((3, 5)), np.zeros((3, 6)))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        hierarchical_bootstrap(np.zeros((1, 5)), np.zeros((3, 5)))


def test_interpolation_between_trajectory_points():
    kls = [0.0, 1.0, 3.0]
    values = np.array([[0.0, 10.0], [1.0, 8.0], [5.0, 0.0]])  # two prompts' metric at each point
    np.testing.assert_allclose(interpolate_at(2.0, kls, values), [3.0, 4.0])
    np.testing.assert_allclose(interpolate_at(1.0, kls, values), [1.0, 8.0])
    np.testing.assert_allclose(interpolate_at(3.0, kls, values), [5.0, 0.0])
    np.testing.assert_allclose(interpolate_at(0.0, kls, values), [0.0, 10.0])
    with pytest.raises(ValueError, match="outside"):
        interpolate_at(3.5, kls, values)  # the run never reached that KL
    with pytest.raises(ValueError, match="increase"):
        interpolate_at(0.5, [0.0, 0.0, 1.0], values)
