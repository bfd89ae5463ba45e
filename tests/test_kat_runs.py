"""
kat_speedrun.sh's GRPO runs side by side (runs/lib.sh run_queued_stages), on this CPU: on a copy of
the session's tiny run, `KAT_SEEDS=2 KAT_PARALLEL_RUNS=4 bash kat_speedrun.sh --tiny` runs both arms
twice as 4 concurrent one-process runs. Each must finish with its own seed, sampler, log and final
checkpoint; after a SIGKILL of the whole pipeline a rerun must skip the finished runs and resume the
interrupted ones; a failing run must let its siblings finish, then stop the pipeline naming it and its log.
"""

import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch

from nanochat.common import REPO_ROOT
from tests.tiny_fixtures import tiny_env

pytestmark = pytest.mark.slow  # the tiny preset, then four GRPO runs at once

RUNS = {"grpo_density": ("density", 42), "grpo_baseline": ("uniform", 42),  # run -> (sampler, seed)
        "grpo_density_s1": ("density", 43), "grpo_baseline_s1": ("uniform", 43)}
STEPS = 8  # runs/tiny.sh's GRPO --max_steps, an intermediate checkpoint every 2 steps


def pipeline(*args) -> list[str]:
    return ["bash", "kat_speedrun.sh", "--tiny", *args]


def runs_env(root) -> dict:
    return {**tiny_env(root), "KAT_SEEDS": "2", "KAT_PARALLEL_RUNS": "4"}


def run_pipeline(root, *args) -> subprocess.CompletedProcess:
    """The pipeline to its end, stdout and stderr in one stream (their order matters below)."""
    return subprocess.run(pipeline(*args), cwd=REPO_ROOT, env=runs_env(root), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1200)


def checkpoint(root, run, name="ckpt.pt") -> dict:
    return torch.load(root / "outs" / run / name, map_location="cpu", weights_only=False)


def intermediate_steps(root, run) -> list[int]:
    return sorted(int(m[1]) for p in (root / "outs" / run).glob("ckpt_*.pt") if (m := re.fullmatch(r"ckpt_(\d+)\.pt", p.name)))


@pytest.fixture(scope="module")
def runs_root(tiny_run, tmp_path_factory):
    """A copy of the tiny run without its GRPO runs, then all four GRPO runs side by side: (root, output)."""
    tiny_root, _ = tiny_run
    root = tmp_path_factory.mktemp("kat_runs")
    for part in ["base", "outs", ".cache"]:
        shutil.copytree(tiny_root / part, root / part, symlinks=True, ignore=shutil.ignore_patterns("grpo_*"))
    result = run_pipeline(root)
    assert result.returncode == 0, f"KAT_SEEDS=2 KAT_PARALLEL_RUNS=4 --tiny failed:\n{result.stdout[-6000:]}"
    return root, result.stdout


def test_every_run_finishes_at_once_with_its_own_seed_sampler_and_log(runs_root):
    root, output = runs_root
    started = [output.index(f"[run ] {run} ") for run in RUNS]
    first_done = min(output.index(f"[done] {run} in ") for run in RUNS)
    assert max(started) < first_done, "a run started only after another had finished: they did not run at once"
    for run, (sampler, seed) in RUNS.items():
        ckpt = checkpoint(root, run)
        assert ckpt["step"] == STEPS
        assert ckpt["meta"]["prompt_sampling"] == sampler and ckpt["meta"]["train_args"]["seed"] == seed, run
        log = (root / "outs" / "pipeline_logs" / f"{run}.log").read_text()
        assert f"GRPO ({sampler} prompt sampling)" in log and f"step {STEPS:05d}/{STEPS}" in log, f"{run}'s own log"
        assert f"[skip] {run}:" not in output
    # the arms of one seed index share the seed, so they draw alike only in what the seed decides; the
    # seed indexes differ, so an arm's two runs end with different weights
    for arm in ["grpo_density", "grpo_baseline"]:
        first, second = checkpoint(root, arm)["model"], checkpoint(root, f"{arm}_s1")["model"]
        assert any(not torch.equal(first[k], second[k]) for k in first), f"{arm} and {arm}_s1 trained alike"


def test_a_further_seed_loads_by_stage_name(runs_root, monkeypatch):
    root, _ = runs_root
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(root / "base"))
    monkeypatch.setenv("NANOCHAT_OUTS_DIR", str(root / "outs"))
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine

    model, tokenizer, meta = load_model("grpo_baseline_s1", "cpu")
    assert meta["prompt_sampling"] == "uniform" and meta["train_args"]["seed"] == 43
    assert meta["stage"] == "grpo_baseline_s1"  # its own stage, not its arm's
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "Hello!"}]})
    tokens, _ = Engine(model, tokenizer).generate_batch([prompt], num_samples=2, max_tokens=8, seed=1)
    assert len(tokens[0]) == 2


def test_after_a_sigkill_a_rerun_skips_finished_runs_and_resumes_interrupted_ones(runs_root, tmp_path):
    root, _ = runs_root
    forced = ["grpo_density_s1", "grpo_baseline_s1"]  # rerun from scratch; the seed-0 runs stay finished
    for run in forced:  # gone before the launch, so that the wait below sees only the new runs' checkpoints
        shutil.rmtree(root / "outs" / run)
    with open(tmp_path / "killed.log", "w") as out:
        process = subprocess.Popen(pipeline("--force=" + ",".join(forced)), cwd=REPO_ROOT, env=runs_env(root),
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 900
        # both forced runs under way: an intermediate checkpoint written (the first comes at step 2 of 8)
        while not all(intermediate_steps(root, run) or (root / "outs" / run / "ckpt.pt").exists() for run in forced):
            assert process.poll() is None, f"the pipeline ended before the kill:\n{(tmp_path / 'killed.log').read_text()}"
            assert time.time() < deadline, "the forced runs wrote no checkpoint in 15 minutes"
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)  # the pipeline and every run: a lost node, a killed job
        process.wait()
    deadline = time.time() + 60
    while True:  # every process of the group gone before the rerun touches their folders
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        assert time.time() < deadline, "processes of the killed pipeline are still alive a minute later"
        time.sleep(0.1)

    interrupted = {run: intermediate_steps(root, run)[-1] for run in forced
                   if not (root / "outs" / run / "ckpt.pt").exists()}
    assert interrupted, "both forced runs had finished when the pipeline was killed: nothing to resume"
    result = run_pipeline(root)
    assert result.returncode == 0, f"the rerun after the kill failed:\n{result.stdout[-6000:]}"
    for run in RUNS:
        if run in interrupted:
            assert f"[resume] {run}:" in result.stdout
            log = (root / "outs" / run / "training_log.txt").read_text()
            assert f"resumed at step {interrupted[run]}" in log, f"{run}'s training log does not say it resumed"
        else:
            assert f"[skip] {run}: {root / 'outs' / run / 'ckpt.pt'} exists" in result.stdout
        assert checkpoint(root, run)["step"] == STEPS, run


def test_a_failed_run_lets_its_sibling_finish_then_stops_the_pipeline_naming_it(runs_root):
    root, _ = runs_root
    broken, sibling = root / "outs" / "grpo_baseline_s1", root / "outs" / "grpo_density_s1"
    for run in [broken, sibling]:  # both interrupted near their end ...
        (run / "ckpt.pt").unlink(missing_ok=True)
        assert list(run.glob("ckpt_*.pt")), f"{run.name} has no intermediate checkpoint to resume from"
    for ckpt in broken.glob("ckpt_*.pt"):  # ... and every checkpoint of one of them unreadable
        ckpt.write_bytes(b"not a checkpoint")
    result = run_pipeline(root)
    output = result.stdout
    assert result.returncode != 0
    log = root / "outs" / "pipeline_logs" / "grpo_baseline_s1.log"
    assert f"[FAIL] stage 'grpo_baseline_s1' failed; its log: {log}" in output
    assert "ckpt_" in log.read_text(), "the failed run's log does not name the checkpoint it could not read"
    final = output.index("[FAIL] 1 of 2 runs failed: grpo_baseline_s1")
    assert output.index("[done] grpo_density_s1 in ") < final, "the pipeline stopped before the sibling finished"
    assert checkpoint(root, "grpo_density_s1")["step"] == STEPS
    assert "report: " not in output[final:], "the pipeline went on after a failed run"
