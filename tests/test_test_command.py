"""
The test command (runs/test.sh): README.md's command is the one .ci/run runs, its arguments reach
pytest, and a selection that runs no tests fails. Run with the python of this test session
(SKIP_ENV_SETUP=1), so it never syncs an environment.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from nanochat.common import REPO_ROOT


def run_test_command(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "SKIP_ENV_SETUP": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "runs/test.sh", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_ci_runs_the_readmes_test_command_verbatim():
    readme = (Path(REPO_ROOT) / "README.md").read_text()
    first_steps = re.search(r"## First steps on a fresh machine.*?```bash\n(.*?)```", readme, re.S)
    assert first_steps, "README.md has no code block under 'First steps on a fresh machine'"
    commands = [line.split("#")[0].strip() for line in first_steps[1].splitlines() if line.strip()]
    assert len(commands) == 2 and commands[0].startswith("bash kat_speedrun.sh --tiny"), commands
    ci_lines = [line.strip() for line in (Path(REPO_ROOT) / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci_lines, f"README's test command {commands[1]!r} is not a line of .ci/run"


def test_arguments_reach_pytest():
    result = run_test_command("tests/test_flags.py", "-k", "parse_bool")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^\d+ passed, \d+ deselected", result.stdout, re.M), result.stdout[-2000:]


def test_no_tests_ran_fails_and_says_so():
    result = run_test_command("tests/test_flags.py", "-k", "no_test_is_named_like_this")
    assert result.returncode == 5
    assert "[FAIL] pytest ran no tests (exit 5)" in result.stderr
