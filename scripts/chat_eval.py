"""
Evaluate a chat model: ARC-Easy, ARC-Challenge and MMLU by the logits of the answer letters,
GSM8K, HumanEval and SpellingBee by sampling and grading, then ChatCORE when all six ran.

    python -m scripts.chat_eval -i sft
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" -x 100
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i rl -a GSM8K

Any stage's checkpoint loads by name (-i grpo_density) or path. The results go into the
"Chat evaluation" section of report/<stage>_report.md, with the exact keys the report's summary
table reads; a run over a subset of tasks replaces that section with the subset.
"""

import re
import time
from dataclasses import dataclass


from nanochat.checkpoint_manager import load_model
from nanochat.common import autocast_context, compute_cleanup, compute_init, print0
from nanochat.engine import Engine
from nanochat.flags import flags_dict, opt, parse_flags, short
from nanochat.report import get_report
from nanochat.task_eval import TASK_NAMES, chatcore, run_categorical_eval, run_generative_eval
from tasks.eval_tasks import build_task


@dataclass
class Config:
    """Evaluate a chat checkpoint on the ChatCORE tasks."""
    source: str = short("i", "sft", help="stage name (mid, sft, rl, grpo_density, ...) or checkpoint path")
    task_name: str = short("a", "", help="tasks separated by '|', e.g. 'ARC-Easy|GSM8K'; empty runs all six")
    batch_size: int = short("b", 8, help="problems per forward pass / per engine call", min=1)
    num_samples: int = short("n", 1, help="samples per generative problem; a problem passes if any is correct", min=1)
    max_new_tokens: int = short("m", 512, help="longest generated answer", min=1)
    temperature: float = short("t", 0.0, help="0 decodes greedily", min=0)
    top_k: int = short("k", 50, help="sample among the k most likely tokens; -1 disables", min=1, sentinel=-1)
    max_problems: int = short("x", -1, help="evaluate only the first x problems of each task; -1 all",
                              min=1, sentinel=-1)
    seed: int = 42
    device_type: str = opt("", help="cuda|cpu|mps; empty autodetects")
    report_stage: str = opt("", help="report file to write; empty: the -i stage name (a checkpoint path: its stage)")


def selected_tasks(task_name: str) -> list[str]:
    names = TASK_NAMES if not task_name else [name.strip() for name in task_name.split("|")]
    unknown = [name for name in names if name not in TASK_NAMES]
    if unknown:
        raise ValueError(f"-a {task_name!r}: unknown task(s) {unknown}; choose from {'|'.join(TASK_NAMES)}")
    return names


def main(argv=None):
    cfg = parse_flags(Config, argv)
    task_names = selected_tasks(cfg.task_name)
    ddp, rank, local_rank, world_size, device = compute_init(cfg.device_type or None, seed=cfg.seed)
    model, tokenizer, meta = load_model(cfg.source, device, phase="eval")
    engine = Engine(model, tokenizer)
    autocast = autocast_context(device)
    max_problems = None if cfg.max_problems < 0 else cfg.max_problems
    top_k = None if cfg.top_k < 0 else cfg.top_k
    print0(f"evaluating {cfg.source} (stage {meta.get('stage')}, step {meta.get('step')}) on {', '.join(task_names)}")

    accuracies = {}
    for name in task_names:
        task = build_task(name)
        t0 = time.time()
        with autocast:
            if task.eval_type == "categorical":
                accuracy = run_categorical_eval(task, tokenizer, model, cfg.batch_size, max_problems)
            else:
                accuracy = run_generative_eval(task, tokenizer, engine, cfg.num_samples, max_problems,
                                               cfg.max_new_tokens, cfg.temperature, top_k, cfg.batch_size, cfg.seed)
        accuracies[name] = accuracy
        print0(f"{name}: {100 * accuracy:.2f}% ({time.time() - t0:.1f}s)")

    results = dict(accuracies)
    score = chatcore(accuracies)
    if score is not None:
        results["ChatCORE"] = score
        print0(f"ChatCORE: {score:.4f}")

    # report file names are stage names; a checkpoint path reports under the stage that wrote it
    report_stage = cfg.report_stage or (cfg.source if re.fullmatch(r"[a-z0-9_]+", cfg.source) else meta.get("stage"))
    if not report_stage:
        raise ValueError(f"-i {cfg.source}: cannot tell which report stage this checkpoint belongs to "
                         "(its meta has no 'stage'); pass --report_stage=<name>")
    checkpoint = {"Checkpoint": f"{meta.get('stage', cfg.source)} step {meta.get('step', '?')}",
                  "Problems per task": "all" if max_problems is None else max_problems}
    get_report().log(stage=report_stage, section="Chat evaluation", data=[checkpoint, flags_dict(cfg), results])
    compute_cleanup()
    return results


if __name__ == "__main__":
    main()
