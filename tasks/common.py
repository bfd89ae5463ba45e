"""
What every task shares: the Task base class (a sliceable dataset of conversations, plus how to
grade a model's answer), mixtures and sequences of tasks, the multiple-choice rendering, and
where task rows come from.

A conversation is nanochat's format: {"messages": [{"role": ..., "content": str | [parts]}, ...]},
optionally with extra keys a task needs to grade it ("letters", "test", "entry_point").

Where rows come from (load_rows):
1. $NANOCHAT_BASE_DIR/task_data/<local_name>.jsonl if it exists: one HuggingFace row per line,
   same columns as the hub dataset (make one online with `load_dataset(...).to_json(path)`);
2. else, with NANOCHAT_TASKS_OFFLINE=1, the small samples bundled in tasks/samples/ (tiny preset);
3. else the HuggingFace hub through `datasets`.
"""

import json
import logging
import operator
import os
import random
import re
from pathlib import Path

import nanochat.download
from nanochat.common import get_base_dir

logger = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
OFFLINE_ENV = "NANOCHAT_TASKS_OFFLINE"
# every dataset task shuffles its rows once with this seed, so a slice such as stop=500 is a
# representative subset and the same one on every machine
SHUFFLE_SEED = 42


class Task:
    """
    A dataset of conversations viewed through (start, stop, step), like range().
    Subclasses implement num_examples() and get_example(physical_index); generative tasks
    also implement evaluate(conversation, completion).
    """

    eval_type: str | None = None  # "categorical", "generative", or None for training-only data

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0:
            raise ValueError(f"{type(self).__name__}: start must be >= 0, got {start}")
        if stop is not None and stop < start:
            raise ValueError(f"{type(self).__name__}: stop ({stop}) must be >= start ({start})")
        if step < 1:
            raise ValueError(f"{type(self).__name__}: step must be >= 1, got {step}")
        self.start, self.stop, self.step = start, stop, step
        self._warned_stop = False

    # The interface every task implements (each class in tasks/ overrides both); calling one on a
    # class that forgot to is a programming error, reported by name.
    def num_examples(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define num_examples() (abstract in Task)")

    def get_example(self, index: int) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must define get_example() (abstract in Task)")

    def __len__(self) -> int:
        available = self.num_examples()
        stop = available if self.stop is None else min(self.stop, available)
        if self.stop is not None and self.stop > available and not self._warned_stop:
            # small local samples are shorter than the slices full runs ask for; say so once
            logger.warning("%s: stop=%d but only %d examples exist; using %d",
                           type(self).__name__, self.stop, available, available)
            self._warned_stop = True
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index: int) -> dict:
        index = operator.index(index)  # ints and numpy integers; floats and slices raise TypeError
        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(f"{type(self).__name__} index {index} out of range for length {length}")
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def evaluate(self, conversation: dict, completion: str) -> int:
        raise NotImplementedError(f"{type(self).__name__} is training data and has no evaluation")

    def reward(self, conversation: dict, completion: str) -> float:
        """RL reward: the evaluation outcome as a float (1.0 correct, 0.0 not)."""
        return float(self.evaluate(conversation, completion))


class TaskMixture(Task):
    """
    Several tasks interleaved in one deterministic shuffle, so a training run sees every source
    throughout rather than one after another. Pass a task twice to oversample it.
    """

    def __init__(self, tasks: list[Task], seed: int = SHUFFLE_SEED, **slicing):
        super().__init__(**slicing)
        if not tasks:
            raise ValueError("TaskMixture needs at least one task")
        self.tasks = tasks
        self.index_map = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index_map)

    def num_examples(self) -> int:
        return len(self.index_map)

    def get_example(self, index: int) -> dict:
        task_index, local_index = self.index_map[index]
        return self.tasks[task_index][local_index]


class TaskSequence(Task):
    """Several tasks one after another, in order (a curriculum)."""

    def __init__(self, tasks: list[Task], **slicing):
        super().__init__(**slicing)
        if not tasks:
            raise ValueError("TaskSequence needs at least one task")
        self.tasks = tasks
        self.lengths = [len(task) for task in tasks]

    def num_examples(self) -> int:
        return sum(self.lengths)

    def get_example(self, index: int) -> dict:
        for task, length in zip(self.tasks, self.lengths):
            if index < length:
                return task[index]
            index -= length
        raise IndexError(f"TaskSequence index out of range for length {self.num_examples()}")


class RowsTask(Task):
    """A task backed by dataset rows (HF or local JSONL), visited in a fixed shuffled order."""

    def __init__(self, rows, **slicing):
        super().__init__(**slicing)
        self.rows = rows
        self.order = list(range(len(rows)))
        random.Random(SHUFFLE_SEED).shuffle(self.order)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        return self.row_to_conversation(self.rows[self.order[index]])

    # Interface: each row-backed task turns its schema's row into a conversation here.
    def row_to_conversation(self, row: dict) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must define row_to_conversation() (abstract in RowsTask)")


def check_chat_messages(messages, where: str):
    """Optional system message, then user/assistant alternating (user first), ending on the assistant."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if len(turns) < 2:
        raise ValueError(f"{where}: a conversation needs at least a user and an assistant turn, got {len(turns)}")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise ValueError(f"{where}: turn {i} has role {message.get('role')!r}, expected {expected!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: turn {i} content must be a string")
    if len(turns) % 2 != 0:
        raise ValueError(f"{where}: the conversation ends on a user turn; it must end on the assistant")


# -----------------------------------------------------------------------------
# Multiple choice

def render_mc(question: str, letters, choices) -> str:
    """
    nanochat's multiple-choice prompt. The letter comes after its choice and right after "=",
    with no space: small models bind a letter to the choice before it better, and "A" and " A"
    are different tokens, so the prompt must show the exact token the answer will be.
    """
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def evaluate_letter(conversation: dict, predicted_letter: str) -> int:
    """Categorical grading: the predicted letter against the last (assistant) message."""
    letters = conversation["letters"]
    if predicted_letter not in letters:
        raise ValueError(f"predicted answer {predicted_letter!r} is not one of the choices {letters}")
    return int(predicted_letter == conversation["messages"][-1]["content"])


# -----------------------------------------------------------------------------
# "#### <number>" final answers (GSM8K and SpellingBee)

# the normalisation of OpenAI's grade-school-math reference grader: the number after "#### ", commas dropped
FINAL_ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_final_answer(text: str) -> str | None:
    match = FINAL_ANSWER_RE.search(text)
    if match is None:
        return None
    return match.group(1).strip().replace(",", "")


def evaluate_final_answer(conversation: dict, completion: str) -> int:
    """1 if the completion's '#### N' equals the reference's (the last part of the last message)."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be the generated text (str), got {type(completion).__name__}")
    reference = conversation["messages"][-1]
    if reference["role"] != "assistant" or not isinstance(reference["content"], list):
        raise ValueError("the reference conversation must end with an assistant message made of parts")
    expected = extract_final_answer(reference["content"][-1]["text"])
    if expected is None:
        raise ValueError("the reference answer has no '#### <number>' line to grade against")
    return int(extract_final_answer(completion) == expected)


# -----------------------------------------------------------------------------
# Loading rows

class TaskDataMissing(FileNotFoundError):
    """Neither a local file nor the HuggingFace hub can supply a task's rows."""


def tasks_offline() -> bool:
    value = os.environ.get(OFFLINE_ENV, "0").strip().lower()
    if value not in ("0", "1", "true", "false"):
        raise ValueError(f"{OFFLINE_ENV} must be 1/0/true/false, got {value!r}")
    return value in ("1", "true")


def task_data_dir() -> Path:
    return get_base_dir() / "task_data"


def read_jsonl(path: Path) -> list:
    """One JSON value per non-empty line; a bad line is reported with its file and line number."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg}); fix or delete that line") from e
    return rows


def local_rows_path(local_name: str) -> Path | None:
    """The local JSONL that replaces the hub for this dataset, or None if there is none to use."""
    own = task_data_dir() / f"{local_name}.jsonl"
    if own.exists():
        return own
    sample = SAMPLES_DIR / f"{local_name}.jsonl"
    if tasks_offline() and sample.exists():
        return sample
    return None


def load_rows(hf_id: str, config: str | None, split: str, local_name: str):
    """
    Rows of one split of a HuggingFace dataset, as a sequence of dicts with the hub's columns:
    a local JSONL if there is one to use (see the module docstring), else `datasets` online.
    """
    path = local_rows_path(local_name)
    if path is not None:
        rows = read_jsonl(path)
        logger.info("%s (%s, %s): %d rows from %s", hf_id, config, split, len(rows), path)
        return rows
    own = task_data_dir() / f"{local_name}.jsonl"
    what = f"{hf_id}" + (f" (config {config!r}, split {split!r})" if config else f" (split {split!r})")
    if tasks_offline():
        raise TaskDataMissing(
            f"{what}: {OFFLINE_ENV}=1 but neither {own} nor a bundled sample {SAMPLES_DIR / (local_name + '.jsonl')} "
            f"exists. Put the rows there as JSONL (one hub row per line), or unset {OFFLINE_ENV} to download.")
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise TaskDataMissing(
            f"{what}: no local file {own}, and the `datasets` package is not installed to download it. "
            f"Install it (`uv sync --extra hf`), or write that file (one hub row per line, e.g. on a machine with "
            f"internet: load_dataset(...).to_json(path)), or set {OFFLINE_ENV}=1 to use the small bundled samples.") from e
    try:
        return load_dataset(hf_id, config, split=split)
    except Exception as e:  # network, auth or hub errors: add which dataset and the offline way out
        raise TaskDataMissing(
            f"{what}: download failed ({type(e).__name__}: {e}). Without internet, put the rows at {own} "
            f"or set {OFFLINE_ENV}=1 to use the small bundled samples.") from e


# -----------------------------------------------------------------------------
# Whole files fetched by URL (identity conversations, the spelling word list)

def resolve_data_file(filename: str, url: str, sample_name: str) -> Path:
    """
    $NANOCHAT_BASE_DIR/<filename> if present; else, offline, the bundled tasks/samples/<sample_name>;
    else download it from `url` into the base dir.
    """
    path = get_base_dir() / filename
    if path.exists():
        return path
    if tasks_offline():
        sample = SAMPLES_DIR / sample_name
        if not sample.exists():
            raise TaskDataMissing(f"{OFFLINE_ENV}=1 but neither {path} nor the bundled sample {sample} exists; "
                                  f"put the file at {path} (it comes from {url})")
        return sample
    download_file(url, path)
    return path


def download_file(url: str, path: Path, retries: int = 5, timeout_s: float = 60.0):
    """
    nanochat.download.download_file (retries with backoff, atomic write) behind a file lock, so
    the ranks of a torchrun job do not download the same file at once; a failure becomes
    TaskDataMissing with the two ways out.
    """
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        try:
            nanochat.download.download_file(url, path, attempts=retries, timeout=timeout_s)
        except nanochat.download.DownloadError as e:
            raise TaskDataMissing(f"could not download {url} to {path}: {e}. Download it by hand to that path, "
                                  f"or set {OFFLINE_ENV}=1 to use the bundled sample.") from e
