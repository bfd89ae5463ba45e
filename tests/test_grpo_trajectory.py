"""
What a GRPO run records besides training (scripts/grpo.py, nanochat/kat/trajectory.py): the
trajectory rows and their weights-only checkpoints, draws.json, the judge that never touches
training, and a resume after a kill that continues trajectory.jsonl exactly. CPU, tiny models
(tests/grpo_fixtures.py).
"""

import json

import pytest
import torch

from nanochat.checkpoint_manager import load_checkpoint, load_model
from nanochat.kat.data import KatData
from nanochat.kat.trajectory import DRAWS_FILE, FIELDS, TrajectoryLog
from scripts import grpo
from tests.grpo_fixtures import FLAGS, build_kat_run, logged, point_env_at, save_reward_model, tiny_reward_model

torch.set_num_threads(1)
TRAJ_FLAGS = [f for f in FLAGS if not f.startswith(("--eval_every", "--eval_prompts", "--save_every", "--max_steps"))]


@pytest.fixture(scope="module")
def kat_run(tmp_path_factory):
    return build_kat_run(tmp_path_factory.mktemp("grpo_trajectory"))


@pytest.fixture
def env(kat_run, monkeypatch):
    return point_env_at(kat_run, monkeypatch)


def rows_of(out_dir):
    return TrajectoryLog(out_dir).rows()


def test_trajectory_rows_checkpoints_and_draws_of_the_shuffled_arm(env):
    summary = grpo.main([*TRAJ_FLAGS, "--prompt_sampling=shuffled", "--max_steps=4", "--traj_every=2",
                         "--traj_prompts=5", "--traj_samples=3", "--save_every=-1"])
    out_dir = env["dirs"]["NANOCHAT_OUTS_DIR"] / "grpo_shuffled"
    rows = rows_of(out_dir)
    assert [row["step"] for row in rows] == [0, 2, 4]
    for row in rows:
        assert set(FIELDS) <= set(row)
        assert row["judge_reward"] is None  # no rm_judge stage in this folder
        assert 0 <= row["truncated_frac"] <= 1 and row["completion_len"] > 0
        assert row["across_prompt_distance"] > 0 and row["within_prompt_distance"] >= 0
        model, _, meta = load_model(out_dir / row["checkpoint"], "cpu")  # weights only, loadable by path
        assert meta["step"] == row["step"] and meta["stage"] == "grpo_shuffled"
    # step 0 is the SFT model itself: the checkpoint holds its weights and the KL to the reference is 0
    sft = load_checkpoint(env["sft_path"], "cpu")["model"]
    first = load_checkpoint(out_dir / rows[0]["checkpoint"], "cpu")
    assert all(torch.equal(first["model"][k], sft[k]) for k in sft) and first["rank_state"] is None
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] != 0.0
    last = load_checkpoint(out_dir / rows[-1]["checkpoint"], "cpu")["model"]
    final = load_checkpoint(out_dir / "ckpt.pt", "cpu")["model"]
    assert all(torch.equal(last[k], final[k]) for k in final)
    assert summary["Dev reward at the end (5 dev prompts x 3)"] == rows[-1]["policy_reward"]

    # draws.json: everything the sampler drew, by source and density quintile of the train prompts
    draws = json.loads((out_dir / DRAWS_FILE).read_text())
    data = KatData(env["data_dir"])
    sampler = data.prompt_sampler(seed=42, mode="shuffled")
    drawn = [pid for step in range(4) for pid in sampler.sample(2, step)]
    source = {p["id"]: p["src"] for p in data.prompts("train")}
    quintile = data.density_quintiles(sorted(source))
    assert draws["prompt_sampling"] == "shuffled" and draws["draws"] == 8 == len(drawn)
    assert draws["unique_prompts"] == len(set(drawn))
    assert draws["source_mix"] == {src: sum(source[p] == src for p in drawn) for src in sorted({source[p] for p in drawn})}
    assert draws["density_quintiles"] == {str(q): sum(quintile[p] == q for p in drawn) for q in range(1, 6)}
    assert draws["kish_ess"] == pytest.approx(logged((out_dir / "training_log.txt").read_text(), "train/prompt_ess")[-1])
    assert "draws/quintile_1" in (out_dir / "training_log.txt").read_text()
    config = json.loads((out_dir / "config.json").read_text())
    density = data.prompt_sampler(seed=42, mode="density")
    assert config["sampler"]["kish_ess"] == pytest.approx(float(1 / (density.probs ** 2).sum()))


def test_the_judge_is_read_for_the_trajectory_only(env, tmp_path):
    judge_path = save_reward_model(tiny_reward_model(env["tokenizer"], seed=7), tmp_path / "judge")
    flags = [*TRAJ_FLAGS, "--max_steps=3", "--traj_every=-1", "--traj_prompts=4", "--traj_samples=2", "--save_every=-1"]
    grpo.main([*flags, f"--judge={judge_path}", f"--out_dir={tmp_path / 'judged'}"])
    grpo.main([*flags, "--judge=", f"--out_dir={tmp_path / 'plain'}"])
    judged, plain = (load_checkpoint(tmp_path / run / "ckpt.pt", "cpu")["model"] for run in ("judged", "plain"))
    assert all(torch.equal(judged[k], plain[k]) for k in plain)  # bit for bit: the judge changed nothing
    logs = {run: (tmp_path / run / "training_log.txt").read_text() for run in ("judged", "plain")}
    for tag in ("train/loss", "train/reward_mean", "train/kl_seq", "train/grad_norm"):
        assert logged(logs["judged"], tag) == logged(logs["plain"], tag), tag
    rows = {run: rows_of(tmp_path / run) for run in ("judged", "plain")}
    assert [r["judge_reward"] for r in rows["plain"]] == [None, None]
    assert all(isinstance(r["judge_reward"], float) for r in rows["judged"])
    for with_judge, without in zip(rows["judged"], rows["plain"]):
        assert {k: v for k, v in with_judge.items() if k != "judge_reward"} == \
               {k: v for k, v in without.items() if k != "judge_reward"}
    assert json.loads((tmp_path / "judged" / "config.json").read_text())["judge"] == str(judge_path)


def test_the_judge_is_refused_when_it_could_be_trained(env):
    tokenizer = env["tokenizer"]
    policy_rm, judge = tiny_reward_model(tokenizer), tiny_reward_model(tokenizer, seed=7)
    judge.head = policy_rm.head  # shares the RM's head
    with pytest.raises(RuntimeError, match="judge shares a parameter"):
        grpo.assert_disjoint_parameters(reward_model=policy_rm, judge=judge)
    judge = tiny_reward_model(tokenizer, seed=7)
    with pytest.raises(RuntimeError, match="trainable"):
        grpo.assert_not_trained(judge, [])
    judge.requires_grad_(False)
    optimizer = torch.optim.SGD([{"params": list(judge.head.parameters())}], lr=0.1)
    with pytest.raises(RuntimeError, match="in an optimizer"):
        grpo.assert_not_trained(judge, [optimizer])
    grpo.assert_not_trained(judge, [torch.optim.SGD(policy_rm.parameters(), lr=0.1)])
    rm_path = env["dirs"]["NANOCHAT_OUTS_DIR"] / "rm" / "ckpt.pt"
    with pytest.raises(ValueError, match="must be independent"):
        grpo.main([*TRAJ_FLAGS, f"--judge={rm_path}", "--max_steps=1"])


class SimulatedKill(Exception):
    pass


def test_a_resumed_run_continues_the_trajectory_exactly(env, tmp_path, monkeypatch):
    flags = [*TRAJ_FLAGS, "--max_steps=7", "--traj_every=2", "--traj_prompts=4", "--traj_samples=2", "--save_every=3"]
    grpo.main([*flags, f"--out_dir={tmp_path / 'whole'}"])
    whole = rows_of(tmp_path / "whole")
    assert [r["step"] for r in whole] == [0, 2, 4, 6, 7]

    # killed in step 5's update: the step-3 checkpoint exists, and so does the row of step 4
    update, calls = grpo.policy_update, []

    def update_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise SimulatedKill
        return update(*args, **kwargs)

    monkeypatch.setattr(grpo, "policy_update", update_then_die)
    with pytest.raises(SimulatedKill):
        grpo.main([*flags, f"--out_dir={tmp_path / 'killed'}"])
    monkeypatch.setattr(grpo, "policy_update", update)
    assert [r["step"] for r in rows_of(tmp_path / "killed")] == [0, 2, 4]
    assert not (tmp_path / "killed" / "ckpt.pt").exists()

    grpo.main([*flags, "--resume=true", f"--out_dir={tmp_path / 'killed'}"])
    resumed = rows_of(tmp_path / "killed")
    assert [r["step"] for r in resumed] == [0, 2, 4, 6, 7]  # no row twice, none missing
    assert resumed == whole  # the same weights and seeds give the same figures
    for row in whole:
        a, b = (load_checkpoint(tmp_path / run / row["checkpoint"], "cpu")["model"] for run in ("whole", "killed"))
        assert all(torch.equal(a[k], b[k]) for k in a)
