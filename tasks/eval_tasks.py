"""
The chat evaluation tasks by their report name: what scripts/chat_eval.py and chat_sft's
periodic metrics evaluate, and ChatCORE averages (nanochat/task_eval.py scores them).
"""

from nanochat.task_eval import TASK_NAMES
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee

SPELLING_BEE_TEST_SIZE = 256  # SpellingBee is generated, so its test set needs a size; nanochat's

FACTORIES = {
    "ARC-Easy": lambda: ARC(subset="ARC-Easy", split="test"),
    "ARC-Challenge": lambda: ARC(subset="ARC-Challenge", split="test"),
    "MMLU": lambda: MMLU(subset="all", split="test"),
    "GSM8K": lambda: GSM8K(subset="main", split="test"),
    "HumanEval": lambda: HumanEval(),
    "SpellingBee": lambda: SpellingBee(size=SPELLING_BEE_TEST_SIZE, split="test"),
}
assert list(FACTORIES) == TASK_NAMES, "every task ChatCORE averages has a factory, in report order"


def build_task(name: str):
    """The evaluation split of a task, by its report name."""
    if name not in FACTORIES:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")
    return FACTORIES[name]()
