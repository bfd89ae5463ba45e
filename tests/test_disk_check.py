"""
runs/lib.sh check_disk: a full run stops before its first stage when its disks cannot hold what it will write
(what a folder holds already counts, for a resumed run); df and du are replaced by stand-ins on PATH.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat.common import REPO_ROOT

GB_KB = 1048576


def fake_disk(tmp_path, free_gb: float, held_gb: float) -> dict:
    """An environment whose df reports free_gb available and whose du reports held_gb, for any folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "df").write_text("#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted'\n"
                                f"echo \"fake 1 1 {int(free_gb * GB_KB)} 1% $2\"\n")
    (bin_dir / "du").write_text(f"#!/bin/sh\nprintf '%s\\t%s\\n' {int(held_gb * GB_KB)} \"$2\"\n")
    for tool in ("df", "du"):
        (bin_dir / tool).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def check_disk(env, folder, need_gb) -> subprocess.CompletedProcess:
    script = f'source runs/lib.sh && check_disk "{folder}" {need_gb} "the checkpoints"'
    return subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("free_gb, held_gb, need_gb, fits", [
    (10, 0, 9, True), (10, 0, 11, False),
    (3, 8, 10, True),  # a resumed run: what the folder holds counts towards the need
    (3, 6, 10, False),
])
def test_the_need_is_compared_with_free_space_plus_what_the_folder_holds(tmp_path, free_gb, held_gb, need_gb, fits):
    result = check_disk(fake_disk(tmp_path, free_gb, held_gb), tmp_path, need_gb)
    if fits:
        assert result.returncode == 0 and f"has room for the checkpoints (about {need_gb} GB)" in result.stdout
    else:
        assert result.returncode == 1
        assert (f"[FAIL] the checkpoints needs about {need_gb} GB in {tmp_path}, which holds {held_gb} GB with "
                f"{free_gb} GB free") in result.stderr
        assert "NANOCHAT_DISK_CHECK=0" in result.stderr


def test_zero_need_and_the_opt_out_skip_the_check(tmp_path):
    env = fake_disk(tmp_path, 0, 0)
    assert check_disk(env, tmp_path, 0).returncode == 0
    assert check_disk({**env, "NANOCHAT_DISK_CHECK": "0"}, tmp_path, 500).returncode == 0
    assert check_disk(env, tmp_path, 500).returncode == 1


@pytest.mark.parametrize("script, need_gb", [("speedrun.sh", 65), ("kat_speedrun.sh", 65 + 40 + 2 * 3 * 70)])
def test_a_full_run_on_a_small_disk_stops_before_its_first_stage(tmp_path, script, need_gb):
    env = fake_disk(tmp_path, 50, 0)  # room for the data (30 GB), not for the checkpoints
    env = {**env, "PATH": f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:{env['PATH']}",  # this python as `python`
           "SKIP_ENV_SETUP": "1", "NPROC_PER_NODE": "1",
           "NANOCHAT_BASE_DIR": str(tmp_path / "base"), "NANOCHAT_OUTS_DIR": str(tmp_path / "outs"),
           "NANOCHAT_KAT_CACHE": str(tmp_path / ".cache"), "NANOCHAT_REPORT_PATH": str(tmp_path / "report.md")}
    env.pop("KAT_SEEDS", None)
    result = subprocess.run(["bash", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"needs about {need_gb} GB in {tmp_path / 'outs'}" in result.stderr
    assert "has room for the pretraining data and datasets (about 30 GB)" in result.stdout
    assert "[run ]" not in result.stdout and not (tmp_path / "report.md").exists()  # no stage started
