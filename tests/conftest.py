"""
The tiny preset's run (`bash kat_speedrun.sh --tiny --rl` on this CPU, several minutes), made once per
test session for every module that reads it: tests/test_tiny_preset.py checks its outputs, and
tests/test_kat_runs.py copies its SFT model, reward model and KAT data to run GRPO side by side.
"""

import subprocess

import pytest

from nanochat.common import REPO_ROOT
from tests.tiny_fixtures import tiny_env


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(root, stdout) of the tiny preset with --rl; its readers never change what it wrote."""
    root = tmp_path_factory.mktemp("tiny_run")
    result = subprocess.run(["bash", "kat_speedrun.sh", "--tiny", "--rl"], cwd=REPO_ROOT, env=tiny_env(root),
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"kat_speedrun.sh --tiny failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return root, result.stdout
