"""
Time per GRPO step, split into rollout, scoring and update (train/time_rollout, train/time_score,
train/time_update in scripts/grpo.py's log), at d20 with P prompts x G samples x N new tokens.

    python -m dev.bench_grpo                      # d20, P=16, G=8, 256 new tokens on CUDA; a tiny model on CPU
    python -m dev.bench_grpo --steps=8 --max_prompt_tokens=512
    python -m dev.bench_grpo --nproc=2            # the same total work through torchrun on 2 GPUs

It runs the real script end to end in a scratch folder, before any training exists: random d20
weights for the SFT model and the reward model's backbone, a synthetic tokenizer of the full
vocabulary size, and the bundled KAT samples (nanochat/samples/kat) with random prompt
embeddings for the density weights. Random weights almost never sample <|assistant_end|>, so
every completion runs the full N tokens: the longest step GRPO can take at this shape.

The synthetic tokenizer's tokens past the bytes are space-prefixed lowercase words (" a", " ab",
" abc", ...), each reachable by merges, so a decoded completion re-encodes to the same number of
tokens when the reward model renders it, as with a real tokenizer. English prompts encode into
more tokens than with a trained BPE (capitals and punctuation stay bytes); the mean prompt
length is printed. Step 1 (CUDA-graph capture, cuBLAS and compile warm-up) is left out of the medians.
"""

import itertools
import os
import re
import statistics
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from nanochat.common import REPO_ROOT, autodetect_device_type, torchrun_command
from nanochat.flags import opt, parse_flags
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import NUM_BYTE_TOKENS, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer


@dataclass
class Config:
    device_type: str = opt("", help="cuda|cpu|mps (empty: autodetect)")
    depth: int = opt(-1, help="model depth (-1: 20 on CUDA, 2 elsewhere)")
    vocab_size: int = opt(-1, help="vocabulary size (-1: 65536 on CUDA, 1024 elsewhere)")
    steps: int = opt(6, help="GRPO steps; the first is warm-up")
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    max_new_tokens: int = 256
    max_prompt_tokens: int = 1024
    device_batch_size: int = 8
    workdir: str = opt("", help="scratch folder (default: a new temporary one)")
    nproc: int = opt(1, help="processes (GPUs); above 1 the script runs under torchrun, the P prompts split across ranks")


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


def run_under_torchrun(nproc: int, grpo_args: list[str]) -> float:
    """scripts.grpo on nproc processes; its output is echoed; returns rank 0's peak memory in GB."""
    result = subprocess.run(torchrun_command(nproc, "scripts.grpo", grpo_args), cwd=REPO_ROOT,
                            env=os.environ.copy(), capture_output=True, text=True)
    print(result.stdout)
    if result.returncode != 0:
        raise RuntimeError(f"torchrun scripts.grpo failed with exit code {result.returncode}:\n{result.stderr[-4000:]}")
    found = re.search(r"'Peak memory \(GB\)': ([0-9.]+)", result.stdout)
    if found is None:
        raise RuntimeError("scripts.grpo finished without printing its summary (no 'Peak memory (GB)' in its output)")
    return float(found.group(1))


def main():
    cfg = parse_flags(Config)
    device_type = cfg.device_type or autodetect_device_type()
    on_cuda = device_type == "cuda"
    depth = cfg.depth if cfg.depth > 0 else (20 if on_cuda else 2)
    vocab_size = cfg.vocab_size if cfg.vocab_size > 0 else (65536 if on_cuda else 1024)
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="bench_grpo_"))
    dirs = {"NANOCHAT_BASE_DIR": work / "base", "NANOCHAT_OUTS_DIR": work / "outs", "NANOCHAT_KAT_CACHE": work / "cache"}
    os.environ.update({name: str(path) for name, path in dirs.items()})

    # imported after the environment points at the scratch folder
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.kat.data import KatData
    from nanochat.kat.reward_model import KIND, RewardModel
    from scripts import grpo, kat_density, kat_pairs

    tokenizer = word_tokenizer(vocab_size)
    tokenizer.save(dirs["NANOCHAT_BASE_DIR"] / "tok")
    torch.manual_seed(0)
    sft = random_gpt(depth, vocab_size)  # on the CPU: saved, then loaded by the script onto the device
    save_checkpoint(dirs["NANOCHAT_OUTS_DIR"] / "sft", 0, sft, [], final=True, meta={"model_config": asdict(sft.config)})
    rm = RewardModel(random_gpt(depth, vocab_size), tokenizer)
    config = asdict(rm.backbone.config)
    save_checkpoint(dirs["NANOCHAT_OUTS_DIR"] / "rm", 0, rm, [], final=True,
                    meta={"kind": KIND, "model_config": config, "backbone_config": config, "max_seq_len": 2048})
    del sft, rm
    data = KatData()  # <kat cache>/data under the scratch folder
    kat_pairs.main([f"--local_dir={REPO_ROOT / 'nanochat/samples/kat'}", f"--out_dir={data.dir}", "--se_test_fraction=0.1"])
    prompts = data.prompts()
    data.save_embeddings([p["id"] for p in prompts], np.random.default_rng(0).normal(size=(len(prompts), 64)))
    kat_density.main([f"--data_dir={data.dir}", "--k=10", "--device_type=cpu"])
    prompt_lens = [min(len(tokenizer.render_for_completion(p["prefix"])), cfg.max_prompt_tokens)
                   for p in prompts if p["split"] == "train"]

    out_dir = work / "grpo"
    grpo_args = [f"--device_type={device_type}", f"--max_steps={cfg.steps}", "--density_k=10",
                         f"--prompts_per_step={cfg.prompts_per_step}", f"--samples_per_prompt={cfg.samples_per_prompt}",
                         f"--rollout_prompts={cfg.prompts_per_step}", f"--max_new_tokens={cfg.max_new_tokens}",
                         f"--max_prompt_tokens={cfg.max_prompt_tokens}", f"--device_batch_size={cfg.device_batch_size}",
                         "--eval_every=-1", "--eval_prompts=16", "--save_every=-1", f"--out_dir={out_dir}"]
    if cfg.nproc == 1:
        peak_gb = grpo.main(grpo_args)["Peak memory (GB)"]
    else:
        peak_gb = run_under_torchrun(cfg.nproc, grpo_args)
    log = (out_dir / "training_log.txt").read_text()
    timed = {tag: logged(log, f"train/{tag}")[1:] for tag in
             ("time_rollout", "time_score", "time_update", "dt", "completion_len", "rollout_tok_per_s")}
    median = {tag: statistics.median(values) for tag, values in timed.items()}
    name = torch.cuda.get_device_name() if on_cuda else device_type
    name += f" x {cfg.nproc}" if cfg.nproc > 1 else ""
    print(f"\ndevice: {name} | d{depth}, vocab {vocab_size:,} | {cfg.prompts_per_step} prompts x "
          f"{cfg.samples_per_prompt} samples x {cfg.max_new_tokens} new tokens | train prompts: mean "
          f"{statistics.mean(prompt_lens):.0f} tokens (cap {cfg.max_prompt_tokens}) | mean completion "
          f"{median['completion_len']:.0f} tokens")
    print(f"median of steps 2..{cfg.steps}: rollout {median['time_rollout']:.2f}s ({median['rollout_tok_per_s']:,.0f} "
          f"generated tok/s) | score {median['time_score']:.2f}s | update {median['time_update']:.2f}s "
          f"| step {median['dt']:.2f}s")
    print("per step (rollout / score / update, s): " + ", ".join(
        f"{r:.2f}/{s:.2f}/{u:.2f}" for r, s, u in zip(timed["time_rollout"], timed["time_score"], timed["time_update"])))
    print(f"peak memory (rank 0): {peak_gb:.1f} GB | scratch folder: {work}")


if __name__ == "__main__":
    main()
