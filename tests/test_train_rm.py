"""
scripts/train_rm.py end to end, offline, on the tiny KAT samples: pairs from scripts.kat_pairs, a
tokenizer trained on their text, a random tiny "sft" backbone. Checks the stage's outputs, that the
evaluation covers exactly the test split (overall, per source, per density quintile or an explicit
'skipped'), that the policy RM and the judge train on disjoint halves of the train pairs (by prompt),
exact resume, density weighting joined by prompt id and applied as the weighted formula, and that
2 gloo ranks train the same model as one process.
"""

import json
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from nanochat.checkpoint_manager import load_checkpoint
from nanochat.common import stage_dir
from nanochat.kat.data import WEIGHTS_FILE, KatData
from nanochat.kat.reward_model import RewardModel, bradley_terry_losses, load_reward_model, pair_correct
from nanochat.tokenizer import get_tokenizer
from scripts import kat_density, train_rm
from tests.conftest import KAT_SAMPLES, kat_workspace
from tests.dist_fixtures import spawn_script

torch.set_num_threads(1)
SEQ_LEN = 96
FLAGS = ["--device_type=cpu", f"--max_seq_len={SEQ_LEN}", "--pairs_per_step=8", "--device_batch_size=4",
         "--num_iterations=6", "--eval_every=3", "--eval_pairs=16", "--eval_batch_size=16", "--lr=1e-3",
         "--head_lr=1e-2", "--warmup_ratio=0", "--grad_clip=0.05", "--save_every=3", "--keep_checkpoints=1"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Pairs in <kat cache>/data, a tokenizer in $NANOCHAT_BASE_DIR, a random tiny backbone as outs/sft."""
    with kat_workspace(tmp_path_factory.mktemp("train_rm"), KAT_SAMPLES, vocab_size=512, sequence_len=SEQ_LEN) as ws:
        yield {"root": ws["root"], "data_dir": ws["data_dir"], "pairs": ws["pairs"]}


def train_recording_pairs(flags) -> tuple[dict, list[str]]:
    """train_rm.main(flags) and the ids of every pair its training loop backpropagated through."""
    seen, backward = [], train_rm.backward_pairs

    def recording(rm, pairs, *args, **kwargs):
        seen.extend(p["id"] for p in pairs)
        return backward(rm, pairs, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_rm, "backward_pairs", recording)
        result = train_rm.main(flags)
    return result, seen


@pytest.fixture(scope="module")
def uniform_run(workspace):
    result, seen = train_recording_pairs(FLAGS)
    return result, stage_dir("rm"), seen


@pytest.fixture(scope="module")
def judge_run(workspace):
    result, seen = train_recording_pairs(FLAGS + ["--role=judge"])
    return result, stage_dir("rm_judge"), seen


def logged(out_dir, name: str) -> dict[int, float]:
    pattern = re.compile(rf"step\s+(\d+) \|.*\b{re.escape(name)} (\S+)")
    return {int(m[1]): float(m[2]) for m in pattern.finditer((out_dir / "training_log.txt").read_text())}


def test_end_to_end_writes_the_rm_stage_and_evaluates_only_test_pairs(workspace, uniform_run):
    result, out_dir, _ = uniform_run
    for name in ("ckpt.pt", "config.json", "eval.json", "training_log.txt"):
        assert (out_dir / name).is_file(), name
    assert any((out_dir / "logs").glob("events.out.tfevents.*"))
    config = json.loads((out_dir / "config.json").read_text())
    assert config["kind"] == "reward_model" and config["source"] == "sft" and config["train_blocks"] == -1
    assert config["backbone_config"]["n_embd"] == 32 and config["max_seq_len"] == SEQ_LEN

    test_pairs = [p for p in workspace["pairs"] if p["split"] == "test"]
    evaluation = json.loads((out_dir / "eval.json").read_text())
    assert evaluation == json.loads(json.dumps(result))
    assert evaluation["split"] == "test" and evaluation["n_pairs"] == len(test_pairs) == 69
    assert {src: g["n_pairs"] for src, g in evaluation["by_source"].items()} == Counter(p["src"] for p in test_pairs)
    for figures in [evaluation, *evaluation["by_source"].values()]:
        assert 0 <= figures["accuracy"] <= 1 and np.isfinite([figures["loss"], figures["margin"]]).all()
    assert "no " in evaluation["by_density_quintile"]["skipped"] and WEIGHTS_FILE in evaluation["by_density_quintile"]["skipped"]

    # the saved RM, loaded the way GRPO loads it, reproduces the evaluation on the test pairs
    rm = load_reward_model("rm", "cpu")
    chosen = torch.tensor(rm.score([(p["prefix"], p["chosen"]) for p in test_pairs]), dtype=torch.float64)
    rejected = torch.tensor(rm.score([(p["prefix"], p["rejected"]) for p in test_pairs]), dtype=torch.float64)
    assert pair_correct(chosen, rejected).mean().item() == pytest.approx(evaluation["accuracy"], abs=1e-9)
    assert bradley_terry_losses(chosen, rejected).mean().item() == pytest.approx(evaluation["loss"], rel=1e-4)

    for name in ("train/loss", "train/accuracy", "train/margin", "train/lr"):
        assert sorted(logged(out_dir, name)) == list(range(1, 7)), name
    assert sorted(logged(out_dir, "val/accuracy")) == sorted(logged(out_dir, "val/loss")) == [0, 3, 6]
    losses = logged(out_dir, "train/loss")
    assert all(0 < v < 5 for v in losses.values())
    report = (workspace["root"] / "base_dir" / "report" / "rm_report.md").read_text()
    assert "## Reward model" in report and "| all test pairs | 69 |" in report and "Density quintiles skipped" in report


# -----------------------------------------------------------------------------
# The judge: the other half of the train pairs, split by prompt id

def test_the_two_roles_split_the_train_pairs_by_prompt(workspace):
    train = [p for p in workspace["pairs"] if p["split"] == "train"]
    policy, judge = train_rm.role_pairs(train, "policy"), train_rm.role_pairs(train, "judge")
    assert sorted(p["id"] for p in policy + judge) == sorted(p["id"] for p in train)  # every pair, once
    assert not {p["prompt_id"] for p in policy} & {p["prompt_id"] for p in judge}  # no prompt on both sides
    assert 0.35 < len(policy) / len(train) < 0.65
    # a Stack Exchange question with several pairs keeps them all on one side
    assert any(n > 1 for n in Counter(p["prompt_id"] for p in judge).values())
    assert train_rm.role_pairs(list(reversed(train)), "judge") == list(reversed(judge))  # by id, not by position
    with pytest.raises(ValueError, match="role must be one of"):
        train_rm.role_pairs(train, "both")


def test_the_judge_never_trains_on_a_policy_rm_pair_and_both_evaluate_on_the_test_pairs(workspace, uniform_run, judge_run):
    train = [p for p in workspace["pairs"] if p["split"] == "train"]
    halves = {role: {p["id"] for p in train_rm.role_pairs(train, role)} for role in ("policy", "judge")}
    prompt_of = {p["id"]: p["prompt_id"] for p in train}
    (policy_result, policy_dir, policy_seen), (judge_result, judge_dir, judge_seen) = uniform_run, judge_run
    assert len(policy_seen) == len(set(policy_seen)) == len(judge_seen) == len(set(judge_seen)) == 6 * 8
    assert set(policy_seen) <= halves["policy"] and set(judge_seen) <= halves["judge"]
    assert not set(judge_seen) & halves["policy"] and not set(policy_seen) & halves["judge"]
    assert not {prompt_of[i] for i in judge_seen} & {prompt_of[i] for i in halves["policy"]}
    assert judge_dir == stage_dir("rm_judge") != policy_dir
    test_pairs = [p for p in workspace["pairs"] if p["split"] == "test"]
    for result, out_dir, role in ((policy_result, policy_dir, "policy"), (judge_result, judge_dir, "judge")):
        evaluation = json.loads((out_dir / "eval.json").read_text())
        assert evaluation["role"] == role and evaluation["n_pairs"] == len(test_pairs) == 69
        assert evaluation["train_pairs"] == len(halves[role])
        config = json.loads((out_dir / "config.json").read_text())
        assert config["role"] == role and config["stage"] == out_dir.name
    policy_weights, judge_weights = (load_checkpoint(d / "ckpt.pt", "cpu")["model"] for d in (policy_dir, judge_dir))
    assert not torch.equal(policy_weights["head.weight"], judge_weights["head.weight"])
    report = (workspace["root"] / "base_dir" / "report" / "rm_judge_report.md").read_text()
    assert "## Judge reward model (independent)" in report and "| all test pairs | 69 |" in report


def test_resume_ends_bitwise_equal(workspace, uniform_run, tmp_path):
    _, out_dir, _ = uniform_run
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(out_dir / "ckpt_3.pt", resumed_dir)
    train_rm.main(FLAGS + [f"--out_dir={resumed_dir}", "--resume=true"])
    expected, got = load_checkpoint(out_dir / "ckpt.pt", "cpu"), load_checkpoint(resumed_dir / "ckpt.pt", "cpu")
    assert got["step"] == expected["step"] == 6
    for key, tensor in expected["model"].items():
        assert torch.equal(got["model"][key], tensor), key
    assert json.loads((resumed_dir / "eval.json").read_text())["accuracy"] == \
        json.loads((out_dir / "eval.json").read_text())["accuracy"]


# -----------------------------------------------------------------------------
# Density weighting

@pytest.fixture(scope="module")
def density_data_dir(workspace, tmp_path_factory):
    """A copy of the data with prompt_weights.jsonl from kat_density over the tiny backbone's embeddings."""
    data_dir = tmp_path_factory.mktemp("density") / "data"
    shutil.copytree(workspace["data_dir"], data_dir)
    tokenizer, backbone = get_tokenizer(), load_reward_model_backbone()
    prompts = KatData(data_dir).prompts()
    with torch.no_grad():  # masked mean of final hidden states over the prompt's tokens, no padding involved
        embeddings = [backbone.forward_hidden(torch.tensor([tokenizer.render_for_completion(p["prefix"])[-SEQ_LEN:]]))[0].mean(0)
                      for p in prompts]
    KatData(data_dir).save_embeddings([p["id"] for p in prompts], torch.stack(embeddings).numpy())
    kat_density.main([f"--data_dir={data_dir}", "--k=5", "--device_type=cpu"])
    return data_dir


def load_reward_model_backbone():
    from nanochat.checkpoint_manager import load_model
    return load_model("sft", "cpu")[0]


def test_density_weights_are_joined_by_prompt_id_with_mean_one(workspace, density_data_dir):
    train = [p for p in workspace["pairs"] if p["split"] == "train"]
    weights = train_rm.train_pair_weights(KatData(density_data_dir), train)
    by_id = {r["id"]: r["weight"] for r in KatData(density_data_dir).weights()}
    pairs_of_prompt = Counter(p["prompt_id"] for p in train)
    assert max(pairs_of_prompt.values()) > 1  # Stack Exchange questions give several pairs each
    raw = np.array([by_id[p["prompt_id"]] / pairs_of_prompt[p["prompt_id"]] for p in train])
    np.testing.assert_allclose(weights, raw / raw.mean(), rtol=1e-12)
    assert weights.mean() == pytest.approx(1.0) and weights.std() > 0.01  # not uniform in disguise
    # each prompt's pairs together carry its density weight, however many pairs it has
    total = Counter()
    for pair, weight in zip(train, weights):
        total[pair["prompt_id"]] += weight
    scale = sum(by_id[pid] for pid in pairs_of_prompt)
    for pid in pairs_of_prompt:
        assert total[pid] / len(train) == pytest.approx(by_id[pid] / scale, rel=1e-9)
    # the file's row order is irrelevant: reversed, the same pair gets the same weight
    path = density_data_dir / WEIGHTS_FILE
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(reversed(lines)))
    try:
        np.testing.assert_array_equal(train_rm.train_pair_weights(KatData(density_data_dir), train), weights)
    finally:
        path.write_text("".join(lines))


def test_a_prompt_with_many_pairs_does_not_count_many_times(tmp_path):
    # equal density weights (beta = 0): every PROMPT weighs the same, whatever its pair count
    KatData(tmp_path).save_prompt_weights(["a", "b", "c"], ["train"] * 3, np.zeros(3), np.zeros(3), np.full(3, 1 / 3), meta={})
    train = [{"prompt_id": pid} for pid in ["a", "b", "a", "c", "a"]]
    weights = train_rm.train_pair_weights(KatData(tmp_path), train)
    np.testing.assert_allclose(weights, np.array([1 / 3, 1, 1 / 3, 1, 1 / 3]) * 5 / 3, rtol=1e-12)
    per_prompt = {pid: sum(w for p, w in zip(train, weights) if p["prompt_id"] == pid) for pid in "abc"}
    assert per_prompt["a"] == pytest.approx(per_prompt["b"]) == pytest.approx(per_prompt["c"])
    # unequal weights: a prompt twice as rare gets twice the total, spread over its pairs
    KatData(tmp_path).save_prompt_weights(["a", "b", "c"], ["train"] * 3, np.zeros(3), np.zeros(3), np.array([0.5, 0.25, 0.25]), meta={})
    weights = train_rm.train_pair_weights(KatData(tmp_path), train)
    per_prompt = {pid: sum(w for p, w in zip(train, weights) if p["prompt_id"] == pid) for pid in "abc"}
    assert per_prompt["a"] == pytest.approx(2 * per_prompt["b"]) and weights.mean() == pytest.approx(1.0)


def test_weighted_backward_is_exactly_the_weighted_formula(workspace):
    tokenizer, backbone = get_tokenizer(), load_reward_model_backbone()
    rm = RewardModel(backbone, tokenizer, max_seq_len=SEQ_LEN)
    rm.set_trainable_blocks(-1)
    pairs = [p for p in workspace["pairs"] if p["split"] == "train"][:3]
    weights, scale, no_autocast = np.array([2.5, 0.0, 0.5]), 0.125, torch.autocast("cpu", enabled=False)

    def head_grad(batch, w):
        rm.zero_grad(set_to_none=True)
        sums, _, _ = train_rm.backward_pairs(rm, batch, w, scale, tokenizer.get_bos_token_id(), no_autocast)
        return sums, rm.head.weight.grad.clone()

    sums, grad = head_grad(pairs, weights)
    per_pair = [head_grad([p], [1.0]) for p in pairs]
    losses = [s[0].item() for s, _ in per_pair]
    assert sums[0].item() == pytest.approx(sum(w * l for w, l in zip(weights, losses)), rel=1e-5)
    torch.testing.assert_close(grad, sum(w * g for w, (_, g) in zip(weights, per_pair)), rtol=1e-4, atol=1e-7)
    _, zero = head_grad(pairs[1:2], [0.0])
    assert torch.count_nonzero(zero) == 0  # a pair of weight 0 teaches nothing


def test_density_run_reports_quintiles_over_test_prompts(workspace, density_data_dir, tmp_path):
    result = train_rm.main(FLAGS + ["--pair_weighting=density", f"--data_dir={density_data_dir}",
                                    f"--out_dir={tmp_path / 'rm_density'}", "--num_iterations=3", "--save_every=-1"])
    test_pairs = [p for p in workspace["pairs"] if p["split"] == "test"]
    quintiles = result["by_density_quintile"]
    assert sorted(quintiles) == ["1", "2", "3", "4", "5"]
    assert sum(q["n_prompts"] for q in quintiles.values()) == len({p["prompt_id"] for p in test_pairs}) == 50
    assert sum(q["n_pairs"] for q in quintiles.values()) == result["n_pairs"] == len(test_pairs)
    assert all(q["n_prompts"] == 10 for q in quintiles.values())
    for lower, upper in zip("1234", "2345"):  # quintile 1 holds the rarest prompts
        assert quintiles[lower]["density_max"] <= quintiles[upper]["density_min"]
    assert result["pair_weighting"] == "density"
    assert json.loads((tmp_path / "rm_density" / "config.json").read_text())["pair_weighting"] == "density"


# -----------------------------------------------------------------------------
# DDP: 2 gloo ranks, half the pairs each, gradients averaged by DistAdamW = one process

@pytest.mark.slow
def test_two_ranks_train_the_same_model_as_one_process(workspace, uniform_run, tmp_path):
    _, out_dir, _ = uniform_run
    ddp_dir = tmp_path / "rm_ddp"
    spawn_script(train_rm.main, FLAGS + [f"--out_dir={ddp_dir}"])
    single, ddp = load_checkpoint(out_dir / "ckpt.pt", "cpu"), load_checkpoint(ddp_dir / "ckpt.pt", "cpu")
    assert ddp["world_size"] == 2
    for key, tensor in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], tensor, rtol=1e-3, atol=1e-5, msg=key)
    for name in ("train/loss", "train/accuracy", "train/grad_norm"):  # the norm is taken before clipping
        assert logged(ddp_dir, name) == pytest.approx(logged(out_dir, name), rel=1e-4), name
    assert json.loads((ddp_dir / "eval.json").read_text())["n_pairs"] == 69
