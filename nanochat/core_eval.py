"""
The CORE metric (DCLM, arXiv:2406.11794): 22 in-context-learning tasks scored by a base model's
losses alone, each reported as accuracy centred on its random baseline, CORE being their mean.
scripts.base_eval runs it (`python -m scripts.base_eval`).

The eval bundle (nanochat's repackaging of the DCLM / MosaicML tasks, ~26 MB) unpacks to
$NANOCHAT_BASE_DIR/eval_bundle/: core.yaml (icl_tasks), eval_meta_data.csv (random baselines) and
eval_data/<group>/<task>.jsonl (one item a line, fields by task type in ITEM_FIELDS).
nanochat/samples/eval_bundle/ has the same layout with a few items per task that we wrote
ourselves: its CORE shows the pipeline works, is not comparable with published scores, and is
used only when asked for (base_eval --bundle=sample, or NANOCHAT_TASKS_OFFLINE=1), never as a
quiet stand-in for a bundle that failed to download. Scoring is DCLM / MosaicML ICL eval's, with
prompts rendered as nanochat renders them.
"""

import csv
import json
import os
import random
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import OFFLINE_ENV, get_base_dir, inputs_offline, print0, progress_bar
from nanochat.download import DownloadError, download_file

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
SAMPLE_BUNDLE_DIR = Path(__file__).resolve().parent / "samples" / "eval_bundle"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234  # few-shot examples of item i come from random.Random(FEWSHOT_SEED + i), as in nanochat
SUBSET_SEED = 1337  # which items max_per_task keeps
ITEM_FIELDS = {
    "multiple_choice": {"query": str, "choices": list, "gold": int},  # one context, several continuations
    "schema": {"context_options": list, "continuation": str, "gold": int},  # several contexts, one continuation
    "language_modeling": {"context": str, "continuation": str},  # the continuation must come out greedily
}


class EvalBundleUnavailable(RuntimeError):
    """The bundle could not be fetched (no network, blocked host, HTTP error)."""


# -----------------------------------------------------------------------------
# Getting the bundle

def download_eval_bundle(base_dir=None, url=None, attempts: int = 3, backoff_s: float = 2.0,
                         timeout_s: float = 60.0) -> Path:
    """
    Download and unpack the bundle to <base_dir>/eval_bundle/ unless it is already there.
    The URL is $NANOCHAT_EVAL_BUNDLE_URL when set. Ranks share the work through a file lock;
    the zip arrives atomically (nanochat.download) and unpacks into place in one rename, so a
    crash never leaves a half bundle that looks complete. Raises EvalBundleUnavailable when the
    network does not deliver.
    """
    from filelock import FileLock

    base_dir = Path(base_dir) if base_dir is not None else get_base_dir()
    bundle_dir = base_dir / "eval_bundle"
    if (bundle_dir / "core.yaml").exists():
        return bundle_dir
    url = url or eval_bundle_url()
    base_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base_dir / "eval_bundle.lock")):
        if (bundle_dir / "core.yaml").exists():  # another rank finished it while we waited
            return bundle_dir
        if bundle_dir.exists():
            raise FileExistsError(f"{bundle_dir} exists but has no core.yaml (an interrupted copy?); "
                                  f"delete it and run again")
        zip_path = base_dir / "eval_bundle.zip"
        try:
            download_file(url, zip_path, attempts=attempts, base_delay=backoff_s, timeout=timeout_s,
                          validate=zip_check(url))
        except DownloadError as err:  # offline included: the caller may fall back to the sample
            raise EvalBundleUnavailable(str(err)) from err
        unpack_bundle(zip_path, bundle_dir)
        zip_path.unlink()
    print0(f"Eval bundle ready at {bundle_dir}")
    return bundle_dir


def eval_bundle_url() -> str:
    return os.environ.get("NANOCHAT_EVAL_BUNDLE_URL", EVAL_BUNDLE_URL)


def zip_check(url: str):
    """A validator for download_file: a proxy or login page may answer 200 with HTML instead of the zip."""
    def check(path: Path):
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{url} sent something that is not a zip archive (a proxy or login page?); "
                             f"check NANOCHAT_EVAL_BUNDLE_URL and retry")
    return check


def unpack_bundle(zip_path: Path, bundle_dir: Path):
    """Unzip next to bundle_dir and move the folder holding core.yaml into place in one rename."""
    staging = Path(tempfile.mkdtemp(prefix=".eval_bundle_unpack_", dir=bundle_dir.parent))
    try:
        try:
            archive = zipfile.ZipFile(zip_path)
        except zipfile.BadZipFile as err:  # one copied here by hand: download_file already checked its own
            raise ValueError(f"{zip_path} is not a zip archive (a proxy or login page?); delete it, check "
                             f"NANOCHAT_EVAL_BUNDLE_URL and retry") from err
        with archive:
            for name in archive.namelist():
                if name.startswith("/") or ".." in Path(name).parts:
                    raise ValueError(f"{zip_path} holds an unsafe path {name!r}; refusing to unpack it")
            archive.extractall(staging)
        found = sorted(p.parent for p in staging.glob("**/core.yaml") if len(p.relative_to(staging).parts) <= 2)
        if len(found) != 1:
            raise ValueError(f"{zip_path} should hold one core.yaml at its top or one folder down, found {len(found)}")
        os.replace(found[0], bundle_dir)
    finally:
        if staging.exists():  # gone already when core.yaml sat at the top and staging itself moved
            shutil.rmtree(staging)


def get_eval_bundle(base_dir=None, **download_options) -> Path:
    """
    The bundle CORE evaluates: <base_dir>/eval_bundle, downloaded now if missing (scripts.prefetch
    fetches it before a full run). With NANOCHAT_TASKS_OFFLINE=1 and no downloaded bundle, the
    offline sample, said so. A failed download is EvalBundleUnavailable, never a switch to the sample.
    Under torch.distributed rank 0 decides and every rank gets its answer (or its error), so no two
    ranks evaluate different tasks or wait for each other forever.
    """
    def resolve() -> Path:
        bundle_dir = (Path(base_dir) if base_dir is not None else get_base_dir()) / "eval_bundle"
        if inputs_offline() and not (bundle_dir / "core.yaml").exists():
            print0(f"{OFFLINE_ENV}=1: CORE on the offline sample {SAMPLE_BUNDLE_DIR} (a few items per task written "
                   f"for this repo; it checks the pipeline and is not comparable with published CORE scores)")
            return SAMPLE_BUNDLE_DIR
        try:
            return download_eval_bundle(base_dir, **download_options)
        except EvalBundleUnavailable as err:
            raise EvalBundleUnavailable(
                f"{err}\nThe CORE eval bundle is needed for a real CORE score. Fetch it with `python -m scripts.prefetch` "
                f"(or copy eval_bundle.zip's contents to {bundle_dir}); for a smoke test on the bundled sample pass "
                f"--bundle=sample to scripts.base_eval or set {OFFLINE_ENV}=1") from err

    if not (dist.is_available() and dist.is_initialized()):
        return resolve()
    return same_on_every_rank(resolve, "the CORE eval bundle")


def same_on_every_rank(resolve, what: str) -> Path:
    """resolve() on rank 0, its path (or its error) broadcast to every rank."""
    answer = [None]
    if dist.get_rank() == 0:
        try:
            answer[0] = ("ok", str(resolve()))
        except Exception as err:  # tell the other ranks before raising here, so they raise too and none hangs
            dist.broadcast_object_list([("error", f"{type(err).__name__}: {err}")], src=0)
            raise
    dist.broadcast_object_list(answer, src=0)
    status, value = answer[0]
    if status == "error":
        raise EvalBundleUnavailable(f"rank 0 could not get {what}: {value}")
    return Path(value)


def load_bundle(bundle_dir) -> list[dict]:
    """The tasks of core.yaml with their random baselines: label, task_type, num_fewshot,
    continuation_delimiter, random_baseline (percent), data_path."""
    try:
        import yaml
    except ImportError as err:
        raise ImportError("reading core.yaml needs PyYAML: `uv pip install pyyaml`") from err

    bundle_dir = Path(bundle_dir)
    config_path, meta_path = bundle_dir / "core.yaml", bundle_dir / "eval_meta_data.csv"
    for path in (config_path, meta_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: {bundle_dir} is not an eval bundle; delete it so it is "
                                    f"downloaded again, or point at nanochat/samples/eval_bundle")
    with open(meta_path, newline="", encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    tasks = []
    for position, entry in enumerate(config.get("icl_tasks") or []):
        where = f"{config_path} task #{position} ({entry.get('label', 'no label')})"
        missing = [k for k in ("label", "dataset_uri", "num_fewshot", "icl_task_type") if k not in entry]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        if entry["icl_task_type"] not in TASK_TYPES:
            raise ValueError(f"{where}: icl_task_type {entry['icl_task_type']!r} is not one of {TASK_TYPES}")
        if entry["label"] not in baselines:
            raise ValueError(f"{where}: no 'Random baseline' row for it in {meta_path}")
        shots = entry["num_fewshot"]
        tasks.append({
            "label": entry["label"],
            "task_type": entry["icl_task_type"],
            "num_fewshot": int(shots[0] if isinstance(shots, list) else shots),
            "continuation_delimiter": entry.get("continuation_delimiter", " "),
            "random_baseline": baselines[entry["label"]],
            "data_path": bundle_dir / "eval_data" / entry["dataset_uri"],
        })
    if not tasks:
        raise ValueError(f"{config_path} lists no icl_tasks")
    return tasks


def load_task_data(path, task_type: str) -> list[dict]:
    """The items of one jsonl file, each checked against the fields its task type needs."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"task data {path} is missing from the eval bundle")
    fields = ITEM_FIELDS[task_type]
    items = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        item = json.loads(line)
        for name, kind in fields.items():
            if not isinstance(item.get(name), kind):
                raise ValueError(f"{path}:{line_no}: a {task_type} item needs {name!r} as {kind.__name__}")
        options = item.get("choices", item.get("context_options"))
        if options is not None and not (len(options) >= 2 and 0 <= item["gold"] < len(options)):
            raise ValueError(f"{path}:{line_no}: needs >= 2 options and gold in range, got {len(options)} "
                             f"options and gold={item['gold']}")
        items.append(item)
    return items


# -----------------------------------------------------------------------------
# Prompts and the token spans that get scored

def sample_fewshot(data: list[dict], idx: int, num_fewshot: int) -> list[dict]:
    """num_fewshot other items of the task, the same ones every time item idx is evaluated."""
    if num_fewshot == 0:
        return []
    if num_fewshot > len(data) - 1:
        raise ValueError(f"{num_fewshot}-shot needs at least {num_fewshot + 1} items, the task has {len(data)}")
    others = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in random.Random(FEWSHOT_SEED + idx).sample(others, num_fewshot)]


def render_prompts(item: dict, task_type: str, delimiter: str, fewshot: list[dict]) -> list[str]:
    """One full prompt per candidate; for language modeling [without, with] the continuation."""
    if task_type == "multiple_choice":
        prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        prefix = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{prefix}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]
    # Contexts in the real data carry stray edge whitespace; stripping the prompt without the
    # continuation keeps it a clean token prefix of the prompt with it.
    prefix = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{prefix}{item['context'].strip()}{delimiter}"
    return [without.strip(), without + item["continuation"]]


def common_length(sequences: list[list[int]], from_end: bool = False) -> int:
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        position = -1 - i if from_end else i
        if any(s[position] != sequences[0][position] for s in sequences):
            return i
    return shortest


def scored_spans(tokens: list[list[int]], task_type: str):
    """(sequences to forward, start, end): tokens[start:end] of each sequence are scored."""
    # Scored: what follows the candidates' common prefix (multiple choice) or their common suffix (schema).
    # Every candidate keeps at least one scored token and the BOS in front of it, even when one
    # candidate is a prefix (or suffix) of another, so no mean is taken over nothing.
    if task_type == "multiple_choice":
        start = min(common_length(tokens), min(len(t) for t in tokens) - 1)
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if task_type == "schema":
        suffix = min(common_length(tokens, from_end=True), min(len(t) for t in tokens) - 1)
        return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    without, with_continuation = tokens
    # normally len(without); less if the tokenizer merged across the context/continuation seam
    start = min(common_length([without, with_continuation]), len(with_continuation) - 1)
    return [with_continuation], [start], [len(with_continuation)]


def crop_left(tokens, starts, ends, max_len: int):
    """Drop tokens on the left of sequences longer than the model's window, shifting the spans."""
    cropped = []
    for t, s, e in zip(tokens, starts, ends):
        drop = max(0, len(t) - max_len)
        if s - drop < 1:
            raise ValueError(f"the scored span ({e - s} tokens) does not fit into sequence_len={max_len} "
                             f"with one token of context; evaluate with a longer sequence_len")
        cropped.append((t[drop:], s - drop, e - drop))
    return [list(c) for c in zip(*cropped)]


# -----------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def score_item(model, tokenizer, data: list[dict], idx: int, task_meta: dict, device) -> bool:
    item, task_type = data[idx], task_meta["task_type"]
    fewshot = sample_fewshot(data, idx, task_meta["num_fewshot"])
    prompts = render_prompts(item, task_type, task_meta["continuation_delimiter"], fewshot)
    bos = tokenizer.get_bos_token_id()
    tokens, starts, ends = scored_spans(tokenizer.encode(prompts, prepend=bos), task_type)
    tokens, starts, ends = crop_left(tokens, starts, ends, model.config.sequence_len)

    width = max(len(t) for t in tokens)
    input_ids = torch.full((len(tokens), width), bos, dtype=torch.long)  # right padding is never scored
    for row, t in enumerate(tokens):
        input_ids[row, :len(t)] = torch.tensor(t, dtype=torch.long)
    input_ids = input_ids.to(device)
    logits = model(input_ids)
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"model returned logits of shape {tuple(logits.shape)} for input {tuple(input_ids.shape)}; "
                         f"CORE needs forward(idx) -> logits (B, T, V)")
    # position p predicts token p + 1, so the span [s, e) is read from positions [s - 1, e - 1)
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    if task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool((logits[0, s - 1:e - 1].argmax(dim=-1) == targets[0, s - 1:e - 1]).all())
    # multiple choice and schema: the candidate with the lowest mean loss over its scored tokens
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    mean_losses = torch.stack([losses[row, s - 1:e - 1].mean() for row, (s, e) in enumerate(zip(starts, ends))])
    return int(mean_losses.argmin()) == item["gold"]


def evaluate_task(model, tokenizer, data: list[dict], task_meta: dict, device, max_per_task: int = -1) -> float:
    """
    Accuracy on one task. task_meta: task_type, num_fewshot, continuation_delimiter.
    max_per_task > 0 scores a fixed random subset of that many items (few-shot examples still
    come from the whole task). Under torch.distributed each rank scores every world_size-th
    item and the counts are summed across ranks.
    """
    if task_meta["task_type"] not in TASK_TYPES:
        raise ValueError(f"task_type {task_meta['task_type']!r} is not one of {TASK_TYPES}")
    if not data:
        raise ValueError(f"task {task_meta.get('label', '?')} has no items")
    indices = list(range(len(data)))
    if 0 < max_per_task < len(data):
        random.Random(SUBSET_SEED).shuffle(indices)
        indices = sorted(indices[:max_per_task])
    ddp = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    mine = progress_bar(indices[rank::world_size], desc=task_meta.get("label", "CORE task"), unit=" items", leave=False)
    correct = sum(score_item(model, tokenizer, data, idx, task_meta, device) for idx in mine)
    counts = torch.tensor([correct, len(indices[rank::world_size])], dtype=torch.long, device=device)
    if ddp:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts[0].item() / counts[1].item()


def centered_accuracy(accuracy: float, random_baseline_pct: float) -> float:
    """0 at chance, 1 at perfect: (acc - b) / (1 - b) with b the random baseline as a fraction."""
    baseline = 0.01 * random_baseline_pct
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_core(model, tokenizer, device, bundle_dir=None, max_per_task: int = -1) -> dict:
    """
    Every task of the bundle (default: get_eval_bundle()). Returns
    {"results": {label: accuracy}, "centered": {label: centred accuracy}, "core": mean centred,
     "bundle_dir": the bundle used}.
    """
    bundle_dir = Path(bundle_dir) if bundle_dir is not None else get_eval_bundle()
    results, centered = {}, {}
    for task in load_bundle(bundle_dir):
        started = time.time()
        data = load_task_data(task["data_path"], task["task_type"])
        accuracy = evaluate_task(model, tokenizer, data, task, device, max_per_task=max_per_task)
        results[task["label"]] = accuracy
        centered[task["label"]] = centered_accuracy(accuracy, task["random_baseline"])
        print0(f"{task['label']:<34} {task['num_fewshot']:>2}-shot  accuracy {accuracy:.4f}  "
               f"centred {centered[task['label']]:+.4f}  ({time.time() - started:.1f}s)")
    core = sum(centered.values()) / len(centered)
    return {"results": results, "centered": centered, "core": core, "bundle_dir": str(bundle_dir)}
