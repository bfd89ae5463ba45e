"""
Density weights: exact kNN, rare prompts weigh most, clipping, ESS, centring and the adaptive bandwidth
on anisotropic embeddings, joins by id, the GRPO prompt sampler.
"""

import json
import re
import subprocess
import sys
import zlib
from functools import partial

import numpy as np
import pytest
from scipy import stats as scipy_stats

from dev.kat_sample_topics import HARMLESS, ISOLATED
from nanochat.common import REPO_ROOT
from nanochat.kat.data import (EMBEDDINGS_FILE, HISTOGRAM_FILE, PROMPTS_FILE, STATS_FILE, WEIGHTS_META_FILE, KatData,
                               join_weights)
from nanochat.kat.density import (PromptSampler, adaptive_tau, center_embeddings, density_weights, kish_ess, knn_cosine,
                                  knn_log_density)
from nanochat.kat.pairs import build_pair_files, iter_local_rows


def unit_rows(rng, n, dim):
    x = rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_embeddings(seed=0):
    """40 points in a tight cluster, 40 in a loose one, and one isolated point (the last row)."""
    rng = np.random.default_rng(seed)
    dim = 32
    tight = unit_rows(rng, 1, dim) + 0.02 * rng.normal(size=(40, dim))
    loose = unit_rows(rng, 1, dim) + 0.3 * rng.normal(size=(40, dim))
    isolated = unit_rows(rng, 1, dim)
    return np.concatenate([tight, loose, isolated])


def anisotropic_embeddings(seed=0, dim=32):
    """
    What mean-pooled LM vectors look like: one large direction every prompt shares (norm 8) plus a
    small per-prompt part holding the structure: 3 tight clusters and 3 looser ones of 25 prompts
    each, then 4 isolated prompts (the last rows). Every cosine similarity lands in 0.98-1.
    """
    rng = np.random.default_rng(seed)
    shared = 8.0 * unit_rows(rng, 1, dim)
    clusters = [centre + noise * rng.normal(size=(25, dim))
                for centre, noise in zip(unit_rows(rng, 6, dim), [0.02, 0.02, 0.02, 0.1, 0.1, 0.1])]
    return shared + np.concatenate(clusters + [unit_rows(rng, 4, dim)])


def weights_of(x, center: bool, tau: float = 0.0, k: int = 10):
    """kat_density's pipeline on an all-train set: (weights, tau used)."""
    train = np.ones(len(x), dtype=bool)
    sims, _ = knn_cosine(center_embeddings(x, train) if center else x, k)
    tau = tau or adaptive_tau(sims, train)
    return density_weights(knn_log_density(sims, tau), train, beta=1.0, clip=10.0), tau


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_centred_adaptive_weights_find_isolated_prompts_in_anisotropic_embeddings(seed):
    x = anisotropic_embeddings(seed)
    n, isolated = len(x), set(range(len(x) - 4, len(x)))
    sims, _ = knn_cosine(x, 10)
    assert sims.min() > 0.97  # the anisotropy the fix is for
    # the problem, as the old defaults had it: no centring, tau = 0.1 -> weights nearly uniform
    old, _ = weights_of(x, center=False, tau=0.1)
    assert kish_ess(old) > 0.99 * n and old.max() / old.min() < 1.3
    # centred, adaptive bandwidth: the isolated prompts weigh most, the tight clusters least
    new, tau = weights_of(x, center=True)
    assert set(np.argsort(-new)[:4]) == isolated
    assert new[-4:].min() > 2 * new[:-4].max()
    assert new[:75].max() < new[75:150].min()  # tight clusters below loose ones
    assert kish_ess(new) < 0.6 * n
    assert 0 < tau < 1


def test_center_embeddings_subtracts_the_train_mean_from_every_row():
    rng = np.random.default_rng(5)
    x = unit_rows(rng, 30, 8) + 4.0
    train = np.arange(30) % 3 != 0
    centred = center_embeddings(x, train)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    want = unit - unit[train].mean(axis=0)  # test rows get the train mean too, not their own
    np.testing.assert_allclose(centred, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)
    assert centred.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centred, axis=1), 1.0, atol=1e-6)
    assert np.abs((centred[train] * np.linalg.norm(want[train], axis=1, keepdims=True)).mean(axis=0)).max() < 1e-6
    with pytest.raises(ValueError, match="sit at the mean of the train embeddings"):
        center_embeddings(np.ones((4, 8)), np.ones(4, dtype=bool))


def test_adaptive_tau_is_the_robust_spread_and_makes_weights_scale_free():
    rng = np.random.default_rng(6)
    sims = np.sort(rng.uniform(0.2, 0.9, size=(200, 5)), axis=1)[:, ::-1]
    train = np.arange(200) % 4 != 0
    means = sims[train].mean(axis=1)
    q25, q75 = np.quantile(means, [0.25, 0.75])
    assert adaptive_tau(sims, train) == pytest.approx((q75 - q25) / 1.349)
    # an embedding model whose similarities sit 20x closer to 1 gets the same weights
    packed = 1 - (1 - sims) / 20
    weights = density_weights(knn_log_density(sims, adaptive_tau(sims, train)), train)
    packed_weights = density_weights(knn_log_density(packed, adaptive_tau(packed, train)), train)
    np.testing.assert_allclose(packed_weights, weights, rtol=1e-9)
    # the middle half of the prompts tied (IQR 0): the standard deviation; all tied: no bandwidth exists
    tied = np.concatenate([np.full((80, 5), 0.5), sims[:20]])
    assert adaptive_tau(tied, np.ones(100, dtype=bool)) == pytest.approx(tied.mean(axis=1).std())
    with pytest.raises(ValueError, match="pass --tau"):
        adaptive_tau(np.full((10, 3), 0.5), np.ones(10, dtype=bool))


def test_kat_density_records_centring_tau_and_warns_when_weights_are_nearly_uniform(tmp_path):
    from scripts.kat_density import main
    x = anisotropic_embeddings(0)
    ids = [f"{i:016x}" for i in range(len(x))]
    prompts = [{"id": pid, "prefix": {"messages": [{"role": "user", "content": f"question {i}"}]}, "src": "hh-rlhf",
                "n_pairs": 1, "split": "test" if i % 10 == 9 else "train"} for i, pid in enumerate(ids)]
    (tmp_path / PROMPTS_FILE).write_text("".join(json.dumps(p) + "\n" for p in prompts))
    KatData(tmp_path).save_embeddings(ids, x)
    train = np.array([p["split"] == "train" for p in prompts])

    main([f"--data_dir={tmp_path}", "--device_type=cpu"])
    meta = json.loads((tmp_path / WEIGHTS_META_FILE).read_text())
    sims, _ = knn_cosine(center_embeddings(x, train), 10, key_mask=train)
    assert meta["center"] is True and meta["tau"] == pytest.approx(adaptive_tau(sims, train), rel=1e-6)
    assert meta["tau_rule"].startswith("adaptive") and meta["near_uniform_warning"] is None
    assert meta["kish_ess"] < 0.6 * meta["n_train"]
    rows = KatData(tmp_path).weights("train")
    top = sorted(rows, key=lambda r: -r["weight"])[:3]
    assert {r["id"] for r in top} <= set(ids[-4:])  # the isolated prompts that are in train
    assert "WARNING" not in (tmp_path / STATS_FILE).read_text()

    main([f"--data_dir={tmp_path}", "--device_type=cpu", "--center=false", "--tau=0.1"])
    meta = json.loads((tmp_path / WEIGHTS_META_FILE).read_text())
    assert meta["center"] is False and meta["tau"] == 0.1 and meta["tau_rule"] == "set by --tau"
    assert meta["kish_ess"] > 0.95 * meta["n_train"] and "nearly uniform" in meta["near_uniform_warning"]
    assert "WARNING: the weights are nearly uniform" in (tmp_path / STATS_FILE).read_text()
    with pytest.raises(SystemExit, match="--tau must be > 0"):
        main([f"--data_dir={tmp_path}", "--tau=-1"])


def test_save_and_load_embeddings_round_trip_and_reject_stale_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 8)) * 3
    KatData(tmp_path).save_embeddings(["a", "b", "c", "d", "e"], x)
    ids, loaded = KatData(tmp_path).embeddings()
    assert ids == ["a", "b", "c", "d", "e"] and loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)
    with pytest.raises(ValueError, match="one unique, non-empty, single-line id per embedding row"):
        KatData(tmp_path).save_embeddings(["a", "a", "c", "d", "e"], x)
    np.save(tmp_path / EMBEDDINGS_FILE, x.astype(np.float32))  # not normalised: written behind save_embeddings' back
    with pytest.raises(ValueError, match="not L2-normalised"):
        KatData(tmp_path).embeddings()


@pytest.mark.parametrize("with_keys", [False, True])
def test_knn_equals_brute_force(with_keys):
    rng = np.random.default_rng(1)
    x = unit_rows(rng, 300, 16).astype(np.float32)
    key_mask = rng.random(300) < 0.7 if with_keys else np.ones(300, dtype=bool)
    sims, idx = knn_cosine(x, 7, key_mask=key_mask if with_keys else None, chunk_size=37)
    full = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(full, -np.inf)
    full[:, ~key_mask] = -np.inf
    want_idx = np.argsort(-full, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(sims, np.take_along_axis(full, want_idx, axis=1), atol=1e-5)


def test_knn_counts_a_duplicate_as_a_neighbour_but_never_itself():
    rng = np.random.default_rng(2)
    x = unit_rows(rng, 20, 8)
    x[5] = x[3]
    sims, idx = knn_cosine(x, 3)
    assert idx[3, 0] == 5 and idx[5, 0] == 3 and sims[3, 0] == pytest.approx(1.0, abs=1e-6)
    assert not (idx == np.arange(20)[:, None]).any()
    with pytest.raises(ValueError, match="k=20 needs at least k\\+1"):
        knn_cosine(x, 20)


def test_density_increases_with_every_neighbour_similarity():
    base = np.array([[0.9, 0.8, 0.5]])
    for j in range(3):
        closer = base.copy()
        closer[0, j] += 0.05
        assert knn_log_density(closer, 0.1)[0] > knn_log_density(base, 0.1)[0]
    assert knn_log_density(np.ones((1, 3)), 0.1)[0] == pytest.approx(0.0)  # all duplicates: density 1


def test_isolated_prompt_gets_the_largest_weight_and_a_tight_cluster_small_ones():
    x = clustered_embeddings()
    sims, _ = knn_cosine(x, 10)
    weights = density_weights(knn_log_density(sims, 0.1), np.ones(len(x), dtype=bool), beta=1.0, clip=0)
    assert weights.argmax() == len(x) - 1
    tight, loose = weights[:40], weights[40:80]
    assert tight.max() < loose.min() and tight.max() < 1 / len(x)


def test_beta_zero_gives_uniform_weights_over_train_and_zero_on_test():
    log_density = np.random.default_rng(3).normal(size=50)
    train = np.arange(50) % 5 != 0
    weights = density_weights(log_density, train, beta=0.0)
    np.testing.assert_allclose(weights[train], 1 / train.sum())
    assert (weights[~train] == 0).all()
    weights = density_weights(log_density, train, beta=1.0)
    assert weights.sum() == pytest.approx(1.0) and (weights[~train] == 0).all()


def test_clip_caps_weights_at_a_multiple_of_the_median():
    log_density = np.concatenate([np.zeros(20), [-8.0, -6.0]])  # two very rare prompts
    train = np.ones(22, dtype=bool)
    unclipped = density_weights(log_density, train, beta=1.0, clip=0)
    assert unclipped.max() / np.median(unclipped) > 100
    clipped = density_weights(log_density, train, beta=1.0, clip=3.0)
    assert clipped.max() / np.median(clipped) == pytest.approx(3.0)
    assert clipped[-1] == clipped[-2] and clipped.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="must be >= 1"):
        density_weights(log_density, train, clip=0.5)


def test_kish_ess():
    assert kish_ess(np.full(7, 3.0)) == pytest.approx(7.0)
    assert kish_ess([0, 0, 5.0, 0]) == pytest.approx(1.0)
    assert kish_ess([1.0, 1.0, 2.0]) == pytest.approx(16 / 6)


def test_weights_join_pairs_by_prompt_id_not_by_position():
    weight_ids, weights = ["p1", "p2", "p3"], np.array([0.5, 0.3, 0.2])
    pairs = [{"prompt_id": pid} for pid in ["p3", "p1", "p3", "p2", "p3", "p1"]]
    per_pair = join_weights([p["prompt_id"] for p in pairs], weight_ids, weights)
    np.testing.assert_array_equal(per_pair, [0.2, 0.5, 0.2, 0.3, 0.2, 0.5])
    with pytest.raises(KeyError, match="no weight"):
        join_weights(["p4"], weight_ids, weights)


def test_sampler_frequencies_match_the_weights():
    ids = [f"p{i}" for i in range(20)]
    weights = np.random.default_rng(4).random(20) + 0.05
    sampler = PromptSampler(ids, weights, seed=7)
    draws = [pid for step in range(50) for pid in sampler.sample(1000, step)]
    observed = np.array([draws.count(pid) for pid in ids])
    expected = weights / weights.sum() * len(draws)
    assert scipy_stats.chisquare(observed, expected).pvalue > 0.001


def test_sampler_uniform_mode_ignores_weights():
    ids = [f"p{i}" for i in range(20)]
    skewed = np.array([100.0] + [1.0] * 19)
    sampler = PromptSampler(ids, skewed, seed=7, mode="uniform")
    draws = [pid for step in range(50) for pid in sampler.sample(1000, step)]
    observed = np.array([draws.count(pid) for pid in ids])
    assert scipy_stats.chisquare(observed).pvalue > 0.001


def test_shuffled_sampler_keeps_the_weights_and_drops_the_density():
    """The sampler's control: the density weights permuted across prompts by a fixed permutation, so
    the same multiset of weights (the same Kish ESS) lands on other prompts, whatever the seed."""
    ids = [f"p{i}" for i in range(40)]
    weights = np.random.default_rng(5).random(40) ** 3 + 0.01
    density = PromptSampler(ids, weights, seed=7, mode="density")
    shuffled = PromptSampler(ids, weights, seed=7, mode="shuffled")
    np.testing.assert_allclose(np.sort(shuffled.probs), np.sort(density.probs))
    assert kish_ess(shuffled.probs) == pytest.approx(kish_ess(density.probs))
    assert np.abs(shuffled.probs - density.probs).sum() > 0.5  # most of the mass moved to other prompts
    assert np.corrcoef(shuffled.probs, density.probs)[0, 1] < 0.5
    np.testing.assert_array_equal(PromptSampler(ids, weights, seed=99, mode="shuffled").probs, shuffled.probs)
    assert shuffled.sample(64, 0) != density.sample(64, 0)
    draws = [pid for step in range(40) for pid in shuffled.sample(1000, step)]
    observed = np.array([draws.count(pid) for pid in ids])
    assert scipy_stats.chisquare(observed, shuffled.probs * len(draws)).pvalue > 0.001
    with pytest.raises(ValueError, match="needs weights"):
        PromptSampler(ids, seed=7, mode="shuffled")


@pytest.mark.slow
def test_sampler_is_a_function_of_seed_and_step_in_any_process():
    ids = [f"p{i}" for i in range(50)]
    weights = list(np.linspace(1, 2, 50))
    sampler = PromptSampler(ids, weights, seed=3)
    assert sampler.sample(16, 5) == PromptSampler(ids, weights, seed=3).sample(16, 5)
    assert sampler.sample(16, 5) != sampler.sample(16, 6)
    assert sampler.sample(16, 5) != PromptSampler(ids, weights, seed=4).sample(16, 5)
    code = ("import json, sys; from nanochat.kat.density import PromptSampler; ids, w = json.loads(sys.argv[1]); "
            "print(json.dumps(PromptSampler(ids, w, seed=3).sample(16, 5)))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps([ids, weights])], capture_output=True, text=True,
                         cwd=REPO_ROOT, check=True).stdout
    assert json.loads(out) == sampler.sample(16, 5)


def hashed_word_embedding(text, dim=512):
    """A deterministic stand-in for scripts.kat_embed: counts of hashed lower-case words."""
    v = np.zeros(dim)
    for word in re.findall(r"[a-z']+", text.lower()):
        v[zlib.crc32(word.encode()) % dim] += 1
    return v


def test_kat_density_script_end_to_end_on_the_tiny_samples(tmp_path):
    from scripts.kat_density import main
    build_pair_files(("hh-rlhf", "ultrafeedback", "stack-exchange"),
                     partial(iter_local_rows, REPO_ROOT / "nanochat" / "samples" / "kat"), tmp_path, se_test_fraction=0.1)
    prompts = KatData(tmp_path).prompts()
    texts = ["\n".join(m["content"] for m in p["prefix"]["messages"]) for p in prompts]
    # rows in another order than prompts_all.jsonl: the script must align them by id
    KatData(tmp_path).save_embeddings([p["id"] for p in prompts][::-1], np.stack([hashed_word_embedding(t) for t in texts])[::-1])
    main([f"--data_dir={tmp_path}", "--k=5", "--device_type=cpu"])

    rows = {r["id"]: r for r in KatData(tmp_path).weights()}
    assert sum(r["weight"] for r in rows.values() if r["split"] == "train") == pytest.approx(1.0)
    assert all(r["weight"] == 0 for r in rows.values() if r["split"] == "test")
    meta = json.loads((tmp_path / WEIGHTS_META_FILE).read_text())
    assert meta["kish_ess"] == pytest.approx(kish_ess([r["weight"] for r in rows.values() if r["split"] == "train"]))
    # the samples' templated questions form dense clusters and their one-off questions are rare,
    # so one-offs weigh more (single-turn prompts without a Stack Exchange context line)
    one_off_texts = {question for question, _, _ in ISOLATED + HARMLESS}
    single = {t: rows[p["id"]]["weight"] for t, p in zip(texts, prompts) if p["split"] == "train" and "\n" not in t}
    one_off = [w for t, w in single.items() if t in one_off_texts]
    templated = [w for t, w in single.items() if t not in one_off_texts]
    assert len(one_off) >= 20 and len(templated) >= 100
    assert np.median(one_off) > 3 * np.median(templated)
    # the same prompt gets the same weight in every pair, joined by id
    pairs = KatData(tmp_path).pairs("train")
    per_pair = join_weights([p["prompt_id"] for p in pairs], list(rows), [r["weight"] for r in rows.values()])
    for pair, weight in zip(pairs, per_pair):
        assert weight == rows[pair["prompt_id"]]["weight"]
    stats_text = (tmp_path / STATS_FILE).read_text()
    assert "=== kat_pairs ===" in stats_text and "=== kat_density ===" in stats_text and "Kish effective sample size" in stats_text
    assert (tmp_path / HISTOGRAM_FILE).stat().st_size > 10_000
    sampler = KatData(tmp_path).prompt_sampler(seed=0)
    assert set(sampler.ids) == {pid for pid, r in rows.items() if r["split"] == "train"}


def test_kat_density_refuses_embeddings_that_miss_prompts(tmp_path):
    from scripts.kat_density import main
    build_pair_files(("ultrafeedback",), partial(iter_local_rows, REPO_ROOT / "tests" / "fixtures" / "kat"), tmp_path)
    prompts = KatData(tmp_path).prompts()
    KatData(tmp_path).save_embeddings([p["id"] for p in prompts[1:]], np.eye(len(prompts) - 1, 8) + 0.1)
    with pytest.raises(SystemExit, match=f"1 of {len(prompts)} prompts lack an embedding"):
        main([f"--data_dir={tmp_path}", "--k=1"])
