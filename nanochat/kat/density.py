"""
Prompt density in embedding space, the sampling weights derived from it, and the GRPO prompt sampler.

Files in the KAT data folder (<kat cache>/data):
- prompt_embeddings.npy: float32 [N, D], rows L2-normalised; prompt_embeddings_ids.txt: the prompt id
  of each row, one per line, same order. Written by save_embeddings (scripts.kat_embed).
- prompt_weights.jsonl: one line per prompt, {"id", "split", "weight", "density", "log_density",
  "knn_mean_sim"} (knn_mean_sim: the mean similarity to the k neighbours, in the space the kNN ran
  in, i.e. after centring); prompt_weights.json: the parameters (the tau used among them) and
  summary figures. Written by scripts.kat_density.

The method:
- centring (on by default): mean-pooled LM embeddings are anisotropic. They share one large
  direction, so every cosine similarity sits near 0.8-0.99 and the differences between prompts
  live in a thin shell. center_embeddings subtracts the mean of the TRAIN prompts' vectors (test
  prompts get the same shift, so train and test stay comparable) and re-normalises, so the
  cosine measures how prompts differ from the average prompt, not how much they share with it.
- neighbours: exact k nearest neighbours by cosine similarity among the TRAIN prompts (self
  excluded by index, so a duplicate prompt still counts as a neighbour at similarity 1). Test
  prompts get neighbours among train prompts too: their density says how rare they are relative
  to what the policy is trained on, which is what evaluation strata need.
- density: a von Mises-Fisher kernel estimate over the k neighbours,
      density_i = (1/k) * sum_j exp((s_ij - 1) / tau)   in (0, 1],
  strictly increasing in every neighbour similarity s_ij (1 when all k neighbours are duplicates).
- tau, the kernel bandwidth, is adaptive by default (adaptive_tau): the robust spread
  (interquartile range / 1.349, the standard deviation for normal data) of the train prompts'
  mean kNN similarity. The kernel then works in units of how much prompts actually differ:
  roughly, a prompt one spread less similar to its neighbours than another gets e^beta times its
  weight, whatever the embedding model's similarity scale. A fixed tau does not carry over: with
  similarities packed into 0.97-0.99, tau = 0.1 gives weights within 1.2x of each other (Kish ESS
  99.9% of n) and the two GRPO arms would barely differ.
- weight: proportional to density^(-beta), so the rarest prompts weigh most (beta = 0: uniform;
  SPEC says beta in [0, 1]); clipped at `clip` times the median weight so a handful of outliers
  cannot take over the batch; normalised to sum 1 over train prompts. Test prompts weigh 0.
"""

import json
from pathlib import Path

import numpy as np
import torch

from nanochat.common import atomic_write

EMBEDDINGS_FILE = "prompt_embeddings.npy"
EMBEDDING_IDS_FILE = "prompt_embeddings_ids.txt"
WEIGHTS_FILE = "prompt_weights.jsonl"
WEIGHTS_META_FILE = "prompt_weights.json"
HISTOGRAM_FILE = "prompt_weights_hist.png"


# -----------------------------------------------------------------------------
# Embedding files

def l2_normalise(embeddings) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"embeddings must be a finite 2-D array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{int((norms == 0).sum())} embedding rows are all zeros (first: row {int(np.argmax(norms == 0))})")
    return x / norms


def save_embeddings(data_dir: Path, ids: list[str], embeddings) -> tuple[Path, Path]:
    """Write prompt_embeddings.npy (float32, L2-normalised here) and the ids file, atomically."""
    data_dir = Path(data_dir)
    x = l2_normalise(embeddings)
    if len(ids) != len(x) or len(set(ids)) != len(ids) or any(not i or "\n" in i for i in ids):
        raise ValueError(f"need one unique, non-empty, single-line id per embedding row: "
                         f"{len(ids)} ids ({len(set(ids))} unique) for {len(x)} rows")
    data_dir.mkdir(parents=True, exist_ok=True)
    npy, txt = data_dir / EMBEDDINGS_FILE, data_dir / EMBEDDING_IDS_FILE
    atomic_write(npy, lambda f: np.save(f, x))
    atomic_write(txt, "".join(f"{i}\n" for i in ids))
    return npy, txt


def load_embeddings(data_dir: Path) -> tuple[list[str], np.ndarray]:
    """(ids, float32 [N, D] unit rows), checked to belong together."""
    npy, txt = Path(data_dir) / EMBEDDINGS_FILE, Path(data_dir) / EMBEDDING_IDS_FILE
    for path in (npy, txt):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; run python -m scripts.kat_embed first")
    x = np.load(npy)
    ids = txt.read_text(encoding="utf-8").splitlines()
    if x.ndim != 2 or x.dtype != np.float32 or len(ids) != len(x):
        raise ValueError(f"{npy} holds {x.dtype} {x.shape} but {txt} lists {len(ids)} ids; rerun scripts.kat_embed")
    norms = np.linalg.norm(x, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError(f"{npy}: rows are not L2-normalised (norms {norms.min():.4f}..{norms.max():.4f}); write it with save_embeddings")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{txt}: prompt ids repeat; rerun scripts.kat_embed")
    return ids, x


# -----------------------------------------------------------------------------
# Neighbours, density, weights

def center_embeddings(embeddings, train_mask) -> np.ndarray:
    """Rows minus the mean of the train rows, L2-normalised again (float32)."""
    x, train_mask = l2_normalise(embeddings).astype(np.float64), np.asarray(train_mask, dtype=bool)
    if train_mask.shape != (len(x),) or not train_mask.any():
        raise ValueError(f"need a train mask with one entry per row and at least one train row, got {train_mask.shape}")
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
        w = np.minimum(w, clip * np.median(w))
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


def join_weights(prompt_ids: list[str], weight_ids: list[str], weights) -> np.ndarray:
    """The weight of each entry of prompt_ids (e.g. one per pair), looked up by id, never by position."""
    by_id = dict(zip(weight_ids, np.asarray(weights, dtype=np.float64)))
    missing = [pid for pid in prompt_ids if pid not in by_id]
    if missing:
        raise KeyError(f"{len(missing)} prompt ids have no weight (first: {missing[0]}); rerun scripts.kat_density")
    return np.array([by_id[pid] for pid in prompt_ids])


# -----------------------------------------------------------------------------
# Weight files

def save_prompt_weights(data_dir: Path, ids, splits, log_density, knn_mean_sim, weights, meta: dict):
    data_dir = Path(data_dir)
    rows = ({"id": i, "split": s, "weight": float(w), "density": float(np.exp(ld)), "log_density": float(ld),
             "knn_mean_sim": float(m)} for i, s, w, ld, m in zip(ids, splits, weights, log_density, knn_mean_sim))
    for name, text in ((WEIGHTS_FILE, "".join(json.dumps(r) + "\n" for r in rows)),
                       (WEIGHTS_META_FILE, json.dumps(meta, indent=2) + "\n")):
        atomic_write(data_dir / name, text)


def load_prompt_weights(data_dir: Path, split: str | None = None) -> list[dict]:
    path = Path(data_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run python -m scripts.kat_density first")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


# -----------------------------------------------------------------------------
# The prompt sampler GRPO uses; both arms draw from the same train pool and differ only in mode.

class PromptSampler:
    """
    Draws prompt ids with replacement: by weight (mode "density") or uniformly (mode "uniform").
    sample(n, step) depends only on (seed, step), so every rank draws the same ids and a resumed
    run redraws the batches it would have drawn.
    """

    def __init__(self, ids: list[str], weights=None, seed: int = 0, mode: str = "density"):
        if mode not in ("density", "uniform"):
            raise ValueError(f"mode must be 'density' or 'uniform', got {mode!r}")
        if not ids or seed < 0:
            raise ValueError(f"PromptSampler needs at least one prompt id and a seed >= 0 (got {len(ids)} ids, seed {seed})")
        self.ids, self.seed, self.mode = list(ids), int(seed), mode
        self.probs = None
        if mode == "density":
            if weights is None:
                raise ValueError("mode 'density' needs weights")
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (len(self.ids),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError("weights must be finite, >= 0, one per id, and not all zero")
            self.probs = w / w.sum()

    @classmethod
    def from_weights_file(cls, data_dir: Path, seed: int = 0, mode: str = "density") -> "PromptSampler":
        rows = load_prompt_weights(data_dir, split="train")
        return cls([r["id"] for r in rows], [r["weight"] for r in rows], seed=seed, mode=mode)

    def sample(self, n: int, step: int) -> list[str]:
        if n < 0 or step < 0:
            raise ValueError(f"n and step must be >= 0, got n={n}, step={step}")
        rng = np.random.default_rng([self.seed, step])
        if self.mode == "uniform":
            picks = rng.integers(0, len(self.ids), size=n)
        else:
            picks = rng.choice(len(self.ids), size=n, replace=True, p=self.probs)
        return [self.ids[i] for i in picks]
