"""
kat_speedrun.sh --control=sampler|tic|null (runs/control.sh): the option refuses what is not a control,
naming the three; each control's stages, in order, with the flags that make it that control (its GRPO
runs, seeds, planted reward and verdict), read from the real stage functions with the stage runners
replaced by a printer; and, slow, each control of the tiny preset end to end on the session's tiny
run: its own root, the main run untouched, a report that opens with the controls and says plainly
that its outcome is not evidence, and an outcome the main run's report lists.
"""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from nanochat.common import REPO_ROOT
from nanochat.kat.controls import read_outcomes
from tests.tiny_fixtures import tiny_env

KINDS_NAMED = ["--control=sampler", "--control=tic", "--control=null"]


def run_script(*args, script="kat_speedrun.sh") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", script, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("option", ["--control=bogus", "--control=", "--control"])
def test_the_option_refuses_anything_but_a_control_naming_the_three(option):
    result = run_script("--tiny", option)
    assert result.returncode == 2 and result.stdout == ""  # refused before any stage or install
    assert all(kind in result.stderr for kind in KINDS_NAMED), result.stderr
    if option == "--control":
        assert "--control needs a kind" in result.stderr
    else:
        assert f"unknown control '{option.split('=', 1)[1]}'" in result.stderr


def test_speedrun_sh_leaves_the_controls_to_kat_speedrun_sh():
    result = run_script("--control=tic", script="speedrun.sh")
    assert result.returncode == 2 and "--control=tic belongs to kat_speedrun.sh" in result.stderr


# the stage functions with the runners replaced: each stage printed as "STAGE <name> <command...>"
STAGE_PRINTER = r"""
set -euo pipefail
source ./kat_speedrun.sh
TINY="$1" CONTROL="$2" WANDB_RUN=dummy
if [ "$TINY" = 1 ]; then source runs/tiny.sh; fi
if [ -n "$CONTROL" ]; then source runs/control.sh; fi
export NANOCHAT_OUTS_DIR="$3/outs" NANOCHAT_KAT_CACHE="$3/.cache"
LOG_DIR="$3/logs"
check_kat_options >/dev/null
show() { printf 'STAGE'; printf '\t%s' "$@"; echo; }  # a stage's name and command words, tab-separated
run_stage() { local name="$1"; shift 2; show "$name" "$@"; }
run_training_stage() { local name="$1"; shift 2; show "$name" "$@"; }
wait_background() { :; }
start_report() { :; }
run_queued_stages() {  # read back as runs/lib.sh reads them
    local i
    local -a command
    for i in "${!QUEUED_NAMES[@]}"; do
        eval "command=(${QUEUED_COMMANDS[$i]})"
        show "${QUEUED_NAMES[$i]}" "${command[@]}"
    done
    QUEUED_NAMES=() QUEUED_COMMANDS=()
}
if [ -n "$CONTROL" ]; then
    control_environment() { MAIN_SFT_DIR=/main/outs/sft; mkdir -p "$LOG_DIR"; }
    control_stages
else
    kat_stages
fi
echo "PARALLEL ${KAT_PARALLEL_RUNS:-}"
"""


def stages(tmp_path, control: str, tiny: bool = False, seeds: str | None = None) -> tuple[list, dict, str]:
    """([(stage, [command words])...], {stage: {flag: value}}, KAT_PARALLEL_RUNS) of a control ('' = the main run)."""
    env = {k: v for k, v in tiny_env(tmp_path / "tiny").items() if k not in ("KAT_SEEDS", "KAT_PARALLEL_RUNS")}
    if seeds is not None:
        env["KAT_SEEDS"] = seeds
    result = subprocess.run(["bash", "-c", STAGE_PRINTER, "printer", "1" if tiny else "0", control, str(tmp_path)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    listed = [(words[1], words[2:]) for words in (line.split("\t") for line in lines if line.startswith("STAGE\t"))]
    return listed, {name: read_flags(words) for name, words in listed}, lines[-1].removeprefix("PARALLEL ")


def read_flags(words: list[str]) -> dict:
    """{flag: value} of --flag=value and --flag value words; a flag given twice would hide one of them."""
    flags = {}
    for i, word in enumerate(words):
        if not word.startswith("--"):
            continue
        name, _, value = word[2:].partition("=")
        if "=" not in word and i + 1 < len(words) and not words[i + 1].startswith("--"):
            value = words[i + 1]
        assert name not in flags, f"--{name} given twice in {words}"
        flags[name] = value
    return flags


def grpo_runs(prefix: str, arms: list[str], seeds: int) -> list[str]:
    return [f"{prefix}grpo_{arm}" + (f"_s{i}" if i else "") for i in range(seeds) for arm in arms]


DATA_STAGES = ["kat_pairs", "kat_embed", "kat_density", "train_rm"]


def test_the_sampler_control_plants_a_marker_in_the_rarest_quintile_and_runs_both_arms(tmp_path):
    listed, flags, parallel = stages(tmp_path, "sampler")
    runs = grpo_runs("", ["density", "baseline"], 3)
    assert [name for name, _ in listed] == DATA_STAGES + runs + ["eval_diversity"]
    for run in runs:
        f = flags[run]
        assert (f["plant_marker"], f["plant_quintile"], f["plant_fraction"]) == ("auto", "1", "1")
        assert (f["adv_norm"], f["kl"], f["beta"], f["judge"]) == ("none", "seq_reward", "0.1", "")
        assert f["seed"] == str(42 + (int(run[-1]) if "_s" in run else 0)) and f["out_dir"].endswith(f"/outs/{run}")
        assert f["prompt_sampling"] == ("density" if "density" in run else "uniform")
    assert flags["eval_diversity"]["control"] == "sampler" and "tiny" not in flags["eval_diversity"]
    assert flags["kat_density"]["beta"] == "1.0" and flags["kat_pairs"]["local_dir"] == "nanochat/samples/kat"
    assert parallel == "6"  # every run at once on the one GPU


def test_the_null_control_gives_the_density_arm_uniform_weights_and_other_seeds(tmp_path):
    listed, flags, _ = stages(tmp_path, "null")
    runs = grpo_runs("", ["density", "baseline"], 3)
    assert [name for name, _ in listed] == DATA_STAGES + ["train_rm_judge"] + runs + ["eval_diversity"]
    assert flags["kat_density"]["beta"] == "0"
    seeds = {arm: sorted(int(flags[r]["seed"]) for r in runs if arm in r) for arm in ("density", "baseline")}
    assert seeds == {"density": [45, 46, 47], "baseline": [42, 43, 44]}
    assert all("plant_marker" not in flags[r] and "judge" not in flags[r] for r in runs)  # the judge's trajectory too
    assert flags["eval_diversity"]["control"] == "null"


def test_the_tic_control_runs_three_doses_with_seeds_on_its_own_starting_policy(tmp_path):
    listed, flags, parallel = stages(tmp_path, "tic")
    runs = [run for dose in ("0", "0.25", "0.5") for run in grpo_runs(f"tic_dose_{dose}/", ["baseline"], 3)]
    assert [name for name, _ in listed] == ["control_sft"] + DATA_STAGES + runs + ["tic_control"]
    assert flags["control_sft"]["source"] == "/main/outs/sft" and flags["control_sft"]["tic_style"] == "emdash"
    for run in runs:
        f = flags[run]
        assert f["plant_fraction"] == run.split("/")[0].removeprefix("tic_dose_") and f["prompt_sampling"] == "uniform"
        assert (f["plant_marker"], f["plant_quintile"]) == ("\u2014", "0")
        assert f["seed"] == str(42 + (int(run[-1]) if "_s" in run else 0))
    assert (tmp_path / "logs" / "tic_dose_0.25").is_dir()  # the runs' logs go beside their stage names
    assert parallel == "9"


def test_the_tiny_controls_run_one_seed_and_say_they_are_not_evidence(tmp_path):
    for control in ("sampler", "null"):
        listed, flags, parallel = stages(tmp_path / control, control, tiny=True)
        assert [name for name, _ in listed][-3:] == ["grpo_density", "grpo_baseline", "eval_diversity"]
        assert flags["eval_diversity"]["tiny"] == "true" and flags["eval_diversity"]["control"] == control
        assert parallel == ""  # the CPU's cores: one run after another
    listed, flags, _ = stages(tmp_path / "tic", "tic", tiny=True, seeds="2")
    assert len([name for name, _ in listed if "grpo_" in name]) == 6 and flags["tic_control"]["tiny"] == "true"


def test_the_main_run_keeps_its_stages_and_seeds(tmp_path):
    listed, flags, _ = stages(tmp_path, "")
    runs = grpo_runs("", ["density", "baseline"], 3)
    assert [name for name, _ in listed] == ["kat_pairs", "kat_embed", "kat_density", "embedding_map", "train_rm",
                                            "train_rm_judge", *runs, "eval_diversity"]
    assert all(flags[r]["seed"] == str(42 + (int(r[-1]) if "_s" in r else 0)) and "plant_marker" not in flags[r]
               for r in runs)
    assert "control" not in flags["eval_diversity"]


# -----------------------------------------------------------------------------
# The tiny sampler control, end to end

def _digests(paths) -> dict:
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}


def run_tiny_control(root, kind: str, seeds: int = 1) -> tuple[str, Path, dict]:
    """`bash kat_speedrun.sh --tiny --control=<kind>` on the session's tiny run: (stdout, its root, its outcome),
    checked to reuse the main run's stages and leave its SFT model and diversity report as they were."""
    main_sft = root / "outs" / "sft"
    untouched = sorted(p for p in main_sft.rglob("*") if p.is_file()) + [root / ".cache" / "diversity_report.md"]
    before = _digests(untouched)
    result = subprocess.run(["bash", "kat_speedrun.sh", "--tiny", f"--control={kind}"], cwd=REPO_ROOT,
                            env={**tiny_env(root), "KAT_SEEDS": str(seeds)}, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"--tiny --control={kind} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    for stage in ["tok_train", "base_train", "chat_sft"]:
        assert f"[skip] {stage}:" in result.stdout, f"the control reran the main run's {stage}"
    assert _digests(untouched) == before, "the control changed the main run's SFT model or diversity report"
    control = root / "control_run" / kind
    assert (control / "base" / "tok").resolve() == (root / "base" / "tok").resolve()
    outcome = json.loads((control / ".cache" / "control_outcome.json").read_text())
    assert outcome["kind"] == kind and outcome["tiny"] is True
    assert f"{kind} control: {outcome['status']} (tiny preset: not evidence)" in result.stdout
    assert read_outcomes(root / "control_run")[kind]["status"] == outcome["status"]  # what the main report lists
    return result.stdout, control, outcome


def controls_section(report_path: Path) -> str:
    report = report_path.read_text()
    assert report.split("\n## ")[1].startswith("Controls\n"), "the Controls section does not open the report"
    section = report.split("\n## ")[1]
    assert "none of it is evidence about density sampling" in section and "| synthetic null control" in section
    return section


@pytest.mark.slow
def test_the_tiny_sampler_control_runs_in_its_own_root_on_the_main_sft_model(tiny_run):
    root, _ = tiny_run
    _, control, outcome = run_tiny_control(root, "sampler")
    assert (control / "outs" / "sft").resolve() == (root / "outs" / "sft").resolve()
    config = json.loads((control / "outs" / "grpo_density" / "config.json").read_text())
    assert config["plant"]["quintile"] == 1 and 0.02 <= config["plant"]["base_rate"] <= 0.8
    assert outcome["passed"] is None and "one seed per arm" in outcome["status"]
    section = controls_section(control / ".cache" / "diversity_report.md")
    assert "| sampler control (this run)" in section and "Share of each run's draws from the rarest quintile" in section


@pytest.mark.slow
def test_the_tiny_null_control_samples_both_arms_uniformly_with_other_seeds(tiny_run):
    root, _ = tiny_run
    _, control, outcome = run_tiny_control(root, "null")
    assert outcome["passed"] is None and "one seed per arm" in outcome["status"]
    seeds = {run: json.loads((control / "outs" / run / "config.json").read_text())["train_args"]["seed"]
             for run in ("grpo_density", "grpo_baseline")}
    assert seeds == {"grpo_density": 43, "grpo_baseline": 42}
    section = controls_section(control / ".cache" / "diversity_report.md")
    assert "| null control (this run)" in section and "Kish ESS 100.0% of n" in section


@pytest.mark.slow
def test_the_tiny_tic_control_trains_its_own_starting_policy_and_reads_every_dose(tiny_run):
    root, _ = tiny_run
    _, control, outcome = run_tiny_control(root, "tic", seeds=2)
    control_sft = control / "outs" / "sft"
    assert control_sft.is_dir() and not control_sft.is_symlink()
    config = json.loads((control_sft / "config.json").read_text())
    assert config["train_args"]["tic_style"] == "emdash" and 0 < config["tic_conversations"] < config["conversations"]
    assert Path(config["init_from"]).resolve() == (root / "outs" / "sft" / "ckpt.pt").resolve()
    for dose in ("0", "0.25", "0.5"):
        for run in ("grpo_baseline", "grpo_baseline_s1"):
            plant = json.loads((control / "outs" / f"tic_dose_{dose}" / run / "config.json").read_text())["plant"]
            assert (plant["marker"], plant["quintile"], plant["fraction"]) == ("\u2014", 0, float(dose))
    assert outcome["passed"] in (True, False)  # two seeds per dose: a verdict, whichever it is at this size
    section = controls_section(control / ".cache" / "control_report.md")
    assert "| tic control (this run)" in section and "Slope of the change on the dose" in section
