"""
Spelling tasks that give a small model what its tokenizer hides: the letters inside a token.

- SpellingBee: "How many r are in strawberry?" The ideal answer spells the word out letter by
  letter, counts along, then double-checks with a python call and ends "#### 3", so the model
  learns both to reason over letters and to reach for the tool (graded like GSM8K).
- SimpleSpelling: "Spell the word: strawberry" -> "strawberry:s,t,r,a,w,b,e,r,r,y", the hard core
  of SpellingBee in condensed form, for midtraining.

Examples are generated, not stored: example i comes from random.Random(i) (test split: a seed
offset past any train index), so any size is available and train and test never share a seed.
Words come from dwyl/english-words (370K words) online, or the bundled tasks/samples/words.txt offline.
"""

import random
import string
from pathlib import Path

from nanochat.common import print0
from tasks.common import RowCheck, Task, evaluate_final_answer, resolve_data_file

WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt"
WORD_LIST_FILENAME = "words_alpha.txt"
TEST_SEED_OFFSET = 10_000_000  # above any train index, so test seeds never repeat a train one
SHUFFLE_WORDS_SEED = 42

QUESTION_TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "How many times does the letter {letter} occur in {word}",
    "Count the {letter} in {word}",
    "Count how many {letter} the word {word} has",
    "What is the number of {letter} in {word}",
    "How often does {letter} show up in {word}",
    "In {word}, how many {letter} are there",
    "{word}: how many {letter}",
    "Tell me how many {letter} appear in {word}",
    "How many {letter}'s does {word} contain",
    "Number of {letter} in the word {word}",
    "¿Cuántas {letter} tiene la palabra {word}?",
    "Combien de {letter} y a-t-il dans {word}",
    "Wie viele {letter} hat das Wort {word}",
    "{word}에 {letter}가 몇 개 있어요",
    "{word}里有几个{letter}",
]


def check_word(word: str):
    if not (word.isascii() and word.isalpha() and word.islower()):
        raise ValueError(f"{word[:40]!r} is not a word of lowercase letters a-z")


def read_words(path: Path) -> list[str]:
    """One lowercase word a line; a few other lines are skipped and counted, mostly others (an HTML page) is an error."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"word list {path} is empty; it should be {WORD_LIST_URL}, one word a line")
    check = RowCheck(f"word list {path}", check_word)
    words = [word for n, word in enumerate(lines, 1) if check.accepts(word, f"line {n}")]
    summary = check.finish()
    if summary:
        print0(summary)
    return words


def load_words() -> list[str]:
    return read_words(resolve_data_file(WORD_LIST_FILENAME, WORD_LIST_URL, "words.txt"))


class SpellingBee(Task):
    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", **slicing):
        super().__init__(**slicing)
        if split not in ("train", "test"):
            raise ValueError(f"SpellingBee split must be train or test, got {split!r}")
        self.size, self.split = size, split
        self.words = load_words()

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)
        word = rng.choice(self.words)
        # mostly letters that occur; sometimes any letter, so "0" is a possible answer too
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        count = word.count(letter)

        template = rng.choice(QUESTION_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        letter_quote, word_quote = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        question = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
        if rng.random() < 0.5:
            question += "?"

        # "3:r" not "3: r": " r" and "r" are different tokens, and we want the letter's own token
        lines = [f"{i}:{char} hit! count={word[:i].count(letter)}" if char == letter else f"{i}:{char}"
                 for i, char in enumerate(word, 1)]
        reasoning = (f"We are asked how many '{letter}' are in '{word}'. First I spell the word:\n"
                     f"{word}:{','.join(word)}\n\nThen I go through it and count each '{letter}':\n"
                     + "\n".join(lines) + f"\n\nThat makes {count}. Let me check with Python:\n\n")
        return {"messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": [
                {"type": "text", "text": reasoning},
                {"type": "python", "text": f"'{word}'.count('{letter}')"},
                {"type": "python_output", "text": str(count)},
                {"type": "text", "text": f"\n\nPython agrees: {count}.\n\n#### {count}"},
            ]},
        ]}

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if the number after '#### ' in the completion is the right count, else 0."""
        return evaluate_final_answer(conversation, completion)


class SimpleSpelling(Task):
    def __init__(self, size: int = 1000, split: str = "train", **slicing):
        super().__init__(**slicing)
        if split not in ("train", "test"):
            raise ValueError(f"SimpleSpelling split must be train or test, got {split!r}")
        self.size, self.split = size, split
        self.words = load_words()
        random.Random(SHUFFLE_WORDS_SEED).shuffle(self.words)  # a different word order from SpellingBee's

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)
        word = rng.choice(self.words)
        return {"messages": [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]}

