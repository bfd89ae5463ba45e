"""
Preference pairs for the KAT experiment: three sources in one schema (SPEC section 4), written by
scripts.kat_pairs into the data folder (nanochat/kat/data.py reads them back).

    pair:   {"id", "prompt_id", "prefix": {"messages": [...]}, "chosen", "rejected", "src", "split"}
    prompt: {"id", "prefix", "src", "n_pairs", "split"}

    stats = build_pair_files(SOURCES, partial(iter_local_rows, "nanochat/samples/kat"), out_dir)

Ids are stable hashes of the normalised text, the same on every machine. A malformed row is
skipped and counted by reason in stats.txt; a source that yields no pair, or a local file with no
row, fails the run. Test wins: a prompt with any test pair is a test prompt. A cap (max_pairs)
keeps a sample chosen by prompt-id hash, never the head of a stream (see _hash_sample).
"""

import hashlib
import heapq
import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from nanochat.common import get_base_dir, progress_bar
from nanochat.kat.data import ID_MAP_FILE, PAIRS_FILE, PROMPTS_FILE, SPLITS, STATS_FILE, iter_jsonl, stats_section
from nanochat.kat.html_text import html_to_text

SOURCES = ("hh-rlhf", "ultrafeedback", "stack-exchange")


# -----------------------------------------------------------------------------
# Normalisation and ids

# Every stored text is NFC, with CRLF/CR as LF and no trailing whitespace, so an id can be
# recomputed from the stored record.
def normalise_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return text.rstrip()


def normalise_messages(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": normalise_text(m["content"])} for m in messages]


# blake2b (8 bytes, 16 hex) of canonical JSON: sorted keys, no spaces, UTF-8, non-ASCII unescaped.
# Never Python's hash(), which is salted per process.
def _stable_digest(obj) -> str:
    canonical = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).hexdigest()


def prompt_id(messages: list[dict]) -> str:
    """Stable id of a prompt prefix: the same prompt gets the same id on every machine."""
    return _stable_digest(normalise_messages(messages))


def pair_id(prompt: str, chosen: str, rejected: str) -> str:  # a pair repeated in a split is kept once
    return _stable_digest({"prompt_id": prompt, "chosen": normalise_text(chosen), "rejected": normalise_text(rejected)})


def first_user_message(prefix: dict) -> str:
    return next(m["content"] for m in prefix["messages"] if m["role"] == "user")


def escape_tsv(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def unescape_tsv(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"t": "\t", "n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), text)


# -----------------------------------------------------------------------------
# Parsing one row of each source into (prefix messages, chosen, rejected) triples

class MalformedRow(ValueError):  # skipped and counted, never a silent fix
    """A row that cannot become a pair; `reason` is the counter key in stats.txt."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _field(row, name: str, kind):
    if not isinstance(row, dict):
        raise MalformedRow("wrong_type", f"row is a {type(row).__name__}, not an object")
    if name not in row or row[name] is None:
        raise MalformedRow("missing_field", f"no {name!r}")
    value = row[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):  # JSON true is no score
        raise MalformedRow("wrong_type", f"{name!r} is a {type(value).__name__}")
    return value


def check_prefix(messages: list[dict]):
    """A prefix alternates user/assistant, starts and ends with a user turn, and has no empty turn."""
    roles = [m["role"] for m in messages]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
    if not roles or roles != expected or roles[-1] != "user":
        raise MalformedRow("bad_turn_order", f"prefix roles {roles}")
    if any(not m["content"] for m in messages):
        raise MalformedRow("empty_turn", "a prefix turn is empty")


def _check_responses(chosen: str, rejected: str):
    if not chosen or not rejected:
        raise MalformedRow("empty_response", "chosen or rejected is empty")
    if chosen == rejected:
        raise MalformedRow("chosen_equals_rejected")


_HH_SPEAKER = re.compile(r"\n\n(Human|Assistant):")


def split_hh_transcript(text: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages; newlines inside a turn are kept."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    pieces = _HH_SPEAKER.split("\n\n" + text.lstrip())  # a few rows lack the leading blank line
    if pieces[0].strip():
        raise MalformedRow("text_before_first_turn", repr(pieces[0].strip()[:60]))
    return [{"role": "user" if speaker == "Human" else "assistant", "content": normalise_text(content.lstrip())}
            for speaker, content in zip(pieces[1::2], pieces[2::2])]


def parse_hh_row(row) -> list[tuple[list[dict], str, str]]:
    transcripts = [split_hh_transcript(_field(row, name, str)) for name in ("chosen", "rejected")]
    for turns in transcripts:
        roles = [m["role"] for m in turns]
        if len(turns) < 2 or roles != ["user", "assistant"] * (len(turns) // 2):
            raise MalformedRow("bad_turn_order", f"transcript roles {roles}")
    chosen_turns, rejected_turns = transcripts
    # The annotator judged the whole divergent continuation: cutting it back to a shared prefix would
    # attach the label to turns it was not given for, so such rows are skipped.
    if chosen_turns[:-1] != rejected_turns[:-1]:
        shared = next(i for i, (a, b) in enumerate(zip(chosen_turns + [None], rejected_turns + [None])) if a != b)
        raise MalformedRow("diverge_before_last_turn", f"transcripts differ at turn {shared}")
    return _last_turn_pair(chosen_turns, rejected_turns)


def _last_turn_pair(chosen_turns: list[dict], rejected_turns: list[dict]) -> list[tuple[list[dict], str, str]]:
    """The shared turns as the prefix and the two last (assistant) turns as chosen and rejected."""
    prefix = chosen_turns[:-1]
    check_prefix(prefix)
    chosen, rejected = chosen_turns[-1]["content"], rejected_turns[-1]["content"]
    _check_responses(chosen, rejected)
    return [(prefix, chosen, rejected)]


def _message_list(row, name: str) -> list[dict]:
    messages = _field(row, name, list)
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise MalformedRow("wrong_type", f"{name!r} holds an entry that is not {{role: str, content: str}}")
    return normalise_messages(messages)


def parse_ultrafeedback_row(row) -> list[tuple[list[dict], str, str]]:
    chosen_msgs, rejected_msgs = _message_list(row, "chosen"), _message_list(row, "rejected")
    for messages in (chosen_msgs, rejected_msgs):
        if not messages or messages[-1]["role"] != "assistant":
            raise MalformedRow("bad_turn_order", "a message list does not end with an assistant turn")
    if chosen_msgs[:-1] != rejected_msgs[:-1]:
        raise MalformedRow("diverge_before_last_turn", "chosen and rejected have different prompts")
    score_chosen, score_rejected = _field(row, "score_chosen", (int, float)), _field(row, "score_rejected", (int, float))
    if score_chosen == score_rejected:
        raise MalformedRow("tied_scores", f"both scored {score_chosen}")
    if score_chosen < score_rejected:
        raise MalformedRow("chosen_scored_lower", f"{score_chosen} < {score_rejected}")
    return _last_turn_pair(chosen_msgs, rejected_msgs)


# Every pair of answers with different pm_score (ties skipped), largest score gap first (the
# clearest votes), at most pairs_per_question.
def parse_stack_exchange_row(row, pairs_per_question: int = 3) -> list[tuple[list[dict], str, str]]:
    question = normalise_text(html_to_text(_field(row, "question", str)))
    if not question:
        raise MalformedRow("empty_turn", "the question has no text")
    answers = []
    for position, answer in enumerate(_field(row, "answers", list)):
        score = _field(answer, "pm_score", int)
        text = normalise_text(html_to_text(_field(answer, "text", str)))
        if text:
            answers.append((score, position, text))
    if len(answers) < 2:
        raise MalformedRow("too_few_answers", f"{len(answers)} answers with text")
    ranked = [(better, worse) for better in answers for worse in answers
              if better[0] > worse[0] and better[2] != worse[2]]
    if not ranked:
        raise MalformedRow("all_answers_tied", f"scores {[a[0] for a in answers]}")
    ranked.sort(key=lambda p: (p[1][0] - p[0][0], p[0][1], p[1][1]))  # largest gap first, then page order
    prefix = [{"role": "user", "content": question}]
    return [(prefix, better[2], worse[2]) for better, worse in ranked[:pairs_per_question]]


def stack_exchange_split(row, test_fraction: float) -> str:
    """test for a stable `test_fraction` of questions, chosen by a hash of the qid."""
    qid = _field(row, "qid", (int, str))
    bucket = int(hashlib.blake2b(f"stack-exchange:{qid}".encode(), digest_size=8).hexdigest(), 16) % 1_000_000
    return "test" if bucket < test_fraction * 1_000_000 else "train"


# -----------------------------------------------------------------------------
# Where rows come from: local JSONL files in the HF row schema, or the HF hub (streamed)

# split None: the source has one stream and the split is decided per row (Stack Exchange).
# Test splits come first: a capped source stops reading when its train scan is full.
LOCAL_FILES = {
    "hh-rlhf": {"test": "hh-rlhf_test.jsonl", "train": "hh-rlhf_train.jsonl"},
    "ultrafeedback": {"test": "ultrafeedback_test_prefs.jsonl", "train": "ultrafeedback_train_prefs.jsonl"},
    "stack-exchange": {None: "stack-exchange.jsonl"},
}
HF_DATASETS = {
    "hh-rlhf": ("Anthropic/hh-rlhf", {"test": "test", "train": "train"}),
    "ultrafeedback": ("HuggingFaceH4/ultrafeedback_binarized", {"test": "test_prefs", "train": "train_prefs"}),
    "stack-exchange": ("HuggingFaceH4/stack-exchange-preferences", {None: "train"}),
}

RowStream = Iterator[tuple[str | None, str, object]]  # (split or None, location for messages, row)


def iter_jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    """(location, row) per line, read lazily; a line that is not JSON comes back as a MalformedRow."""
    for line_number, row in iter_jsonl(path):
        if isinstance(row, json.JSONDecodeError):
            row = MalformedRow("invalid_json", str(row))
        yield f"{path.name}:{line_number}", row


class EmptySourceFile(ValueError):
    pass


def iter_local_rows(local_dir: Path, source: str) -> RowStream:
    for split, name in LOCAL_FILES[source].items():
        path = Path(local_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{source}: expected {path} (--local_dir holds {', '.join(sorted(LOCAL_FILES[source].values()))} "
                                    f"for this source; pass --only to leave the source out)")
        rows = 0
        for location, row in iter_jsonl_rows(path):
            rows += 1
            yield split, location, row
        if rows == 0:  # an empty file would leave its split without pairs and say so nowhere
            raise EmptySourceFile(f"{source}: {path} holds no rows; fill it with JSON rows in the source's Hugging "
                                  "Face schema, or pass --only to leave the source out")


_PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def stream_with_retries(open_stream: Callable[[], Iterable], what: str, attempts: int = 5, backoff_s: float = 2.0,
                        sleep=None) -> Iterator:
    """Iterate a network stream; on a connection error reopen it and skip the rows already yielded."""
    import time
    sleep = sleep or time.sleep
    yielded = 0
    for attempt in range(1, attempts + 1):
        try:
            for position, row in enumerate(open_stream()):
                if position >= yielded:
                    yielded += 1
                    yield row
            return
        except _PERMANENT_ERRORS:
            raise
        except (OSError, TimeoutError) as err:
            if attempt == attempts:
                raise RuntimeError(f"{what}: gave up after {attempts} attempts ({yielded} rows read): {err}") from err
            print(f"{what}: {type(err).__name__} after {yielded} rows ({err}); retry {attempt}/{attempts - 1}", flush=True)
            sleep(backoff_s * 2 ** (attempt - 1))


def prefetched_rows_path(source: str, split: str | None) -> Path:
    """Where scripts.prefetch keeps its local copy of a split of the hub (HH-RLHF, UltraFeedback; not Stack Exchange)."""
    return get_base_dir() / "pref_data" / LOCAL_FILES[source][split]


def iter_hf_rows(source: str) -> RowStream:
    """
    A source from the HF hub: each split from scripts.prefetch's local copy when there is one (so this
    stage needs no network for it), else streamed (needs `datasets`); never loads a dataset whole.
    """
    name, splits = HF_DATASETS[source]
    for split, hf_split in splits.items():
        local = prefetched_rows_path(source, split)
        if local.is_file():
            located = iter_jsonl_rows(local)
        else:
            from datasets import load_dataset
            what = f"{name}[{hf_split}]"
            rows = stream_with_retries(lambda s=hf_split: load_dataset(name, split=s, streaming=True), what)
            located = ((f"{what} row {index}", row) for index, row in enumerate(rows))
        for location, row in progress_bar(located, desc=f"{source} {split or 'rows'}", unit=" rows"):
            yield split, location, row


# -----------------------------------------------------------------------------
# Building the four output files

@dataclass
class PairStats:
    rows_read: Counter = field(default_factory=Counter)       # source -> rows streamed
    pairs: Counter = field(default_factory=Counter)           # (source, split) -> pairs written
    prompts: Counter = field(default_factory=Counter)         # (source, split) -> prompts written
    dropped_rows: Counter = field(default_factory=Counter)    # (source, reason) -> rows
    dropped_pairs: Counter = field(default_factory=Counter)   # (source, reason) -> pairs
    examples: dict = field(default_factory=dict)              # (source, reason) -> first location and detail
    scanned: Counter = field(default_factory=Counter)         # (source, split) -> pairs read under a cap
    stream_cut: set = field(default_factory=set)              # sources whose reading stopped at the scan limit

    def drop_row(self, source: str, location: str, err: MalformedRow):
        self.dropped_rows[source, err.reason] += 1
        self.examples.setdefault((source, err.reason), f"{location}: {err.detail}" if err.detail else location)


class SourceYieldedNothing(RuntimeError):
    pass


def _require_pairs(source: str, stats: PairStats, n_pairs: int):
    if n_pairs == 0:
        reasons = {reason: n for (src, reason), n in (stats.dropped_rows + stats.dropped_pairs).items() if src == source}
        raise SourceYieldedNothing(f"source {source!r} yielded no pairs ({stats.rows_read[source]} rows read; dropped: "
                                   f"{reasons or 'none'}); check its input files or leave it out with --only")


def _parse_row(source: str, row, pairs_per_question: int):
    if source == "hh-rlhf":
        return parse_hh_row(row)
    if source == "ultrafeedback":
        return parse_ultrafeedback_row(row)
    return parse_stack_exchange_row(row, pairs_per_question)


def _source_pairs(source: str, rows: RowStream, stats: PairStats, se_pairs_per_question: int,
                  se_test_fraction: float, scan_limit: int = 0) -> Iterator[dict]:
    """Every pair record of a source in stream order; with scan_limit, at most that many per split."""
    scanned = Counter()
    for split, location, row in rows:
        if scan_limit and scanned["train"] >= scan_limit:
            stats.stream_cut.add(source)
            return
        stats.rows_read[source] += 1
        try:
            if isinstance(row, MalformedRow):
                raise row
            split = split or stack_exchange_split(row, se_test_fraction)
            if scan_limit and scanned[split] >= scan_limit:
                continue
            triples = _parse_row(source, row, se_pairs_per_question)
        except MalformedRow as err:
            stats.drop_row(source, location, err)
            continue
        for messages, chosen, rejected in triples:
            pid = prompt_id(messages)
            scanned[split] += 1
            yield {"id": pair_id(pid, chosen, rejected), "prompt_id": pid, "prefix": {"messages": messages},
                   "chosen": chosen, "rejected": rejected, "src": source, "split": split}


def _hash_sample(records: Iterable[dict], max_pairs: int, stats: PairStats) -> list[dict]:
    """
    Per split, the max_pairs records with the smallest (prompt id, pair id), returned in stream
    order. Holds at most max_pairs records per split.
    """
    # The streams are stored in an order (HH-RLHF train by subset, Stack Exchange by site), so their
    # first N rows would be one subset or one site. Ids are hashes: the smallest ones are a uniform
    # pseudo-random sample of prompts, the same in every stream order, and a prompt keeps all its
    # pairs (except at most one prompt at the cut). Stack Exchange (10M+ questions) is read only up
    # to scan_factor x max_pairs pairs, so its sample still comes from the sites stored first;
    # stats.txt says for each capped split how much was read and whether the stream ran out.
    heaps, held = {}, {}  # split -> max-heap of (-prompt rank, -pair rank, stream position, record); its pair ids
    for position, record in enumerate(records):
        split, source = record["split"], record["src"]
        stats.scanned[source, split] += 1
        heap, ids = heaps.setdefault(split, []), held.setdefault(split, set())
        # A repeated pair has the same key as its first copy: if that copy is held, drop the repeat as
        # uncapped reading would; if it was pushed out, the repeat ranks too low to get in either.
        if record["id"] in ids:
            stats.dropped_pairs[source, "duplicate_pair"] += 1
            continue
        item = (-int(record["prompt_id"], 16), -int(record["id"], 16), position, record)
        if len(heap) < max_pairs:
            heapq.heappush(heap, item)
        elif item[:2] > heap[0][:2]:
            ids.discard(heapq.heapreplace(heap, item)[3]["id"])
        else:
            continue
        ids.add(record["id"])
    kept = sorted((item for heap in heaps.values() for item in heap), key=lambda item: item[2])
    return [item[3] for item in kept]


def _read_sources(sources, rows_for_source, scratch: Path, stats: PairStats, max_pairs: int,
                  se_pairs_per_question: int, se_test_fraction: float, scan_factor: int) -> dict:
    """Pass 1: parse the rows, write the kept pairs to `scratch`; return each prompt's prefix and splits."""
    prompts, seen = {}, set()
    with open(scratch, "w", encoding="utf-8") as f:
        for source in sources:
            records = _source_pairs(source, rows_for_source(source), stats, se_pairs_per_question, se_test_fraction,
                                    scan_limit=scan_factor * max_pairs)
            if max_pairs:
                records = _hash_sample(records, max_pairs, stats)
            kept = 0
            for record in records:
                key = (record["id"], record["split"])
                if key in seen:
                    stats.dropped_pairs[source, "duplicate_pair"] += 1
                    continue
                seen.add(key)
                prompt = prompts.setdefault(record["prompt_id"], {"prefix": record["prefix"], "splits": set()})
                prompt["splits"].add(record["split"])
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                kept += 1
            _require_pairs(source, stats, kept)
    return prompts


def _write_outputs(sources, scratch: Path, prompts: dict, out_dir: Path, stats: PairStats, tmp: dict[str, Path]):
    """Pass 2: test wins; count pairs per prompt, name each prompt's source by its first kept pair."""
    # A prompt with any test pair is a test prompt and its train pairs are dropped, across sources
    # too, so the two splits never share a prompt.
    test_ids = {pid for pid, p in prompts.items() if "test" in p["splits"]}
    with open(scratch, encoding="utf-8") as f, open(tmp[PAIRS_FILE], "w", encoding="utf-8") as out:
        for line in f:
            pair = json.loads(line)
            if pair["split"] == "train" and pair["prompt_id"] in test_ids:
                stats.dropped_pairs[pair["src"], "train_test_overlap"] += 1
                continue
            out.write(line)
            prompt = prompts[pair["prompt_id"]]
            prompt.setdefault("src", pair["src"])
            prompt["n_pairs"] = prompt.get("n_pairs", 0) + 1
            stats.pairs[pair["src"], pair["split"]] += 1
    for source in sources:
        _require_pairs(source, stats, sum(n for (src, _), n in stats.pairs.items() if src == source))

    # Every prompt kept a pair: the first occurrence of each (pair, split) was written, and a test
    # prompt's test pairs are never dropped.
    with open(tmp[PROMPTS_FILE], "w", encoding="utf-8") as out_prompts, open(tmp[ID_MAP_FILE], "w", encoding="utf-8") as out_tsv:
        for pid, prompt in prompts.items():
            split = "test" if pid in test_ids else "train"
            record = {"id": pid, "prefix": prompt["prefix"], "src": prompt["src"], "n_pairs": prompt["n_pairs"], "split": split}
            out_prompts.write(json.dumps(record, ensure_ascii=False) + "\n")
            out_tsv.write(f"{pid}\t{escape_tsv(first_user_message(prompt['prefix']))}\n")
            stats.prompts[prompt["src"], split] += 1
    # a fresh stats.txt: a density section from an earlier run described other data
    tmp[STATS_FILE].write_text(stats_section("kat_pairs", format_pair_stats(stats)), encoding="utf-8")


def build_pair_files(sources: Iterable[str], rows_for_source: Callable[[str], RowStream], out_dir: Path,
                     max_pairs: int = 0, se_pairs_per_question: int = 3, se_test_fraction: float = 0.01,
                     scan_factor: int = 10) -> PairStats:
    """
    Read each source and write pairs_all.jsonl, prompts_all.jsonl, prompt_id_map.tsv and stats.txt
    into out_dir, all or nothing. max_pairs caps the pairs kept per source and split (0: no cap)
    with a hash-chosen sample of the first scan_factor x max_pairs pairs of each split (scan_factor
    0: of every pair); see _hash_sample.
    """
    if max_pairs < 0 or scan_factor < 0:
        raise ValueError(f"need max_pairs >= 0 and scan_factor >= 0, got {max_pairs} and {scan_factor}")
    out_dir, sources, stats = Path(out_dir), tuple(sources), PairStats()
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / (PAIRS_FILE + ".partial")
    tmp = {name: out_dir / (name + ".tmp") for name in (PAIRS_FILE, PROMPTS_FILE, ID_MAP_FILE, STATS_FILE)}
    try:
        prompts = _read_sources(sources, rows_for_source, scratch, stats, max_pairs, se_pairs_per_question,
                                se_test_fraction, scan_factor)
        _write_outputs(sources, scratch, prompts, out_dir, stats, tmp)
        for name, path in tmp.items():
            os.replace(path, out_dir / name)
    finally:
        for path in [scratch, *tmp.values()]:
            path.unlink(missing_ok=True)
    return stats


def format_pair_stats(stats: PairStats) -> str:
    lines = [f"{'source':<16}{'split':<7}{'pairs':>9}{'prompts':>9}"]
    for source in sorted({s for s, _ in stats.pairs}, key=lambda s: (SOURCES + (s,)).index(s)):
        for split in SPLITS:
            lines.append(f"{source:<16}{split:<7}{stats.pairs[source, split]:>9}{stats.prompts[source, split]:>9}")
    n_pairs, n_prompts = sum(stats.pairs.values()), sum(stats.prompts.values())
    per_split = {s: (sum(n for (_, sp), n in stats.pairs.items() if sp == s),
                     sum(n for (_, sp), n in stats.prompts.items() if sp == s)) for s in SPLITS}
    lines += ["",
              f"pairs: {n_pairs} (train {per_split['train'][0]}, test {per_split['test'][0]})",
              f"unique prompts: {n_prompts} (train {per_split['train'][1]}, test {per_split['test'][1]})",
              f"dedup ratio (unique prompts / pairs): {n_prompts / max(n_pairs, 1):.4f}",
              "rows read: " + ", ".join(f"{s} {n}" for s, n in stats.rows_read.items())]
    if stats.scanned:
        lines += ["", "capped: each split kept the pairs with the smallest prompt-id hashes among the pairs read"]
        for (source, split), n in sorted(stats.scanned.items()):
            how = ("reading stopped at the scan limit, the rest of the stream was not read"
                   if source in stats.stream_cut else "the stream was read to its end")
            lines.append(f"  {source:<16}{split:<7}{stats.pairs[source, split]:>9} pairs kept of {n} read ({how})")
    lines += ["", "rows dropped by reason (first example):"]
    lines += [f"  {src:<16}{reason:<26}{n:>8}  ({stats.examples[src, reason]})"
              for (src, reason), n in sorted(stats.dropped_rows.items())] or ["  none"]
    lines += ["pairs dropped by reason:"]
    lines += [f"  {src:<16}{reason:<26}{n:>8}" for (src, reason), n in sorted(stats.dropped_pairs.items())] or ["  none"]
    return "\n".join(lines)
