"""
Time BPE training on ~80 MB of real English text with 2 threads, all trainers in one run:
our rustbpe and PyPI rustbpe 0.1.0 at vocab 65,536, HuggingFace tokenizers' BpeTrainer at 8,192
(SPEC section 7: ours must take <= 0.8x PyPI rustbpe's time). Also checks that ours and PyPI
rustbpe learn the same merges on a small slice (same counts, same tie-breaking).

    python -m dev.bench_tokenizer                       # 80 MB, 2 threads, 2 timed runs each
    python -m dev.bench_tokenizer --corpus_mb=50 --repeats=1 --hf=false

The corpus is documentation and dictionary text from five Debian packages (SOURCES), fetched with
`apt-get download` and unpacked with `dpkg-deb -x` (nothing is installed), cut into documents of
about 4 KB and cached in $NANOCHAT_KAT_CACHE/bench_tokenizer/ (outside git). Each trainer runs in
its own subprocess; only train_from_iterator on an in-memory list is timed.
"""

import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.flags import opt, parse_flags

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.8
DOC_CHARS = 4000  # documents of about 4 KB, like web pages in FineWeb


@dataclass
class Config:
    """Benchmark BPE training: our rustbpe vs PyPI rustbpe 0.1.0 vs HuggingFace tokenizers."""
    corpus_mb: int = opt(80, help="corpus size in MB (UTF-8 bytes); at least 50 for the SPEC comparison")
    vocab_size: int = opt(65536, help="vocabulary for both rustbpe builds")
    hf_vocab_size: int = opt(8192, help="vocabulary for HuggingFace BpeTrainer (its reference figure)")
    threads: int = opt(2, help="RAYON_NUM_THREADS for every trainer")
    repeats: int = opt(2, help="timed runs of each rustbpe, interleaved; the best is compared")
    hf: bool = opt(True, help="also time HuggingFace tokenizers")
    check_mb: int = opt(4, help="slice on which ours and PyPI rustbpe must learn identical merges")
    check_vocab_size: int = opt(8192, help="vocabulary for that check")
    pypi_dir: str = opt("/tmp/pypi_rustbpe", help="where PyPI rustbpe 0.1.0 is installed (pip --target)")
    job: str = opt("", help="internal: run one trainer from this job file and print its result")


# -----------------------------------------------------------------------------
# corpus

def paragraphs_to_documents(text):
    """Pack blank-line separated paragraphs into documents of about DOC_CHARS characters."""
    doc = []
    size = 0
    for paragraph in re.split(r"\n\s*\n", text):
        doc.append(paragraph)
        size += len(paragraph)
        if size >= DOC_CHARS:
            yield "\n\n".join(doc) + "\n"
            doc, size = [], 0
    if doc and size > 0:
        yield "\n\n".join(doc) + "\n"


def read_text(path):
    opener = gzip.open if path.suffix in (".gz", ".dz") else open
    with opener(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def wordnet_glosses(path):
    # data.noun lines: "offset lex_filenum ss_type words ... | gloss; "example""; licence header lines start with two spaces
    glosses = [line.partition(" | ")[2].strip() for line in read_text(path).splitlines() if not line.startswith("  ")]
    return "\n\n".join(g for g in glosses if g)


# Debian 12 package names, taken in this order until --corpus_mb is reached:
# Linux kernel documentation (rst/txt); the Python 3.11 docs (reStructuredText); Perl manual pages (POD);
# WordNet 3.0 glosses and examples (after '|'); GCIDE, the GNU Collaborative International Dictionary
# of English (Webster 1913).
SOURCES = [
    ("linux-doc-6.1", ["usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz",
                       "usr/share/doc/linux-doc-6.1/Documentation/**/*.txt.gz"], read_text),
    ("python3.11-doc", ["usr/share/doc/python3.11/html/_sources/**/*.txt"], read_text),
    ("perl-doc", ["usr/share/perl/*/pod/*.pod"], read_text),
    ("wordnet-base", ["usr/share/wordnet/data.noun", "usr/share/wordnet/data.verb",
                      "usr/share/wordnet/data.adj", "usr/share/wordnet/data.adv"], wordnet_glosses),
    ("dict-gcide", ["usr/share/dictd/gcide.dict.dz"], read_text),
]


def unpack_package(package, work_dir):
    """apt-get download + dpkg-deb -x into work_dir/<package>/ (no installation, no root)."""
    target = work_dir / package
    if target.is_dir():
        return target
    debs = work_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not found:
        raise RuntimeError(f"`apt-get download {package}` failed ({result.stderr.strip()}); "
                           f"run `apt-get update` first (Debian 12 package names are assumed)")
    partial = work_dir / f"{package}.partial"
    subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(partial)], check=True)
    partial.rename(target)
    return target


def build_corpus(corpus_mb, cache_dir):
    """Write the corpus as JSON lines (one document a line) and return its path."""
    path = cache_dir / f"corpus_{corpus_mb}mb.jsonl"
    if path.exists():
        return path
    target_bytes = corpus_mb * 1_000_000
    total = 0
    with tempfile.NamedTemporaryFile("w", dir=cache_dir, suffix=".partial", delete=False, encoding="utf-8") as out:
        for package, globs, reader in SOURCES:
            root = unpack_package(package, cache_dir / "debian")
            files = sorted(f for pattern in globs for f in root.glob(pattern))
            if not files:
                raise RuntimeError(f"{package}: nothing matches {globs} under {root}")
            taken = 0
            for file in files:
                for doc in paragraphs_to_documents(reader(file)):
                    out.write(json.dumps(doc) + "\n")
                    size = len(doc.encode("utf-8"))
                    total += size
                    taken += size
                    if total >= target_bytes:
                        break
                if total >= target_bytes:
                    break
            print(f"  {package}: {taken / 1e6:.1f} MB from {len(files)} files")
            if total >= target_bytes:
                break
    if total < target_bytes:
        os.unlink(out.name)
        raise RuntimeError(f"the sources hold only {total / 1e6:.1f} MB, less than --corpus_mb={corpus_mb}")
    os.replace(out.name, path)
    return path


def load_documents(corpus, limit_bytes):
    docs, total = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line))
            total += len(docs[-1].encode("utf-8"))
            if total >= limit_bytes:
                break
    return docs, total


# -----------------------------------------------------------------------------
# one trainer, in a subprocess

def run_job(job):
    docs, total = load_documents(job["corpus"], job["limit_bytes"])
    if job["trainer"] == "hf":
        from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE
        from tokenizers.trainers import BpeTrainer
        # configured as nanochat's HuggingFaceTokenizer: GPT-4 style split, then byte-level
        tokenizer = Tokenizer(BPE(byte_fallback=True, unk_token=None, fuse_unk=False))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(job["pattern"]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tokenizer.decoder = decoders.ByteLevel()
        trainer = BpeTrainer(vocab_size=job["vocab_size"], show_progress=False, min_frequency=0,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=job["special_tokens"])
        t0, cpu0 = time.perf_counter(), time.process_time()
        tokenizer.train_from_iterator(docs, trainer)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        vocab = tokenizer.get_vocab_size()
        module = "tokenizers"
    else:
        import rustbpe
        module = rustbpe.__file__
        from_pypi = module.startswith(job["pypi_dir"])
        if from_pypi != (job["trainer"] == "pypi"):
            raise RuntimeError(f"trainer {job['trainer']!r} imported rustbpe from {module}")
        tokenizer = rustbpe.Tokenizer()
        t0, cpu0 = time.perf_counter(), time.process_time()
        tokenizer.train_from_iterator(iter(docs), job["vocab_size"], pattern=job["pattern"])
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        ranks = tokenizer.get_mergeable_ranks()
        vocab = len(ranks)
        if job.get("ranks_out"):
            Path(job["ranks_out"]).write_text(json.dumps([bytes(token).hex() for token, _ in ranks]))
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "vocab": vocab, "docs": len(docs), "bytes": total, "module": module}))


def ensure_pypi_rustbpe(pypi_dir):
    # installed with uv into its own --target folder, put on PYTHONPATH only for the "pypi" trainer
    if (Path(pypi_dir) / "rustbpe").is_dir():
        return
    print(f"installing PyPI rustbpe==0.1.0 into {pypi_dir}")
    subprocess.run(["uv", "pip", "install", "--python", sys.executable, "--target", pypi_dir, "rustbpe==0.1.0"],
                   check=True)


def spawn(cfg, trainer, corpus, limit_bytes, vocab_size, ranks_out=None):
    from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN
    env = dict(os.environ, RAYON_NUM_THREADS=str(cfg.threads), RAYON_RS_NUM_CPUS=str(cfg.threads),
               TOKENIZERS_PARALLELISM="true")
    env.pop("PYTHONPATH", None)  # ours and PyPI rustbpe share the module name `rustbpe`: one per process
    if trainer == "pypi":
        env["PYTHONPATH"] = cfg.pypi_dir
    job = dict(trainer=trainer, corpus=str(corpus), limit_bytes=limit_bytes, vocab_size=vocab_size,
               pattern=SPLIT_PATTERN, special_tokens=SPECIAL_TOKENS, pypi_dir=cfg.pypi_dir, ranks_out=ranks_out)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        result = subprocess.run([sys.executable, "-m", "dev.bench_tokenizer", f"--job={f.name}"], cwd=REPO_ROOT,
                                env=env, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if result.returncode != 0:
        raise RuntimeError(f"{trainer} trainer failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare_ranks(ours, pypi):
    """'yes', or where the two token lists first part (rank = merge order + 256)."""
    first_difference = next((i for i, (a, b) in enumerate(zip(ours, pypi)) if a != b), None)
    if first_difference is None and len(ours) == len(pypi):
        return "yes"
    if first_difference is None:
        return f"NO: same first {min(len(ours), len(pypi))} tokens, then ours has {len(ours)}, PyPI {len(pypi)}"
    return (f"NO: first difference at rank {first_difference}: ours {bytes.fromhex(ours[first_difference])!r}, "
            f"PyPI {bytes.fromhex(pypi[first_difference])!r}")


def main():
    cfg = parse_flags(Config)
    if cfg.job:
        run_job(json.loads(Path(cfg.job).read_text()))
        return
    from nanochat.common import get_kat_cache_dir
    cache_dir = get_kat_cache_dir() / "bench_tokenizer"
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"corpus: {cfg.corpus_mb} MB of English documentation and dictionary text (see this file's docstring)")
    corpus = build_corpus(cfg.corpus_mb, cache_dir)
    ensure_pypi_rustbpe(cfg.pypi_dir)
    limit = cfg.corpus_mb * 1_000_000

    # same merges? first on a small slice, later on the timed full runs
    for trainer in ("ours", "pypi"):
        spawn(cfg, trainer, corpus, cfg.check_mb * 1_000_000, cfg.check_vocab_size,
              ranks_out=str(cache_dir / f"check_ranks_{trainer}.json"))
    small_check = compare_ranks(*(json.loads((cache_dir / f"check_ranks_{t}.json").read_text()) for t in ("ours", "pypi")))

    load_before = os.getloadavg()[0]
    runs = {"ours": [], "pypi": []}
    for repeat in range(cfg.repeats):
        for trainer in ("ours", "pypi"):
            ranks_out = str(cache_dir / f"ranks_{trainer}.json") if repeat == 0 else None
            runs[trainer].append(spawn(cfg, trainer, corpus, limit, cfg.vocab_size, ranks_out=ranks_out))
    full_check = compare_ranks(*(json.loads((cache_dir / f"ranks_{t}.json").read_text()) for t in ("ours", "pypi")))
    if cfg.hf:
        runs["hf"] = [spawn(cfg, "hf", corpus, limit, cfg.hf_vocab_size)]

    names = {"ours": "ours (rustbpe/, this repo)", "pypi": "PyPI rustbpe 0.1.0", "hf": "HF tokenizers BpeTrainer"}
    first = runs["ours"][0]
    print(f"\nBPE training on {first['bytes'] / 1e6:.1f} MB ({first['docs']:,} documents), "
          f"RAYON_NUM_THREADS={cfg.threads}, {os.cpu_count()} CPUs visible, "
          f"load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after (other processes slow every trainer)")
    print(f"{'trainer':<28} {'vocab':>7} {'best s':>8} {'best cpu s':>11}   all runs, wall (s)")
    best = {}
    for trainer, trainer_runs in runs.items():
        walls = [r["seconds"] for r in trainer_runs]
        best[trainer] = min(walls)
        print(f"{names[trainer]:<28} {trainer_runs[0]['vocab']:>7} {best[trainer]:>8.2f} "
              f"{min(r['cpu_seconds'] for r in trainer_runs):>11.2f}   {', '.join(f'{w:.2f}' for w in walls)}")
    ratio = best["ours"] / best["pypi"]
    print(f"ours / PyPI rustbpe = {ratio:.2f} (target <= {TARGET_RATIO}): {'PASS' if ratio <= TARGET_RATIO else 'FAIL'}")
    print(f"merges identical to PyPI rustbpe on {cfg.check_mb} MB at vocab {cfg.check_vocab_size}: {small_check}")
    print(f"merges identical to PyPI rustbpe on the timed {cfg.corpus_mb} MB runs at vocab {cfg.vocab_size}: {full_check}")


if __name__ == "__main__":
    main()
