"""
scripts.prefetch end to end: URL files from a local HTTP server, hub splits from a stand-in for
`datasets` that serves the bundled samples (rows in each dataset's hub schema). Injected failures
(404, timeouts, a renamed field, a stream that never finishes) must fail within seconds, naming
the source, with no partial file left; a rerun skips what is verified; later stages then read the
local copies and never the network.
"""

import ast
import hashlib
import json
import re
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from nanochat.common import REPO_ROOT
from nanochat.core_eval import get_eval_bundle
from nanochat.kat import pairs
from scripts import prefetch
from tasks import customjson, spellingbee
from tasks.common import SAMPLES_DIR, load_rows, read_jsonl
from tasks.customjson import IdentityConversations
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SpellingBee
from tests.http_fixtures import ScriptedServer, bundle_zip_bytes, unreachable_url

FAST = ["--attempts=2", "--backoff_s=0.01", "--timeout_s=0.5", "--stall_s=1", "--workers=4"]
PAIR_SAMPLES = REPO_ROOT / "nanochat" / "samples" / "kat"


class DatasetNotFoundError(FileNotFoundError):
    """What `datasets` raises for a dataset or split the hub does not have (a FileNotFoundError)."""


def hub_rows() -> dict:
    """(hf_id, config, split) -> rows, from the bundled samples, which keep the hub's columns."""
    rows = {}
    for task in prefetch.task_splits():
        hf_id, config, split, local_name = task.source
        rows[hf_id, config, split] = read_jsonl(SAMPLES_DIR / f"{local_name}.jsonl")
    for source, (hf_id, splits) in pairs.HF_DATASETS.items():
        for split, hf_split in splits.items():
            rows[hf_id, None, hf_split] = read_jsonl(PAIR_SAMPLES / pairs.LOCAL_FILES[source][split])
    return rows


class FakeHub:
    """load_dataset(..., streaming=True) over hub_rows(); `faults` makes a split misbehave."""

    def __init__(self):
        self.rows, self.faults, self.calls = hub_rows(), {}, []
        self.release = threading.Event()  # lets a stalled stream end when the test is over

    def load_dataset(self, hf_id, config=None, split=None, streaming=False):
        assert streaming, "prefetch must stream, never load a whole split into memory"
        key = (hf_id, config, split)
        self.calls.append(key)
        fault = self.faults.get(key)
        if fault == "404" or key not in self.rows:
            raise DatasetNotFoundError(f"Dataset '{hf_id}' doesn't exist on the Hub or cannot be accessed (404)")
        if fault == "timeout":
            raise TimeoutError(f"Read timed out (huggingface.co, {hf_id})")
        return self.stream(key, fault)

    def stream(self, key, fault):
        for index, row in enumerate(self.rows[key]):
            if fault == "stall" and index == 3:
                self.release.wait()  # a connection that stays open and sends nothing
                return
            if isinstance(fault, tuple):  # a renamed field
                old, new = fault
                row = {(new if k == old else k): v for k, v in row.items()}
            yield row


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake.load_dataset))
    yield fake
    fake.release.set()


@pytest.fixture
def server(monkeypatch):
    words = (SAMPLES_DIR / "words.txt").read_bytes()
    identity = (SAMPLES_DIR / "identity_conversations.jsonl").read_bytes()
    with ScriptedServer({"eval_bundle.zip": bundle_zip_bytes(), "words_alpha.txt": words,
                         "identity_conversations.jsonl": identity}) as scripted:
        monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"{scripted.url}/eval_bundle.zip")
        monkeypatch.setattr(customjson, "IDENTITY_URL", f"{scripted.url}/identity_conversations.jsonl")
        monkeypatch.setattr(spellingbee, "WORD_LIST_URL", f"{scripted.url}/words_alpha.txt")
        yield scripted


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("NANOCHAT_TASKS_OFFLINE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    return tmp_path / "base"


def leftovers(base_dir: Path) -> list[str]:
    """Temporary files of an interrupted write (atomic_write's and the download module's)."""
    return sorted(str(p.relative_to(base_dir)) for p in base_dir.rglob("*") if ".tmp" in p.name)


def manifest(base_dir: Path) -> dict:
    return json.loads((base_dir / prefetch.MANIFEST_FILE).read_text())["sources"]


def expected_sources() -> set[str]:
    names = {"eval_bundle", "identity_conversations", "words_alpha", "stack-exchange (probe)"}
    names |= {f"task_data/{task.source.local_name}" for task in prefetch.task_splits()}
    return names | {"pref_data/hh-rlhf_train", "pref_data/hh-rlhf_test", "pref_data/ultrafeedback_train_prefs",
                    "pref_data/ultrafeedback_test_prefs"}


# -----------------------------------------------------------------------------
# The whole stage

def test_prefetch_fetches_and_checks_every_source_and_later_stages_need_no_network(hub, server, base_dir, monkeypatch):
    prefetch.main(FAST)

    entries = manifest(base_dir)
    assert set(entries) == expected_sources()
    assert not (base_dir / prefetch.PROGRESS_FILE).exists() and leftovers(base_dir) == []
    for name, entry in entries.items():
        if entry["path"] is not None:
            assert prefetch.sha256_of(Path(entry["path"])) == (entry["sha256"], entry["bytes"]), name
    smoltalk = base_dir / "task_data" / "smoltalk_train.jsonl"
    assert read_jsonl(smoltalk) == read_jsonl(SAMPLES_DIR / "smoltalk_train.jsonl")  # the hub's rows, as they were
    assert entries["task_data/smoltalk_train"]["rows"] == 30 and entries["task_data/smoltalk_train"]["rejected"] == 0
    assert entries["pref_data/hh-rlhf_train"]["rows"] == 134
    assert entries["pref_data/hh-rlhf_train"]["rejected"] > 0  # kat_pairs skips these and counts them in stats.txt
    assert entries["stack-exchange (probe)"]["rows"] == 90 and entries["stack-exchange (probe)"]["sha256"] is None
    assert not (base_dir / "pref_data" / "stack-exchange.jsonl").exists()  # 22 GB: probed, never stored
    assert hub.calls.count(("HuggingFaceH4/stack-exchange-preferences", None, "train")) == 1

    # the network is gone: every later reader finds its local copy
    hub.calls.clear()
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", unreachable_url("eval_bundle.zip"))
    monkeypatch.setattr(customjson, "IDENTITY_URL", unreachable_url("identity_conversations.jsonl"))
    monkeypatch.setattr(spellingbee, "WORD_LIST_URL", unreachable_url("words_alpha.txt"))
    hits = len(server.hits)
    for task in prefetch.task_splits():  # what each task's constructor loads
        assert list(load_rows(*task.source)) == read_jsonl(SAMPLES_DIR / f"{task.source.local_name}.jsonl")
    assert len(SmolTalk("train")) == 30 and len(MMLU("auxiliary_train", "train")) == 24
    assert len(IdentityConversations()) == 20 and len(SpellingBee(size=4).words) == 506
    assert get_eval_bundle(attempts=1) == base_dir / "eval_bundle"
    for source in ("hh-rlhf", "ultrafeedback"):
        rows = [row for _, _, row in pairs.iter_hf_rows(source)]
        expected = [row for name in pairs.LOCAL_FILES[source].values() for row in read_jsonl(PAIR_SAMPLES / name)]
        assert rows == expected
    assert hub.calls == [] and len(server.hits) == hits
    # the one hub reader left: kat_pairs streams Stack Exchange (22 GB), which prefetch only probed
    assert len(list(pairs.iter_hf_rows("stack-exchange"))) == 90
    assert hub.calls == [("HuggingFaceH4/stack-exchange-preferences", None, "train")]


def test_a_rerun_skips_verified_sources_rechecks_a_changed_file_and_refetches_a_missing_one(hub, server, base_dir, capsys):
    prefetch.main(FAST)
    hub.calls.clear()
    server.hits.clear()
    capsys.readouterr()
    prefetch.main(FAST)
    assert hub.calls == [] and server.hits == []
    out = capsys.readouterr().out
    assert out.count("verified earlier, checksum unchanged") == len(expected_sources()) - 1
    assert "stack-exchange (probe): verified earlier (a probe)" in out  # nothing kept to checksum; not repeated

    gsm8k = base_dir / "task_data" / "gsm8k_test.jsonl"
    with open(gsm8k, "a") as f:  # a row a user added by hand: checked again, not downloaded over
        f.write(json.dumps({"question": "1+1?", "answer": "<<1+1=2>>2\n#### 2"}) + "\n")
    (base_dir / "task_data" / "humaneval.jsonl").unlink()
    prefetch.main(FAST)
    assert hub.calls == [("openai/openai_humaneval", None, "test")] and server.hits == []
    entries = manifest(base_dir)
    assert entries["task_data/gsm8k_test"]["rows"] == 21
    assert entries["task_data/gsm8k_test"]["sha256"] == hashlib.sha256(gsm8k.read_bytes()).hexdigest()


def test_an_interrupted_run_resumes_from_what_passed(hub, server, base_dir):
    stack_exchange = ("HuggingFaceH4/stack-exchange-preferences", None, "train")
    hub.faults[stack_exchange] = ("answers", "responses")  # the last source fails: every other one passes first
    with pytest.raises(SystemExit, match=r"(?s)stack-exchange \(probe\).*rejects 90 of 90 rows \(missing_field 90\)"):
        prefetch.main(FAST[:-1] + ["--workers=1"])
    assert not (base_dir / prefetch.MANIFEST_FILE).exists()  # the done-file only when everything passed
    passed = json.loads((base_dir / prefetch.PROGRESS_FILE).read_text())["sources"]
    assert set(passed) == expected_sources() - {"stack-exchange (probe)"}

    del hub.faults[stack_exchange]
    hub.calls.clear()
    server.hits.clear()
    prefetch.main(FAST)
    assert hub.calls == [stack_exchange] and server.hits == []
    assert set(manifest(base_dir)) == expected_sources() and not (base_dir / prefetch.PROGRESS_FILE).exists()


# -----------------------------------------------------------------------------
# Injected failures: each fails within seconds, names the source and what to do, leaves no partial file

FAILURES = {
    "hub 404": (("openai/gsm8k", "main", "test"), "404", "task_data/gsm8k_test",
                r"openai/gsm8k.*404.*way out: check the network and https://huggingface.co/datasets/openai/gsm8k"),
    "hub timeout": (("HuggingFaceTB/smol-smoltalk", None, "train"), "timeout", "task_data/smoltalk_train",
                    r"gave up after 2 attempts.*Read timed out.*way out"),
    "renamed field": (("openai/gsm8k", "main", "train"), ("question", "query"), "task_data/gsm8k_train",
                      r"row 0: the loader cannot read this row \(KeyError: 'question'\); its columns are \['answer', 'query'\]"),
    "stream never finishes": (("cais/mmlu", "auxiliary_train", "train"), "stall", "task_data/mmlu_auxiliary_train",
                              r"cais/mmlu\[auxiliary_train\]\[train\] sent no row for 1s"),
    "preference field renamed": (("Anthropic/hh-rlhf", None, "train"), ("chosen", "preferred"), "pref_data/hh-rlhf_train",
                                 r"rejects 134 of 134 rows \(missing_field 134\)"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_a_hub_failure_stops_the_run_in_seconds_naming_the_source(hub, server, base_dir, case):
    key, fault, name, message = FAILURES[case]
    hub.faults[key] = fault
    started = time.time()
    with pytest.raises(SystemExit) as info:
        prefetch.main(FAST)
    assert time.time() - started < 10
    assert f"[FAIL] {name} (hf://" in str(info.value)
    assert re.search(message, str(info.value), flags=re.S), str(info.value)
    assert not (base_dir / f"{name}.jsonl").exists() and leftovers(base_dir) == []
    assert not (base_dir / prefetch.MANIFEST_FILE).exists()


@pytest.mark.parametrize("name, script, message", [
    ("words_alpha", {"words_alpha.txt": [404]}, r"HTTP 404.*not retried"),
    ("identity_conversations", {"identity_conversations.jsonl": ["stall", "stall"]}, r"gave up after 2 attempts.*timed out"),
    ("eval_bundle", {"eval_bundle.zip": [404]}, r"HTTP 404"),
])
def test_a_url_failure_stops_the_run_in_seconds_naming_the_source(hub, server, base_dir, name, script, message):
    server.script.update({file: list(steps) for file, steps in script.items()})
    started = time.time()
    with pytest.raises(SystemExit) as info:
        prefetch.main(FAST)
    assert time.time() - started < 10
    text = str(info.value)
    assert f"[FAIL] {name} (http://127.0.0.1" in text and "by hand" in text
    assert re.search(message, text, flags=re.S), text
    assert not (base_dir / "words_alpha.txt").exists() or name != "words_alpha"
    assert not (base_dir / "identity_conversations.jsonl").exists() or name != "identity_conversations"
    assert not (base_dir / "eval_bundle").exists() or name != "eval_bundle"
    assert leftovers(base_dir) == []


def test_a_url_file_that_fails_its_check_never_lands(hub, server, base_dir):
    server.bodies["words_alpha.txt"] = b"<html><body>Please sign in</body></html>\n"
    with pytest.raises(SystemExit, match=r"(?s)\[FAIL\] words_alpha.*rejects 1 of 1 rows"):
        prefetch.main(FAST)
    assert not (base_dir / "words_alpha.txt").exists() and leftovers(base_dir) == []


def test_a_missing_datasets_package_names_the_extra_to_install(server, base_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(SystemExit, match=r"uv sync --frozen --extra web --extra hf"):
        prefetch.main(FAST)


# -----------------------------------------------------------------------------
# Offline (the tiny preset): the same checks on the bundled samples, nothing downloaded

def test_offline_prefetch_checks_the_bundled_samples_without_the_network(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_TASKS_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", unreachable_url("eval_bundle.zip"))
    prefetch.main(["--workers=2"])
    entries = manifest(base_dir)
    assert set(entries) == expected_sources()
    assert entries["task_data/smoltalk_train"]["path"] == str(SAMPLES_DIR / "smoltalk_train.jsonl")
    assert entries["stack-exchange (probe)"]["rows"] == 90
    assert sorted(p.name for p in base_dir.iterdir()) == [prefetch.MANIFEST_FILE]  # checked in place, nothing copied


def test_offline_prefetch_fails_on_a_bad_local_file_naming_it(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_TASKS_OFFLINE", "1")
    (base_dir / "task_data").mkdir(parents=True)
    (base_dir / "task_data" / "arc_easy_test.jsonl").write_text(json.dumps({"id": "x", "question": "?"}) + "\n")
    with pytest.raises(SystemExit, match=r"(?s)task_data/arc_easy_test.*KeyError: 'choices'.*columns are \['id', 'question'\]"):
        prefetch.main(["--workers=2"])


# -----------------------------------------------------------------------------
# The list of splits stays complete: every task split a stage script builds is one prefetch fetches

TASK_CLASSES = {type(task).__name__: type(task) for task in prefetch.task_splits()}


def task_splits_the_scripts_build() -> set:
    found = set()
    for path in [*(REPO_ROOT / "scripts").glob("*.py"), REPO_ROOT / "tasks" / "eval_tasks.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in TASK_CLASSES:
                args = [ast.literal_eval(a) for a in node.args]
                kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg in ("subset", "split")}
                found.add((path.name, TASK_CLASSES[node.func.id](*args, rows=[], **kwargs).source))
    return found


def test_prefetch_fetches_every_task_split_a_stage_reads():
    fetched = {task.source for task in prefetch.task_splits()}
    built = task_splits_the_scripts_build()
    assert {script for script, _ in built} >= {"mid_train.py", "chat_sft.py", "chat_rl.py", "eval_tasks.py"}
    assert not {source for _, source in built} - fetched


def test_without_kat_only_the_nanochat_inputs_are_checked(base_dir, monkeypatch):
    """speedrun.sh alone (--kat=false) never touches the preference data."""
    monkeypatch.setenv("NANOCHAT_TASKS_OFFLINE", "1")
    prefetch.main(["--kat=false"])
    names = set(json.loads((base_dir / "prefetch_manifest.json").read_text())["sources"])
    assert names and not any(n.startswith("pref_data/") or "stack-exchange" in n for n in names)
    assert "eval_bundle" in " ".join(names) and any(n.startswith("task_data/") for n in names)
    prefetch.main([])  # the KAT run then adds the preference data
    names_kat = set(json.loads((base_dir / "prefetch_manifest.json").read_text())["sources"])
    assert names < names_kat and any(n.startswith("pref_data/") for n in names_kat)
