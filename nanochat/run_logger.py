"""
The metrics logger every training script uses.

    logger = RunLogger(out_dir, run=cfg.run, config=meta, enabled=rank == 0, start_step=step)
    logger.log(step, {"train/loss": loss, "train/lr": lr})
    logger.text("sample: The capital of France is Paris")
    logger.close()

Each log() writes TensorBoard scalars under out_dir/logs/, appends one readable line to
out_dir/training_log.txt, and, when a run name other than "dummy" is given, sends the metrics to
wandb (an optional extra). Only rank 0 should be enabled: the other ranks hold the same numbers,
and several writers would interleave in one file. On a resume at step S, TensorBoard curves
continue without a doubled tail; training_log.txt keeps every line and notes the resume.
"""

import math
import time
from pathlib import Path

TRAINING_LOG = "training_log.txt"
TENSORBOARD_DIR = "logs"


def _as_float(value) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def _format_value(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else str(value)


class RunLogger:
    def __init__(self, out_dir, run: str = "dummy", config: dict | None = None, enabled: bool = True,
                 start_step: int = 0, project: str = "nanochat"):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self._tensorboard = None
        self._wandb_run = None
        if not enabled:
            return
        # "dummy" is nanochat's name for "no wandb run" (WANDB_RUN defaults to it); any other name logs there
        if run != "dummy":
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError(f"--run={run} asks for wandb logging but wandb is not installed: "
                                   "run `uv sync --extra wandb`, or pass --run=dummy to log to TensorBoard only") from e
            self._wandb_run = wandb.init(project=project, name=run, config=config or {})
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir.mkdir(parents=True, exist_ok=True)
        # purge_step: TensorBoard discards the killed run's events at steps >= start_step
        self._tensorboard = SummaryWriter(log_dir=str(self.out_dir / TENSORBOARD_DIR),
                                          purge_step=start_step if start_step > 0 else None, flush_secs=10)
        what = f"resumed at step {start_step}" if start_step > 0 else "started"
        self.text(f"=== run {run} {what} in {self.out_dir} ===")

    def log(self, step: int, metrics: dict):
        """Scalars at one step: names like "train/loss"; values are numbers or 0-d tensors. A None value
        (a figure this step has none of, such as the gradient norm when clipping is off) is left out."""
        if not self.enabled:
            return
        values = {name: _as_float(value) for name, value in metrics.items() if value is not None}
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, step)
        self._append(f"step {step:6d} | " + " | ".join(f"{k} {_format_value(v)}" for k, v in values.items()))
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def text(self, message: str):
        """A free-form line in training_log.txt (samples, evaluation results, notes)."""
        if self.enabled:
            self._append(message)

    def _append(self, line: str):
        # Opened per line so a killed run loses nothing already logged.
        with open(self.out_dir / TRAINING_LOG, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def close(self):
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
