"""
The tic control's verdict (bash kat_speedrun.sh --control=tic): GRPO runs from a starting policy that
writes em dashes now and then, the reward gaining a bonus for an em dash on a fraction (the dose) of
the train prompts. Is the em-dash rate amplified at the largest dose, not at dose 0, and more with the
dose? Each run is read from its trajectory (dev prompts) at one KL every run reached, not its last step.

    python -m scripts.tic_control                       # every outs/tic_dose_*/grpo_* run
    python -m scripts.tic_control --kl_budget=1.5 --runs=outs/tic_dose_0/grpo_baseline,outs/tic_dose_0/grpo_baseline_s1,...

Writes <kat cache>/control_report.md (the Controls section), control_outcome.json beside it (which
the main run's diversity report lists) and the report card's section. Figures: nanochat/kat/controls.py.
"""

import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import atomic_write, get_kat_cache_dir, get_outs_dir, git_commit
from nanochat.flags import flags_dict, opt, parse_flags
from nanochat.kat.controls import TIC_MARKER, synthetic_controls, tic_dose_response, write_outcome
from nanochat.kat.controls_report import TITLE, controls_headline, controls_section
from nanochat.kat.runs import bracket, kl_target, load_run
from nanochat.report import get_report

DOSE_FOLDERS = "tic_dose_*"  # runs/control.sh puts dose d's runs in outs/tic_dose_<d>/grpo_baseline[_s<i>]


@dataclass
class Config:
    """The tic control's dose-response from the GRPO runs' trajectories."""
    runs: str = opt("", help=f"comma-separated GRPO run folders; empty: every grpo_* folder in outs/{DOSE_FOLDERS}")
    kl_budget: float = opt(-1.0, help="the KL (nats, dev prompts) every run is read at; -1: the largest KL every run "
                                      "reached", min=0, sentinel=-1)
    confidence: float = opt(0.95, above=0, below=1)
    output_report: str = opt("", help="default <kat cache>/control_report.md")
    tiny: bool = opt(False, help="the tiny preset: the report says plainly that its outcome is not evidence")


def find_runs(sources: list[str]) -> dict:
    """{dose: [runs]} from the runs' recorded planted reward (an em dash on a fraction `dose` of every quintile)."""
    folders = sources or [str(p) for p in sorted(get_outs_dir().glob(f"{DOSE_FOLDERS}/grpo_*")) if p.is_dir()]
    if not folders:
        raise SystemExit(f"no tic control run in {get_outs_dir() / DOSE_FOLDERS}: run bash kat_speedrun.sh --control=tic")
    by_dose = {}
    for folder in folders:
        run = load_run(folder)
        plant = run.config.get("plant")
        if not plant or plant["marker"] != TIC_MARKER or plant["quintile"] != 0:
            raise SystemExit(f"{run.folder}/config.json: not a tic control run (planted reward {plant}; needs "
                             f"--plant_marker={TIC_MARKER} --plant_quintile=0)")
        if run.trajectory is None:
            raise SystemExit(f"{run.folder}: {run.trajectory_missing}; the tic control reads the trajectory")
        run.name = f"{run.folder.parent.name}/{run.name}"  # runs of different doses share folder names
        by_dose.setdefault(float(plant["fraction"]), []).append(run)
    return by_dose


def main(argv=None):
    cfg = parse_flags(Config, argv)
    by_dose = find_runs([s.strip() for s in cfg.runs.split(",") if s.strip()])
    runs = [run for dose_runs in by_dose.values() for run in dose_runs]
    try:
        target, how = kl_target(runs, cfg.kl_budget)
        result = tic_dose_response(by_dose, target, how, bracket, confidence=cfg.confidence)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"tic control: {err}") from None
    controls = {"this": "tic", "tiny": cfg.tiny, **synthetic_controls(), "tic": result, "outcomes": {},
                "controls_dir": ""}
    report = Path(cfg.output_report) if cfg.output_report else get_kat_cache_dir() / "control_report.md"
    lines = ["# Tic control: is a known reward amplified, in proportion to its dose?", "",
             f"Runs: {', '.join(run.name for run in runs)}; written {time.strftime('%Y-%m-%d %H:%M:%S')}, commit "
             f"{git_commit()}.", "", f"## {TITLE}", "", *controls_section(controls)]
    report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(report, "\n".join(lines) + "\n")
    outcome = write_outcome(report.parent, "tic", result, report, cfg.tiny, git_commit())
    headline = controls_headline(controls)
    get_report().log(stage="tic_control", section="Tic control", data=[flags_dict(cfg), {"controls": headline,
                                                                                        "report": str(report)}])
    print(f"tic control: {result['status']}\ncontrols: {headline}\nwrote {report}, {outcome}")
    return result


if __name__ == "__main__":
    main()
