"""
From the models' responses to figures and verdicts: the computing half of scripts.eval_diversity
(nanochat/kat/diversity_report.py renders what this returns).

    results = evaluate(labels, texts, token_ids, truncated, embeddings, rewards, vocab_size,
                       judge_rewards=judge_rewards)

Input, for every model label, on the same P prompts with N samples each: texts[label][p][s]
(decoded response), token_ids[label][p][s] (its BPE ids, no special tokens), truncated[label][p][s]
(hit max_tokens before <|assistant_end|>), embeddings[label] (float [P, N, D], unit rows) and
optionally rewards / judge_rewards[label] (float [P, N]: the policy RM's and the independent judge's).
The hypothesis "density-aware prompt sampling reduces mode collapse" is tested on density minus
baseline (each model is also compared with SFT; statistics in nanochat/kat/stats.py). Verdicts rest
on differences at equal length (Metric.length_control); why, and the checks behind it: dev/NOTES.md.
"""

import math
from dataclasses import dataclass

import numpy as np

from nanochat.kat import diversity as dv
from nanochat.kat import stats as ps

HYPOTHESIS = ("density", "baseline")
REFERENCE = "sft"


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    direction: str | None  # "lower" or "higher" is better; None: descriptive only
    definition: str
    kind: str = "prompt"  # "prompt": one value per prompt; "corpus": one value over all prompts
    primary: bool = False  # in the family the overall verdict and the Holm correction cover
    # How density vs baseline is compared at equal length (GRPO changes how long a model writes, and most
    # figures move with length alone). "prefix": each sample pair cut to the shorter, the figure recomputed
    # (every figure computed from the text); "regression": the intercept of the per-prompt difference on the
    # log-length difference (the embedding distance and rewards, which need a model to recompute).
    length_control: str | None = None


METRICS = [
    Metric("em_dash_per_1k_chars", "Em dashes / 1k chars", "lower",
           "U+2014 characters per 1,000 characters of the prompt's samples pooled (en dashes and hyphens not counted)",
           primary=True, length_control="prefix"),
    Metric("not_x_but_y_per_1k_chars", '"Not X but Y" / 1k chars', "lower",
           "matches of the documented 'not just/only X but Y' and 'it's not X, it's Y' regexes per 1,000 characters",
           primary=True, length_control="prefix"),
    Metric("distinct_1", "Distinct-1", "higher", "distinct words / words over the prompt's samples",
           length_control="prefix"),
    Metric("distinct_2", "Distinct-2", "higher", "distinct word bigrams / bigrams over the prompt's samples (none across samples)",
           primary=True, length_control="prefix"),
    Metric("distinct_3", "Distinct-3", "higher", "distinct word trigrams / trigrams over the prompt's samples",
           length_control="prefix"),
    Metric("ead", "EAD", "higher", "distinct BPE tokens / V(1-((V-1)/V)^C), V the vocabulary size, C the tokens (Liu et al. 2022)",
           primary=True, length_control="prefix"),
    Metric("unigram_gini", "Unigram Gini (per prompt)", "lower",
           "Gini of the word counts of the prompt's samples: sum_i (2i-n-1) x_(i) / (n sum x), x ascending",
           length_control="prefix"),
    Metric("ttr", "TTR", "higher", "distinct words / words of one response, averaged over samples",
           length_control="prefix"),
    Metric("mattr", "MATTR", "higher", "mean TTR over every window of W consecutive words, averaged over samples",
           primary=True, length_control="prefix"),
    Metric("self_bleu", "Self-BLEU", "lower",
           "mean BLEU-4 of each non-empty sample against the prompt's other non-empty samples (add-one smoothing "
           "for n >= 2, brevity penalty); undefined, and the prompt left out of the comparison, with fewer than 2 "
           "non-empty samples",
           primary=True, length_control="prefix"),
    Metric("compression_ratio", "gzip compression ratio", "lower",
           "UTF-8 bytes / gzip bytes of the prompt's samples joined by newlines", length_control="prefix"),
    Metric("within_prompt_distance", "Embedding distance within prompt", "higher",
           "mean 1 - cos over pairs of the prompt's samples (SFT masked-mean hidden state, L2-normalised)",
           primary=True, length_control="regression"),
    Metric("corpus_distinct_2", "Distinct-2 (all prompts)", "higher",
           "distinct word bigrams / bigrams over every response of the model", kind="corpus", length_control="prefix"),
    Metric("corpus_unigram_gini", "Unigram Gini (all prompts)", "lower",
           "Gini of the word counts over every response of the model", kind="corpus", primary=True,
           length_control="prefix"),
    # no length control possible: its verdict would rest on the raw difference, so it is not primary
    Metric("across_prompt_distance", "Embedding distance across prompts", "higher",
           "mean 1 - cos between samples of different prompts", kind="corpus"),
    Metric("judge_reward", "Judge reward (quality)", "higher",
           "mean score of the prompt's samples by the independent judge RM (rm_judge: the other half of the train "
           "pairs; GRPO never saw it)", length_control="regression"),
    Metric("reward", "Policy RM reward", "higher",
           "mean score of the prompt's samples by the policy RM (rm: the reward GRPO maximised, so it flatters GRPO)",
           length_control="regression"),
    Metric("empty_rate", "Empty responses", "lower", "share of samples with no visible text"),
    Metric("truncated_rate", "Truncated responses", "lower", "share of samples that hit max_tokens before <|assistant_end|>"),
    Metric("en_dash_per_1k_chars", "En dashes / 1k chars", None, "U+2013 characters per 1,000 characters (descriptive)"),
    Metric("mean_words", "Words per response", None, "mean number of words (see nanochat.kat.diversity.words)"),
    Metric("mean_chars", "Characters per response", None, "mean number of characters"),
]
METRIC_BY_NAME = {m.name: m for m in METRICS}


def _check_shapes(labels, texts, token_ids, truncated, embeddings, *scores):
    num_prompts = len(texts[labels[0]])
    num_samples = len(texts[labels[0]][0]) if num_prompts else 0
    if num_prompts < 2 or num_samples < 2:
        raise ValueError(f"need at least 2 prompts and 2 samples per prompt, got {num_prompts} and {num_samples}")
    for label in labels:
        for name, value in (("texts", texts[label]), ("token_ids", token_ids[label]), ("truncated", truncated[label])):
            if len(value) != num_prompts or any(len(row) != num_samples for row in value):
                raise ValueError(f"{name}[{label!r}] is not {num_prompts} prompts x {num_samples} samples")
        if np.shape(embeddings[label])[:2] != (num_prompts, num_samples):
            raise ValueError(f"embeddings[{label!r}] has shape {np.shape(embeddings[label])}, expected ({num_prompts}, {num_samples}, D)")
        for rewards in scores:
            if rewards is not None and np.shape(rewards[label]) != (num_prompts, num_samples):
                raise ValueError(f"rewards of {label!r} have shape {np.shape(rewards[label])}, expected "
                                 f"({num_prompts}, {num_samples})")
    return num_prompts, num_samples


def text_metrics(texts, token_ids, vocab_size: int, mattr_window: int) -> dict:
    """{metric: [value per prompt]} of the metrics computed from the text alone."""
    table: dict[str, list[float]] = {}
    for p in range(len(texts)):
        for name, value in dv.prompt_metrics(texts[p], token_ids[p], vocab_size, mattr_window).items():
            table.setdefault(name, []).append(float(value))
    return table


def per_prompt_metrics(texts, token_ids, truncated, embeddings, rewards, vocab_size: int, mattr_window: int,
                       judge_rewards=None) -> dict:
    """{metric: [value per prompt]} for one model."""
    table = text_metrics(texts, token_ids, vocab_size, mattr_window)
    table["within_prompt_distance"] = [dv.mean_pairwise_distance(e) for e in embeddings]
    table["truncated_rate"] = [float(np.mean(row)) for row in truncated]
    for name, scores in (("reward", rewards), ("judge_reward", judge_rewards)):
        if scores is not None:
            table[name] = [float(np.mean(row)) for row in scores]
    return table


def cut_to_common_length(texts: list, token_ids: list) -> list[tuple[list, list]]:
    """
    [(texts, ids) of each model], every response cut to a common length: sample s of prompt p of
    every model keeps the words the shortest of them has (dv.word_prefix) and the BPE ids the
    shortest id list has. texts[m][p][s] and token_ids[m][p][s] of model m. An empty sample empties
    its partners.
    """
    cut = [([], []) for _ in texts]
    for p in range(len(texts[0])):
        for cut_texts, cut_ids in cut:
            cut_texts.append([])
            cut_ids.append([])
        for s in range(len(texts[0][p])):
            num_words = min(len(dv.words(model_texts[p][s])) for model_texts in texts)
            num_ids = min(len(model_ids[p][s]) for model_ids in token_ids)
            for (cut_texts, cut_ids), model_texts, model_ids in zip(cut, texts, token_ids):
                cut_texts[p].append(dv.word_prefix(model_texts[p][s], num_words))
                cut_ids[p].append(list(model_ids[p][s][:num_ids]))
    return cut


def cut_to_equal_length(texts_a, texts_b, token_ids_a, token_ids_b) -> tuple[tuple[list, list], tuple[list, list]]:
    """((texts, ids) of model a, the same of model b), each sample pair cut to the shorter (cut_to_common_length)."""
    return tuple(cut_to_common_length([texts_a, texts_b], [token_ids_a, token_ids_b]))


def model_tables(labels: list[str], texts: dict, token_ids: dict, truncated: dict, embeddings: dict, rewards: dict | None,
                 judge_rewards: dict | None, vocab_size: int, mattr_window: int) -> dict:
    """{label: {metric: [value per prompt]}} of every model, the across-prompt distance split into per-prompt values."""
    _check_shapes(labels, texts, token_ids, truncated, embeddings, rewards, judge_rewards)
    tables = {}
    for label in labels:
        tables[label] = per_prompt_metrics(texts[label], token_ids[label], truncated[label], embeddings[label],
                                           None if rewards is None else rewards[label], vocab_size, mattr_window,
                                           None if judge_rewards is None else judge_rewards[label])
        tables[label]["across_prompt_distance"] = dv.across_prompt_distances(embeddings[label]).tolist()
    return tables


def common_length_tables(labels: list[str], texts: dict, token_ids: dict, vocab_size: int, mattr_window: int) -> dict:
    """{label: text metrics per prompt} with every model's responses cut to the common length of these models."""
    cut = cut_to_common_length([texts[label] for label in labels], [token_ids[label] for label in labels])
    return {label: text_metrics(cut_texts, cut_ids, vocab_size, mattr_window)
            for label, (cut_texts, cut_ids) in zip(labels, cut)}


class _GramTable:
    """Per (model, prompt) n-gram counts in one id space shared by every model, so that
    corpus figures over any mix of units (a resample, a permutation) are one bincount."""

    def __init__(self, word_lists_by_unit: list[list[list[str]]], n: int):
        ids: dict[tuple, int] = {}
        self.units = []
        for word_lists in word_lists_by_unit:
            grams = [ids.setdefault(g, len(ids)) for words in word_lists for g in dv.ngrams(words, n)]
            unique, counts = np.unique(np.array(grams, dtype=np.int64), return_counts=True)
            self.units.append((unique, counts))
        self.size = len(ids)

    def totals(self, rows) -> np.ndarray:
        ids = np.concatenate([self.units[r][0] for r in rows])
        counts = np.concatenate([self.units[r][1] for r in rows])
        return np.bincount(ids, weights=counts, minlength=self.size)


def _distinct(totals) -> float:
    total = totals.sum()
    return float((totals > 0).sum() / total) if total > 0 else float("nan")


def _observed_gini(totals) -> float:
    return dv.gini(totals[totals > 0])


def corpus_statistics(word_lists: list, embeddings: np.ndarray):
    """Statistic functions over stacked units (see paired_stats.paired_corpus_test): unit u is
    prompt u % P of the model stacked at position u // P."""
    bigrams, unigrams = _GramTable(word_lists, 2), _GramTable(word_lists, 1)
    return {"corpus_distinct_2": lambda rows: _distinct(bigrams.totals(rows)),
            "corpus_unigram_gini": lambda rows: _observed_gini(unigrams.totals(rows)),
            "across_prompt_distance": lambda rows: dv.across_prompt_distance(embeddings, rows)}


def compare(a: str, b: str, per_prompt: dict, word_lists: dict, embeddings: dict, stats_kwargs: dict,
            corpus_resamples: int, equal_length: dict | None = None) -> dict:
    """Every metric of model a minus model b, paired over prompts. With equal_length ({label:
    {"per_prompt": text metrics, "word_lists": ...}} of the responses cut_to_equal_length), also
    each length-controlled metric at equal length."""
    rows, adjusted = {}, {}
    for metric in METRICS:
        if metric.kind != "prompt" or metric.name not in per_prompt[a]:
            continue
        rows[metric.name] = ps.paired_comparison(per_prompt[a][metric.name], per_prompt[b][metric.name],
                                                 metric.direction, **stats_kwargs)
        if equal_length is None or metric.length_control is None:
            continue
        # prefix: texts of equal length compared position by position; if the arms differ only in when they
        # stop, the test keeps its level exactly, whatever the figure's shape in length
        if metric.length_control == "prefix":
            adjusted[metric.name] = ps.paired_comparison(equal_length[a]["per_prompt"][metric.name],
                                                         equal_length[b]["per_prompt"][metric.name],
                                                         metric.direction, **stats_kwargs)
        else:  # regression: assumes a line in log length (self-BLEU is far from one: text figures are cut instead)
            adjusted[metric.name] = ps.length_adjusted_comparison(
                per_prompt[a][metric.name], per_prompt[b][metric.name], per_prompt[a]["mean_words"],
                per_prompt[b]["mean_words"], metric.direction, **stats_kwargs)
        adjusted[metric.name]["method"] = metric.length_control
    num_prompts = len(word_lists[a])
    both_embeddings = np.concatenate([embeddings[a], embeddings[b]])
    corpus_kwargs = {**stats_kwargs, "n_resamples": corpus_resamples}
    for name, statistic in corpus_statistics(word_lists[a] + word_lists[b], both_embeddings).items():
        rows[name] = ps.paired_corpus_test(statistic, num_prompts, METRIC_BY_NAME[name].direction, **corpus_kwargs)
    if equal_length is not None:
        cut_statistics = corpus_statistics(equal_length[a]["word_lists"] + equal_length[b]["word_lists"], both_embeddings)
        for name, statistic in cut_statistics.items():
            if METRIC_BY_NAME[name].length_control == "prefix":
                metric = METRIC_BY_NAME[name]
                adjusted[name] = {**ps.paired_corpus_test(statistic, num_prompts, metric.direction, **corpus_kwargs),
                                  "method": metric.length_control}
    result = {"a": a, "b": b, "rows": rows, "length_controlled": adjusted}
    if equal_length is not None:
        result["equal_length_words"] = float(np.mean(equal_length[a]["per_prompt"]["mean_words"]))
    return result


def verdict_basis(comparison: dict, name: str) -> tuple[dict, str]:
    """The result a metric's verdict rests on: the difference at equal length where the comparison
    has one, the raw difference otherwise. Returns (result, "equal length" or "raw")."""
    adjusted = comparison["length_controlled"].get(name)
    return (adjusted, "equal length") if adjusted is not None else (comparison["rows"][name], "raw")


def hypothesis_summary(comparison: dict, alpha: float) -> dict:
    """Holm-corrected verdicts over the primary metrics, each on its length-controlled difference,
    and one overall word, plus the quality check."""
    primary = [m.name for m in METRICS if m.primary and m.name in comparison["rows"]]
    bases = {name: verdict_basis(comparison, name) for name in primary}
    adjusted = ps.holm_adjust([bases[name][0]["p"] for name in primary])
    holm = {}
    for name, p_holm in zip(primary, adjusted):
        result, basis = bases[name]
        holm[name] = {"basis": basis, "diff": result["diff"], "ci": result["ci"], "p": result["p"], "n": result["n"],
                      "verdict": result["verdict"], "p_holm": p_holm,
                      "verdict_holm": ps.verdict(result["diff"], result["ci"], p_holm, result["direction"], alpha)}
    verdicts = [holm[name]["verdict_holm"] for name in primary]
    summary = {"primary": primary, "holm": holm, "overall": ps.overall_verdict(verdicts),
               "counts": {v: verdicts.count(v) for v in (ps.SUPPORTED, ps.CONTRADICTED, ps.INCONCLUSIVE)}}
    summary["quality"] = quality_reading(comparison["rows"].get("judge_reward"), comparison["rows"].get("reward"))
    return summary


def quality_reading(judge: dict | None, policy: dict | None) -> str:
    """One phrase on quality from the density - baseline result of the judge's reward (the policy RM's without a judge)."""
    if judge is None and policy is None:
        return "not measured (no judge and no reward model)"
    result, who = (judge, "judge") if judge is not None else (policy, "policy-RM (no judge: the RM GRPO optimised)")
    return {ps.CONTRADICTED: f"lower {who} reward for the density arm: any diversity gain came at a cost in quality",
            ps.SUPPORTED: f"higher {who} reward for the density arm",
            ps.INCONCLUSIVE: f"no clear {who} reward difference between the arms"}[result["verdict"]]


def evaluate(labels: list[str], texts: dict, token_ids: dict, truncated: dict, embeddings: dict, rewards: dict | None,
             vocab_size: int, mattr_window: int = 50, n_resamples: int = 10_000, corpus_resamples: int = 1000,
             confidence: float = 0.95, alpha: float = 0.05, seed: int = 0, judge_rewards: dict | None = None) -> dict:
    """Per-prompt and corpus figures of every model, the hypothesis comparison and each model vs SFT."""
    for needed in (*HYPOTHESIS, REFERENCE):
        if needed not in labels:
            raise ValueError(f"model label {needed!r} is missing; labels are {labels}")
    _check_shapes(labels, texts, token_ids, truncated, embeddings, rewards, judge_rewards)
    embeddings = {label: np.asarray(embeddings[label], dtype=np.float64) for label in labels}
    per_prompt = {label: per_prompt_metrics(texts[label], token_ids[label], truncated[label], embeddings[label],
                                            None if rewards is None else np.asarray(rewards[label]), vocab_size,
                                            mattr_window, None if judge_rewards is None else np.asarray(judge_rewards[label]))
                  for label in labels}
    word_lists = {label: [[dv.words(t) for t in samples] for samples in texts[label]] for label in labels}
    num_prompts = len(texts[labels[0]])
    corpus = {}
    for label in labels:
        statistics = corpus_statistics(word_lists[label], embeddings[label])
        corpus[label] = {name: statistic(np.arange(num_prompts)) for name, statistic in statistics.items()}

    stats_kwargs = {"n_resamples": n_resamples, "confidence": confidence, "alpha": alpha, "seed": seed}
    a, b = HYPOTHESIS
    equal_length = {label: {"per_prompt": text_metrics(cut_texts, cut_ids, vocab_size, mattr_window),
                            "word_lists": [[dv.words(t) for t in samples] for samples in cut_texts]}
                    for label, (cut_texts, cut_ids) in zip(HYPOTHESIS, cut_to_equal_length(
                        texts[a], texts[b], token_ids[a], token_ids[b]))}
    comparisons = {"density_vs_baseline": compare(a, b, per_prompt, word_lists, embeddings, stats_kwargs,
                                                  corpus_resamples, equal_length)}
    for label in labels:
        if label != REFERENCE:
            comparisons[f"{label}_vs_{REFERENCE}"] = compare(label, REFERENCE, per_prompt, word_lists, embeddings,
                                                             stats_kwargs, corpus_resamples)
    lengths = {label: [len(w) for samples in word_lists[label] for w in samples] for label in labels}
    return {"labels": labels, "num_prompts": num_prompts, "num_samples": len(texts[labels[0]][0]),
            "per_prompt": per_prompt, "corpus": corpus, "comparisons": comparisons,
            "hypothesis": hypothesis_summary(comparisons["density_vs_baseline"], alpha),
            "response_words": lengths, "has_rewards": rewards is not None, "has_judge": judge_rewards is not None,
            "settings": {"mattr_window": mattr_window, "vocab_size": vocab_size, **stats_kwargs,
                         "corpus_resamples": corpus_resamples}}


def model_means(results: dict, label: str) -> dict:
    """Each metric's value for one model: the mean over prompts (finite values) or the corpus figure."""
    means = {}
    for metric in METRICS:
        if metric.kind == "corpus":
            means[metric.name] = results["corpus"][label][metric.name]
        elif metric.name in results["per_prompt"][label]:
            values = [v for v in results["per_prompt"][label][metric.name] if math.isfinite(v)]
            means[metric.name] = float(np.mean(values)) if values else float("nan")
    return means
