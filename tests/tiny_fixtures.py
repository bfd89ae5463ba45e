"""Shared by the tests that run the tiny preset (tests/conftest.py's tiny_run fixture and its readers)."""

import os


def tiny_env(root) -> dict:
    """This environment with the tiny preset's outputs under root (and no NANOCHAT_* override)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    env["TINY_RUN_DIR"] = str(root)
    return env
