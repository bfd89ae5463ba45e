"""
Prompt density and sampling weights for density-aware GRPO (method in nanochat/kat/density.py).

    python -m scripts.kat_density                      # k=10, beta=1, centred, adaptive tau, clip=10
    python -m scripts.kat_density --beta=0.5 --k=20
    python -m scripts.kat_density --center=false --tau=0.1   # the raw embeddings and a fixed bandwidth

Reads prompts_all.jsonl (scripts.kat_pairs) and prompt_embeddings.npy + _ids.txt
(scripts.kat_embed) from the data folder; writes prompt_weights.jsonl, prompt_weights.json (with the tau used and
whether the embeddings were centred), prompt_weights_hist.png and the "kat_density" section of
stats.txt. When the weights come out nearly uniform (Kish ESS above 95% of the train prompts)
it says so in stats.txt and on stdout: the density arm of GRPO would then barely differ from
the uniform one.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanochat.common import autodetect_device_type
from nanochat.flags import flags_dict, opt, parse_flags
from nanochat.kat.data import HISTOGRAM_FILE, STATS_FILE, KatData, StaleData, write_stats_section
from nanochat.kat.density import (adaptive_tau, center_embeddings, density_weights, kish_ess, knn_cosine,
                                  knn_log_density)
from nanochat.kat.pairs import first_user_message


@dataclass
class Config:
    """Density of every prompt among the train prompts, and train sampling weights ~ density^-beta."""
    data_dir: str = opt("", help="KAT data folder (default <kat cache>/data)")
    k: int = opt(10, help="neighbours per prompt", min=1)
    beta: float = opt(1.0, help="weight = density^-beta; 0 gives uniform weights", min=0)
    center: bool = opt(True, help="subtract the train prompts' mean embedding and re-normalise before the kNN "
                       "(mean-pooled LM embeddings all share one direction)")
    tau: float = opt(0.0, help="bandwidth of the exp((sim - 1)/tau) kernel; 0: adaptive, the robust spread "
                     "(IQR/1.349) of the train prompts' mean kNN similarity")
    clip: float = opt(10.0, help="cap weights at this multiple of the median weight; 0: no cap", min=1, sentinel=0)
    chunk_size: int = opt(2048, help="query rows per similarity matrix product", min=1)
    device_type: str = opt("", help="cpu|cuda|mps (default: autodetect)", choices=["", "cpu", "cuda", "mps"])


# Above this Kish ESS / n_train the weights are close to uniform and the two GRPO arms nearly the same.
NEAR_UNIFORM_ESS_FRACTION = 0.95


def plot_histogram(path: Path, log_density, train_mask, weights):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_density, ax_weight) = plt.subplots(1, 2, figsize=(11, 4))
    log10_density = log_density / np.log(10)
    bins = np.linspace(log10_density.min(), log10_density.max() + 1e-9, 41)
    ax_density.hist(log10_density[train_mask], bins=bins, alpha=0.7, label=f"train ({train_mask.sum()})")
    if (~train_mask).any():
        ax_density.hist(log10_density[~train_mask], bins=bins, alpha=0.7, label=f"test ({(~train_mask).sum()})")
    ax_density.set(xlabel="log10 density (kNN kernel)", ylabel="prompts", title="Prompt density")
    ax_density.legend()
    relative = weights[train_mask] * train_mask.sum()
    ax_weight.hist(relative, bins=np.geomspace(relative.min(), relative.max() * 1.0001, 41))
    ax_weight.set(xscale="log", xlabel="weight x n_train (1 = uniform)", ylabel="train prompts", title="Sampling weight")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None):
    cfg = parse_flags(Config, argv)
    if cfg.tau < 0:
        raise SystemExit(f"--tau must be > 0, or 0 for the adaptive bandwidth; got {cfg.tau}")
    data = KatData(cfg.data_dir)
    device = cfg.device_type or autodetect_device_type()

    try:  # a prompt without an embedding means a stale embedding file
        prompts, x = data.prompt_embeddings()
    except StaleData as err:
        raise SystemExit(str(err)) from None
    ids = [p["id"] for p in prompts]
    splits = np.array([p["split"] for p in prompts])
    train_mask = splits == "train"

    t0 = time.time()
    space = center_embeddings(x, train_mask) if cfg.center else x
    sims, _ = knn_cosine(space, cfg.k, key_mask=train_mask, chunk_size=cfg.chunk_size, device=device)
    tau = cfg.tau or adaptive_tau(sims, train_mask)
    log_density = knn_log_density(sims, tau)
    weights = density_weights(log_density, train_mask, beta=cfg.beta, clip=cfg.clip)
    seconds = time.time() - t0

    n_train, w_train = int(train_mask.sum()), weights[train_mask]
    relative = w_train * n_train
    ess = kish_ess(w_train)
    quantiles = {q: float(np.quantile(relative, q)) for q in (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)}
    # clip >= 1 leaves the median unchanged, so the cap is clip x median in these units too
    at_cap = int((relative >= cfg.clip * np.median(relative) * (1 - 1e-9)).sum()) if cfg.clip else 0
    train_rows = np.flatnonzero(train_mask)
    by_density = train_rows[np.argsort(-log_density[train_rows], kind="stable")]

    def show(row):
        return f"  {np.exp(log_density[row]):.3e}  {first_user_message(prompts[row]['prefix'])[:90]!r}"

    tau_rule = "set by --tau" if cfg.tau else "adaptive: IQR/1.349 of the train prompts' mean kNN similarity"
    near_uniform = None
    if ess > NEAR_UNIFORM_ESS_FRACTION * n_train:
        near_uniform = (f"WARNING: the weights are nearly uniform (Kish ESS {ess / n_train:.1%} of the train prompts > "
                        f"{NEAR_UNIFORM_ESS_FRACTION:.0%}): density-weighted GRPO would barely differ from uniform; "
                        "check --center, a smaller --tau or a larger --beta")
    lines = [f"k={cfg.k} beta={cfg.beta} center={cfg.center} tau={tau:.4g} ({tau_rule}) clip={cfg.clip} "
             f"device={device}; kNN + weights in {seconds:.2f}s",
             f"prompts: {len(ids)} (train {n_train}, test {len(ids) - n_train}), embedding dim {x.shape[1]}",
             f"Kish effective sample size: {ess:.1f} of {n_train} train prompts ({ess / n_train:.1%})",
             *([near_uniform] if near_uniform else []),
             "weight x n_train (1 = uniform): " + "  ".join(f"q{int(q * 100)}={v:.3g}" for q, v in quantiles.items()),
             f"train prompts at the clip cap: {at_cap}",
             f"mean kNN similarity{' (centred)' if cfg.center else ''}: "
             + "  ".join(f"q{q}={np.quantile(sims.mean(axis=1), q / 100):.3f}" for q in (0, 10, 50, 90, 100)),
             "most dense train prompts (density, first user message):", *map(show, by_density[:5]),
             "least dense train prompts:", *map(show, by_density[::-1][:5])]
    body = "\n".join(lines)

    meta = {"flags": flags_dict(cfg), "n_train": n_train, "n_test": len(ids) - n_train, "dim": int(x.shape[1]),
            "kish_ess": ess, "weight_x_n_train_quantiles": {str(q): v for q, v in quantiles.items()},
            "train_prompts_at_cap": at_cap, "seconds": seconds,
            "center": cfg.center, "tau": tau, "tau_rule": tau_rule, "near_uniform_warning": near_uniform,
            "similarity": ("cosine after subtracting the train prompts' mean embedding and re-normalising"
                           if cfg.center else "cosine of the embeddings as saved"),
            "density": "(1/k) sum_j exp((s_ij - 1)/tau) over the k most similar train prompts",
            "weight": "density^-beta over train prompts, clipped at clip x median, normalised to sum 1; test 0"}
    data.save_prompt_weights(ids, splits, log_density, sims.mean(axis=1), weights, meta)
    write_stats_section(data.stats_file, "kat_density", body)
    plot_histogram(data.histogram_file, log_density, train_mask, weights)
    print(body)
    print(f"wrote {data.dir}/prompt_weights.jsonl, prompt_weights.json, {HISTOGRAM_FILE}; stats in {STATS_FILE}")


if __name__ == "__main__":
    main()
