"""
Time exact kNN + density + weights for 20,000 prompts of dimension 256 (target < 20 s on a 2-core CPU).

    python -m dev.bench_density                 # defaults: n=20000, dim=256, k=10, cpu
    python -m dev.bench_density --n=100000 --dim=1280 --device_type=cuda --target_s=10   # d20-sized, one H100

The embeddings are a mixture of tight clusters and scattered points, like real prompt sets;
the time covers knn_cosine + knn_log_density + density_weights, as scripts.kat_density runs them.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch

from nanochat.kat.density import density_weights, kish_ess, knn_cosine, knn_log_density
from nanochat.flags import opt, parse_flags

@dataclass
class Config:
    """Benchmark the density stage on synthetic embeddings."""
    n: int = opt(20000, help="prompts")
    dim: int = opt(256, help="embedding dimension")
    k: int = opt(10, help="neighbours")
    chunk_size: int = opt(2048, help="query rows per matrix product")
    device_type: str = opt("cpu", choices=["cpu", "cuda", "mps"])
    repeats: int = opt(3, help="timed runs; the best is reported")
    target_s: float = opt(20.0, help="PASS when the best run takes less (20 s: the 2-core CPU figure)")


def synthetic_embeddings(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_clustered = int(n * 0.8)
    centres = rng.normal(size=(200, dim))
    clustered = centres[rng.integers(0, 200, n_clustered)] + 0.3 * rng.normal(size=(n_clustered, dim))
    scattered = rng.normal(size=(n - n_clustered, dim))
    return np.concatenate([clustered, scattered]).astype(np.float32)


def main():
    cfg = parse_flags(Config)
    x = synthetic_embeddings(cfg.n, cfg.dim)
    train_mask = np.arange(cfg.n) % 20 != 0  # 5% held out as test, as in a real run
    times = []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        sims, _ = knn_cosine(x, cfg.k, key_mask=train_mask, chunk_size=cfg.chunk_size, device=cfg.device_type)
        weights = density_weights(knn_log_density(sims, 0.1), train_mask, beta=1.0, clip=10.0)
        if cfg.device_type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times)
    print(f"kNN + density + weights, n={cfg.n} dim={cfg.dim} k={cfg.k} on {cfg.device_type} "
          f"({torch.get_num_threads()} torch threads): best {best:.2f} s of {cfg.repeats} "
          f"(all: {', '.join(f'{t:.2f}' for t in times)}); target < {cfg.target_s:g} s: {'PASS' if best < cfg.target_s else 'FAIL'}")
    print(f"Kish ESS {kish_ess(weights[train_mask]):.0f} of {int(train_mask.sum())} train prompts")


if __name__ == "__main__":
    main()
