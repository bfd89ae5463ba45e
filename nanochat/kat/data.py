"""
The KAT data folder (<kat cache>/data, SPEC section 4): one object, KatData, owns its files.

    data = KatData()                         # or KatData("some/folder"); "" means the default
    train = data.pairs("train")              # every row is checked as it loads
    data.check_current(density_k=10)         # do the embeddings and weights describe prompts_all.jsonl?
    w = data.weights_by_prompt([p["prompt_id"] for p in train], split="train")

Who writes what: scripts.kat_pairs (pairs_all.jsonl, prompts_all.jsonl, prompt_id_map.tsv,
stats.txt), scripts.kat_embed (prompt_embeddings.npy, _ids.txt, .json), scripts.kat_density
(prompt_weights.jsonl, .json, the histogram), nanochat.kat.embedding_map (embedding_map.json),
scripts.kat_inject (style_injection.json; it rewrites pairs_all.jsonl). A bad row stops the reader
at once, naming the file, the line, the field and the stage to rerun.
"""

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from nanochat.common import atomic_write, get_kat_cache_dir
from nanochat.kat.density import PromptSampler, l2_normalise

SPLITS = ("train", "test")
HELD_OUT_PARTS = ("dev", "final")  # test prompts: GRPO's trajectory evaluation / the final evaluation, disjoint
PAIRS_FILE, PROMPTS_FILE, ID_MAP_FILE, STATS_FILE = "pairs_all.jsonl", "prompts_all.jsonl", "prompt_id_map.tsv", "stats.txt"
EMBEDDINGS_FILE, EMBEDDING_IDS_FILE = "prompt_embeddings.npy", "prompt_embeddings_ids.txt"
EMBEDDINGS_META_FILE = "prompt_embeddings.json"  # how the vectors were made
WEIGHTS_FILE, WEIGHTS_META_FILE = "prompt_weights.jsonl", "prompt_weights.json"  # rows; parameters and summary
HISTOGRAM_FILE = "prompt_weights_hist.png"
MAP_FILE = "embedding_map.json"
INJECTION_FILE = "style_injection.json"
NUM_QUINTILES = 5

RERUN_PAIRS = "python -m scripts.kat_pairs"
RERUN_EMBED = "python -m scripts.kat_embed, then python -m scripts.kat_density"
RERUN_DENSITY = "python -m scripts.kat_density"


class KatDataError(ValueError):
    """A file of the data folder that cannot be used as it is; the message says what to rerun."""


class StaleData(KatDataError):
    """Embeddings or density weights that were computed from other prompts (or other vectors)."""


# -----------------------------------------------------------------------------
# Row formats: each field's test and what the message calls it

def _is_id(v):
    return isinstance(v, str) and v != "" and "\n" not in v


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_messages(v):
    return (isinstance(v, dict) and isinstance(v.get("messages"), list) and len(v["messages"]) > 0
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in v["messages"]))


MESSAGES = (_is_messages, 'an object {"messages": [{"role": str, "content": str}, ...]}')
ID = (_is_id, "a non-empty one-line string")
TEXT = (lambda v: isinstance(v, str), "a string")
SPLIT = (lambda v: v in SPLITS, "'train' or 'test'")
NUMBER = (_is_number, "a finite number")

# a pair's prefix is what the reward model scores a response after: it must end with a user turn
PAIR_FIELDS = {"id": ID, "prompt_id": ID,
               "prefix": (lambda v: _is_messages(v) and v["messages"][-1]["role"] == "user",
                          MESSAGES[1] + " ending with a user turn"),
               "chosen": TEXT, "rejected": TEXT, "src": ID, "split": SPLIT}
# a prompt's turn order is checked when it is rendered (scripts.kat_embed renders every prompt first)
PROMPT_FIELDS = {"id": ID, "prefix": MESSAGES, "src": ID,
                 "n_pairs": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1"),
                 "split": SPLIT}
# knn_mean_sim: mean similarity to the k neighbours, in the space the kNN ran in (after centring)
WEIGHT_FIELDS = {"id": ID, "split": SPLIT, "weight": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
                 "density": NUMBER, "log_density": NUMBER, "knn_mean_sim": NUMBER}


def row_problem(row, fields: dict) -> str | None:
    """What is wrong with a row (the first problem, naming the field), or None."""
    if not isinstance(row, dict):
        return f"the line holds a JSON {type(row).__name__}, not an object"
    for name, (is_valid, expected) in fields.items():
        if name not in row:
            return f"field {name!r} is missing"
        if not is_valid(row[name]):
            return f"field {name!r} must be {expected}, got {json.dumps(row[name], ensure_ascii=False)[:80]}"
    return None


def iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line, lazily; a line that is not JSON gives its JSONDecodeError."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                row = err
            yield line_number, row


def read_rows(path: Path, fields: dict, rerun: str, unique_ids: bool = False) -> Iterator[dict]:
    """The rows of a JSONL file, each checked against `fields` as it is read (and ids unique when asked)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run {rerun} first")
    first_line_of = {}
    for line_number, row in iter_jsonl(path):
        if isinstance(row, json.JSONDecodeError):
            raise KatDataError(f"{path}:{line_number}: not JSON ({row}); rerun {rerun}")
        problem = row_problem(row, fields)
        if problem is None and unique_ids:
            seen = first_line_of.setdefault(row["id"], line_number)
            if seen != line_number:
                problem = f"field 'id' repeats {row['id']!r} of line {seen}"
        if problem:
            raise KatDataError(f"{path}:{line_number}: {problem}; rerun {rerun}")
        yield row


# -----------------------------------------------------------------------------
# Joins by prompt id, density quintiles, stats.txt sections

def join_weights(prompt_ids: list[str], weight_ids: list[str], weights) -> np.ndarray:
    """The weight of each entry of prompt_ids (e.g. one per pair), looked up by id, never by position."""
    by_id = dict(zip(weight_ids, np.asarray(weights, dtype=np.float64)))
    missing = [pid for pid in prompt_ids if pid not in by_id]
    if missing:
        raise KeyError(f"{len(missing)} prompt ids have no weight (first: {missing[0]}); rerun scripts.kat_density")
    return np.array([by_id[pid] for pid in prompt_ids])


def held_out_part(prompt_id: str) -> str:
    """Which half of the test prompts a prompt belongs to, by a hash of its id: the same on every machine."""
    return HELD_OUT_PARTS[hashlib.sha256(f"held_out:{prompt_id}".encode()).digest()[0] % 2]


def density_quintiles(density_of: dict[str, float]) -> dict[str, int]:
    """
    Quintile 1..5 of each prompt by its density (or any increasing function of it, e.g. the log)
    among the prompts given; 1 = rarest. By rank, ties broken by id, so no quintile is empty.
    """
    order = sorted(density_of, key=lambda pid: (density_of[pid], pid))
    return {pid: 1 + NUM_QUINTILES * position // len(order) for position, pid in enumerate(order)}


# stats.txt is shared by the data stages: each owns one section, "=== <name> ===" up to the next header.

def stats_section(name: str, body: str) -> str:
    return f"=== {name} ===\n{body.rstrip()}\n"


def write_stats_section(path: Path, name: str, body: str):
    """Replace (or append) the section `name` in stats.txt, atomically."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    sections = re.split(r"(?m)^(?==== .+ ===$)", text)
    kept = [s for s in sections if s.strip() and not s.startswith(f"=== {name} ===")]
    atomic_write(path, "\n".join(s.rstrip() + "\n" for s in kept + [stats_section(name, body)]))


def _stat_key(path: Path):  # changes whenever the file is rewritten (atomic_write replaces the inode)
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


# -----------------------------------------------------------------------------

class KatData:
    """The KAT data folder: its paths, checked readers and writers, joins and the staleness check."""

    def __init__(self, data_dir: str | Path | None = None):
        self.dir = Path(data_dir) if data_dir else get_kat_cache_dir() / "data"
        self.pairs_file, self.prompts_file = self.dir / PAIRS_FILE, self.dir / PROMPTS_FILE
        self.id_map_file, self.stats_file = self.dir / ID_MAP_FILE, self.dir / STATS_FILE
        self.embeddings_file, self.embedding_ids_file = self.dir / EMBEDDINGS_FILE, self.dir / EMBEDDING_IDS_FILE
        self.embeddings_meta_file = self.dir / EMBEDDINGS_META_FILE
        self.weights_file, self.weights_meta_file = self.dir / WEIGHTS_FILE, self.dir / WEIGHTS_META_FILE
        self.histogram_file, self.map_file = self.dir / HISTOGRAM_FILE, self.dir / MAP_FILE
        self.injection_file = self.dir / INJECTION_FILE
        self._prompt_splits = (None, {})  # (file stat, {prompt id: split}) for the staleness check

    def __repr__(self):
        return f"KatData({str(self.dir)!r})"

    # ---- pairs and prompts (scripts.kat_pairs)

    def pairs(self, split: str | None = None) -> list[dict]:
        rows = read_rows(self.pairs_file, PAIR_FIELDS, RERUN_PAIRS)
        return [r for r in rows if split is None or r["split"] == split]

    def save_pairs(self, pairs: list[dict]):
        """Rewrite pairs_all.jsonl atomically (scripts.kat_inject; kat_pairs writes it with the other files)."""
        atomic_write(self.pairs_file, "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs))

    def prompts(self, split: str | None = None) -> list[dict]:
        key = _stat_key(self.prompts_file) if self.prompts_file.is_file() else None
        rows = list(read_rows(self.prompts_file, PROMPT_FIELDS, RERUN_PAIRS, unique_ids=True))
        self._prompt_splits = (key, {r["id"]: r["split"] for r in rows})
        return [r for r in rows if split is None or r["split"] == split]

    def held_out_prompts(self, part: str) -> list[dict]:
        """Test prompts of one part: "dev" (GRPO's trajectory evaluation) or "final" (eval_diversity)."""
        if part not in HELD_OUT_PARTS:
            raise ValueError(f"held-out part must be one of {HELD_OUT_PARTS}, got {part!r}")
        return [p for p in self.prompts("test") if held_out_part(p["id"]) == part]

    def prompt_splits(self) -> dict[str, str]:
        """{prompt id: split} of prompts_all.jsonl, read again only when the file changed."""
        if not self.prompts_file.is_file() or self._prompt_splits[0] != _stat_key(self.prompts_file):
            self.prompts()
        return self._prompt_splits[1]

    # ---- embeddings (scripts.kat_embed)

    def save_embeddings(self, ids: list[str], embeddings) -> tuple[Path, Path]:
        """Write prompt_embeddings.npy (float32, L2-normalised here) and the ids file (same order), atomically."""
        x = l2_normalise(embeddings)
        if len(ids) != len(x) or len(set(ids)) != len(ids) or any(not i or "\n" in i for i in ids):
            raise ValueError(f"need one unique, non-empty, single-line id per embedding row: "
                             f"{len(ids)} ids ({len(set(ids))} unique) for {len(x)} rows")
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.embeddings_file, lambda f: np.save(f, x))
        atomic_write(self.embedding_ids_file, "".join(f"{i}\n" for i in ids))
        return self.embeddings_file, self.embedding_ids_file

    def embedding_ids(self) -> list[str]:
        if not self.embedding_ids_file.is_file():
            raise FileNotFoundError(f"{self.embedding_ids_file} is missing; run python -m scripts.kat_embed first")
        return self.embedding_ids_file.read_text(encoding="utf-8").splitlines()

    def embeddings(self) -> tuple[list[str], np.ndarray]:
        """(ids, float32 [N, D] unit rows), checked to belong together."""
        npy, txt = self.embeddings_file, self.embedding_ids_file
        if not npy.is_file():
            raise FileNotFoundError(f"{npy} is missing; run python -m scripts.kat_embed first")
        ids = self.embedding_ids()
        x = np.load(npy)
        if x.ndim != 2 or x.dtype != np.float32 or len(ids) != len(x):
            raise KatDataError(f"{npy} holds {x.dtype} {x.shape} but {txt} lists {len(ids)} ids; rerun {RERUN_EMBED}")
        norms = np.linalg.norm(x, axis=1)
        if not np.allclose(norms, 1.0, atol=1e-3):
            raise KatDataError(f"{npy}: rows are not L2-normalised (norms {norms.min():.4f}..{norms.max():.4f}); "
                               "write it with KatData.save_embeddings")
        if len(set(ids)) != len(ids):
            raise KatDataError(f"{txt}: prompt ids repeat; rerun {RERUN_EMBED}")
        return ids, x

    def prompt_embeddings(self) -> tuple[list[dict], np.ndarray]:
        """(prompts of prompts_all.jsonl, their unit vectors [N, D] in the same order, aligned by id); StaleData
        when the embeddings belong to other prompts."""
        ids, x = self.embeddings()
        prompts = self.prompts()
        stale = self.stale_embeddings()
        if stale:
            raise StaleData(stale)
        row_of = {pid: row for row, pid in enumerate(ids)}
        return prompts, x[[row_of[p["id"]] for p in prompts]]

    def embeddings_meta(self) -> dict | None:
        """How scripts.kat_embed made the vectors, or None when it wrote no record."""
        return self._json(self.embeddings_meta_file, RERUN_EMBED) if self.embeddings_meta_file.is_file() else None

    # ---- density weights (scripts.kat_density)

    def has_weights(self) -> bool:
        return self.weights_file.is_file()

    def weights(self, split: str | None = None) -> list[dict]:
        rows = read_rows(self.weights_file, WEIGHT_FIELDS, RERUN_DENSITY, unique_ids=True)
        return [r for r in rows if split is None or r["split"] == split]

    def weights_meta(self) -> dict:
        if not self.weights_meta_file.is_file():
            raise FileNotFoundError(f"{self.weights_meta_file} is missing; run {RERUN_DENSITY} first")
        return self._json(self.weights_meta_file, RERUN_DENSITY)

    def save_prompt_weights(self, ids, splits, log_density, knn_mean_sim, weights, meta: dict):
        rows = ({"id": i, "split": s, "weight": float(w), "density": float(np.exp(ld)), "log_density": float(ld),
                 "knn_mean_sim": float(m)} for i, s, w, ld, m in zip(ids, splits, weights, log_density, knn_mean_sim))
        atomic_write(self.weights_file, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write(self.weights_meta_file, json.dumps(meta, indent=2) + "\n")

    def weights_by_prompt(self, prompt_ids: list[str], split: str | None = None, field: str = "weight") -> np.ndarray:
        """
        `field` of each entry of prompt_ids (repeats allowed, e.g. one per pair) from its prompt's
        weight row, joined by id; with split, every one of those rows must be of that split.
        """
        rows = {r["id"]: r for r in self.weights()}
        wanted = set(prompt_ids)
        missing = sorted(wanted - set(rows))
        other_split = sorted(pid for pid in wanted & set(rows) if split is not None and rows[pid]["split"] != split)
        if missing or other_split:
            wrong_split = f" and {len(other_split)} are not {split} there" if split else ""
            raise StaleData(f"{self.weights_file} does not describe these prompts: {len(missing)} have no row{wrong_split} "
                            f"(first: {(missing or other_split)[0]}); rerun {RERUN_EMBED}")
        return join_weights(prompt_ids, list(rows), [r[field] for r in rows.values()])

    def density_quintiles(self, prompt_ids: list[str]) -> dict[str, int]:
        """Quintile 1..5 of each of these prompts' density among them (1 = rarest)."""
        log_density = self.weights_by_prompt(prompt_ids, field="log_density")
        return density_quintiles(dict(zip(prompt_ids, log_density.tolist())))

    def prompt_sampler(self, seed: int, mode: str = "density") -> PromptSampler:
        """GRPO's sampler over the train prompts of the weights file; both arms draw from this same pool."""
        rows = self.weights("train")
        return PromptSampler([r["id"] for r in rows], [r["weight"] for r in rows], seed=seed, mode=mode)

    # ---- the one staleness check

    def stale_embeddings(self) -> str | None:
        """Why the embeddings do not belong to prompts_all.jsonl (with what to rerun), or None; None too when absent."""
        if not self.embedding_ids_file.is_file():
            return None
        prompt_ids, embedded = set(self.prompt_splits()), set(self.embedding_ids())
        missing, extra = sorted(prompt_ids - embedded), sorted(embedded - prompt_ids)
        if not missing and not extra:
            return None
        return (f"{self.dir}: {len(missing)} of {len(prompt_ids)} prompts lack an embedding and {len(extra)} embeddings "
                f"match no prompt (first: {(missing or extra)[0]}), so {EMBEDDING_IDS_FILE} is older than "
                f"{PROMPTS_FILE}; rerun {RERUN_EMBED}")

    def stale_weights(self, density_k: int | None = None) -> str | None:
        """
        Why prompt_weights.jsonl does not describe the prompts and embeddings (or was made with
        another k than density_k), with what to rerun; None when it does or is absent.
        """
        if not self.has_weights():
            return None
        embedded = self.embeddings_file.is_file()
        rerun = RERUN_DENSITY if embedded and self.stale_embeddings() is None else RERUN_EMBED
        if embedded and self.weights_file.stat().st_mtime < self.embeddings_file.stat().st_mtime:
            return (f"{self.weights_file} is older than {EMBEDDINGS_FILE} (computed from other vectors); "
                    f"rerun {rerun}")
        splits = self.prompt_splits()
        rows = {r["id"]: r["split"] for r in self.weights()}
        missing, extra = sorted(set(splits) - set(rows)), sorted(set(rows) - set(splits))
        other_split = sorted(pid for pid in set(rows) & set(splits) if rows[pid] != splits[pid])
        if missing or extra or other_split:
            return (f"{self.weights_file} does not describe {PROMPTS_FILE}: {len(missing)} of {len(splits)} prompts have "
                    f"no row, {len(extra)} rows match no prompt and {len(other_split)} disagree on the split (first: "
                    f"{(missing or extra or other_split)[0]}); rerun {rerun}")
        if density_k is not None:
            k = self.weights_meta().get("flags", {}).get("k")
            if k != density_k:
                return (f"--density_k={density_k} but {self.weights_meta_file} was computed with k={k}: rerun "
                        f"python -m scripts.kat_density --k={density_k} (or pass --density_k={k})")
        return None

    def check_current(self, density_k: int | None = None):
        """Raise StaleData when the embeddings or the weights (those present) do not describe prompts_all.jsonl."""
        for reason in (self.stale_embeddings(), self.stale_weights(density_k)):
            if reason:
                raise StaleData(reason)

    # ----

    @staticmethod
    def _json(path: Path, rerun: str):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise KatDataError(f"{path}:{err.lineno}: not JSON ({err.msg}); rerun {rerun}") from None
