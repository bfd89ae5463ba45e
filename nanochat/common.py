"""
Shared machinery every stage needs: where runs write, which device to use,
torchrun/DDP setup, rank-0 printing and logging, and seeding.

Only torch and numpy are imported here, so `import nanochat` stays light.
"""

import logging
import os
import random
import subprocess
import time
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parent.parent


# -----------------------------------------------------------------------------
# Where a run writes (SPEC section 2). Every path is overridable by an environment
# variable so the tiny preset never overwrites a full run's outputs.

def get_base_dir() -> Path:
    """$NANOCHAT_BASE_DIR (default ~/.cache/nanochat): shards, tokenizer, eval bundle, report."""
    base = os.environ.get("NANOCHAT_BASE_DIR")
    path = Path(base).expanduser() if base else Path.home() / ".cache" / "nanochat"
    path.mkdir(parents=True, exist_ok=True)
    return path


def get_outs_dir() -> Path:
    """$NANOCHAT_OUTS_DIR (default <repo>/outs): one folder per stage with its checkpoints and logs."""
    outs = os.environ.get("NANOCHAT_OUTS_DIR")
    return Path(outs).expanduser().resolve() if outs else REPO_ROOT / "outs"


def get_kat_cache_dir() -> Path:
    """$NANOCHAT_KAT_CACHE (default <repo>/.cache): preference data, embeddings, diversity report."""
    cache = os.environ.get("NANOCHAT_KAT_CACHE")
    return Path(cache).expanduser().resolve() if cache else REPO_ROOT / ".cache"


def stage_dir(stage: str) -> Path:
    """outs/<stage>/ for a stage name such as base, sft or grpo_density."""
    return get_outs_dir() / stage


OFFLINE_ENV = "NANOCHAT_TASKS_OFFLINE"


def inputs_offline() -> bool:
    """$NANOCHAT_TASKS_OFFLINE=1 (the tiny preset): task data and the CORE bundle come from the bundled samples."""
    value = os.environ.get(OFFLINE_ENV, "0").strip().lower()
    if value not in ("0", "1", "true", "false"):
        raise ValueError(f"{OFFLINE_ENV} must be 1/0/true/false, got {value!r}")
    return value in ("1", "true")


# -----------------------------------------------------------------------------
# Files and provenance

def atomic_write(path, content, *, durable: bool = False):
    """
    Write content (str, bytes, or a callable given the open binary file) to a temporary file
    beside path, then rename it over path: readers see the old file or the new one, never half.
    durable: fsync the file and its folder first (checkpoints must survive a power cut).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a killed or failed write leaves the old file and nothing else
        raise
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself reaches the disk
        finally:
            os.close(fd)
    return path


def git_commit() -> str:
    """The checkout's HEAD commit, or why it is unknown (recorded in checkpoints and reports)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "unknown (git is not installed)"
    if result.returncode != 0:
        return "unknown (not a git checkout with commits)"
    return result.stdout.strip()


# -----------------------------------------------------------------------------
# Printing and logging on rank 0 only

def is_ddp() -> bool:
    return int(os.environ.get("RANK", -1)) != -1


def get_rank() -> int:
    return int(os.environ.get("RANK", 0))


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


PROGRESS_ENV = "NANOCHAT_PROGRESS"


def progress_bar(iterable=None, **tqdm_options):
    """
    A tqdm bar on stderr for a long loop, shown on rank 0 only and only when stderr is a terminal,
    so logs and CI stay quiet; $NANOCHAT_PROGRESS=1 forces it on (a terminal behind tee), 0 off.
    """
    from tqdm import tqdm  # here, not at the top: `import nanochat` needs only torch, numpy, tiktoken

    setting = os.environ.get(PROGRESS_ENV, "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"{PROGRESS_ENV} must be 1, 0 or unset (a bar only on a terminal), got {setting!r}")
    shown = sys.stderr.isatty() if setting == "" else setting == "1"
    return tqdm(iterable, disable=not shown or get_rank() != 0, dynamic_ncols=True, **tqdm_options)


def setup_logging(level=logging.INFO):
    """Rank-0 logging to stderr with a compact format; other ranks log warnings only."""
    logging.basicConfig(
        level=level if get_rank() == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


# -----------------------------------------------------------------------------
# Devices and distributed setup

def torchrun_command(nproc: int, module: str, flags: list[str]) -> list[str]:
    """`python -m scripts.X flags` on nproc processes on this machine, through the torchrun of this
    python (the bare `torchrun` on PATH may belong to another interpreter)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, "--", *flags]


def autodetect_device_type() -> str:
    """cuda if present, else mps, else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def get_dist_info():
    """(is_ddp, rank, local_rank, world_size) from the environment torchrun sets."""
    if is_ddp():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def seed_everything(seed: int):
    """Seed Python, numpy and torch (all devices) so runs repeat."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def compute_init(device_type: str | None = None, seed: int = 42):
    """
    Set up the process for a stage. Returns (ddp, rank, local_rank, world_size, device).
    Under torchrun: NCCL on CUDA, gloo on CPU; one GPU per local rank.
    """
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"device_type must be cuda, mps or cpu, got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device_type=cuda was asked for but torch sees no CUDA device; use --device_type=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device_type=mps was asked for but MPS is not available; use --device_type=cpu")

    seed_everything(seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"

    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif ddp:
        device = torch.device(device_type)
        dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type)
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA (the matmuls run on tensor cores; losses and softcaps stay fp32 in
    the model); a disabled one elsewhere, so CPU runs are plain fp32. Reusable across `with` blocks."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


def synchronize(device: torch.device):
    """Wait for queued device work, so host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def synchronized_time(device: torch.device) -> float:
    """time.time() once queued device work is done: what a training step is timed between."""
    synchronize(device)
    return time.time()


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated device memory in GB (0 on CPU, where torch does not track it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return 0.0


# -----------------------------------------------------------------------------
# Peak dense bf16 throughput by device name, for MFU. Figures are the vendors' dense
# (no sparsity) tensor-core peaks; an unknown GPU reports MFU as nan rather than a guess.

_PEAK_BF16_FLOPS = [
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),       # SXM
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


def gpu_peak_flops(device_name: str) -> float:
    """Dense bf16 peak FLOP/s of a GPU from its name (torch.cuda.get_device_name), nan if unknown."""
    for key, flops in _PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return float("nan")


def device_peak_flops(device: torch.device) -> float:
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    return float("nan")
