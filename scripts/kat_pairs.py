"""
Preference pairs for the KAT experiment: HH-RLHF, UltraFeedback (binarized) and Stack Exchange
preferences, normalised into one schema (SPEC section 4; decisions in nanochat/kat/pairs.py).

    python -m scripts.kat_pairs                                   # stream from the HF hub (pip install datasets)
    python -m scripts.kat_pairs --max_pairs=50000                 # cap pairs per source and split
    python -m scripts.kat_pairs --local_dir=nanochat/samples/kat  # offline, the tiny preset's samples

Writes pairs_all.jsonl, prompts_all.jsonl, prompt_id_map.tsv and stats.txt into --out_dir (default
the data folder, <kat cache>/data), all or nothing. Stack Exchange preferences (10M+ questions) is
streamed, never loaded whole; without --max_pairs a full pass takes hours. A cap keeps a sample
chosen by prompt-id hash from the first --scan_factor x --max_pairs pairs of each split, not the
first rows of a stream (stored by subset and by site; nanochat/kat/pairs.py says what bias is left).
"""

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from nanochat.flags import flags_dict, opt, parse_flags
from nanochat.kat.data import KatData
from nanochat.kat.pairs import SOURCES, build_pair_files, iter_hf_rows, iter_local_rows


@dataclass
class Config:
    """Build the preference pairs (pairs_all.jsonl and friends)."""
    only: str = opt("", help=f"comma list of sources to use (default all: {','.join(SOURCES)})")
    max_pairs: int = opt(0, help="at most this many pairs per source and split, a sample chosen by prompt-id hash; "
                         "0 keeps all", min=0)
    scan_factor: int = opt(10, help="with --max_pairs: read up to scan_factor x max_pairs pairs of each split and "
                           "sample from them (a stream stops there); 0 reads every split to its end", min=0)
    out_dir: str = opt("", help="where to write (default <kat cache>/data)")
    local_dir: str = opt("", help="read local JSONL files in the HF row schemas instead of downloading")
    se_pairs_per_question: int = opt(3, help="Stack Exchange: at most this many pairs per question", min=1)
    se_test_fraction: float = opt(0.01, help="Stack Exchange: fraction of questions held out as test", min=0, below=1)


def main(argv: list[str] | None = None):
    cfg = parse_flags(Config, argv)
    sources = [s.strip() for s in cfg.only.split(",") if s.strip()] if cfg.only else list(SOURCES)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise SystemExit(f"--only: unknown source(s) {unknown}; choose from {','.join(SOURCES)}")
    if cfg.max_pairs < 0 or cfg.scan_factor < 0 or cfg.se_pairs_per_question < 1 or not 0.0 <= cfg.se_test_fraction < 1.0:
        raise SystemExit("need --max_pairs >= 0, --scan_factor >= 0, --se_pairs_per_question >= 1 and "
                         "0 <= --se_test_fraction < 1")
    data = KatData(cfg.out_dir)
    rows_for_source = partial(iter_local_rows, Path(cfg.local_dir)) if cfg.local_dir else iter_hf_rows
    print(f"kat_pairs: {flags_dict(cfg)}\nsources: {', '.join(sources)} -> {data.dir}", flush=True)

    t0 = time.time()
    build_pair_files(sources, rows_for_source, data.dir, max_pairs=cfg.max_pairs, se_pairs_per_question=cfg.se_pairs_per_question,
                     se_test_fraction=cfg.se_test_fraction, scan_factor=cfg.scan_factor)
    print(data.stats_file.read_text(encoding="utf-8"))
    print(f"done in {time.time() - t0:.1f}s; wrote {data.dir}", flush=True)


if __name__ == "__main__":
    main()
