"""
What every task shares: the Task base class (a sliceable dataset of conversations, plus how to
grade a model's answer), mixtures and sequences of tasks, the multiple-choice rendering, and
where task rows come from.

A conversation is nanochat's format: {"messages": [{"role": ..., "content": str | [parts]}, ...]},
optionally with extra keys a task needs to grade it ("letters", "test", "entry_point").

Where rows come from (load_rows):
1. $NANOCHAT_BASE_DIR/task_data/<local_name>.jsonl if it exists: one HuggingFace row per line,
   same columns as the hub dataset (`python -m scripts.prefetch` writes every split a run reads);
2. else, with NANOCHAT_TASKS_OFFLINE=1, the small samples bundled in tasks/samples/ (tiny preset);
3. else the HuggingFace hub through `datasets`.
A row-backed task runs its row parser over every row when it is built (RowCheck): a row it rejects
is skipped and counted in one summary line; a missing column, or most rows rejected, is an error.
"""

import json
import logging
import operator
import random
import re
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

import nanochat.download
from nanochat.common import OFFLINE_ENV, get_base_dir, inputs_offline, print0

logger = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
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


class HubSplit(NamedTuple):
    """One split of a HuggingFace dataset, and the name of its local copy task_data/<local_name>.jsonl."""
    hf_id: str
    config: str | None
    split: str
    local_name: str

    def describe(self) -> str:
        return f"{self.hf_id}" + (f" (config {self.config!r}, split {self.split!r})" if self.config
                                  else f" (split {self.split!r})")


class RowsTask(Task):
    """
    A task backed by the rows of one HubSplit (local JSONL or the hub), visited in a fixed shuffled
    order. Every row goes through row_to_conversation once here, so a bad row is found when the
    stage starts, not an hour into it: rows it rejects are skipped (one summary line says how many).
    rows: the rows themselves instead of loading them (scripts.prefetch checks rows as they arrive).
    """

    def __init__(self, source: HubSplit, rows=None, **slicing):
        super().__init__(**slicing)
        self.source = source
        self.rows = load_rows(*source) if rows is None else rows
        check = self.row_check()
        self.order = [i for i, row in enumerate(self.rows) if check.accepts(row, f"row {i}")]
        summary = check.finish()
        if summary:
            print0(summary)
        random.Random(SHUFFLE_SEED).shuffle(self.order)

    def num_examples(self) -> int:
        return len(self.order)

    def row_check(self) -> "RowCheck":
        """This task's row parser as a RowCheck (scripts.prefetch checks downloaded rows with it too)."""
        return RowCheck(f"{type(self).__name__}: {self.source.describe()}", self.row_to_conversation)

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


MAX_REJECTED_FRACTION = 0.5  # more rejected rows than this is a changed schema, not a few odd rows


class RowSchemaError(ValueError):
    """A source's rows are not what its loader reads: a missing column, or most rows rejected."""


class RowCheck:
    """
    A loader's own row parser run over a source's rows, one at a time. A row the parser rejects
    (ValueError, e.g. a conversation ending on a user turn) is counted and skipped; a row it cannot
    read at all (a missing or renamed column: KeyError, TypeError, ...) is a RowSchemaError at once,
    and so is a source where more than max_rejected of the rows are rejected (finish()).
    """

    def __init__(self, what: str, parse: Callable, max_rejected: float = MAX_REJECTED_FRACTION):
        self.what, self.parse, self.max_rejected = what, parse, max_rejected
        self.seen, self.rejected, self.first_rejection = 0, 0, ""
        self.reasons = Counter()  # a MalformedRow's reason (nanochat.kat.pairs), else the error's type

    def accepts(self, row, location: str) -> bool:
        self.seen += 1
        try:
            self.parse(row)
        except (KeyError, TypeError, AttributeError, IndexError) as err:
            columns = sorted(row) if isinstance(row, dict) else f"a {type(row).__name__}, not an object"
            raise RowSchemaError(
                f"{self.what}, {location}: the loader cannot read this row ({type(err).__name__}: {err}); its columns "
                f"are {columns}. The dataset's schema changed: update the loader's row parser, or replace the "
                f"rows with ones in the schema it reads") from err
        except ValueError as err:
            self.rejected += 1
            self.reasons[getattr(err, "reason", type(err).__name__)] += 1
            self.first_rejection = self.first_rejection or f"{location}: {err}"
            return False
        return True

    def finish(self) -> str | None:
        """Raise if too many rows were rejected; else a summary line of the skipped rows (None if none were)."""
        counts = f"{self.rejected:,} of {self.seen:,} rows ({', '.join(f'{r} {n}' for r, n in self.reasons.most_common())})"
        if self.rejected > self.max_rejected * self.seen:
            raise RowSchemaError(
                f"{self.what}: the loader rejects {counts}; first: {self.first_rejection}. So many means the "
                f"dataset's schema changed, not a few odd rows: update the loader's row parser, or replace the rows "
                f"with ones in the schema it reads")
        if self.rejected:
            return f"{self.what}: skipped {counts} that the loader rejects; first: {self.first_rejection}"
        return None


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
    if inputs_offline() and sample.exists():
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
    if inputs_offline():
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
    if inputs_offline():
        sample = SAMPLES_DIR / sample_name
        if not sample.exists():
            raise TaskDataMissing(f"{OFFLINE_ENV}=1 but neither {path} nor the bundled sample {sample} exists; "
                                  f"put the file at {path} (it comes from {url})")
        return sample
    download_file(url, path)
    return path


def download_file(url: str, path: Path, retries: int = 5, timeout_s: float = 60.0, base_delay: float = 2.0,
                  validate: Callable[[Path], None] | None = None):
    """
    nanochat.download.download_file (retries with backoff, atomic write, validate on the complete
    file before it lands) behind a file lock, so the ranks of a torchrun job do not download the
    same file at once; a failure becomes TaskDataMissing with the two ways out.
    """
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        try:
            nanochat.download.download_file(url, path, attempts=retries, timeout=timeout_s, base_delay=base_delay,
                                            validate=validate)
        except nanochat.download.DownloadError as e:
            raise TaskDataMissing(f"could not download {url} to {path}: {e}. Download it by hand to that path, "
                                  f"or set {OFFLINE_ENV}=1 to use the bundled sample.") from e
