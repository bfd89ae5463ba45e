"""
The full run's install step (`uv sync --frozen` with the extras runs/extras.txt names) must install
every package a stage of the full path imports, or the run stops hours in at the first stage that
needs one (as `datasets` did at mid_train). This walks the stages the run scripts call and what they
import, including imports inside functions, and checks each third-party module against what
uv.lock installs for the core dependencies plus those extras.
"""

import ast
import importlib.metadata
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO_ROOT = Path(__file__).resolve().parent.parent
OUR_PACKAGES = {"nanochat", "scripts", "tasks"}
FIRST_STAGE = "scripts.prefetch"  # the run's first stage, whatever the shell scripts are called
# imports the full path never takes: each sits behind a flag the run scripts do not pass, and says what to install
OFF_THE_FULL_PATH = {
    "umap": "nanochat.kat.embedding_map --method=umap (the viz extra); PCA otherwise",
    "sentence_transformers": "scripts.kat_embed --backend=sentence_transformers",
}
# import name -> distribution, where they differ and the package may not be installed here to say so
DISTRIBUTION_OF = {"yaml": "pyyaml"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_extras() -> tuple[list[str], list[str]]:
    """(extras always installed, extras installed only when WANDB_RUN names a run) from runs/extras.txt."""
    always, for_wandb_run = [], []
    for line in (REPO_ROOT / "runs" / "extras.txt").read_text().splitlines():
        words = line.split("#")[0].split()
        if not words:
            continue
        assert len(words) == 1 or words[1:] == ["if_wandb_run"], f"runs/extras.txt: cannot read {line!r}"
        (always if len(words) == 1 else for_wandb_run).append(words[0])
    return always, for_wandb_run


def installed_closure(extras: list[str]) -> set[str]:
    """Every distribution uv.lock installs for the project's core dependencies plus `extras` (no dev group)."""
    lock = tomllib.loads((REPO_ROOT / "uv.lock").read_text())
    packages = defaultdict(list)
    for package in lock["package"]:
        packages[normalise(package["name"])].append(package)
    project = normalise(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["name"])
    todo, seen = [(project, tuple(extras))], set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        for package in packages[name]:  # one entry per locked version; markers are ignored (a superset)
            deps = list(package.get("dependencies", []))
            for extra in wanted:
                deps += package.get("optional-dependencies", {}).get(extra, [])
            todo += [(normalise(dep["name"]), tuple(dep.get("extra", []))) for dep in deps]
    return {name for name, _ in seen}


def stage_modules() -> set[str]:
    """The modules the run scripts launch (python -m X, launch X), found by name in the shell files."""
    shell_files = [*REPO_ROOT.glob("*.sh"), *REPO_ROOT.glob("runs/*.sh"), REPO_ROOT / ".ci" / "run"]
    names = {FIRST_STAGE}
    for path in shell_files:
        if path.exists():
            names |= set(re.findall(r"\b(?:scripts|nanochat)(?:\.\w+)+", path.read_text()))
    return {name for name in names if module_file(name) is not None}


def module_file(name: str) -> Path | None:
    base = REPO_ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def third_party_imports(stages: set[str]) -> dict[str, list[str]]:
    """top-level third-party module -> where it is imported ("file:line"), over everything the stages import."""
    found, todo, seen = defaultdict(list), list(stages), set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py too
            prefix = ".".join(parts[:i])
            if prefix in seen or module_file(prefix) is None:
                continue
            seen.add(prefix)
            path = module_file(prefix)
            package = prefix if path.name == "__init__.py" else ".".join(parts[:i - 1])
            for node in ast.walk(ast.parse(path.read_text(), str(path))):  # every import, inside functions too
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    package_parts = package.split(".")
                    base = ".".join(package_parts[:len(package_parts) - node.level + 1] + [node.module or ""]).strip(".") \
                        if node.level else node.module
                    modules = [base] + [f"{base}.{alias.name}" for alias in node.names if base.split(".")[0] in OUR_PACKAGES]
                else:
                    continue  # `from a import b` above: b may be a submodule of ours, followed if it is one
                for module in modules:
                    top = module.split(".")[0]
                    if top in OUR_PACKAGES:
                        todo.append(module)
                    elif top not in sys.stdlib_module_names:
                        found[top].append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    return found


def distributions_of(module: str) -> set[str]:
    names = {normalise(module), normalise(DISTRIBUTION_OF.get(module, module))}
    return names | {normalise(d) for d in importlib.metadata.packages_distributions().get(module, [])}


def test_the_full_run_install_provides_every_import_of_the_full_path():
    always, for_wandb_run = read_extras()
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(always + for_wandb_run) <= set(declared), f"runs/extras.txt names extras pyproject.toml lacks: {declared}"
    stages = stage_modules()
    assert {"scripts.prefetch", "scripts.base_train", "scripts.mid_train", "scripts.chat_sft", "scripts.chat_eval",
            "scripts.kat_pairs", "scripts.grpo", "scripts.chat_web"} <= stages, f"found only {sorted(stages)}"

    installed = installed_closure(always)
    with_wandb = installed_closure(always + for_wandb_run)
    imports = third_party_imports(stages)
    assert {"torch", "datasets", "fastapi", "wandb", "tqdm"} <= set(imports)  # the walk reaches into functions
    missing = []
    for module, where in sorted(imports.items()):
        if module in OFF_THE_FULL_PATH:
            continue
        provided_by = installed if module != "wandb" else with_wandb  # wandb only for a named run, with its extra
        if not distributions_of(module) & provided_by:
            missing.append(f"{module} (imported at {', '.join(where[:3])})")
    assert not missing, ("the full run's install step (core dependencies + extras " + ", ".join(always) + ") does not "
                         "install: " + "; ".join(missing) + ". Add each to pyproject.toml (core or an extra in "
                         "runs/extras.txt), run `uv lock`, or list it in OFF_THE_FULL_PATH if no stage of the run takes it")


def test_the_check_would_catch_an_extra_left_out():
    # the check is not vacuous: without the hf extra, the hub loaders' `datasets` is not installed
    always, _ = read_extras()
    assert "datasets" in installed_closure(always)
    assert "datasets" not in installed_closure([extra for extra in always if extra != "hf"])
    assert "wandb" not in installed_closure(always)
