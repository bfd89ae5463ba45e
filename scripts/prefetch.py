"""
The full run's first stage: fetch every external input the later stages read into
$NANOCHAT_BASE_DIR and check it with its loader's own parser, so that a missing dataset or a changed
schema fails now, within minutes, and not hours into the run.

    python -m scripts.prefetch                              # full run: downloads (about 2 GB)
    NANOCHAT_TASKS_OFFLINE=1 python -m scripts.prefetch     # tiny preset: checks the bundled samples

In parallel: the CORE eval bundle (eval_bundle/), the identity conversations and the spelling word
list, every task split mid_train, chat_sft, chat_rl and chat_eval read (task_data/<name>.jsonl, one
hub row a line), the HH-RLHF and UltraFeedback preference splits (pref_data/, read by kat_pairs), and
a probe of the first rows of Stack Exchange preferences (kat_pairs streams it). A file lands only
complete and checked. prefetch_manifest.json (rows, bytes, sha256 and time of each source) appears
once every source passed; a rerun skips a source whose file still has its recorded checksum.
"""

import datetime
import hashlib
import itertools
import json
import queue
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from nanochat.common import OFFLINE_ENV, REPO_ROOT, atomic_write, get_base_dir, inputs_offline, progress_bar
from nanochat.core_eval import SAMPLE_BUNDLE_DIR, download_eval_bundle, eval_bundle_url, load_bundle, load_task_data
from nanochat.flags import flags_dict, opt, parse_flags
from nanochat.kat import pairs
from tasks import customjson, spellingbee
from tasks.arc import ARC
from tasks.common import (RowCheck, RowSchemaError, RowsTask, TaskDataMissing, download_file, local_rows_path, read_jsonl,
                          resolve_data_file)
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk

MANIFEST_FILE = "prefetch_manifest.json"  # written when every source passed: the stage's done-file
PROGRESS_FILE = "prefetch_manifest.partial.json"  # what passed so far, so an interrupted run resumes
# kat_pairs skips and counts a malformed preference row (ties, too few answers); nearly all rejected is a changed schema
PAIRS_MAX_REJECTED = 0.9
PAIR_PARSERS = {"hh-rlhf": pairs.parse_hh_row, "ultrafeedback": pairs.parse_ultrafeedback_row}
PAIR_SAMPLES_DIR = REPO_ROOT / "nanochat" / "samples" / "kat"  # what the tiny preset's kat_pairs reads (--local_dir)


@dataclass
class Config:
    """Fetch and check every external input of a full run (offline: check the bundled samples)."""
    workers: int = opt(6, help="sources fetched at once", min=1)
    attempts: int = opt(5, help="tries per download or hub stream before giving up", min=1)
    backoff_s: float = opt(2.0, help="wait before the second try, doubled for each later one", min=0)
    timeout_s: float = opt(60.0, help="a URL download that sends nothing for this long is retried", above=0)
    stall_s: float = opt(300.0, help="a hub split that yields no row for this long fails", above=0)
    se_probe_rows: int = opt(2000, help="Stack Exchange rows checked now (kat_pairs streams the rest)", min=1)
    kat: bool = opt(True, help="the KAT experiment's preference data too (speedrun.sh alone passes false)")


def task_splits() -> list[RowsTask]:
    """Every dataset split a run's task stages read, as row checkers (no rows loaded)."""
    return [
        SmolTalk("train", rows=[]), SmolTalk("test", rows=[]),  # mid_train, chat_sft
        MMLU("auxiliary_train", "train", rows=[]), MMLU("all", "test", rows=[]),  # mid_train; chat_eval, mid val
        GSM8K("main", "train", rows=[]), GSM8K("main", "test", rows=[]),  # mid_train, chat_sft, chat_rl; chat_eval
        ARC("ARC-Easy", "train", rows=[]), ARC("ARC-Challenge", "train", rows=[]),  # chat_sft
        ARC("ARC-Easy", "test", rows=[]), ARC("ARC-Challenge", "test", rows=[]),  # chat_eval
        HumanEval(rows=[]),  # chat_eval
    ]


# -----------------------------------------------------------------------------
# Sources: what each fetches, where it lands, how it is checked

class SourceStalled(RuntimeError):
    """A hub stream that stopped sending rows without closing."""


class Cancelled(RuntimeError):
    """Another source failed; this one stopped so the run fails now."""


@dataclass
class Source:
    name: str  # manifest key
    origin: str  # where it comes from
    path: Path | None  # the file or folder it leaves; None for a probe that keeps nothing
    obtain: Callable[[], tuple[int, int]]  # fetch if missing, check; (rows checked, rows rejected)
    way_out: str  # what a user can do when it fails for want of network


def sha256_of(path: Path) -> tuple[str, int]:
    """(hex digest, bytes) of a file, or of a folder's files by relative path."""
    digest, size = hashlib.sha256(), 0
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    return digest.hexdigest(), size


def checked_rows(check: RowCheck, rows: Iterable, name: str) -> tuple[int, int]:
    for index, row in enumerate(progress_bar(rows, desc=name, unit=" rows", leave=False)):
        check.accepts(row, f"row {index}")
    return finish(check)


def finish(check: RowCheck) -> tuple[int, int]:
    """(rows, rows rejected); a source with no rows, or mostly rejected ones, is an error."""
    if check.seen == 0:
        raise RowSchemaError(f"{check.what}: the source has no rows at all")
    check.finish()
    return check.seen, check.rejected


def rows_or_stall(rows: Iterable, stall_s: float, what: str) -> Iterator:
    """rows, read in a daemon thread; SourceStalled when none arrives for stall_s (a hung connection)."""
    handoff, stop = queue.Queue(maxsize=256), threading.Event()

    def read():
        try:
            for row in rows:
                while not stop.is_set():
                    try:
                        handoff.put(("row", row), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            handoff.put(("end", None))
        except Exception as err:  # handed to the consumer, which raises it
            handoff.put(("error", err))

    threading.Thread(target=read, name=f"read {what}", daemon=True).start()  # daemon: a hung read cannot block exit
    try:
        while True:
            try:
                kind, value = handoff.get(timeout=stall_s)
            except queue.Empty:
                raise SourceStalled(f"{what} sent no row for {stall_s:g}s (a stalled connection or hub)") from None
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


class Prefetch:
    def __init__(self, cfg: Config, base_dir: Path):
        self.cfg, self.base_dir = cfg, base_dir
        self.cancel = threading.Event()

    # ---- the hub: streamed row by row, checked as they come, written as one JSONL file
    def hub_rows(self, hf_id: str, config: str | None, split: str) -> Iterator[dict]:
        try:
            from datasets import load_dataset
        except ImportError as err:
            raise ImportError("the `datasets` package is not installed: install the hf extra "
                              "(`uv sync --frozen --extra web --extra hf`)") from err
        what = f"{hf_id}" + (f"[{config}]" if config else "") + f"[{split}]"
        rows = pairs.stream_with_retries(lambda: load_dataset(hf_id, config, split=split, streaming=True), what,
                                         attempts=self.cfg.attempts, backoff_s=self.cfg.backoff_s)
        return rows_or_stall(rows, self.cfg.stall_s, what)

    def write_hub_split(self, name: str, rows: Iterator[dict], check: RowCheck, dest: Path) -> tuple[int, int]:
        def write(f):
            for index, row in enumerate(progress_bar(rows, desc=name, unit=" rows", leave=False)):
                if self.cancel.is_set():
                    raise Cancelled(f"{name}: stopped because another source failed")
                check.accepts(row, f"row {index}")  # a renamed column fails here, at the first row
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            finish(check)  # no rows, or too many rejected: no file lands
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dest, write)
        return check.seen, check.rejected

    def hub_split(self, name: str, hf_id: str, config: str | None, split: str, dest: Path, make_check) -> Source:
        def obtain():
            if dest.exists():  # written atomically after its check by an earlier, interrupted run
                return checked_rows(make_check(), read_jsonl(dest), name)
            with closing(self.hub_rows(hf_id, config, split)) as rows:  # closing stops its reader thread
                return self.write_hub_split(name, rows, make_check(), dest)
        origin = f"hf://{hf_id}" + (f"/{config}" if config else "") + f"/{split}"
        return Source(name, origin, dest, obtain,
                      f"check the network and https://huggingface.co/datasets/{hf_id} (a gated dataset needs HF_TOKEN), "
                      f"then rerun (what passed is kept); or put the split at {dest}, one hub row a JSON line")

    # ---- whole files by URL
    def url_file(self, name: str, url: str, dest: Path, count_rows: Callable[[Path], tuple[int, int]]) -> Source:
        def obtain():
            if not dest.exists():
                download_file(url, dest, retries=self.cfg.attempts, timeout_s=self.cfg.timeout_s,
                              base_delay=self.cfg.backoff_s, validate=count_rows)
            return count_rows(dest)
        return Source(name, url, dest, obtain, f"check the network, or download {url} by hand to {dest}")

    def eval_bundle(self, bundle_dir: Path | None) -> Source:
        """bundle_dir None: download it into the base dir; else check that folder (offline: the sample)."""
        def obtain():
            folder = bundle_dir or download_eval_bundle(self.base_dir, attempts=self.cfg.attempts,
                                                        backoff_s=self.cfg.backoff_s, timeout_s=self.cfg.timeout_s)
            items = sum(len(load_task_data(task["data_path"], task["task_type"])) for task in load_bundle(folder))
            return items, 0
        dest = bundle_dir or self.base_dir / "eval_bundle"
        return Source("eval_bundle", "local folder" if bundle_dir else eval_bundle_url(), dest, obtain,
                      f"check the network, or download {eval_bundle_url()} by hand and unpack it into {dest}")

    def stack_exchange_probe(self, open_rows: Callable[[], Iterator], origin: str) -> Source:
        def obtain():
            with closing(open_rows()) as rows:
                return checked_rows(stack_exchange_check(), rows, "stack-exchange probe")
        return Source("stack-exchange (probe)", origin, None, obtain,
                      "check the network and https://huggingface.co/datasets/HuggingFaceH4/stack-exchange-preferences")

    # ---- the lists
    def online_sources(self) -> list[Source]:
        sources = [
            self.eval_bundle(None),
            self.url_file("identity_conversations", customjson.IDENTITY_URL,
                          self.base_dir / customjson.IDENTITY_FILENAME, identity_rows),
            self.url_file("words_alpha", spellingbee.WORD_LIST_URL, self.base_dir / spellingbee.WORD_LIST_FILENAME,
                          word_rows),
        ]
        for task in task_splits():
            hf_id, config, split, local_name = task.source
            sources.append(self.hub_split(f"task_data/{local_name}", hf_id, config, split,
                                          self.base_dir / "task_data" / f"{local_name}.jsonl", task.row_check))
        if not self.cfg.kat:
            return sources
        for source, parse in PAIR_PARSERS.items():
            hf_id, hf_splits = pairs.HF_DATASETS[source]
            for split, hf_split in hf_splits.items():
                dest = pairs.prefetched_rows_path(source, split)
                sources.append(self.hub_split(f"pref_data/{dest.stem}", hf_id, None, hf_split, dest,
                                              lambda s=source, p=parse: pair_check(s, p)))
        hf_id, _ = pairs.HF_DATASETS["stack-exchange"]

        def probe():
            with closing(self.hub_rows(hf_id, None, "train")) as rows:
                yield from itertools.islice(rows, self.cfg.se_probe_rows)
        sources.append(self.stack_exchange_probe(probe, f"hf://{hf_id}/train (first {self.cfg.se_probe_rows} rows)"))
        return sources

    def offline_sources(self) -> list[Source]:
        """What the tiny preset reads instead: the same checks on the local files and bundled samples."""
        def local(name: str, path: Path, count_rows) -> Source:
            return Source(name, "local file", path, lambda: count_rows(path),
                          f"restore {path} (git checkout), or unset {OFFLINE_ENV} to download")

        own_bundle = self.base_dir / "eval_bundle"
        sources = [
            self.eval_bundle(own_bundle if (own_bundle / "core.yaml").exists() else SAMPLE_BUNDLE_DIR),
            local("identity_conversations", resolve_data_file(customjson.IDENTITY_FILENAME, customjson.IDENTITY_URL,
                                                              customjson.IDENTITY_FILENAME), identity_rows),
            local("words_alpha", resolve_data_file(spellingbee.WORD_LIST_FILENAME, spellingbee.WORD_LIST_URL,
                                                   "words.txt"), word_rows),
        ]
        for task in task_splits():
            path = local_rows_path(task.source.local_name)
            if path is None:
                raise FileNotFoundError(f"{OFFLINE_ENV}=1: no local rows for {task.source.describe()}: put them at "
                                        f"task_data/{task.source.local_name}.jsonl under {self.base_dir}")
            sources.append(local(f"task_data/{task.source.local_name}", path,
                                 lambda p, check=task.row_check: checked_rows(check(), read_jsonl(p), p.name)))
        if not self.cfg.kat:
            return sources
        for source, parse in PAIR_PARSERS.items():
            for name in pairs.LOCAL_FILES[source].values():
                sources.append(local(f"pref_data/{Path(name).stem}", PAIR_SAMPLES_DIR / name,
                                     lambda p, s=source, f=parse: checked_rows(pair_check(s, f), jsonl_rows(p), p.name)))
        se_sample = PAIR_SAMPLES_DIR / pairs.LOCAL_FILES["stack-exchange"][None]
        sources.append(self.stack_exchange_probe(lambda: jsonl_rows(se_sample), str(se_sample)))
        return sources


def pair_check(source: str, parse) -> RowCheck:
    return RowCheck(f"{source} (nanochat.kat.pairs)", parse, max_rejected=PAIRS_MAX_REJECTED)


def stack_exchange_check() -> RowCheck:
    def parse(row):  # what kat_pairs does with each row: the split by qid, then the pairs
        pairs.stack_exchange_split(row, 0.01)
        pairs.parse_stack_exchange_row(row)
    return RowCheck("stack-exchange (nanochat.kat.pairs)", parse, max_rejected=PAIRS_MAX_REJECTED)


def jsonl_rows(path: Path) -> Iterator:
    """kat_pairs' reader: a line that is not JSON comes back as a MalformedRow, which the check counts."""
    return (row for _, row in pairs.iter_jsonl_rows(path))


def identity_rows(path: Path) -> tuple[int, int]:
    kept = len(customjson.CustomJSON(path))  # its own check: skips a few bad conversations, refuses many
    total = len(read_jsonl(path))
    if total == 0:
        raise ValueError(f"{path} holds no conversations")
    return total, total - kept


def word_rows(path: Path) -> tuple[int, int]:
    lines = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return lines, lines - len(spellingbee.read_words(path))


# -----------------------------------------------------------------------------
# The manifest and the parallel run

def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load_entries(base_dir: Path) -> dict:
    entries = {}
    for name in (MANIFEST_FILE, PROGRESS_FILE):  # the progress file is newer than a manifest beside it
        path = base_dir / name
        if path.exists():
            try:
                entries.update(json.loads(path.read_text(encoding="utf-8"))["sources"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path} is not a prefetch manifest ({err}); delete it (everything is checked again)") from err
    return entries


def still_verified(source: Source, entry: dict | None) -> bool:
    if entry is None or entry.get("origin") != source.origin:
        return False
    if source.path is None:
        return True  # a probe keeps nothing to compare; it passed for this origin
    return (entry.get("path") == str(source.path) and source.path.exists()
            and sha256_of(source.path)[0] == entry.get("sha256"))


def run_sources(sources: list[Source], entries: dict, base_dir: Path, prefetch: Prefetch, workers: int) -> list:
    """Obtain every source not verified already, in parallel; the first failure stops the rest. Returns the failures."""
    lock, failures = threading.Lock(), []
    offline = inputs_offline()

    def record(source: Source, entry: dict):
        with lock:
            entries[source.name] = entry
            atomic_write(base_dir / PROGRESS_FILE, json.dumps({"offline": offline, "sources": entries}, indent=1))

    def obtain(source: Source) -> str:
        if still_verified(source, entries.get(source.name)):
            return f"[ok] {source.name}: verified earlier" + (", checksum unchanged" if source.path else " (a probe)")
        started = time.time()
        rows, rejected = source.obtain()
        digest, size = sha256_of(source.path) if source.path is not None else (None, 0)
        seconds = time.time() - started
        record(source, {"origin": source.origin, "path": str(source.path) if source.path else None, "rows": rows,
                        "rejected": rejected, "bytes": size, "sha256": digest, "seconds": round(seconds, 1),
                        "time": now()})
        skipped = f", {rejected:,} rejected by the loader (skipped when read)" if rejected else ""
        return f"[ok] {source.name}: {rows:,} rows{skipped}, {size / 1e6:.1f} MB in {seconds:.1f}s"

    overall = progress_bar(total=len(sources), desc="prefetch", unit=" sources")
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch") as pool:
        futures = {pool.submit(obtain, source): source for source in sources}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                if future.cancelled():
                    continue
                overall.update(1)
                err = future.exception()
                if err is None:
                    print(future.result(), flush=True)
                elif not isinstance(err, Cancelled):
                    failures.append((futures[future], err))
            if failures and not prefetch.cancel.is_set():
                prefetch.cancel.set()  # hub streams stop at their next row; downloads end within their timeout
                for future in pending:
                    future.cancel()
    overall.close()
    return failures


def failure_report(failures: list) -> str:
    lines = []
    for source, err in failures:
        lines.append(f"[FAIL] {source.name} ({source.origin}): {type(err).__name__}: {err}")
        if not isinstance(err, (RowSchemaError, TaskDataMissing)):  # these say what to do themselves
            lines.append(f"       way out: {source.way_out}")
        if not isinstance(err, (OSError, ValueError, RuntimeError, ImportError)):  # not a failure we foresaw
            lines.append("".join(traceback.format_exception(err)))
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    cfg = parse_flags(Config, argv)
    base_dir = get_base_dir()
    offline = inputs_offline()
    prefetch = Prefetch(cfg, base_dir)
    sources = prefetch.offline_sources() if offline else prefetch.online_sources()
    print(f"prefetch: {flags_dict(cfg)}\n{len(sources)} sources -> {base_dir}"
          + (f" ({OFFLINE_ENV}=1: checking local files and bundled samples, no downloads)" if offline else ""),
          flush=True)
    started = time.time()
    entries = load_entries(base_dir)
    failures = run_sources(sources, entries, base_dir, prefetch, cfg.workers)
    if failures:
        raise SystemExit(f"{failure_report(failures)}\nprefetch failed after {time.time() - started:.0f}s; "
                         f"what passed is recorded in {base_dir / PROGRESS_FILE} and is not fetched again")
    names = {source.name for source in sources}
    manifest = {"offline": offline, "written": now(), "sources": {n: e for n, e in entries.items() if n in names}}
    atomic_write(base_dir / MANIFEST_FILE, json.dumps(manifest, indent=1))
    (base_dir / PROGRESS_FILE).unlink(missing_ok=True)
    print(f"prefetch done in {time.time() - started:.0f}s: {len(sources)} sources checked; {base_dir / MANIFEST_FILE}")


if __name__ == "__main__":
    main()
