"""
Paired statistics for comparing two models on the same prompts, and the verdicts read from them.

    result = paired_comparison(a_values, b_values, direction="higher")   # diff, ci, p, d_z, verdict
    p_holm = holm_adjust([r["p"] for r in primary_results])

The unit is the prompt: both models answered the same prompts with the same seeds and sampling
settings, so each prompt gives one paired difference d_i = metric(model A) - metric(model B), and
prompt-to-prompt variation (some prompts invite em dashes, some do not) cancels. Intervals are
percentile bootstraps over prompts, p-values paired sign-flip permutation tests (the bootstrap for
the length-adjusted intercept), effect sizes Cohen's d_z. A verdict is "supported" when the
difference is in the better direction, its CI excludes 0 and p < alpha, "contradicted" in the worse
direction under the same two conditions, else "inconclusive"; Holm's step-down correction covers
the primary metrics. Several seeds per arm: hierarchical_bootstrap.
"""

import math

import numpy as np

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
_CHUNK = 1024  # resamples per vectorised block, to bound memory at large n


def _paired_arrays(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Float arrays of the pairs where both values are finite."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-D arrays of one length, got shapes {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def bootstrap_ci(diffs, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(diffs), resampling the paired units (Efron & Tibshirani 1993)."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, n_resamples, _CHUNK):
        rows = rng.integers(0, len(d), size=(min(_CHUNK, n_resamples - start), len(d)))
        means.append(d[rows].mean(axis=1))
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(np.concatenate(means), [tail, 1.0 - tail])
    return float(low), float(high)


def _sign_patterns(n: int, n_resamples: int, rng):
    """Blocks of +-1 sign rows: every pattern when 2^n fits in n_resamples, else random ones."""
    if n <= 30 and 2 ** n <= n_resamples:
        codes = np.arange(2 ** n)
        yield 1.0 - 2.0 * ((codes[:, None] >> np.arange(n)) & 1), True
        return
    for start in range(0, n_resamples, _CHUNK):
        yield rng.choice([-1.0, 1.0], size=(min(_CHUNK, n_resamples - start), n)), False


def _tolerance(values) -> float:
    """Slack for float noise when comparing resampled statistics with the observed one."""
    return 1e-9 * max(1.0, float(np.max(np.abs(values)))) if len(values) else 0.0


def sign_flip_test(diffs, n_resamples: int = 10_000, seed: int = 0) -> float:
    """
    Two-sided paired permutation p-value for mean(diffs) == 0: the share of sign patterns whose |mean|
    is at least the observed one. Every pattern when 2^n <= n_resamples (exact), else n_resamples random
    ones with p = (1 + hits) / (1 + R), which is never 0 (Phipson & Smyth 2010). Identical inputs give 1.
    """
    # under the null the two models' responses to a prompt are exchangeable: d_i is as likely as -d_i
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) == 0:
        return float("nan")
    observed, slack = abs(d.mean()), _tolerance(d)
    rng = np.random.default_rng(seed)
    hits = total = 0
    for signs, exact in _sign_patterns(len(d), n_resamples, rng):
        hits += int((np.abs(signs @ d / len(d)) >= observed - slack).sum())
        total += len(signs)
    return hits / total if exact else (1 + hits) / (1 + total)


def cohens_dz(diffs) -> float:
    # d_z = mean(d) / sd(d), ddof 1; undefined (nan) when sd is 0
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) < 2:
        return float("nan")
    sd = d.std(ddof=1)
    return float(d.mean() / sd) if sd > 0 else float("nan")


def verdict(diff: float, ci: tuple[float, float], p: float, direction: str | None, alpha: float = 0.05) -> str:
    """supported / contradicted / inconclusive for "A improves on B" on a metric with a better direction."""
    if direction not in ("lower", "higher"):
        raise ValueError(f"a verdict needs direction 'lower' or 'higher', got {direction!r}")
    low, high = ci
    if not all(math.isfinite(v) for v in (diff, low, high, p)):
        return INCONCLUSIVE
    # Symmetric on purpose: with few prompts the percentile interval can exclude 0 while p >= alpha, and a
    # contradiction must not be easier to declare than a support, nor survive a Holm correction a support would not.
    excludes_zero = low > 0 or high < 0
    better = diff < 0 if direction == "lower" else diff > 0
    worse = diff > 0 if direction == "lower" else diff < 0
    if better and excludes_zero and p < alpha:
        return SUPPORTED
    if worse and excludes_zero and p < alpha:
        return CONTRADICTED
    return INCONCLUSIVE


def paired_comparison(a, b, direction: str | None = None, n_resamples: int = 10_000, confidence: float = 0.95,
                      alpha: float = 0.05, seed: int = 0) -> dict:
    """
    Model A vs model B on per-prompt values a[i], b[i] (pairs with a non-finite value are left
    out and counted). diff = mean(a - b); a verdict is given when the direction is known.
    """
    a_kept, b_kept = _paired_arrays(a, b)
    d = a_kept - b_kept
    n = len(d)
    result = {"n": n, "n_dropped": int(len(np.asarray(a)) - n),
              "mean_a": float(a_kept.mean()) if n else float("nan"),
              "mean_b": float(b_kept.mean()) if n else float("nan"),
              "diff": float(d.mean()) if n else float("nan"),
              "ci": bootstrap_ci(d, n_resamples, confidence, seed), "confidence": confidence,
              "p": sign_flip_test(d, n_resamples, seed + 1), "d_z": cohens_dz(d), "direction": direction}
    result["verdict"] = verdict(result["diff"], result["ci"], result["p"], direction, alpha) if direction else None
    return result


def paired_corpus_test(statistic, n_units: int, direction: str | None = None, n_resamples: int = 1000,
                       confidence: float = 0.95, alpha: float = 0.05, seed: int = 0) -> dict:
    """
    A vs B on a figure computed from a whole set of prompts, not a mean of per-prompt values (distinct
    n-grams over all responses, across-prompt distances). statistic(rows) computes the figure
    from units picked by `rows` (with repeats) out of the two models' units stacked as
    [A's 0..n-1, B's n..2n-1]. The interval resamples prompts (the same prompts for A and B);
    the permutation test gives each prompt's A and B responses to either side at random.
    Resamples where the figure is undefined (nan, e.g. a resample of one repeated prompt) are
    left out of the interval.
    """
    if n_units < 2:
        raise ValueError(f"a corpus-level comparison needs at least two prompts, got {n_units}")
    units = np.arange(n_units)
    value_a, value_b = statistic(units), statistic(units + n_units)
    observed = value_a - value_b
    rng = np.random.default_rng(seed)
    boot = np.empty(n_resamples)
    for r in range(n_resamples):
        rows = rng.integers(0, n_units, size=n_units)
        boot[r] = statistic(rows) - statistic(rows + n_units)
    null = np.empty(n_resamples)
    for r in range(n_resamples):
        swap = rng.random(n_units) < 0.5
        null[r] = statistic(np.where(swap, units + n_units, units)) - statistic(np.where(swap, units, units + n_units))
    tail = (1.0 - confidence) / 2
    boot = boot[np.isfinite(boot)]
    low, high = np.quantile(boot, [tail, 1.0 - tail]) if len(boot) else (float("nan"), float("nan"))
    hits = int((np.abs(null) >= abs(observed) - _tolerance(np.append(null, observed))).sum())
    result = {"n": n_units, "n_dropped": 0, "mean_a": float(value_a), "mean_b": float(value_b), "diff": float(observed),
              "ci": (float(low), float(high)), "confidence": confidence, "p": (1 + hits) / (1 + n_resamples),
              "d_z": float("nan"), "direction": direction}
    result["verdict"] = verdict(result["diff"], result["ci"], result["p"], direction, alpha) if direction else None
    return result


def _intercepts(d: np.ndarray, x: np.ndarray) -> np.ndarray:
    """OLS intercepts of d on x, one per row of the [R, n] arrays d and x."""
    x_mean, d_mean = x.mean(axis=1, keepdims=True), d.mean(axis=1, keepdims=True)
    sxx = ((x - x_mean) ** 2).sum(axis=1)
    sxd = ((x - x_mean) * (d - d_mean)).sum(axis=1)
    slope = np.divide(sxd, sxx, out=np.zeros_like(sxd), where=sxx > 0)  # no length spread: no slope to remove
    return d_mean[:, 0] - slope * x_mean[:, 0]


def length_adjusted_comparison(a, b, length_a, length_b, direction: str | None = None, n_resamples: int = 10_000,
                               confidence: float = 0.95, alpha: float = 0.05, seed: int = 0) -> dict:
    """
    The A - B difference at equal length: the intercept of the least-squares line of
    d_i = a_i - b_i on x_i = log(1 + length_a_i) - log(1 + length_b_i), with a bootstrap interval
    and p-value over prompts; slope is the part explained by length.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    length_a, length_b = np.asarray(length_a, dtype=np.float64), np.asarray(length_b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b) & np.isfinite(length_a) & np.isfinite(length_b)
    d, x = (a - b)[keep], (np.log1p(length_a) - np.log1p(length_b))[keep]
    n = len(d)
    result = {"n": n, "n_dropped": int(len(a) - n), "direction": direction, "confidence": confidence}
    if n < 3:
        result.update(diff=float("nan"), ci=(float("nan"), float("nan")), p=float("nan"), slope=float("nan"))
        result["verdict"] = INCONCLUSIVE if direction else None
        return result
    observed = float(_intercepts(d[None], x[None])[0])
    x_centered = x - x.mean()
    sxx = float((x_centered ** 2).sum())
    slope = float((x_centered * (d - d.mean())).sum() / sxx) if sxx > 0 else 0.0
    rng = np.random.default_rng(seed)
    boot = []
    for start in range(0, n_resamples, _CHUNK):
        rows = rng.integers(0, n, size=(min(_CHUNK, n_resamples - start), n))
        boot.append(_intercepts(d[rows], x[rows]))
    boot = np.concatenate(boot)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    if np.all(boot == 0):
        p = 1.0  # A and B agree on every prompt
    else:
        # twice the smaller share on either side of 0: the level at which the interval would just reach 0.
        # Not sign flips: when one model is always the longer, the intercept is an extrapolation, and sign
        # flips, which fill both sides of the length axis, would understate its uncertainty.
        p = min(1.0, 2 * min((1 + (boot <= 0).sum()) / (1 + len(boot)), (1 + (boot >= 0).sum()) / (1 + len(boot))))
    result.update(diff=observed, ci=(float(low), float(high)), p=float(p), slope=slope)
    result["verdict"] = verdict(observed, result["ci"], p, direction, alpha) if direction else None
    return result


def holm_adjust(pvalues) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1); nan stays nan. Controls the
    family-wise error over the metrics passed in."""
    p = np.asarray(pvalues, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(p))
    adjusted = np.full(len(p), np.nan)
    m = len(finite)
    running = 0.0
    for rank, index in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def overall_verdict(verdicts: list[str]) -> str:
    """One word for a family of per-metric verdicts (already Holm-corrected by the caller)."""
    supported, contradicted = verdicts.count(SUPPORTED), verdicts.count(CONTRADICTED)
    if supported and contradicted:
        return "mixed"
    if supported > len(verdicts) / 2:
        return SUPPORTED
    if contradicted > len(verdicts) / 2:
        return CONTRADICTED
    if supported or contradicted:
        return f"weakly {SUPPORTED if supported else CONTRADICTED}"
    return INCONCLUSIVE


# -----------------------------------------------------------------------------
# Seeds x prompts: several runs per arm, every run evaluated on the same prompts

def hierarchical_bootstrap(a, b, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> dict:
    """
    Arm a minus arm b when each arm has several runs (seeds) and every run answered the same
    prompts: a (S_a, N), b (S_b, N) per-prompt values. Each resample draws seeds within each arm,
    then one set of prompts shared by both arms (prompts stay paired). Seed deviations are first
    scaled by sqrt(S / (S - 1)) (unbiased spread with few seeds); the CI and p-value use the
    bootstrap standard error with Student t quantiles on S_a + S_b - 2 degrees of freedom, since
    3 seeds are too few for percentiles. Seeds and prompts are crossed, so resampling both counts
    the sample noise twice: conservative (wider) when seeds barely differ, calibrated when they do.
    """
    from scipy import stats as scipy_stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need (seeds, prompts) arrays over the same prompts, got {a.shape} and {b.shape}")
    if min(a.shape[0], b.shape[0]) < 2 or a.shape[1] < 2:
        raise ValueError(f"need at least 2 seeds per arm and 2 prompts, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("per-prompt values must be finite")

    def spread(x):  # seed deviations from the arm's mean run, scaled to an unbiased spread
        mean_run = x.mean(axis=0, keepdims=True)
        return mean_run + np.sqrt(x.shape[0] / (x.shape[0] - 1)) * (x - mean_run)

    a_s, b_s = spread(a), spread(b)
    (s_a, n), s_b = a.shape, b.shape[0]
    rng = np.random.default_rng(seed)
    draws = np.empty(n_resamples)
    for start in range(0, n_resamples, _CHUNK):
        m = min(_CHUNK, n_resamples - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=m)  # how often each prompt is drawn
        # every run's mean over the drawn prompts: (m, S)
        run_means_a, run_means_b = counts @ a_s.T / n, counts @ b_s.T / n
        seeds_a, seeds_b = rng.integers(0, s_a, (m, s_a)), rng.integers(0, s_b, (m, s_b))
        draws[start:start + m] = (np.take_along_axis(run_means_a, seeds_a, 1).mean(axis=1)
                                  - np.take_along_axis(run_means_b, seeds_b, 1).mean(axis=1))
    estimate = float(a.mean() - b.mean())
    se = float(draws.std(ddof=1))
    df = s_a + s_b - 2
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, df)) * se
    p = 1.0 if se == 0 and estimate == 0 else float(2 * scipy_stats.t.sf(abs(estimate) / max(se, 1e-300), df))
    return {"diff": estimate, "ci": (estimate - half, estimate + half), "p": p, "se": se, "df": df,
            "seeds": (s_a, s_b), "prompts": n}


def interpolate_at(x_target: float, xs, values) -> np.ndarray:
    """
    values (K, ...) measured at increasing xs (K,), linearly interpolated at x_target (e.g. every
    prompt's metric at a matched KL along a run's trajectory). x_target outside [xs[0], xs[-1]] is an
    error: a run that never reached that KL cannot be compared there.
    """
    xs, values = np.asarray(xs, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if xs.ndim != 1 or len(xs) != len(values) or len(xs) < 1:
        raise ValueError(f"need one x per row of values, got {xs.shape} and {values.shape}")
    if np.any(np.diff(xs) <= 0):
        raise ValueError(f"xs must increase strictly, got {xs.tolist()}")
    if not xs[0] <= x_target <= xs[-1]:
        raise ValueError(f"{x_target:g} lies outside the measured range [{xs[0]:g}, {xs[-1]:g}]")
    k = min(int(np.searchsorted(xs, x_target, side="right")), len(xs) - 1)
    if xs[k - 1] == x_target or k == 0:
        return values[max(k - 1, 0)].copy()
    w = (x_target - xs[k - 1]) / (xs[k] - xs[k - 1])
    return (1 - w) * values[k - 1] + w * values[k]
