"""
MMLU: four-choice questions over 57 subjects. https://huggingface.co/datasets/cais/mmlu
Rows: question, subject, choices (4 strings), answer (index 0-3).
- subset "all", split test/validation/dev: the benchmark (14,042 test questions).
- subset "auxiliary_train", split train: ~100K questions from other exams (ARC, RACE, OBQA, MCTest),
  used in midtraining to teach the multiple-choice format. The hub nests each of these rows under a
  "train" key; local files may have it nested or flat.
"""

from tasks.common import HubSplit, RowsTask, evaluate_letter, render_mc

SPLITS = {"all": ("test", "validation", "dev"), "auxiliary_train": ("train",)}


class MMLU(RowsTask):
    eval_type = "categorical"
    letters = ("A", "B", "C", "D")

    def __init__(self, subset: str, split: str, rows=None, **slicing):
        if split not in SPLITS.get(subset, ()):
            raise ValueError(f"MMLU: subset/split must be one of {SPLITS}, got {subset!r}/{split!r}")
        local_name = "mmlu_auxiliary_train" if subset == "auxiliary_train" else f"mmlu_{split}"
        self.subset, self.split = subset, split
        super().__init__(HubSplit("cais/mmlu", subset, split, local_name), rows, **slicing)

    def row_to_conversation(self, row: dict) -> dict:
        if "train" in row and "question" not in row:
            row = row["train"]
        choices = row["choices"]
        if len(choices) != 4 or row["answer"] not in range(4):
            raise ValueError(f"MMLU row needs 4 choices and answer 0-3, got {len(choices)} choices, answer {row['answer']!r}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], self.letters, choices)},
                {"role": "assistant", "content": self.letters[row["answer"]]},
            ],
            "subject": row["subject"],  # for per-subject accuracy
            "letters": self.letters,    # the eval restricts the model's next-token choice to these
        }

    def evaluate(self, conversation: dict, completion: str) -> int:
        return evaluate_letter(conversation, completion)
