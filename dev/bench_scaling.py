"""
base_train on several process counts, side by side: tokens/s, MFU, scaling efficiency against
the one-process run, peak memory, and the loss and validation bpb after the same number of steps
at the same total batch (issue 10's table; 1, 2 and 8 GPUs on an 8-GPU node).

    python -m dev.bench_scaling --nprocs=1,2,8                  # d20, B=32, T=2048, 12 steps each
    python -m dev.bench_scaling --nprocs=1,2 --device_type=cpu --depth=2 --max_seq_len=64 \\
        --device_batch_size=4 --total_batch_size=512 --num_iterations=4   # the plumbing, on a CPU

Each run is the real script under torchrun (`python -m torch.distributed.run`), writing its
checkpoint into a scratch folder. Throughput is the median over steps 2..N (step 1 compiles).
The loss is what base_train logs: the last micro-batch of rank 0, so runs on different process
counts read different documents at each step (ranks read disjoint documents) and agree
statistically, not exactly; the validation bpb is measured on the same held-out tokens by all.
"""

import re
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import REPO_ROOT, torchrun_command
from nanochat.flags import opt, parse_flags

STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| loss ([\d.]+) .*\| tok/s ([\d,]+) \| mfu ([\d.]+|nan)% \| mem ([\d.]+)GB", re.M)
VAL_LINE = re.compile(r"^step (\d+) \| val bpb ([\d.]+)", re.M)


@dataclass
class Config:
    nprocs: str = opt("1,2", help="comma-separated process counts, the first is the reference (usually 1)")
    device_type: str = opt("", help="cuda|cpu (empty: base_train autodetects)")
    depth: int = 20
    max_seq_len: int = 2048
    device_batch_size: int = 32
    total_batch_size: int = opt(524288, help="the same for every process count")
    num_iterations: int = opt(12, help="steps per run")
    eval_tokens: int = opt(524288, help="validation tokens at the last step")
    workdir: str = opt("", help="scratch folder for the runs' checkpoints (default: a new temporary one)")


def run_base_train(cfg: Config, nproc: int, out_dir: Path) -> dict:
    flags = [f"--depth={cfg.depth}", f"--max_seq_len={cfg.max_seq_len}", f"--device_batch_size={cfg.device_batch_size}",
             f"--total_batch_size={cfg.total_batch_size}", f"--num_iterations={cfg.num_iterations}",
             f"--eval_tokens={cfg.eval_tokens}", "--eval_every=-1", "--core_metric_every=-1", "--sample_every=-1",
             "--save_every=-1", f"--out_dir={out_dir}"]
    if cfg.device_type:
        flags.append(f"--device_type={cfg.device_type}")
    result = subprocess.run(torchrun_command(nproc, "scripts.base_train", flags), cwd=REPO_ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"base_train on {nproc} process(es) failed with exit code {result.returncode}; "
                           f"the end of its output:\n{(result.stdout + result.stderr)[-4000:]}")
    return parse_log(result.stdout, nproc)


def parse_log(text: str, nproc: int) -> dict:
    steps = [(int(s), float(loss), float(tok.replace(",", "")), float(mfu), float(mem))
             for s, _, loss, tok, mfu, mem in STEP_LINE.findall(text)]
    vals = VAL_LINE.findall(text)
    if not steps or not vals:
        raise RuntimeError(f"no step or validation lines in base_train's output on {nproc} process(es):\n{text[-2000:]}")
    timed = [row for row in steps if row[0] >= 2] or steps
    return {"nproc": nproc, "tok_per_s": statistics.median(r[2] for r in timed),
            "mfu": statistics.median(r[3] for r in timed), "peak_gb": max(r[4] for r in steps),
            "last_step": steps[-1][0], "loss": steps[-1][1], "val_bpb": float(vals[-1][1])}


def main(argv=None):
    cfg = parse_flags(Config, argv)
    counts = [int(n) for n in cfg.nprocs.split(",") if n.strip()]
    if not counts or min(counts) < 1:
        raise ValueError(f"--nprocs must list positive process counts, got {cfg.nprocs!r}")
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="bench_scaling_"))
    rows = [run_base_train(cfg, n, work / f"base_{n}") for n in counts]
    ref = rows[0]
    print(f"\nbase_train d{cfg.depth}, B={cfg.device_batch_size} per process, T={cfg.max_seq_len}, "
          f"{cfg.total_batch_size:,} tokens per step, {cfg.num_iterations} steps per run (throughput: median of steps 2..)")
    print(f"{'procs':>5} | {'tok/s':>11} | {'MFU':>6} | {'efficiency':>10} | {'peak GB':>7} | "
          f"{'loss @ step':>14} | {'val bpb':>7}")
    for r in rows:
        efficiency = r["tok_per_s"] / (ref["tok_per_s"] * r["nproc"] / ref["nproc"])
        print(f"{r['nproc']:>5} | {r['tok_per_s']:>11,.0f} | {r['mfu']:>5.1f}% | {100 * efficiency:>9.1f}% | "
              f"{r['peak_gb']:>7.1f} | {r['loss']:>7.4f} @ {r['last_step']:<4d} | {r['val_bpb']:>7.4f}")
    print(f"efficiency: tokens/s over {ref['nproc']}-process tokens/s scaled by the process count; "
          f"checkpoints under {work}")
    return rows


if __name__ == "__main__":
    main()
