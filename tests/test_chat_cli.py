"""
scripts/chat_cli.py on tiny random stages: a one-shot prompt run as a user runs it
(python -m scripts.chat_cli), and an interactive session driven through stdin (in this process,
to spare a second interpreter start). What it prints must be exactly what the engine generates
for the same conversation.
"""

import io
import os
import subprocess
import sys

import pytest
import torch

from nanochat.common import REPO_ROOT
from scripts import chat_cli
from tests.chat_fixtures import engine_reply, make_chat_stages

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_cli")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOCHAT_BASE_DIR", str(root / "base"))
        patch.setenv("NANOCHAT_OUTS_DIR", str(root / "outs"))
        make_chat_stages()
        yield {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}


def run_chat_cli(env, *flags):
    result = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--device_type=cpu", *flags],
                            capture_output=True, text=True, encoding="utf-8", cwd=REPO_ROOT, env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_one_shot_prompt_prints_the_reply_and_exits(env):
    messages = [{"role": "user", "content": "hello there"}]
    want, n = engine_reply("grpo_density", messages, max_tokens=20)
    assert n > 0
    out = run_chat_cli(env, "-i", "grpo_density", "-p", "hello there", "--temperature=0", "--max_tokens=20")
    assert out == want + "\n"


def test_interactive_session_keeps_history_until_clear(env, monkeypatch, capsys):
    user = [{"role": "user", "content": "hello there"}]
    first, _ = engine_reply("sft", user, max_tokens=10, temperature=1.0, top_k=5, seed=3)
    # turn 1 sees turn 0 (seed 3 + 1); after `clear`, turn 2 sees only its own message (seed 3 + 2)
    second, _ = engine_reply("sft", user + [{"role": "assistant", "content": first},
                                            {"role": "user", "content": "how are you"}],
                             max_tokens=10, temperature=1.0, top_k=5, seed=4)
    fresh, _ = engine_reply("sft", [{"role": "user", "content": "how are you"}],
                            max_tokens=10, temperature=1.0, top_k=5, seed=5)
    assert second != engine_reply("sft", [{"role": "user", "content": "how are you"}],
                                  max_tokens=10, temperature=1.0, top_k=5, seed=4)[0], "history must matter here"
    flags = ["-i", "sft", "--device_type=cpu", "--temperature=1.0", "--top_k=5", "--seed=3", "--max_tokens=10"]
    monkeypatch.setattr(sys, "argv", ["chat_cli", *flags])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\nhow are you\nclear\nhow are you\nquit\nnever read\n"))
    chat_cli.main()
    out = capsys.readouterr().out
    replies = [chunk.split("\n")[0] for chunk in out.split("Assistant: ")[1:]]
    assert replies == [first, second, fresh]
    assert "(conversation cleared)" in out
    assert out.count("User: ") == 5 and out.endswith("User: ")  # the line after `quit` is never read
