"""
Does density-aware prompt sampling in GRPO reduce mode collapse? Sample SFT and every GRPO run (S
seeds per arm, and each run's trajectory checkpoints around a matched KL) on the same final held-out
prompts with the same seeds, measure diversity, tics and quality (the independent judge, the policy
RM beside it), compare the arms over seeds then prompts, and write the report.

    python -m scripts.eval_diversity                        # every grpo_* run folder under outs/
    python -m scripts.eval_diversity --num_prompts=100 --num_samples=4 --kl_budget=2.0
    python -m scripts.eval_diversity --runs=grpo_density,grpo_baseline,grpo_density_s1,grpo_baseline_s1
    torchrun --standalone --nproc_per_node=8 -m scripts.eval_diversity -- --num_prompts=500

Writes <output_report> (default <kat cache>/diversity_report.md), its PNG plots, a JSON of every
figure (same name, .json), the responses of SFT and every run's final model (<stem>_samples.jsonl)
and the report card's section; a "Positive control" section when scripts.kat_inject planted a tic.
It opens with the controls (nanochat/kat/controls.py); --control=sampler|null reads this run as that
control and writes its outcome. Computing: diversity_eval.py, arm_stats.py; rendering: diversity_report.py.
"""

import gc
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import find_stage_checkpoint, load_model
from nanochat.common import (compute_cleanup, compute_init, git_commit, get_kat_cache_dir, print0, setup_logging,
                             stage_dir)
from nanochat.kat.arm_stats import analyse_arms, collapse_alarm
from nanochat.kat.controls import (controls_dir, null_control, per_prompt_marker_rates, plant_record, read_outcomes,
                                   sampler_control, synthetic_controls, write_outcome)
from nanochat.kat.controls_report import controls_headline
from nanochat.kat.data import KatData
from nanochat.kat.density import kish_ess
from nanochat.kat.diversity_eval import (HYPOTHESIS, REFERENCE, common_length_tables, evaluate, model_tables)
from nanochat.kat.diversity_report import control_outcome, fmt_ci, fmt_p, fmt_signed, headline, write_report
from nanochat.engine import Engine
from nanochat.flags import flags_dict, opt, parse_flags
from nanochat.kat.embed import response_embeddings
from nanochat.kat.pairs import first_user_message
from nanochat.report import get_report
from nanochat.kat.reward_model import load_reward_model
from nanochat.kat.runs import bracket, discover_runs, kl_target, load_runs
from nanochat.kat.style_injection import file_digest, policy_probes, probe_pairs, tic_preference
from nanochat.tokenizer import get_tokenizer


@dataclass
class Config:
    """Diversity of SFT and of every GRPO run on the final held-out prompts; the arms compared over seeds and prompts."""
    sft_model: str = opt("sft", help="the reference model (and the embedder): stage name or checkpoint path")
    runs: str = opt("", help="comma-separated GRPO run stages or folders; empty: every grpo_density[_sN], "
                             "grpo_baseline[_sN] and grpo_shuffled[_sN] under outs/")
    extra_models: str = opt("", help="comma-separated further stages or paths, each compared with SFT (e.g. rl,mid)")
    judge: str = opt("rm_judge", help="the independent judge (scripts.train_rm --role=judge): stage or path; empty: "
                                      "none, and quality is then only the policy RM's, which GRPO optimised")
    reward_model: str = opt("rm", help="the policy RM (GRPO's reward), shown beside the judge: stage or path; empty: none")
    kl_budget: float = opt(-1.0, help="the KL (nats, on the dev prompts) the runs are compared at; -1: the largest KL "
                                      "every run reached", min=0, sentinel=-1)
    data_dir: str = opt("", help="KAT data folder with prompts_all.jsonl (default <kat cache>/data)")
    output_report: str = opt("", help="markdown report path (default <kat cache>/diversity_report.md)")
    num_prompts: int = opt(500, help="final held-out prompts, stratified by source and density quintile", min=2)
    num_samples: int = opt(8, help="samples per prompt (>= 2: within-prompt metrics compare samples)", min=2)
    max_tokens: int = opt(256, help="new tokens per sample", min=1)
    temperature: float = opt(1.0, min=0)
    top_k: int = opt(0, help="0: no top-k filtering", min=0)
    top_p: float = opt(1.0, help="1: no nucleus filtering", above=0, max=1)
    seed: int = opt(42, help="prompt selection and sampling seed", min=0)
    batch_size: int = opt(32, help="prompts per engine call (each with num_samples rows); prompts go by length", min=1)
    embed_batch_size: int = opt(32, help="responses per embedding or reward-model forward pass", min=1)
    max_prompt_tokens: int = opt(1024, help="leave out test prompts longer than this when rendered", min=1)
    density_strata: bool = opt(True, help="stratify by density quintile too (needs prompt_weights.jsonl)")
    mattr_window: int = opt(50, help="MATTR window in words", min=1)
    num_resamples: int = opt(10_000, help="bootstrap resamples and permutation sign patterns", min=1)
    num_corpus_resamples: int = opt(1000, help="resamples for corpus-level figures (each recomputes the figure)", min=1)
    confidence: float = opt(0.95, above=0, below=1)
    alpha: float = opt(0.05, above=0, below=1)
    num_examples: int = opt(3, help="prompts shown side by side in the report", min=0)
    probe_pairs: int = opt(500, help="positive control (style_injection.json present): at most this many held-out "
                                     "probes of the RM's preference for the planted tic (test pairs), and as many "
                                     "on the SFT model's own samples", min=1)
    device_type: str = opt("", help="cpu|cuda|mps (default: autodetect)", choices=["", "cpu", "cuda", "mps"])
    control: str = opt("", help="this run is a control (runs/control.sh): sampler (a marker planted in the rarest "
                                "quintile: its rate on rare prompts, density - uniform) or null (both arms uniform: "
                                "the verdict must be no difference); writes <kat cache>/control_outcome.json",
                       choices=["", "sampler", "null"])
    controls_dir: str = opt("", help="where the control runs are, to list their outcomes (default "
                                     "$NANOCHAT_CONTROL_DIR, else control_run/ beside outs/)")
    tiny: bool = opt(False, help="the tiny preset: the report says plainly that no outcome in it is evidence")


# -----------------------------------------------------------------------------
# Models: SFT, every run's final model, the trajectory checkpoints around the matched KL

def extra_sources(cfg: Config, taken: set[str]) -> dict[str, str]:
    """label -> stage name or checkpoint path of each --extra_models entry."""
    sources = {}
    for extra in filter(None, (s.strip() for s in cfg.extra_models.split(","))):
        label = Path(extra).parent.name if extra.endswith(".pt") else Path(extra).name
        if label in taken or label in sources:
            raise SystemExit(f"--extra_models: {extra!r} would be labelled {label!r}, which is taken; use another stage")
        sources[label] = extra
    return sources


def check_distinct(checkpoints: dict[str, Path]):
    """Two labels on one file would compare a model with itself."""
    seen = {}
    for label, path in checkpoints.items():
        if path in seen:
            raise SystemExit(f"{seen[path]} and {label} both resolve to {path}: that would compare a model with itself")
        seen[path] = label


def find_scorer(source: str, role: str) -> Path | None:
    """The judge's or the policy RM's checkpoint, found before any sampling; None when the flag is empty."""
    if not source:
        return None
    try:
        return find_stage_checkpoint(source).resolve()
    except FileNotFoundError as err:
        flag, how = {"judge": ("--judge", "python -m scripts.train_rm --role=judge"),
                     "policy": ("--reward_model", "python -m scripts.train_rm")}[role]
        raise SystemExit(f"{err}. Train it with {how}, or pass {flag}= to evaluate without it") from None


def plan_matched_kl(runs, budget: float) -> dict:
    """The matched-KL comparison: the target, how it was chosen, and each run's points around it (labels, KLs,
    checkpoints); unavailable, with the reason, when a run has no trajectory and no budget was asked for."""
    lacking = [f"{r.name} ({r.trajectory_missing})" for r in runs if r.trajectory is None]
    if lacking and budget < 0:
        return {"available": False, "reason": f"no trajectory for {', '.join(lacking)}"}
    try:
        target, how = kl_target(runs, budget)
        points = {r.name: [{"label": f"{r.name}@step{p['step']}", **p} for p in bracket(r, target)] for r in runs}
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"matched KL: {err}") from None
    return {"available": True, "target": target, "how": how, "points": points}


def analysis_plans(runs, matched: dict) -> dict:
    """{where: (each run's points, the KL target or None)}: matched KL first when it is available, then the endpoints."""
    plans = {"endpoint": ({r.name: [{"label": r.name}] for r in runs}, None)}
    if matched["available"]:
        plans = {"matched_kl": (matched["points"], matched["target"]), **plans}
    return plans


def compare_arms(runs, matched: dict, texts: dict, token_ids: dict, tables: dict, quintiles: list[int], vocab_size: int,
                 mattr_window: int, settings: dict) -> dict:
    """{"matched_kl": ..., "endpoint": ...}: the arms compared at each point (arm_stats.analyse_arms), the text
    figures of the GRPO models there recomputed at their common length."""
    arms = {}
    for where, (points, target) in analysis_plans(runs, matched).items():
        labels = [point["label"] for run_points in points.values() for point in run_points]
        cut = common_length_tables(labels, texts, token_ids, vocab_size, mattr_window)
        arms[where] = analyse_arms(runs, points, target, tables, cut, quintiles, settings)
    return arms


def run_summary(run) -> dict:
    """What the report shows of a run besides its samples: arm, seed, checkpoint, trajectory and draws."""
    return {"name": run.name, "arm": run.arm, "seed_index": run.seed_index, "seed": run.seed, "folder": str(run.folder),
            "checkpoint": str(run.checkpoint), "trajectory": run.trajectory, "trajectory_missing": run.trajectory_missing,
            "draws": run.draws, "draws_missing": run.draws_missing}


# -----------------------------------------------------------------------------
# Prompts

def stratified_sample(strata: dict, num: int, rng) -> list:
    """num items from {stratum: [items]}: quotas proportional to stratum size (largest remainder), random within."""
    total = sum(len(items) for items in strata.values())
    if num >= total:
        return [item for key in sorted(strata) for item in strata[key]]
    exact = {key: num * len(items) / total for key, items in strata.items()}
    quota = {key: int(share) for key, share in exact.items()}
    for key in sorted(strata, key=lambda k: (-(exact[k] - quota[k]), k))[:num - sum(quota.values())]:
        quota[key] += 1
    chosen = []
    for key in sorted(strata):
        picks = rng.permutation(len(strata[key]))[:quota[key]]
        chosen += [strata[key][i] for i in sorted(picks)]
    return chosen


def select_prompts(cfg: Config, data: KatData, tokenizer) -> tuple[list[dict], dict]:
    """The evaluation's prompts: a stratified sample of the final half of the test prompts (never GRPO's dev half),
    in order of rendered length, so that an engine call pads little; the same for every model."""
    path = data.prompts_file
    candidates = data.held_out_prompts("final")
    if not candidates:
        raise SystemExit(f"{path} has no final held-out prompts (split == 'test', final half); the evaluation needs them")
    for prompt in candidates:
        prompt["prompt_ids"] = tokenizer.render_for_completion(prompt["prefix"])
    fitting = [p for p in candidates if len(p["prompt_ids"]) <= cfg.max_prompt_tokens]
    # quintile 1..5 of each prompt's density among the fitting final prompts (1 = least dense)
    quintile = data.density_quintiles([p["id"] for p in fitting]) if cfg.density_strata else {}
    strata = {}
    for prompt in sorted(fitting, key=lambda p: p["id"]):
        prompt["density_quintile"] = quintile.get(prompt["id"], 0)
        strata.setdefault((prompt["src"], prompt["density_quintile"]), []).append(prompt)
    chosen = stratified_sample(strata, cfg.num_prompts, np.random.default_rng(cfg.seed))
    if len(chosen) < 2:
        raise SystemExit(f"only {len(chosen)} final test prompts fit in --max_prompt_tokens={cfg.max_prompt_tokens}; "
                         "need 2 or more")
    chosen.sort(key=lambda p: (len(p["prompt_ids"]), p["id"]))
    counts = {}
    for prompt in chosen:
        counts.setdefault(prompt["src"], Counter())[prompt["density_quintile"]] += 1
    method = ("stratified by source x density quintile, quotas proportional to stratum size, random within each "
              f"(seed {cfg.seed})" if cfg.density_strata else f"stratified by source, random within each (seed {cfg.seed})")
    info = {"file": str(path), "part": "final", "num_candidates": len(candidates),
            "num_too_long": len(candidates) - len(fitting), "max_prompt_tokens": cfg.max_prompt_tokens, "method": method,
            "strata": {s: dict(c) for s, c in counts.items()}, "ids": [p["id"] for p in chosen]}
    return chosen, info


# -----------------------------------------------------------------------------
# Work split across ranks

def run_sharded(items: list, work, rank: int, world_size: int) -> list:
    """work(items) on items[rank::world_size] on each rank; every rank gets all results in order."""
    mine = work(items[rank::world_size])
    if world_size == 1:
        return mine
    gathered = [None] * world_size
    dist.all_gather_object(gathered, mine)
    results = [None] * len(items)
    for r, part in enumerate(gathered):
        results[r::world_size] = part
    return results


def sample_model(model, tokenizer, prompts: list[dict], cfg: Config, rank: int, world_size: int) -> list[list[list[int]]]:
    """tokens[p][s] for every prompt, <|assistant_end|> kept where the sample finished.
    Sample s of the prompt at position i of batch b uses the engine's row seed (seed*1000003 + b, i, s),
    the same for every model."""
    engine = Engine(model, tokenizer)
    batches = [(b, prompts[start:start + cfg.batch_size]) for b, start in enumerate(range(0, len(prompts), cfg.batch_size))]

    def work(my_batches):
        out = []
        for b, batch in my_batches:
            tokens, _ = engine.generate_batch([p["prompt_ids"] for p in batch], num_samples=cfg.num_samples,
                                              max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                              top_k=cfg.top_k or None, top_p=cfg.top_p if cfg.top_p < 1 else None,
                                              seed=cfg.seed * 1_000_003 + b, keep_stop_token=True)
            out.append(tokens)
        return out

    return [row for batch in run_sharded(batches, work, rank, world_size) for row in batch]


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# Context the report reads from other stages

def read_training_curves(checkpoint: Path) -> dict:
    """train/reward_mean and train/kl (or train/kl_loss) from the arm's TensorBoard logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wanted = {"reward": ["train/reward_mean"], "kl": ["train/kl", "train/kl_loss"]}
    log_dir = checkpoint.parent / "logs"
    info = {"dir": str(log_dir), "series": {key: None for key in wanted}, "reason": {}}
    if not log_dir.is_dir():
        info["reason"] = {key: f"no TensorBoard folder {log_dir}" for key in wanted}
        return info
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags().get("scalars", []))
    for key, tags in wanted.items():
        tag = next((t for t in tags if t in scalars), None)
        if tag is None:
            info["reason"][key] = f"none of {tags} in {log_dir}"
            continue
        events = accumulator.Scalars(tag)
        info["series"][key] = {"tag": tag, "steps": [e.step for e in events], "values": [float(e.value) for e in events]}
    return info


def read_starting_policy(checkpoint: Path) -> dict:
    """How the control's starting policy was fine-tuned: the tic flags chat_sft recorded in config.json."""
    config_path = checkpoint.parent / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    args = config.get("train_args", {})
    return {"source": str(checkpoint), "tic_style": args.get("tic_style", ""), "tic_rate": float(args.get("tic_rate", 0.0)),
            "init_from": config.get("init_from"), "tic_conversations": config.get("tic_conversations"),
            "conversations": config.get("conversations")}


def read_rm_eval(reward_source: str, flag: str = "--reward_model") -> dict:
    """A reward model's held-out evaluation, <its stage folder>/eval.json, when scripts.train_rm wrote one."""
    if not reward_source:
        return {"path": "(no reward model)", "reason": f"{flag} is empty", "data": None}
    source = Path(reward_source)
    folder = source.parent if source.suffix == ".pt" else (stage_dir(reward_source) if "/" not in reward_source else source)
    path = folder / "eval.json"
    if not path.is_file():
        return {"path": str(path), "reason": "file does not exist", "data": None}
    return {"path": str(path), "reason": "", "data": json.loads(path.read_text(encoding="utf-8"))}


def read_density_stats(data: KatData) -> dict:
    path = data.weights_file
    if not data.has_weights():
        return {"path": str(path), "reason": "file does not exist (run scripts.kat_density)", "data": None}
    rows = data.weights()
    weights = np.array([r["weight"] for r in rows if r["split"] == "train"])
    if len(weights) == 0 or weights.sum() <= 0:
        raise SystemExit(f"{path} holds no positive train weights; rerun python -m scripts.kat_density")
    meta = data.weights_meta() if data.weights_meta_file.is_file() else {}
    relative = weights / weights.sum() * len(weights)
    ess = kish_ess(weights)
    return {"path": str(path), "reason": "", "data": {
        "n_train": len(weights), "n_test": sum(r["split"] == "test" for r in rows),
        "kish_ess": ess, "kish_ess_fraction": ess / len(weights),
        "max_over_min": float(relative.max() / relative.min()) if relative.min() > 0 else float("inf"),
        "max_x_n": float(relative.max()),
        "weight_x_n_quantiles": {str(q): float(np.quantile(relative, q)) for q in (0.01, 0.1, 0.5, 0.9, 0.99)},
        "flags": meta.get("flags", {}),
        # what kat_density actually used: --tau=0 means an adaptive bandwidth, recorded here
        "used": {key: meta[key] for key in ("center", "tau", "tau_rule") if key in meta}}}


def read_injection(data: KatData) -> dict | None:
    """scripts.kat_inject's record when a tic was planted in this data, checked to describe the pairs file as it is now."""
    path = data.injection_file
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    pairs_path = data.dir / record["pairs_file"]
    if not pairs_path.is_file() or file_digest(pairs_path) != record["pairs_blake2b"]:
        raise SystemExit(f"{pairs_path} changed after {path} was written (kat_pairs rerun?): the RM and GRPO may have "
                         "trained on other data than the record says. Rerun python -m scripts.kat_inject and the stages "
                         f"after it, or delete {path} if this data is meant to be clean")
    return {"path": str(path), "record": record}


def positive_control(injection: dict, data: KatData, rm_checkpoint: Path | None, cfg: Config, device,
                     prompts: list[dict], sft_texts: list[list[str]]) -> dict:
    """
    The RM's preference for the planted tic on held-out probes, overall and by test-prompt density
    half, and on the starting policy's own samples (sft_texts[p][s] for prompts[p]).
    """
    # probes: a tic-free chosen response of a test pair vs the same response with the tic injected;
    # on the SFT model's own samples the same comparison is what GRPO's reward sees
    control = {**injection, "probe": None, "reason": "", "policy_probe": None, "policy_reason": ""}
    if rm_checkpoint is None:
        control["reason"] = control["policy_reason"] = "--reward_model is empty"
        return control
    flags = injection["record"]["flags"]
    test = data.pairs("test")
    probes = probe_pairs(test, flags["inject_style"], flags["seed"], cfg.probe_pairs)
    own = policy_probes(prompts, sft_texts, flags["inject_style"], flags["seed"], cfg.probe_pairs)
    if len(own) < 2:
        control["policy_reason"] = (f"only {len(own)} of the {REFERENCE} model's samples are tic-free and have prose "
                                    "the tic can go into")
        own = []
    if len(probes) < 2:
        control["reason"] = f"only {len(probes)} test responses are tic-free and have prose the tic can go into"
        probes = []
    if not probes and not own:
        return control
    reward_model = load_reward_model(rm_checkpoint, device)
    every = probes + own
    scores = reward_model.score([(p["prefix"], p["tic"]) for p in every] + [(p["prefix"], p["clean"]) for p in every],
                                batch_size=cfg.embed_batch_size)
    del reward_model
    free(device)
    r_tic, r_clean = np.array(scores[:len(every)]), np.array(scores[len(every):])
    stats = (cfg.num_resamples, cfg.confidence, cfg.alpha, cfg.seed)
    if own:
        control["policy_probe"] = tic_preference(r_tic[len(probes):], r_clean[len(probes):], *stats)
    if not probes:
        return control
    r_tic, r_clean = r_tic[:len(probes)], r_clean[:len(probes)]
    probe = tic_preference(r_tic, r_clean, *stats)
    if data.has_weights():
        density = {r["id"]: r["density"] for r in data.weights("test")}
        if all(p["prompt_id"] in density for p in probes) and len(probes) >= 4:
            order = np.argsort([density[p["prompt_id"]] for p in probes], kind="stable")
            halves = {"rarer half": order[:len(order) // 2], "denser half": order[len(order) // 2:]}
            probe["by_density"] = {name: tic_preference(r_tic[rows], r_clean[rows], *stats) for name, rows in halves.items()}
    control["probe"] = probe
    return control


# -----------------------------------------------------------------------------

def sample_all(checkpoints: dict, prompts: list[dict], tokenizer, cfg: Config, rank, world_size, device):
    """Every model on the same prompts and seeds: texts, BPE ids (no special tokens), truncation flags, model info."""
    special_ids = set(tokenizer.special_tokens.values())
    # the engine stops a row at either; a row without one at its end ran into max_tokens
    stop_tokens = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    texts, token_ids, truncated, models_info = {}, {}, {}, {}
    for label, path in checkpoints.items():
        start = time.time()
        model, model_tokenizer, meta = load_model(path, device, phase="eval")
        if model_tokenizer.mergeable_ranks != tokenizer.mergeable_ranks:
            raise SystemExit(f"{path} loads a different tokenizer than the evaluation's; all models must share one")
        samples = sample_model(model, tokenizer, prompts, cfg, rank, world_size)
        del model
        free(device)
        truncated[label] = [[not (s and s[-1] in stop_tokens) for s in row] for row in samples]
        token_ids[label] = [[[token for token in s if token not in special_ids] for s in row] for row in samples]
        texts[label] = [[tokenizer.decode(s) for s in row] for row in token_ids[label]]
        models_info[label] = {"checkpoint": str(path), "stage": meta.get("stage"), "step": meta.get("step"),
                              "git_commit": meta.get("git_commit", "unknown")}
        print0(f"sampled {label}: {sum(map(len, texts[label]))} responses in {time.time() - start:.1f}s")
    return texts, token_ids, truncated, models_info


def per_model(flat_values, labels, num_prompts: int, num_samples: int) -> dict:
    """Values listed model by model, then prompt by prompt, then sample by sample, as {label: [P, N, ...] array}."""
    size = num_prompts * num_samples
    values = np.asarray(flat_values)
    return {label: values[i * size:(i + 1) * size].reshape(num_prompts, num_samples, *values.shape[1:])
            for i, label in enumerate(labels)}


def embed_all(embedder_path: Path, token_ids: dict, tokenizer, cfg: Config, rank, world_size, device) -> dict:
    """{label: [P, N, D]} SFT embeddings of every response, the work split across ranks."""
    embedder, _, _ = load_model(embedder_path, device, phase="eval")
    responses = [ids for label in token_ids for row in token_ids[label] for ids in row]
    chunks = [responses[i:i + cfg.embed_batch_size] for i in range(0, len(responses), cfg.embed_batch_size)]
    bos = tokenizer.get_bos_token_id()
    vectors = run_sharded(chunks, lambda mine: [response_embeddings(embedder, bos, chunk, cfg.embed_batch_size, device)
                                                for chunk in mine], rank, world_size)
    return per_model(np.concatenate(vectors), list(token_ids), len(token_ids[REFERENCE]), cfg.num_samples)


def score_all(rm_checkpoint: Path | None, prompts: list[dict], texts: dict, cfg: Config, rank, world_size, device):
    """{label: [P, N]} reward-model scores of every response, the work split across ranks; None without a model."""
    if rm_checkpoint is None:
        return None
    reward_model = load_reward_model(rm_checkpoint, device)
    pairs = [(prompts[p]["prefix"], text) for label in texts for p, row in enumerate(texts[label]) for text in row]
    chunks = [pairs[i:i + cfg.embed_batch_size] for i in range(0, len(pairs), cfg.embed_batch_size)]
    scores = run_sharded(chunks, lambda mine: [reward_model.score(chunk) for chunk in mine], rank, world_size)
    return per_model([x for part in scores for x in part], list(texts), len(prompts), cfg.num_samples)


# -----------------------------------------------------------------------------
# The report card's section

def controls_part(cfg: Config, runs, matched: dict, arms: dict, texts: dict, quintiles: list[int], data: KatData,
                  settings: dict) -> dict:
    """The report's "controls": the synthetic sampler control and null, and this run's own control (--control) or the
    outcomes of the control runs under --controls_dir."""
    root = Path(cfg.controls_dir) if cfg.controls_dir else controls_dir()
    part = {"this": cfg.control, "tiny": cfg.tiny, **synthetic_controls(), "controls_dir": str(root),
            "outcomes": {} if cfg.control else read_outcomes(root)}
    if cfg.control == "sampler":
        rates = per_prompt_marker_rates(texts, plant_record(runs)["marker"])
        part["sampler"] = sampler_control(runs, analysis_plans(runs, matched), rates, quintiles, settings)
    elif cfg.control == "null":
        where = "matched_kl" if matched["available"] else "endpoint"
        part["null"] = null_control(runs, arms[where], where, read_density_stats(data))
    return part


def detail_bullets(results: dict, control: dict | None) -> dict:
    """The seed-0 detail's bullets: its overall word and each core metric's Holm-corrected verdict on the
    difference it rests on (equal length), with the raw difference beside it; the positive control."""
    summary = results["hypothesis"]
    rows = results["comparisons"]["density_vs_baseline"]["rows"]
    bullets = {"overall verdict of the seed-0 final models (core metrics, density vs baseline)": summary["overall"],
               "prompts": results["num_prompts"], "samples per prompt": results["num_samples"],
               "quality (seed-0 endpoints)": summary["quality"]}
    if control is not None:
        outcome = control_outcome(results, control)
        r = results["comparisons"]["baseline_vs_sft"]["rows"][outcome["metric"]]
        probe = control["probe"]
        bullets["positive control"] = (f"{outcome['status']}; RM prefers the tic on "
                                       + (f"{probe['prefer_tic']:.0%} of {probe['n']} probes" if probe else "(not measured)")
                                       + f"; baseline - sft {outcome['metric']} {fmt_signed(r['diff'])} {fmt_ci(r['ci'])}")
    for name in summary["primary"]:
        h = summary["holm"][name]
        bullets[name] = (f"{h['verdict_holm']} (Holm-corrected); {h['basis']} diff {fmt_signed(h['diff'])} {fmt_ci(h['ci'])} "
                         f"p={fmt_p(h['p'])} Holm p={fmt_p(h['p_holm'])}; raw diff {fmt_signed(rows[name]['diff'])}")
    return bullets


def log_summary(results: dict, context: dict, written: dict, control: dict | None):
    """The report card's section (the pre-registered verdict first) and the console's last lines."""
    lines = headline(context)
    bullets = {**lines, "controls": controls_headline(context["controls"]), **detail_bullets(results, control),
               "report": str(written["report"])}
    if control is not None:
        print0(f"positive control: {bullets['positive control']}")
    get_report().log(stage="diversity", section="Diversity evaluation", data=[bullets])
    for key, value in {**lines, "controls": bullets["controls"]}.items():
        print0(f"{key}: {value}")
    print0(f"wrote {', '.join(str(path) for path in written.values())}")


def main(argv: list[str] | None = None):
    cfg = parse_flags(Config, argv)
    setup_logging()
    t0 = time.time()
    _, rank, _, world_size, device = compute_init(cfg.device_type or None, seed=cfg.seed)
    data = KatData(cfg.data_dir)
    report_path = Path(cfg.output_report) if cfg.output_report else get_kat_cache_dir() / "diversity_report.md"

    # ---- what is compared, all found before any sampling
    try:
        runs = load_runs([s.strip() for s in cfg.runs.split(",") if s.strip()] if cfg.runs else discover_runs())
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(str(err)) from None
    matched = plan_matched_kl(runs, cfg.kl_budget)
    checkpoints = {REFERENCE: find_stage_checkpoint(cfg.sft_model).resolve(), **{r.name: r.checkpoint for r in runs}}
    extras = extra_sources(cfg, set(checkpoints) | set(HYPOTHESIS))
    checkpoints.update({label: find_stage_checkpoint(source).resolve() for label, source in extras.items()})
    check_distinct(checkpoints)
    if cfg.control == "sampler":
        try:
            plant_record(runs)  # every run planted the same reward: checked before any sampling
        except ValueError as err:
            raise SystemExit(f"--control=sampler: {err}") from None
    endpoints = list(checkpoints)
    for points in (matched["points"].values() if matched["available"] else []):
        checkpoints.update({point["label"]: point["checkpoint"] for point in points})
    judge_checkpoint, rm_checkpoint = find_scorer(cfg.judge, "judge"), find_scorer(cfg.reward_model, "policy")
    injection = read_injection(data)  # on every rank: a stale record stops them all before sampling
    if data.has_weights():
        data.check_current()  # density strata, density figures and control halves all read the weights
    tokenizer = get_tokenizer()
    prompts, prompt_info = select_prompts(cfg, data, tokenizer)
    print0(f"{len(prompts)} final held-out prompts ({prompt_info['num_too_long']} too long left out); {len(runs)} runs "
           f"({', '.join(r.name for r in runs)}); {len(checkpoints)} models to sample"
           + (f"; matched KL {matched['target']:.4g}" if matched["available"] else f"; no matched KL: {matched['reason']}"))

    # ---- every model on the same prompts and seeds, embedded by SFT, scored by the judge and the policy RM
    texts, token_ids, truncated, models_info = sample_all(checkpoints, prompts, tokenizer, cfg, rank, world_size, device)
    embeddings = embed_all(checkpoints[REFERENCE], token_ids, tokenizer, cfg, rank, world_size, device)
    free(device)  # the embedding model went with embed_all's frame
    judge_scores = score_all(judge_checkpoint, prompts, texts, cfg, rank, world_size, device)
    free(device)  # the judge went with score_all's frame
    policy_scores = score_all(rm_checkpoint, prompts, texts, cfg, rank, world_size, device)
    free(device)
    if rank != 0:
        compute_cleanup()
        return None

    # ---- figures and statistics, on rank 0
    notes = []
    if judge_checkpoint is None and rm_checkpoint is None:
        notes.append("No judge and no policy RM (--judge and --reward_model are empty): quality not measured")
    elif judge_checkpoint is None:
        notes.append("No judge (--judge is empty): quality is only the policy RM's, the reward GRPO optimised, which "
                     "rises as the policy exploits it")
    elif rm_checkpoint is None:
        notes.append("No policy RM (--reward_model is empty): the judge's reward has no policy reward beside it")
    for note in notes:
        print0(f"WARNING: {note}")
    control = None
    if injection is not None:
        control = positive_control(injection, data, rm_checkpoint, cfg, device, prompts, texts[REFERENCE])
        control["starting_policy"] = read_starting_policy(checkpoints[REFERENCE])
        notes.append(f"Positive-control run: a tic was planted in the train pairs ({injection['path']}); "
                     "see the Positive control section before reading the verdict")
    settings = {"n_resamples": cfg.num_resamples, "confidence": cfg.confidence, "alpha": cfg.alpha, "seed": cfg.seed}
    vocab_size = tokenizer.get_vocab_size()
    tables = model_tables(list(checkpoints), texts, token_ids, truncated, embeddings, policy_scores, judge_scores,
                          vocab_size, cfg.mattr_window)
    arms = compare_arms(runs, matched, texts, token_ids, tables, [p["density_quintile"] for p in prompts], vocab_size,
                        cfg.mattr_window, settings)
    seed0 = {arm: next(r.name for r in runs if r.arm == arm) for arm in ("density", "uniform")}
    detail_source = {REFERENCE: REFERENCE, "baseline": seed0["uniform"], "density": seed0["density"],
                     **{label: label for label in extras}}

    def remap(by_label):
        return None if by_label is None else {label: by_label[source] for label, source in detail_source.items()}

    results = evaluate(list(detail_source), remap(texts), remap(token_ids), remap(truncated), remap(embeddings),
                       remap(policy_scores), vocab_size, cfg.mattr_window, cfg.num_resamples, cfg.num_corpus_resamples,
                       cfg.confidence, cfg.alpha, cfg.seed, judge_rewards=remap(judge_scores))
    example_rows = np.random.default_rng(cfg.seed).permutation(len(prompts))[:cfg.num_examples]
    context = {
        "config": flags_dict(cfg), "models": {label: {"source": detail_source[label], **models_info[detail_source[label]]}
                                              for label in detail_source},
        "evaluated": models_info, "prompts": prompt_info,
        "runs": [run_summary(r) for r in runs], "matched": matched, "arms": arms, "tables": tables,
        "alarm": collapse_alarm(tables[REFERENCE], arms),
        "sampling": {"num_samples": cfg.num_samples, "temperature": cfg.temperature, "top_k": cfg.top_k or "none",
                     "top_p": cfg.top_p, "max_tokens": cfg.max_tokens, "seed": cfg.seed,
                     "seed_rule": "prompts in order of rendered length; sample s of the prompt at position i of engine "
                                  f"batch b draws from the engine's row seed (seed*1000003 + b, i, s), batches of "
                                  f"{cfg.batch_size} prompts"},
        "embedding_model": f"{REFERENCE} ({checkpoints[REFERENCE]})",
        "judge": f"{cfg.judge} ({judge_checkpoint})" if judge_checkpoint else "none (--judge is empty)",
        "reward_model": f"{cfg.reward_model} ({rm_checkpoint})" if rm_checkpoint else "none (--reward_model is empty)",
        "notes": notes, "world_size": world_size, "device": str(device), "git_commit": git_commit(),
        "mattr_window": cfg.mattr_window, "settings": settings,
        "examples": [{"prompt_id": prompts[p]["id"], "src": prompts[p]["src"], "prompt": first_user_message(prompts[p]["prefix"]),
                      "responses": {label: texts[detail_source[label]][p][0] for label in detail_source}} for p in example_rows],
        "rm_eval": {"judge": read_rm_eval(cfg.judge, "--judge"), "policy": read_rm_eval(cfg.reward_model)},
        "density_stats": read_density_stats(data),
        "training_curves": {label: read_training_curves(checkpoints[detail_source[label]]) for label in HYPOTHESIS[::-1]},
        "positive_control": control,
        "controls": controls_part(cfg, runs, matched, arms, texts, [p["density_quintile"] for p in prompts], data,
                                  settings),
    }
    context["seconds"] = time.time() - t0
    written = write_report(results, context, report_path)
    written["samples"] = report_path.with_name(report_path.stem + "_samples.jsonl")
    with open(written["samples"], "w", encoding="utf-8") as f:
        for p, prompt in enumerate(prompts):
            for label in endpoints:
                for s in range(cfg.num_samples):
                    f.write(json.dumps({"prompt_id": prompt["id"], "model": label, "sample": s, "text": texts[label][p][s],
                                        "truncated": truncated[label][p][s]}, ensure_ascii=False) + "\n")
    if cfg.control:
        written["control_outcome"] = write_outcome(get_kat_cache_dir(), cfg.control, context["controls"][cfg.control],
                                                   written["report"], cfg.tiny, context["git_commit"])
    log_summary(results, context, written, control)
    compute_cleanup()
    return written


if __name__ == "__main__":
    main()
