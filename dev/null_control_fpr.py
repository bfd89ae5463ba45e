"""
The null control on CPU-size synthetic runs: how often does the diversity report's primary verdict
(analyse_arms at matched KL, hierarchical bootstrap over seeds then prompts) declare a difference
between two arms drawn alike? Replicate pairs of synthetic arms (nanochat/kat/controls.py
synthetic_arm_tables); the rate with its Clopper-Pearson 95% interval, and, with --effect, the power
to see a real difference of that size. Pass: the rate within alpha plus two binomial standard errors.

    python -m dev.null_control_fpr                            # 200 replicate pairs, 3 seeds per arm
    python -m dev.null_control_fpr --replicates=400 --seed_sd=0.02 --effect=0.25

Exit status 1 when the rate is above that bound.
"""

import sys
from dataclasses import dataclass

from nanochat.flags import opt, parse_flags
from nanochat.kat.controls import null_false_positive_rate


@dataclass
class Config:
    replicates: int = opt(200, help="null replicate pairs", min=1)
    seeds: int = opt(3, help="runs per arm", min=2)
    prompts: int = opt(100, help="evaluation prompts per run", min=2)
    n_resamples: int = opt(1000, help="bootstrap resamples per verdict", min=100)
    alpha: float = opt(0.05, above=0, below=1)
    seed_sd: float = opt(0.05, help="spread of a run's level between seeds (distinct-2)", min=0)
    noise_sd: float = opt(0.06, help="run-by-prompt noise (distinct-2)", min=0)
    effect: float = opt(0.0, help="also the power at this density-arm effect (distinct-2); 0: only the null", min=0)
    seed: int = opt(0)


def describe(result: dict) -> str:
    low, high = result["ci"]
    return (f"{result['false_positives']} of {result['replicates']} replicate pairs declared a difference: rate "
            f"{result['rate']:.3f} (Clopper-Pearson 95% [{low:.3f}, {high:.3f}])")


def main(argv=None) -> int:
    cfg = parse_flags(Config, argv)
    shape = {"seeds": cfg.seeds, "prompts": cfg.prompts, "n_resamples": cfg.n_resamples, "alpha": cfg.alpha,
             "seed_sd": cfg.seed_sd, "noise_sd": cfg.noise_sd}
    null = null_false_positive_rate(replicates=cfg.replicates, seed=cfg.seed, **shape)
    bound = cfg.alpha + 2 * null["binomial_se"]
    print(f"null ({cfg.seeds} seeds per arm, {cfg.prompts} prompts, seed sd {cfg.seed_sd:g}, noise sd {cfg.noise_sd:g}): "
          f"{describe(null)}; bound alpha + 2 binomial se = {bound:.3f}: {'PASS' if null['rate'] <= bound else 'FAIL'}")
    if cfg.effect > 0:
        power = null_false_positive_rate(replicates=cfg.replicates, seed=cfg.seed + 1, effect=cfg.effect, **shape)
        print(f"power at effect {cfg.effect:g}: {describe(power)}")
    return 0 if null["rate"] <= bound else 1


if __name__ == "__main__":
    sys.exit(main())
