"""
Do scripts.grpo's defaults keep the policy diverse while the independent judge's reward rises? GRPO
from the SFT model twice, for the same steps on the same draws: with the defaults, and with the old
settings (group z-scored advantages, the k3 KL as a per-token loss, lr 1e-5, no truncation penalty).
Each is compared with SFT (the step-0 row of its trajectory: the same model, prompts and seeds).

    python -m dev.grpo_defaults                       # outs/sft, outs/rm, outs/rm_judge, <kat cache>/data
    python -m dev.grpo_defaults --steps=300 --flags="--max_new_tokens=192" --new_flags="--beta=0.2"
    python -m dev.grpo_defaults --tiny                # CPU smoke test: random tiny models in a scratch folder

Pass, for the defaults: judge reward above SFT's, and distinct-2 and across-prompt embedding distance
both within 20% of SFT's. The figures are trajectory.jsonl's (nanochat/kat/trajectory.py) on the dev
prompts; the runs go to <out_root>/new and <out_root>/old. Exit status 1 when the defaults fail
(--tiny: always 0, its random models cannot pass).
"""

import json
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import autodetect_device_type, get_outs_dir
from nanochat.flags import opt, parse_flags
from nanochat.kat.trajectory import TrajectoryLog

OLD_SETTINGS = ["--adv_norm=group", "--kl=token_k3", "--learning_rate=1e-5", "--truncation_penalty=0"]
WITHIN = 0.2  # the diversity figures may move this fraction of SFT's value


@dataclass
class Config:
    device_type: str = opt("", help="cuda|cpu|mps (empty: autodetect)")
    steps: int = opt(200, help="GRPO steps of each run", min=1)
    traj_every: int = opt(50, help="trajectory evaluation interval (and at step 0 and the end)", min=1)
    traj_prompts: int = opt(128, help="dev prompts per evaluation (at most the dev half of the test prompts)", min=2)
    traj_samples: int = opt(8, help="samples per dev prompt", min=2)
    source: str = opt("sft", help="the SFT model: stage name or checkpoint path")
    reward_model: str = opt("rm", help="the policy's reward model")
    judge: str = opt("rm_judge", help="the independent judge (python -m scripts.train_rm --role=judge)")
    data_dir: str = opt("", help="KAT data folder (default <kat cache>/data)")
    flags: str = opt("--prompts_per_step=16 --samples_per_prompt=8 --max_new_tokens=128 --save_every=-1",
                     help="scripts.grpo flags of both runs")
    new_flags: str = opt("", help="more flags for the defaults' run only (a variant to try)")
    old_flags: str = opt("", help="more flags for the old settings' run only")
    out_root: str = opt("", help="runs go to <out_root>/new and /old (default <outs>/grpo_defaults)")
    overwrite: bool = opt(False, help="delete <out_root>/new and /old first (else they must not exist)")
    tiny: bool = opt(False, help="CPU smoke test on random tiny models, data and judge in a scratch folder")


def tiny_setup() -> list[str]:
    """Point NANOCHAT_* at a scratch folder holding random d2 models (SFT, RM, judge) and the bundled
    KAT samples; returns the scripts.grpo flags that keep a CPU run to a minute."""
    from dataclasses import asdict

    from dev.bench_grpo import build_scratch, random_gpt, word_tokenizer
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.kat.reward_model import KIND, RewardModel

    work = Path(tempfile.mkdtemp(prefix="grpo_defaults_"))
    os.environ.update({"NANOCHAT_BASE_DIR": str(work / "base"), "NANOCHAT_OUTS_DIR": str(work / "outs"),
                       "NANOCHAT_KAT_CACHE": str(work / "cache")})
    build_scratch(work, depth=2, vocab_size=1024)
    judge = RewardModel(random_gpt(2, 1024), word_tokenizer(1024))
    config = asdict(judge.backbone.config)
    save_checkpoint(work / "outs" / "rm_judge", 0, judge, [], final=True,
                    meta={"kind": KIND, "model_config": config, "backbone_config": config, "max_seq_len": 2048})
    print(f"tiny smoke test in {work}")
    return ["--prompts_per_step=2", "--samples_per_prompt=2", "--max_new_tokens=12", "--max_prompt_tokens=96",
            "--rollout_prompts=2", "--save_every=-1"]


def compare(sft: dict, end: dict) -> dict:
    """Each figure's end value against SFT's, and whether the run passes."""
    checks = {"judge_reward": end["judge_reward"] > sft["judge_reward"]}
    for name in ("distinct_2", "across_prompt_distance"):
        checks[name] = abs(end[name] - sft[name]) <= WITHIN * abs(sft[name])
    return checks


def main():
    cfg = parse_flags(Config)
    base_flags = shlex.split(cfg.flags)
    if cfg.tiny:
        base_flags = tiny_setup()
        cfg.device_type, cfg.traj_prompts, cfg.traj_samples = "cpu", 4, 2
    out_root = Path(cfg.out_root) if cfg.out_root else get_outs_dir() / "grpo_defaults"
    from nanochat.checkpoint_manager import find_stage_checkpoint
    from scripts import grpo

    try:
        judge_path = find_stage_checkpoint(cfg.judge)
    except FileNotFoundError as e:
        raise SystemExit(f"{e}\nthe judge is what this comparison reads: train it with "
                         "python -m scripts.train_rm --role=judge, or pass --judge=PATH") from None
    common = [f"--device_type={cfg.device_type or autodetect_device_type()}", f"--max_steps={cfg.steps}",
              f"--traj_every={cfg.traj_every}", f"--traj_prompts={cfg.traj_prompts}",
              f"--traj_samples={cfg.traj_samples}", f"--source={cfg.source}", f"--reward_model={cfg.reward_model}",
              f"--judge={judge_path}", "--prompt_sampling=uniform", *base_flags]
    if cfg.data_dir:
        common.append(f"--data_dir={cfg.data_dir}")
    runs = {"new": shlex.split(cfg.new_flags), "old": [*OLD_SETTINGS, *shlex.split(cfg.old_flags)]}
    rows = {}
    for arm, arm_flags in runs.items():
        out_dir = out_root / arm
        if out_dir.exists():
            if not cfg.overwrite:
                raise SystemExit(f"{out_dir} exists: pass --overwrite to replace it, or --out_root elsewhere")
            shutil.rmtree(out_dir)
        print(f"==== {arm}: scripts.grpo {' '.join([*common, *arm_flags])}", flush=True)
        grpo.main([*common, *arm_flags, f"--out_dir={out_dir}"])
        rows[arm] = TrajectoryLog(out_dir).rows()

    sft = rows["new"][0]
    if {k: v for k, v in sft.items() if k != "checkpoint"} != {k: v for k, v in rows["old"][0].items() if k != "checkpoint"}:
        print("note: the two runs' step-0 rows differ (nondeterministic sampling on this device); SFT is the new run's")
    figures = [("judge_reward", "judge reward"), ("distinct_2", "distinct-2"),
               ("across_prompt_distance", "across-prompt distance"), ("within_prompt_distance", "within-prompt distance"),
               ("policy_reward", "policy RM reward"), ("kl", "KL to SFT (nats/completion)"),
               ("completion_len", "completion length"), ("truncated_frac", "truncated fraction")]
    ends = {arm: arm_rows[-1] for arm, arm_rows in rows.items()}
    print(f"\nafter {cfg.steps} steps, {cfg.traj_samples} samples on each dev prompt "
          f"(the runs' trajectory.jsonl under {out_root}):")
    print(f"{'':<30}{'SFT':>12}{'defaults':>12}{'old':>12}")
    for key, title in figures:
        values = [sft[key], ends["new"][key], ends["old"][key]]
        print(f"{title:<30}" + "".join(f"{v:>12.4f}" if v is not None else f"{'-':>12}" for v in values))
    verdicts = {arm: compare(sft, end) for arm, end in ends.items()}
    for arm, checks in verdicts.items():
        print(f"{'defaults' if arm == 'new' else 'old settings'}: " + ", ".join(
            f"{name} {'ok' if ok else 'FAIL'}" for name, ok in checks.items())
              + f" -> {'PASS' if all(checks.values()) else 'FAIL'}")
    print(json.dumps({"sft": sft, "end": ends, "checks": verdicts}))
    if cfg.tiny:
        print("smoke test: random tiny models, so the verdict above means nothing; the plumbing ran end to end")
        return
    sys.exit(0 if all(verdicts["new"].values()) else 1)


if __name__ == "__main__":
    main()
