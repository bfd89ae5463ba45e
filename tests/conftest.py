"""
Fixtures and builders the test modules share: a run's folders in the environment, tiny tokenizers
and GPTs saved as stages, the KAT data folder built from local samples, and the tiny preset's run
(made once per session for tests/test_tiny_preset.py and tests/test_kat_runs.py).

    uv run pytest -m "not slow"     # the quick lane: no subprocesses, process groups or browser
"""

import math
import subprocess
from contextlib import contextmanager
from dataclasses import asdict

import pytest
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import REPO_ROOT, stage_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.kat.data import KatData
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir
from tests.tiny_fixtures import tiny_env

KAT_SAMPLES = "nanochat/samples/kat"  # the tiny preset's preference samples, in the hubs' row schemas
KAT_FIXTURES = "tests/fixtures/kat"  # a handful of rows per source, for the data stages' own tests


@contextmanager
def run_env(root, kat: bool = True, tasks_offline: bool = False):
    """$NANOCHAT_BASE_DIR, $NANOCHAT_OUTS_DIR (and the KAT cache) under root, one process; undone on exit."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NANOCHAT_BASE_DIR", str(root / "base_dir"))
        env.setenv("NANOCHAT_OUTS_DIR", str(root / "outs"))
        if kat:
            env.setenv("NANOCHAT_KAT_CACHE", str(root / "kat"))
        if tasks_offline:
            env.setenv("NANOCHAT_TASKS_OFFLINE", "1")
        env.delenv("RANK", raising=False)
        yield env


def save_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """A BPE tokenizer trained on texts, saved where the stages look for it."""
    tokenizer = Tokenizer.train_from_iterator(iter(texts), vocab_size)
    tokenizer.save(get_tokenizer_dir())
    return tokenizer


def tiny_gpt(vocab_size: int, sequence_len: int, n_embd: int = 32, n_layer: int = 2, seed: int = 0,
             lively: bool = True) -> GPT:
    """A 2-layer GPT. lively: random output projections, since init_weights makes every block the
    identity (a trained model is not)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=2, n_kv_head=2,
                          n_embd=n_embd))
    if lively:
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_proj.weight.normal_(0.0, 0.1)
                block.mlp.c_proj.weight.normal_(0.0, 0.1)
    return model


def bigram_model(vocab_size: int, table: dict) -> GPT:
    """A 1-layer GPT whose logits after token u are table[u] ({next token: logit}; unlisted: 0).
    nanochat's init zeroes every block's output projection, so one-hot embeddings reach lm_head unchanged."""
    width = 4 * ((vocab_size + 3) // 4)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=width))
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.transformer.wte.weight[torch.arange(vocab_size), torch.arange(vocab_size)] = 1.0
        model.lm_head.weight.zero_()
        for u, row in table.items():
            for v, logit in row.items():
                model.lm_head.weight[v, u] = logit / math.sqrt(width)  # the final RMSNorm scales e_u by sqrt(width)
    return model


@pytest.fixture
def offline_run(tmp_path, monkeypatch):
    """(base dir, outs dir) of a one-process run under tmp_path, tasks read from the bundled samples."""
    base_dir, outs = tmp_path / "base_dir", tmp_path / "outs"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    monkeypatch.setenv("NANOCHAT_OUTS_DIR", str(outs))
    monkeypatch.setenv("NANOCHAT_TASKS_OFFLINE", "1")
    monkeypatch.delenv("RANK", raising=False)
    return base_dir, outs


def save_stage(stage: str, model: GPT):
    """model as the final checkpoint of outs/<stage>, as a training stage would leave it."""
    save_checkpoint(stage_dir(stage), 0, model, [], meta={"model_config": asdict(model.config)}, final=True)


def build_kat_data(data_dir, local_dir: str = KAT_SAMPLES) -> KatData:
    """pairs_all.jsonl and prompts_all.jsonl from local rows, through scripts.kat_pairs."""
    from scripts import kat_pairs
    flags = [f"--local_dir={local_dir}", f"--out_dir={data_dir}"]
    kat_pairs.main(flags + (["--se_test_fraction=0.1"] if local_dir == KAT_SAMPLES else []))
    return KatData(data_dir)


def pair_texts(pairs) -> list[str]:
    """Every turn, chosen and rejected text of the pairs: what a tokenizer for them trains on."""
    return [m["content"] for p in pairs for m in p["prefix"]["messages"]] + \
        [p[k] for p in pairs for k in ("chosen", "rejected")]


@contextmanager
def kat_workspace(root, local_dir: str, vocab_size: int, sequence_len: int, prompts_only: bool = False):
    """The KAT stages' inputs under root: pairs from local rows in <kat cache>/data, a tokenizer trained
    on their text (prompts_only: the turns alone), a lively random 2-layer GPT as outs/sft."""
    with run_env(root):
        data = build_kat_data(root / "kat" / "data", local_dir)
        pairs, prompts = data.pairs(), data.prompts()
        texts = [m["content"] for p in prompts for m in p["prefix"]["messages"]] if prompts_only else pair_texts(pairs)
        tokenizer = save_tokenizer(texts, vocab_size)
        save_stage("sft", tiny_gpt(vocab_size, sequence_len))
        yield {"root": root, "data_dir": data.dir, "data": data, "pairs": pairs, "prompts": prompts,
               "tokenizer": tokenizer}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(root, stdout) of `bash kat_speedrun.sh --tiny --rl` (several minutes); its readers never change it."""
    root = tmp_path_factory.mktemp("tiny_run")
    result = subprocess.run(["bash", "kat_speedrun.sh", "--tiny", "--rl"], cwd=REPO_ROOT, env=tiny_env(root),
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"kat_speedrun.sh --tiny failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return root, result.stdout


def pytest_collection_modifyitems(config, items):
    """A test on the tiny preset's run (minutes of subprocesses) must carry the slow marker: the quick lane
    (-m "not slow") would otherwise start the whole preset."""
    unmarked = [item.nodeid for item in items if "tiny_run" in getattr(item, "fixturenames", ())
                and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("these tests use the tiny_run fixture without @pytest.mark.slow: "
                                + ", ".join(unmarked))
