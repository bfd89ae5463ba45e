"""Preference pairs: each source's real row schema -> the exact record, ids, splits, drops, files."""

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from functools import partial

import pytest

from nanochat.common import REPO_ROOT
from nanochat.kat.html_text import html_to_text
from nanochat.kat.data import ID_MAP_FILE, STATS_FILE, KatData, write_stats_section
from nanochat.kat.pairs import (SourceYieldedNothing, build_pair_files, escape_tsv, iter_local_rows, pair_id, prompt_id,
                                stack_exchange_split, stream_with_retries, unescape_tsv)

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "kat"
SAMPLES = REPO_ROOT / "nanochat" / "samples" / "kat"
ALL = ("hh-rlhf", "ultrafeedback", "stack-exchange")


def build(out_dir, local_dir=FIXTURES, sources=ALL, **kwargs):
    return build_pair_files(sources, partial(iter_local_rows, local_dir), out_dir, **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    stats = build(out)
    pairs = KatData(out).pairs()
    return out, stats, pairs, KatData(out).prompts()


def pairs_for(pairs, first_user_message):
    return [p for p in pairs if p["prefix"]["messages"][0]["content"] == first_user_message]


def expected(messages, chosen, rejected, src, split):
    pid = prompt_id(messages)
    return {"id": pair_id(pid, chosen, rejected), "prompt_id": pid, "prefix": {"messages": messages},
            "chosen": chosen, "rejected": rejected, "src": src, "split": split}


def test_hh_multi_turn_row_keeps_its_newlines_and_shared_turns(built):
    _, _, pairs, _ = built
    messages = [
        {"role": "user", "content": "How do I keep fresh basil from wilting?"},
        {"role": "assistant", "content": "Treat it like cut flowers.\n\n1. Trim the stems.\n2. Stand them in a glass of water."},
        {"role": "user", "content": "Should the glass go in the fridge?\nMine is quite cold."},
    ]
    assert pairs_for(pairs, messages[0]["content"]) == [expected(
        messages, "No. Basil blackens below about 10 °C, so keep the glass on the counter.\nChange the water every day.",
        "Yes, the fridge is best for everything.", "hh-rlhf", "train")]


def test_normalisation_nfc_crlf_trailing_space_gives_one_prompt_across_sources(built):
    _, stats, pairs, prompts = built
    café = pairs_for(pairs, "Where does the word caf\u00e9 come from?")  # the HH row spells it with a combining accent
    assert [(p["src"], p["chosen"], p["rejected"]) for p in café] == [
        ("hh-rlhf", "From French, via the Turkish kahve.", "No idea."),
        ("ultrafeedback", "It comes from French café, from Italian caffè, from Turkish kahve.", "From cafeterias.")]
    assert café[0]["prompt_id"] == café[1]["prompt_id"]
    prompt = next(p for p in prompts if p["id"] == café[0]["prompt_id"])
    assert (prompt["src"], prompt["n_pairs"], prompt["split"]) == ("hh-rlhf", 2, "train")
    assert stats.dropped_pairs["hh-rlhf", "duplicate_pair"] == 1  # the same row repeated


def test_hh_rows_diverging_before_the_last_turn_are_skipped_and_counted(built):
    _, stats, pairs, _ = built
    assert pairs_for(pairs, "Name a planet.") == []
    assert stats.dropped_rows["hh-rlhf", "diverge_before_last_turn"] == 1
    assert "hh-rlhf_train.jsonl:2" in stats.examples["hh-rlhf", "diverge_before_last_turn"]


def test_ultrafeedback_message_lists_parse_to_exact_records(built):
    _, _, pairs, _ = built
    assert pairs_for(pairs, "Write a haiku about rain.") == [expected(
        [{"role": "user", "content": "Write a haiku about rain."}],
        "Soft rain on the roof\nthe gutters hum a low song\nthe garden drinks deep", "Rain is wet.", "ultrafeedback", "train")]
    multi_turn = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "And times 3?"}]
    assert pairs_for(pairs, "What is 2+2?") == [expected(multi_turn, "12", "7", "ultrafeedback", "train")]
    assert pairs_for(pairs, "Give me a synonym for happy.")[0]["split"] == "test"


def test_stack_exchange_pairs_come_from_scores_with_ties_skipped(built):
    _, _, pairs, _ = built
    question = "How do I reverse a list in Python & keep the original?\n\nxs = [1, 2, 3]"
    best = "Use slicing:\n\nys = xs[::-1]\n\nIt makes a new list."
    reversed_answer = "Call reversed(xs) and wrap it in list()."
    copy_answer = "- copy it\n- then call .reverse()"
    worst = "You can't."
    split = stack_exchange_split({"qid": 101}, 0.01)
    # scores 5, 3, 3, 0: the 3-3 tie gives no pair; largest gaps first, at most 3 per question
    assert pairs_for(pairs, question) == [
        expected([{"role": "user", "content": question}], chosen, rejected, "stack-exchange", split)
        for chosen, rejected in ((best, worst), (reversed_answer, worst), (copy_answer, worst))]
    stash = pairs_for(pairs, "What does git stash do?")
    assert [(p["chosen"], p["rejected"]) for p in stash] == [(
        "It saves your uncommitted changes on a stack and cleans the working tree;\ngit stash pop brings them back.",
        "It hides changes.")]


def test_html_to_text_keeps_code_and_paragraphs_and_unescapes():
    html = ("<p>Use <code>a &lt; b</code>   here.</p><pre><code>for i in range(3):\n    print(i)\n</code></pre>"
            "<p>Line<br>break &amp; more</p><ol><li>one</li><li>two</li></ol><script>x()</script><p>end</p>")
    assert html_to_text(html) == ("Use a < b here.\n\nfor i in range(3):\n    print(i)\n\nLine\nbreak & more\n\n"
                                  "- one\n- two\n\nend")


def test_malformed_rows_are_counted_by_reason_not_fatal(built):
    _, stats, _, _ = built
    assert stats.dropped_rows == Counter({
        ("hh-rlhf", "diverge_before_last_turn"): 1, ("hh-rlhf", "missing_field"): 1, ("hh-rlhf", "invalid_json"): 1,
        ("hh-rlhf", "chosen_equals_rejected"): 1, ("hh-rlhf", "bad_turn_order"): 1, ("hh-rlhf", "text_before_first_turn"): 1,
        ("ultrafeedback", "tied_scores"): 1, ("ultrafeedback", "wrong_type"): 1,
        ("stack-exchange", "all_answers_tied"): 1, ("stack-exchange", "too_few_answers"): 1,
        ("stack-exchange", "missing_field"): 1})
    assert stats.rows_read == Counter({"hh-rlhf": 12, "ultrafeedback": 6, "stack-exchange": 5})


def test_a_source_that_yields_nothing_fails_naming_it(tmp_path):
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "stack-exchange.jsonl").write_text('{"qid": 1, "question": "<p>q</p>", "answers": []}\nnot json\n')
    with pytest.raises(SourceYieldedNothing, match="'stack-exchange'.*too_few_answers"):
        build(tmp_path / "out", local_dir=bad, sources=["stack-exchange"])
    assert list((tmp_path / "out").iterdir()) == []  # nothing half-written, no scratch files left


def test_a_missing_local_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ultrafeedback_test_prefs.jsonl"):
        build(tmp_path, local_dir=tmp_path, sources=["ultrafeedback"])


def test_train_and_test_never_share_a_prompt_and_test_wins(built):
    _, stats, pairs, prompts = built
    train = {p["prompt_id"] for p in pairs if p["split"] == "train"}
    test = {p["prompt_id"] for p in pairs if p["split"] == "test"}
    assert train and test and not train & test
    australia = pairs_for(pairs, "What is the capital of Australia?")
    assert [(p["split"], p["chosen"]) for p in australia] == [("test", "Canberra, not Sydney.")]
    assert stats.dropped_pairs["hh-rlhf", "train_test_overlap"] == 1
    assert {p["id"]: p["split"] for p in prompts}[australia[0]["prompt_id"]] == "test"


def test_output_files_agree_with_each_other(built):
    out, stats, pairs, prompts = built
    assert len({p["id"] for p in pairs}) == len(pairs)
    for pair in pairs:
        assert list(pair) == ["id", "prompt_id", "prefix", "chosen", "rejected", "src", "split"]
        assert pair["prompt_id"] == prompt_id(pair["prefix"]["messages"])
        assert pair["prefix"]["messages"][-1]["role"] == "user"
    assert [list(p) for p in prompts] == [["id", "prefix", "src", "n_pairs", "split"]] * len(prompts)
    assert Counter(p["prompt_id"] for p in pairs) == {p["id"]: p["n_pairs"] for p in prompts}
    tsv = (out / ID_MAP_FILE).read_text(encoding="utf-8").splitlines()
    assert [line.split("\t") for line in tsv] == [[p["id"], escape_tsv(p["prefix"]["messages"][0]["content"])] for p in prompts]
    assert sum(stats.pairs.values()) == len(pairs) and sum(stats.prompts.values()) == len(prompts)
    text = (out / STATS_FILE).read_text(encoding="utf-8")
    assert f"unique prompts: {len(prompts)}" in text and "diverge_before_last_turn" in text
    assert not [p for p in out.iterdir() if p.suffix in (".tmp", ".partial")]


def test_prompt_id_is_blake2b_of_canonical_normalised_json():
    canonical = '[{"content":"Caf\u00e9\\nmenu?","role":"user"}]'
    want = hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).hexdigest()
    assert prompt_id([{"role": "user", "content": "Cafe\u0301\r\nmenu?  \n"}]) == want
    assert len(want) == 16


@pytest.mark.slow
def test_prompt_ids_are_the_same_in_another_process():
    messages = [[{"role": "user", "content": "Hello there"}],
                [{"role": "user", "content": "ñ"}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]]
    code = ("import json, sys; from nanochat.kat.pairs import prompt_id; "
            "print(json.dumps([prompt_id(m) for m in json.loads(sys.argv[1])]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", code, json.dumps(messages)], capture_output=True, text=True,
                            cwd=REPO_ROOT, env=env, check=True)
    assert json.loads(result.stdout) == [prompt_id(m) for m in messages]


def test_max_pairs_caps_each_split_and_leaves_test_fed(tmp_path):
    stats = build(tmp_path, sources=["hh-rlhf"], max_pairs=1)
    assert dict(stats.pairs) == {("hh-rlhf", "test"): 1, ("hh-rlhf", "train"): 1}


def hh_stream_by_subset(subsets=("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"),
                        per_subset=50):
    """An HH-RLHF-like source stored as the real one is: its train split is the subsets one after another."""
    def hh_row(question):
        return {"chosen": f"\n\nHuman: {question}\n\nAssistant: A kind answer.",
                "rejected": f"\n\nHuman: {question}\n\nAssistant: A curt answer."}

    def rows_for_source(source):
        assert source == "hh-rlhf"
        for i in range(5):
            yield "test", f"test:{i}", hh_row(f"[test] held-out question {i}")
        for subset in subsets:
            for i in range(per_subset):
                yield "train", f"{subset}:{i}", hh_row(f"[{subset}] question {i}")
    return rows_for_source


def subset_of(pair):
    return pair["prefix"]["messages"][0]["content"].split("]")[0][1:]


def test_a_capped_split_is_a_hash_sample_from_every_subset_not_the_head_of_the_stream(tmp_path):
    rows_for_source = hh_stream_by_subset()
    stats = build_pair_files(["hh-rlhf"], rows_for_source, tmp_path / "capped", max_pairs=40)
    train = KatData(tmp_path / "capped").pairs("train")
    assert len(train) == 40 and stats.pairs["hh-rlhf", "test"] == 5
    # the head of the stream would be 40 harmless-base rows; the sample has every subset
    counts = Counter(subset_of(p) for p in train)
    assert set(counts) == {"harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"}
    assert min(counts.values()) >= 4
    # it is exactly the 40 smallest prompt ids of the whole split, kept in stream order
    build_pair_files(["hh-rlhf"], rows_for_source, tmp_path / "all")
    everything = KatData(tmp_path / "all").pairs("train")
    assert sorted(p["prompt_id"] for p in train) == sorted(p["prompt_id"] for p in everything)[:40]
    assert [p["id"] for p in train] == [p["id"] for p in everything if p["id"] in {q["id"] for q in train}]
    # the same sample whatever order the stream is stored in
    reordered = hh_stream_by_subset(subsets=("helpful-rejection-sampled", "helpful-online", "helpful-base", "harmless-base"))
    build_pair_files(["hh-rlhf"], reordered, tmp_path / "reordered", max_pairs=40)
    assert sorted(p["id"] for p in KatData(tmp_path / "reordered").pairs("train")) == sorted(p["id"] for p in train)
    text = (tmp_path / "capped" / STATS_FILE).read_text()
    assert re.search(r"hh-rlhf +train +40 pairs kept of 200 read \(the stream was read to its end\)", text)


def test_a_capped_stack_exchange_stream_stops_after_its_scan_and_samples_all_of_it(tmp_path):
    def rows_for_source(source):  # stored site after site, 30 questions each, one pair per question
        for site in range(10):
            for i in range(30):
                qid = site * 1000 + i
                yield None, f"site{site}:{i}", {"qid": qid, "question": f"<p>[site{site}] question {qid}?</p>",
                                               "answers": [{"pm_score": 3, "text": "<p>Good.</p>"},
                                                           {"pm_score": 0, "text": "<p>Bad.</p>"}]}

    stats = build_pair_files(["stack-exchange"], rows_for_source, tmp_path, max_pairs=20, se_test_fraction=0.0,
                             scan_factor=5)
    pairs = KatData(tmp_path).pairs()
    assert len(pairs) == 20 and stats.rows_read["stack-exchange"] == 100  # the scan: 5 x 20 pairs, then it stopped
    sites = Counter(int(subset_of(p)[4:]) for p in pairs)
    assert set(sites) == {0, 1, 2, 3}  # spread over the scanned sites 0..3, not the first 20 rows of site 0
    assert re.search(r"stack-exchange +train +20 pairs kept of 100 read \(reading stopped at the scan limit",
                     (tmp_path / STATS_FILE).read_text())
    # scan_factor 0 reads the whole stream: every site can be drawn
    stats = build_pair_files(["stack-exchange"], rows_for_source, tmp_path, max_pairs=20, se_test_fraction=0.0,
                             scan_factor=0)
    assert stats.rows_read["stack-exchange"] == 300 and not stats.stream_cut
    assert len({subset_of(p) for p in KatData(tmp_path).pairs()}) >= 6


def test_a_capped_sample_still_drops_repeated_pairs_once(tmp_path):
    rows = [("train", f"row{i}", {"chosen": f"\n\nHuman: q{i % 7}\n\nAssistant: yes", "rejected": f"\n\nHuman: q{i % 7}\n\nAssistant: no"})
            for i in range(21)]  # 7 pairs, each three times
    stats = build_pair_files(["hh-rlhf"], lambda source: iter(rows), tmp_path, max_pairs=5)
    pairs = KatData(tmp_path).pairs()
    assert len(pairs) == len({p["id"] for p in pairs}) == 5
    uncapped = build_pair_files(["hh-rlhf"], lambda source: iter(rows), tmp_path / "all")
    assert uncapped.dropped_pairs["hh-rlhf", "duplicate_pair"] == 14 and stats.dropped_pairs["hh-rlhf", "duplicate_pair"] >= 10


def test_stack_exchange_split_is_stable_and_holds_out_about_one_percent():
    splits = [stack_exchange_split({"qid": qid}, 0.01) for qid in range(20000)]
    assert splits == [stack_exchange_split({"qid": qid}, 0.01) for qid in range(20000)]
    n_test = splits.count("test")
    assert abs(n_test - 200) < 4 * (20000 * 0.01 * 0.99) ** 0.5  # within 4 sigma of 1%


def test_stream_with_retries_resumes_without_repeating_rows():
    rows, opened, naps = list(range(10)), [], []

    def open_stream():
        opened.append(1)
        for row in rows:
            if len(opened) == 1 and row == 4:
                raise ConnectionError("reset by peer")
            yield row

    assert list(stream_with_retries(open_stream, "test stream", sleep=naps.append)) == rows
    assert len(opened) == 2 and naps == [2.0]

    def always_down():
        raise TimeoutError("down")
        yield

    with pytest.raises(RuntimeError, match="gave up after 3 attempts"):
        list(stream_with_retries(always_down, "test stream", attempts=3, sleep=naps.append))

    def not_found():
        raise FileNotFoundError("no such dataset")
        yield

    with pytest.raises(FileNotFoundError):
        list(stream_with_retries(not_found, "test stream", sleep=naps.append))


def test_write_stats_section_replaces_only_its_own_section(tmp_path):
    path = tmp_path / STATS_FILE
    write_stats_section(path, "kat_pairs", "pairs: 3")
    write_stats_section(path, "kat_density", "ess: 1.0")
    write_stats_section(path, "kat_density", "ess: 2.0")
    assert path.read_text() == "=== kat_pairs ===\npairs: 3\n\n=== kat_density ===\ness: 2.0\n"


def test_tsv_escaping_round_trips():
    text = "tab\there\nnew line \\n literal\r"
    assert "\t" not in escape_tsv(text) and "\n" not in escape_tsv(text)
    assert unescape_tsv(escape_tsv(text)) == text


def test_script_runs_offline_with_only(tmp_path):
    from scripts.kat_pairs import main
    main([f"--local_dir={FIXTURES}", f"--out_dir={tmp_path}", "--only=ultrafeedback"])
    assert {p["src"] for p in KatData(tmp_path).pairs()} == {"ultrafeedback"}


def test_tiny_preset_samples_build_a_varied_set(tmp_path):
    stats = build(tmp_path, local_dir=SAMPLES, se_test_fraction=0.1)
    assert 300 <= sum(stats.pairs.values()) <= 600
    for source in ALL:
        assert stats.pairs[source, "train"] >= 50 and stats.pairs[source, "test"] >= 1
    assert stats.dropped_rows["hh-rlhf", "diverge_before_last_turn"] >= 1
    assert stats.dropped_pairs["hh-rlhf", "train_test_overlap"] >= 1
