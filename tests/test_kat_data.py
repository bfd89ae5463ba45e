"""
The data contract (nanochat/kat/data.py): rows checked as they load, naming file, line and field;
the one staleness check and what it tells the user to rerun; the join by prompt id; quintiles;
and kat_pairs refusing an empty local source file.
"""

import json
import os
import re
from functools import partial

import numpy as np
import pytest

from nanochat.common import REPO_ROOT
from nanochat.kat.data import (PAIRS_FILE, PROMPTS_FILE, WEIGHTS_FILE, KatData, KatDataError, StaleData,
                               density_quintiles)
from nanochat.kat.pairs import EmptySourceFile, build_pair_files, iter_local_rows
from scripts import train_rm

SPLITS = ["train"] * 7 + ["test"] * 3


def prompt_row(i: int) -> dict:
    return {"id": f"p{i}", "prefix": {"messages": [{"role": "user", "content": f"question {i}?"}]},
            "src": "hh-rlhf", "n_pairs": 1, "split": SPLITS[i]}


def pair_row(i: int) -> dict:
    prompt = prompt_row(i)
    return {"id": f"pair{i}", "prompt_id": prompt["id"], "prefix": prompt["prefix"], "chosen": "yes", "rejected": "no",
            "src": prompt["src"], "split": prompt["split"]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def save_weights(data: KatData, ids, splits, log_density, k: int = 3):
    log_density = np.asarray(log_density, dtype=np.float64)
    train = np.array(splits) == "train"
    weights = np.where(train, np.exp(-log_density), 0.0)
    data.save_prompt_weights(ids, splits, log_density, np.full(len(ids), 0.5), weights / weights.sum(),
                             meta={"flags": {"k": k, "beta": 1.0}})


@pytest.fixture
def data(tmp_path) -> KatData:
    """Ten prompts and their pairs, embeddings, then weights (written in that order, as the stages do)."""
    data = KatData(tmp_path)
    write_jsonl(data.pairs_file, [pair_row(i) for i in range(10)])
    write_jsonl(data.prompts_file, [prompt_row(i) for i in range(10)])
    ids = [f"p{i}" for i in range(10)]
    data.save_embeddings(ids[::-1], np.random.default_rng(0).normal(size=(10, 8)))  # any row order: joined by id
    save_weights(data, ids, SPLITS, -np.arange(10.0))
    later = data.embeddings_file.stat().st_mtime + 1
    os.utime(data.weights_file, (later, later))
    return data


def test_default_folder_and_named_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_KAT_CACHE", str(tmp_path / "cache"))
    data = KatData()
    assert data.dir == tmp_path / "cache" / "data" and KatData("").dir == data.dir
    assert data.pairs_file == data.dir / "pairs_all.jsonl" and data.prompts_file == data.dir / "prompts_all.jsonl"
    assert data.weights_file.name == "prompt_weights.jsonl" and data.weights_meta_file.name == "prompt_weights.json"
    assert data.embeddings_file.name == "prompt_embeddings.npy" and data.map_file.name == "embedding_map.json"


def test_readers_return_rows_by_split(data):
    assert [p["id"] for p in data.pairs("test")] == ["pair7", "pair8", "pair9"]
    assert len(data.pairs()) == 10 and [p["id"] for p in data.prompts("train")] == [f"p{i}" for i in range(7)]
    assert [r["id"] for r in data.weights("test")] == ["p7", "p8", "p9"]
    # extra fields are kept: kat_inject adds "chosen_clean" and "injection"
    write_jsonl(data.pairs_file, [{**pair_row(0), "chosen_clean": "y", "injection": {"style": "emdash"}}])
    assert data.pairs()[0]["chosen_clean"] == "y"


# -----------------------------------------------------------------------------
# Rows checked as they load

def broken(row: dict, **changes) -> dict:
    out = {**row, **changes}
    return {k: v for k, v in out.items() if v is not DROP}


DROP = object()
CASES = [  # (file, reader, bad row, field the message must name, stage it must tell to rerun)
    (PAIRS_FILE, "pairs", broken(pair_row(2), chosen=DROP), "chosen", "scripts.kat_pairs"),
    (PAIRS_FILE, "pairs", broken(pair_row(2), split="dev"), "split", "scripts.kat_pairs"),
    (PAIRS_FILE, "pairs", broken(pair_row(2), rejected=None), "rejected", "scripts.kat_pairs"),
    (PAIRS_FILE, "pairs", broken(pair_row(2), prefix={"messages": [{"role": "user", "content": "q"},
                                                                  {"role": "assistant", "content": "a"}]}),
     "prefix", "scripts.kat_pairs"),
    (PROMPTS_FILE, "prompts", broken(prompt_row(2), n_pairs="1"), "n_pairs", "scripts.kat_pairs"),
    (PROMPTS_FILE, "prompts", broken(prompt_row(2), prefix={"messages": []}), "prefix", "scripts.kat_pairs"),
    (PROMPTS_FILE, "prompts", broken(prompt_row(2), id=DROP), "id", "scripts.kat_pairs"),
    (WEIGHTS_FILE, "weights", {"id": "p2", "split": "train", "weight": float("nan"), "density": 1.0,
                               "log_density": 0.0, "knn_mean_sim": 0.5}, "weight", "scripts.kat_density"),
    (WEIGHTS_FILE, "weights", {"id": "p2", "split": "train", "weight": 0.1, "density": float("inf"),
                               "log_density": 0.0, "knn_mean_sim": 0.5}, "density", "scripts.kat_density"),
    (WEIGHTS_FILE, "weights", {"id": "p2", "split": "train", "weight": -0.1, "density": 1.0,
                               "log_density": 0.0, "knn_mean_sim": 0.5}, "weight", "scripts.kat_density"),
    (WEIGHTS_FILE, "weights", {"id": "p2", "split": "train", "weight": 0.1, "density": 1.0, "log_density": True,
                               "knn_mean_sim": 0.5}, "log_density", "scripts.kat_density"),
]


@pytest.mark.parametrize("name, reader, row, field, stage", CASES)
def test_a_bad_row_names_file_line_field_and_what_to_rerun(data, name, reader, row, field, stage):
    path = data.dir / name
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[2] = json.dumps(row) + "\n"  # line 3
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(KatDataError) as caught:
        getattr(data, reader)()
    message = str(caught.value)
    assert message.startswith(f"{path}:3: field {field!r} ")
    assert f"rerun python -m {stage}" in message


@pytest.mark.parametrize("name, reader", [(PAIRS_FILE, "pairs"), (PROMPTS_FILE, "prompts"), (WEIGHTS_FILE, "weights")])
def test_a_line_that_is_not_json_names_file_and_line(data, name, reader):
    path = data.dir / name
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[4] = lines[4][:-10] + "\n"  # a row cut short, as by a crash mid-write
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(KatDataError, match=rf"^{re.escape(str(path))}:5: not JSON .*; rerun python -m scripts\.kat_"):
        getattr(data, reader)()


def test_a_row_that_is_not_an_object_and_a_repeated_id_are_named(data):
    with open(data.pairs_file, "a", encoding="utf-8") as f:
        f.write("\n[1, 2]\n")  # blank lines are skipped, but still counted
    with pytest.raises(KatDataError, match=rf"{re.escape(str(data.pairs_file))}:12: the line holds a JSON list"):
        data.pairs()
    with open(data.prompts_file, "a", encoding="utf-8") as f:
        f.write(json.dumps(prompt_row(4)) + "\n")
    with pytest.raises(KatDataError, match=r":11: field 'id' repeats 'p4' of line 5"):
        data.prompts()


def test_train_rm_stops_at_load_on_a_pair_without_chosen(data, tmp_path):
    """Before the contract such a row loaded silently and train_rm died with a bare KeyError at its step."""
    pairs = [pair_row(i) for i in range(10)]
    del pairs[5]["chosen"]
    write_jsonl(data.pairs_file, pairs)
    with pytest.raises(KatDataError, match=rf"{re.escape(str(data.pairs_file))}:6: field 'chosen' is missing"):
        train_rm.main([f"--data_dir={data.dir}", "--device_type=cpu", f"--out_dir={tmp_path / 'rm'}"])
    assert not (tmp_path / "rm" / "ckpt.pt").exists()


def test_a_missing_file_says_which_stage_writes_it(tmp_path):
    data = KatData(tmp_path)
    with pytest.raises(FileNotFoundError, match="pairs_all.jsonl is missing; run python -m scripts.kat_pairs first"):
        data.pairs()
    with pytest.raises(FileNotFoundError, match="prompt_weights.jsonl is missing; run python -m scripts.kat_density first"):
        data.weights()
    with pytest.raises(FileNotFoundError, match="prompt_embeddings.npy is missing; run python -m scripts.kat_embed first"):
        data.embeddings()


# -----------------------------------------------------------------------------
# The one staleness check

def test_current_data_passes_the_check(data):
    assert data.stale_embeddings() is None and data.stale_weights(density_k=3) is None
    data.check_current(density_k=3)


def test_embeddings_of_other_prompts_say_to_rerun_embed_then_density(data):
    write_jsonl(data.prompts_file, [prompt_row(i) for i in range(9)] + [{**prompt_row(9), "id": "p10"}])
    reason = data.stale_embeddings()
    assert reason == (f"{data.dir}: 1 of 10 prompts lack an embedding and 1 embeddings match no prompt (first: p10), so "
                      "prompt_embeddings_ids.txt is older than prompts_all.jsonl; rerun python -m scripts.kat_embed, "
                      "then python -m scripts.kat_density")
    with pytest.raises(StaleData, match=re.escape(reason)):
        data.check_current()
    # the weights depend on the embeddings: both must be redone
    assert data.stale_weights().endswith("rerun python -m scripts.kat_embed, then python -m scripts.kat_density")


def test_weights_older_than_the_embeddings_say_to_rerun_density(data):
    later = data.weights_file.stat().st_mtime + 10
    os.utime(data.embeddings_file, (later, later))  # re-embedded after the weights were made
    reason = data.stale_weights()
    assert reason == (f"{data.weights_file} is older than prompt_embeddings.npy (computed from other vectors); "
                      "rerun python -m scripts.kat_density")
    with pytest.raises(StaleData, match="older than"):
        data.check_current()


def test_weights_that_disagree_with_the_prompts_are_named(data):
    flipped = ["test" if i == 2 else s for i, s in enumerate(SPLITS)]
    save_weights(data, [f"p{i}" for i in range(10)], flipped, -np.arange(10.0))
    reason = data.stale_weights()
    assert reason == (f"{data.weights_file} does not describe prompts_all.jsonl: 0 of 10 prompts have no row, 0 rows match "
                      "no prompt and 1 disagree on the split (first: p2); rerun python -m scripts.kat_density")
    save_weights(data, [f"p{i}" for i in range(9)], SPLITS[:9], -np.arange(9.0))
    assert "1 of 10 prompts have no row" in data.stale_weights() and "first: p9" in data.stale_weights()
    # without embeddings to trust, the message sends the user back one more stage
    data.embeddings_file.unlink()
    data.embedding_ids_file.unlink()
    assert data.stale_weights().endswith("rerun python -m scripts.kat_embed, then python -m scripts.kat_density")
    with pytest.raises(StaleData):
        data.check_current()


def test_the_density_k_recorded_in_the_meta_file_is_checked(data):
    assert data.stale_weights(density_k=10) == (f"--density_k=10 but {data.weights_meta_file} was computed with k=3: "
                                                "rerun python -m scripts.kat_density --k=10 (or pass --density_k=3)")
    with pytest.raises(StaleData, match=r"kat_density --k=10"):
        data.check_current(density_k=10)
    data.check_current()  # no k asked for: not checked


def test_absent_derived_files_are_not_stale_but_reading_them_says_what_to_run(tmp_path):
    data = KatData(tmp_path)
    write_jsonl(data.prompts_file, [prompt_row(i) for i in range(10)])
    data.check_current(density_k=10)
    with pytest.raises(FileNotFoundError, match="run python -m scripts.kat_density first"):
        data.prompt_sampler(seed=0)


def test_the_check_sees_a_rewritten_prompts_file(data):
    data.check_current()
    write_jsonl(data.prompts_file, [prompt_row(i) for i in range(9)])  # the same object, the file changed under it
    with pytest.raises(StaleData, match="9 prompts have no row|1 embeddings match no prompt"):
        data.check_current()


# -----------------------------------------------------------------------------
# Joined by prompt id

def test_embeddings_are_aligned_with_the_prompts_by_id(data):
    ids, x = data.embeddings()
    assert ids == [f"p{i}" for i in range(10)][::-1]  # saved in reverse order
    prompts, aligned = data.prompt_embeddings()
    assert [p["id"] for p in prompts] == [f"p{i}" for i in range(10)]
    for prompt, row in zip(prompts, aligned):
        np.testing.assert_array_equal(row, x[ids.index(prompt["id"])])
    write_jsonl(data.prompts_file, [prompt_row(i) for i in range(9)] + [{**prompt_row(9), "id": "p10"}])
    with pytest.raises(StaleData, match="1 of 10 prompts lack an embedding"):
        data.prompt_embeddings()


def test_weights_are_joined_by_prompt_id_not_by_position(data):
    rows = {r["id"]: r for r in data.weights()}
    lines = data.weights_file.read_text().splitlines(keepends=True)
    data.weights_file.write_text("".join(reversed(lines)))  # another row order, the same answer
    ids = ["p3", "p0", "p3", "p6", "p0"]  # one entry per pair: repeats allowed
    np.testing.assert_array_equal(data.weights_by_prompt(ids, split="train"), [rows[i]["weight"] for i in ids])
    np.testing.assert_array_equal(data.weights_by_prompt(ids, field="log_density"), [rows[i]["log_density"] for i in ids])
    with pytest.raises(StaleData, match=r"0 have no row and 1 are not train there \(first: p8\)"):
        data.weights_by_prompt(["p1", "p8"], split="train")
    with pytest.raises(StaleData, match=r"1 have no row .*first: nope"):
        data.weights_by_prompt(["p1", "nope"])


def test_the_sampler_draws_from_the_train_rows_with_their_weights(data):
    sampler = data.prompt_sampler(seed=1)
    rows = data.weights("train")
    assert sampler.ids == [r["id"] for r in rows]
    np.testing.assert_allclose(sampler.probs, [r["weight"] for r in rows])
    assert data.prompt_sampler(seed=1, mode="uniform").probs is None


# -----------------------------------------------------------------------------
# Quintiles

def test_quintiles_by_rank_rarest_first_ties_by_id():
    density = {f"p{i}": float(d) for i, d in enumerate([5, 1, 9, 3, 7, 2, 8, 4, 6, 0])}
    quintile = density_quintiles(density)
    assert [sorted(pid for pid, q in quintile.items() if q == k) for k in range(1, 6)] == \
        [["p1", "p9"], ["p3", "p5"], ["p0", "p7"], ["p4", "p8"], ["p2", "p6"]]
    # any increasing function of the density gives the same quintiles (the report ranks log densities)
    assert density_quintiles({pid: np.log1p(d) for pid, d in density.items()}) == quintile
    # all tied: still five full quintiles, by id
    tied = density_quintiles({f"p{i}": 1.0 for i in range(10)})
    assert [tied[f"p{i}"] for i in range(10)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    # fewer prompts than quintiles: each prompt its own, the rarest in 1
    assert density_quintiles({"a": 2.0, "b": 1.0}) == {"b": 1, "a": 3}


def test_quintiles_of_the_data_use_the_densities_joined_by_id(data):
    ids = [f"p{i}" for i in range(10)]  # log density -i: p9 is the rarest
    assert data.density_quintiles(ids) == {f"p{i}": 5 - i // 2 for i in range(10)}
    test_ids = ["p9", "p7", "p8"]
    assert data.density_quintiles(test_ids) == density_quintiles({"p7": -7.0, "p8": -8.0, "p9": -9.0})


# -----------------------------------------------------------------------------
# kat_pairs: an empty local source file is an error naming it

def test_an_empty_local_source_file_is_an_error_naming_it(tmp_path):
    fixtures = REPO_ROOT / "tests" / "fixtures" / "kat"
    for name in ("ultrafeedback_train_prefs.jsonl", "ultrafeedback_test_prefs.jsonl"):
        (tmp_path / name).write_text((fixtures / name).read_text())
    build_pair_files(["ultrafeedback"], partial(iter_local_rows, tmp_path), tmp_path / "ok")  # both files have rows
    (tmp_path / "ultrafeedback_test_prefs.jsonl").write_text("\n  \n")  # blank lines only: no row
    with pytest.raises(EmptySourceFile, match=rf"ultrafeedback: {re.escape(str(tmp_path))}/ultrafeedback_test_prefs.jsonl "
                                              r"holds no rows.*--only"):
        build_pair_files(["ultrafeedback"], partial(iter_local_rows, tmp_path), tmp_path / "out")
    assert not (tmp_path / "out" / PAIRS_FILE).exists()


def test_held_out_prompts_split_the_test_prompts_into_two_disjoint_stable_parts(tmp_path):
    from nanochat.kat.data import held_out_part
    ids = [f"p{i}" for i in range(400)]
    parts = [held_out_part(i) for i in ids]
    assert set(parts) == {"dev", "final"} and 150 < parts.count("dev") < 250  # about half each
    assert parts == [held_out_part(i) for i in ids]  # a function of the id alone
    with pytest.raises(ValueError, match="one of"):
        KatData(tmp_path).held_out_prompts("test")
