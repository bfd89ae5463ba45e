"""
Prompt density in embedding space, the sampling weights derived from it, and GRPO's prompt sampler.
scripts.kat_density runs the method; nanochat/kat/data.py reads and writes its files.

    space = center_embeddings(x, train_mask)                  # on by default
    sims, _ = knn_cosine(space, k=10, key_mask=train_mask)    # neighbours among the TRAIN prompts
    log_density = knn_log_density(sims, adaptive_tau(sims, train_mask))
    weights = density_weights(log_density, train_mask, beta=1.0, clip=10.0)   # the rarest weigh most

density_i = (1/k) sum_j exp((s_ij - 1)/tau), a von Mises-Fisher kernel estimate in (0, 1], strictly
increasing in every neighbour similarity (1 when all k neighbours are duplicates). weight ~
density^-beta over the train prompts (beta in [0, 1], SPEC), clipped at clip x median, normalised
to sum 1; test prompts weigh 0.
"""

import numpy as np
import torch


def l2_normalise(embeddings) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"embeddings must be a finite 2-D array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{int((norms == 0).sum())} embedding rows are all zeros (first: row {int(np.argmax(norms == 0))})")
    return x / norms


# -----------------------------------------------------------------------------
# Neighbours, density, weights

def center_embeddings(embeddings, train_mask) -> np.ndarray:
    """Rows minus the mean of the train rows, L2-normalised again (float32)."""
    x, train_mask = l2_normalise(embeddings).astype(np.float64), np.asarray(train_mask, dtype=bool)
    if train_mask.shape != (len(x),) or not train_mask.any():
        raise ValueError(f"need a train mask with one entry per row and at least one train row, got {train_mask.shape}")
    # Mean-pooled LM embeddings share one large direction (every cosine near 0.8-0.99): subtracting
    # the TRAIN mean makes the cosine measure how prompts differ from the average prompt. Test rows
    # get the same shift, so train and test stay comparable.
    centred = x - x[train_mask].mean(axis=0)
    norms = np.linalg.norm(centred, axis=1)
    if (norms < 1e-6).any():
        raise ValueError(f"{int((norms < 1e-6).sum())} prompts (first: row {int(np.argmax(norms < 1e-6))}) sit at the mean "
                         "of the train embeddings, so centring leaves no direction; pass --center=false")
    return (centred / norms[:, None]).astype(np.float32)


def adaptive_tau(knn_sims, train_mask) -> float:
    """
    The kernel bandwidth: the robust spread (IQR / 1.349) of the train prompts' mean kNN
    similarity, or their standard deviation when the middle half of them tie (IQR 0).
    """
    # The kernel then works in units of how much prompts actually differ: a prompt one spread less
    # similar to its neighbours than another gets about e^beta times its weight, whatever the
    # embedding model's similarity scale (a fixed tau does not carry over between models).
    mean_sims = np.asarray(knn_sims, dtype=np.float64)[np.asarray(train_mask, dtype=bool)].mean(axis=1)
    q25, q75 = np.quantile(mean_sims, [0.25, 0.75])
    spread = (q75 - q25) / 1.349
    if spread <= 0:
        spread = float(mean_sims.std())
    if not spread > 0:
        raise ValueError("every train prompt has the same mean kNN similarity, so no bandwidth can tell them "
                         "apart; pass --tau explicitly (or check that the embeddings are not all identical)")
    return float(spread)


def knn_cosine(embeddings, k: int, key_mask=None, chunk_size: int = 2048, device: str = "cpu"):
    """
    Exact k nearest neighbours by cosine similarity, for every row, among the rows where key_mask
    is true (all rows by default); a row never counts as its own neighbour.
    Returns (similarities float32 [N, k], indices int64 [N, k] into `embeddings`), most similar first.
    """
    x = torch.from_numpy(l2_normalise(embeddings))
    n = x.shape[0]
    key_index = torch.arange(n) if key_mask is None else torch.from_numpy(np.flatnonzero(np.asarray(key_mask, dtype=bool)))
    if not 1 <= k <= len(key_index) - 1:
        raise ValueError(f"k={k} needs at least k+1 key prompts; there are {len(key_index)}")
    keys = x[key_index].to(device)
    position_among_keys = torch.full((n,), -1, dtype=torch.long)
    position_among_keys[key_index] = torch.arange(len(key_index))
    sims_out = torch.empty((n, k), dtype=torch.float32)
    index_out = torch.empty((n, k), dtype=torch.long)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sims = x[start:stop].to(device) @ keys.T
        own = position_among_keys[start:stop].to(device)
        # self excluded by index, not by similarity: a duplicate prompt still counts as a neighbour at 1.
        # Test prompts get neighbours among the train prompts: how rare they are relative to training.
        rows = torch.nonzero(own >= 0).squeeze(1)
        sims[rows, own[rows]] = float("-inf")
        top = sims.topk(k, dim=1)
        sims_out[start:stop] = top.values.cpu()
        index_out[start:stop] = key_index[top.indices.cpu()]
    return sims_out.numpy(), index_out.numpy()


def knn_log_density(knn_sims, tau: float = 0.1) -> np.ndarray:
    """log of (1/k) sum_j exp((s_ij - 1)/tau), computed stably in float64."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    z = (np.asarray(knn_sims, dtype=np.float64) - 1.0) / tau
    peak = z.max(axis=1, keepdims=True)
    return (peak + np.log(np.exp(z - peak).mean(axis=1, keepdims=True)))[:, 0]


def density_weights(log_density, train_mask, beta: float = 1.0, clip: float = 10.0) -> np.ndarray:
    """
    Sampling weight of each prompt: density^(-beta) over train prompts, clipped at clip x median
    (clip 0: no clipping), normalised to sum 1; test prompts get 0.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0 (0: uniform), got {beta}")
    if clip != 0 and clip < 1:
        raise ValueError(f"clip is a multiple of the median weight and must be >= 1 (or 0 for none), got {clip}")
    log_density, train_mask = np.asarray(log_density, dtype=np.float64), np.asarray(train_mask, dtype=bool)
    if not train_mask.any():
        raise ValueError("no train prompts to weight")
    log_w = -beta * log_density[train_mask]
    w = np.exp(log_w - log_w.max())  # the largest is 1, so nothing overflows
    if clip:
        w = np.minimum(w, clip * np.median(w))  # a handful of outliers cannot take over the batch
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("weights vanished (every density underflowed); use a larger --tau")
    weights = np.zeros(len(log_density))
    weights[train_mask] = w / total
    return weights


def kish_ess(weights) -> float:
    """Kish effective sample size (sum w)^2 / sum w^2: n for uniform weights, 1 when one prompt has all."""
    w = np.asarray(weights, dtype=np.float64)
    return float(w.sum() ** 2 / (w ** 2).sum())


# -----------------------------------------------------------------------------
# The prompt sampler GRPO uses; both arms draw from the same train pool and differ only in mode.

SAMPLER_MODES = ("density", "uniform", "shuffled")
SHUFFLE_SEED = 0  # the "shuffled" control's permutation: fixed, the same whatever the run's seed


class PromptSampler:
    """
    Draws prompt ids with replacement: by weight (mode "density"), uniformly ("uniform"), or by
    the same weights permuted across the prompts by a fixed permutation ("shuffled": the same
    weights and Kish ESS as "density", with no density information; the sampler's control).
    sample(n, step) depends only on (seed, step), so every rank draws the same ids and a resumed
    run redraws the batches it would have drawn.
    """

    def __init__(self, ids: list[str], weights=None, seed: int = 0, mode: str = "density"):
        if mode not in SAMPLER_MODES:
            raise ValueError(f"mode must be one of {SAMPLER_MODES}, got {mode!r}")
        if not ids or seed < 0:
            raise ValueError(f"PromptSampler needs at least one prompt id and a seed >= 0 (got {len(ids)} ids, seed {seed})")
        self.ids, self.seed, self.mode = list(ids), int(seed), mode
        self.probs = None  # None: uniform
        if mode != "uniform":
            if weights is None:
                raise ValueError(f"mode {mode!r} needs weights")
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (len(self.ids),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError("weights must be finite, >= 0, one per id, and not all zero")
            if mode == "shuffled":
                w = w[np.random.default_rng(SHUFFLE_SEED).permutation(len(w))]
            self.probs = w / w.sum()

    def sample(self, n: int, step: int) -> list[str]:
        if n < 0 or step < 0:
            raise ValueError(f"n and step must be >= 0, got n={n}, step={step}")
        rng = np.random.default_rng([self.seed, step])
        if self.probs is None:
            picks = rng.integers(0, len(self.ids), size=n)
        else:
            picks = rng.choice(len(self.ids), size=n, replace=True, p=self.probs)
        return [self.ids[i] for i in picks]
