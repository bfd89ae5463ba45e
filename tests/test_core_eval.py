import datetime
import os
import time
from types import SimpleNamespace

import pytest
import tiktoken
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.core_eval import (SAMPLE_BUNDLE_DIR, EvalBundleUnavailable, centered_accuracy, crop_left,
                                download_eval_bundle, evaluate_core, evaluate_task, get_eval_bundle, load_bundle,
                                load_task_data, render_prompts, sample_fewshot)
from tests.dist_fixtures import end_rank
from tests.http_fixtures import ScriptedServer, bundle_zip_bytes, free_port, unreachable_url

torch.set_num_threads(1)

CORE_LABELS = {
    "hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa",
    "commonsense_qa", "piqa", "openbook_qa", "lambada_openai", "hellaswag", "winograd", "winogrande",
    "bigbench_dyck_languages", "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators",
    "bigbench_repeat_copy_logic", "squad", "coqa", "boolq", "bigbench_language_identification",
}
BOS = 256


class ByteTokenizer:
    """A real tiktoken Encoding with one token per byte plus <|bos|>, so token positions are characters."""

    def __init__(self):
        self.enc = tiktoken.Encoding(name="test_bytes", pat_str=r"\S+|\s+",
                                     mergeable_ranks={bytes([i]): i for i in range(256)},
                                     special_tokens={"<|bos|>": BOS})

    def get_bos_token_id(self):
        return BOS

    def encode(self, text, prepend=None):
        prefix = [prepend] if prepend is not None else []
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text)
        return [prefix + self.enc.encode_ordinary(t) for t in text]


class BigramModel(torch.nn.Module):
    """Logits depend only on the previous token, through a table we fill: a model whose choices we know."""

    def __init__(self, sequence_len=4096, preferred=()):
        super().__init__()
        self.config = SimpleNamespace(sequence_len=sequence_len)
        self.register_buffer("table", torch.zeros(BOS + 1, BOS + 1))
        self.longest_input = 0
        for text in preferred:
            self.prefer(text)

    def prefer(self, text: str):
        """Make every character pair of text the model's strong favourite after its first character."""
        for a, b in zip(text, text[1:]):
            self.table[ord(a), ord(b)] = 10.0

    def forward(self, idx):
        self.longest_input = max(self.longest_input, idx.size(1))
        assert idx.size(1) <= self.config.sequence_len, "fed a sequence longer than the model's window"
        return self.table[idx]


def accuracy(model, data, task_type, delimiter=" ", num_fewshot=0, **kwargs):
    meta = {"task_type": task_type, "num_fewshot": num_fewshot, "continuation_delimiter": delimiter}
    return evaluate_task(model, ByteTokenizer(), data, meta, torch.device("cpu"), **kwargs)


# -----------------------------------------------------------------------------
# Scoring rules

@pytest.mark.parametrize("preferred", [0, 1, 2])
@pytest.mark.parametrize("gold", [0, 1, 2])
def test_multiple_choice_picks_the_lowest_loss_choice(preferred, gold):
    choices = ["cat", "dog", "cow"]
    model = BigramModel(preferred=[" " + choices[preferred]])
    item = {"query": "Pets:", "choices": choices, "gold": gold}
    assert accuracy(model, [item], "multiple_choice") == float(preferred == gold)


def test_multiple_choice_compares_mean_not_summed_loss():
    # "x": one unlikely token. "yzuv": two likely and two unlikely tokens -> higher sum, lower mean.
    model = BigramModel(preferred=["yzu"])
    item = {"query": "Q:", "choices": ["x", "yzuv"], "gold": 1}
    assert accuracy(model, [item], "multiple_choice") == 1.0


@pytest.mark.parametrize("gold", [0, 1])
def test_schema_scores_only_the_shared_continuation(gold):
    # The model likes the first context ("Ann ate") far more, but only the transition into the
    # continuation may count, and that favours "Bob ran".
    model = BigramModel(preferred=["Ann ate", "n "])
    item = {"context_options": ["Ann ate", "Bob ran"], "continuation": "fast", "gold": gold}
    assert accuracy(model, [item], "schema") == float(gold == 1)


def test_language_modeling_needs_every_token_argmax_correct():
    item = {"context": "2+2=", "continuation": "44"}
    assert accuracy(BigramModel(preferred=["= 44"]), [item], "language_modeling") == 1.0
    # two of the three continuation tokens right is still wrong
    assert accuracy(BigramModel(preferred=["= 45"]), [item], "language_modeling") == 0.0
    assert accuracy(BigramModel(preferred=["=x44"]), [item], "language_modeling") == 0.0


def test_language_modeling_strips_stray_context_whitespace():
    # contexts in the real data end in spaces; the prompt without the continuation is stripped
    item = {"context": "  sky is  ", "continuation": "blue"}
    without, with_continuation = render_prompts(item, "language_modeling", " ", [])
    assert (without, with_continuation) == ("sky is", "sky is blue")
    assert accuracy(BigramModel(preferred=["s blue"]), [item], "language_modeling") == 1.0


def test_prompts_are_rendered_like_nanochat():
    mc_shot = {"query": "Q1", "choices": ["a", "b"], "gold": 1}
    assert render_prompts({"query": "Q2", "choices": ["c", "d"], "gold": 0}, "multiple_choice", "\nAnswer: ",
                          [mc_shot]) == ["Q1\nAnswer: b\n\nQ2\nAnswer: c", "Q1\nAnswer: b\n\nQ2\nAnswer: d"]
    schema_shot = {"context_options": ["X one", "X two"], "continuation": "end", "gold": 0}
    assert render_prompts({"context_options": ["A", "B"], "continuation": "z", "gold": 1}, "schema", " ",
                          [schema_shot]) == ["X one end\n\nA z", "X one end\n\nB z"]
    lm_shot = {"context": " c1 ", "continuation": "k1"}
    assert render_prompts({"context": "c2", "continuation": "k2"}, "language_modeling", " ",
                          [lm_shot]) == ["c1 k1\n\nc2", "c1 k1\n\nc2 k2"]


def test_long_prompts_are_cropped_on_the_left_and_still_scored_right():
    data = [{"query": f"Item {i} asks about pets:", "choices": ["cat", "dog"], "gold": int(i % 4 != 0)} for i in range(8)]
    wide = BigramModel(sequence_len=4096, preferred=[" dog"])
    narrow = BigramModel(sequence_len=24, preferred=[" dog"])
    full = accuracy(wide, data, "multiple_choice", num_fewshot=5)
    cropped = accuracy(narrow, data, "multiple_choice", num_fewshot=5)
    assert wide.longest_input > 100 and narrow.longest_input == 24
    assert full == cropped == 0.75  # the preferred "dog" is gold on 6 of the 8 items


def test_crop_refuses_a_span_longer_than_the_window():
    tokens, starts, ends = crop_left([[BOS] + list(range(30))], [2], [31], max_len=64)
    assert (tokens[0][0], starts, ends) == (BOS, [2], [31])  # short enough: untouched
    with pytest.raises(ValueError, match="sequence_len=20"):
        crop_left([[BOS] + list(range(30))], [2], [31], max_len=20)


def test_fewshot_excludes_the_item_and_is_deterministic():
    data = [{"context": f"c{i}", "continuation": f"k{i}"} for i in range(20)]
    for idx in range(20):
        shots = sample_fewshot(data, idx, 5)
        assert data[idx] not in shots and len({s["context"] for s in shots}) == 5
        assert shots == sample_fewshot(data, idx, 5)
    assert len({tuple(s["context"] for s in sample_fewshot(data, idx, 5)) for idx in range(20)}) > 1
    assert sample_fewshot(data, 3, 0) == []
    with pytest.raises(ValueError, match="at least 21 items"):
        sample_fewshot(data, 0, 20)


def test_max_per_task_scores_a_fixed_subset():
    data = [{"query": f"Q{i}:", "choices": ["cat", "dog"], "gold": i % 2} for i in range(10)]
    model = BigramModel(preferred=[" dog"])
    first = accuracy(model, data, "multiple_choice", max_per_task=3)
    assert first * 3 == round(first * 3)  # a fraction of 3 items
    assert accuracy(model, data, "multiple_choice", max_per_task=3) == first
    assert accuracy(model, data, "multiple_choice") == 0.5


def test_centered_accuracy_formula():
    assert centered_accuracy(0.625, 25) == pytest.approx(0.5)
    assert centered_accuracy(0.25, 25) == pytest.approx(0.0)
    assert centered_accuracy(1.0, 62) == pytest.approx(1.0)
    assert centered_accuracy(0.3, 0) == pytest.approx(0.3)
    assert centered_accuracy(0.5, 9.1) == pytest.approx((0.5 - 0.091) / 0.909)
    assert centered_accuracy(0.4, 50) == pytest.approx(-0.2)  # below chance is negative


# -----------------------------------------------------------------------------
# The bundled offline sample

def test_bundled_sample_has_the_22_core_tasks_in_the_real_schema():
    tasks = load_bundle(SAMPLE_BUNDLE_DIR)
    assert {t["label"] for t in tasks} == CORE_LABELS and len(tasks) == 22
    for task in tasks:
        items = load_task_data(task["data_path"], task["task_type"])
        assert len(items) >= task["num_fewshot"] + 1, task["label"]
        if task["task_type"] == "language_modeling":
            assert task["random_baseline"] == 0, task["label"]
        elif task["label"] != "boolq":  # boolq's baseline is its majority answer, 62%
            for item in items:
                options = item.get("choices", item.get("context_options"))
                assert task["random_baseline"] == pytest.approx(100 / len(options), abs=0.1), task["label"]
    by_label = {t["label"]: t for t in tasks}
    assert by_label["arc_easy"]["continuation_delimiter"] == "\nAnswer: "
    assert by_label["hellaswag"]["data_path"] == by_label["hellaswag_zeroshot"]["data_path"]
    assert (by_label["hellaswag"]["num_fewshot"], by_label["hellaswag_zeroshot"]["num_fewshot"]) == (10, 0)


def test_core_over_the_whole_sample():
    model = BigramModel(sequence_len=512)  # all-zero logits: the argmax is token 0, never in any answer
    out = evaluate_core(model, ByteTokenizer(), torch.device("cpu"), SAMPLE_BUNDLE_DIR, max_per_task=4)
    baselines = {t["label"]: t["random_baseline"] for t in load_bundle(SAMPLE_BUNDLE_DIR)}
    assert set(out["results"]) == CORE_LABELS
    for label, acc in out["results"].items():
        assert acc * 4 == round(acc * 4)
        assert out["centered"][label] == pytest.approx(centered_accuracy(acc, baselines[label]))
        if baselines[label] == 0:
            assert acc == 0.0, label
    assert out["core"] == pytest.approx(sum(out["centered"].values()) / 22)


# -----------------------------------------------------------------------------
# Under torch.distributed: rank-strided items, counts summed

def _ddp_worker(rank, world_size, port, data, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results[rank] = accuracy(BigramModel(preferred=[" dog"]), data, "multiple_choice", num_fewshot=2)
    end_rank()


@pytest.mark.slow
def test_ranks_split_the_items_and_agree_on_the_total():
    # 7 items, gold "dog" on 5: rank 0 gets 4 items, rank 1 gets 3; both must report 5/7
    data = [{"query": f"Q{i}:", "choices": ["cat", "dog"], "gold": int(i not in (2, 5))} for i in range(7)]
    single = accuracy(BigramModel(preferred=[" dog"]), data, "multiple_choice", num_fewshot=2)
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, free_port(), data, results), nprocs=2)
    assert single == pytest.approx(5 / 7)
    assert dict(results) == {0: single, 1: single}


# -----------------------------------------------------------------------------
# Download: retries, atomic write, unpack; the sample only on request, the same bundle on every rank

@pytest.fixture
def server():
    """A local HTTP server: /eval_bundle.zip, /notazip.zip (an HTML page), anything else 404."""
    routes = {"eval_bundle.zip": bundle_zip_bytes(), "notazip.zip": b"<html>please log in</html>"}
    with ScriptedServer(routes) as scripted:
        yield scripted


def files_beside_the_bundle(base_dir) -> list[str]:
    return sorted(p.name for p in base_dir.iterdir() if p.name not in ("eval_bundle", "eval_bundle.lock"))


def test_download_unpacks_atomically_and_is_reused(server, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", server.url + "/eval_bundle.zip")
    bundle = download_eval_bundle(tmp_path)
    assert bundle == tmp_path / "eval_bundle" and len(load_bundle(bundle)) == 22
    assert files_beside_the_bundle(tmp_path) == []  # no zip, no temporary file, no unpack staging folder
    assert download_eval_bundle(tmp_path) == bundle and server.hits == ["eval_bundle.zip"]


def test_unreachable_host_retries_then_is_an_error_never_the_sample(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NANOCHAT_TASKS_OFFLINE", raising=False)
    url = unreachable_url("eval_bundle.zip")
    with pytest.raises(EvalBundleUnavailable, match="after 2 attempts.*looks offline"):
        download_eval_bundle(tmp_path, url=url, attempts=2, backoff_s=0.01)
    assert capsys.readouterr().out.count("failed (attempt") == 2
    assert not (tmp_path / "eval_bundle").exists() and files_beside_the_bundle(tmp_path) == []
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", url)
    with pytest.raises(EvalBundleUnavailable, match=r"(?s)looks offline.*scripts\.prefetch.*--bundle=sample"):
        get_eval_bundle(tmp_path, attempts=1)  # a full run's CORE must not quietly become the sample's


def test_the_sample_only_when_offline_is_asked_for_and_a_real_bundle_still_wins(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANOCHAT_TASKS_OFFLINE", "1")
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", unreachable_url("eval_bundle.zip"))
    assert get_eval_bundle(tmp_path, attempts=1) == SAMPLE_BUNDLE_DIR
    assert "not comparable with published CORE" in capsys.readouterr().out
    download_eval_bundle(tmp_path, url=server.url + "/eval_bundle.zip")
    assert get_eval_bundle(tmp_path, attempts=1) == tmp_path / "eval_bundle"


def _bundle_worker(rank, world_size, port, base_dirs, urls, results):
    """Each rank with its own base dir and URL, so that only rank 0's can matter."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NANOCHAT_EVAL_BUNDLE_URL=urls[rank])
    os.environ.pop("NANOCHAT_TASKS_OFFLINE", None)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        results[rank] = ("ok", str(get_eval_bundle(base_dirs[rank], attempts=1)))
    except EvalBundleUnavailable as err:
        results[rank] = ("error", str(err))
    end_rank()


@pytest.mark.slow
def test_every_rank_evaluates_what_rank_0_resolved_or_fails_with_it(server, tmp_path):
    good, bad = server.url + "/eval_bundle.zip", unreachable_url("eval_bundle.zip")
    base_dirs = [str(tmp_path / "rank0"), str(tmp_path / "rank1")]
    results = mp.Manager().dict()
    mp.spawn(_bundle_worker, args=(2, free_port(), base_dirs, [bad, good], results), nprocs=2)
    # rank 1 alone would have downloaded its bundle and gone on to evaluate; it fails with rank 0 instead
    assert results[0][0] == "error" and "looks offline" in results[0][1]
    assert results[1][0] == "error" and results[1][1].startswith("rank 0 could not get the CORE eval bundle")
    assert server.hits == [] and not (tmp_path / "rank1" / "eval_bundle").exists()

    results = mp.Manager().dict()
    mp.spawn(_bundle_worker, args=(2, free_port(), base_dirs, [good, bad], results), nprocs=2)
    assert dict(results) == {0: ("ok", str(tmp_path / "rank0" / "eval_bundle")),
                             1: ("ok", str(tmp_path / "rank0" / "eval_bundle"))}
    assert server.hits == ["eval_bundle.zip"]


def test_http_404_is_not_retried(server, tmp_path):
    started = time.time()
    with pytest.raises(EvalBundleUnavailable, match="HTTP 404"):
        download_eval_bundle(tmp_path, url=server.url + "/missing.zip", attempts=5, backoff_s=5)
    assert server.hits == ["missing.zip"] and time.time() - started < 5


def test_a_page_that_is_not_a_zip_is_an_error_not_a_fallback(server, tmp_path):
    with pytest.raises(ValueError, match="not a zip archive"):
        download_eval_bundle(tmp_path, url=server.url + "/notazip.zip")
    assert server.hits == ["notazip.zip"]  # what the server meant to send: asking again will not help
    assert not (tmp_path / "eval_bundle").exists()
    assert files_beside_the_bundle(tmp_path) == []  # the page never lands as eval_bundle.zip
