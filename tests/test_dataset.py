"""
Shard download (against a local HTTP server), split/stride semantics of the reader, and
the fallback to the bundled sample when nothing has been downloaded.
"""

import io
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.common import REPO_ROOT
from tests.http_fixtures import ScriptedServer, unreachable_url


def parquet_bytes(docs: list[str], row_group_size: int = 1000) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": docs}), sink, row_group_size=row_group_size)
    return sink.getvalue()


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setattr(dataset, "_announced_sample", False)
    return tmp_path / "base"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -----------------------------------------------------------------------------
# Downloading

def test_failing_then_succeeding_server_is_retried_and_shard_arrives_intact(base_dir, monkeypatch):
    body = parquet_bytes([f"document {i}" for i in range(50)])
    name = dataset.shard_filename(3)
    with ScriptedServer({name: body}, {name: [500, 503]}) as server:
        monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
        path = dataset.download_shard(3, attempts=5, base_delay=0.01)
    assert server.hits == [name] * 3
    assert path.read_bytes() == body
    assert leftovers(path.parent) == [name]


def test_missing_shard_is_not_retried(base_dir, monkeypatch):
    with ScriptedServer({}) as server:
        monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
        with pytest.raises(RuntimeError, match="not retried"):
            dataset.download_shard(7, attempts=5, base_delay=0.01)
    assert len(server.hits) == 1


def test_a_page_that_is_not_parquet_is_refused_and_leaves_no_file(base_dir, monkeypatch):
    name = dataset.shard_filename(2)
    with ScriptedServer({name: b"<html>please log in</html>"}) as server:
        monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
        with pytest.raises(ValueError, match="not a readable parquet file"):
            dataset.download_shard(2, attempts=5, base_delay=0.01)
    assert server.hits == [name]
    assert leftovers(dataset.get_data_dir()) == []


def test_present_shards_are_skipped_without_contacting_the_server(base_dir, monkeypatch):
    data_dir = dataset.get_data_dir()
    for index in (0, 1):
        (data_dir / dataset.shard_filename(index)).write_bytes(parquet_bytes([f"local {index}"]))
    with ScriptedServer({dataset.shard_filename(i): parquet_bytes(["remote"]) for i in (0, 1, 2)}) as server:
        monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
        failures = dataset.download_shards([0, 1, 2], workers=2, base_delay=0.01)
    assert failures == {}
    assert server.hits == [dataset.shard_filename(2)]
    assert pq.read_table(data_dir / dataset.shard_filename(0)).column("text").to_pylist() == ["local 0"]


def test_offline_says_so_and_points_to_the_bundled_sample(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_URL", unreachable_url())
    with pytest.raises(dataset.OfflineError, match="offline") as err:
        dataset.download_shard(0, attempts=2, base_delay=0.01)
    assert "tiny preset" in str(err.value) and str(dataset.SAMPLE_DIR) in str(err.value)


@pytest.mark.slow
def test_command_line_downloads_train_shards_and_the_validation_shard(base_dir, monkeypatch):
    names = [dataset.shard_filename(i) for i in (0, 1, dataset.MAX_SHARD)]
    bodies = {name: parquet_bytes([name]) for name in names}
    with ScriptedServer(bodies) as server:
        env = dict(os.environ, NANOCHAT_DATA_URL=server.url, NANOCHAT_BASE_DIR=str(base_dir))
        result = subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", "2", "-w", "3"],
                                cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
                                input="")
    assert result.returncode == 0, result.stdout + result.stderr
    assert leftovers(base_dir / "data_shards") == sorted(names)
    assert sorted(server.hits) == sorted(names)


# -----------------------------------------------------------------------------
# Reading

@pytest.fixture
def local_shards(tmp_path):
    """Three shards: 0 and 1 train (3 and 2 row groups of 2 docs), 2 val (1 row group)."""
    data_dir = tmp_path / "shards"
    data_dir.mkdir()
    layout = {0: 6, 1: 4, 2: 2}
    for index, n_docs in layout.items():
        docs = [f"s{index}d{i}" for i in range(n_docs)]
        (data_dir / dataset.shard_filename(index)).write_bytes(parquet_bytes(docs, row_group_size=2))
    (data_dir / "shard_000000.bin").write_bytes(b"\0\0")  # pretokenized files are not parquet shards
    return data_dir


def test_list_parquet_files_is_sorted_and_parquet_only(local_shards):
    assert [p.name for p in dataset.list_parquet_files(local_shards)] == [
        dataset.shard_filename(i) for i in (0, 1, 2)]


def test_split_is_all_but_last_for_train_and_last_for_val(local_shards):
    train = list(dataset.parquets_iter_batched("train", data_dir=local_shards))
    val = list(dataset.parquets_iter_batched("val", data_dir=local_shards))
    assert train == [["s0d0", "s0d1"], ["s0d2", "s0d3"], ["s0d4", "s0d5"], ["s1d0", "s1d1"], ["s1d2", "s1d3"]]
    assert val == [["s2d0", "s2d1"]]


def test_start_step_stride_over_row_groups_of_the_whole_split(local_shards):
    every = list(dataset.parquets_iter_batched("train", data_dir=local_shards))
    world_size = 2
    per_rank = [list(dataset.parquets_iter_batched("train", start=r, step=world_size, data_dir=local_shards))
                for r in range(world_size)]
    assert per_rank[0] == every[0::2] and per_rank[1] == every[1::2]
    docs = [set(d for rg in rank_rgs for d in rg) for rank_rgs in per_rank]
    assert docs[0].isdisjoint(docs[1])
    assert docs[0] | docs[1] == set(d for rg in every for d in rg)


def test_bad_split_and_too_few_shards_fail_clearly(local_shards, tmp_path):
    with pytest.raises(ValueError, match="split must be"):
        next(dataset.parquets_iter_batched("test", data_dir=local_shards))
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / dataset.shard_filename(0)).write_bytes(parquet_bytes(["only"]))
    with pytest.raises(FileNotFoundError, match="at least 2"):
        next(dataset.parquets_iter_batched("train", data_dir=lonely))


# -----------------------------------------------------------------------------
# The bundled sample

def test_without_downloaded_shards_readers_fall_back_to_the_sample_and_say_so_once(base_dir, capsys):
    sample = sorted(dataset.SAMPLE_DIR.glob("shard_*.parquet"))
    assert dataset.list_parquet_files() == sample
    assert dataset.list_parquet_files() == sample
    assert capsys.readouterr().out.count("bundled sample") == 1
    assert dataset.split_files("train") == sample[:-1]
    assert dataset.split_files("val") == sample[-1:]
    first_val = next(dataset.parquets_iter_batched("val"))
    assert first_val == pq.ParquetFile(sample[-1]).read_row_group(0).column("text").to_pylist()


def test_a_downloaded_shard_replaces_the_sample(base_dir):
    shard = dataset.get_data_dir() / dataset.shard_filename(0)
    shard.write_bytes(parquet_bytes(["real"]))
    assert dataset.list_parquet_files() == [shard]


def test_bundled_sample_has_the_real_shard_format():
    files = sorted(dataset.SAMPLE_DIR.glob("shard_*.parquet"))
    assert len(files) >= 4
    assert sum(f.stat().st_size for f in files) < 6e6
    n_docs, n_chars = 0, 0
    for f in files:
        meta = pq.ParquetFile(f)
        assert meta.schema_arrow.names == ["text"]
        assert all(meta.metadata.row_group(i).num_rows <= 1000 for i in range(meta.num_row_groups))
        docs = pq.read_table(f).column("text").to_pylist()
        assert all(isinstance(d, str) and d.strip() for d in docs)
        n_docs += len(docs)
        n_chars += sum(map(len, docs))
    assert n_docs > 4000 and n_chars > 5e6  # enough for the tiny preset's tokenizer and model
