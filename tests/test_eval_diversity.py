"""scripts/eval_diversity.py, the seed-0 detail: verdicts and signs on synthetic results (a length gap
alone decides nothing, the verdicts shown are the Holm-corrected ones, empty samples stay out of
self-BLEU, nearly uniform density weights are flagged), prompt selection, and an end-to-end run on
tiny random models saved as the sft / grpo_baseline / grpo_density stages (one seed per arm, no
trajectories). Seeds per arm and matched KL: tests/test_diversity_arms.py."""

import json
import math
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch

from nanochat.kat import stats as ps
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.kat.data import KatData
from nanochat.kat.diversity import words
from nanochat.kat.diversity_eval import METRICS, cut_to_equal_length, evaluate, text_metrics
from nanochat.kat.diversity_report import SECTIONS, fmt_p, render_markdown
from nanochat.kat.data import held_out_part
from nanochat.kat.pairs import prompt_id
from nanochat.run_logger import RunLogger
from nanochat.tokenizer import Tokenizer
from tests.report_fixtures import report_context, tiny_model, write_reward_model
from scripts import eval_diversity

torch.set_num_threads(1)
LABELS = ["sft", "baseline", "density"]


# -----------------------------------------------------------------------------
# Verdicts and signs where the answer is known

def synthetic(em_dashes: dict, num_prompts=12, num_samples=2, rewards=None, seed=0, empty=None):
    """Texts whose only systematic difference between models is the number of em dashes per sample
    (one count for every prompt, or a list with one per prompt); empty: {label: [(prompt, sample)]}
    left without text."""
    rng = np.random.default_rng(seed)
    texts, token_ids, truncated, embeddings = {}, {}, {}, {}
    for label in LABELS:
        counts = em_dashes[label] if isinstance(em_dashes[label], list) else [em_dashes[label]] * num_prompts
        texts[label] = [[" ".join(f"w{p}x{s}x{i}" + (" \u2014" if i < counts[p] else ",") for i in range(6 + p % 4))
                         for s in range(num_samples)] for p in range(num_prompts)]
        for p, s in (empty or {}).get(label, []):
            texts[label][p][s] = ""
        token_ids[label] = [[list(range(p, p + 8)) for _ in range(num_samples)] for p in range(num_prompts)]
        truncated[label] = [[False] * num_samples for _ in range(num_prompts)]
        e = rng.normal(size=(num_prompts, num_samples, 8))
        embeddings[label] = e / np.linalg.norm(e, axis=-1, keepdims=True)
    return evaluate(LABELS, texts, token_ids, truncated, embeddings, rewards, vocab_size=1000,
                    n_resamples=5000, corpus_resamples=100)


PLOTS = {"metrics": "m.png", "lengths": "l.png", "em_dash": "e.png"}


def context_for(results):
    return report_context(LABELS, strata={"hh-rlhf": {1: 6, 2: 6}}, reward_model="RM not used")


def section_of(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}")[1].split("\n## ")[0]


def table_row(section: str, label: str) -> list[str]:
    line = next(line for line in section.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def summary_row(markdown: str, label: str) -> list[str]:
    return table_row(section_of(markdown, "Summary: density vs baseline"), label)


def summary_header(markdown: str) -> list[str]:
    return table_row(section_of(markdown, "Summary: density vs baseline"), "metric")


def test_fewer_em_dashes_in_the_density_arm_is_supported():
    results = synthetic({"sft": 2, "baseline": 3, "density": 0})
    row = results["comparisons"]["density_vs_baseline"]["rows"]["em_dash_per_1k_chars"]
    assert row["diff"] < 0 and row["ci"][1] < 0 and row["p"] < 0.01
    assert row["verdict"] == ps.SUPPORTED
    assert results["hypothesis"]["holm"]["em_dash_per_1k_chars"]["verdict_holm"] == ps.SUPPORTED
    cells = summary_row(render_markdown(results, context_for(results), {"metrics": "m.png", "lengths": "l.png",
                                                                        "em_dash": "e.png"}), "Em dashes / 1k chars")
    # metric, better, SFT, baseline, density, raw diff, CI, p, diff at equal length, CI, p, Holm p, d_z, prompts,
    # verdict on, verdict
    assert cells[1] == "lower" and cells[5].startswith("-") and cells[-1] == ps.SUPPORTED
    assert float(cells[4]) == 0.0 and float(cells[3]) > float(cells[2]) > 0
    # density vs SFT: fewer em dashes than the reference is "better"
    assert results["comparisons"]["density_vs_sft"]["rows"]["em_dash_per_1k_chars"]["verdict"] == ps.SUPPORTED


def test_more_em_dashes_in_the_density_arm_is_contradicted():
    results = synthetic({"sft": 1, "baseline": 0, "density": 3})
    row = results["comparisons"]["density_vs_baseline"]["rows"]["em_dash_per_1k_chars"]
    assert row["diff"] > 0 and row["ci"][0] > 0
    assert row["verdict"] == ps.CONTRADICTED
    markdown = render_markdown(results, context_for(results), {"metrics": "m.png", "lengths": "l.png", "em_dash": "e.png"})
    cells = summary_row(markdown, "Em dashes / 1k chars")
    assert cells[5].startswith("+") and cells[-1] == ps.CONTRADICTED
    assert "density vs sft" in markdown and "worse" in markdown


def test_equal_models_are_inconclusive_everywhere():
    results = synthetic({"sft": 1, "baseline": 1, "density": 1})
    rows = results["comparisons"]["density_vs_baseline"]["rows"]
    for name in ("em_dash_per_1k_chars", "distinct_2", "self_bleu", "mattr"):
        assert rows[name]["diff"] == 0 and rows[name]["p"] == 1.0 and rows[name]["verdict"] == ps.INCONCLUSIVE
    assert results["hypothesis"]["overall"] == ps.INCONCLUSIVE


def test_rewards_flow_into_the_quality_verdict():
    num_prompts, num_samples = 12, 2
    rng = np.random.default_rng(0)
    base = rng.normal(size=(num_prompts, num_samples))
    rewards = {"sft": base, "baseline": base + 1.0, "density": base - 1.0 + rng.normal(0, 0.1, base.shape)}
    results = synthetic({"sft": 1, "baseline": 2, "density": 0}, rewards=rewards)
    assert results["comparisons"]["density_vs_baseline"]["rows"]["reward"]["verdict"] == ps.CONTRADICTED
    assert "cost" in results["hypothesis"]["quality"]
    markdown = render_markdown(results, context_for(results), {"metrics": "m.png", "lengths": "l.png", "em_dash": "e.png"})
    quality = markdown.split("## Quality (RM reward)")[1].split("\n## ")[0]
    assert "| density |" in quality and "quality not measured" not in quality


# -----------------------------------------------------------------------------
# Length: a gap between the arms must not decide a verdict

def same_words_longer(seed: int, num_prompts=30, num_samples=4, vocab=2000, ratio=2):
    """
    The reviewer's scenario: every model draws words from the same distribution (a Zipf law over
    the vocabulary mixed with a topic per prompt, em dashes and "not just ... but" among the
    words), but the density arm writes `ratio` times longer. Token ids are the word indices;
    an embedding is the normalised mean of fixed random word vectors, so longer responses sit
    closer to their prompt's centre, as averaged hidden states do.
    """
    rng = np.random.default_rng(seed)
    vocabulary = ["\u2014", "not", "just", "but"] + [f"w{i}" for i in range(vocab - 4)]
    zipf = 1.0 / np.arange(1, vocab + 1) ** 1.1
    vectors = rng.normal(size=(vocab, 16))
    lengths = {"sft": (20, 80), "baseline": (20, 80), "density": (20 * ratio, 80 * ratio)}
    texts, token_ids, embeddings = ({label: [] for label in LABELS} for _ in range(3))
    for _ in range(num_prompts):
        topic = np.zeros(vocab)
        topic[rng.choice(np.arange(4, vocab), 50, replace=False)] = 1.0 / np.arange(1, 51)
        probs = 0.7 * zipf / zipf.sum() + 0.3 * topic / topic.sum()
        for label in LABELS:
            ids = [rng.choice(vocab, size=rng.integers(*lengths[label], endpoint=True), p=probs) for _ in range(num_samples)]
            texts[label].append([" ".join(vocabulary[i] for i in row) for row in ids])
            token_ids[label].append([row.tolist() for row in ids])
            means = np.array([vectors[row].mean(axis=0) for row in ids])
            embeddings[label].append(means / np.linalg.norm(means, axis=1, keepdims=True))
    truncated = {label: [[False] * num_samples for _ in range(num_prompts)] for label in LABELS}
    return evaluate(LABELS, texts, token_ids, truncated, {k: np.array(v) for k, v in embeddings.items()}, None,
                    vocab_size=vocab, n_resamples=2000, corpus_resamples=50, seed=seed)


def test_a_length_gap_alone_decides_no_verdict():
    results = same_words_longer(seed=0)
    comparison, summary = results["comparisons"]["density_vs_baseline"], results["hypothesis"]
    words_per_response = {label: np.mean(results["response_words"][label]) for label in ("baseline", "density")}
    assert words_per_response["density"] == pytest.approx(2 * words_per_response["baseline"], rel=0.1)
    # the raw differences are length-driven: read as verdicts they would decide the question
    raw = [comparison["rows"][name]["verdict"] for name in summary["primary"]]
    assert len(raw) - raw.count(ps.INCONCLUSIVE) >= 4 and ps.overall_verdict(raw) != ps.INCONCLUSIVE
    # the verdicts rest on equal-length differences, and there is nothing to find at equal length
    assert summary["overall"] == ps.INCONCLUSIVE
    for name in summary["primary"]:
        holm = summary["holm"][name]
        assert holm["basis"] == "equal length" and holm["p"] == comparison["length_controlled"][name]["p"]
        assert holm["verdict_holm"] == ps.INCONCLUSIVE, (name, holm)
    # the corpus Gini, one figure over all prompts, is compared on the responses cut to equal length too
    assert summary["holm"]["corpus_unigram_gini"]["p"] == comparison["length_controlled"]["corpus_unigram_gini"]["p"]
    assert comparison["rows"]["corpus_unigram_gini"]["verdict"] == ps.CONTRADICTED  # raw: more words, higher Gini
    markdown = render_markdown(results, context_for(results), PLOTS)
    verdict = section_of(markdown, "Summary: density vs baseline")  # the seed-0 detail's own reading
    assert "**Overall: inconclusive.**" in verdict and "**Primary verdicts are length-controlled**" in verdict
    assert "Raw differences are still shown" in verdict
    cells = summary_row(markdown, "Unigram Gini (all prompts) *")
    assert cells[-2:] == ["equal length", ps.INCONCLUSIVE] and cells[5].startswith("+") and cells[8] != "not computed"


def test_every_primary_metric_is_compared_at_equal_length():
    assert all(m.length_control in ("prefix", "regression") for m in METRICS if m.primary)
    # only a figure the model must recompute may fall back on the rougher regression
    assert {m.name for m in METRICS if m.length_control == "regression"} == {"within_prompt_distance", "reward",
                                                                              "judge_reward"}


def test_equal_length_cuts_each_sample_pair_to_the_shorter():
    short = [["the cat sat on the mat.", "a dog \u2014 ran far"], ["", "one two three"]]
    longer = [["the cat sat on the mat. And then it slept \u2014 long.", "a dog \u2014 ran"],
              ["words that lose their partner", "one two three four five"]]
    ids_short = [[[1, 2, 3], [4, 5]], [[], [6, 7, 8]]]
    ids_longer = [[[1, 2, 3, 9, 9], [4]], [[7, 7], [6, 7, 8, 10]]]
    (cut_short, cut_ids_short), (cut_longer, cut_ids_longer) = cut_to_equal_length(short, longer, ids_short, ids_longer)
    assert cut_short == cut_longer == [["the cat sat on the mat.", "a dog \u2014 ran"], ["", "one two three"]]
    assert cut_ids_short == cut_ids_longer == [[[1, 2, 3], [4]], [[], [6, 7, 8]]]
    table_short, table_longer = (text_metrics(texts, ids, vocab_size=50, mattr_window=50)
                                 for texts, ids in ((cut_short, cut_ids_short), (cut_longer, cut_ids_longer)))
    # sample by sample, both arms keep min(words) words and min(ids) ids: here the same text and ids
    assert len(words(short[0][0])) == 7 and len(words(longer[0][1])) == 4
    assert table_short["mean_words"] == table_longer["mean_words"] == [(7 + 4) / 2, (0 + 3) / 2]
    for name in ("em_dash_per_1k_chars", "distinct_2", "unigram_gini", "mattr", "self_bleu", "compression_ratio"):
        np.testing.assert_array_equal(table_short[name], table_longer[name], err_msg=name)
    assert table_longer["ead"][0] == pytest.approx(table_short["ead"][0]) and table_longer["empty_rate"] == [0.0, 0.5]
    # an empty sample empties its partner, so the second prompt has one text left: no self-BLEU on either side
    assert math.isnan(table_short["self_bleu"][1]) and math.isnan(table_longer["self_bleu"][1])


def test_primary_verdicts_shown_are_holm_corrected():
    """Fewer em dashes on 6 of 12 prompts: p = 2/64 uncorrected (exact sign-flip), supported;
    after Holm over the primary metrics, inconclusive. The table, the report card and the
    overall verdict must all say inconclusive."""
    results = synthetic({"sft": 2, "baseline": 2, "density": [1] * 6 + [2] * 6})
    name = "em_dash_per_1k_chars"
    adjusted = results["comparisons"]["density_vs_baseline"]["length_controlled"][name]
    holm = results["hypothesis"]["holm"][name]
    assert adjusted["p"] == pytest.approx(2 / 64) and adjusted["verdict"] == ps.SUPPORTED
    assert holm["p_holm"] > 0.05 and holm["verdict_holm"] == ps.INCONCLUSIVE
    assert results["hypothesis"]["overall"] == ps.INCONCLUSIVE
    markdown = render_markdown(results, context_for(results), PLOTS)
    assert summary_header(markdown)[-1] == "verdict (* Holm-corrected)"
    cells = summary_row(markdown, "Em dashes / 1k chars *")
    assert cells[-2] == "equal length" and cells[-1] == ps.INCONCLUSIVE
    length_cells = table_row(section_of(markdown, "Length-controlled differences"), "Em dashes / 1k chars *")
    assert length_cells[-3:] == [ps.SUPPORTED, fmt_p(holm["p_holm"]), ps.INCONCLUSIVE]
    bullets = eval_diversity.detail_bullets(results, None)
    assert bullets[name].startswith(f"{ps.INCONCLUSIVE} (Holm-corrected); equal length diff -")
    assert set(results["hypothesis"]["primary"]) <= set(bullets)


def test_empty_samples_are_left_out_of_self_bleu():
    """Baseline and density write the same, but baseline leaves sample 1 of three prompts empty:
    those prompts have one text, hence no self-BLEU, and drop out of that row (not count as 0)."""
    empty = {"baseline": [(0, 1), (4, 1), (7, 1)]}
    results = synthetic({"sft": 1, "baseline": 1, "density": 1}, empty=empty)
    assert [math.isnan(v) for v in results["per_prompt"]["baseline"]["self_bleu"]] == [p in (0, 4, 7) for p in range(12)]
    comparison = results["comparisons"]["density_vs_baseline"]
    for row in (comparison["rows"]["self_bleu"], comparison["length_controlled"]["self_bleu"]):
        assert row["n"] == 9 and row["n_dropped"] == 3 and row["diff"] == 0.0 and row["verdict"] == ps.INCONCLUSIVE
    assert comparison["rows"]["empty_rate"]["diff"] < 0  # the emptiness itself is still counted, where it belongs
    assert summary_row(render_markdown(results, context_for(results), PLOTS), "Self-BLEU *")[-3] == "9"


def test_nearly_uniform_density_weights_are_flagged_in_the_verdict():
    results = synthetic({"sft": 1, "baseline": 1, "density": 1})
    context = context_for(results)
    for fraction, flagged in ((0.97, True), (0.95, False), (0.6, False)):
        context["density_stats"] = {"path": "prompt_weights.jsonl", "reason": "", "data": {
            "n_train": 1000, "n_test": 100, "kish_ess": 1000 * fraction, "kish_ess_fraction": fraction, "max_over_min": 2.0,
            "max_x_n": 1.5, "weight_x_n_quantiles": {"0.5": 1.0}, "flags": {"beta": 0.1}}}
        verdict = section_of(render_markdown(results, context, PLOTS), "Verdict")
        assert ("**The density weights were nearly uniform" in verdict) == flagged
        if flagged:
            assert "Kish effective sample size 970 of 1000 train prompts (97.0% of n)" in verdict
            assert "a null result says little about density sampling.**" in verdict


def test_stratified_sample_quotas_follow_stratum_sizes():
    strata = {("a", 1): list(range(60)), ("b", 1): list(range(100, 130)), ("b", 2): list(range(200, 210))}
    chosen = eval_diversity.stratified_sample(strata, 10, np.random.default_rng(0))
    assert len(chosen) == 10 == len(set(chosen))
    assert sum(c < 100 for c in chosen) == 6 and sum(100 <= c < 200 for c in chosen) == 3 and sum(c >= 200 for c in chosen) == 1
    assert eval_diversity.stratified_sample(strata, 1000, np.random.default_rng(0)) == sorted(range(60)) + list(range(100, 130)) + list(range(200, 210))


# -----------------------------------------------------------------------------
# End to end on tiny models

TEXT = ("The quick brown fox \u2014 it's not just quick, it's clever \u2014 jumps over the lazy dog. "
        "Not only does it jump but also it runs \u2013 fast. ") * 40 + "".join(f"token{i} word{i % 7} " for i in range(300))


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diversity")
    base, outs, cache = root / "base", root / "outs", root / "cache"
    tokenizer = Tokenizer.train_from_iterator(iter([TEXT]), vocab_size=320)
    tokenizer.save(base / "tok")
    for seed, stage in enumerate(["sft", "grpo_baseline", "grpo_density"]):
        model = tiny_model(tokenizer.get_vocab_size(), seed)
        save_checkpoint(outs / stage, 5, model, [], meta={"model_config": asdict(model.config)}, final=True)
    write_reward_model(outs / "rm", tokenizer, seed=7, role="policy", accuracy=0.65)
    write_reward_model(outs / "rm_judge", tokenizer, seed=8, role="judge", accuracy=0.6)
    logger = RunLogger(outs / "grpo_density")
    for step in range(3):
        logger.log(step, {"train/reward_mean": 0.1 * step, "train/kl": 0.01 * step})
    logger.close()

    data = cache / "data"
    data.mkdir(parents=True)
    rows, num_test = [], 20  # 12 of the test prompts fall in the final half, which the evaluation samples
    for i in range(num_test + 4):
        messages = [{"role": "user", "content": f"Tell me about topic {i}: the fox \u2014 and the dog."}]
        rows.append({"id": prompt_id(messages), "prefix": {"messages": messages}, "src": ["hh-rlhf", "ultrafeedback"][i % 2],
                     "n_pairs": 1, "split": "test" if i < num_test else "train"})
    (data / "prompts_all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    log_density = np.concatenate([np.linspace(-3, 0, num_test), [-0.6, -0.4, -0.2, 0.0]])  # train: Kish ESS 3.812 of 4
    splits = [r["split"] for r in rows]
    weights = np.where(np.array(splits) == "train", np.exp(-log_density), 0.0)
    KatData(data).save_prompt_weights([r["id"] for r in rows], splits, log_density, np.full(len(rows), 0.9),
                        weights / weights.sum(), {"flags": {"beta": 1.0, "k": 3}})
    return {"base": base, "outs": outs, "cache": cache}


@pytest.fixture
def env(run_dirs, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(run_dirs["base"]))
    monkeypatch.setenv("NANOCHAT_OUTS_DIR", str(run_dirs["outs"]))
    monkeypatch.setenv("NANOCHAT_KAT_CACHE", str(run_dirs["cache"]))
    return run_dirs


TINY = ["--num_prompts=8", "--num_samples=2", "--max_tokens=12", "--batch_size=3", "--num_resamples=300",
        "--num_corpus_resamples=40", "--reward_model=", "--judge=", "--device_type=cpu", "--max_prompt_tokens=100",
        "--seed=3"]


def finite_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from finite_numbers(v)
    elif isinstance(obj, float):
        yield obj


def test_end_to_end_report(env):
    written = eval_diversity.main([flag for flag in TINY if flag not in ("--reward_model=", "--judge=")])
    report = written["report"].read_text(encoding="utf-8")
    assert written["report"] == env["cache"] / "diversity_report.md"
    headings = re.findall(r"^## (.+)$", report, flags=re.MULTILINE)
    assert headings == SECTIONS
    assert "quality not measured" not in report
    quality = report.split("## Quality (RM reward)")[1].split("\n## ")[0]
    assert "| density |" in quality and "- density - baseline at equal length:" in quality
    rm_eval = report.split("## RM held-out accuracy by density quintile")[1].split("\n## ")[0]
    assert "accuracy 0.65" in rm_eval and "| Q1 (rarest) |" in rm_eval and "| Q5 (densest) |" in rm_eval
    assert re.search(r"\*\*Overall: (supported|contradicted|mixed|inconclusive|weakly \w+)\.\*\*", report)
    # the density arm has TensorBoard curves, the baseline arm none
    curves = report.split("## GRPO training curves")[1].split("\n## ")[0]
    assert "density reward (train/reward_mean): 3 points" in curves and "baseline reward: not found" in curves
    assert "Kish effective sample size" in report
    # the fixture's train weights are close to uniform (Kish ESS 3.81 of 4 train prompts)
    assert "**The density weights were nearly uniform: Kish effective sample size 3.812 of 4 train prompts (95.3% of n)" \
        in report.split("## Verdict")[1].split("\n## ")[0]

    payload = json.loads(written["json"].read_text(encoding="utf-8"))
    results = payload["results"]
    assert results["num_prompts"] == 8 and results["num_samples"] == 2
    rows = results["comparisons"]["density_vs_baseline"]["rows"]
    for metric in METRICS:
        assert metric.name in rows, metric.name
        for key in ("diff", "p"):
            assert isinstance(rows[metric.name][key], float) and math.isfinite(rows[metric.name][key]), (metric.name, key)
    assert set(results["comparisons"]) == {"density_vs_baseline", "baseline_vs_sft", "density_vs_sft"}
    assert all(math.isfinite(x) for x in finite_numbers(payload))
    assert sum(sum(c.values()) for c in payload["context"]["prompts"]["strata"].values()) == 8
    assert all(held_out_part(pid) == "final" for pid in payload["context"]["prompts"]["ids"])  # never GRPO's dev half
    for name in ("metrics", "lengths", "em_dash", "training_curves"):
        assert written[name].stat().st_size > 1000
        assert f"]({written[name].name})" in report
    samples = written["report"].with_name("diversity_report_samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(samples) == 8 * 3 * 2
    card = (env["base"] / "report" / "diversity_report.md").read_text(encoding="utf-8")
    assert "Diversity evaluation" in card and "overall verdict" in card
    assert "primary verdict (pre-registered): undecidable (one seed per arm)" in card


def test_same_prompts_and_seeds_give_the_same_samples(env, tmp_path):
    """The paired design relies on it: a rerun (any model) sees identical prompts and draws."""
    first = eval_diversity.main(TINY + [f"--output_report={tmp_path / 'a.md'}", "--num_resamples=20", "--num_corpus_resamples=5"])
    second = eval_diversity.main(TINY + [f"--output_report={tmp_path / 'b.md'}", "--num_resamples=20", "--num_corpus_resamples=5"])
    read = lambda path: path.with_name(path.stem + "_samples.jsonl").read_text(encoding="utf-8")
    assert read(first["report"]) == read(second["report"])
    # without a judge or a reward model the report says, loudly, that quality was not measured
    assert ("**No judge and no policy RM (--judge and --reward_model are empty): quality not measured**"
            in first["report"].read_text(encoding="utf-8"))


def test_a_model_is_never_compared_with_itself(env):
    # checkpoint paths, a space-separated value
    density = str(env["outs"] / "grpo_density" / "ckpt.pt")
    with pytest.raises(SystemExit, match="compare a model with itself"):
        eval_diversity.main(TINY + ["--runs", f"{density},{density},grpo_baseline"])
    # a stage name and its folder
    with pytest.raises(SystemExit, match="compare a model with itself"):
        eval_diversity.main(TINY + [f"--runs=grpo_density,{env['outs'] / 'grpo_density'},grpo_baseline"])
