"""
End-to-end tests of scripts/chat_rl.py on a tiny CPU model.

The "SFT model" is a real GPT whose weights make it a bigram table that answers every question
"#### 1" or "#### 2" (a coin flip; "####" is one token), and every test question's answer is 1:
rewards then differ within a group, so the policy gradient is real, and RL must make "1" more likely.
"""

import dataclasses
import json
import shutil

import pytest
import torch

from nanochat.checkpoint_manager import load_checkpoint, save_checkpoint
from nanochat.gpt import GPT
from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer
from scripts import chat_rl
from tests.conftest import bigram_model as table_model

torch.set_num_threads(1)


HASHES = 257  # the token "####"


def make_tokenizer() -> Tokenizer:
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"##": 256, b"####": HASHES})
    return Tokenizer(SPLIT_PATTERN, ranks)


def bigram_model(tokenizer) -> GPT:
    """After <|assistant_start|>: "####", " ", then "1" or "2", then <|assistant_end|>."""
    end = tokenizer.encode_special("<|assistant_end|>")
    return table_model(tokenizer.get_vocab_size(), {
        tokenizer.encode_special("<|assistant_start|>"): {HASHES: 14.0},
        HASHES: {ord(" "): 14.0},
        ord(" "): {ord("1"): 14.0, ord("2"): 14.0},
        ord("1"): {end: 14.0},
        ord("2"): {end: 14.0},
    })


@pytest.fixture
def sft_run(offline_run):
    base_dir, outs = offline_run
    tokenizer = make_tokenizer()
    assert tokenizer.encode("#### 1") == [HASHES, ord(" "), ord("1")]
    tokenizer.save(base_dir / "tok")
    # local task files take precedence over the bundled samples (tasks/common.py)
    (base_dir / "task_data").mkdir(parents=True)
    for split, count in (("train", 8), ("test", 3)):
        rows = [{"question": f"What is {n} - {n - 1}?", "answer": f"{n} - {n - 1} = 1.\n#### 1"} for n in range(2, 2 + count)]
        (base_dir / "task_data" / f"gsm8k_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = bigram_model(tokenizer)
    config = dataclasses.asdict(model.config)
    source = save_checkpoint(outs / "sft", 10, model, [], meta={"model_config": config}, final=True)
    return base_dir.parent, tokenizer, source


FLAGS = ["--device_type=cpu", "--num_iterations=3", "--examples_per_step=2", "--num_samples=4", "--max_new_tokens=12",
         "--rollout_questions=2", "--device_batch_size=3", "--eval_every=2", "--eval_examples=3", "--eval_samples=2",
         "--save_every=2", "--unembedding_lr=1.0"]  # lm_head learns at 0.05 (init_lr_frac), the rest as in a real run


def probability_of_one(model, tokenizer) -> float:
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "What is 7 - 6?"}]})
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokenizer.encode("#### ")]))[0, -1]
    return torch.softmax(logits, dim=-1)[ord("1")].item()


def load_weights(model, path):
    model.load_state_dict(load_checkpoint(path, "cpu")["model"])
    return model


def test_rl_writes_its_stage_and_makes_the_rewarded_answer_more_likely(sft_run):
    tmp_path, tokenizer, source = sft_run
    summary = chat_rl.main(FLAGS)

    rl_dir = tmp_path / "outs" / "rl"
    assert (rl_dir / "ckpt.pt").exists() and (rl_dir / "ckpt_2.pt").exists()
    config = json.loads((rl_dir / "config.json").read_text())
    assert config["stage"] == "rl" and config["step"] == 3 and config["init_from"] == str(source)
    assert config["train_args"]["num_samples"] == 4
    log = (rl_dir / "training_log.txt").read_text()
    for tag in ("train/reward_mean", "train/reward_std", "train/seq_len", "train/lr", "val/pass@1", "val/pass@2"):
        assert tag in log
    assert list((rl_dir / "logs").glob("events.out.tfevents.*"))
    report = (tmp_path / "base_dir" / "report" / "rl_report.md").read_text()
    assert "## Chat RL" in report and "- Iterations: 3" in report
    assert 0.0 < summary["Final training reward"] < 1.0

    before = probability_of_one(load_weights(bigram_model(tokenizer), source), tokenizer)
    after = probability_of_one(load_weights(bigram_model(tokenizer), rl_dir / "ckpt.pt"), tokenizer)
    assert before == pytest.approx(0.5, abs=5e-3)  # the other 265 tokens share e^-14 of the mass
    assert after > before + 0.1


def test_resume_reproduces_the_uninterrupted_run_exactly(sft_run):
    tmp_path, tokenizer, _ = sft_run
    rl_dir = tmp_path / "outs" / "rl"
    chat_rl.main(FLAGS)
    uninterrupted = load_checkpoint(rl_dir / "ckpt.pt", "cpu")["model"]
    (rl_dir / "ckpt.pt").unlink()  # as if killed after the step-2 checkpoint
    shutil.rmtree(rl_dir / "logs")

    chat_rl.main(FLAGS + ["--resume=true"])
    resumed = load_checkpoint(rl_dir / "ckpt.pt", "cpu")["model"]
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    assert "resumed at step 2" in (rl_dir / "training_log.txt").read_text()


def test_a_group_needs_two_samples(sft_run):
    with pytest.raises(ValueError, match="at least 2 samples"):
        chat_rl.main(["--device_type=cpu", "--num_samples=1"])
