"""
Diversity metrics for the KAT evaluation: how varied, and how tic-ridden, a model's responses are.

    prompt_metrics(texts, token_ids, vocab_size)   # every text metric of one prompt's N samples
    self_bleu(word_lists), distinct_n_of_samples(word_lists, 2), compression_ratio(texts), ...

Every metric is a plain function of texts (or token ids), so it can be checked by hand. Unless a
metric says otherwise, texts are split into *words* by `words()`: lowercased runs of letters,
digits and underscores, and every other non-space character as its own token ("Hello, world!" is
["hello", ",", "world", "!"]). Words, not the model's BPE tokens: diversity is a property of the
text a reader sees, and every compared model shares the same words. Functions named
`*_of_samples` pool a prompt's N samples (n-grams never cross from one sample into the next).
The comment above each metric says its source and which direction is "more diverse / fewer tics".
"""

import gzip
import math
import re
from collections import Counter
from itertools import combinations

import numpy as np

EM_DASH = "\u2014"
EN_DASH = "\u2013"

_WORD = re.compile(r"\w+|[^\w\s]")

# The "not X but Y" family of rhetorical tics. Case-insensitive; a match may not cross a line
# break, and X is at most 100 characters so that two unrelated sentences never pair up.
_APOS = "['\u2019]"  # straight or curly apostrophe
_IT = r"(?:it|this|that)"
_IT_IS = rf"{_IT}(?:{_APOS}s|\s+is|\s+was)"
TIC_PATTERNS = {
    # "not just X but Y", "not only X but also Y", "not merely X, but Y", "not simply X but Y"
    "not_just_x_but_y": re.compile(r"\bnot\s+(?:just|only|merely|simply)\b[^.!?\n]{1,100}?\bbut\b", re.IGNORECASE),
    # "it's not X, it's Y", "this isn't X - it's Y", "that was not X. That was Y": a negated
    # "it/this/that is", then within the same or the next sentence an affirmed one
    "its_not_x_its_y": re.compile(
        rf"\b(?:{_IT_IS}\s+not|{_IT}\s+(?:isn|wasn){_APOS}t)\b[^.!?\n]{{1,100}}?[,;:.!\u2014\u2013-]\s*{_IT_IS}\b(?!\s+not\b)",
        re.IGNORECASE),
}


# -----------------------------------------------------------------------------
# Tokens and n-grams

def words(text: str) -> list[str]:
    # split first, then lowercase: lowercasing can change a character's length (U+0130 becomes two
    # characters), which would move word boundaries away from the text word_prefix cuts
    return [word.lower() for word in _WORD.findall(text)]


def word_prefix(text: str, num_words: int) -> str:
    """The text up to the end of its num_words-th word (all of it when it has fewer), for comparing
    two responses at equal length by cutting the longer one."""
    if num_words <= 0:
        return ""
    for count, match in enumerate(_WORD.finditer(text), start=1):
        if count == num_words:
            return text[:match.end()]
    return text


def ngrams(tokens, n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


# -----------------------------------------------------------------------------
# Tics: em dashes and "not X but Y"

def per_1k_chars(count: int, num_chars: int) -> float:
    """count per 1,000 characters; nan for no text (a rate of nothing is undefined, not 0)."""
    return 1000.0 * count / num_chars if num_chars > 0 else float("nan")


def count_tic_patterns(text: str) -> dict[str, int]:
    return {name: len(pattern.findall(text)) for name, pattern in TIC_PATTERNS.items()}


# Lower is better. Only U+2014 counts as an em dash: en dashes (U+2013) are counted apart, hyphens never.
def tic_rates(texts: list[str]) -> dict[str, float]:
    """Em dashes, en dashes and tic patterns per 1,000 characters, pooled over texts."""
    num_chars = sum(len(t) for t in texts)
    patterns = sum(sum(count_tic_patterns(t).values()) for t in texts)
    return {"em_dash_per_1k_chars": per_1k_chars(sum(t.count(EM_DASH) for t in texts), num_chars),
            "en_dash_per_1k_chars": per_1k_chars(sum(t.count(EN_DASH) for t in texts), num_chars),
            "not_x_but_y_per_1k_chars": per_1k_chars(patterns, num_chars)}


# -----------------------------------------------------------------------------
# Lexical diversity

# distinct-n (Li et al. 2016). Higher is more diverse.
def distinct_n_of_samples(token_lists: list[list], n: int) -> float:
    """Distinct n-grams / all n-grams over several token lists; nan when there is no n-gram."""
    grams = [g for tokens in token_lists for g in ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def expected_distinct(num_tokens: int, vocab_size: int) -> float:
    """V * (1 - ((V-1)/V)^C): distinct tokens expected among C uniform draws from V."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return vocab_size * -math.expm1(num_tokens * math.log1p(-1.0 / vocab_size)) if vocab_size > 1 else float(num_tokens > 0)


# Expectation-adjusted distinct (Liu et al. 2022), on the model's BPE ids with V = the tokenizer's vocabulary:
# the paper's advice when every compared method shares a pretrained vocabulary. Higher is more diverse.
def ead_of_samples(token_lists: list[list], vocab_size: int) -> float:
    """Expectation-adjusted distinct-1 over several token lists; nan when there is no token."""
    tokens = [t for tokens in token_lists for t in tokens]
    return len(set(tokens)) / expected_distinct(len(tokens), vocab_size) if tokens else float("nan")


def gini(counts) -> float:
    """Gini coefficient of non-negative counts (0 even, (n-1)/n when one of n holds all); nan if empty or all 0."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    if x.ndim != 1 or (x < 0).any():
        raise ValueError("gini needs a 1-D array of non-negative counts")
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return float("nan")
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


# Gini of the word counts over the types that occur. Lower is more diverse.
def unigram_gini_of_samples(token_lists: list[list]) -> float:
    return gini(list(Counter(t for tokens in token_lists for t in tokens).values()))


# TTR: distinct words / words of one response. Higher is more diverse.
def ttr(tokens: list) -> float:
    return len(set(tokens)) / len(tokens) if tokens else float("nan")


# MATTR (Covington & McFall 2010): unlike TTR it does not fall just because a response is longer. Higher.
def mattr(tokens: list, window: int = 50) -> float:
    """Moving-average type-token ratio; the plain TTR when there are fewer tokens than the window."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if len(tokens) <= window:
        return ttr(tokens)
    counts = Counter(tokens[:window])
    distinct_sum = len(counts)
    for leaving, entering in zip(tokens, tokens[window:]):
        counts[leaving] -= 1
        if counts[leaving] == 0:
            del counts[leaving]
        counts[entering] += 1
        distinct_sum += len(counts)
    return distinct_sum / (window * (len(tokens) - window + 1))


def mean_ignoring_nan(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


# -----------------------------------------------------------------------------
# BLEU and self-BLEU

def bleu(hypothesis: list, references: list[list], max_n: int = 4) -> float:
    """
    Sentence BLEU (Papineni et al. 2002) with uniform weights over n = 1..max_n:
    - modified precision p_n: each hypothesis n-gram counts at most as often as it occurs in the
      reference that has it most often;
    - smoothing for n >= 2: p_n = (matches + 1) / (n-grams + 1) (Lin & Och 2004; "method 2" of
      Chen & Cherry 2014), so one missing 4-gram does not zero the score of a long response;
      p_1 is not smoothed, so a hypothesis sharing no word with any reference scores 0;
    - brevity penalty exp(1 - r/c) when the hypothesis length c is below r, the reference length
      closest to c (the shorter on a tie).
    An empty hypothesis scores 0.
    """
    if not references:
        raise ValueError("BLEU needs at least one reference")
    return _bleu_of_counts(_ngram_counts(hypothesis, max_n), len(hypothesis),
                           [_ngram_counts(ref, max_n) for ref in references], [len(ref) for ref in references], max_n)


def _ngram_counts(tokens: list, max_n: int) -> list[Counter]:
    return [Counter(ngrams(tokens, n)) for n in range(1, max_n + 1)]


def _bleu_of_counts(hyp_counts: list[Counter], c: int, ref_counts: list[list[Counter]], ref_lengths: list[int],
                    max_n: int) -> float:
    """bleu() from n-gram counts made once per text (self-BLEU reuses each sample's as a reference N - 1 times)."""
    if c == 0:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        matches = sum(min(count, max(refs[n - 1][gram] for refs in ref_counts))
                      for gram, count in hyp_counts[n - 1].items())
        total = max(c - n + 1, 0)
        if n == 1:
            if matches == 0:
                return 0.0
            log_precision += math.log(matches / total)
        else:
            log_precision += math.log((matches + 1) / (total + 1))
    r = min(ref_lengths, key=lambda length: (abs(length - c), length))
    brevity = 1.0 if c > r else math.exp(1.0 - r / c)
    return brevity * math.exp(log_precision / max_n)


# Self-BLEU (Zhu et al. 2018, Texygen). Lower is more diverse.
def self_bleu(token_lists: list[list], max_n: int = 4) -> float:
    """
    Mean BLEU of each non-empty sample against the other non-empty samples; nan when fewer than
    two samples have text. Empty samples are left out on both sides: as a hypothesis one would
    score 0 and pull the mean down, which reads as *more* diverse, and as a reference its length
    0 could set the brevity penalty. Needs at least two samples.
    """
    if len(token_lists) < 2:
        raise ValueError("self-BLEU needs at least two samples per prompt")
    texts = [tokens for tokens in token_lists if len(tokens) > 0]
    if len(texts) < 2:
        return float("nan")
    counts, lengths = [_ngram_counts(t, max_n) for t in texts], [len(t) for t in texts]
    return sum(_bleu_of_counts(counts[i], lengths[i], counts[:i] + counts[i + 1:], lengths[:i] + lengths[i + 1:], max_n)
               for i in range(len(texts))) / len(texts)


# -----------------------------------------------------------------------------
# Compression and embeddings

# Text that repeats itself (within or across samples) compresses more. Lower is more diverse.
def compression_ratio(texts: list[str]) -> float:
    """UTF-8 bytes / gzip bytes (level 9, no timestamp) of the texts joined by newlines; nan for no text."""
    raw = "\n".join(texts).encode("utf-8")
    if not raw.strip():
        return float("nan")
    return len(raw) / len(gzip.compress(raw, compresslevel=9, mtime=0))


# Embedding distances, within a prompt's samples or across prompts. Higher is more diverse.
def mean_pairwise_distance(embeddings) -> float:
    """Mean of 1 - cos over all pairs of rows (rows are L2-normalised here); needs two rows."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least two embedding rows, got shape {x.shape}")
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return float(np.mean([1.0 - x[i] @ x[j] for i, j in combinations(range(len(x)), 2)]))


def across_prompt_distance(embeddings, prompt_rows=None) -> float:
    """
    Mean 1 - cos between samples of *different* prompts. embeddings: [P, N, D] unit rows.
    The mean over sample pairs of prompts p != q is 1 - c_p . c_q with c_p the mean embedding of
    prompt p, so only a P x P matrix is needed. prompt_rows (optional) picks prompts, with
    repeats (a bootstrap resample); pairs of a prompt with a copy of itself are not counted, and
    a pick with no two different prompts gives nan.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    rows = np.arange(len(x)) if prompt_rows is None else np.asarray(prompt_rows)
    centroids = x.mean(axis=1)[rows]
    different = rows[:, None] != rows[None, :]
    if not different.any():
        return float("nan")
    return float(1.0 - (centroids @ centroids.T)[different].mean())


def across_prompt_distances(embeddings) -> np.ndarray:
    """
    [P]: each prompt's mean 1 - cos between its samples and those of every other prompt; their
    mean is across_prompt_distance, so the corpus figure splits into per-prompt values a bootstrap
    over prompts (and an interpolation along a trajectory) can work with.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 3 or len(x) < 2:
        raise ValueError(f"need [P, N, D] embeddings of at least two prompts, got shape {x.shape}")
    centroids = x.mean(axis=1)
    similarities = centroids @ centroids.T
    return 1.0 - (similarities.sum(axis=1) - np.diag(similarities)) / (len(x) - 1)


# -----------------------------------------------------------------------------
# All per-prompt metrics at once

def prompt_metrics(texts: list[str], token_ids: list[list[int]], vocab_size: int, mattr_window: int = 50) -> dict[str, float]:
    """The text metrics of one prompt's samples (embedding distance, reward and truncation are added by the caller)."""
    if len(texts) != len(token_ids) or len(texts) < 2:
        raise ValueError(f"need the same number (>= 2) of texts and token lists, got {len(texts)} and {len(token_ids)}")
    word_lists = [words(t) for t in texts]
    nonempty = [w for w in word_lists if w]
    metrics = tic_rates(texts)
    for n in (1, 2, 3):
        metrics[f"distinct_{n}"] = distinct_n_of_samples(word_lists, n)
    metrics["ead"] = ead_of_samples(token_ids, vocab_size)
    metrics["unigram_gini"] = unigram_gini_of_samples(word_lists)
    metrics["ttr"] = mean_ignoring_nan([ttr(w) for w in nonempty])
    metrics["mattr"] = mean_ignoring_nan([mattr(w, mattr_window) for w in nonempty])
    metrics["self_bleu"] = self_bleu(word_lists)
    metrics["compression_ratio"] = compression_ratio(texts)
    metrics["mean_words"] = sum(len(w) for w in word_lists) / len(texts)
    metrics["mean_chars"] = sum(len(t) for t in texts) / len(texts)
    metrics["empty_rate"] = sum(not t.strip() for t in texts) / len(texts)
    return metrics
