"""RunLogger (nanochat/run_logger.py): TensorBoard scalars, training_log.txt, rank gating, wandb errors."""

import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nanochat.run_logger import RunLogger


def read_scalars(logs_dir) -> dict:
    acc = EventAccumulator(str(logs_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_readable_by_tensorboard_and_lines_in_training_log(tmp_path):
    logger = RunLogger(tmp_path, config={"depth": 2})
    for step in range(3):
        logger.log(step, {"train/loss": torch.tensor(4.0 - step), "train/lr": 0.02})
    logger.text("sample: hello")
    logger.close()
    scalars = read_scalars(tmp_path / "logs")
    assert scalars["train/loss"] == [(0, 4.0), (1, 3.0), (2, 2.0)]
    assert [s for s, _ in scalars["train/lr"]] == [0, 1, 2]
    assert scalars["train/lr"][0][1] == pytest.approx(0.02)
    lines = (tmp_path / "training_log.txt").read_text().splitlines()
    assert "run dummy started" in lines[0]
    assert lines[2].endswith("step      1 | train/loss 3 | train/lr 0.02")
    assert lines[-1].endswith("sample: hello")


def test_a_metric_with_no_value_this_step_is_left_out(tmp_path):
    logger = RunLogger(tmp_path)
    logger.log(1, {"train/loss": 2.0, "train/grad_norm": None})  # clipping off: no norm was measured
    logger.log(2, {"train/loss": 1.5, "train/grad_norm": torch.tensor(0.25)})
    logger.close()
    scalars = read_scalars(tmp_path / "logs")
    assert scalars["train/grad_norm"] == [(2, 0.25)] and [s for s, _ in scalars["train/loss"]] == [1, 2]
    lines = (tmp_path / "training_log.txt").read_text().splitlines()
    assert lines[1].endswith("step      1 | train/loss 2") and lines[2].endswith("train/grad_norm 0.25")


def test_resume_purges_scalars_after_the_resumed_step(tmp_path):
    first = RunLogger(tmp_path)
    for step in range(6):  # the killed run got to step 5 after its last checkpoint at step 3
        first.log(step, {"train/loss": float(step)})
    first.close()
    # A resumed run is a later process, so its event file's name (which starts with the creation
    # second) sorts after the killed run's; TensorBoard reads files in that order. Within one
    # process the names differ only by a per-process counter, which sorts as text (9 > 10).
    time.sleep(1.1)
    resumed = RunLogger(tmp_path, start_step=3)
    for step in range(3, 5):
        resumed.log(step, {"train/loss": 100.0 + step})
    resumed.close()
    scalars = read_scalars(tmp_path / "logs")
    assert scalars["train/loss"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0)]
    assert "resumed at step 3" in (tmp_path / "training_log.txt").read_text()


def test_disabled_logger_writes_nothing(tmp_path):
    logger = RunLogger(tmp_path / "rank1", run="some-run", enabled=False)  # no wandb needed either
    logger.log(0, {"train/loss": 1.0})
    logger.text("ignored")
    logger.close()
    assert not (tmp_path / "rank1").exists()


def test_named_run_without_wandb_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail as if not installed
    with pytest.raises(RuntimeError, match=r"uv sync --extra wandb.*--run=dummy"):
        RunLogger(tmp_path, run="d20")


def test_non_finite_values_are_logged_not_hidden(tmp_path):
    logger = RunLogger(tmp_path)
    logger.log(7, {"train/loss": float("nan")})
    logger.close()
    assert "train/loss nan" in (tmp_path / "training_log.txt").read_text()
