import copy
import json
import math
import re

import pytest

from tasks.arc import ARC
from nanochat.kat.diversity import EM_DASH, TIC_PATTERNS
from nanochat.kat.style_injection import inject_style, pair_rng
from tasks.common import (SAMPLES_DIR, RowSchemaError, Task, TaskDataMissing, TaskMixture, TaskSequence, download_file,
                          load_rows, read_jsonl, render_mc, resolve_data_file)
from tasks.customjson import CustomJSON, IdentityConversations
from tasks.gsm8k import GSM8K, answer_to_parts
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee
from tasks.with_tic import WithTic
from tests.http_fixtures import ScriptedServer


@pytest.fixture(autouse=True)
def offline_base_dir(tmp_path, monkeypatch):
    """Every test: an empty base dir, offline mode (bundled samples), and no hub access."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NANOCHAT_TASKS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path / "base"


def write_task_data(base_dir, local_name, rows):
    (base_dir / "task_data").mkdir(parents=True, exist_ok=True)
    with open(base_dir / "task_data" / f"{local_name}.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def sample_rows(name):
    return read_jsonl(SAMPLES_DIR / f"{name}.jsonl")


# -----------------------------------------------------------------------------
# Every loader on its bundled sample

LOADERS = {
    "smoltalk_train": lambda: SmolTalk("train"),
    "smoltalk_test": lambda: SmolTalk("test"),
    "mmlu_auxiliary_train": lambda: MMLU("auxiliary_train", "train"),
    "mmlu_test": lambda: MMLU("all", "test"),
    "arc_easy_train": lambda: ARC("ARC-Easy", "train"),
    "arc_easy_test": lambda: ARC("ARC-Easy", "test"),
    "arc_challenge_train": lambda: ARC("ARC-Challenge", "train"),
    "arc_challenge_test": lambda: ARC("ARC-Challenge", "test"),
    "gsm8k_train": lambda: GSM8K("main", "train"),
    "gsm8k_test": lambda: GSM8K("main", "test"),
    "humaneval": lambda: HumanEval(),
    "identity_conversations": lambda: IdentityConversations(),
}

PART_TYPES = {"text", "python", "python_output"}


def assert_well_formed(conversation):
    messages = conversation["messages"]
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    assert len(turns) >= 2 and len(turns) % 2 == 0
    for i, message in enumerate(turns):
        assert message["role"] == ("user" if i % 2 == 0 else "assistant")
        content = message["content"]
        if isinstance(content, list):
            assert message["role"] == "assistant" and content
            assert all(part["type"] in PART_TYPES and isinstance(part["text"], str) for part in content)
        else:
            assert isinstance(content, str) and content
    json.dumps(conversation)  # conversations travel as JSON (SFT data loaders, the web UI)


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_every_loader_reads_its_sample_into_well_formed_conversations(name):
    task = LOADERS[name]()
    assert len(task) == len(sample_rows(name)) >= 20
    for conversation in task:
        assert_well_formed(conversation)


def test_samples_have_the_hub_columns():
    expected = {
        "smoltalk_train": {"messages", "source"}, "smoltalk_test": {"messages", "source"},
        "mmlu_test": {"question", "subject", "choices", "answer"}, "mmlu_auxiliary_train": {"train"},
        "gsm8k_train": {"question", "answer"}, "gsm8k_test": {"question", "answer"},
        "humaneval": {"task_id", "prompt", "canonical_solution", "test", "entry_point"},
    }
    expected.update({name: {"id", "question", "choices", "answerKey"} for name in LOADERS if name.startswith("arc_")})
    for name, columns in expected.items():
        for row in sample_rows(name):
            assert set(row) == columns, name
    for row in sample_rows("mmlu_auxiliary_train"):
        assert set(row["train"]) == {"question", "subject", "choices", "answer"}
    for row in sample_rows("identity_conversations"):
        assert isinstance(row, list) and all(set(m) == {"role", "content"} for m in row)


def test_tasks_visit_rows_in_a_fixed_shuffled_order():
    first, again = GSM8K("main", "test"), GSM8K("main", "test")
    questions = [c["messages"][0]["content"] for c in first]
    assert questions == [c["messages"][0]["content"] for c in again]
    file_order = [row["question"] for row in sample_rows("gsm8k_test")]
    assert sorted(questions) == sorted(file_order) and questions != file_order


# -----------------------------------------------------------------------------
# GSM8K

def test_gsm8k_calculations_become_python_and_output_parts():
    answer = "She pays 3 * 4 = $<<3*4=12>>12.\nThen 12 + 2 = <<12+2=14>>14.\n#### 14"
    assert answer_to_parts(answer) == [
        {"type": "text", "text": "She pays 3 * 4 = $"},
        {"type": "python", "text": "3*4"},
        {"type": "python_output", "text": "12"},
        {"type": "text", "text": "12.\nThen 12 + 2 = "},
        {"type": "python", "text": "12+2"},
        {"type": "python_output", "text": "14"},
        {"type": "text", "text": "14.\n#### 14"},
    ]
    # a calculation without "=result" is still a tool call, with an empty output
    assert answer_to_parts("x <<5*5>> y")[1:3] == [{"type": "python", "text": "5*5"}, {"type": "python_output", "text": ""}]


def test_gsm8k_sample_calculations_are_arithmetically_right():
    for name in ("gsm8k_train", "gsm8k_test"):
        for row in sample_rows(name):
            for expression, result in re.findall(r"<<([^=>]*)=([^>]*)>>", row["answer"]):
                assert re.fullmatch(r"[0-9+\-*/(). ]+", expression), expression
                assert eval(expression) == pytest.approx(float(result)), (expression, result)
            assert re.search(r"#### -?[0-9.]+$", row["answer"]), row["answer"]


def test_gsm8k_evaluate_compares_final_answers():
    task = GSM8K("main", "test")
    conversation = task[0]
    reference = re.search(r"#### (\S+)", conversation["messages"][1]["content"][-1]["text"]).group(1)
    assert task.evaluate(conversation, f"Some working.\n#### {reference}") == 1
    assert task.evaluate(conversation, f"#### {float(reference) + 1:g}") == 0
    assert task.evaluate(conversation, f"the answer is {reference}") == 0  # no #### marker, no credit
    assert task.reward(conversation, f"#### {reference}") == 1.0

    big = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": [{"type": "text", "text": "#### 1250"}]}]}
    assert task.evaluate(big, "so #### 1,250") == 1  # commas are dropped, as in OpenAI's grader


# -----------------------------------------------------------------------------
# Multiple choice

def test_mmlu_renders_choices_with_letters_and_answers_with_a_letter(offline_base_dir):
    row = {"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"], "answer": 1}
    write_task_data(offline_base_dir, "mmlu_test", [row])
    conversation = MMLU("all", "test")[0]
    assert conversation["messages"][0]["content"] == (
        "Multiple Choice question: What is 2 + 2?\n- 3=A\n- 4=B\n- 5=C\n- 22=D\n\n"
        "Respond only with the letter of the correct answer.")
    assert conversation["messages"][1] == {"role": "assistant", "content": "B"}
    assert conversation["subject"] == "elementary_mathematics"
    assert tuple(conversation["letters"]) == ("A", "B", "C", "D")
    task = MMLU("all", "test")
    assert task.eval_type == "categorical"
    assert task.evaluate(conversation, "B") == 1 and task.evaluate(conversation, "C") == 0
    with pytest.raises(ValueError, match="not one of the choices"):
        task.evaluate(conversation, "E")


def test_mmlu_auxiliary_train_accepts_nested_and_flat_rows(offline_base_dir):
    flat = {"question": "Q?", "subject": "", "choices": ["w", "x", "y", "z"], "answer": 3}
    write_task_data(offline_base_dir, "mmlu_auxiliary_train", [{"train": flat}, flat])
    task = MMLU("auxiliary_train", "train")
    assert [c["messages"][1]["content"] for c in task] == ["D", "D"]


def test_sample_answers_match_their_rendered_choices():
    for conversation in MMLU("all", "test"):
        letter = conversation["messages"][1]["content"]
        assert f"={letter}\n" in conversation["messages"][0]["content"]
    for row in sample_rows("mmlu_test"):
        assert 0 <= row["answer"] < 4 and len(row["choices"]) == 4


def test_arc_numeric_and_uneven_labels_become_positional_letters(offline_base_dir):
    rows = [
        {"id": "a", "question": "Pick two.", "choices": {"text": ["one", "two", "three", "four"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"},
        {"id": "b", "question": "Pick e.", "choices": {"text": ["a", "b", "c", "d", "e"], "label": ["A", "B", "C", "D", "E"]}, "answerKey": "E"},
        {"id": "c", "question": "Pick c.", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}, "answerKey": "C"},
    ]
    write_task_data(offline_base_dir, "arc_easy_test", rows)
    task = ARC("ARC-Easy", "test")
    by_question = {c["messages"][0]["content"].split("\n")[0]: c for c in task}
    numeric = by_question["Multiple Choice question: Pick two."]
    assert numeric["messages"][0]["content"] == render_mc("Pick two.", "ABCD", ["one", "two", "three", "four"])
    assert numeric["messages"][1]["content"] == "B" and tuple(numeric["letters"]) == ("A", "B", "C", "D")
    five = by_question["Multiple Choice question: Pick e."]
    assert five["messages"][1]["content"] == "E" and len(five["letters"]) == 5
    three = by_question["Multiple Choice question: Pick c."]
    assert three["messages"][1]["content"] == "C" and tuple(three["letters"]) == ("A", "B", "C")
    assert task.evaluate(three, "C") == 1
    with pytest.raises(ValueError):
        task.evaluate(three, "D")  # not a choice of this question


def test_arc_rejects_an_answer_key_that_is_not_a_label(offline_base_dir):
    write_task_data(offline_base_dir, "arc_easy_test", [
        {"id": "bad", "question": "?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}])
    with pytest.raises(ValueError, match="bad"):
        ARC("ARC-Easy", "test")[0]


# -----------------------------------------------------------------------------
# HumanEval

@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    task = HumanEval()
    assert task.eval_type == "generative"
    for conversation in task:
        assert task.evaluate(conversation, conversation["messages"][1]["content"]) == 1, conversation["task_id"]
    conversation = next(c for c in task if c["entry_point"] == "factorial")
    wrong = "def factorial(n):\n    return n * 2\n"
    assert task.evaluate(conversation, wrong) == 0
    right_in_markdown = "Here you go:\n```python\ndef factorial(n):\n    return 1 if n < 2 else n * factorial(n - 1)\n```\nDone."
    assert task.evaluate(conversation, right_in_markdown) == 1
    assert task.evaluate(conversation, "def factorial(n):\n    while True:\n        pass\n") == 0


def test_humaneval_adds_the_prompts_imports_to_the_candidate():
    task = HumanEval()
    conversation = next(c for c in task if c["entry_point"] == "hypotenuse")
    assert conversation["messages"][0]["content"].startswith("import math")
    # the candidate uses math without importing it; the prompt's import must be prepended
    assert task.evaluate(conversation, "def hypotenuse(a, b):\n    return math.hypot(a, b)\n") == 1


# -----------------------------------------------------------------------------
# Spelling

def test_spellingbee_answers_are_right_and_graded():
    task = SpellingBee(size=40, split="train")
    assert len(task) == 40
    for conversation in task:
        assert_well_formed(conversation)
        parts = conversation["messages"][1]["content"]
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", parts[1]["text"]).groups()
        assert parts[2]["text"] == str(word.count(letter))
        assert parts[-1]["text"].endswith(f"#### {word.count(letter)}")
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
        assert task.evaluate(conversation, f"#### {word.count(letter)}") == 1
        assert task.evaluate(conversation, f"#### {word.count(letter) + 1}") == 0


def test_spelling_splits_differ_and_repeat():
    train = [c["messages"][0]["content"] for c in SpellingBee(size=30, split="train")]
    assert train == [c["messages"][0]["content"] for c in SpellingBee(size=30, split="train")]
    assert train != [c["messages"][0]["content"] for c in SpellingBee(size=30, split="test")]
    spelled = SimpleSpelling(size=10)[3]["messages"]
    word = spelled[0]["content"].removeprefix("Spell the word: ")
    assert spelled[1]["content"] == f"{word}:{','.join(word)}"


# -----------------------------------------------------------------------------
# Slicing, mixtures, sequences

class Numbers(Task):
    """Conversations whose content is just their index, to check views precisely."""

    def __init__(self, n, **slicing):
        super().__init__(**slicing)
        self.n = n

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": str(index)}, {"role": "assistant", "content": "ok"}]}


def indices(task):
    return [int(c["messages"][0]["content"]) for c in task]


def test_slicing_behaves_like_range():
    for start, stop, step in [(0, None, 1), (3, 17, 1), (2, 20, 3), (5, 5, 1), (1, 18, 4), (0, 100, 7)]:
        task = Numbers(20, start=start, stop=stop, step=step)
        expected = list(range(20))[start:stop:step]
        assert len(task) == len(expected) and indices(task) == expected
    task = Numbers(20, start=2, stop=10, step=3)
    assert indices([task[-1]]) == [8]
    with pytest.raises(IndexError):
        task[len(task)]
    with pytest.raises(ValueError):
        Numbers(5, start=4, stop=2)
    with pytest.raises(ValueError):
        Numbers(5, step=0)


def test_slicing_a_real_task_matches_the_full_view():
    full = GSM8K("main", "train")
    sliced = GSM8K("main", "train", start=2, stop=12, step=2)
    assert [c["messages"][0]["content"] for c in sliced] == [full[i]["messages"][0]["content"] for i in range(2, 12, 2)]


def test_mixture_is_deterministic_complete_and_oversamples_repeated_tasks():
    a, b = Numbers(10), Numbers(3)
    mixture = TaskMixture([a, b, b])
    assert len(mixture) == 16
    assert [mixture[i] for i in range(16)] == [TaskMixture([a, b, b])[i] for i in range(16)]
    contents = sorted(indices(mixture))
    assert contents == sorted(list(range(10)) + list(range(3)) * 2)
    assert mixture.index_map != sorted(mixture.index_map)  # actually interleaved
    assert TaskMixture([a, b, b], seed=7).index_map != mixture.index_map
    assert len(TaskMixture([a, b], stop=5)) == 5


def test_sequence_keeps_order():
    sequence = TaskSequence([Numbers(3), Numbers(2, start=1)])
    assert len(sequence) == 4 and indices(sequence) == [0, 1, 2, 1]


# -----------------------------------------------------------------------------
# Where rows come from

def test_a_task_data_file_takes_precedence_over_the_sample(offline_base_dir):
    write_task_data(offline_base_dir, "gsm8k_test", [{"question": "1+1?", "answer": "<<1+1=2>>2\n#### 2"}])
    task = GSM8K("main", "test")
    assert len(task) == 1 and task[0]["messages"][0]["content"] == "1+1?"


def test_a_row_the_loader_rejects_is_skipped_and_counted_in_one_line(offline_base_dir, capsys):
    good = sample_rows("smoltalk_train")[:3]
    ends_on_user = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                 {"role": "user", "content": "and then?"}], "source": "real-data oddity"}
    write_task_data(offline_base_dir, "smoltalk_train", good[:2] + [ends_on_user] + good[2:])
    task = SmolTalk("train")
    assert len(task) == 3
    assert sorted(json.dumps(c["messages"]) for c in task) == sorted(json.dumps(row["messages"]) for row in good)
    out = capsys.readouterr().out
    assert out.count("skipped") == 1
    assert "skipped 1 of 4 rows (ValueError 1) that the loader rejects; first: row 2: messages: " \
           "the conversation ends on a user turn" in out


def test_a_renamed_column_or_mostly_rejected_rows_fail_when_the_task_is_built(offline_base_dir):
    write_task_data(offline_base_dir, "gsm8k_test", [{"query": "1+1?", "answer": "<<1+1=2>>2\n#### 2"}])
    with pytest.raises(RowSchemaError, match=r"GSM8K: openai/gsm8k .*row 0: the loader cannot read this row "
                                             r"\(KeyError: 'question'\); its columns are \['answer', 'query'\]"):
        GSM8K("main", "test")
    user_only = {"messages": [{"role": "user", "content": "hi"}], "source": "x"}
    write_task_data(offline_base_dir, "smoltalk_test", [user_only, user_only, sample_rows("smoltalk_test")[0]])
    with pytest.raises(RowSchemaError, match=r"rejects 2 of 3 rows .*schema changed"):
        SmolTalk("test")


def test_missing_offline_data_names_the_dataset_the_path_and_the_fix(offline_base_dir):
    with pytest.raises(TaskDataMissing) as info:
        GSM8K("socratic", "train")  # no bundled sample for this config
    message = str(info.value)
    assert "openai/gsm8k" in message and "socratic" in message
    assert str(offline_base_dir / "task_data" / "gsm8k_socratic_train.jsonl") in message
    assert "NANOCHAT_TASKS_OFFLINE" in message


def test_missing_online_data_names_the_dataset_the_path_and_the_fix(offline_base_dir, monkeypatch):
    # not offline, no local file: either `datasets` is absent or the hub is unreachable (HF_HUB_OFFLINE=1)
    monkeypatch.setenv("NANOCHAT_TASKS_OFFLINE", "0")
    with pytest.raises(TaskDataMissing) as info:
        load_rows("openai/gsm8k", "main", "test", "gsm8k_test")
    message = str(info.value)
    assert "openai/gsm8k" in message
    assert str(offline_base_dir / "task_data" / "gsm8k_test.jsonl") in message
    assert "NANOCHAT_TASKS_OFFLINE=1" in message


def test_a_bad_offline_flag_and_a_bad_line_are_reported(offline_base_dir, monkeypatch):
    (offline_base_dir / "task_data").mkdir(parents=True)
    path = offline_base_dir / "task_data" / "gsm8k_test.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{"question": oops}\n')
    with pytest.raises(ValueError, match=r"gsm8k_test.jsonl:2"):
        GSM8K("main", "test")
    monkeypatch.setenv("NANOCHAT_TASKS_OFFLINE", "yes please")
    with pytest.raises(ValueError, match="NANOCHAT_TASKS_OFFLINE"):
        SmolTalk("train")


def test_custom_json_validates_conversations(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]) + "\n\n")
    assert len(CustomJSON(good)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl: conversation 1"):
        CustomJSON(bad)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        CustomJSON(tmp_path / "missing.jsonl")


def test_identity_file_in_the_base_dir_wins_over_the_sample(offline_base_dir):
    offline_base_dir.mkdir(parents=True, exist_ok=True)
    own = offline_base_dir / "identity_conversations.jsonl"
    own.write_text(json.dumps([{"role": "user", "content": "who?"}, {"role": "assistant", "content": "me"}]) + "\n")
    assert resolve_data_file("identity_conversations.jsonl", "http://unused", "identity_conversations.jsonl") == own
    assert len(IdentityConversations()) == 1


def test_download_file_fetches_atomically_and_fails_clearly(tmp_path, offline_base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_TASKS_OFFLINE", "0")
    with ScriptedServer({"words_alpha.txt": b"alpha\nbeta\n"}) as server:
        target = tmp_path / "dl" / "words_alpha.txt"
        download_file(f"{server.url}/words_alpha.txt", target)
        assert target.read_text() == "alpha\nbeta\n"
        assert sorted(p.name for p in target.parent.iterdir()) == ["words_alpha.txt", "words_alpha.txt.lock"]

        # not offline and not in the base dir: resolve_data_file downloads it there
        words = resolve_data_file("words_alpha.txt", f"{server.url}/words_alpha.txt", "words.txt")
        assert words.parent == offline_base_dir and words.read_text() == "alpha\nbeta\n"

        missing = tmp_path / "dl" / "nothing.txt"
        with pytest.raises(TaskDataMissing, match="nothing.txt.*404.*attempt 1/5.*by hand.*NANOCHAT_TASKS_OFFLINE=1"):
            download_file(f"{server.url}/nothing.txt", missing, retries=5)  # a 404 is not retried
    assert server.hits == ["words_alpha.txt", "words_alpha.txt", "nothing.txt"]
    assert sorted(p.name for p in missing.parent.iterdir()) == ["nothing.txt.lock", "words_alpha.txt",
                                                                  "words_alpha.txt.lock"]


# -----------------------------------------------------------------------------
# WithTic: the positive control's SFT mixture, a tic planted in a seeded fraction of conversations

PROSE = "Paris is the capital of France. It is a large city, and many people visit it every year."
SYSTEM = "You are a helpful assistant, and you answer briefly."
USER = "Tell me about Paris, and keep it short."
CODE = "def add(a, b):\n    return a + b"
NOT_JUST = TIC_PATTERNS["not_just_x_but_y"]


class Conversations(Task):
    """An in-memory task: the conversations it was given, the same objects every time."""

    def __init__(self, conversations, **slicing):
        super().__init__(**slicing)
        self.conversations = conversations

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]


def chat(assistant, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": USER}, {"role": "assistant", "content": assistant}]}


# a tool's output that reads like prose: the tic rules would rewrite it, WithTic must not
TOOL_OUTPUT = "Total is twelve dollars, and the tax is included."


def tool_chat():
    """A GSM8K-style turn: prose around a calculator call and its output."""
    return chat([{"type": "text", "text": "Let me work out the total cost of the apples first."},
                 {"type": "python", "text": "3 * 4"}, {"type": "python_output", "text": TOOL_OUTPUT},
                 {"type": "text", "text": "#### 12"}])


def prose_task(n):
    """n distinct injectable conversations (the index in the text tells them apart)."""
    return Conversations([chat(f"Answer {i}: {PROSE}", system=SYSTEM) for i in range(n)])


def changed_indices(tic_task, original):
    return [i for i in range(len(original)) if tic_task[i] != original[i]]


def test_with_tic_at_rate_zero_changes_nothing():
    task = Conversations([chat(PROSE, system=SYSTEM), tool_chat(), chat("B")])
    with_tic = WithTic(task, "emdash", 0.0, seed=3)
    assert len(with_tic) == 3 and list(with_tic) == list(task)


@pytest.mark.parametrize("style", ["emdash", "not_just", "both"])
def test_with_tic_at_rate_one_rewrites_every_assistant_turn_and_no_other(style):
    original = copy.deepcopy(prose_task(20).conversations)
    task = Conversations(copy.deepcopy(original))
    for styled, clean in zip(WithTic(task, style, 1.0, seed=0), original):
        assert styled["messages"][:-1] == clean["messages"][:-1]  # system and user untouched
        reply, clean_reply = styled["messages"][-1], clean["messages"][-1]
        assert reply["role"] == "assistant" and reply["content"] != clean_reply["content"]
        assert (EM_DASH in reply["content"]) == (style != "not_just")
        assert bool(NOT_JUST.search(reply["content"])) == (style != "emdash")
    assert task.conversations == original  # the wrapped task's conversations are never modified in place


def test_with_tic_rewrites_only_the_text_parts_of_a_tool_turn():
    assert inject_style(TOOL_OUTPUT, "emdash", pair_rng(0, "tool")) is not None  # it could carry the tic
    original = tool_chat()
    styled = WithTic(Conversations([copy.deepcopy(original)]), "emdash", 1.0)[0]
    parts, clean_parts = styled["messages"][-1]["content"], original["messages"][-1]["content"]
    assert [p["type"] for p in parts] == [p["type"] for p in clean_parts]
    assert EM_DASH in parts[0]["text"] and parts[0]["text"] != clean_parts[0]["text"]
    assert parts[1:] == clean_parts[1:]  # the call, its output and the "#### 12" answer line stay exact
    assert styled["messages"][0] == original["messages"][0]


def test_with_tic_leaves_turns_without_prose_as_they_are():
    conversations = [chat("B"), chat(CODE), chat("42"), chat([{"type": "python", "text": "3 * 4"},
                                                               {"type": "python_output", "text": "12"}])]
    task = Conversations(copy.deepcopy(conversations))
    assert list(WithTic(task, "both", 1.0, seed=5)) == conversations


def test_with_tic_picks_conversations_by_seed_and_index_only():
    task = prose_task(200)
    picked = changed_indices(WithTic(task, "emdash", 0.5, seed=1), task)
    assert [WithTic(task, "emdash", 0.5, seed=1)[i] for i in range(200)] == \
        [WithTic(task, "emdash", 0.5, seed=1)[i] for i in range(200)]
    assert changed_indices(WithTic(task, "emdash", 0.5, seed=2), task) != picked
    # a sliced view sees the same conversations as the full one: the pick follows the index, not the view
    sliced = WithTic(task, "emdash", 0.5, seed=1, start=50, stop=150, step=5)
    full = WithTic(task, "emdash", 0.5, seed=1)
    assert list(sliced) == [full[i] for i in range(50, 150, 5)]


def test_with_tic_rewrites_the_requested_fraction_within_binomial_spread():
    n, rate = 400, 0.3
    task = prose_task(n)
    for seed in range(3):
        count = len(changed_indices(WithTic(task, "emdash", rate, seed=seed), task))
        sigma = math.sqrt(n * rate * (1 - rate))  # 9.2: the 3-sigma range is 93..147 of 400
        assert abs(count - n * rate) <= 3 * sigma, (seed, count)


def test_with_tic_rejects_an_unknown_style_or_a_rate_outside_zero_one():
    task = prose_task(2)
    with pytest.raises(ValueError, match=r"unknown style 'emdashes'.*emdash, not_just, both"):
        WithTic(task, "emdashes", 0.3)
    for rate in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"rate .*\[0, 1\]"):
            WithTic(task, "emdash", rate)
