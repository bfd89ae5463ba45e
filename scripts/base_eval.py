"""
CORE of a base checkpoint: DCLM's 22 in-context tasks, each as accuracy centred on its random
baseline, and their mean (the number nanochat's base models are judged by).

    python -m scripts.base_eval
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval
    python -m scripts.base_eval --bundle=sample --max_per_task=8      # offline smoke test

--bundle=auto uses $NANOCHAT_BASE_DIR/eval_bundle (scripts.prefetch fetches it; downloaded here if
missing); a failed download is an error. The offline sample only on request: --bundle=sample, or
auto with NANOCHAT_TASKS_OFFLINE=1 and no bundle downloaded. The result goes into the "Base model
evaluation" section of the report: CORE, which bundle produced it, and every task.
"""

from dataclasses import dataclass
from pathlib import Path


from nanochat.checkpoint_manager import load_model
from nanochat.common import autocast_context, compute_cleanup, compute_init, print0
from nanochat.core_eval import SAMPLE_BUNDLE_DIR, evaluate_core, get_eval_bundle
from nanochat.flags import opt, parse_flags
from nanochat.report import get_report


@dataclass
class Config:
    """Evaluate a base checkpoint on the CORE tasks."""
    source: str = opt("base", help="stage name or checkpoint path")
    device_type: str = opt("", help="cuda|cpu|mps; empty autodetects")
    bundle: str = opt("auto", help="auto (the downloaded bundle; the sample only with NANOCHAT_TASKS_OFFLINE=1) | "
                      "sample (a smoke test, not comparable with published CORE) | path to a bundle")
    max_per_task: int = opt(-1, help="items scored per task, a fixed random subset; -1 scores all", min=1, sentinel=-1)


def resolve_bundle(choice: str) -> Path:
    if choice == "auto":
        return get_eval_bundle()
    if choice == "sample":
        return SAMPLE_BUNDLE_DIR
    path = Path(choice).expanduser()
    if not (path / "core.yaml").exists():
        raise FileNotFoundError(f"--bundle={choice}: {path / 'core.yaml'} does not exist; use auto, sample, or a "
                                f"folder laid out like $NANOCHAT_BASE_DIR/eval_bundle")
    return path


def main(argv=None):
    cfg = parse_flags(Config, argv)
    ddp, rank, local_rank, world_size, device = compute_init(cfg.device_type or None)
    model, tokenizer, meta = load_model(cfg.source, device, phase="eval")
    bundle_dir = resolve_bundle(cfg.bundle)
    offline_sample = bundle_dir.resolve() == SAMPLE_BUNDLE_DIR.resolve()

    autocast = autocast_context(device)
    with autocast:
        core = evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=cfg.max_per_task)
    print0(f"CORE: {core['core']:.4f}" + (" (offline sample, not comparable with published CORE)" if offline_sample else ""))

    rows = ["| Task | Accuracy | Centred |", "|---|---|---|"]
    rows += [f"| {label} | {acc:.4f} | {core['centered'][label]:.4f} |" for label, acc in core["results"].items()]
    bundle_note = ("offline sample (12 items per task written for this repo; a smoke test, not comparable "
                   "with published CORE)" if offline_sample else f"eval bundle at {bundle_dir}")
    get_report().log(stage="base", section="Base model evaluation", data=[
        {"Checkpoint": f"{meta.get('stage', cfg.source)} step {meta.get('step', '?')}",
         "Items per task": "all" if cfg.max_per_task <= 0 else cfg.max_per_task,
         "Bundle": bundle_note, "CORE": core["core"]},
        "\n".join(rows),
    ])
    compute_cleanup()


if __name__ == "__main__":
    main()
