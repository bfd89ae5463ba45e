"""
Shared by the GRPO tests (test_grpo.py, test_grpo_trajectory.py): a byte tokenizer, a GPT whose
weights make it a bigram table (after <|assistant_start|> it says "a" or "b", then more of them or
<|assistant_end|>, each equally likely), a tiny real reward model, a letter-counting reward, and
the KAT data built from the bundled samples (nanochat/samples/kat, which have dev prompts for the
trajectory) by scripts.kat_pairs, with density weights from scripts.kat_density on random
prompt embeddings.
"""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.kat.data import KatData
from nanochat.kat.reward_model import KIND, RewardModel
from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer
from scripts import kat_density, kat_pairs
from tests.conftest import bigram_model as table_model

REPO = Path(__file__).resolve().parents[1]
END = "<|assistant_end|>"


def make_tokenizer() -> Tokenizer:
    return Tokenizer(SPLIT_PATTERN, {bytes([b]): b for b in range(256)})


def bigram_model(tokenizer) -> GPT:
    """After <|assistant_start|> "a" or "b", then more of them or <|assistant_end|>, each equally likely."""
    a, b, end = ord("a"), ord("b"), tokenizer.encode_special(END)
    return table_model(tokenizer.get_vocab_size(), {tokenizer.encode_special("<|assistant_start|>"): {a: 14.0, b: 14.0},
                                                     a: {a: 14.0, b: 14.0, end: 14.0}, b: {a: 14.0, b: 14.0, end: 14.0}})


def tiny_reward_model(tokenizer, seed: int = 1) -> RewardModel:
    torch.manual_seed(seed)
    backbone = GPT(GPTConfig(sequence_len=96, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2,
                             n_kv_head=2, n_embd=32))
    with torch.no_grad():
        for block in backbone.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.normal_(0.0, 0.1)
    return RewardModel(backbone, tokenizer, max_seq_len=96)


class LetterCount:
    """A reward with score()'s interface: how many times the response contains a letter."""

    def __init__(self, letter: str):
        self.letter = letter

    def score(self, pairs, batch_size=16):
        return [float(response.count(self.letter)) for _, response in pairs]


def build_kat_run(root: Path) -> dict:
    """Tokenizer, the bigram "SFT model" and a tiny RM saved as stages sft and rm, and the KAT data
    with density weights (k=2), all under root; returns the folders and paths."""
    dirs = {"NANOCHAT_BASE_DIR": root / "base", "NANOCHAT_OUTS_DIR": root / "outs", "NANOCHAT_KAT_CACHE": root / "cache"}
    data_dir = dirs["NANOCHAT_KAT_CACHE"] / "data"
    with pytest.MonkeyPatch.context() as mp:
        for name, path in dirs.items():
            mp.setenv(name, str(path))
        tokenizer = make_tokenizer()
        tokenizer.save(dirs["NANOCHAT_BASE_DIR"] / "tok")
        sft = bigram_model(tokenizer)
        sft_path = save_checkpoint(dirs["NANOCHAT_OUTS_DIR"] / "sft", 10, sft, [], final=True,
                                   meta={"model_config": dataclasses.asdict(sft.config)})
        save_reward_model(tiny_reward_model(tokenizer), dirs["NANOCHAT_OUTS_DIR"] / "rm")
        kat_pairs.main([f"--local_dir={REPO / 'nanochat/samples/kat'}", f"--out_dir={data_dir}", "--se_test_fraction=0.1"])
        ids = [p["id"] for p in KatData(data_dir).prompts()]
        KatData(data_dir).save_embeddings(ids, np.random.default_rng(0).normal(size=(len(ids), 8)))
        kat_density.main([f"--data_dir={data_dir}", "--k=2", "--device_type=cpu"])
    return {"dirs": dirs, "data_dir": data_dir, "tokenizer": tokenizer, "sft_path": sft_path, "root": root}


def point_env_at(kat_run: dict, monkeypatch) -> dict:
    for name, path in kat_run["dirs"].items():
        monkeypatch.setenv(name, str(path))
    monkeypatch.delenv("RANK", raising=False)
    return kat_run


FLAGS = ["--device_type=cpu", "--density_k=2", "--max_steps=2", "--prompts_per_step=2", "--samples_per_prompt=3",
         "--max_new_tokens=8", "--max_prompt_tokens=48", "--rollout_prompts=2", "--update_tokens=160",
         "--eval_every=1", "--eval_prompts=4", "--save_every=1", "--learning_rate=1e-3"]


def logged(log_text: str, tag: str) -> list[float]:
    return [float(v) for v in re.findall(rf"{re.escape(tag)} (\S+)", log_text)]


def save_reward_model(rm: RewardModel, out_dir: Path):
    config = dataclasses.asdict(rm.backbone.config)
    return save_checkpoint(out_dir, 5, rm, [], final=True,
                           meta={"kind": KIND, "model_config": config, "backbone_config": config, "max_seq_len": 96})
