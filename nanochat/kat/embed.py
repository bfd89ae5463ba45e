"""
Masked-mean embeddings: the mean of a GPT's final (RMS-normed) hidden states over chosen positions
of each sequence, pooled in float32 and L2-normalised.

    vectors = masked_mean_embeddings(model, sequences, pooled, batch_size=32, device="cuda")

scripts.kat_embed pools the text tokens of each prompt; scripts.eval_diversity and GRPO's trajectory
evaluation the tokens of each response after <|bos|> (response_embeddings). All go through this one function.
"""

import numpy as np
import torch
import torch.nn.functional as F

from nanochat.common import autocast_context, progress_bar


@torch.inference_mode()
def masked_mean_embeddings(model, sequences: list[list[int]], pooled: list[list[bool]], batch_size: int, device,
                           pad_id: int = 0) -> np.ndarray:
    """
    float32 [len(sequences), n_embd], unit rows: the mean of model.forward_hidden over the positions
    where pooled[i] is True. Rows are right-padded with pad_id in batches of batch_size, in the given
    order (sort by length first to pad little); the mask, never the pad id, says what is pooled, and
    causal attention keeps real positions blind to the padding after them.
    """
    if len(pooled) != len(sequences) or any(len(m) != len(s) for m, s in zip(pooled, sequences)):
        raise ValueError("need one pooled-position mask per sequence, as long as the sequence")
    empty = [i for i, mask in enumerate(pooled) if not any(mask)]
    if empty:
        raise ValueError(f"{len(empty)} sequences have no position to pool (first: sequence {empty[0]})")
    device = torch.device(device)
    autocast = autocast_context(device)
    out = np.empty((len(sequences), model.config.n_embd), dtype=np.float32)
    for start in progress_bar(range(0, len(sequences), batch_size), desc="embedding", unit=" batches"):
        batch = sequences[start:start + batch_size]
        width = max(len(seq) for seq in batch)
        idx = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)  # padding stays False
        for row, seq in enumerate(batch):
            idx[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = torch.tensor(pooled[start + row], dtype=torch.bool)
        idx, mask = idx.to(device), mask.to(device)
        with autocast:
            hidden = model.forward_hidden(idx)
        # masked_fill, not a multiply by the mask: a non-finite value at a padded position must not leak in
        summed = hidden.float().masked_fill(~mask[:, :, None], 0.0).sum(dim=1)
        mean = summed / mask.sum(dim=1, keepdim=True)
        out[start:start + len(batch)] = F.normalize(mean, dim=-1).cpu().numpy()
    return out


def response_embeddings(model, bos: int, responses: list[list[int]], batch_size: int, device) -> np.ndarray:
    """[len(responses), D] unit rows: final hidden states averaged over the response tokens after <|bos|>
    (the first sequence_len - 1 of them); an empty response keeps the <|bos|> state."""
    sequences = [[bos] + r[:model.config.sequence_len - 1] for r in responses]
    pooled = [[len(seq) == 1] + [True] * (len(seq) - 1) for seq in sequences]
    return masked_mean_embeddings(model, sequences, pooled, batch_size, device, pad_id=bos)
