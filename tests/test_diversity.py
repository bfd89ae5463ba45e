"""Every diversity metric against values worked out by hand."""

import gzip
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanochat.kat import diversity as dv


def test_words_split_punctuation_and_lowercase():
    assert dv.words("Hello, World! It's 2-3") == ["hello", ",", "world", "!", "it", "'", "s", "2", "-", "3"]


def test_em_dash_and_en_dash_are_counted_apart():
    text = "a\u2014b \u2013 c - d\u2014"  # 2 em dashes, 1 en dash, 1 hyphen; 12 characters
    assert len(text) == 12
    rates = dv.tic_rates([text])
    assert rates["em_dash_per_1k_chars"] == pytest.approx(1000 * 2 / 12)
    assert rates["en_dash_per_1k_chars"] == pytest.approx(1000 * 1 / 12)
    # pooled over samples: 2 em dashes in 12 + 8 characters
    assert dv.tic_rates([text, "no dash!"])["em_dash_per_1k_chars"] == pytest.approx(1000 * 2 / 20)
    assert math.isnan(dv.tic_rates(["", ""])["em_dash_per_1k_chars"])


@pytest.mark.parametrize("sentence, name", [
    ("This is not just a tool but a partner.", "not_just_x_but_y"),
    ("She was not only smart but also kind.", "not_just_x_but_y"),
    ("It's NOT merely a phase, but a shift.", "not_just_x_but_y"),
    ("It's not a bug, it's a feature.", "its_not_x_its_y"),
    ("It isn\u2019t about money \u2014 it\u2019s about trust.", "its_not_x_its_y"),
    ("This is not a drill. This is real.", "its_not_x_its_y"),
    ("That wasn't luck; that was skill.", "its_not_x_its_y"),
])
def test_tic_patterns_match(sentence, name):
    counts = dv.count_tic_patterns(sentence)
    assert counts[name] == 1
    assert sum(counts.values()) == 1


@pytest.mark.parametrize("sentence", [
    "I do not just sit here.",
    "Not only that.",
    "It's not raining today.",
    "It is not what I expected, but fine.",
    "It's not red. It's not blue either.",
    "He is not just tired.\nBut he will go.",
    "Nothing but the truth, and it's fine.",
])
def test_tic_patterns_do_not_match(sentence):
    assert sum(dv.count_tic_patterns(sentence).values()) == 0


def test_tic_rate_counts_every_match():
    text = "It's not X, it's Y. Not just A but B."
    assert dv.tic_rates([text])["not_x_but_y_per_1k_chars"] == pytest.approx(1000 * 2 / len(text))


def test_distinct_n_pools_samples_without_crossing_them():
    samples = [["a", "b", "a"], ["a", "b"]]
    assert dv.distinct_n_of_samples(samples, 1) == pytest.approx(2 / 5)
    # bigrams: (a,b) (b,a) | (a,b): no (a,a) bigram across the sample boundary
    assert dv.distinct_n_of_samples(samples, 2) == pytest.approx(2 / 3)
    assert dv.distinct_n_of_samples(samples, 3) == pytest.approx(1 / 1)
    assert math.isnan(dv.distinct_n_of_samples([["a"], ["b"]], 2))


def test_ead_formula():
    # V=2, C=2: expected distinct = 2 * (1 - (1/2)^2) = 1.5
    assert dv.expected_distinct(2, 2) == pytest.approx(1.5)
    assert dv.ead_of_samples([[0], [1]], vocab_size=2) == pytest.approx(2 / 1.5)
    assert dv.ead_of_samples([[0, 0]], vocab_size=2) == pytest.approx(1 / 1.5)
    # a huge vocabulary expects every token to be new, so EAD tends to distinct-1
    assert dv.ead_of_samples([[1, 2, 3, 3]], vocab_size=10 ** 9) == pytest.approx(3 / 4, rel=1e-6)
    v, c = 50, 30
    assert dv.expected_distinct(c, v) == pytest.approx(v * (1 - ((v - 1) / v) ** c))


def test_gini_known_distributions():
    assert dv.gini([3, 3, 3, 3]) == pytest.approx(0.0)
    for n in (2, 4, 10):
        assert dv.gini([0] * (n - 1) + [7]) == pytest.approx((n - 1) / n)
    # [1, 2, 3]: sum (2i-n-1) x_i = -2*1 + 0*2 + 2*3 = 4; / (3 * 6) = 2/9
    assert dv.gini([3, 1, 2]) == pytest.approx(2 / 9)
    assert dv.unigram_gini_of_samples([["a", "a"], ["a", "b"]]) == pytest.approx((-1 * 1 + 1 * 3) / (2 * 4))
    assert math.isnan(dv.gini([]))
    with pytest.raises(ValueError):
        dv.gini([1, -1])


def test_ttr_and_mattr():
    tokens = list("abab")
    assert dv.ttr(tokens) == pytest.approx(0.5)
    # windows of 3: aba, bab -> 2/3 each
    assert dv.mattr(tokens, window=3) == pytest.approx(2 / 3)
    # windows of 2 over a a b c: aa (1/2), ab (1), bc (1)
    assert dv.mattr(list("aabc"), window=2) == pytest.approx((0.5 + 1 + 1) / 3)
    assert dv.mattr(list("ab"), window=50) == dv.ttr(list("ab"))
    # MATTR is length-robust where TTR is not: repeating a varied text keeps MATTR, halves TTR
    text = [f"w{i}" for i in range(60)]
    assert dv.mattr(text * 2, window=50) == pytest.approx(1.0)
    assert dv.ttr(text * 2) == pytest.approx(0.5)


def test_bleu_hand_computed():
    ref = "the cat sat on the mat".split()
    assert dv.bleu(ref, [ref]) == pytest.approx(1.0)
    assert dv.bleu([], [ref]) == 0.0
    assert dv.bleu(["dog"], [ref]) == 0.0
    hyp = "the cat sat".split()  # p1 = 1, p2 = (2+1)/(2+1), p3 = (1+1)/(1+1), p4 = (0+1)/(0+1)
    assert dv.bleu(hyp, [ref]) == pytest.approx(math.exp(1 - 6 / 3))  # only the brevity penalty
    # clipping: "the the the" against "the cat": p1 = 1/3; p2 = (0+1)/(2+1); p3 = 1/2; p4 = 1/1; c = 3 > r = 2
    expected = math.exp((math.log(1 / 3) + math.log(1 / 3) + math.log(1 / 2) + math.log(1)) / 4)
    assert dv.bleu("the the the".split(), ["the cat".split()]) == pytest.approx(expected)
    # the closest reference length sets the brevity penalty: c=3, refs of 2 and 6 -> r=2, no penalty
    assert dv.bleu(hyp, [["the", "cat"], ref]) == pytest.approx(1.0)


def test_self_bleu_identical_vs_disjoint():
    same = [["a", "b", "c", "d"]] * 3
    assert dv.self_bleu(same) == pytest.approx(1.0)
    disjoint = [["a", "b"], ["c", "d"], ["e", "f"]]
    assert dv.self_bleu(disjoint) == 0.0
    with pytest.raises(ValueError):
        dv.self_bleu([["a"]])


def test_self_bleu_leaves_empty_samples_out():
    a, b = "the cat sat on the mat".split(), "the dog sat on the rug".split()
    # an empty sample would score 0 as a hypothesis and pull the mean down, reading as more diverse
    assert dv.self_bleu([a, b]) > 0 and dv.self_bleu([a, b, []]) == pytest.approx(dv.self_bleu([a, b]))
    assert dv.self_bleu([[], a, [], b]) == pytest.approx(dv.self_bleu([a, b]))
    # as a reference, an empty sample's length 0 would set the brevity penalty of a one-word hypothesis
    one_word, three_words = ["the"], ["the", "cat", "sat"]
    assert dv.self_bleu([one_word, three_words, []]) == pytest.approx(dv.self_bleu([one_word, three_words]))
    assert math.isnan(dv.self_bleu([a, []])) and math.isnan(dv.self_bleu([[], [], []]))
    metrics = dv.prompt_metrics(["the cat sat", "", "  "], [[1, 2], [], []], vocab_size=10)
    assert math.isnan(metrics["self_bleu"]) and metrics["empty_rate"] == pytest.approx(2 / 3)


@given(st.text(alphabet=st.sampled_from(list("aZ\u0130\u00df9_ ,.\u2014\n\t")), max_size=40), st.integers(-1, 30))
def test_word_prefix_keeps_exactly_the_first_words(text, num_words):
    prefix = dv.word_prefix(text, num_words)
    assert text.startswith(prefix)
    assert dv.words(prefix) == dv.words(text)[:max(num_words, 0)]
    assert dv.words("\u0130stanbul \u0130") == ["i\u0307stanbul", "i\u0307"]  # split, then lowercase


def test_compression_ratio():
    texts = ["abc abc abc", "abc"]
    raw = "abc abc abc\nabc".encode()
    assert dv.compression_ratio(texts) == pytest.approx(len(raw) / len(gzip.compress(raw, compresslevel=9, mtime=0)))
    assert dv.compression_ratio(["la " * 200]) > dv.compression_ratio([" ".join(f"w{i}" for i in range(200))])
    assert math.isnan(dv.compression_ratio(["", ""]))


def test_embedding_distances():
    e = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # pairs: (0,1) 1, (0,2) 2, (1,2) 1 -> mean 4/3
    assert dv.mean_pairwise_distance(e) == pytest.approx(4 / 3)
    assert dv.mean_pairwise_distance(np.array([[2.0, 0.0], [5.0, 0.0]])) == pytest.approx(0.0)
    # two prompts, two samples each; across pairs: (x,x)->0,(x,y)->1 twice,(y,y)... -> brute force
    emb = np.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    brute = np.mean([1 - emb[0, i] @ emb[1, j] for i in range(2) for j in range(2)])
    assert dv.across_prompt_distance(emb) == pytest.approx(brute)
    # a resample holding one prompt twice has no pair of different prompts
    assert math.isnan(dv.across_prompt_distance(emb, prompt_rows=[1, 1]))
    assert dv.across_prompt_distance(emb, prompt_rows=[0, 1, 1]) == pytest.approx(brute)


def test_across_prompt_distance_splits_into_per_prompt_values():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5, 3, 4))
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    per_prompt = dv.across_prompt_distances(emb)
    # prompt p's value, brute force: the mean over its samples and every sample of every other prompt
    for p in range(5):
        brute = np.mean([1 - emb[p, i] @ emb[q, j] for q in range(5) if q != p for i in range(3) for j in range(3)])
        assert per_prompt[p] == pytest.approx(brute)
    assert per_prompt.mean() == pytest.approx(dv.across_prompt_distance(emb))
    with pytest.raises(ValueError, match="at least two prompts"):
        dv.across_prompt_distances(emb[:1])


def test_prompt_metrics_on_a_collapsed_and_a_varied_prompt():
    collapsed = ["It's not a bug \u2014 it's a feature."] * 3
    varied = ["Cats purr when content.", "Rain fell on the old roof all night.", "Seven plus five is twelve."]
    tokens = [[1, 2, 3]] * 3
    c = dv.prompt_metrics(collapsed, tokens, vocab_size=100)
    v = dv.prompt_metrics(varied, [[1, 2], [3, 4], [5, 6]], vocab_size=100)
    assert c["em_dash_per_1k_chars"] > 0 and v["em_dash_per_1k_chars"] == 0
    assert c["not_x_but_y_per_1k_chars"] > 0 and v["not_x_but_y_per_1k_chars"] == 0
    assert c["self_bleu"] == pytest.approx(1.0) and v["self_bleu"] < 0.2
    assert c["distinct_2"] < v["distinct_2"] and c["ead"] < v["ead"]
    assert c["compression_ratio"] > v["compression_ratio"]
    assert c["empty_rate"] == 0.0
