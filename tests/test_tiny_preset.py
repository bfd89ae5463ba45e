"""
The newcomer's command, end to end: `bash kat_speedrun.sh --tiny --rl` on this CPU, offline, from
the bundled samples. Every stage must finish, and every output must exist, load and hold finite
numbers (the controls on the same run: tests/test_control_runs.py). This is the slowest test
(several minutes on 2 cores); it is the one that proves the stages fit together. The run itself
is tests/conftest.py's tiny_run, made once per session.
"""

import json
import math
import re

import pytest
import torch


pytestmark = pytest.mark.slow  # every test here starts processes

STAGES = ["base", "mid", "sft", "rl", "rm", "grpo_density", "grpo_baseline"]
SUMMARY_METRICS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]


def _finite_tensors(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if torch.is_tensor(t) and t.is_floating_point())


def test_every_stage_ran_and_wrote_a_loadable_finite_checkpoint(tiny_run):
    root, stdout = tiny_run
    assert "[FAIL]" not in stdout
    for stage in STAGES:
        stage_dir = root / "outs" / stage
        for name in ("ckpt.pt", "config.json", "training_log.txt"):
            assert (stage_dir / name).is_file(), f"{stage} has no {name}"
        assert list((stage_dir / "logs").glob("events.out.tfevents.*")), f"{stage} has no TensorBoard events"
        ckpt = torch.load(stage_dir / "ckpt.pt", map_location="cpu", weights_only=False)
        assert _finite_tensors(ckpt["model"]), f"{stage}'s weights hold non-finite values"
        assert json.loads((stage_dir / "config.json").read_text())["stage"] == stage


def test_checkpoints_load_by_stage_name_and_generate(tiny_run, monkeypatch):
    root, _ = tiny_run
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(root / "base"))
    monkeypatch.setenv("NANOCHAT_OUTS_DIR", str(root / "outs"))
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    from nanochat.kat.reward_model import load_reward_model

    for stage in ["base", "mid", "sft", "rl", "grpo_density", "grpo_baseline"]:
        model, tokenizer, meta = load_model(stage, "cpu")
        prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "Hello!"}]})
        tokens, _ = Engine(model, tokenizer).generate_batch([prompt], num_samples=2, max_tokens=8, seed=1)
        assert len(tokens[0]) == 2 and all(len(t) <= 8 for t in tokens[0])
    rm = load_reward_model("rm", "cpu")
    rewards = rm.score([({"messages": [{"role": "user", "content": "Hi"}]}, "Hello there.")])
    assert len(rewards) == 1 and math.isfinite(rewards[0])


def test_report_card_holds_every_stage_and_finite_summary_numbers(tiny_run):
    root, _ = tiny_run
    report = (root / "report.md").read_text()
    for section in ["Tokenizer training", "Base model training", "Base model loss", "Base model evaluation",
                    "Midtraining", "Chat SFT", "Chat evaluation", "Chat RL"]:
        assert f"## {section}" in report, f"report.md lacks the section {section!r}"
    table = report[report.index("## Summary"):]
    for metric in SUMMARY_METRICS:
        row = re.search(rf"^\| {re.escape(metric)} \|(.*)\|$", table, re.M)
        assert row, f"summary table has no {metric} row"
        cells = [c.strip() for c in row.group(1).split("|")]
        numbers = [float(c) for c in cells if c != "-"]
        assert numbers and all(math.isfinite(x) for x in numbers), f"{metric}: {cells}"


def test_kat_data_and_diversity_report_are_complete(tiny_run):
    root, _ = tiny_run
    data = root / ".cache" / "data"
    for name in ["pairs_all.jsonl", "prompts_all.jsonl", "prompt_id_map.tsv", "stats.txt", "prompt_embeddings.npy",
                 "prompt_weights.jsonl", "embedding_map.json"]:
        assert (data / name).is_file(), f"KAT data lacks {name}"
    weights = [json.loads(line)["weight"] for line in (data / "prompt_weights.jsonl").read_text().splitlines()]
    assert all(math.isfinite(w) and w >= 0 for w in weights) and abs(sum(weights) - 1) < 1e-6

    report = (root / ".cache" / "diversity_report.md").read_text()
    for heading in ["## Verdict", "## Setup", "## Summary: density vs baseline"]:
        assert heading in report
    assert list((root / ".cache").glob("diversity_report*.png")), "no plots beside the diversity report"
    figures = json.loads((root / ".cache" / "diversity_report.json").read_text())
    results = figures["results"]
    assert results["labels"] == ["sft", "baseline", "density"]
    assert set(results["comparisons"]) == {"density_vs_baseline", "baseline_vs_sft", "density_vs_sft"}
    for label in results["labels"]:
        for metric, values in results["per_prompt"][label].items():
            assert len(values) == results["num_prompts"], f"{label}/{metric} lacks prompts"
            # self-BLEU is undefined (null) for a prompt with fewer than 2 non-empty samples
            finite = [v for v in values if not (v is None and metric == "self_bleu")]
            assert all(v is not None and math.isfinite(v) for v in finite), f"{label}/{metric} is not finite"
    rm_eval = json.loads((root / "outs" / "rm" / "eval.json").read_text())
    assert rm_eval["split"] == "test" and rm_eval["n_pairs"] > 0 and math.isfinite(rm_eval["accuracy"])
