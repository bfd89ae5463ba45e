"""
What a GRPO run records on its way (scripts/grpo.py): the trajectory evaluation's rows
(trajectory.jsonl, one per evaluation on the dev prompts) and what the prompt sampler drew
(draws.json). Formats: /work/kat_interfaces.md's contract with scripts.eval_diversity's report.

    log = TrajectoryLog(out_dir)          # trajectory.jsonl; log.keep_before(step) on resume
    log.append(trajectory_row(step, ...))
    draws = DrawCounts(source_of, quintile_of); draws.add(ids); draws.summary(mode)   # draws.json

Figures are the per-prompt ones of nanochat/kat/diversity.py, averaged over prompts (nan left
out), as eval_diversity averages them; across_prompt_distance is the corpus figure.
"""

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from nanochat.common import atomic_write
from nanochat.kat import diversity as dv

TRAJECTORY_FILE, DRAWS_FILE, CHECKPOINT_DIR = "trajectory.jsonl", "draws.json", "traj"
FIELDS = ("step", "kl", "policy_reward", "judge_reward", "distinct_2", "self_bleu", "within_prompt_distance",
          "across_prompt_distance", "em_dash_per_1k_chars", "not_x_but_y_per_1k_chars", "completion_len",
          "truncated_frac", "checkpoint")


def checkpoint_name(step: int) -> str:
    """A trajectory checkpoint's path relative to the run folder."""
    return f"{CHECKPOINT_DIR}/step_{step:06d}.pt"


def _mean(values) -> float | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None  # JSON has no nan: null means "undefined"


def trajectory_row(step: int, texts: list[list[str]], token_ids: list[list[list[int]]], truncated: list[list[bool]],
                   embeddings, sequence_kl, policy_rewards, judge_rewards, vocab_size: int, checkpoint: str | None) -> dict:
    """
    One row of trajectory.jsonl from P dev prompts x N samples: texts, token ids (no special tokens),
    truncated flags, embeddings [P, N, D] (unit rows, the reference's), per-sample sequence KL
    (sum over sampled tokens of log pi - log ref, nats), policy-RM and judge rewards (judge: None).
    """
    num_prompts = len(texts)
    if num_prompts < 2 or any(len(row) < 2 for row in texts):
        raise ValueError(f"a trajectory evaluation needs >= 2 prompts with >= 2 samples each, got {[len(r) for r in texts]}")
    per_prompt = [dv.prompt_metrics(texts[p], token_ids[p], vocab_size) for p in range(num_prompts)]
    embeddings = np.asarray(embeddings, dtype=np.float64)
    row = {"step": step, "kl": _mean(np.ravel(sequence_kl)), "policy_reward": _mean(np.ravel(policy_rewards)),
           "judge_reward": None if judge_rewards is None else _mean(np.ravel(judge_rewards))}
    for name in ("distinct_2", "self_bleu"):
        row[name] = _mean(m[name] for m in per_prompt)
    row["within_prompt_distance"] = _mean(dv.mean_pairwise_distance(e) for e in embeddings)
    row["across_prompt_distance"] = _mean([dv.across_prompt_distance(embeddings)])
    for name in ("em_dash_per_1k_chars", "not_x_but_y_per_1k_chars"):
        row[name] = _mean(m[name] for m in per_prompt)
    row["completion_len"] = _mean(len(ids) for sample_ids in token_ids for ids in sample_ids)  # tokens, no stop token
    row["truncated_frac"] = _mean(float(t) for flags in truncated for t in flags)
    row["checkpoint"] = checkpoint
    return row


class TrajectoryLog:
    """trajectory.jsonl in a run folder, rewritten whole at each append (atomic: a kill never leaves half a row)."""

    def __init__(self, out_dir):
        self.path = Path(out_dir) / TRAJECTORY_FILE

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = []
        for line_number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path}:{line_number}: not JSON ({err.msg}); delete the file and rerun the "
                                 "stage from the start") from None
            missing = [f for f in FIELDS if f not in row]
            if missing:
                raise ValueError(f"{self.path}:{line_number}: fields {missing} are missing; it was written by another "
                                 "version: delete it and rerun the stage from the start")
            rows.append(row)
        return rows

    def _write(self, rows: list[dict]):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, "".join(json.dumps(row) + "\n" for row in rows))

    def keep_before(self, step: int):
        """Drop the rows at steps >= step (a resumed run recomputes them from the same weights and seeds)."""
        self._write([row for row in self.rows() if row["step"] < step])

    def append(self, row: dict):
        rows = self.rows()
        if rows and rows[-1]["step"] >= row["step"]:
            raise ValueError(f"{self.path}: row for step {row['step']} after one for step {rows[-1]['step']}")
        self._write(rows + [row])


class DrawCounts:
    """
    Draw counts of every prompt so far, with their Kish ESS kept up to date in O(1) per draw and,
    given each prompt's source and density quintile (1 = rarest), the draws by source and quintile.
    """

    def __init__(self, source_of: dict | None = None, quintile_of: dict | None = None):
        self.counts, self.total, self.sum_sq = Counter(), 0, 0
        self.source_of, self.quintile_of = source_of, quintile_of
        self.by_source, self.by_quintile = Counter(), Counter({str(q): 0 for q in range(1, 6)})

    def add(self, ids):
        for pid in ids:
            c = self.counts[pid]
            self.counts[pid] = c + 1
            self.total += 1
            self.sum_sq += 2 * c + 1  # (c + 1)^2 - c^2
            if self.source_of is not None:
                self.by_source[self.source_of[pid]] += 1
            if self.quintile_of is not None:
                self.by_quintile[str(self.quintile_of[pid])] += 1

    def ess(self) -> float:
        return self.total ** 2 / self.sum_sq if self.sum_sq else 0.0

    def summary(self, mode: str) -> dict:
        """draws.json: what the sampler drew over the whole run."""
        if self.source_of is None or self.quintile_of is None:
            raise ValueError("DrawCounts.summary needs the prompts' sources and density quintiles")
        return {"prompt_sampling": mode, "draws": self.total, "unique_prompts": len(self.counts), "kish_ess": self.ess(),
                "source_mix": dict(sorted(self.by_source.items())), "density_quintiles": dict(sorted(self.by_quintile.items()))}
