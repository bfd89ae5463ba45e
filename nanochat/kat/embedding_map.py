"""
The embedding map: every prompt placed in 3-D, for the /viz page of scripts.chat_web.

    python -m nanochat.kat.embedding_map                  # after scripts.kat_embed (and kat_density for sizes)
    python -m nanochat.kat.embedding_map --method=pca

Writes embedding_map.json in the data folder, which chat_web serves at GET /viz/embedding_map.json
and nanochat/viz.html draws:
    {"method": "umap" | "pca", "n": N, "dim": D, "seed": .., "embeddings": {how they were made} | null,
     "weights": {"file", "joined", "note"}, "sources": [...], "explained_variance": [3 fractions] (PCA),
     "points": [{"id", "x", "y", "z", "src", "split", "weight", "density", "text"}, ...]}
Points follow prompts_all.jsonl; weight and density are joined by prompt id from prompt_weights.jsonl,
null when it is missing or stale. UMAP (cosine) keeps neighbourhoods, which is what density is
about; without umap-learn, or with few points, PCA (exact and linear).
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanochat.common import atomic_write
from nanochat.flags import opt, parse_flags
from nanochat.kat.data import WEIGHTS_FILE, KatData, StaleData
from nanochat.kat.pairs import first_user_message

MAP_ROUTE = "/viz/embedding_map.json"  # where scripts.chat_web serves it; nanochat/viz.html fetches this
TEXT_CHARS = 200
UMAP_MIN_POINTS = 50  # below this a 15-neighbour graph says little; "auto" draws PCA
UMAP_NEIGHBOURS = 15


# -----------------------------------------------------------------------------
# Projection to 3-D

def pca_3d(x, chunk_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """
    (coordinates [N, 3] float64, fraction of the variance on each axis) on the top 3 principal axes.
    The covariance is summed in chunks (float32 products, float64 totals), so 100k x 1280 needs no
    float64 copy of the data. Each axis is signed so its largest-magnitude loading is positive:
    the same data gives the same picture on every run and machine. Axes beyond rank(x) are zeros.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0 or not np.isfinite(x).all():
        raise ValueError(f"need a finite, non-empty [N, D] array, got shape {x.shape}")
    n, dim = x.shape
    mean = x.mean(axis=0, dtype=np.float64)
    mean32 = torch.from_numpy(mean.astype(np.float32))
    cov = torch.zeros((dim, dim), dtype=torch.float64)
    for start in range(0, n, chunk_size):
        centred = torch.from_numpy(x[start:start + chunk_size]) - mean32
        cov += (centred.T @ centred).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    top = min(3, dim)
    values = eigenvalues.flip(0)[:top].clamp_min(0).numpy()
    axes = eigenvectors.flip(1)[:, :top].numpy()
    biggest = np.abs(axes).argmax(axis=0)
    axes = axes * np.sign(axes[biggest, np.arange(top)])
    coords = np.zeros((n, 3))
    for start in range(0, n, chunk_size):
        coords[start:start + chunk_size, :top] = (x[start:start + chunk_size].astype(np.float64) - mean) @ axes
    total = float(eigenvalues.clamp_min(0).sum())
    explained = np.zeros(3)
    explained[:top] = values / total if total > 0 else 0.0
    return coords, explained


def umap_available() -> bool:
    """Whether umap-learn is installed. Installed but broken (a dependency missing) raises: a silent
    fall back to PCA would draw a different kind of map than the user installed umap-learn for."""
    try:
        import umap  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name == "umap":
            return False
        raise
    return True


def umap_3d(x, seed: int | None) -> np.ndarray:
    """UMAP to 3-D by cosine similarity. A seed makes it repeatable but single-threaded (umap-learn's rule)."""
    try:
        import umap
    except ImportError as e:
        raise SystemExit("--method=umap needs umap-learn: pip install umap-learn (or use --method=pca)") from e
    if len(x) < 5:
        raise ValueError(f"UMAP needs at least 5 points, got {len(x)}; use method='pca'")
    reducer = umap.UMAP(n_components=3, n_neighbors=min(UMAP_NEIGHBOURS, len(x) - 1), metric="cosine",
                        min_dist=0.1, random_state=seed)
    return np.asarray(reducer.fit_transform(np.asarray(x, dtype=np.float32)), dtype=np.float64)


def resolve_method(method: str, n: int) -> str:
    if method not in ("auto", "umap", "pca"):
        raise ValueError(f"method must be auto, umap or pca, got {method!r}")
    if method == "auto":
        return "umap" if n >= UMAP_MIN_POINTS and umap_available() else "pca"
    return method


def project(embeddings, method: str = "auto", seed: int | None = 0) -> np.ndarray:
    """[N, 3] float64 coordinates of the embeddings (see resolve_method for what "auto" picks)."""
    x = np.asarray(embeddings, dtype=np.float32)
    if resolve_method(method, len(x)) == "umap":
        return umap_3d(x, seed)
    return pca_3d(x)[0]


# -----------------------------------------------------------------------------
# The map file

def _load_weights(data: KatData) -> tuple[dict, dict]:
    """({prompt id: weight row}, a note for the page) from prompt_weights.jsonl when it is current."""
    if not data.has_weights():
        return {}, {"file": None, "joined": 0, "note": f"no {WEIGHTS_FILE}: run python -m scripts.kat_density for sizes"}
    stale = data.stale_weights()
    if stale:  # drawn without sizes rather than with sizes computed from other vectors or prompts
        return {}, {"file": WEIGHTS_FILE, "joined": 0, "note": f"ignored: {stale}"}
    return {row["id"]: row for row in data.weights()}, {"file": WEIGHTS_FILE, "note": ""}


def hover_text(prefix: dict) -> str:
    """The first user message, cut at TEXT_CHARS characters (an ellipsis marks the cut)."""
    text = first_user_message(prefix)
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS - 1] + "\u2026"


def build_map(data_dir: Path, method: str = "auto", seed: int | None = 0) -> Path:
    """Project the prompt embeddings of data_dir to 3-D and write embedding_map.json there, atomically."""
    data = KatData(data_dir)
    try:
        prompts, x = data.prompt_embeddings()
    except StaleData as err:
        raise SystemExit(str(err)) from None
    used = resolve_method(method, len(x))
    explained = None
    if used == "pca":
        coords, explained = pca_3d(x)
    else:
        coords = umap_3d(x, seed)
    if not np.isfinite(coords).all():
        raise RuntimeError(f"the {used} projection produced non-finite coordinates")

    weight_rows, weights_info = _load_weights(data)
    points = []
    for prompt, (px, py, pz) in zip(prompts, coords):
        weight = weight_rows.get(prompt["id"])
        points.append({"id": prompt["id"], "x": float(px), "y": float(py), "z": float(pz), "src": prompt["src"],
                       "split": prompt["split"], "weight": None if weight is None else float(weight["weight"]),
                       "density": None if weight is None else float(weight["density"]),
                       "text": hover_text(prompt["prefix"])})
    weights_info["joined"] = sum(p["weight"] is not None for p in points)
    document = {"method": used, "n": len(points), "dim": int(x.shape[1]), "seed": seed, "embeddings": data.embeddings_meta(),
                "weights": weights_info, "sources": sorted({p["src"] for p in points}),
                "explained_variance": None if explained is None else [float(v) for v in explained],
                "points": points}
    return atomic_write(data.map_file, json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":")))


@dataclass
class Config:
    """Write embedding_map.json (the 3-D prompt map that chat_web shows at /viz)."""
    data_dir: str = opt("", help="KAT data folder (default <kat cache>/data)")
    method: str = opt("auto", help="auto: UMAP when umap-learn is installed and there are enough prompts, else PCA",
                      choices=["auto", "umap", "pca"])
    seed: int = opt(0, help="UMAP seed; -1: unseeded, which lets umap-learn use every core")


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_flags(Config, argv)
    t0 = time.time()
    out = build_map(KatData(cfg.data_dir).dir, cfg.method, None if cfg.seed < 0 else cfg.seed)
    document = json.loads(out.read_text(encoding="utf-8"))
    print(f"wrote {out}: {document['n']} prompts by {document['method']} in {time.time() - t0:.1f}s; "
          f"weights joined for {document['weights']['joined']}" +
          (f" ({document['weights']['note']})" if document["weights"]["note"] else ""))
    print("see it at /viz of python -m scripts.chat_web")
    return out


if __name__ == "__main__":
    main()
