"""
nanochat.download.download_file against a local HTTP server: what is retried and with which
delays, what is final at once, and that dest is either complete and checked or absent.
"""

import os
from pathlib import Path

import pytest

from nanochat import download
from nanochat.download import DownloadError, OfflineError, download_file
from tests.http_fixtures import ScriptedServer, unreachable_url

BODY = bytes(range(256)) * 4000  # ~1 MB: more than one read chunk


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def sleeps(monkeypatch):
    """The backoff delays download_file asks for, recorded instead of slept."""
    asked = []
    monkeypatch.setattr(download.time, "sleep", asked.append)
    return asked


def test_server_errors_and_429_are_retried_with_exponential_backoff(tmp_path, sleeps):
    with ScriptedServer({"f.bin": BODY}, {"f.bin": [500, 503, 429]}) as server:
        dest = download_file(f"{server.url}/f.bin", tmp_path / "f.bin", attempts=5, base_delay=0.5)
    assert server.hits == ["f.bin"] * 4
    assert sleeps == [0.5, 1.0, 2.0]
    assert dest == tmp_path / "f.bin" and dest.read_bytes() == BODY
    assert leftovers(tmp_path) == ["f.bin"]


def test_a_truncated_body_leaves_no_file_and_is_retried_to_completion(tmp_path, sleeps):
    with ScriptedServer({"f.bin": BODY}, {"f.bin": ["cut", "cut"]}) as server:
        with pytest.raises(DownloadError, match=r"gave up after 2 attempts.*closed after \d+ of \d+ bytes"):
            download_file(f"{server.url}/f.bin", tmp_path / "f.bin", attempts=2, base_delay=0.01)
        assert leftovers(tmp_path) == []  # neither dest nor a temporary file
        dest = download_file(f"{server.url}/f.bin", tmp_path / "f.bin", attempts=2, base_delay=0.01)
    assert server.hits == ["f.bin"] * 3 and dest.read_bytes() == BODY
    assert leftovers(tmp_path) == ["f.bin"]


def test_a_stalled_transfer_times_out_and_is_retried(tmp_path, sleeps):
    with ScriptedServer({"f.bin": BODY}, {"f.bin": ["stall"]}) as server:
        dest = download_file(f"{server.url}/f.bin", tmp_path / "f.bin", attempts=2, timeout=0.2)
    assert server.hits == ["f.bin"] * 2 and dest.read_bytes() == BODY
    assert leftovers(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("status", [404, 403])
def test_a_client_error_is_final_at_once(tmp_path, sleeps, status):
    with ScriptedServer({"f.bin": BODY}, {"f.bin": [status]}) as server:
        with pytest.raises(DownloadError, match=f"HTTP {status}.*attempt 1/5.*not retried"):
            download_file(f"{server.url}/f.bin", tmp_path / "f.bin", attempts=5)
    assert server.hits == ["f.bin"] and sleeps == []
    assert leftovers(tmp_path) == []


def test_a_url_urllib_cannot_use_is_final_at_once(tmp_path, sleeps):
    with pytest.raises(DownloadError, match="unknown url type.*not retried"):
        download_file("htps://127.0.0.1/f.bin", tmp_path / "f.bin", attempts=5)  # a typo is no outage
    assert sleeps == [] and leftovers(tmp_path) == []

def test_validate_sees_the_whole_file_and_its_refusal_leaves_no_file(tmp_path, sleeps):
    seen = []

    def refuse(path: Path):
        seen.append(path.read_bytes())
        raise ValueError("not what was asked for")

    with ScriptedServer({"f.bin": BODY}) as server:
        with pytest.raises(ValueError, match="not what was asked for"):
            download_file(f"{server.url}/f.bin", tmp_path / "f.bin", attempts=5, validate=refuse)
    assert seen == [BODY]
    assert server.hits == ["f.bin"] and sleeps == []  # the server sent what it meant to: no retry
    assert leftovers(tmp_path) == []


def test_unreachable_host_is_retried_then_reported_as_offline(tmp_path, sleeps, capsys):
    dest = tmp_path / "f.bin"
    with pytest.raises(OfflineError, match="looks offline") as err:
        download_file(unreachable_url("f.bin"), dest, attempts=3, base_delay=0.01)
    assert isinstance(err.value, DownloadError) and isinstance(err.value, ConnectionError)
    assert "after 3 attempts" in str(err.value) and f"copy the file to {dest}" in str(err.value)
    assert capsys.readouterr().out.count("failed (attempt") == 3 and len(sleeps) == 2
    assert leftovers(tmp_path) == []


def test_an_existing_dest_is_returned_without_asking_the_server(tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"already here")
    with ScriptedServer({"f.bin": BODY}) as server:
        assert download_file(f"{server.url}/f.bin", dest) == dest
    assert server.hits == [] and dest.read_bytes() == b"already here"


def test_dest_folders_are_created_and_the_file_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    with ScriptedServer({"f.bin": BODY}) as server:
        dest = download_file(f"{server.url}/f.bin", tmp_path / "a" / "b" / "f.bin")
    assert dest.read_bytes() == BODY
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_attempts_must_be_at_least_one(tmp_path):
    with pytest.raises(ValueError, match="attempts must be at least 1"):
        download_file("http://127.0.0.1:9/f.bin", tmp_path / "f.bin", attempts=0)


def test_the_progress_bar_shows_only_on_a_terminal_or_when_asked_and_only_on_rank_0(tmp_path, monkeypatch, capsys):
    with ScriptedServer({"f.bin": BODY}) as server:
        download_file(f"{server.url}/f.bin", tmp_path / "quiet.bin")  # pytest's stderr is not a terminal
        assert "f.bin" not in capsys.readouterr().err
        monkeypatch.setenv("NANOCHAT_PROGRESS", "1")
        download_file(f"{server.url}/f.bin", tmp_path / "shown.bin")
        assert "shown.bin" in capsys.readouterr().err and (tmp_path / "shown.bin").read_bytes() == BODY
        monkeypatch.setenv("RANK", "3")
        download_file(f"{server.url}/f.bin", tmp_path / "other_rank.bin")
        assert "other_rank.bin" not in capsys.readouterr().err
        monkeypatch.setenv("NANOCHAT_PROGRESS", "yes")
        with pytest.raises(ValueError, match="NANOCHAT_PROGRESS must be 1, 0 or unset"):
            download_file(f"{server.url}/f.bin", tmp_path / "bad_setting.bin")
