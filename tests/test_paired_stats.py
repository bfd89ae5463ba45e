"""Paired bootstrap, sign-flip test, effect sizes, length control, Holm, verdicts."""

import numpy as np
import pytest
from scipy import stats

from nanochat.kat import stats as ps


def planted(n=60, effect=-0.5, seed=0):
    """Per-prompt values of two models: B = prompt difficulty + noise, A = B + effect + noise."""
    rng = np.random.default_rng(seed)
    prompt = rng.normal(0, 3, n)  # large between-prompt spread that pairing must cancel
    b = prompt + rng.normal(0, 0.3, n)
    a = b + effect + rng.normal(0, 0.3, n)
    return a, b


def test_planted_effect_is_found():
    a, b = planted()
    result = ps.paired_comparison(a, b, direction="lower", n_resamples=4000, seed=1)
    assert result["p"] < 0.01
    low, high = result["ci"]
    assert low < result["diff"] < high < 0
    assert result["diff"] == pytest.approx(np.mean(a - b))
    assert result["d_z"] == pytest.approx(np.mean(a - b) / np.std(a - b, ddof=1))
    assert result["verdict"] == ps.SUPPORTED
    # the same effect read as "higher is better" is a contradiction, never a support
    assert ps.paired_comparison(a, b, direction="higher", n_resamples=4000)["verdict"] == ps.CONTRADICTED


def test_identical_inputs_report_no_effect():
    a, _ = planted()
    result = ps.paired_comparison(a, a.copy(), direction="lower", n_resamples=2000)
    assert result["p"] == 1.0
    low, high = result["ci"]
    assert low <= 0 <= high
    assert result["verdict"] == ps.INCONCLUSIVE


def test_no_effect_is_mostly_not_significant():
    """Under the null the test rejects at about its level, not more."""
    rejections = 0
    for seed in range(40):
        a, b = planted(n=30, effect=0.0, seed=seed)
        rejections += ps.sign_flip_test(a - b, n_resamples=500, seed=seed) < 0.05
    assert rejections <= 6  # expected 2; binomial(40, 0.05) exceeds 6 with probability < 0.3%


def test_sign_flip_is_exact_for_small_n_and_matches_scipy():
    d = np.array([1.0, 2.0, 3.0, 4.0, -0.5])
    # exact: only the all-positive and all-negative patterns reach |mean| = 1.9 -> 2 of 32... plus ties
    flips = np.array([[1 - 2 * ((k >> i) & 1) for i in range(5)] for k in range(32)])
    expected = np.mean(np.abs(flips @ d) >= abs(d.sum()) - 1e-12)
    assert ps.sign_flip_test(d, n_resamples=10_000) == pytest.approx(expected)
    reference = stats.permutation_test((d,), lambda x: np.mean(x), permutation_type="samples",
                                       alternative="two-sided", n_resamples=10_000).pvalue
    assert ps.sign_flip_test(d, n_resamples=10_000) == pytest.approx(reference)


def test_monte_carlo_p_is_never_zero():
    d = np.full(50, 2.0) + np.linspace(0, 0.1, 50)
    p = ps.sign_flip_test(d, n_resamples=999, seed=3)
    assert p == pytest.approx(1 / 1000)


def test_non_finite_pairs_are_dropped_and_counted():
    a = np.array([1.0, np.nan, 3.0, 4.0])
    b = np.array([0.0, 1.0, np.inf, 2.0])
    result = ps.paired_comparison(a, b, n_resamples=100)
    assert result["n"] == 2 and result["n_dropped"] == 2
    assert result["diff"] == pytest.approx(1.5)
    assert result["verdict"] is None


def test_non_finite_pairs_are_dropped_the_same_way_everywhere():
    """A prompt where either model's value is undefined (self-BLEU with under two texts, say) is
    left out of the raw and the length-adjusted comparison alike: both give exactly what they
    give on the prompts that remain, and count the rest."""
    a, b = planted(n=40, effect=-0.5, seed=2)
    rng = np.random.default_rng(3)
    length_a, length_b = rng.uniform(20, 200, 40), rng.uniform(20, 200, 40)
    a[[1, 7, 20]] = np.nan
    b[[7, 11]] = np.nan
    keep = np.isfinite(a) & np.isfinite(b)
    assert keep.sum() == 36
    raw, raw_kept = (ps.paired_comparison(x, y, direction="lower", n_resamples=2000, seed=5)
                     for x, y in ((a, b), (a[keep], b[keep])))
    assert raw["n"] == 36 and raw["n_dropped"] == 4 and raw_kept["n_dropped"] == 0
    for key in ("diff", "ci", "p", "d_z", "mean_a", "mean_b", "verdict"):
        assert raw[key] == raw_kept[key], key
    adjusted, adjusted_kept = (ps.length_adjusted_comparison(x, y, la, lb, direction="lower", n_resamples=2000, seed=5)
                               for x, y, la, lb in ((a, b, length_a, length_b),
                                                    (a[keep], b[keep], length_a[keep], length_b[keep])))
    assert adjusted["n"] == 36 and adjusted["n_dropped"] == 4
    for key in ("diff", "ci", "p", "slope", "verdict"):
        assert adjusted[key] == adjusted_kept[key], key
    assert raw["verdict"] == adjusted["verdict"] == ps.SUPPORTED


@pytest.mark.parametrize("direction, diff, ci, p, expected", [
    ("lower", -1.0, (-1.5, -0.5), 0.001, ps.SUPPORTED),
    ("lower", 1.0, (0.5, 1.5), 0.001, ps.CONTRADICTED),
    ("higher", 1.0, (0.5, 1.5), 0.001, ps.SUPPORTED),
    ("higher", -1.0, (-1.5, -0.5), 0.001, ps.CONTRADICTED),
    ("lower", -1.0, (-1.5, 0.2), 0.03, ps.INCONCLUSIVE),   # CI touches 0
    ("lower", -1.0, (-1.5, -0.1), 0.07, ps.INCONCLUSIVE),  # CI excludes 0 but p too large for a support
    ("higher", -1.0, (-1.5, -0.1), 0.07, ps.INCONCLUSIVE),  # worse, CI excludes 0, but p too large: symmetric rule
    ("lower", float("nan"), (0.0, 0.0), 1.0, ps.INCONCLUSIVE),
])
def test_verdict_rules(direction, diff, ci, p, expected):
    assert ps.verdict(diff, ci, p, direction) == expected


def test_verdict_needs_a_direction():
    with pytest.raises(ValueError):
        ps.verdict(1.0, (0.5, 1.5), 0.01, None)


def test_length_adjustment_removes_a_pure_length_effect():
    """A metric that depends only on length: A writes longer, so the raw difference is large,
    but at equal length there is none."""
    rng = np.random.default_rng(0)
    n = 80
    length_b = rng.integers(20, 200, n).astype(float)
    length_a = length_b * rng.uniform(1.5, 3.0, n)
    metric = lambda length: 1.0 / np.sqrt(length)  # like TTR: falls with length
    a = metric(length_a) + rng.normal(0, 0.001, n)
    b = metric(length_b) + rng.normal(0, 0.001, n)
    raw = ps.paired_comparison(a, b, direction="higher", n_resamples=2000)
    assert raw["verdict"] == ps.CONTRADICTED  # the raw figure blames A for its length
    adjusted = ps.length_adjusted_comparison(a, b, length_a, length_b, direction="higher", n_resamples=2000)
    low, high = adjusted["ci"]
    assert low <= 0 <= high and adjusted["p"] > 0.05 and adjusted["verdict"] == ps.INCONCLUSIVE
    assert abs(adjusted["diff"]) < abs(raw["diff"]) / 4
    assert adjusted["slope"] < 0


def test_length_adjustment_keeps_a_real_effect():
    rng = np.random.default_rng(1)
    n = 60
    length_a = rng.integers(50, 100, n).astype(float)
    length_b = length_a * rng.uniform(0.8, 1.25, n)
    b = rng.normal(0, 1, n)
    a = b - 0.4 + rng.normal(0, 0.2, n)
    adjusted = ps.length_adjusted_comparison(a, b, length_a, length_b, direction="lower", n_resamples=2000)
    assert adjusted["verdict"] == ps.SUPPORTED and adjusted["p"] < 0.01
    assert adjusted["diff"] == pytest.approx(-0.4, abs=0.1)
    same = ps.length_adjusted_comparison(b, b, length_a, length_a, direction="lower", n_resamples=500)
    assert same["p"] == 1.0 and same["diff"] == 0.0


def test_corpus_test_finds_planted_effect_and_none_on_identical():
    rng = np.random.default_rng(0)
    n = 40
    values = np.concatenate([rng.normal(1.0, 0.2, n), rng.normal(0.0, 0.2, n)])  # A's units, then B's
    statistic = lambda rows: values[rows].mean()
    result = ps.paired_corpus_test(statistic, n, direction="higher", n_resamples=500)
    assert result["diff"] == pytest.approx(values[:n].mean() - values[n:].mean())
    assert result["p"] < 0.01 and result["ci"][0] > 0 and result["verdict"] == ps.SUPPORTED
    same = np.concatenate([values[:n], values[:n]])
    result = ps.paired_corpus_test(lambda rows: same[rows].mean(), n, direction="higher", n_resamples=300)
    assert result["p"] == 1.0 and result["ci"][0] <= 0 <= result["ci"][1]
    assert result["verdict"] == ps.INCONCLUSIVE


def test_holm_adjust():
    # sorted 0.01, 0.02, 0.04 with m=3: 0.03, 0.04, 0.04 (monotone)
    assert ps.holm_adjust([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert ps.holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    adjusted = ps.holm_adjust([0.01, float("nan")])
    assert adjusted[0] == pytest.approx(0.01) and np.isnan(adjusted[1])


def test_overall_verdict():
    S, C, I = ps.SUPPORTED, ps.CONTRADICTED, ps.INCONCLUSIVE
    assert ps.overall_verdict([S, S, I]) == S
    assert ps.overall_verdict([C, C, C, I]) == C
    assert ps.overall_verdict([S, C, I]) == "mixed"
    assert ps.overall_verdict([S, I, I]) == "weakly supported"
    assert ps.overall_verdict([I, I]) == I
