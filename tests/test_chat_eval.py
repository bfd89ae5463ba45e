"""End-to-end tests of scripts/chat_eval.py on a tiny random checkpoint and the bundled task samples.
(The scoring itself is tested against hand-made tasks in tests/test_task_eval.py.)"""

import dataclasses

import pytest
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, config_from_depth
from nanochat.report import parse_bullets
from nanochat.task_eval import TASK_NAMES, chatcore
from nanochat.tokenizer import Tokenizer
from scripts import chat_eval
from tasks.common import SAMPLES_DIR

torch.set_num_threads(1)


@pytest.fixture
def chat_eval_run(offline_run):
    """A trained tiny tokenizer and a random depth-1 model saved as the given stages, all offline."""
    base_dir, outs = offline_run
    texts = [(SAMPLES_DIR / name).read_text() for name in ("gsm8k_train.jsonl", "arc_easy_train.jsonl")]
    tokenizer = Tokenizer.train_from_iterator(iter(texts), 300)
    tokenizer.save(base_dir / "tok")
    config = config_from_depth(1, vocab_size=tokenizer.get_vocab_size(), sequence_len=256)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()

    def save(stage):
        return save_checkpoint(outs / stage, 5, model, [], meta={"model_config": dataclasses.asdict(config)}, final=True)
    return base_dir, save


def read_section(path, section="Chat evaluation"):
    text = path.read_text()
    assert text.count(f"## {section}") == 1
    return parse_bullets(text)


def test_all_six_tasks_and_chatcore_go_into_the_stage_report(chat_eval_run):
    base_dir, save = chat_eval_run
    save("sft")
    results = chat_eval.main(["-i", "sft", "-x", "2", "-m", "8", "-b", "2", "--device_type=cpu"])

    assert list(results) == TASK_NAMES + ["ChatCORE"]
    assert all(0.0 <= results[name] <= 1.0 for name in TASK_NAMES)
    assert results["ChatCORE"] == pytest.approx(chatcore(results))
    bullets = read_section(base_dir / "report" / "sft_report.md")
    for key in TASK_NAMES + ["ChatCORE"]:  # the exact keys the summary table reads
        assert float(bullets[key]) == pytest.approx(results[key], abs=5e-5)
    assert bullets["Checkpoint"] == "sft step 5" and bullets["Problems per task"] == "2"


def test_a_subset_from_a_checkpoint_path_reports_under_its_stage_without_chatcore(chat_eval_run):
    base_dir, save = chat_eval_run
    path = save("grpo_density")
    results = chat_eval.main(["-i", str(path), "-a", "ARC-Easy|SpellingBee", "-x", "3", "-m", "4", "--device_type=cpu"])

    assert list(results) == ["ARC-Easy", "SpellingBee"]
    bullets = read_section(base_dir / "report" / "grpo_density_report.md")
    assert "ChatCORE" not in bullets and "MMLU" not in bullets
    assert float(bullets["ARC-Easy"]) == pytest.approx(results["ARC-Easy"], abs=5e-5)
    # a greedy random model cannot count letters: no SpellingBee answer ends in "#### <n>"
    assert results["SpellingBee"] == 0.0


def test_unknown_task_names_are_refused_before_any_work(chat_eval_run):
    with pytest.raises(ValueError, match="unknown task.*GSM9K"):
        chat_eval.main(["-i", "sft", "-a", "ARC-Easy|GSM9K", "--device_type=cpu"])
