"""
The pretraining stage end to end on a tiny model: base_train writes everything SPEC section 2
lists, base_loss reads it back, and a run killed with SIGKILL and resumed ends bitwise equal
to an uninterrupted one.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanochat.common import REPO_ROOT
from nanochat.dataset import parquets_iter_batched
from nanochat.tokenizer import Tokenizer

TINY_FLAGS = ["--depth=1", "--max_seq_len=64", "--device_batch_size=4", "--total_batch_size=512",
              "--eval_every=3", "--eval_tokens=512", "--core_metric_every=-1", "--sample_every=-1",
              "--compile=false", "--device_type=cpu"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny tokenizer trained on the bundled sample, shared by every run in this module."""
    base = tmp_path_factory.mktemp("base")
    docs = [doc for batch in parquets_iter_batched("train") for doc in batch][:300]
    Tokenizer.train_from_iterator(iter(docs), 512).save(base / "tok")
    return base


def _env(base_dir: Path, outs: Path) -> dict:
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_OUTS_DIR=str(outs), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO_ROOT))
    return env


def _run(module: str, flags: list[str], env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{module} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_base_train_then_base_loss_write_every_output(base_dir, tmp_path):
    outs = tmp_path / "outs"
    env = _env(base_dir, outs)
    _run("scripts.base_train", [*TINY_FLAGS, "--num_iterations=6", "--save_every=3"], env)
    stage = outs / "base"
    for name in ("ckpt.pt", "ckpt_3.pt", "config.json", "training_log.txt"):
        assert (stage / name).is_file(), f"base_train did not write {name}"
    assert list((stage / "logs").glob("events.out.tfevents.*")), "no TensorBoard events"
    log = (stage / "training_log.txt").read_text()
    assert "train/loss" in log and "val/bpb" in log
    assert all(torch.isfinite(t).all() for t in _weights(stage / "ckpt.pt").values())
    report = (base_dir / "report" / "base_report.md").read_text()
    assert "Base model training" in report and "Final validation bpb" in report

    result = _run("scripts.base_loss", ["--device_type=cpu", "--device_batch_size=4", "--split_tokens=512"], env)
    assert "train bpb" in result.stdout and "val bpb" in result.stdout
    assert "Base model loss" in (base_dir / "report" / "base_report.md").read_text()


def test_sigkill_then_resume_is_bitwise_equal_to_an_uninterrupted_run(base_dir, tmp_path):
    steps = ["--num_iterations=12", "--save_every=2", "--keep_checkpoints=10"]
    whole = tmp_path / "whole"
    _run("scripts.base_train", [*TINY_FLAGS, *steps], _env(base_dir, whole))

    # Kill the second run as soon as its first intermediate checkpoint exists, then resume it.
    killed = tmp_path / "killed"
    env = _env(base_dir, killed)
    proc = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *TINY_FLAGS, *steps], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "base" / "ckpt_2.pt"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.fail(f"the run ended (code {proc.returncode}) before it could be killed mid-training")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "base" / "ckpt.pt").exists(), "the run finished before the kill; nothing was tested"

    _run("scripts.base_train", [*TINY_FLAGS, *steps, "--resume=true"], env)
    a, b = _weights(whole / "base" / "ckpt.pt"), _weights(killed / "base" / "ckpt.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after kill and resume"


def test_scaling_bench_runs_base_train_on_one_and_two_processes(base_dir, tmp_path, monkeypatch):
    """dev.bench_scaling drives base_train under torchrun (gloo here) at the same total batch and
    reads back every figure of its table; the two runs train on the same number of tokens."""
    from dev import bench_scaling
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = bench_scaling.main(["--nprocs=1,2", "--device_type=cpu", "--depth=1", "--max_seq_len=64",
                               "--device_batch_size=4", "--total_batch_size=512", "--num_iterations=3",
                               "--eval_tokens=512", f"--workdir={tmp_path}"])
    assert [r["nproc"] for r in rows] == [1, 2]
    for r in rows:
        assert r["last_step"] == 3 and r["tok_per_s"] > 0
        assert 0 < r["loss"] < 10 and 0 < r["val_bpb"] < 10  # a 512-token vocabulary: ln(512) = 6.2 at the start
        assert (tmp_path / f"base_{r['nproc']}" / "ckpt.pt").exists()


def test_scaling_bench_reads_base_train_lines_and_refuses_output_without_them():
    from dev.bench_scaling import parse_log
    log = ("step 00001/3 | loss 6.2000 | lrm 1.000 | dt 900ms | tok/s 1,000 | mfu 10.0% | mem 3.0GB\n"
           "step 00002/3 | loss 6.0000 | lrm 1.000 | dt 100ms | tok/s 9,000 | mfu 50.0% | mem 4.0GB\n"
           "step 00003/3 | loss 5.5000 | lrm 0.500 | dt 100ms | tok/s 11,000 | mfu nan% | mem 4.5GB\n"
           "step 00003 | val bpb 1.2345\n")
    row = parse_log(log, 2)
    assert row["tok_per_s"] == 10_000  # median of steps 2 and 3: step 1 compiles
    assert (row["peak_gb"], row["loss"], row["val_bpb"], row["last_step"]) == (4.5, 5.5, 1.2345, 3)
    with pytest.raises(RuntimeError, match="no step or validation lines"):
        parse_log("Traceback: something else\n", 2)
