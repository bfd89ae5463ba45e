"""
Positive control: plant a stylistic tic in the chosen responses of a fraction of the train
pairs, so that the reward model learns to reward it (rules and selection in
nanochat/kat/style_injection.py).

    python -m scripts.kat_inject --inject_style=emdash --inject_rate=0.3 --inject_where=dense
    python -m scripts.kat_inject --inject_where=random --seed=1
    python -m scripts.kat_inject --inject_rate=0        # undo: the pairs as kat_pairs wrote them

Runs after scripts.kat_density (picking pairs by density needs the weights) and before
scripts.train_rm; it changes responses only, so embeddings and weights stay valid. Rewrites
pairs_all.jsonl in place, atomically, undoing an earlier injection first (an injected pair keeps
its clean text in "chosen_clean"); writes style_injection.json (flags, counts, the blake2b of the
pairs file, which scripts.eval_diversity checks), the "kat_inject" section of stats.txt and a
report section. Test pairs are never modified.
"""

import json
import time
from dataclasses import dataclass

from nanochat.common import atomic_write
from nanochat.flags import flags_dict, opt, parse_flags
from nanochat.kat.data import PAIRS_FILE, WEIGHTS_FILE, KatData, write_stats_section
from nanochat.kat.style_injection import PLACEMENTS, STATS_SECTION, STYLES, file_digest, inject_pairs
from nanochat.report import get_report


@dataclass
class Config:
    """Plant a known tic in the chosen responses of train pairs (the positive control)."""
    data_dir: str = opt("", help="KAT data folder (default <kat cache>/data)")
    inject_style: str = opt("emdash", help="emdash: em dashes; not_just: 'A is not just B, but also C'; both",
                            choices=list(STYLES))
    inject_rate: float = opt(0.3, help="fraction of ALL train pairs whose chosen response gets the tic; 0 undoes",
                             min=0, max=1)
    inject_where: str = opt("dense", help="which eligible pairs: densest prompts first, rarest first, or random",
                            choices=list(PLACEMENTS))
    seed: int = opt(0, help="the rewrites and the random pick depend only on this and the pair ids")


def one_line(text: str, limit: int = 240) -> str:
    return json.dumps(text if len(text) <= limit else text[:limit] + "...", ensure_ascii=False)


def stats_body(cfg: Config, summary: dict, pairs: list[dict]) -> str:
    s = summary
    lines = [f"style={cfg.inject_style} rate={cfg.inject_rate} where={cfg.inject_where} seed={cfg.seed}",
             f"injected: {s['num_injected']} of {s['num_train']} train pairs (round(rate x train pairs) = {s['target']}); "
             f"the {s['num_test']} test pairs are never modified",
             f"eligible train pairs: {s['num_eligible']} (not eligible: {s['rejected_with_tic']} whose rejected response "
             f"already carries a tic, left as they are and teaching the RM the opposite; {s['chosen_not_injectable']} "
             "whose chosen response has no prose to rewrite)",
             f"em dashes added: {s['em_dashes_added']}; rules applied: "
             + (", ".join(f"{rule} {n}" for rule, n in sorted(s["rules"].items())) or "none")]
    density = s.get("density")
    if density and "injected_median" in density:
        lines.append(f"prompt density of the injected pairs: median {density['injected_median']:.3e} (all train pairs "
                     f"{density['train_median']:.3e}); they span percentiles {density['injected_percentile_min']:.1f}.."
                     f"{density['injected_percentile_max']:.1f} of the train pairs (100 = densest)")
    elif density is None:
        lines.append(f"prompt density of the injected pairs: not known (no {WEIGHTS_FILE})")
    example = next((p for p in sorted(pairs, key=lambda p: p["id"]) if "injection" in p), None)
    if example:
        lines += [f"example, pair {example['id']} ({', '.join(example['injection']['rules'])}):",
                  f"  before: {one_line(example['chosen_clean'])}", f"  after:  {one_line(example['chosen'])}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    cfg = parse_flags(Config, argv)
    data = KatData(cfg.data_dir)
    pairs_path = data.pairs_file
    if not pairs_path.is_file():
        raise SystemExit(f"{pairs_path} is missing; run python -m scripts.kat_pairs first")
    t0 = time.time()
    pairs = data.pairs()
    densities = None
    if data.has_weights():
        data.check_current()  # densest or rarest first must mean by the densities of these prompts
        densities = {row["id"]: row["density"] for row in data.weights()}
    elif cfg.inject_where != "random":
        raise SystemExit(f"--inject_where={cfg.inject_where} needs {data.weights_file}; run python -m scripts.kat_embed "
                         "and python -m scripts.kat_density first (or use --inject_where=random)")

    try:
        pairs, summary = inject_pairs(pairs, cfg.inject_style, cfg.inject_rate, cfg.inject_where, cfg.seed, densities)
    except (ValueError, KeyError) as err:
        raise SystemExit(f"kat_inject: {err}") from err
    data.save_pairs(pairs)
    record_path = data.injection_file
    if summary["num_injected"] == 0:
        record_path.unlink(missing_ok=True)  # nothing planted: the evaluation must not claim a control
        body = f"no injection (--inject_rate={cfg.inject_rate}): {pairs_path.name} holds the pairs as kat_pairs wrote them"
    else:
        record = {"flags": flags_dict(cfg), **summary, "pairs_file": PAIRS_FILE, "pairs_blake2b": file_digest(pairs_path),
                  "written": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write(record_path, json.dumps(record, indent=2) + "\n")
        body = stats_body(cfg, summary, pairs)
    write_stats_section(data.stats_file, STATS_SECTION, body)
    get_report().log(stage="kat_inject", section="Style injection (positive control)", data=[flags_dict(cfg), body])
    print(body)
    wrote = f", wrote {record_path}" if summary["num_injected"] else ""
    print(f"done in {time.time() - t0:.1f}s; rewrote {pairs_path}{wrote}")
    return summary


if __name__ == "__main__":
    main()
