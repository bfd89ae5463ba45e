"""
HumanEval: 164 Python functions to complete, graded by running hidden tests.
https://huggingface.co/datasets/openai/openai_humaneval (split test). Rows: task_id, prompt (imports,
signature and docstring), canonical_solution (the body), test (defines check(candidate)), entry_point.

The model sees the prompt and writes the whole function. Its code (with the prompt's imports) runs in
nanochat.execution's sandbox; the prompt and the tests run outside it and call check() with the model's function,
so the verdict cannot come from the model's code. Passing means check() returned.
"""

import re

from nanochat.execution import check_function
from tasks.common import HubSplit, RowsTask

CODE_BLOCK_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a prompt (models often drop them from their answer)."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    """The first fenced code block of a completion, or the whole completion if it has none."""
    match = CODE_BLOCK_RE.search(completion)
    return (match.group(1) if match else completion).strip()


class HumanEval(RowsTask):
    eval_type = "generative"

    def __init__(self, timeout: float = 5.0, rows=None, **slicing):
        self.timeout = timeout
        super().__init__(HubSplit("openai/openai_humaneval", None, "test", "humaneval"), rows, **slicing)

    def row_to_conversation(self, row: dict) -> dict:
        prompt = row["prompt"] if row["prompt"].endswith("\n") else row["prompt"] + "\n"
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": prompt + row["canonical_solution"]},
            ],
            "test": row["test"],
            "entry_point": row["entry_point"],
            "task_id": row["task_id"],
        }

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if the completion's function passes the task's tests, else 0."""
        prompt = conversation["messages"][0]["content"]
        solution = "\n\n".join([extract_imports(prompt), extract_program(completion)])
        # the prompt runs beside the tests: some tests call its helpers (HumanEval/32's poly, /38's encode_cyclic)
        result = check_function(solution, conversation["test"], conversation["entry_point"], test_setup=prompt,
                                timeout=self.timeout)
        return int(result.success)
