"""
nanochat/kat/reward_model.py on a tiny random backbone and a byte-level tokenizer: the Bradley-Terry
figures, where the reward is read (last real token, whatever the padding, the batch-mates or a
pad id inside the text), left truncation, freezing, learning a separable toy preference, and
checkpoints that load as a frozen RM and never as a policy.
"""

import math
import random
from dataclasses import asdict

import pytest
import torch

from nanochat.checkpoint_manager import load_model, save_checkpoint
from nanochat.common import stage_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.kat.reward_model import (KIND, RewardModel, bradley_terry_losses, bradley_terry_metrics, left_truncate,
                                       load_reward_model, pad_right, pair_correct, render_for_reward, rm_eval_table)
from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer, get_tokenizer_dir

torch.set_num_threads(1)
SEQ_LEN = 96


def byte_tokenizer() -> Tokenizer:
    return Tokenizer(SPLIT_PATTERN, {bytes([b]): b for b in range(256)})


def tiny_backbone(vocab_size: int, seed: int = 0) -> GPT:
    """A random GPT whose blocks are not the identity (init_weights zeroes the output projections,
    which would make the last hidden state depend on the last token alone)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=SEQ_LEN, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    with torch.no_grad():
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture
def rm(tok):
    return RewardModel(tiny_backbone(tok.get_vocab_size()), tok, max_seq_len=SEQ_LEN)


def conv(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}]}


# -----------------------------------------------------------------------------
# Bradley-Terry

def test_bradley_terry_loss_accuracy_and_margin_on_known_rewards():
    r_chosen = torch.tensor([2.0, 0.0, 1.0, 0.5])
    r_rejected = torch.tensor([0.0, 1.0, 1.0, -0.5])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 2, -1, 0, 1
    expected = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(1)), math.log(2), math.log(1 + math.exp(-1))]
    assert bradley_terry_losses(r_chosen, r_rejected).tolist() == pytest.approx(expected, rel=1e-6)
    assert pair_correct(r_chosen, r_rejected).tolist() == [1.0, 0.0, 0.5, 1.0]  # a tie is half right
    figures = bradley_terry_metrics(r_chosen, r_rejected)
    assert figures["loss"] == pytest.approx(sum(expected) / 4, rel=1e-6)
    assert figures["accuracy"] == pytest.approx(0.625)
    assert figures["margin"] == pytest.approx(0.5)
    weights = [2.0, 0.0, 1.0, 1.0]
    weighted = bradley_terry_metrics(r_chosen, r_rejected, weights)
    assert weighted["loss"] == pytest.approx(sum(w * l for w, l in zip(weights, expected)) / 4, rel=1e-6)
    assert weighted["accuracy"] == figures["accuracy"]  # accuracy is never weighted


# -----------------------------------------------------------------------------
# Rendering and truncation

def test_render_ends_with_assistant_end_and_matches_the_chat_format(tok):
    ids, dropped = render_for_reward(tok, conv("hi"), "hello", SEQ_LEN)
    full, _ = tok.render_conversation({"messages": conv("hi")["messages"] + [{"role": "assistant", "content": "hello"}]})
    assert ids == full and dropped == 0
    assert ids[0] == tok.get_bos_token_id() and ids[-1] == tok.encode_special("<|assistant_end|>")


def test_left_truncation_keeps_bos_and_the_response_end(tok):
    prompt, response = "a long question " * 20, "the answer, ending here"
    full, _ = render_for_reward(tok, conv(prompt), response, 10_000)
    ids, dropped = render_for_reward(tok, conv(prompt), response, 64)
    assert len(ids) == 64 and dropped == len(full) - 64
    assert ids[0] == tok.get_bos_token_id()
    assert ids[1:] == full[-63:]  # everything cut came from right after <|bos|>: the prompt's start
    assert tok.decode(ids).endswith(response + "<|assistant_end|>")
    # a response longer than the window keeps its end and the scored token, never its start
    ids, _ = render_for_reward(tok, conv("q"), "x" * 200 + "END", 32)
    assert ids[0] == tok.get_bos_token_id() and tok.decode(ids).endswith("xEND<|assistant_end|>")
    assert left_truncate([5, 6, 7], 8) == [5, 6, 7]
    with pytest.raises(ValueError, match="user turn"):
        render_for_reward(tok, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                          "b", SEQ_LEN)


def test_the_evaluation_table_shows_every_group_and_the_quintiles_rarest_first():
    group = {"n_pairs": 4, "accuracy": 0.75, "loss": 0.5, "margin": 0.25}
    result = {**group, "n_pairs": 40, "by_source": {"hh-rlhf": group},
              "by_density_quintile": {str(q): {**group, "n_prompts": 3, "density_min": 0.001 * q, "density_max": 0.002 * q}
                                      for q in range(1, 6)}}
    table = rm_eval_table(result).splitlines()
    assert table[0] == "| group | pairs | accuracy | loss | margin | prompts | density |"
    assert table[2] == "| all test pairs | 40 | 0.7500 | 0.5000 | 0.2500 |  |  |"
    assert table[3].startswith("| hh-rlhf | 4 | 0.7500 |")
    assert table[4] == "| Q1 (rarest) | 4 | 0.7500 | 0.5000 | 0.2500 | 3 | 0.001..0.002 |"
    assert table[8].startswith("| Q5 (densest) | 4 |") and len(table) == 9
    empty = {**result, "by_density_quintile": {str(q): {"n_prompts": 0, "density_min": None, "density_max": None,
                                                        "n_pairs": 0, "accuracy": None, "loss": None, "margin": None}
                                               for q in range(1, 6)}}
    assert rm_eval_table(empty).splitlines()[4] == "| Q1 (rarest) | 0 | - | - | - | 0 | -..- |"
    skipped = rm_eval_table({**result, "by_density_quintile": {"skipped": "no prompt_weights.jsonl"}})
    assert skipped.endswith("\n\nDensity quintiles skipped: no prompt_weights.jsonl") and "Q1" not in skipped


# -----------------------------------------------------------------------------
# Where the reward is read

def test_reward_is_read_at_the_last_real_token_whatever_the_padding(rm, tok):
    pad_id = tok.get_bos_token_id()
    row, _ = render_for_reward(tok, conv("what is 2+2?"), "4", SEQ_LEN)
    # the same pad id also occurs inside the row: it must not be taken for the end
    row = row[:3] + [pad_id] + row[3:]
    alone = rm(torch.tensor([row]), torch.tensor([len(row)]))
    idx, lengths = pad_right([row, row + [65] * 30], pad_id)  # a longer batch-mate pads this row by 30
    assert lengths.tolist() == [len(row), len(row) + 30]
    rewards = rm(idx, lengths)
    torch.testing.assert_close(rewards[0], alone[0], rtol=0, atol=1e-6)
    for garbage in (0, 120, tok.encode_special("<|assistant_end|>")):  # what is written after the length is irrelevant
        idx[0, len(row):] = garbage
        torch.testing.assert_close(rm(idx, lengths)[0], alone[0], rtol=0, atol=1e-6)
    changed = idx.clone()
    changed[0, len(row) - 1] = 66  # but the last real token itself is what the reward is read at
    assert abs(rm(changed, lengths)[0].item() - alone[0].item()) > 1e-4
    with pytest.raises(ValueError, match="lengths"):
        rm(idx, torch.tensor([0, 3]))


def test_score_keeps_order_and_is_independent_of_batch_mates(rm):
    items = [(conv("short"), "a"), (conv("a much longer question " * 3), "and a longer answer " * 2),
             (conv("mid question"), "mid answer"), (conv("short"), "b")]
    together = rm.score(items, batch_size=3)
    alone = [rm.score([item])[0] for item in items]
    assert together == pytest.approx(alone, abs=1e-6)
    assert len(set(round(r, 6) for r in together)) == 4  # the rewards are not one constant


# -----------------------------------------------------------------------------
# Training

def toy_pair(rng: random.Random) -> tuple[dict, str, str]:
    """Random words; the chosen answer has one letter, anywhere, replaced by '!' (same length: no length cue)."""
    def words(n):
        return " ".join("".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5))) for _ in range(n))
    rejected = words(rng.randint(3, 7))
    at = rng.choice([i for i, ch in enumerate(rejected) if ch != " "])
    return conv(words(3)), rejected[:at] + "!" + rejected[at + 1:], rejected


def train_steps(rm, pairs, steps, batch, lrs=(1e-3, 3e-3), seed=0):
    block_params, head_params = rm.set_trainable_blocks(-1)
    opt = torch.optim.AdamW([dict(params=block_params, lr=lrs[0]), dict(params=head_params, lr=lrs[1])],
                            betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(seed)
    pad_id = rm.tokenizer.get_bos_token_id()
    for _ in range(steps):
        chunk = rng.sample(pairs, batch)
        rows = [render_for_reward(rm.tokenizer, p, c, rm.max_seq_len)[0] for p, c, _ in chunk] + \
               [render_for_reward(rm.tokenizer, p, r, rm.max_seq_len)[0] for p, _, r in chunk]
        rewards = rm(*pad_right(rows, pad_id))
        bradley_terry_losses(rewards[:batch], rewards[batch:]).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_tiny_reward_model_learns_a_separable_preference(rm):
    rng = random.Random(0)
    train, held_out = [toy_pair(rng) for _ in range(256)], [toy_pair(rng) for _ in range(64)]
    train_steps(rm, train, steps=60, batch=16)
    chosen = rm.score([(p, c) for p, c, _ in held_out])
    rejected = rm.score([(p, r) for p, _, r in held_out])
    accuracy = pair_correct(torch.tensor(chosen), torch.tensor(rejected)).mean().item()
    assert accuracy > 0.9


def test_freezing_leaves_frozen_parameters_unchanged(rm):
    before = {k: v.clone() for k, v in rm.state_dict().items()}
    block_params, head_params = rm.set_trainable_blocks(1)
    assert {id(p) for p in block_params} == {id(p) for p in rm.backbone.transformer.h[1].parameters()}
    assert [id(p) for p in head_params] == [id(rm.head.weight)]
    opt = torch.optim.AdamW(block_params + head_params, lr=1e-2)
    rows = [[256, 10, 20, 30, 260], [256, 40, 50, 260]]
    for _ in range(3):
        rewards = rm(*pad_right(rows, 256))
        bradley_terry_losses(rewards[:1], rewards[1:]).mean().backward()
        opt.step()
        opt.zero_grad()
    after = rm.state_dict()
    for key in before:
        trained = key.startswith("backbone.transformer.h.1.") or key == "head.weight"
        assert torch.equal(before[key], after[key]) != trained, key
    assert not any(p.requires_grad for p in rm.backbone.transformer.h[0].parameters())
    assert not rm.backbone.transformer.wte.weight.requires_grad and not rm.backbone.lm_head.weight.requires_grad
    assert [p.requires_grad for p in rm.parameters()].count(True) == len(block_params) + 1
    rm.set_trainable_blocks(0)
    assert [name for name, p in rm.named_parameters() if p.requires_grad] == ["head.weight"]
    with pytest.raises(ValueError, match="train_blocks"):
        rm.set_trainable_blocks(3)


# -----------------------------------------------------------------------------
# Checkpoints

def test_checkpoint_loads_as_a_frozen_reward_model_and_never_as_a_policy(rm, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NANOCHAT_OUTS_DIR", str(tmp_path / "outs"))
    tok.save(get_tokenizer_dir())
    config = asdict(rm.backbone.config)
    meta = {"kind": KIND, "model_config": config, "backbone_config": config, "source": "sft", "train_blocks": -1,
            "max_seq_len": 48}
    save_checkpoint(stage_dir("rm"), 5, rm, [], meta=meta, final=True)
    save_checkpoint(stage_dir("sft"), 5, rm.backbone, [], meta={"model_config": config}, final=True)

    loaded = load_reward_model("rm", "cpu")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.max_seq_len == 48
    items = [(conv("q one"), "answer one"), (conv("q two " * 20), "answer two")]  # the second is truncated to 48
    rm.max_seq_len = 48
    assert loaded.score(items) == pytest.approx(rm.score(items), abs=1e-6)
    with pytest.raises(RuntimeError, match="do not fit"):
        load_model("rm", "cpu")  # RM weights cannot end up in a policy or a reference model
    with pytest.raises(ValueError, match="not a reward model"):
        load_reward_model("sft", "cpu")
