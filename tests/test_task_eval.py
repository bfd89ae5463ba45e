"""Tests for nanochat/task_eval.py: letter-logit scoring, sampled grading, pass@k and ChatCORE."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.task_eval import (TASK_NAMES, chatcore, generative_outcomes, letter_token_ids, predict_letters,
                                run_categorical_eval, run_generative_eval, run_pass_at_k)
from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer
from tasks.common import Task, evaluate_letter
from tests.dist_fixtures import end_rank

torch.set_num_threads(1)


def make_tokenizer():
    """Bytes only: every letter is its own token, and "A\\nB" is exactly the tokens A, \\n, B."""
    return Tokenizer(SPLIT_PATTERN, {bytes([b]): b for b in range(256)})


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


class LetterCountingLM(nn.Module):
    """
    A causal model whose logits we can predict: the logit of token v at position t is
    sum over tokens u seen up to t of weights[u, v]. It has the GPT methods the eval uses.
    """

    def __init__(self, weights):
        super().__init__()
        self.weights = nn.Parameter(weights)

    def get_device(self):
        return self.weights.device

    def forward_hidden(self, idx):
        return F.one_hot(idx, self.weights.size(0)).float().cumsum(dim=1)  # counts of each token so far

    def logits_from_hidden(self, hidden):
        return hidden @ self.weights

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        return self.logits_from_hidden(self.forward_hidden(idx))


@pytest.fixture(scope="module")
def counting_model(tokenizer):
    return make_counting_model(tokenizer)


def make_counting_model(tokenizer):
    vocab = tokenizer.get_vocab_size()
    weights = torch.zeros(vocab, vocab)
    for letter in "ABCDE":
        weights[ord(letter), ord(letter)] = 1.0  # each letter in the prompt votes for itself
    bos, user_start = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|user_start|>")
    # every prompt has one <|bos|> and one <|user_start|>, which cancel; each padding <|bos|>
    # read by mistake would push "D" up by 10
    weights[bos, ord("D")], weights[user_start, ord("D")] = 10.0, -10.0
    # after <|assistant_start|> the favourite token is "\n", not a letter: only a restricted argmax answers
    weights[tokenizer.encode_special("<|assistant_start|>"), ord("\n")] = 100.0
    return LetterCountingLM(weights)


class HandMadeChoices(Task):
    """(letters seen in the question, gold letter, choices offered) -> a categorical conversation."""
    eval_type = "categorical"
    ROWS = [
        ("B", "B", "ABCD"),                     # right; the shortest prompt, so the most padding
        ("A\nA\nC", "A", "ABCD"),               # right
        ("C\nC\nC\nC\nC\nC", "C", "ABCD"),      # right; the longest prompt
        ("B\nB", "A", "ABCD"),                  # wrong: the model says B
        ("D\nD\nD\nD\nC", "C", "ABC"),          # right only because D is not on offer here
        ("A", "D", "ABCD"),                     # wrong: the model says A
    ]
    EXPECTED_PREDICTIONS = ["B", "A", "C", "B", "C", "A"]

    def num_examples(self):
        return len(self.ROWS)

    def get_example(self, index):
        question, gold, letters = self.ROWS[index]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": gold}],
                "letters": tuple(letters)}

    def evaluate(self, conversation, completion):
        return evaluate_letter(conversation, completion)


def test_predicted_letters_are_read_at_each_rows_last_real_position(tokenizer, counting_model):
    task = HandMadeChoices()
    conversations = list(task)
    assert predict_letters(counting_model, tokenizer, conversations) == HandMadeChoices.EXPECTED_PREDICTIONS


@pytest.mark.parametrize("batch_size", [1, 4, 6])
def test_categorical_accuracy_is_exact_for_any_batching(tokenizer, counting_model, batch_size):
    assert run_categorical_eval(HandMadeChoices(), tokenizer, counting_model, batch_size) == pytest.approx(4 / 6)


def test_max_problems_takes_the_first_problems(tokenizer, counting_model):
    assert run_categorical_eval(HandMadeChoices(), tokenizer, counting_model, 4, max_problems=4) == pytest.approx(3 / 4)
    assert run_categorical_eval(HandMadeChoices(), tokenizer, counting_model, 4, max_problems=-1) == pytest.approx(4 / 6)


def test_letters_must_be_single_tokens(tokenizer):
    assert letter_token_ids(tokenizer, ["A", "B"]) == [65, 66]
    with pytest.raises(ValueError, match="single token"):
        letter_token_ids(tokenizer, ["A", "AB"])


# -----------------------------------------------------------------------------
# Generative tasks, on a real GPT and the real engine

@pytest.fixture(scope="module")
def gpt(tokenizer):
    return make_gpt(tokenizer)


def make_gpt(tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                          n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.size(-1)))
        model.lm_head.weight.mul_(4.0)  # peaked, so greedy choices are not near-ties
    return model.eval()


def greedy_reference(model, tokenizer, prompt, max_tokens):
    """Greedy decoding the slow way: a full forward pass per token, no cache, no padding."""
    stop = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        token = model(torch.tensor([ids]))[0, -1].argmax().item()
        if token in stop:
            break
        ids.append(token)
        out.append(token)
    assert tokenizer.encode_special("<|python_start|>") not in out  # no tool call, so no forced tokens to model
    return tokenizer.decode(out)


class ExpectedText(Task):
    """Correct iff the completion is exactly conversation["expected"]."""
    eval_type = "generative"

    def __init__(self, questions, expected):
        super().__init__()
        self.questions, self.expected = questions, expected

    def num_examples(self):
        return len(self.questions)

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": self.questions[index]},
                             {"role": "assistant", "content": "?"}], "expected": self.expected[index]}

    def evaluate(self, conversation, completion):
        return int(completion == conversation["expected"])


QUESTIONS = ["hi", "what is two plus two", "x", "spell strawberry please"]  # different lengths: left padding


def test_generative_accuracy_with_known_correct_and_incorrect_outputs(tokenizer, gpt):
    max_tokens = 6
    truth = [greedy_reference(gpt, tokenizer, tokenizer.render_for_completion(
        {"messages": [{"role": "user", "content": q}]}), max_tokens) for q in QUESTIONS]
    # problems 0 and 2 expect what greedy decoding produces; 1 and 3 expect something else
    expected = [truth[0], truth[1] + "!", truth[2], "not " + truth[3]]
    task = ExpectedText(QUESTIONS, expected)
    engine = Engine(gpt, tokenizer)
    outcomes = generative_outcomes(task, tokenizer, engine, range(4), num_samples=2, max_new_tokens=max_tokens,
                                   temperature=0.0, batch_size=3)
    assert outcomes == [[1, 1], [0, 0], [1, 1], [0, 0]]
    assert run_generative_eval(task, tokenizer, engine, max_new_tokens=max_tokens, batch_size=2) == 0.5
    assert run_generative_eval(task, tokenizer, engine, max_problems=1, max_new_tokens=max_tokens) == 1.0


class EvenLength(Task):
    """Correct iff the completion has an even number of characters: a coin flip per sample."""
    eval_type = "generative"

    def num_examples(self):
        return len(QUESTIONS)

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": QUESTIONS[index]}, {"role": "assistant", "content": "?"}]}

    def evaluate(self, conversation, completion):
        return int(len(completion) % 2 == 0)


def test_pass_at_k_counts_problems_solved_within_k_samples(tokenizer, gpt):
    engine = Engine(gpt, tokenizer)
    settings = dict(num_samples=4, max_new_tokens=5, temperature=1.0, top_k=None, batch_size=2, seed=3)
    outcomes = generative_outcomes(EvenLength(), tokenizer, engine, range(4), **settings)
    expected = [sum(any(o[:k]) for o in outcomes) / 4 for k in range(1, 5)]
    passes = run_pass_at_k(EvenLength(), tokenizer, engine, **settings)
    assert passes == expected
    assert passes == sorted(passes)  # solving within k samples implies solving within k+1
    assert len({tuple(o) for o in outcomes}) > 1  # the samples really differ, so the counting is exercised


def test_chatcore_is_the_mean_centred_accuracy_over_all_six_tasks():
    accuracies = {"ARC-Easy": 0.625, "ARC-Challenge": 0.25, "MMLU": 1.0, "GSM8K": 0.3, "HumanEval": 0.1,
                  "SpellingBee": 0.9}
    # centred: 0.5, 0, 1, 0.3, 0.1, 0.9
    assert chatcore(accuracies) == pytest.approx(2.8 / 6)
    assert chatcore({"ARC-Easy": 0.25, "ARC-Challenge": 0.1, "MMLU": 0.25, "GSM8K": 0, "HumanEval": 0,
                     "SpellingBee": 0}) < 0  # below chance counts against the score
    for missing in TASK_NAMES:
        assert chatcore({k: v for k, v in accuracies.items() if k != missing}) is None


# -----------------------------------------------------------------------------
# Two ranks split the problems and agree on the totals

def Recorded(task_class):
    """The task, remembering which problems this process looked at."""
    class RecordedTask(task_class):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def get_example(self, index):
            self.seen.add(index)
            return super().get_example(index)
    return RecordedTask


def _two_rank_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    tokenizer = make_tokenizer()
    counting_model, engine = make_counting_model(tokenizer), Engine(make_gpt(tokenizer), tokenizer)
    results = {f"categorical_b{b}": run_categorical_eval(HandMadeChoices(), tokenizer, counting_model, b)
               for b in (1, 4)}
    choices, lengths = Recorded(HandMadeChoices)(), Recorded(EvenLength)()
    run_categorical_eval(choices, tokenizer, counting_model, 2)
    results["pass_at_k"] = run_pass_at_k(lengths, tokenizer, engine, num_samples=2, max_new_tokens=5,
                                         temperature=0.0, batch_size=1)
    results["seen"] = {"categorical": choices.seen, "generative": lengths.seen}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    end_rank()


@pytest.mark.slow
def test_two_ranks_split_the_problems_and_sum_the_counts(tmp_path, tokenizer, gpt):
    # fork, not spawn: the children inherit the imported modules instead of importing torch again
    mp.start_processes(_two_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    single = run_pass_at_k(EvenLength(), tokenizer, Engine(gpt, tokenizer), num_samples=2, max_new_tokens=5,
                           temperature=0.0, batch_size=1)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        # 6 problems: with batch 1 each rank scores 3, with batch 4 rank 0 scores 4 and rank 1 two
        assert results["categorical_b1"] == pytest.approx(4 / 6) and results["categorical_b4"] == pytest.approx(4 / 6)
        assert results["pass_at_k"] == single
    for kind, count in (("categorical", 6), ("generative", 4)):
        seen = [torch.load(tmp_path / f"rank{rank}.pt")["seen"][kind] for rank in range(2)]
        assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(count)), kind  # each problem once
