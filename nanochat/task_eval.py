"""
Scoring a chat model on tasks (tasks/): what scripts/chat_eval.py runs, and what training
scripts call for their periodic evaluations (chat_rl's GSM8K pass@k).

- Categorical tasks (ARC, MMLU) need no sampling: one forward pass over a batch of prompts, then
  the answer is the choice letter with the highest logit at the position right after
  <|assistant_start|>, the logits restricted to the letters this question offers.
- Generative tasks (GSM8K, HumanEval, SpellingBee) sample completions with the engine and let
  the task grade the text. A problem passes at k when any of its first k samples is correct.
- ChatCORE (nanochat's): the mean over the six tasks of accuracy centred on chance,
  (acc - baseline) / (1 - baseline); baseline 0.25 for the four-choice tasks, 0 for open-ended ones.

Under torchrun every function here splits the problems across ranks and sums the counts, so
every rank returns the same numbers.
"""

import torch
import torch.distributed as dist

from nanochat.common import progress_bar

# Chance accuracy of each task ChatCORE averages (ARC rows with 3 or 5 choices are rare; nanochat
# treats both ARC sets as four-way).
TASK_BASELINES = {
    "ARC-Easy": 0.25,
    "ARC-Challenge": 0.25,
    "MMLU": 0.25,
    "GSM8K": 0.0,
    "HumanEval": 0.0,
    "SpellingBee": 0.0,
}
TASK_NAMES = list(TASK_BASELINES)


def chatcore(accuracies: dict[str, float]) -> float | None:
    """Mean centred accuracy over all six tasks; None unless every one of them was evaluated."""
    if any(name not in accuracies for name in TASK_NAMES):
        return None
    centred = [(accuracies[name] - base) / (1.0 - base) for name, base in TASK_BASELINES.items()]
    return sum(centred) / len(centred)


def _sum_over_ranks(counts: list[float], device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return counts
    tensor = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _num_problems(task, max_problems: int | None) -> int:
    total = len(task)
    if total == 0:
        raise ValueError(f"{type(task).__name__} has no problems to evaluate")
    return total if max_problems is None or max_problems < 0 else min(total, max_problems)


# -----------------------------------------------------------------------------
# Multiple choice

def letter_token_ids(tokenizer, letters, cache: dict | None = None) -> list[int]:
    """The token id of each answer letter; each must be exactly one token for the logits to compare."""
    cache = {} if cache is None else cache
    ids = []
    for letter in letters:
        if letter not in cache:
            encoded = tokenizer.encode(letter)
            if len(encoded) != 1:
                raise ValueError(f"answer letter {letter!r} encodes to {len(encoded)} tokens {encoded}; "
                                 "categorical evaluation needs every letter to be a single token")
            cache[letter] = encoded[0]
        ids.append(cache[letter])
    return ids


@torch.no_grad()
def predict_letters(model, tokenizer, conversations, letter_cache: dict | None = None) -> list[str]:
    """
    The model's answer letter for each multiple-choice conversation, from one forward pass.
    Prompts are right-padded: with causal attention the padding after a row's last real token
    cannot change anything before it, and each row is read at its own last real position.
    Only those positions go through lm_head, so a batch never materialises (B, T, vocab) logits.
    """
    prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
    device = model.get_device()
    pad = tokenizer.get_bos_token_id()
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([p + [pad] * (longest - len(p)) for p in prompts], dtype=torch.long, device=device)
    hidden = model.forward_hidden(ids)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    logits = model.logits_from_hidden(hidden[torch.arange(len(prompts), device=device), last])  # (B, vocab)
    predictions = []
    for row, conversation in enumerate(conversations):
        letters = conversation["letters"]
        # restricted to the offered letters: easier than free generation, as in nanochat; a model that
        # would answer "The" is still graded on which letter it prefers
        choice = logits[row, letter_token_ids(tokenizer, letters, letter_cache)].argmax().item()
        predictions.append(letters[choice])
    return predictions


def run_categorical_eval(task, tokenizer, model, batch_size: int = 8, max_problems: int | None = None) -> float:
    """Accuracy on the first max_problems problems (all if None or negative), over all ranks."""
    rank, world_size = _rank_and_world()
    num_problems = _num_problems(task, max_problems)
    letter_cache = {}
    passed, total = 0, 0
    num_batches = -(-num_problems // batch_size)
    for batch in progress_bar(range(rank, num_batches, world_size), desc=type(task).__name__, unit=" batches", leave=False):
        conversations = [task[i] for i in range(batch * batch_size, min((batch + 1) * batch_size, num_problems))]
        for conversation, letter in zip(conversations, predict_letters(model, tokenizer, conversations, letter_cache)):
            passed += task.evaluate(conversation, letter)
            total += 1
    passed, total = _sum_over_ranks([passed, total], model.get_device())
    return passed / total


# -----------------------------------------------------------------------------
# Sampling

def generative_outcomes(task, tokenizer, engine, indices, num_samples: int = 1, max_new_tokens: int = 512,
                        temperature: float = 0.0, top_k: int | None = 50, batch_size: int = 8,
                        seed: int = 0) -> list[list[int]]:
    """
    outcomes[n][j]: 1 if sample j of problem indices[n] is correct. Problems are sampled
    batch_size at a time (the engine pads them), each batch with the seed `seed + its first
    index`. Greedy decoding (temperature 0) depends on the batching only through rounding; at temperature > 0
    the samples depend on seed, batch_size and which problems share a batch.
    """
    outcomes = []
    for start in progress_bar(range(0, len(indices), batch_size), desc=type(task).__name__, unit=" batches", leave=False):
        batch = list(indices[start:start + batch_size])
        conversations = [task[i] for i in batch]
        prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
        results, _ = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seed=seed + batch[0])
        for conversation, samples in zip(conversations, results):
            outcomes.append([task.evaluate(conversation, tokenizer.decode(tokens)) for tokens in samples])
    return outcomes


def run_pass_at_k(task, tokenizer, engine, num_samples: int = 1, max_problems: int | None = None,
                  max_new_tokens: int = 512, temperature: float = 0.0, top_k: int | None = 50,
                  batch_size: int = 8, seed: int = 0) -> list[float]:
    """
    [pass@1, ..., pass@num_samples] on the first max_problems problems, over all ranks: the
    fraction of problems with a correct answer among their first k samples (nanochat's
    definition, not the unbiased estimator of Chen et al.). Ranks take every world_size-th
    problem.
    """
    rank, world_size = _rank_and_world()
    num_problems = _num_problems(task, max_problems)
    outcomes = generative_outcomes(task, tokenizer, engine, range(rank, num_problems, world_size), num_samples,
                                   max_new_tokens, temperature, top_k, batch_size, seed)
    passed = [sum(any(sample[:k]) for sample in outcomes) for k in range(1, num_samples + 1)]
    counts = _sum_over_ranks([*passed, len(outcomes)], engine.model.get_device())
    return [count / counts[-1] for count in counts[:-1]]


def run_generative_eval(task, tokenizer, engine, num_samples: int = 1, max_problems: int | None = None,
                        max_new_tokens: int = 512, temperature: float = 0.0, top_k: int | None = 50,
                        batch_size: int = 8, seed: int = 0) -> float:
    """Accuracy: the fraction of problems with at least one correct sample (pass@num_samples)."""
    return run_pass_at_k(task, tokenizer, engine, num_samples, max_problems, max_new_tokens, temperature, top_k,
                         batch_size, seed)[-1]
