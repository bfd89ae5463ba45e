"""
The report card of a run: one markdown file per stage, assembled into report.md at the end.

    python -m nanochat.report reset      # start of a run: clear report/, write the header
    python -m nanochat.report generate   # end of a run: assemble report/report.md, copy it out

Stages add their results while they run:

    get_report().log(stage="base", section="Base model evaluation", data=[{"CORE": 0.2219}, "markdown"])

which writes (or replaces, when a stage is re-run) the `## Base model evaluation` block inside
$NANOCHAT_BASE_DIR/report/base_report.md. A dict renders as "- key: value" bullets, a string is
copied verbatim. Only rank 0 writes; other ranks get a report object that does nothing. The copy
goes to $NANOCHAT_REPORT_PATH (default <repo>/report.md).
"""

import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import tiktoken
import torch

from nanochat.common import REPO_ROOT, atomic_write, get_base_dir, get_rank

# Stage files in the order a run produces them; any other <stage>_report.md follows alphabetically.
STAGE_ORDER = ["tok", "base", "mid", "sft", "rl", "kat_data", "rm", "rm_judge", "grpo_density", "grpo_baseline",
               "grpo_shuffled", "diversity"]
# The summary table: bullets whose key is exactly one of SUMMARY_METRICS, from these stages' files plus a
# column for any other stage file that reports one of them (e.g. grpo_density); absent values show as "-".
SUMMARY_STAGES = ["base", "mid", "sft", "rl"]
SUMMARY_METRICS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]

# Rough on-demand cloud prices per GPU-hour (Lambda's list prices, as nanochat used in Oct 2025).
# The report calls the result an estimate: real bills depend on provider, commitment and idle time.
GPU_HOURLY_RATES_USD = {"H100": 3.00, "A100": 1.79, "V100": 0.55}
DEFAULT_GPU_HOURLY_RATE_USD = 2.00

# What counts as code for the code-size table (tracked files only, via `git ls-files`).
SOURCE_EXTENSIONS = (".py", ".rs", ".sh", ".md", ".toml", ".html", ".yaml", ".yml")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
HEADER_FILE = "header.md"
COMBINED_FILE = "report.md"
STAGE_NAME = re.compile(r"^[a-z0-9_]+$")
BULLET = re.compile(r"^- (?P<key>[^:\n]+): (?P<value>.*)$", re.MULTILINE)


def now() -> str:
    return datetime.datetime.now().strftime(TIME_FORMAT)


def format_value(value) -> str:
    """Numbers as a reader wants them: 4 decimals, thousands separators, scientific for tiny floats."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}" if abs(value) >= 10_000 else str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) >= 10_000:
            return f"{value:,.1f}"
        if abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def render_section(section: str, data: list) -> str:
    """The markdown block of one section, wrapped in markers so a re-run can find and replace it."""
    lines = [f"<!-- section: {section} -->", f"## {section}", f"timestamp: {now()}", ""]
    for position, item in enumerate(data):
        if item is None:
            continue
        if isinstance(item, dict):
            lines += [f"- {key}: {format_value(value)}" for key, value in item.items()]
        elif isinstance(item, str):
            lines.append(item.rstrip("\n"))
        else:
            raise TypeError(f"report section {section!r}: data[{position}] is a {type(item).__name__}; "
                            f"pass dicts (rendered as bullets) or markdown strings")
        lines.append("")
    lines.append("<!-- /section -->")
    return "\n".join(lines) + "\n\n"


def section_pattern(section: str) -> re.Pattern:
    return re.compile(rf"<!-- section: {re.escape(section)} -->\n.*?<!-- /section -->\n\n?", re.DOTALL)


def parse_bullets(text: str) -> dict[str, str]:
    """Every "- key: value" line of a markdown text; a later bullet with the same key wins."""
    return {m["key"].strip(): m["value"].strip() for m in BULLET.finditer(text)}


def report_copy_path() -> Path:
    """Where generate copies report.md: $NANOCHAT_REPORT_PATH, default <repo>/report.md (so a tiny-preset
    run can write elsewhere and leave a full run's report alone; the combined report stays in report/)."""
    override = os.environ.get("NANOCHAT_REPORT_PATH")
    return Path(override).expanduser().resolve() if override else REPO_ROOT / "report.md"


# -----------------------------------------------------------------------------
# The header: what ran, where, on which code

def run_git(*args) -> tuple[bool, str]:
    """(ok, output) of a git command in the repo; the output is git's error text when it fails."""
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return False, "git is not installed"
    return done.returncode == 0, (done.stdout if done.returncode == 0 else done.stderr).strip()


def git_lines() -> list[str]:
    ok, commit = run_git("rev-parse", "--short", "HEAD")
    if not ok:
        return [f"- Git commit: unknown ({commit.splitlines()[0] if commit else 'no commit'})"]
    _, status = run_git("status", "--porcelain", "--untracked-files=no")
    _, branch = run_git("rev-parse", "--abbrev-ref", "HEAD")
    _, message = run_git("log", "-1", "--pretty=%s")
    return [f"- Git commit: {commit}{' (dirty)' if status else ' (clean)'}",
            f"- Git branch: {branch}", f"- Commit message: {message[:80]}"]


def gpu_hourly_rate(gpu_name: str) -> float:
    for gpu_type, rate in GPU_HOURLY_RATES_USD.items():
        if gpu_type in gpu_name:
            return rate
    return DEFAULT_GPU_HOURLY_RATE_USD


def hardware_lines() -> list[str]:
    import psutil

    lines = []
    if torch.cuda.is_available():
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        names = sorted({p.name for p in props})
        lines += [f"- GPUs: {len(props)} x {', '.join(names)}", f"- GPU count: {len(props)}",
                  f"- GPU memory: {sum(p.total_memory for p in props) / 1024**3:.1f} GB total",
                  f"- CUDA: {torch.version.cuda}",
                  f"- GPU hourly rate (estimate): ${gpu_hourly_rate(names[0]):.2f} per GPU-hour"]
    else:
        lines += ["- GPUs: none (CPU only)", "- GPU count: 0"]
    lines += [f"- CPUs: {psutil.cpu_count(logical=False)} physical, {psutil.cpu_count(logical=True)} logical",
              f"- Memory: {psutil.virtual_memory().total / 1024**3:.1f} GB",
              f"- Platform: {platform.platform()}"]
    return lines


def software_lines() -> list[str]:
    return [f"- Python: {platform.python_version()}", f"- torch: {torch.__version__}",
            f"- numpy: {np.__version__}", f"- tiktoken: {tiktoken.__version__}"]


def code_size_lines() -> list[str]:
    ok, listing = run_git("ls-files")
    if not ok:
        return [f"- Code size: unknown ({listing or 'git ls-files failed'})"]
    per_ext: dict[str, list[int]] = {}
    for name in listing.splitlines():
        path = REPO_ROOT / name
        if path.suffix not in SOURCE_EXTENSIONS or not path.is_file():
            continue  # deleted but still tracked files are not code we ship
        text = path.read_text(encoding="utf-8", errors="replace")
        counts = per_ext.setdefault(path.suffix, [0, 0, 0])
        counts[0] += 1
        counts[1] += text.count("\n") + (0 if text.endswith("\n") or not text else 1)
        counts[2] += len(text)
    rows = ["| extension | files | lines | characters |", "|---|---|---|---|"]
    for ext, (files, lines, chars) in sorted(per_ext.items(), key=lambda kv: -kv[1][2]):
        rows.append(f"| {ext} | {files:,} | {lines:,} | {chars:,} |")
    total = [sum(c[i] for c in per_ext.values()) for i in range(3)]
    rows.append(f"| total | {total[0]:,} | {total[1]:,} | {total[2]:,} |")
    lock = REPO_ROOT / "uv.lock"
    lock_lines = len(lock.read_text(encoding="utf-8").splitlines()) if lock.exists() else 0
    return rows + ["", f"- Dependencies (uv.lock lines): {lock_lines:,}"]


def generate_header(started: str) -> str:
    parts = ["# nanochat-kat training report", "", "## Run", f"- Run started: {started}", *git_lines(), "",
             "## Hardware", *hardware_lines(), "", "## Software", *software_lines(), "",
             "## Code size", "Tracked source files (`git ls-files`), by extension:", "", *code_size_lines(), ""]
    return "\n".join(parts) + "\n"


# -----------------------------------------------------------------------------
# The report

class Report:
    """The report/ directory of a run: a header, one file per stage, the combined report.md."""

    def __init__(self, report_dir):
        self.report_dir = Path(report_dir)
        self.report_dir.mkdir(parents=True, exist_ok=True)

    def stage_file(self, stage: str) -> Path:
        if not STAGE_NAME.match(stage):
            raise ValueError(f"report stage {stage!r} must be lowercase letters, digits and underscores "
                             f"(it names the file report/<stage>_report.md)")
        return self.report_dir / f"{stage}_report.md"

    def log(self, stage: str, section: str, data: list) -> Path:
        """Write the section into report/<stage>_report.md, replacing an earlier block of that name."""
        if not section or "\n" in section or "-->" in section:
            raise ValueError(f"report section name {section!r} must be one line without '-->'")
        if not isinstance(data, list):
            raise TypeError(f"report section {section!r}: data must be a list of dicts and strings, "
                            f"got {type(data).__name__}")
        path = self.stage_file(stage)
        block = render_section(section, data)
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        pattern = section_pattern(section)
        text = pattern.sub(lambda _: block, text, count=1) if pattern.search(text) else text + block
        atomic_write(path, text)
        return path

    def reset(self) -> Path:
        """Forget the previous run's sections and write a fresh header with the start time."""
        for path in [*self.report_dir.glob("*_report.md"), self.report_dir / COMBINED_FILE]:
            path.unlink(missing_ok=True)
        header = self.report_dir / HEADER_FILE
        atomic_write(header, generate_header(now()))
        print(f"Reset the report in {self.report_dir} and wrote the header to {header}")
        return header

    def stage_files(self) -> list[Path]:
        files = {p.name.removesuffix("_report.md"): p for p in self.report_dir.glob("*_report.md")}

        def place(stage):  # a further seed's run (grpo_density_s1) follows its arm; unknown stages go last
            arm = stage.rsplit("_s", 1)[0] if re.fullmatch(r".+_s\d+", stage) else stage
            return (STAGE_ORDER.index(arm) if arm in STAGE_ORDER else len(STAGE_ORDER), stage)
        return [files[stage] for stage in sorted(files, key=place)]

    def generate(self) -> Path:
        """Assemble header + stage files + summary into report/report.md and copy it out."""
        generated = now()
        header_path = self.report_dir / HEADER_FILE
        if header_path.exists():
            header = header_path.read_text(encoding="utf-8")
        else:
            header = ("# nanochat-kat training report\n\nNo header: run `python -m nanochat.report reset` "
                      "at the start of a run to record the machine, the code and the start time.\n")
        stage_texts = {p.name.removesuffix("_report.md"): p.read_text(encoding="utf-8") for p in self.stage_files()}
        parts = [header.rstrip("\n") + "\n\n---\n"]
        parts += [text.rstrip("\n") + "\n" for text in stage_texts.values()]
        parts.append(summary(parse_bullets(header), stage_texts, generated))
        combined = "\n".join(parts)
        out = self.report_dir / COMBINED_FILE
        atomic_write(out, combined)
        copy = report_copy_path()
        copy.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(copy, combined)
        print(f"Wrote {out} and copied it to {copy}")
        return out


def summary(header: dict[str, str], stage_texts: dict[str, str], generated: str) -> str:
    """The closing table of headline metrics, the wall-clock time and the cost estimate."""
    # a stage that reports a metric in several sections: the last one in its file wins
    metrics = {stage: parse_bullets(text) for stage, text in stage_texts.items()}
    extra = [s for s in stage_texts if s not in SUMMARY_STAGES and any(m in metrics[s] for m in SUMMARY_METRICS)]
    columns = SUMMARY_STAGES + extra
    lines = ["## Summary", "", "| Metric | " + " | ".join(c.upper() for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for metric in SUMMARY_METRICS:
        cells = [metrics.get(stage, {}).get(metric, "-") for stage in columns]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines.append("")

    started = header.get("Run started")
    if started is None:
        lines.append("- Total wall-clock time: unknown (no header; run `python -m nanochat.report reset` first)")
        return "\n".join(lines) + "\n"
    elapsed = datetime.datetime.strptime(generated, TIME_FORMAT) - datetime.datetime.strptime(started, TIME_FORMAT)
    hours = elapsed.total_seconds() / 3600
    minutes = int(elapsed.total_seconds()) // 60
    lines.append(f"- Total wall-clock time: {minutes // 60}h{minutes % 60:02d}m "
                 f"(from `report reset` at {started} to `report generate` at {generated})")
    gpu_count = int(header.get("GPU count", "0"))
    rate_text = header.get("GPU hourly rate (estimate)", "")
    rate = re.match(r"\$([0-9.]+)", rate_text)
    if gpu_count and rate:
        cost = gpu_count * hours * float(rate.group(1))
        lines.append(f"- Estimated cost: ${cost:,.2f} ({gpu_count} GPUs x {hours:.2f} h x ${rate.group(1)} per "
                     f"GPU-hour; an estimate from list prices, not a bill)")
    else:
        lines.append("- Estimated cost: n/a (no GPU recorded in the header)")
    return "\n".join(lines) + "\n"


class NoReport:
    """What ranks other than 0 get: the same calls, nothing written."""

    def log(self, stage: str, section: str, data: list):
        return None

    def reset(self):
        return None

    def generate(self):
        return None


def get_report():
    """The run's report on rank 0, a do-nothing stand-in on other ranks."""
    if get_rank() != 0:
        return NoReport()
    return Report(get_base_dir() / "report")


if __name__ == "__main__":
    commands = {"reset": lambda: get_report().reset(), "generate": lambda: get_report().generate()}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python -m nanochat.report reset|generate (got {' '.join(sys.argv[1:]) or 'nothing'})")
    commands[sys.argv[1]]()
