"""
GSM8K: grade-school math word problems with worked solutions. https://huggingface.co/datasets/openai/gsm8k
Configs main/socratic, splits train/test. Rows: question, answer. The answer's reasoning marks each
calculation as <<expression=result>> and ends with "#### <final number>", e.g.

    She pays 3 * 4 = <<3*4=12>>12 dollars.
    #### 12

Each <<expr=result>> becomes a calculator call in the assistant message: a {"type": "python"} part
holding the expression and a {"type": "python_output"} part holding the result, so the model learns
to call the tool and the engine can run it at inference.
"""

import re

from tasks.common import HubSplit, RowsTask, evaluate_final_answer

CALCULATION_RE = re.compile(r"<<([^>]*)>>")


def answer_to_parts(answer: str) -> list[dict]:
    """Split a GSM8K solution into text / python / python_output parts."""
    parts = []
    for i, piece in enumerate(CALCULATION_RE.split(answer)):
        if i % 2 == 0:  # re.split puts the captured calculations at odd positions
            if piece:
                parts.append({"type": "text", "text": piece})
            continue
        expression, equals, result = piece.rpartition("=")
        if not equals:  # a few rows have <<expr>> without a result; the tool call alone is still right
            expression, result = piece, ""
        parts.append({"type": "python", "text": expression})
        parts.append({"type": "python_output", "text": result})
    return parts


class GSM8K(RowsTask):
    eval_type = "generative"

    def __init__(self, subset: str, split: str, rows=None, **slicing):
        if subset not in ("main", "socratic") or split not in ("train", "test"):
            raise ValueError(f"GSM8K subset must be main|socratic and split train|test, got {subset!r}/{split!r}")
        local_name = f"gsm8k_{split}" if subset == "main" else f"gsm8k_socratic_{split}"
        self.subset, self.split = subset, split
        super().__init__(HubSplit("openai/gsm8k", subset, split, local_name), rows, **slicing)

    def row_to_conversation(self, row: dict) -> dict:
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": answer_to_parts(row["answer"])},
        ]}

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if the number after '#### ' in the completion equals the reference's, else 0."""
        return evaluate_final_answer(conversation, completion)
