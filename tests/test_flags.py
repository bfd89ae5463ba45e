import dataclasses
import importlib
import subprocess
import sys
import typing
from dataclasses import dataclass

import pytest

from nanochat.common import REPO_ROOT
from nanochat.flags import FlagError, flags_help, opt, parse_bool, parse_flags, short


@dataclass
class Config:
    depth: int = 20
    learning_rate: float = 0.02
    density_aware: bool = True
    out_dir: str = "outs/grpo"
    source: str = short("i", "sft", help="stage to load")
    mode: str = opt("density", choices=["density", "uniform"])


def test_equals_and_space_forms_and_aliases():
    cfg = parse_flags(Config, ["--depth=4", "--out_dir", "outs/x", "-i", "rl", "--learning_rate=1e-5"])
    assert (cfg.depth, cfg.out_dir, cfg.source, cfg.learning_rate) == (4, "outs/x", "rl", 1e-5)


@pytest.mark.parametrize("text,expected", [("False", False), ("false", False), ("0", False),
                                           ("True", True), ("1", True), ("yes", True)])
def test_booleans_are_parsed_not_truthy(text, expected):
    # argparse's type=bool would turn the string "False" into True
    assert parse_flags(Config, [f"--density_aware={text}"]).density_aware is expected
    assert parse_flags(Config, ["--density_aware", text]).density_aware is expected


def test_bare_boolean_flag_means_true():
    assert parse_flags(Config, ["--density_aware", "--depth=3"]).density_aware is True


def test_torchrun_separator_is_ignored():
    assert parse_flags(Config, ["--", "--depth=2"]).depth == 2


@pytest.mark.parametrize("argv,message", [
    (["--nope=1"], "unknown flag --nope"),
    (["--depth=x"], "expected an integer"),
    (["--density_aware=maybe"], "expected a boolean"),
    (["--mode=sometimes"], "not one of"),
    (["-z", "1"], "unknown short flag"),
    (["stray"], "unexpected argument"),
    (["--depth"], "needs a value"),
])
def test_bad_flags_raise_clear_errors(argv, message):
    with pytest.raises(FlagError, match=message):
        parse_flags(Config, argv)


def test_parse_bool_rejects_garbage():
    with pytest.raises(FlagError):
        parse_bool("2")


# -----------------------------------------------------------------------------
# Bounds: a value out of range is refused as the flags are parsed

@dataclass
class Bounded:
    keep: int = opt(2, help="kept", min=1)
    steps: int = opt(-1, help="optimizer steps; -1 derives them", min=1, sentinel=-1)
    top_p: float = opt(1.0, above=0, max=1)
    fraction: float = opt(0.01, min=0, below=1)
    clip: float = opt(10.0, min=1, sentinel=0)
    k: int = short("k", 50, min=0)


def test_values_inside_the_bounds_and_sentinels_are_accepted():
    cfg = parse_flags(Bounded, ["--keep=1", "--steps=-1", "--top_p=1", "--fraction=0", "--clip=0", "-k", "0"])
    assert (cfg.keep, cfg.steps, cfg.top_p, cfg.fraction, cfg.clip, cfg.k) == (1, -1, 1.0, 0.0, 0.0, 0)
    assert parse_flags(Bounded, ["--steps=7", "--clip=1.5"]).steps == 7


@pytest.mark.parametrize("argv,message", [
    (["--keep=0"], r"--keep=0 is out of range: allowed >= 1 \(kept\)"),
    (["--steps=-5"], r"--steps=-5 is out of range: allowed -1 or >= 1 \(optimizer steps; -1 derives them\)"),
    (["--steps=0"], r"--steps=0 is out of range: allowed -1 or >= 1"),
    (["--top_p=0"], r"--top_p=0 is out of range: allowed in \(0, 1\]$"),
    (["--top_p=1.5"], r"--top_p=1.5 is out of range"),
    (["--fraction=1"], r"--fraction=1 is out of range: allowed in \[0, 1\)$"),
    (["--clip=0.5"], r"--clip=0.5 is out of range: allowed 0 or >= 1"),
    (["--top_p=nan"], r"--top_p=nan is out of range"),  # NaN compares false with everything
    (["-k", "-1"], r"--k=-1 is out of range: allowed >= 0"),
])
def test_values_out_of_range_name_the_flag_the_value_and_the_range(argv, message):
    with pytest.raises(FlagError, match=message):
        parse_flags(Bounded, argv)


def test_help_shows_each_range_and_a_default_outside_its_own_bounds_is_refused():
    text = flags_help(Bounded)
    assert "--steps (int, default -1, allowed -1 or >= 1): optimizer steps" in text
    assert "--top_p (float, default 1.0, allowed in (0, 1])" in text
    with pytest.raises(ValueError, match="the default 0 lies outside its own bounds"):
        opt(0, min=1)


# Every stage's main refuses the three flags before it does any work: setup is patched to
# fail, so a flag that got past parse_flags would reach it and raise something else.
STAGE_BAD_FLAGS = [
    (stage, flag) for stage in ("base_train", "mid_train", "chat_sft", "chat_rl", "train_rm")
    for flag in ("--keep_checkpoints=0", "--num_iterations=-5", "--device_batch_size=0")
] + [("grpo", "--keep_checkpoints=0"), ("grpo", "--max_steps=-5"), ("grpo", "--update_tokens=0"),
     ("base_loss", "--device_batch_size=0"), ("chat_eval", "--batch_size=0")]


@pytest.mark.parametrize("stage,flag", STAGE_BAD_FLAGS)
def test_a_stage_refuses_a_bad_flag_before_any_model_is_loaded(stage, flag, tmp_path, monkeypatch):
    module = importlib.import_module(f"scripts.{stage}")

    def setup_reached(*args, **kwargs):
        raise AssertionError(f"scripts.{stage} started its setup with {flag}")

    monkeypatch.setattr(module, "compute_init", setup_reached)
    out_dir = tmp_path / "out"
    argv = [flag] + ([f"--out_dir={out_dir}"] if "out_dir" in {f.name for f in dataclasses.fields(module.Config)} else [])
    name, value = flag[2:].split("=")
    with pytest.raises(FlagError, match=rf"--{name}={value} is out of range: allowed "):
        module.main(argv)
    assert not out_dir.exists()


def test_chat_cli_refuses_sampling_flags_before_loading_the_model(monkeypatch):
    from scripts import chat_cli

    def load_reached(*args, **kwargs):
        raise AssertionError("chat_cli loaded a model")

    monkeypatch.setattr(chat_cli, "load_model", load_reached)
    for flag, message in [("--top_p=0", r"allowed in \(0, 1\]"), ("--temperature=-1", "allowed >= 0"),
                          ("--top_k=-1", "allowed >= 0"), ("--max_tokens=0", "allowed >= 1")]:
        with pytest.raises(FlagError, match=message):
            chat_cli.main([flag])


@pytest.mark.slow
def test_tok_train_refuses_a_vocabulary_too_small_for_its_special_tokens():
    # the script runs at import, so it is run as a process; it must stop before reading any text
    result = subprocess.run([sys.executable, "-m", "scripts.tok_train", "--vocab_size=100"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "FlagError: --vocab_size=100 is out of range: allowed >= 265" in result.stderr
    assert "tokenizer training:" not in result.stdout


# Numeric flags that stay unbounded, and why
UNBOUNDED = {
    "seed": "any integer seeds the generators (seed_everything takes it modulo 2**32)",
    "tau": "kat_density refuses a negative --tau itself, with the message its test asserts",
    "max_len": "kat_embed refuses --max_len below its MIN_MAX_LEN (defined after its Config) itself",
}
STAGES = ["base_eval", "base_loss", "base_train", "chat_cli", "chat_eval", "chat_rl", "chat_sft", "chat_web",
          "control_sft", "eval_diversity", "grpo", "kat_density", "kat_embed", "kat_inject", "kat_pairs",
          "mid_train", "prefetch", "train_rm"]  # tok_train runs at import: its bounds are checked above


@pytest.mark.parametrize("stage", STAGES)
def test_every_numeric_flag_of_every_stage_declares_its_range(stage):
    module = importlib.import_module(f"scripts.{stage}")
    hints = typing.get_type_hints(module.Config)
    numeric = [f.name for f in dataclasses.fields(module.Config) if hints[f.name] in (int, float)]
    fields = {f.name: f for f in dataclasses.fields(module.Config)}
    missing = [name for name in numeric if name not in UNBOUNDED and fields[name].metadata.get("bounds") is None]
    assert not missing, f"scripts/{stage}.py: give these flags a range (opt(..., min=...)): {missing}"
    parse_flags(module.Config, [])  # and every default lies inside its range
