"""
base_train on several process counts, side by side: tokens/s, MFU, scaling efficiency against the
one-process run, peak memory, and the training loss and validation bpb at the same total batch
(issues 3 and 10: N processes train like 1 "within bf16 noise"; 1, 2 and 8 GPUs on a node).

    python -m dev.bench_scaling --nprocs=1,2,8 --reference_batch=16   # d20, B=32, T=2048, 12 steps each
    python -m dev.bench_scaling --nprocs=1,2 --device_type=cpu --depth=2 --max_seq_len=64 \\
        --device_batch_size=4 --total_batch_size=512 --num_iterations=4   # the plumbing, on a CPU

Each run is the real script under torchrun, checkpointing into a scratch folder. The table ends
with each run's largest per-step gap to the first run's batch loss; an N-process gap no larger
than the --reference_batch run's (the rounding noise floor) is "within bf16 noise".
Measured results: dev/NOTES.md, "Multi-GPU checks".
"""

import re
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import REPO_ROOT, torchrun_command
from nanochat.flags import opt, parse_flags

STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| loss ([\d.]+) \| batch loss ([\d.]+) .*\| tok/s ([\d,]+) "
                       r"\| mfu ([\d.]+|nan)% \| mem ([\d.]+)GB", re.M)
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
    # identical batches: the runs' losses differ only by summation order and rounding; without, only statistically
    identical_batches: bool = opt(True, help="every process count trains on the same global batch per step "
                                  "(base_train --identical_batches); false reads disjoint documents per rank")
    # same total batch and tokens, another accumulation split and other matmul shapes: rounding alone
    reference_batch: int = opt(0, help="if > 0, one more 1-process run at this device batch and the same total "
                               "batch: the summation-order/rounding noise floor of the loss comparison")
    workdir: str = opt("", help="scratch folder for the runs' checkpoints (default: a new temporary one)")


def run_base_train(cfg: Config, nproc: int, device_batch_size: int, out_dir: Path) -> dict:
    flags = [f"--depth={cfg.depth}", f"--max_seq_len={cfg.max_seq_len}", f"--device_batch_size={device_batch_size}",
             f"--total_batch_size={cfg.total_batch_size}", f"--num_iterations={cfg.num_iterations}",
             f"--eval_tokens={cfg.eval_tokens}", f"--identical_batches={str(cfg.identical_batches).lower()}",
             "--eval_every=-1", "--core_metric_every=-1", "--sample_every=-1", "--save_every=-1",
             f"--out_dir={out_dir}"]
    if cfg.device_type:
        flags.append(f"--device_type={cfg.device_type}")
    result = subprocess.run(torchrun_command(nproc, "scripts.base_train", flags), cwd=REPO_ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"base_train on {nproc} process(es) failed with exit code {result.returncode}; "
                           f"the end of its output:\n{(result.stdout + result.stderr)[-4000:]}")
    return {**parse_log(result.stdout, nproc), "device_batch_size": device_batch_size}


def parse_log(text: str, nproc: int) -> dict:
    steps = [(int(s), float(loss), float(batch_loss), float(tok.replace(",", "")), float(mfu), float(mem))
             for s, _, loss, batch_loss, tok, mfu, mem in STEP_LINE.findall(text)]
    vals = VAL_LINE.findall(text)
    if not steps or not vals:
        raise RuntimeError(f"no step or validation lines in base_train's output on {nproc} process(es):\n{text[-2000:]}")
    timed = [row for row in steps if row[0] >= 2] or steps  # step 1 compiles: throughput is the median of 2..N
    return {"nproc": nproc, "tok_per_s": statistics.median(r[3] for r in timed),
            "mfu": statistics.median(r[4] for r in timed), "peak_gb": max(r[5] for r in steps),
            "last_step": steps[-1][0], "loss": steps[-1][1], "batch_loss": {r[0]: r[2] for r in steps},
            "val_bpb": float(vals[-1][1])}


def max_batch_loss_gap(row: dict, ref: dict) -> float:
    """The largest |batch loss - reference batch loss| over the steps both runs logged."""
    # base_train's batch loss is the exact mean over the whole global batch, so it is comparable across world sizes
    shared = row["batch_loss"].keys() & ref["batch_loss"].keys()
    if not shared:
        raise RuntimeError(f"the {row['nproc']}-process run and the reference logged no step in common")
    return max(abs(row["batch_loss"][s] - ref["batch_loss"][s]) for s in shared)


def main(argv=None):
    cfg = parse_flags(Config, argv)
    counts = [int(n) for n in cfg.nprocs.split(",") if n.strip()]
    if not counts or min(counts) < 1:
        raise ValueError(f"--nprocs must list positive process counts, got {cfg.nprocs!r}")
    if cfg.reference_batch < 0:
        raise ValueError(f"--reference_batch must be 0 (off) or a device batch size, got {cfg.reference_batch}")
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="bench_scaling_"))
    rows = [run_base_train(cfg, n, cfg.device_batch_size, work / f"base_{n}") for n in counts]
    noise_floor = None
    if cfg.reference_batch > 0:
        noise_floor = run_base_train(cfg, 1, cfg.reference_batch, work / f"base_1_B{cfg.reference_batch}")
    ref = rows[0]
    mid, last = max(1, cfg.num_iterations // 2), cfg.num_iterations

    print(f"\nbase_train d{cfg.depth}, T={cfg.max_seq_len}, {cfg.total_batch_size:,} tokens per step, "
          f"{cfg.num_iterations} steps per run, identical batches: {cfg.identical_batches} "
          f"(throughput: median of steps 2..)")
    print(f"{'procs':>5} | {'B':>4} | {'tok/s':>11} | {'MFU':>6} | {'efficiency':>10} | {'peak GB':>7} | "
          f"{'loss @1':>8} | {f'@{mid}':>8} | {f'@{last}':>8} | {'val bpb':>7}")
    for r in rows + ([noise_floor] if noise_floor else []):
        efficiency = r["tok_per_s"] / (ref["tok_per_s"] * r["nproc"] / ref["nproc"])
        losses = " | ".join(f"{r['batch_loss'].get(s, float('nan')):>8.4f}" for s in (1, mid, last))
        print(f"{r['nproc']:>5} | {r['device_batch_size']:>4} | {r['tok_per_s']:>11,.0f} | {r['mfu']:>5.1f}% | "
              f"{100 * efficiency:>9.1f}% | {r['peak_gb']:>7.1f} | {losses} | {r['val_bpb']:>7.4f}")
    print(f"loss: the exact mean training loss of the step's whole global batch; efficiency: tokens/s over "
          f"{ref['nproc']}-process tokens/s scaled by the process count; checkpoints under {work}")
    reference = f"the {ref['nproc']}-process run (B={ref['device_batch_size']})"
    for r in rows[1:]:
        r["max_gap"] = max_batch_loss_gap(r, ref)
        print(f"{r['nproc']} processes: max over steps of |batch loss - {reference}| = {r['max_gap']:.4f}")
    if noise_floor:
        noise_floor["max_gap"] = max_batch_loss_gap(noise_floor, ref)
        print(f"noise floor, 1 process at B={cfg.reference_batch}: max over steps of |batch loss - {reference}| "
              f"= {noise_floor['max_gap']:.4f}")
        for r in rows[1:]:
            verdict = "within" if r["max_gap"] <= noise_floor["max_gap"] else "ABOVE"
            print(f"{r['nproc']} processes: {verdict} the noise floor")
    return rows + ([noise_floor] if noise_floor else [])


if __name__ == "__main__":
    main()
