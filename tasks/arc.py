"""
ARC (AI2 Reasoning Challenge): grade-school science questions.
https://huggingface.co/datasets/allenai/ai2_arc, configs ARC-Easy and ARC-Challenge, splits
train/validation/test. Rows: id, question, choices {text: [...], label: [...]}, answerKey.

Most rows label their choices A-D, but a few percent use 1-4, and some have 3 or 5 choices.
We relabel every row by position (A, B, C, ...) so the answer is always a letter token and the
model never has to learn that "2" can mean the second choice.
"""

from tasks.common import HubSplit, RowsTask, evaluate_letter, render_mc

SUBSETS = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}


class ARC(RowsTask):
    eval_type = "categorical"
    letters = ("A", "B", "C", "D", "E")  # the most any ARC row uses; each conversation says its own

    def __init__(self, subset: str, split: str, rows=None, **slicing):
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {list(SUBSETS)}, got {subset!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"ARC split must be train, validation or test, got {split!r}")
        self.subset, self.split = subset, split
        super().__init__(HubSplit("allenai/ai2_arc", subset, split, f"{SUBSETS[subset]}_{split}"), rows, **slicing)

    def row_to_conversation(self, row: dict) -> dict:
        texts, labels = row["choices"]["text"], row["choices"]["label"]
        if len(texts) > len(self.letters) or len(texts) != len(labels):
            raise ValueError(f"ARC row {row.get('id')}: {len(texts)} choice texts and {len(labels)} labels")
        if row["answerKey"] not in labels:
            raise ValueError(f"ARC row {row.get('id')}: answerKey {row['answerKey']!r} is not among labels {labels}")
        letters = self.letters[:len(texts)]
        answer = letters[labels.index(row["answerKey"])]
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, texts)},
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,
        }

    def evaluate(self, conversation: dict, completion: str) -> int:
        return evaluate_letter(conversation, completion)
