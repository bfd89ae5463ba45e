import datetime

import pytest

from nanochat import report as report_module
from nanochat.common import REPO_ROOT
from nanochat.report import Report, format_value, get_report, report_copy_path


@pytest.fixture
def run_dirs(tmp_path, monkeypatch):
    """A base dir and a root-copy path of our own, so tests never touch a real run's report."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NANOCHAT_REPORT_PATH", str(tmp_path / "root" / "report.md"))
    monkeypatch.delenv("RANK", raising=False)
    return tmp_path


def table_row(text: str, metric: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {metric} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_log_replaces_a_section_instead_of_duplicating_it(tmp_path):
    report = Report(tmp_path)
    report.log("base", "Base model training", [{"Final loss": 3.5}])
    report.log("base", "Base model loss", [{"Validation bpb": 1.1}])
    path = report.log("base", "Base model training", [{"Final loss": 2.25}])
    text = path.read_text()
    assert text.count("## Base model training") == 1
    assert "- Final loss: 2.2500" in text and "3.5000" not in text
    # the re-run section keeps its place before the section logged after it
    assert text.index("## Base model training") < text.index("## Base model loss")
    assert "- Validation bpb: 1.1000" in text


def test_dicts_render_as_bullets_and_strings_verbatim(tmp_path):
    text = Report(tmp_path).log("tok", "Tokenizer training", [
        {"vocab_size": 65536, "depth": 20, "lr": 2e-4, "loss": 0.123456, "tok/s": 154321.7, "compile": False},
        "| text | ratio |\n|---|---|\n| news | 4.85 |",
    ]).read_text()
    for bullet in ["- vocab_size: 65,536", "- depth: 20", "- lr: 2.000e-04", "- loss: 0.1235",
                   "- tok/s: 154,321.7", "- compile: False"]:
        assert bullet + "\n" in text
    assert "| text | ratio |\n|---|---|\n| news | 4.85 |\n" in text
    assert "timestamp: " in text


def test_format_value_zero_and_non_finite():
    assert (format_value(0.0), format_value(float("nan")), format_value(-12), format_value(True)) == ("0", "nan", "-12", "True")


def test_generate_orders_stages_and_builds_the_summary_table(run_dirs):
    report = get_report()
    # logged out of order on purpose; generate must put them in pipeline order, unknown stages last
    report.log("zeta_extra", "Something else", [{"note": 1}])
    report.log("sft", "Chat evaluation sft", [{"ARC-Easy": 0.4012, "MMLU": 0.3101, "ChatCORE": 0.0876}])
    report.log("grpo_density", "Chat evaluation grpo_density", [{"GSM8K": 0.05}])
    report.log("base", "Base model training", [{"CORE": 0.1}])  # an early CORE, overridden below
    report.log("base", "Base model evaluation", [{"CORE": 0.2219}])
    report.log("tok", "Tokenizer training", [{"vocab_size": 65536}])
    report.log("mid", "Chat evaluation mid", [{"ARC-Easy": 0.3561, "ARC-Challenge": 0.2875}])
    report.log("alpha_extra", "First other stage", ["plain text"])
    text = report.generate().read_text()

    headings = ["## Tokenizer training", "## Base model training", "## Chat evaluation mid",
                "## Chat evaluation sft", "## Chat evaluation grpo_density", "## First other stage",
                "## Something else", "## Summary"]
    positions = [text.index(h) for h in headings]
    assert positions == sorted(positions)

    header = next(line for line in text.splitlines() if line.startswith("| Metric |"))
    assert header == "| Metric | BASE | MID | SFT | RL | GRPO_DENSITY |"
    assert table_row(text, "CORE") == ["0.2219", "-", "-", "-", "-"]  # last CORE of the base file wins
    assert table_row(text, "ARC-Easy") == ["-", "0.3561", "0.4012", "-", "-"]
    assert table_row(text, "ARC-Challenge") == ["-", "0.2875", "-", "-", "-"]
    assert table_row(text, "MMLU") == ["-", "-", "0.3101", "-", "-"]
    assert table_row(text, "GSM8K") == ["-", "-", "-", "-", "0.0500"]
    assert table_row(text, "HumanEval") == ["-", "-", "-", "-", "-"]
    # "CORE" must not be read out of the sft file's "ChatCORE" bullet
    assert table_row(text, "ChatCORE") == ["-", "-", "0.0876", "-", "-"]


def test_missing_stages_show_dashes_and_the_copy_matches(run_dirs):
    report = get_report()
    report.log("base", "Base model evaluation", [{"CORE": 0.05}])
    out = report.generate()
    text = out.read_text()
    for metric in ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]:
        assert table_row(text, metric) == ["-", "-", "-", "-"]
    assert "Total wall-clock time: unknown" in text  # no reset, so no start time
    assert (run_dirs / "root" / "report.md").read_text() == text
    assert out == run_dirs / "base" / "report" / "report.md"


def test_reset_then_generate_has_the_header_fields(run_dirs):
    report = get_report()
    report.log("sft", "Stale section from an earlier run", [{"ChatCORE": 0.9}])
    report.reset()
    report.log("base", "Base model evaluation", [{"CORE": 0.2}])
    text = report.generate().read_text()
    assert "Stale section" not in text and table_row(text, "ChatCORE") == ["-", "-", "-", "-"]
    for field in ["- Run started: ", "- Git commit: ", "- GPUs: ", "- GPU count: ", "- CPUs: ", "- Memory: ",
                  "- Python: ", "- torch: ", "- numpy: ", "- tiktoken: ", "## Code size", "| extension | files |",
                  "- Dependencies (uv.lock lines): ", "- Total wall-clock time: 0h00m (from `report reset` at ",
                  "- Estimated cost: "]:
        assert field in text, field


def test_wall_clock_and_cost_come_from_the_header(run_dirs):
    report = get_report()
    started = (datetime.datetime.now() - datetime.timedelta(hours=2, minutes=5)).strftime("%Y-%m-%d %H:%M:%S")
    (report.report_dir / "header.md").write_text(
        f"# header\n\n- Run started: {started}\n- GPU count: 8\n- GPU hourly rate (estimate): $3.00 per GPU-hour\n")
    text = report.generate().read_text()
    assert f"- Total wall-clock time: 2h05m (from `report reset` at {started}" in text
    # 8 GPUs x 2.083 h x $3 = $50.00
    assert "- Estimated cost: $50.00 (8 GPUs x 2.08 h x $3.00 per GPU-hour" in text


def test_non_zero_rank_writes_nothing(run_dirs, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    report = get_report()
    assert report.log("base", "Base model training", [{"CORE": 0.3}]) is None
    assert report.generate() is None and report.reset() is None
    assert not (run_dirs / "base" / "report").exists()
    assert not (run_dirs / "root" / "report.md").exists()


def test_copy_path_defaults_to_the_repo_root(monkeypatch):
    monkeypatch.delenv("NANOCHAT_REPORT_PATH", raising=False)
    assert report_copy_path() == REPO_ROOT / "report.md"


def test_bad_stage_section_and_data_are_refused(tmp_path):
    report = Report(tmp_path)
    with pytest.raises(ValueError, match="stage"):
        report.log("../base", "x", [])
    with pytest.raises(ValueError, match="one line"):
        report.log("base", "two\nlines", [])
    with pytest.raises(TypeError, match=r"data\[0\]"):
        report.log("base", "Base", [3.0])


def test_gpu_rates_match_by_name():
    assert report_module.gpu_hourly_rate("NVIDIA H100 80GB HBM3") == 3.00
    assert report_module.gpu_hourly_rate("Some Future GPU") == report_module.DEFAULT_GPU_HOURLY_RATE_USD


def test_stage_sections_follow_the_pipeline_with_each_seed_after_its_arm(run_dirs):
    """A further seed's GRPO run reports under its own stage (grpo_density_s1), placed after its arm."""
    for stage in ("diversity", "grpo_baseline_s1", "grpo_density_s2", "grpo_baseline", "grpo_density", "sft", "extra"):
        report_module.get_report().log(stage=stage, section=f"Section {stage}", data=[{"x": 1}])
    names = [p.name.removesuffix("_report.md") for p in report_module.get_report().stage_files()]
    assert names == ["sft", "grpo_density", "grpo_density_s2", "grpo_baseline", "grpo_baseline_s1", "diversity", "extra"]
