"""
nanochat/kat/embedding_map.py and nanochat/viz.html: PCA keeps distances within a 3-D subspace and
draws the same picture on every run; embedding_map.json is well-formed, follows prompts_all.jsonl,
joins kat_density's weights by prompt id (never by position) and ignores weights computed from older
vectors; the page is self-contained and never parses prompt text as HTML.
"""

import json
import os
import re
import sys

import numpy as np
import pytest

from nanochat.kat import embedding_map
from nanochat.common import REPO_ROOT
from nanochat.kat.data import EMBEDDINGS_FILE, MAP_FILE, WEIGHTS_FILE, KatData
from nanochat.kat.embedding_map import MAP_ROUTE, TEXT_CHARS, build_map, hover_text, pca_3d, project, resolve_method
from nanochat.kat.pairs import first_user_message
from scripts import kat_density, kat_pairs

VIZ = REPO_ROOT / "nanochat" / "viz.html"


def pairwise_distances(x):
    return np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)


def test_pca_recovers_the_distances_of_points_on_a_3d_subspace():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(120, 3)) * np.array([3.0, 1.5, 0.5])
    basis, _ = np.linalg.qr(rng.normal(size=(48, 3)))  # orthonormal columns in 48-d
    x = latent @ basis.T + rng.normal(size=48)         # plus an offset PCA must remove
    coords, explained = pca_3d(x)
    np.testing.assert_allclose(pairwise_distances(coords), pairwise_distances(latent), atol=1e-4)
    assert explained.sum() == pytest.approx(1.0, abs=1e-5) and explained[0] > explained[1] > explained[2]
    np.testing.assert_allclose(project(x, method="pca"), coords)


def test_pca_draws_the_same_picture_whatever_the_row_order():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 16)) * np.linspace(3, 0.2, 16)
    perm = rng.permutation(300)
    coords, _ = pca_3d(x)
    shuffled, _ = pca_3d(x[perm], chunk_size=64)  # other summation order and chunking; no axis may flip
    np.testing.assert_allclose(shuffled, coords[perm], atol=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_each_pca_axis_points_where_its_largest_loading_is_positive(seed):
    rng = np.random.default_rng(seed)
    centred = rng.normal(size=(100, 3))
    centred -= centred.mean(axis=0)
    latent, _ = np.linalg.qr(centred)  # orthonormal, zero-mean columns: exactly uncorrelated
    latent *= np.array([4.0, 2.0, 1.0])
    rotation, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    axes = rotation[:, :3]
    coords, _ = pca_3d(latent @ axes.T)
    signs = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(3)])  # the convention, for the axes used here
    np.testing.assert_allclose(coords, latent * signs, atol=1e-4)


def test_pca_of_fewer_dimensions_than_three_pads_with_zeros():
    coords, explained = pca_3d(np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]]))
    np.testing.assert_allclose(np.abs(coords[:, 0]), [2.0, 0.0, 2.0], atol=1e-6)
    assert (coords[:, 1:] == 0).all() and explained[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="finite, non-empty"):
        pca_3d(np.array([[np.nan, 1.0]]))


def test_method_choice(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # as when umap-learn is not installed
    assert resolve_method("auto", 10_000) == "pca" and resolve_method("auto", 10) == "pca"
    with pytest.raises(SystemExit, match="pip install umap-learn"):
        project(np.eye(8), method="umap")
    with pytest.raises(ValueError, match="auto, umap or pca"):
        resolve_method("tsne", 10)


@pytest.fixture
def data_dir(tmp_path):
    """Prompts from the test fixtures, random unit vectors saved in reverse order, kat_density weights."""
    kat_pairs.main(["--local_dir=tests/fixtures/kat", f"--out_dir={tmp_path}"])
    prompts = KatData(tmp_path).prompts()
    vectors = np.random.default_rng(0).normal(size=(len(prompts), 24))
    KatData(tmp_path).save_embeddings([p["id"] for p in prompts][::-1], vectors[::-1])
    kat_density.main([f"--data_dir={tmp_path}", "--k=3", "--device_type=cpu"])
    return tmp_path


def test_map_is_well_formed_follows_the_prompts_and_joins_weights_by_id(data_dir):
    prompts = KatData(data_dir).prompts()
    weights = {row["id"]: row for row in KatData(data_dir).weights()}
    out = embedding_map.main([f"--data_dir={data_dir}"])  # the CLI: method auto, seed 0
    assert out == data_dir / MAP_FILE and not (data_dir / (MAP_FILE + ".tmp")).exists()
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["method"] == "pca" and doc["n"] == len(prompts) and doc["dim"] == 24
    assert doc["sources"] == sorted({p["src"] for p in prompts}) and len(doc["sources"]) == 3
    assert doc["weights"] == {"file": WEIGHTS_FILE, "note": "", "joined": len(prompts)}
    points = doc["points"]
    assert [p["id"] for p in points] == [p["id"] for p in prompts]
    for point, prompt in zip(points, prompts):
        assert set(point) == {"id", "x", "y", "z", "src", "split", "weight", "density", "text"}
        assert all(np.isfinite(point[axis]) for axis in "xyz")
        assert (point["src"], point["split"]) == (prompt["src"], prompt["split"])
        assert point["weight"] == weights[prompt["id"]]["weight"] and point["density"] == weights[prompt["id"]]["density"]
        assert point["text"] == first_user_message(prompt["prefix"])  # the fixtures' questions are short
    assert sum(p["weight"] for p in points if p["split"] == "train") == pytest.approx(1.0)
    assert all(p["weight"] == 0 for p in points if p["split"] == "test")


def test_hover_text_is_the_first_user_message_cut_to_length():
    long = "why " * 100
    prefix = {"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "a"},
                           {"role": "user", "content": "later"}]}
    text = hover_text(prefix)
    assert len(text) == TEXT_CHARS and text == long[:TEXT_CHARS - 1] + "\u2026"
    assert hover_text({"messages": [{"role": "user", "content": "short"}]}) == "short"


def test_weights_older_than_the_embeddings_are_ignored(data_dir):
    later = (data_dir / WEIGHTS_FILE).stat().st_mtime + 10
    os.utime(data_dir / EMBEDDINGS_FILE, (later, later))  # vectors re-embedded after the weights were made
    doc = json.loads(build_map(data_dir, method="pca").read_text(encoding="utf-8"))
    assert all(p["weight"] is None and p["density"] is None for p in doc["points"])
    assert doc["weights"]["joined"] == 0 and "older than" in doc["weights"]["note"]


def test_map_refuses_embeddings_of_other_prompts(data_dir):
    ids = [p["id"] for p in KatData(data_dir).prompts()]
    KatData(data_dir).save_embeddings(ids[:-1] + ["0123456789abcdef"], np.eye(len(ids), 24) + 0.1)
    with pytest.raises(SystemExit, match="1 of 9 prompts lack an embedding.*rerun python -m scripts.kat_embed"):
        build_map(data_dir)


def test_viz_page_is_self_contained_and_fetches_the_map_route():
    page = VIZ.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""\b(src|href)\s*=\s*["']?(//|[a-z]+:)""", page, re.IGNORECASE)
    assert not re.search(r"<link\b|@import|\bimport\s*\(", page)
    assert f'"{MAP_ROUTE}"' in page
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page  # prompt text is data, never markup
