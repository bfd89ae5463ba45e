"""
Pretraining batches from the parquet shards, tokenized on the fly.

    loader = DistributedTokenLoader(tokenizer, B, T, "train", rank=rank, world_size=W, device=device)
    inputs, targets = next(loader)   # each (B, T); loader.state_dict() -> resume_state continues exactly

Documents are read row group by row group (by default rank r of W takes the split's row groups
r, r+W, r+2W, ..., so ranks never share a document), each is tokenized with BOS in front, and the
token stream is cut into windows of B*T+1 tokens: inputs the first B*T, targets the last B*T.
`identical_batches=True` makes every world size train on the same global batch at every step, so
a run on N processes can be checked against a run on 1 (issue 3: equal "within bf16 noise"); each
rank then tokenizes the whole stream, W times the default's work, so it is for such checks, not for
the speedrun. The loader never stops (it starts the next epoch); training decides when to stop.
"""

from collections import deque

import torch

from nanochat.common import print0
from nanochat.dataset import parquets_iter_batched


class DistributedTokenLoader:
    def __init__(self, tokenizer, B: int, T: int, split: str, rank: int = 0, world_size: int = 1,
                 device="cpu", resume_state: dict | None = None, tokenizer_threads: int = 4,
                 tokenizer_batch_size: int = 128, data_dir=None, identical_batches: bool = False):
        if B < 1 or T < 1:
            raise ValueError(f"B and T must be positive, got B={B}, T={T}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.tokenizer, self.B, self.T = tokenizer, B, T
        self.split, self.rank, self.world_size = split, rank, world_size
        self.identical_batches = identical_batches
        self.device = torch.device(device)
        self.tokenizer_threads, self.tokenizer_batch_size = tokenizer_threads, tokenizer_batch_size
        self.data_dir = data_dir
        self.bos = tokenizer.get_bos_token_id()

        position = {"epoch": 0, "row_group": 0, "document": 0, "token": 0}
        if resume_state is not None:
            # states saved before the mode existed lack the key and were all saved without it
            saved = {"identical_batches": False, **resume_state}
            for key in ("split", "rank", "world_size", "identical_batches"):
                if saved[key] != getattr(self, key):
                    raise ValueError(f"resume_state was saved with {key}={saved[key]!r} but this loader has "
                                     f"{key}={getattr(self, key)!r}; a position only means something for the same "
                                     f"split, rank, world size and identical_batches mode")
            position = {key: resume_state[key] for key in position}
        # In identical_batches mode the rank reads every W-th window of the shared stream: it starts
        # `rank` windows in and then steps over the other ranks' windows. With accumulation A the W ranks
        # consume windows 0..A*W-1 in a step, exactly what one process with accumulation A*W consumes;
        # at another B (same total batch) a step still covers the same contiguous tokens.
        window = B * T
        self._stride = window * world_size if identical_batches else window
        first_window = rank * window if identical_batches and resume_state is None else 0
        # The buffer holds whole tokenized documents, each with the position of its first
        # token; `self._skip` tokens from the start of the first one are already consumed
        # (it may reach past that document until _drop_consumed runs).
        self._buffer = deque()
        self._skip = position["token"] + first_window
        self._documents = self._tokenized_documents(position["epoch"], position["row_group"], position["document"])

    def _tokenized_documents(self, epoch: int, row_group: int, document: int):
        """Yield ((epoch, row_group, document), tokens) forever, wrapping to the next epoch at the end."""
        while True:
            from_start, yielded_any = row_group == 0 and document == 0, False
            if self.identical_batches:  # every rank reads every row group: the one stream a single process reads
                start, step = row_group, 1
            else:
                start, step = self.rank + row_group * self.world_size, self.world_size
            row_groups = parquets_iter_batched(self.split, start=start, step=step, data_dir=self.data_dir)
            for rg_offset, texts in enumerate(row_groups):
                for first in range(document, len(texts), self.tokenizer_batch_size):
                    batch = texts[first:first + self.tokenizer_batch_size]
                    token_lists = self.tokenizer.encode(batch, prepend=self.bos, num_threads=self.tokenizer_threads)
                    for i, tokens in enumerate(token_lists):
                        yield (epoch, row_group + rg_offset, first + i), tokens
                        yielded_any = True
                document = 0
            if from_start and not yielded_any:
                needed = 1 if self.identical_batches else self.world_size
                raise RuntimeError(f"rank {self.rank} of {self.world_size} got no documents from the {self.split!r} "
                                   f"split: it needs at least {needed} non-empty row groups "
                                   f"(download more shards or use fewer ranks)")
            print0(f"dataloader: {self.split} epoch {epoch} finished on rank {self.rank}, starting epoch {epoch + 1}")
            epoch, row_group, document = epoch + 1, 0, 0

    def _drop_consumed(self):
        """Drop the documents wholly before the next window, reading on as far as `_skip` reaches."""
        while True:
            if not self._buffer:
                self._buffer.append(next(self._documents))
            if self._skip < len(self._buffer[0][1]):
                return
            self._skip -= len(self._buffer.popleft()[1])

    def _fill(self, needed: int):
        available = sum(len(tokens) for _, tokens in self._buffer) - self._skip
        while available < needed:
            position, tokens = next(self._documents)
            self._buffer.append((position, tokens))
            available += len(tokens)

    def state_dict(self) -> dict:
        """Where the next batch starts; pass it as resume_state to continue exactly from here."""
        # (epoch, row group, document, token): a resumed loader re-reads that row group, re-tokenizes from
        # that document and skips that many tokens, so it yields the very batch this one would yield next.
        self._drop_consumed()
        (epoch, row_group, document), _ = self._buffer[0]
        return {"split": self.split, "rank": self.rank, "world_size": self.world_size,
                "identical_batches": self.identical_batches,
                "epoch": epoch, "row_group": row_group, "document": document, "token": self._skip}

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.B * self.T
        self._drop_consumed()
        self._fill(n + 1)
        window, skip = [], self._skip
        for _, tokens in self._buffer:
            window.extend(tokens[skip:skip + n + 1 - len(window)])
            skip = 0
            if len(window) == n + 1:
                break
        # Advance by n (times W when the ranks share the stream), not n+1: a window's last token
        # is the next window's first input.
        self._skip += self._stride

        on_cuda = self.device.type == "cuda"
        window = torch.tensor(window, dtype=torch.long).pin_memory() if on_cuda else torch.tensor(window, dtype=torch.long)
        inputs = window[:-1].view(self.B, self.T).to(self.device, non_blocking=on_cuda)
        targets = window[1:].view(self.B, self.T).to(self.device, non_blocking=on_cuda)
        return inputs, targets
