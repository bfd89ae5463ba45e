"""
The reward model: the SFT backbone plus a scalar head, trained on preference pairs with the
Bradley-Terry loss (scripts/train_rm.py), loaded frozen by GRPO and the diversity evaluation.

    rm = load_reward_model("rm", device)                    # frozen, eval mode, its own module
    rewards = rm.score([(prefix, response), ...])           # prefix: {"messages": [... user turn]}

The prefix + {"role": "assistant", "content": response} is rendered in the chat format and the
reward is the head applied to the final hidden state at the closing <|assistant_end|>: the one
position whose causal context is the whole prompt and the whole response (a scalar head on one
position, never a comparison of logits of different tokens). Checkpoints hold the whole model
(keys "backbone." and "head."), so an RM loads standalone and never as a policy by mistake.
"""

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.chat_data import PAD_TOKEN
from nanochat.common import autocast_context

KIND = "reward_model"  # meta["kind"] of an RM checkpoint
SCORED_TOKEN = "<|assistant_end|>"


# -----------------------------------------------------------------------------
# Rendering and batching

def left_truncate(ids: list[int], max_len: int) -> list[int]:
    """ids cut to max_len by dropping the tokens right after the first (<|bos|>); the end is kept."""
    # the one prompt truncation: RM rows, GRPO prompts and kat_embed's prompts all keep <|bos|> and
    # the latest turns; for an RM row the scored <|assistant_end|> and the end of the response stay
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (<|bos|> and the scored token), got {max_len}")
    if len(ids) <= max_len:
        return list(ids)
    return [ids[0]] + list(ids[len(ids) - (max_len - 1):])


def render_for_reward(tokenizer, prefix: dict, response: str, max_seq_len: int) -> tuple[list[int], int]:
    """
    (ids, dropped): the chat rendering of prefix + the assistant's response, ending with
    <|assistant_end|>, left-truncated to max_seq_len; dropped counts the tokens cut.
    prefix is {"messages": [...]} ending with a user turn (the pairs file's "prefix").
    """
    if not isinstance(prefix, dict) or not isinstance(prefix.get("messages"), list) or not prefix["messages"]:
        raise ValueError(f'prefix must be {{"messages": [...]}} ending with a user turn, got {prefix!r:.200}')
    if prefix["messages"][-1].get("role") != "user":
        raise ValueError(f"the prefix must end with a user turn, it ends with {prefix['messages'][-1].get('role')!r}")
    if not isinstance(response, str):
        raise ValueError(f"a response must be a string, got {type(response).__name__}")
    conversation = {"messages": prefix["messages"] + [{"role": "assistant", "content": response}]}
    ids, _ = tokenizer.render_conversation(conversation, max_tokens=sys.maxsize)  # we truncate, from the left
    if ids[-1] != tokenizer.encode_special(SCORED_TOKEN):
        raise RuntimeError(f"the rendered conversation does not end with {SCORED_TOKEN}; the tokenizer's chat format changed")
    # a response longer than the whole window loses its start too; scripts.train_rm counts such rows
    return left_truncate(ids, max_seq_len), max(0, len(ids) - max_seq_len)


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    (idx (N, L) long, lengths (N,) long): rows right-padded with pad_id to the longest, L = max length.
    (chat_data.pad_conversations does not fit: it shifts rows into next-token inputs and so drops
    each row's last token, the very one a reward is read at.)
    """
    if not rows or min(len(r) for r in rows) < 1:
        raise ValueError("pad_right needs at least one row and no empty row")
    lengths = [len(r) for r in rows]
    idx = torch.full((len(rows), max(lengths)), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        idx[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return idx, torch.tensor(lengths, dtype=torch.long)


# -----------------------------------------------------------------------------
# Bradley-Terry

def reward_margins(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """r_chosen - r_rejected in fp32 at least (fp64 stays fp64)."""
    dtype = torch.promote_types(torch.promote_types(r_chosen.dtype, r_rejected.dtype), torch.float32)
    return r_chosen.to(dtype) - r_rejected.to(dtype)


def bradley_terry_losses(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per pair: -log sigmoid(r_chosen - r_rejected), the negative log-likelihood of the human preference."""
    return -F.logsigmoid(reward_margins(r_chosen, r_rejected))


def pair_correct(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 if the chosen response scores higher, 0 if lower, 0.5 for a tie (a coin flip, not a win)."""
    margins = reward_margins(r_chosen, r_rejected)
    return (margins > 0).to(margins.dtype) + 0.5 * (margins == 0).to(margins.dtype)


def bradley_terry_metrics(r_chosen, r_rejected, weights=None) -> dict:
    """loss (weighted mean when weights are given), accuracy and margin (plain means), as floats."""
    losses = bradley_terry_losses(r_chosen, r_rejected)
    loss = losses.mean() if weights is None else (torch.as_tensor(weights, dtype=losses.dtype) * losses).mean()
    return {"loss": loss.item(), "accuracy": pair_correct(r_chosen, r_rejected).mean().item(),
            "margin": reward_margins(r_chosen, r_rejected).mean().item()}


def rm_eval_table(result: dict) -> str:
    """
    scripts.train_rm's held-out evaluation (eval.json) as one markdown table: all test pairs, each
    source, each density quintile of the test prompts (1 = rarest), or why the quintiles were skipped.
    """
    def show(value, spec=".4f"):
        return "-" if value is None else format(value, spec)

    def row(label, g, prompts="", densities=""):
        return (f"| {label} | {show(g.get('n_pairs'), 'd')} | {show(g.get('accuracy'))} | {show(g.get('loss'))} | "
                f"{show(g.get('margin'))} | {prompts} | {densities} |")

    lines = ["| group | pairs | accuracy | loss | margin | prompts | density |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |", row("all test pairs", result)]
    lines += [row(src, g) for src, g in (result.get("by_source") or {}).items()]
    quintiles = result.get("by_density_quintile") or {"skipped": "no density quintiles in these figures"}
    if "skipped" in quintiles:
        return "\n".join(lines + ["", f"Density quintiles skipped: {quintiles['skipped']}"])
    for q, g in quintiles.items():
        label = f"Q{q}" + (" (rarest)" if q == "1" else " (densest)" if q == str(len(quintiles)) else "")
        lines.append(row(label, g, show(g.get("n_prompts"), "d"),
                         f"{show(g.get('density_min'), '.4g')}..{show(g.get('density_max'), '.4g')}"))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The model

class RewardModel(nn.Module):
    def __init__(self, backbone, tokenizer=None, max_seq_len: int | None = None):
        super().__init__()
        self.backbone = backbone
        # No bias: Bradley-Terry sees only reward differences, so a bias would never get a gradient (and
        # GRPO's group-relative advantages cancel it). The hidden state is RMS-normalised (entries ~1),
        # so this init gives rewards ~N(0, 0.01): an initial loss ~ln 2 and few ties.
        self.head = nn.Linear(backbone.config.n_embd, 1, bias=False, device=backbone.get_device())
        nn.init.normal_(self.head.weight, mean=0.0, std=0.1 / math.sqrt(backbone.config.n_embd))
        self.tokenizer = tokenizer  # needed by score(), not by forward()
        self.max_seq_len = max_seq_len or backbone.config.sequence_len

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) fp32 for right-padded rows idx (B, T), read at position lengths[b] - 1 of each row."""
        # the row's own last real token, known from its length, never found by searching for a token
        # id: the pad id is irrelevant, and causal attention keeps real positions blind to the padding
        B, T = idx.shape
        if lengths.shape != (B,) or int(lengths.min()) < 1 or int(lengths.max()) > T:
            raise ValueError(f"lengths must hold one value in [1, {T}] per row, got {lengths.tolist()}")
        hidden = self.backbone.forward_hidden(idx)
        last = hidden[torch.arange(B, device=idx.device), lengths.to(idx.device) - 1]  # (B, C)
        # fp32 even under bf16 autocast: rewards are compared by small differences
        with torch.autocast(device_type=idx.device.type, enabled=False):
            return F.linear(last.float(), self.head.weight.float()).squeeze(-1)

    def set_trainable_blocks(self, train_blocks: int) -> tuple[list, list]:
        """
        Freeze everything but the last train_blocks transformer blocks (-1: all) and the head.
        The embedding and the unused lm_head stay frozen. Returns (block params, head params).
        """
        blocks = self.backbone.transformer.h
        if not -1 <= train_blocks <= len(blocks):
            raise ValueError(f"train_blocks must be -1 (all) or 0..{len(blocks)}, got {train_blocks}")
        trained = blocks if train_blocks == -1 else blocks[len(blocks) - train_blocks:]
        self.requires_grad_(False)
        for block in trained:
            block.requires_grad_(True)
        self.head.requires_grad_(True)
        return [p for block in trained for p in block.parameters()], list(self.head.parameters())

    @torch.no_grad()
    def rewards_for_rows(self, rows: list[list[int]], batch_size: int = 16) -> list[float]:
        """Rewards of token rows (each ending with the scored token), batched longest first to pad little."""
        if self.tokenizer is None:
            raise RuntimeError("this RewardModel was built without a tokenizer; use load_reward_model")
        pad_id = self.tokenizer.encode_special(PAD_TOKEN)
        device = self.backbone.get_device()
        autocast = autocast_context(device)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        rewards = [0.0] * len(rows)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            idx, lengths = pad_right([rows[i] for i in chunk], pad_id)
            with autocast:
                values = self(idx.to(device), lengths.to(device)).tolist()
            for i, value in zip(chunk, values):
                rewards[i] = value
        return rewards

    def score(self, pairs_of: list[tuple[dict, str]], batch_size: int = 16) -> list[float]:
        """The reward of each (prefix conversation, response text), in the given order."""
        rows = [render_for_reward(self.tokenizer, prefix, response, self.max_seq_len)[0] for prefix, response in pairs_of]
        return self.rewards_for_rows(rows, batch_size)


def load_reward_model(stage_or_path="rm", device="cpu") -> RewardModel:
    """A trained RM from outs/<stage>/ or a checkpoint path: frozen, in eval mode, with its tokenizer."""
    from nanochat.checkpoint_manager import build_model, find_stage_checkpoint, load_checkpoint, tokenizer_for

    path = find_stage_checkpoint(stage_or_path)
    ckpt = load_checkpoint(path, device)
    meta = ckpt["meta"]
    if meta.get("kind") != KIND:
        raise ValueError(f"{path} is not a reward model checkpoint (meta kind {meta.get('kind')!r}); "
                         "train one with python -m scripts.train_rm")
    backbone = build_model(meta["backbone_config"], device)
    tokenizer = tokenizer_for(backbone.config.vocab_size, path)
    model = RewardModel(backbone, tokenizer, max_seq_len=meta["max_seq_len"])
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"weights in {path} do not fit a RewardModel over GPT({backbone.config}): {e}") from e
    model.eval()
    model.requires_grad_(False)
    return model
