"""
Conversation batches for midtraining, SFT and the reward model, and the loss that averages
over the trainable tokens of a whole optimizer step.

Targets are completion-only: the target at input position i is ids[i+1] where the rendered mask
is 1 (what the assistant must learn to write), IGNORE_INDEX (-1) on BOS, user turns, tool output
and padding. Two ways to batch:
- packed (midtraining): conversations back to back in one token stream, cut into windows of
  B*T+1 tokens; no padding, and a conversation may run on into the next row or batch.
- padded (SFT, reward model): one conversation per row, right-padded to the longest row.
Rank r of W walks its dataset at r, r+W, r+2W, ... and starts the next epoch at r again.
state_dict() is plain data; a loader built with it as resume_state yields exactly the batches
the uninterrupted loader would have yielded next.
"""

import torch
import torch.distributed as dist

from nanochat.lm_loss import IGNORE_INDEX

# Padding is inert: its targets are -1 and it comes after every real token, so causal attention never
# lets a real position see it. render_conversation emits <|bos|> only at position 0 (text never encodes
# to a special token), so in a padded batch a BOS anywhere else is padding.
PAD_TOKEN = "<|bos|>"


def next_token_targets(ids: list[int], mask: list[int]) -> list[int]:
    """Targets for inputs ids[:-1]: ids[i+1] where mask[i+1] == 1, IGNORE_INDEX where it is 0."""
    if len(ids) != len(mask):
        raise ValueError(f"ids and mask differ in length ({len(ids)} vs {len(mask)})")
    return [token if trained else IGNORE_INDEX for token, trained in zip(ids[1:], mask[1:])]


def pad_conversations(rendered: list[tuple[list[int], list[int]]], pad_token_id: int):
    """
    (inputs, targets, lengths) for rendered (ids, mask) pairs, one row each: inputs (N, L) long
    with L the longest len(ids) - 1, right-padded with pad_token_id; targets (N, L) with -1 on
    padding and on untrained tokens; lengths (N,) the real input positions of each row
    (so no caller has to search for pads).
    """
    if not rendered:
        raise ValueError("pad_conversations needs at least one conversation")
    lengths = [len(ids) - 1 for ids, _ in rendered]
    if min(lengths) < 1:
        raise ValueError("every rendered conversation needs at least 2 tokens (one input, one target)")
    width = max(lengths)
    inputs = torch.full((len(rendered), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(rendered), width), IGNORE_INDEX, dtype=torch.long)
    for row, ((ids, mask), length) in enumerate(zip(rendered, lengths)):
        inputs[row, :length] = torch.tensor(ids[:-1], dtype=torch.long)
        targets[row, :length] = torch.tensor(next_token_targets(ids, mask), dtype=torch.long)
    return inputs, targets, torch.tensor(lengths, dtype=torch.long)


class ConversationWalk:
    """One rank's pass order over a dataset of conversations, rendered to (ids, mask)."""

    def __init__(self, tokenizer, dataset, max_tokens: int, rank: int, world_size: int, epoch: int = 0,
                 index: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.size = len(dataset)
        if self.size <= rank:
            raise ValueError(f"the dataset has {self.size} conversations, too few for rank {rank} of {world_size}: "
                             "every rank needs at least one (use more data or fewer ranks)")
        self.tokenizer, self.dataset, self.max_tokens = tokenizer, dataset, max_tokens
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = epoch, rank if index is None else index
        if self.index % world_size != rank or not 0 <= self.index < self.size:
            raise ValueError(f"index {self.index} is not one of rank {rank}'s positions in a dataset of {self.size}")

    def next(self) -> tuple[list[int], list[int]]:
        ids, mask = self.tokenizer.render_conversation(self.dataset[self.index], max_tokens=self.max_tokens)
        self.index += self.world_size
        if self.index >= self.size:
            self.epoch, self.index = self.epoch + 1, self.rank
        return ids, mask

    @property
    def progress(self) -> float:
        """Epochs completed, fractional: 0.5 halfway through the first, 1.0 when it has just ended."""
        return self.epoch + self.index / self.size

    def state_dict(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "dataset_size": self.size,
                "epoch": self.epoch, "index": self.index}

    @classmethod
    def resumed(cls, tokenizer, dataset, max_tokens, rank, world_size, state: dict | None):
        if state is None:
            return cls(tokenizer, dataset, max_tokens, rank, world_size)
        here = {"rank": rank, "world_size": world_size, "dataset_size": len(dataset)}
        for key, value in here.items():
            if state[key] != value:
                raise ValueError(f"resume_state was saved with {key}={state[key]} but this loader has {key}={value}; "
                                 "a data position only means something for the same ranks and the same mixture")
        return cls(tokenizer, dataset, max_tokens, rank, world_size, state["epoch"], state["index"])


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class PackedConversationLoader:
    """Midtraining batches: (inputs, targets), each (B, T), from conversations packed end to end."""

    def __init__(self, tokenizer, dataset, B: int, T: int, rank: int = 0, world_size: int = 1, device="cpu",
                 resume_state: dict | None = None):
        if B < 1 or T < 1:
            raise ValueError(f"B and T must be positive, got B={B}, T={T}")
        self.B, self.T, self.device = B, T, torch.device(device)
        # A conversation longer than a row is cut there: the model never sees more context than T.
        walk_state = None if resume_state is None else resume_state["walk"]
        self.walk = ConversationWalk.resumed(tokenizer, dataset, T + 1, rank, world_size, walk_state)
        # rendered tokens not yet consumed (the tail of the last conversation rendered)
        self._ids = [] if resume_state is None else list(resume_state["pending_ids"])
        self._mask = [] if resume_state is None else list(resume_state["pending_mask"])

    @property
    def progress(self) -> float:
        return self.walk.progress

    def state_dict(self) -> dict:
        return {"walk": self.walk.state_dict(), "pending_ids": list(self._ids), "pending_mask": list(self._mask)}

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.B * self.T
        while len(self._ids) < n + 1:
            ids, mask = self.walk.next()
            self._ids.extend(ids)
            self._mask.extend(mask)
        window, window_mask = self._ids[:n + 1], self._mask[:n + 1]
        # the window's last token is the next window's first input: every token is predicted exactly once
        del self._ids[:n], self._mask[:n]
        inputs = torch.tensor(window[:-1], dtype=torch.long).view(self.B, self.T)
        targets = torch.tensor(next_token_targets(window, window_mask), dtype=torch.long).view(self.B, self.T)
        return _to_device(inputs, self.device), _to_device(targets, self.device)


class PaddedConversationLoader:
    """SFT batches: (inputs, targets), each (B, L<=max_seq_len), one conversation per row, right-padded."""

    def __init__(self, tokenizer, dataset, B: int, max_seq_len: int, rank: int = 0, world_size: int = 1,
                 device="cpu", resume_state: dict | None = None):
        if B < 1 or max_seq_len < 1:
            raise ValueError(f"B and max_seq_len must be positive, got B={B}, max_seq_len={max_seq_len}")
        self.B, self.device = B, torch.device(device)
        self.pad_token_id = tokenizer.encode_special(PAD_TOKEN)
        # max_seq_len + 1 rendered tokens give max_seq_len inputs and targets
        self.walk = ConversationWalk.resumed(tokenizer, dataset, max_seq_len + 1, rank, world_size, resume_state)

    @property
    def progress(self) -> float:
        return self.walk.progress

    def state_dict(self) -> dict:
        return self.walk.state_dict()

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets, _ = pad_conversations([self.walk.next() for _ in range(self.B)], self.pad_token_id)
        return _to_device(inputs, self.device), _to_device(targets, self.device)


# -----------------------------------------------------------------------------
# The loss of one optimizer step

def backward_token_mean(model, micro_batches, autocast_ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Accumulate the gradient of (sum of token losses) / (number of trainable tokens), both taken
    over every micro-batch of the step on every rank; returns (that loss, that count), detached.

    Why not the mean of per-micro-batch means: a micro-batch with 3 trainable tokens would then
    weigh as much as one with 3,000, and one with none would divide by zero. Here every
    trainable token of the step weighs the same, and a micro-batch without any contributes a
    loss of 0 and a zero gradient (the model's "sum" reduction over no tokens). The count is
    all-reduced before the first backward; the distributed optimizers then average gradients
    across ranks, so each rank scales its sum by world_size / count to make that average the
    global sum / count. If the whole step has no trainable token the gradient is zero.
    """
    if not micro_batches:
        raise ValueError("backward_token_mean needs at least one micro-batch")
    distributed = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if distributed else 1
    num_tokens = sum((targets != IGNORE_INDEX).sum() for _, targets in micro_batches)
    if distributed:
        dist.all_reduce(num_tokens)
    scale = world_size / num_tokens.clamp(min=1).float()
    loss_sum = torch.zeros((), dtype=torch.float32, device=scale.device)
    for inputs, targets in micro_batches:
        with autocast_ctx:
            batch_sum = model(inputs, targets, loss_reduction="sum")
        (batch_sum * scale).backward()
        loss_sum += batch_sum.detach().float()
    if distributed:
        dist.all_reduce(loss_sum)
    return loss_sum / num_tokens.clamp(min=1), num_tokens


@torch.no_grad()
def token_mean_loss(model, batches, steps: int, autocast_ctx) -> float:
    """Mean loss per trainable token over `steps` batches (and all ranks): the validation loss."""
    device = next(model.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, token count
    batch_iter = iter(batches)
    for _ in range(steps):
        inputs, targets = next(batch_iter)
        with autocast_ctx:
            totals[0] += model(inputs, targets, loss_reduction="sum").double()
        totals[1] += (targets != IGNORE_INDEX).sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    if totals[1].item() == 0:
        raise ValueError(f"no trainable token in {steps} validation batches: every target was masked "
                         "(raise --eval_steps, or check that the validation conversations have assistant turns)")
    return (totals[0] / totals[1]).item()
