"""
Learning-rate and momentum schedules shared by the training stages.

lr_multiplier scales every group's initial_lr. The stages use it as nanochat does:
- base: constant, then a linear warmdown over the last 20% of steps;
- mid: the same shape over one epoch of the mixture, whose number of steps is not known in
  advance (conversations differ in length), so the position is the fraction of the epoch
  consumed: lr_multiplier_at_progress;
- sft: a linear decay from 1 to 0 over all steps (warmdown_ratio=1.0).
"""

# Midtraining knows only how far through its epoch it is; the step schedule is evaluated on a
# grid this fine, far finer than any change of learning rate could matter.
PROGRESS_STEPS = 100_000


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                  final_lr_frac: float = 0.0) -> float:
    """Warmup, constant, then linear warmdown to final_lr_frac over the last warmdown_ratio of steps."""
    if not 0 <= step <= num_iterations:  # past the end the warmdown line goes negative: gradient ascent
        raise ValueError(f"step {step} is outside the schedule's 0..{num_iterations} steps")
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def lr_multiplier_at_progress(progress: float, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                              final_lr_frac: float = 0.0) -> float:
    """lr_multiplier where training is `progress` (0 to 1) of the way through its horizon."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    return lr_multiplier(round(progress * PROGRESS_STEPS), PROGRESS_STEPS, warmup_ratio, warmdown_ratio, final_lr_frac)


def epoch_steps(num_iterations: int, num_examples: int, examples_per_step: int, num_epochs: int, *,
                what: str, per_step_flag: str) -> int:
    """--num_iterations when it is set (> 0), else the whole steps in num_epochs passes over the data."""
    if num_iterations > 0:
        return num_iterations
    steps = (num_examples // examples_per_step) * num_epochs
    if steps < 1:
        raise ValueError(f"there are {num_examples} {what}, fewer than one step of {examples_per_step}; "
                         f"lower --{per_step_flag} or set --num_iterations")
    return steps


def is_due(step: int, every: int, is_last: bool, at_start: bool = False) -> bool:
    """Whether a periodic action (evaluate, sample, save) runs at this step: always at the last step,
    and every `every` steps when every > 0 (-1: only at the last); at step 0 only if at_start."""
    return is_last or (every > 0 and step % every == 0 and (step > 0 or at_start))
