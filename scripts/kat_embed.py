"""
Prompt embeddings for the KAT density stage: one L2-normalised vector per unique prompt.

    python -m scripts.kat_embed                                    # the SFT model, every prompt
    python -m scripts.kat_embed --source=mid --batch_size=64
    torchrun --nproc_per_node=8 -m scripts.kat_embed               # prompts dealt out across GPUs
    python -m scripts.kat_embed --backend=sentence_transformers    # pip install sentence-transformers

Reads prompts_all.jsonl (scripts.kat_pairs); writes prompt_embeddings.npy and _ids.txt,
prompt_embeddings.json (how they were made), the "kat_embed" section of stats.txt and the report's
"Prompt embeddings" section. Backend "model": each prompt is rendered as the chat model reads it
before answering, and its vector is the masked mean of the final hidden states over the TEXT
tokens of its turns (nanochat/kat/embed.py). Next: python -m scripts.kat_density.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import find_stage_checkpoint, load_model
from nanochat.common import atomic_write, compute_cleanup, compute_init, print0, synchronize
from nanochat.flags import flags_dict, opt, parse_flags
from nanochat.kat.data import EMBEDDINGS_META_FILE, KatData, write_stats_section
from nanochat.kat.embed import masked_mean_embeddings
from nanochat.kat.reward_model import left_truncate
from nanochat.report import get_report


@dataclass
class Config:
    """Embed every unique prompt (prompts_all.jsonl) for the density stage."""
    source: str = opt("sft", help="stage whose model embeds the prompts (backend model)", choices=["base", "mid", "sft"])
    backend: str = opt("model", help="model: masked mean of the stage's hidden states; sentence_transformers: "
                       "a sentence encoder (pip install sentence-transformers)", choices=["model", "sentence_transformers"])
    st_model: str = opt("sentence-transformers/all-MiniLM-L6-v2",
                        help="sentence encoder: a Hugging Face name (offline: already in the HF cache and "
                             "HF_HUB_OFFLINE=1) or a local folder")
    batch_size: int = opt(32, help="prompts per forward pass", min=1)
    max_len: int = opt(0, help="tokens per prompt, >= 4 (0: the model's sequence_len); longer prompts keep <|bos|> "
                       "and their last max_len-1 tokens")
    data_dir: str = opt("", help="KAT data folder (default <kat cache>/data)")
    device_type: str = opt("", help="cpu|cuda|mps (default: autodetect)", choices=["", "cpu", "cuda", "mps"])


# -----------------------------------------------------------------------------
# Backend "model": masked mean of final hidden states

# Left out of the mean: <|bos|> and the <|user_start|> after it, whose states see only those two
# tokens (the same vector in every prompt), and every other chat-format token. Those start from the
# same embedding in every prompt and mostly say "a turn ends / a reply starts here"; a one-turn prompt
# has 4 of them (4 of 10 positions in a short question, 4 of 200 in a long one), so pooled in they
# would make short prompts alike (dense) for being short. Who said what still reaches the text
# positions through attention to the markers before them.
POOLED = "mean over the text tokens of the turns; <|bos|> and every chat-format special token left out"
# The shortest cut that still holds text: <|bos|>, the last text token, <|user_end|>, <|assistant_start|>.
MIN_MAX_LEN = 4


def chat_format_ids(tokenizer) -> set[int]:
    """Ids of the chat format's special tokens: positions holding one are never pooled."""
    return {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}


def prompt_tokens(tokenizer, prefix: dict, max_len: int) -> tuple[list[int], bool]:
    """(token ids as the chat model reads the prompt, whether it was cut to max_len)."""
    if max_len < MIN_MAX_LEN:
        raise ValueError(f"max_len must be >= {MIN_MAX_LEN} (<|bos|>, at least one text token, <|user_end|> "
                         f"and <|assistant_start|>), got {max_len}")
    # rendered up to <|assistant_start|>, exactly as the chat model reads it before answering; a long
    # prompt keeps <|bos|> and its LAST tokens: the latest turns and the closing question matter most
    ids = tokenizer.render_for_completion(prefix)
    return left_truncate(ids, max_len), len(ids) > max_len


def render_prompt(tokenizer, prompt: dict, max_len: int, where: Path) -> tuple[list[int], bool]:
    try:
        return prompt_tokens(tokenizer, prompt["prefix"], max_len)
    except (ValueError, KeyError) as e:
        raise SystemExit(f"{where}: prompt {prompt.get('id')!r} cannot be rendered as a chat prompt ({e}); "
                         "rebuild the file with python -m scripts.kat_pairs") from e


def embed_token_sequences(model, sequences: list[list[int]], batch_size: int, device, *, format_ids,
                          pad_id: int = 0) -> np.ndarray:
    """
    float32 [len(sequences), n_embd], unit rows: the mean of forward_hidden over each sequence's
    positions whose token is not in format_ids (chat_format_ids: the special tokens, <|bos|>
    included), i.e. over the text of the turns. Text tokens never take a special id (the tokenizer
    encodes text with encode_ordinary), so the test by id is exact. pad_id only fills the tensor.
    """
    format_set = set(format_ids)
    pooled = [[token not in format_set for token in seq] for seq in sequences]
    for i, (seq, mask) in enumerate(zip(sequences, pooled)):  # before any forward pass: the shortest come last
        if not any(mask):
            raise ValueError(f"sequence {i} holds no text token to pool (only chat-format tokens): {seq}")
    return masked_mean_embeddings(model, sequences, pooled, batch_size, device, pad_id=pad_id)


# -----------------------------------------------------------------------------
# Backend "sentence_transformers"

def conversation_text(prefix: dict) -> str:
    """The turns as plain text, most recent first (an encoder truncates from the end, dropping the oldest)."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in reversed(prefix["messages"]))


def load_sentence_encoder(name: str, device):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise SystemExit("--backend=sentence_transformers needs the sentence-transformers package: "
                         "pip install sentence-transformers (or use the default --backend=model)") from e
    try:
        return SentenceTransformer(name, device=str(device))
    except OSError as e:
        raise SystemExit(f"could not load the sentence encoder {name!r}: {e}\nWithout internet it must already be in "
                         f"the Hugging Face cache (then set HF_HUB_OFFLINE=1), or pass a local folder as --st_model") from e


# -----------------------------------------------------------------------------
# Sharding across ranks

def gather_rows(local: np.ndarray, n_rows: int, rank: int, world_size: int, device) -> np.ndarray:
    """
    Every rank holds rows rank, rank + world_size, ... of an [n_rows, D] array; every rank gets the
    whole array back. A padded all_gather of device tensors: NCCL moves tensors, not pickles.
    """
    if world_size == 1:
        return local
    per_rank = -(-n_rows // world_size)
    padded = torch.zeros((per_rank, local.shape[1]), dtype=torch.float32, device=device)
    padded[:len(local)] = torch.from_numpy(local).to(device)
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    full = np.empty((n_rows, local.shape[1]), dtype=np.float32)
    for r, part in enumerate(parts):
        count = len(range(r, n_rows, world_size))
        full[r::world_size] = part[:count].cpu().numpy()
    return full


def main(argv: list[str] | None = None):
    cfg = parse_flags(Config, argv)
    if cfg.batch_size < 1 or cfg.max_len < 0 or 0 < cfg.max_len < MIN_MAX_LEN:
        raise SystemExit(f"need --batch_size >= 1 and --max_len 0 or >= {MIN_MAX_LEN}, got {cfg.batch_size} and {cfg.max_len}")
    ddp, rank, _, world_size, device = compute_init(cfg.device_type or None)
    data = KatData(cfg.data_dir)
    prompts = data.prompts()
    if not prompts:
        raise SystemExit(f"{data.prompts_file} holds no prompts; run python -m scripts.kat_pairs first")
    ids = [p["id"] for p in prompts]

    t0 = time.time()
    details = {}
    if cfg.backend == "model":
        model, tokenizer, _ = load_model(cfg.source, device, phase="eval")
        max_len = cfg.max_len or model.config.sequence_len
        rendered = [render_prompt(tokenizer, p, max_len, data.prompts_file) for p in prompts]
        sequences = [seq for seq, _ in rendered]
        order = np.argsort([-len(seq) for seq in sequences], kind="stable")  # longest first: memory trouble shows at once
        mine = order[rank::world_size]  # dealt out round robin: every rank gets the same mix of lengths
        t_embed = time.time()
        local = embed_token_sequences(model, [sequences[i] for i in mine], cfg.batch_size, device,
                                      format_ids=chat_format_ids(tokenizer), pad_id=tokenizer.get_bos_token_id())
        dim = model.config.n_embd
        lengths = np.array([len(seq) for seq in sequences])
        details = {"checkpoint": str(find_stage_checkpoint(cfg.source)), "max_len": max_len, "pooled": POOLED,
                   "truncated": int(sum(cut for _, cut in rendered)), "tokens": int(lengths.sum()),
                   "median_tokens": float(np.median(lengths)), "max_tokens": int(lengths.max())}
    else:
        encoder = load_sentence_encoder(cfg.st_model, device)
        texts = [conversation_text(p["prefix"]) for p in prompts]
        order = np.argsort([-len(t) for t in texts], kind="stable")
        mine = order[rank::world_size]
        dim = encoder.get_sentence_embedding_dimension()
        t_embed = time.time()
        local = encoder.encode([texts[i] for i in mine], batch_size=cfg.batch_size, convert_to_numpy=True,
                               show_progress_bar=False).astype(np.float32).reshape(len(mine), dim)
        details = {"st_model": cfg.st_model, "max_len": encoder.max_seq_length}
    synchronize(device)
    sorted_rows = gather_rows(local, len(prompts), rank, world_size, device)
    seconds, embed_seconds = time.time() - t0, time.time() - t_embed
    if rank == 0:
        embeddings = np.empty_like(sorted_rows)
        embeddings[order] = sorted_rows
        data.save_embeddings(ids, embeddings)
        source = f"{cfg.source} model" if cfg.backend == "model" else cfg.st_model
        meta = {"backend": cfg.backend, "source": source, "n": len(ids), "dim": int(dim), "ranks": world_size,
                "seconds": seconds, "embed_seconds": embed_seconds, "flags": flags_dict(cfg), **details}
        atomic_write(data.embeddings_meta_file, json.dumps(meta, indent=2) + "\n")
        lines = [f"{len(ids)} prompts -> {dim}-d unit vectors from the {source} ({cfg.backend} backend) "
                 f"on {world_size} x {device.type} in {seconds:.1f}s, of which the embedding pass {embed_seconds:.1f}s "
                 f"({len(ids) / max(embed_seconds, 1e-9):.1f} prompts/s)"]
        if cfg.backend == "model":
            lines.append(f"tokens read per prompt: median {details['median_tokens']:.0f}, max {details['max_tokens']}, "
                         f"{details['tokens'] / max(embed_seconds, 1e-9):,.0f} tokens/s; "
                         f"{details['truncated']} prompts longer than {max_len} tokens kept <|bos|> and their last {max_len - 1}")
        write_stats_section(data.stats_file, "kat_embed", "\n".join(lines))
        report = {"Prompts": len(ids), "Embedding dim": int(dim), "Source": source, "Backend": cfg.backend,
                  "Ranks": world_size, "Time (s)": seconds, "Embedding pass (s)": embed_seconds}
        if cfg.backend == "model":
            report |= {"Checkpoint": details["checkpoint"], "Max tokens": max_len, "Truncated prompts": details["truncated"]}
        get_report().log(stage="kat_data", section="Prompt embeddings", data=[report])
        print0("\n".join(lines))
        print0(f"wrote {data.dir}/prompt_embeddings.npy, prompt_embeddings_ids.txt, {EMBEDDINGS_META_FILE}")
    if ddp:
        dist.barrier()
    compute_cleanup()


if __name__ == "__main__":
    main()
