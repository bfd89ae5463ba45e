"""
Train the BPE tokenizer on the pretraining text and save it to $NANOCHAT_BASE_DIR/tok.

    python -m scripts.tok_train                       # 2B characters, vocab 65,536 (the speedrun)
    python -m scripts.tok_train --max_chars=20000000 --vocab_size=4096   # a quick small one

Documents are capped at --doc_cap characters so a few very long pages cannot dominate the
merge statistics, and training stops after --max_chars characters in total.
"""

import time
from dataclasses import dataclass

from nanochat.common import progress_bar
from nanochat.dataset import parquets_iter_batched
from nanochat.flags import opt, parse_flags, flags_dict
from nanochat.report import get_report
from nanochat.tokenizer import NUM_BYTE_TOKENS, SPECIAL_TOKENS, Tokenizer, get_tokenizer_dir


@dataclass
class Config:
    """Train the BPE tokenizer and save it to $NANOCHAT_BASE_DIR/tok."""
    max_chars: int = opt(2_000_000_000, help="stop after this many characters of training text", min=1)
    doc_cap: int = opt(10_000, help="use at most this many characters of each document", min=1)
    vocab_size: int = opt(65536, help="total vocabulary: 256 bytes + merges + 9 special tokens",
                          min=NUM_BYTE_TOKENS + len(SPECIAL_TOKENS))


config = parse_flags(Config)
print(f"tokenizer training: {flags_dict(config)}")

chars_used = 0
docs_used = 0


def training_text():
    global chars_used, docs_used
    with progress_bar(total=config.max_chars, desc="tokenizer training text", unit="char", unit_scale=True) as bar:
        for batch in parquets_iter_batched(split="train"):
            for document in batch:
                document = document[:config.doc_cap]
                chars_used += len(document)
                docs_used += 1
                bar.update(len(document))
                yield document
                if chars_used >= config.max_chars:
                    return


t0 = time.perf_counter()
tokenizer = Tokenizer.train_from_iterator(training_text(), config.vocab_size)
train_time = time.perf_counter() - t0
print(f"trained on {chars_used:,} characters from {docs_used:,} documents in {train_time:.2f}s "
      f"({chars_used / train_time / 1e6:.1f}M chars/s)")

tok_dir = get_tokenizer_dir()
t0 = time.perf_counter()
tokenizer.save(tok_dir)
print(f"saved to {tok_dir} in {time.perf_counter() - t0:.2f}s")

# Reload from disk and check the round trip, so a broken save fails here and not in pretraining.
reloaded = Tokenizer.from_directory(tok_dir)
probe = "Hello world! Numbers 12345, symbols <|bos|> ≠ ∑, code `x += 1`, 한국어, emoji 🤖\n\n  indented"
if reloaded.decode(reloaded.encode(probe)) != probe or reloaded.encode(probe) != tokenizer.encode(probe):
    raise RuntimeError(f"the tokenizer saved in {tok_dir} does not round-trip the probe text; do not use it")

token_bytes = reloaded.token_byte_lengths()
real = token_bytes[token_bytes > 0].float()
stats = {
    "chars trained on": chars_used,
    "documents": docs_used,
    "train time (s)": round(train_time, 2),
    "vocab size": reloaded.get_vocab_size(),
    "merges": reloaded.get_vocab_size() - 256 - len(reloaded.get_special_tokens()),
    "special tokens": len(reloaded.get_special_tokens()),
    "token bytes min": int(real.min()),
    "token bytes max": int(real.max()),
    "token bytes mean": round(real.mean().item(), 3),
    "token bytes std": round(real.std().item(), 3),
}
for key, value in stats.items():
    print(f"  {key}: {value}")
get_report().log(stage="tok", section="Tokenizer training", data=[flags_dict(config), stats])
