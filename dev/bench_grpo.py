"""
Time per GRPO step, split into rollout, scoring and update (train/time_rollout, train/time_score,
train/time_update in scripts/grpo.py's log), at d20 with P prompts x G samples x N new tokens, for
this tree and, side by side in the same run on the same machine, an older version of the code.

    python -m dev.bench_grpo                                  # this tree only; a tiny model on CPU
    python -m dev.bench_grpo --ref=f454374                    # git archive f454374, run both, compare
    python -m dev.bench_grpo --ref=f454374 --export_only      # only export it (.cache/bench_grpo/ref_f454374)
    python -m dev.bench_grpo --ref_dir=.cache/bench_grpo/ref_f454374   # an exported tree (no git needed)
    python -m dev.bench_grpo --nproc=2                        # the same total work through torchrun

One scratch folder is built with this tree's code: random d20 weights for the SFT model and the RM's
backbone, a synthetic tokenizer of the full vocabulary, the bundled KAT samples with random prompt
embeddings. Each code tree then runs its own scripts.grpo on it in a subprocess (cwd = the tree),
given only the flags its Config accepts (the shape flags must be accepted by every tree). Random
weights almost never sample <|assistant_end|>, so every completion runs the full N tokens.
The synthetic tokenizer's tokens past the bytes are space-prefixed lowercase words (" a", " ab", ...),
each reachable by merges, so a decoded completion re-encodes to the same number of tokens when the
RM renders it. Step 1 (CUDA-graph capture, cuBLAS and compile warm-up) is left out of the medians.
"""

import itertools
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from nanochat.common import REPO_ROOT, autodetect_device_type, torchrun_command
from nanochat.flags import opt, parse_flags
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import NUM_BYTE_TOKENS, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

EXPORT_ROOT = REPO_ROOT / ".cache" / "bench_grpo"
EXPORT_MARK = ".bench_grpo_export"  # written into an exported tree: only such folders are ever replaced
TAGS = ("time_rollout", "time_score", "time_update", "dt", "completion_len", "rollout_tok_per_s")

# Run in a code tree (cwd = the tree, so its packages are imported): the flags its Config accepts,
# then its scripts.grpo.main, then the summary's peak memory on a marked line.
CHILD = r"""
import dataclasses, json, sys
from pathlib import Path
from scripts import grpo
tree = Path.cwd().resolve()
if not Path(grpo.__file__).resolve().is_relative_to(tree):
    raise SystemExit(f"imported {grpo.__file__}, not the tree's own scripts/grpo.py in {tree}")
accepted = {f.name for f in dataclasses.fields(grpo.Config)}
if sys.argv[1] == "--accepted":
    print("BENCH_ACCEPTED " + json.dumps(sorted(accepted)))
else:
    summary = grpo.main(json.loads(sys.argv[1]))
    print("BENCH_PEAK_GB " + json.dumps(summary["Peak memory (GB)"]))
"""


@dataclass
class Config:
    device_type: str = opt("", help="cuda|cpu|mps (empty: autodetect)")
    depth: int = opt(-1, help="model depth (-1: 20 on CUDA, 2 elsewhere)")
    vocab_size: int = opt(-1, help="vocabulary size (-1: 65536 on CUDA, 1024 elsewhere)")
    steps: int = opt(6, help="GRPO steps; the first is warm-up", min=2)
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    max_new_tokens: int = 256
    max_prompt_tokens: int = 1024
    workdir: str = opt("", help="scratch folder (default: a new temporary one)")
    nproc: int = opt(1, help="processes (GPUs); above 1 the script runs under torchrun, the P prompts split across ranks")
    ref: str = opt("", help="a git revision to export (git archive) and run beside this tree")
    ref_dir: str = opt("", help="an exported code tree to run beside this tree (instead of --ref)")
    export_only: bool = opt(False, help="with --ref: export the tree, print its folder and stop")
    extra: str = opt("", help="more scripts.grpo flags for every tree (each must be accepted by every tree)")
    new_extra: str = opt("", help="more scripts.grpo flags for this tree only, e.g. '--update_tokens=65536'")


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """Bytes, then " a".." z", " aa".." zz", ... in order of length, then the special tokens."""
    filler = vocab_size - NUM_BYTE_TOKENS - len(SPECIAL_TOKENS)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = (" " + "".join(w) for n in itertools.count(1) for w in itertools.product(letters, repeat=n))
    ranks = {bytes([b]): b for b in range(NUM_BYTE_TOKENS)}
    ranks.update({word.encode(): NUM_BYTE_TOKENS + i for i, word in zip(range(filler), words)})
    return Tokenizer(SPLIT_PATTERN, ranks)


def random_gpt(depth: int, vocab_size: int) -> GPT:
    """Random output projections and lm_head, so every block does real work and samples vary."""
    model = GPT(config_from_depth(depth, vocab_size, 2048))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, 0.02)
    return model


def logged(log_text: str, tag: str) -> list[float]:
    return [float(v) for v in re.findall(rf"{re.escape(tag)} (\S+)", log_text)]


def export_revision(rev: str) -> Path:
    """git archive rev into .cache/bench_grpo/ref_<rev> (replacing an earlier export of this harness)."""
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"--ref={rev}: not a revision of {REPO_ROOT} ({commit.stderr.strip()}); on a machine without "
                         "the git history, export it elsewhere with --export_only and pass --ref_dir")
    dest = EXPORT_ROOT / f"ref_{re.sub(r'[^A-Za-z0-9._-]', '_', rev)}"
    if dest.exists():
        if not (dest / EXPORT_MARK).is_file():
            raise SystemExit(f"{dest} exists but was not written by dev.bench_grpo; move it away first")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", commit.stdout.strip()],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / EXPORT_MARK).write_text(f"{rev} {commit.stdout.strip()}\n")
    return dest


def tree_label(tree: Path) -> str:
    mark = tree / EXPORT_MARK
    return f"ref {mark.read_text().split()[0]}" if mark.is_file() else f"ref {tree.name}"


def child_env() -> dict:
    env = os.environ.copy()
    env.pop("PYTHONPATH", None)  # the tree's own packages, from its folder, and nothing else
    return env


def accepted_flags(tree: Path) -> set[str]:
    out = subprocess.run([sys.executable, "-c", CHILD, "--accepted"], cwd=tree, env=child_env(), capture_output=True,
                         text=True)
    found = re.search(r"^BENCH_ACCEPTED (.+)$", out.stdout, re.M)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"cannot read scripts.grpo's flags in {tree}:\n{out.stderr[-3000:]}")
    return set(json.loads(found.group(1)))


def flags_for(tree: Path, required: list[str], optional: list[str]) -> list[str]:
    """required flags (every one must be accepted) and the optional ones the tree's Config has."""
    accepted = accepted_flags(tree)
    name = lambda flag: flag[2:].split("=")[0].replace("-", "_")
    refused = [f for f in required if name(f) not in accepted]
    if refused:
        raise SystemExit(f"{tree}'s scripts.grpo does not accept {refused}: it cannot run the same work")
    return required + [f for f in optional if name(f) in accepted]


def run_tree(tree: Path, flags: list[str], nproc: int) -> float:
    """scripts.grpo of one code tree in a subprocess (its output echoed); returns rank 0's peak memory in GB."""
    if nproc == 1:
        command = [sys.executable, "-c", CHILD, json.dumps(flags)]
    else:
        command = torchrun_command(nproc, "scripts.grpo", flags)
    result = subprocess.run(command, cwd=tree, env=child_env(), capture_output=True, text=True)
    print(result.stdout[-6000:])
    if result.returncode != 0:
        raise RuntimeError(f"scripts.grpo in {tree} failed with exit code {result.returncode}:\n{result.stderr[-4000:]}")
    found = re.search(r"^BENCH_PEAK_GB (\S+)$", result.stdout, re.M) or \
        re.search(r"'Peak memory \(GB\)': ([0-9.]+)", result.stdout)
    if found is None:
        raise RuntimeError(f"scripts.grpo in {tree} finished without reporting its peak memory")
    return float(found.group(1))


def build_scratch(work: Path, depth: int, vocab_size: int) -> Tokenizer:
    """The tokenizer, SFT model, RM and KAT data every tree runs on, under work (NANOCHAT_* must point there)."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.kat.data import KatData
    from nanochat.kat.reward_model import KIND, RewardModel
    from scripts import kat_density, kat_pairs

    tokenizer = word_tokenizer(vocab_size)
    tokenizer.save(work / "base" / "tok")
    torch.manual_seed(0)
    sft = random_gpt(depth, vocab_size)  # on the CPU: saved, then loaded by the script onto the device
    save_checkpoint(work / "outs" / "sft", 0, sft, [], final=True, meta={"model_config": asdict(sft.config)})
    rm = RewardModel(random_gpt(depth, vocab_size), tokenizer)
    config = asdict(rm.backbone.config)
    save_checkpoint(work / "outs" / "rm", 0, rm, [], final=True,
                    meta={"kind": KIND, "model_config": config, "backbone_config": config, "max_seq_len": 2048})
    del sft, rm
    data = KatData()  # <kat cache>/data under the scratch folder
    kat_pairs.main([f"--local_dir={REPO_ROOT / 'nanochat/samples/kat'}", f"--out_dir={data.dir}", "--se_test_fraction=0.1"])
    prompts = data.prompts()
    data.save_embeddings([p["id"] for p in prompts], np.random.default_rng(0).normal(size=(len(prompts), 64)))
    kat_density.main([f"--data_dir={data.dir}", "--k=10", "--device_type=cpu"])
    return tokenizer


def main():
    cfg = parse_flags(Config)
    if cfg.ref and cfg.ref_dir:
        raise SystemExit("pass --ref (a git revision) or --ref_dir (an exported tree), not both")
    ref_tree = export_revision(cfg.ref) if cfg.ref else (Path(cfg.ref_dir).resolve() if cfg.ref_dir else None)
    if cfg.export_only:
        if ref_tree is None:
            raise SystemExit("--export_only needs --ref")
        print(ref_tree)
        return
    if ref_tree is not None and not (ref_tree / "scripts" / "grpo.py").is_file():
        raise SystemExit(f"{ref_tree} holds no scripts/grpo.py: not a code tree of this project")
    device_type = cfg.device_type or autodetect_device_type()
    on_cuda = device_type == "cuda"
    depth = cfg.depth if cfg.depth > 0 else (20 if on_cuda else 2)
    vocab_size = cfg.vocab_size if cfg.vocab_size > 0 else (65536 if on_cuda else 1024)
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="bench_grpo_")).resolve()
    dirs = {"NANOCHAT_BASE_DIR": work / "base", "NANOCHAT_OUTS_DIR": work / "outs", "NANOCHAT_KAT_CACHE": work / "cache"}
    os.environ.update({name: str(path) for name, path in dirs.items()})  # read by this process and every child
    tokenizer = build_scratch(work, depth, vocab_size)
    from nanochat.kat.data import KatData
    prompt_lens = [min(len(tokenizer.render_for_completion(p["prefix"])), cfg.max_prompt_tokens)
                   for p in KatData().prompts("train")]

    trees = ([(tree_label(ref_tree), ref_tree)] if ref_tree is not None else []) + [("new (this tree)", REPO_ROOT)]
    results = {}
    for label, tree in trees:
        out_dir = work / f"grpo_{len(results)}"
        required = [f"--device_type={device_type}", f"--max_steps={cfg.steps}", "--density_k=10",
                    f"--prompts_per_step={cfg.prompts_per_step}", f"--samples_per_prompt={cfg.samples_per_prompt}",
                    f"--rollout_prompts={cfg.prompts_per_step}", f"--max_new_tokens={cfg.max_new_tokens}",
                    f"--max_prompt_tokens={cfg.max_prompt_tokens}", "--eval_every=-1", "--eval_prompts=16",
                    "--save_every=-1", f"--out_dir={out_dir}", *shlex.split(cfg.extra)]
        if tree == REPO_ROOT:
            required += shlex.split(cfg.new_extra)
        # the trajectory's checkpoints and judge are not what is timed: left out where the tree has them
        flags = flags_for(tree, required, optional=["--traj_checkpoints=false", "--judge="])
        print(f"==== {label}: {tree}\n     scripts.grpo {' '.join(flags)}", flush=True)
        peak_gb = run_tree(tree, flags, cfg.nproc)
        log = (out_dir / "training_log.txt").read_text()
        timed = {tag: logged(log, f"train/{tag}")[1:] for tag in TAGS}
        results[label] = {"median": {tag: statistics.median(v) for tag, v in timed.items()}, "timed": timed,
                          "peak_gb": peak_gb}

    name = torch.cuda.get_device_name() if on_cuda else device_type
    name += f" x {cfg.nproc}" if cfg.nproc > 1 else ""
    print(f"\ndevice: {name} | d{depth}, vocab {vocab_size:,} | {cfg.prompts_per_step} prompts x "
          f"{cfg.samples_per_prompt} samples x {cfg.max_new_tokens} new tokens | train prompts: mean "
          f"{statistics.mean(prompt_lens):.0f} tokens (cap {cfg.max_prompt_tokens}) | scratch folder: {work}")
    labels = list(results)
    rows = [("rollout (s)", "time_rollout", ".3f"), ("rollout (generated tok/s)", "rollout_tok_per_s", ",.0f"),
            ("score (s)", "time_score", ".3f"), ("update (s)", "time_update", ".3f"), ("step (s)", "dt", ".3f"),
            ("mean completion (tokens)", "completion_len", ".0f")]
    header = f"{'median of steps 2..' + str(cfg.steps):<28}" + "".join(f"{label:>20}" for label in labels)
    print(header + (f"{'new / ref':>12}" if len(labels) == 2 else ""))
    for title, tag, spec in rows + [("peak memory (GB)", "peak_gb", ".1f")]:
        values = [results[label]["peak_gb"] if tag == "peak_gb" else results[label]["median"][tag] for label in labels]
        ratio = f"{values[1] / values[0]:>11.2f}x" if len(values) == 2 and values[0] else ""
        print(f"{title:<28}" + "".join(f"{format(v, spec):>20}" for v in values) + ratio)
    for label in labels:
        timed = results[label]["timed"]
        print(f"{label}, per step (rollout / score / update, s): " + ", ".join(
            f"{r:.2f}/{s:.2f}/{u:.2f}" for r, s, u in zip(timed["time_rollout"], timed["time_score"], timed["time_update"])))


if __name__ == "__main__":
    main()
