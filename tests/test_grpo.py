"""
scripts/grpo.py and the GRPO maths of nanochat/kat/grpo.py, on CPU with tiny models
(tests/grpo_fixtures.py). The reward model is a real tiny RewardModel saved as stage "rm"; the
learning test instead scores with a plain function of the text (how many "a"s), so that there is
something definite to learn.
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from nanochat.checkpoint_manager import load_checkpoint, load_model
from nanochat.engine import Engine
from nanochat.flags import parse_flags
from nanochat.kat.data import KatData
from nanochat.kat.density import PromptSampler
from nanochat.kat.grpo import Objective, clipped_policy_loss, k3_kl, prepare_update
from nanochat.kat.trajectory import DrawCounts
from nanochat.rl import group_advantages
from scripts import grpo
from tests.dist_fixtures import spawn_script
from tests.grpo_fixtures import (END, FLAGS, LetterCount, bigram_model, build_kat_run, logged, make_tokenizer,
                                 point_env_at)

torch.set_num_threads(1)


# -----------------------------------------------------------------------------
# The maths

def test_k3_kl_is_zero_for_equal_policies_never_negative_and_unbiased():
    torch.manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(4, 7), dim=-1)
    assert torch.equal(k3_kl(logprobs, logprobs), torch.zeros(4, 7))
    ref = torch.log_softmax(torch.randn(4, 7) * 3, dim=-1)
    assert (k3_kl(logprobs, ref) >= 0).all() and (k3_kl(ref, logprobs) >= 0).all()
    # sampled from the policy, the mean of k3 estimates KL(policy || reference) without bias
    policy, reference = logprobs[0], ref[0]
    tokens = torch.distributions.Categorical(logits=policy).sample((200_000,))
    estimate = k3_kl(policy[tokens], reference[tokens]).mean().item()
    exact = (policy.exp() * (policy - reference)).sum().item()
    assert estimate == pytest.approx(exact, rel=0.03)


def test_clipped_policy_loss_on_hand_made_ratios():
    ratios = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5])
    old = torch.zeros(5)
    for advantage, expected, clipped in (
        (1.0, [-0.5, -0.9, -1.0, -1.1, -1.2], [False, False, False, False, True]),  # A > 0: gains capped at 1 + eps
        (-1.0, [0.8, 0.9, 1.0, 1.1, 1.5], [True, False, False, False, False]),  # A < 0: capped at 1 - eps
    ):
        logprobs = ratios.log().requires_grad_(True)
        loss, was_clipped = clipped_policy_loss(logprobs, old, torch.tensor(advantage), clip_eps=0.2)
        assert loss.tolist() == pytest.approx(expected, abs=1e-6)
        assert was_clipped.tolist() == clipped
        loss.sum().backward()
        # d(-r A)/d logp = -r A where the ratio counts; exactly 0 where it was clipped
        expected_grad = torch.where(torch.tensor(clipped), torch.zeros(5), -ratios * advantage)
        assert torch.allclose(logprobs.grad, expected_grad, atol=1e-6)


def test_group_advantages_with_and_without_std():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    centred = group_advantages(rewards, use_std=False)
    assert centred[0].tolist() == [-2.0, -1.0, 0.0, 3.0] and centred[1].tolist() == [0.0] * 4
    scaled = group_advantages(rewards, use_std=True)
    assert scaled[0].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert scaled[0].std().item() == pytest.approx(1.0, abs=1e-5)
    assert scaled[1].tolist() == [0.0] * 4  # no signal, no NaN


# -----------------------------------------------------------------------------
# Prompt sampling, seeds and flags

def test_rank_shares_are_disjoint_and_both_arms_share_their_seeds():
    ids = [f"p{i}" for i in range(50)]
    weights = np.linspace(1.0, 5.0, 50)
    uniform, density = PromptSampler(ids, weights, seed=7, mode="uniform"), PromptSampler(ids, weights, seed=7, mode="density")
    for step in range(3):
        draw = uniform.sample(8, step)
        shares = [grpo.rank_share(draw, rank, 4) for rank in range(4)]
        assert [pid for share in shares for pid in share] == draw  # every drawn position used once, by one rank
        assert all(len(share) == 2 for share in shares)
        # a fresh uniform sampler with the same seed (e.g. the other run of the arm) draws the same batch
        assert PromptSampler(ids, seed=7, mode="uniform").sample(8, step) == draw
        assert density.sample(8, step) != draw
    seeds = {(step, position): grpo.rollout_seed(42, step, position) for step in [grpo.EVAL_STREAM, 0, 1, 2]
             for position in range(8)}
    assert len(set(seeds.values())) == len(seeds)  # fresh samples every step, at every position, and in evaluations
    # the seed is computed from (seed, step, position) alone: the sampler has no say in it
    assert all(grpo.rollout_seed(42, s, p) == seed for (s, p), seed in seeds.items())


def test_prompt_ess_counts_draws():
    counts = DrawCounts()
    counts.add(["a", "b", "c", "d"])
    assert counts.ess() == pytest.approx(4.0)
    counts.add(["a", "a", "a", "a"])  # a: 5, the rest 1 each: 8^2 / (25 + 3)
    assert counts.ess() == pytest.approx(64 / 28)


def test_density_aware_alias_parses_and_conflicts_are_refused():
    resolve = lambda argv: grpo.resolve_flags(parse_flags(grpo.Config, argv))
    assert resolve(["--density_aware=False"]).prompt_sampling == "uniform"
    assert resolve(["--density_aware", "False"]).prompt_sampling == "uniform"
    assert resolve(["--density_aware=True"]).prompt_sampling == "density"
    assert resolve(["--prompt_sampling=uniform"]).density_aware is False
    assert resolve([]).prompt_sampling == "density"
    with pytest.raises(ValueError, match="contradicts"):
        resolve(["--prompt_sampling=uniform", "--density_aware=true"])
    assert resolve(["--prompt_sampling=shuffled"]).density_aware is None
    # --adv_std=true|false is --adv_norm=group|none; the default is none (Dr. GRPO)
    assert (resolve([]).adv_norm, resolve(["--adv_std=true"]).adv_norm, resolve(["--adv_std=false"]).adv_norm) == \
           ("none", "group", "none")
    assert resolve(["--adv_norm=group"]).adv_std is True and resolve(["--adv_norm=batch"]).adv_std is None
    assert resolve(["--adv_norm=group", "--adv_std=true"]).adv_norm == "group"
    with pytest.raises(ValueError, match="contradicts"):
        resolve(["--adv_norm=none", "--adv_std=true"])
    # --eval_every / --eval_prompts are the trajectory flags' old names
    cfg = resolve(["--eval_every=-1", "--eval_prompts=8"])
    assert (cfg.traj_every, cfg.traj_prompts) == (-1, 8)
    assert (resolve([]).traj_every, resolve([]).traj_prompts) == (grpo.DEFAULT_TRAJ_EVERY, grpo.DEFAULT_TRAJ_PROMPTS)
    with pytest.raises(ValueError, match="contradicts"):
        resolve(["--traj_every=10", "--eval_every=20"])


# -----------------------------------------------------------------------------
# End to end

@pytest.fixture(scope="module")
def kat_run(tmp_path_factory):
    return build_kat_run(tmp_path_factory.mktemp("grpo"))


@pytest.fixture
def env(kat_run, monkeypatch):
    return point_env_at(kat_run, monkeypatch)


def test_rollouts_keep_the_stop_token_and_truncated_ones_are_scored_with_the_penalty():
    tokenizer = make_tokenizer()
    engine = Engine(bigram_model(tokenizer), tokenizer)
    cfg = parse_flags(grpo.Config, ["--max_new_tokens=2", "--max_prompt_tokens=8", "--truncation_penalty=0.5"])
    prefix = {"messages": [{"role": "user", "content": "a question longer than eight tokens"}]}
    rollouts = grpo.sample_groups(engine, tokenizer, [prefix], 16, cfg, seed=0, stream=0, first_position=0)
    end = tokenizer.encode_special(END)
    prompt = rollouts["prompts"][0]
    assert len(prompt) == 8 and prompt[0] == tokenizer.get_bos_token_id()  # left-truncated, <|bos|> kept
    assert prompt[-1] == tokenizer.encode_special("<|assistant_start|>")
    finished = rollouts["finished"]
    assert 0 < sum(finished) < 16  # "a<end>" and "b<end>" finish within 2 tokens, "aa", "ab", ... do not
    for tokens, done, text in zip(rollouts["completions"], finished, rollouts["texts"]):
        assert done == (tokens[-1] == end)
        assert text == tokenizer.decode(tokens[:-1] if done else tokens)
    # scored in length-sorted batches of about 20 tokens, returned in the rollouts' order
    scores = grpo.score_rollouts(LetterCount("a"), rollouts, token_budget=20)
    assert scores == [float(text.count("a")) for text in rollouts["texts"]]
    # the truncation penalty comes off the reward before the advantages (--kl=token_k3: nothing else does)
    model = bigram_model(tokenizer)
    objective = Objective(adv_norm="none", kl="token_k3", beta=0.1, clip_eps=0.2, truncation_penalty=0.5)
    plan = prepare_update(model, model, rollouts["prompts"], rollouts["completions"], rollouts["masks"],
                          torch.tensor(scores), torch.tensor(finished), 16, objective, update_tokens=64,
                          nograd_tokens=64, need_sampling_logprobs=False)
    assert plan.rewards.tolist() == [text.count("a") - (0.0 if done else 0.5) for text, done in zip(rollouts["texts"], finished)]


def probability_of(letter, model, tokenizer) -> float:
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "Say something."}]})
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([prompt]))[0, -1], dim=-1)[ord(letter)].item()


def test_grpo_steps_make_the_rewarded_letter_more_likely(env, tmp_path):
    out_dir = tmp_path / "learn"
    flags = [*FLAGS, "--max_steps=12", "--prompts_per_step=4", "--samples_per_prompt=6", "--eval_every=-1",
             "--save_every=-1", "--learning_rate=3e-3", "--beta=0.01", f"--out_dir={out_dir}"]
    grpo.main(flags, reward_model=LetterCount("a"))

    tokenizer = env["tokenizer"]
    before = probability_of("a", load_model(env["sft_path"], "cpu")[0], tokenizer)
    after = probability_of("a", load_model(out_dir / "ckpt.pt", "cpu")[0], tokenizer)
    assert before == pytest.approx(0.5, abs=0.01)
    assert after > before + 0.15
    rewards = logged((out_dir / "training_log.txt").read_text(), "train/reward_mean")
    assert len(rewards) == 12 and np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.5


def test_both_arms_differ_only_in_the_sampler_and_their_checkpoints_load_by_stage(env):
    density = grpo.main([*FLAGS, "--density_aware=True"])
    baseline = grpo.main([*FLAGS, "--density_aware=False"])
    outs = env["dirs"]["NANOCHAT_OUTS_DIR"]
    configs = {arm: json.loads((outs / arm / "config.json").read_text()) for arm in ("grpo_density", "grpo_baseline")}
    d, b = configs["grpo_density"], configs["grpo_baseline"]
    assert (d["stage"], b["stage"]) == ("grpo_density", "grpo_baseline")
    assert (d["prompt_sampling"], b["prompt_sampling"]) == ("density", "uniform")
    assert d["init_from"] == b["init_from"] == "sft"
    differing = {k for k in d.keys() | b.keys() if d.get(k) != b.get(k)} - {"saved_at"}  # when, not how
    assert differing == {"stage", "prompt_sampling", "sampler", "train_args"}
    arg_diff = {k for k in d["train_args"] if d["train_args"][k] != b["train_args"][k]}
    assert arg_diff == {"prompt_sampling", "density_aware"}  # same seeds, steps, batch: the same compute
    assert d["sampler"]["kish_ess"] < b["sampler"]["kish_ess"] == b["sampler"]["train_prompts"]
    # step 0 evaluates the same SFT policy on the same held-out prompts with the same seeds
    key = next(k for k in density if k.startswith("Dev reward at step 0"))
    assert density[key] == baseline[key]

    # each arm trained on what its own sampler draws (the logged ESS is of the prompts drawn so far)
    draws = {}
    for arm, mode in (("grpo_density", "density"), ("grpo_baseline", "uniform")):
        sampler, counts, expected = KatData(env["data_dir"]).prompt_sampler(seed=42, mode=mode), DrawCounts(), []
        draws[mode] = [sampler.sample(2, step) for step in range(2)]
        for ids in draws[mode]:
            counts.add(ids)
            expected.append(counts.ess())
        assert logged((outs / arm / "training_log.txt").read_text(), "train/prompt_ess") == pytest.approx(expected)
    assert draws["density"] != draws["uniform"]

    log = (outs / "grpo_density" / "training_log.txt").read_text()
    for tag in ("train/loss", "train/pref_loss", "train/kl_loss", "train/kl ", "train/lr", "train/reward_mean",
                "train/reward_std", "train/zero_std_frac", "train/entropy", "train/completion_len", "train/clip_frac",
                "train/prompt_ess", "train/time_rollout", "train/time_score", "train/time_update", "val/policy_reward",
                "train/kl_seq", "train/kl_penalty", "train/rm_score_mean", "draws/quintile_1"):
        assert tag in log, tag
    assert list((outs / "grpo_density" / "logs").glob("events.out.tfevents.*"))
    entropies = logged(log, "train/entropy")
    assert all(0.5 < h < math.log(3) + 0.1 for h in entropies)  # "a", "b", end: at most ln 3 nats
    report = (env["dirs"]["NANOCHAT_BASE_DIR"] / "report" / "grpo_density_report.md").read_text()
    assert "GRPO, density prompt sampling" in report

    # the checkpoint holds the policy only (no reference, no reward model) and loads by stage name
    state = load_checkpoint(outs / "grpo_density" / "ckpt.pt", "cpu")["model"]
    assert set(state) == set(bigram_model(env["tokenizer"]).state_dict())
    model, tokenizer, meta = load_model("grpo_density", "cpu")
    assert meta["stage"] == "grpo_density" and meta["step"] == 2
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "Hello"}]})
    results, _ = Engine(model, tokenizer).generate_batch([prompt], num_samples=2, max_tokens=8, seed=3)
    assert all(results[0]) and set(tokenizer.decode(results[0][0])) <= {"a", "b"}


def test_resume_reproduces_the_uninterrupted_run(env, tmp_path):
    out_dir = tmp_path / "resume"
    # group z-scored advantages and a large LR: the tiny RM's reward gaps are small, and only scaled up do
    # they move the policy far enough within one step for the second inner epoch to clip
    flags = [*FLAGS, "--max_steps=3", "--save_every=2", "--eval_every=-1", "--inner_epochs=2", "--adv_norm=group",
             "--learning_rate=1e-2", f"--out_dir={out_dir}"]
    grpo.main(flags)
    uninterrupted = load_checkpoint(out_dir / "ckpt.pt", "cpu")["model"]
    (out_dir / "ckpt.pt").unlink()  # as if killed after the step-2 checkpoint
    shutil.rmtree(out_dir / "logs")
    grpo.main([*flags, "--resume=true"])
    resumed = load_checkpoint(out_dir / "ckpt.pt", "cpu")["model"]
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    log = (out_dir / "training_log.txt").read_text()
    assert "resumed at step 2" in log
    ess = logged(log, "train/prompt_ess")  # steps 1, 2, 3, then 3 again after the resume: recounted, not restarted
    assert len(ess) == 4 and ess[3] == ess[2]
    # the second inner epoch compares against the policy that sampled, which the first epoch moved away from
    assert max(logged(log, "train/clip_frac")) > 0


# DDP: 2 gloo ranks with one prompt each = one process with both prompts

@pytest.mark.slow
def test_two_ranks_train_the_same_policy_as_one_process(env, tmp_path):
    # batch-normalised advantages: their std is reduced over both ranks
    flags = [*FLAGS, "--rollout_prompts=1", "--grad_clip=0.05", "--learning_rate=3e-3", "--adv_norm=batch"]
    grpo.main([*flags, f"--out_dir={tmp_path / 'single'}"])
    env_dirs = {name: str(path) for name, path in env["dirs"].items()}
    spawn_script(grpo.main, [*flags, f"--out_dir={tmp_path / 'ddp'}"], env=env_dirs)
    single, ddp = load_checkpoint(tmp_path / "single" / "ckpt.pt", "cpu"), load_checkpoint(tmp_path / "ddp" / "ckpt.pt", "cpu")
    assert ddp["world_size"] == 2 and (tmp_path / "ddp" / "ckpt_rank1.pt").is_file()
    single_log, ddp_log = ((tmp_path / arm / "training_log.txt").read_text() for arm in ("single", "ddp"))
    for tag in ("train/grad_norm", "train/loss", "train/pref_loss", "train/kl", "train/reward_mean", "train/entropy",
                "train/num_tokens", "train/prompt_ess", "val/policy_reward", "val/kl"):
        ddp_values, single_values = logged(ddp_log, tag), logged(single_log, tag)
        # Step 1 starts from the same weights: the rank-averaged gradient's norm, taken before clipping
        # (0.05 clips every step), and every statistic agree up to float rounding. After it, they agree
        # less closely: group-relative advantages sum to 0, so some gradient entries are pure rounding
        # noise, which AdamW scales up to full-size steps.
        assert ddp_values[0] == pytest.approx(single_values[0], rel=1e-5, abs=1e-9), tag
        assert ddp_values == pytest.approx(single_values, rel=5e-3, abs=1e-6), tag
    start = load_checkpoint(env["sft_path"], "cpu")["model"]
    for key, tensor in single["model"].items():
        assert (ddp["model"][key] - tensor).norm() < 0.25 * (tensor - start[key]).norm(), key
    assert min(logged(single_log, "train/grad_norm")) > 0.05


def test_density_k_must_match_the_weights_file(env, tmp_path):
    with pytest.raises(ValueError, match=r"kat_density --k=10"):
        grpo.main([*[f for f in FLAGS if not f.startswith("--density_k")], f"--out_dir={tmp_path / 'k'}"])
