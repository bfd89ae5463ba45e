"""
The byte-level BPE tokenizer: trained with rustbpe (fast, Rust), run with tiktoken (fast, threaded).

    python -m scripts.tok_train          # learns it and writes $NANOCHAT_BASE_DIR/tok/
    tokenizer = get_tokenizer(); ids = tokenizer.encode("hello", prepend=tokenizer.get_bos_token_id())

rustbpe only learns the merges; the learned ranks are loaded into a tiktoken Encoding for all
encoding and decoding, so training and inference share one vocabulary but not one code path.
The special tokens take the ids right after the merges: the vocabulary is exactly the requested size.

Chat format (nanochat's):
    <|bos|> <|user_start|> ... <|user_end|> <|assistant_start|> ... <|assistant_end|> ...
Assistant turns may call the Python tool, <|python_start|> code <|python_end|>, followed by the
tool's result <|output_start|> output <|output_end|>: the interpreter writes it, the model is never trained to.
"""

import base64
import json
from pathlib import Path

import tiktoken
import torch

from nanochat.common import get_base_dir

# GPT-4's split pattern with numbers chunked in 1-2 digits instead of 1-3: fewer number tokens,
# which leaves more of a small vocabulary for words.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document and every conversation
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the Python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, written back into the conversation
]

# The files of a tokenizer directory ($NANOCHAT_BASE_DIR/tok):
CONFIG_FILE = "tokenizer_config.json"  # split pattern, vocab size, special tokens (name -> id)
RANKS_FILE = "tokenizer.tiktoken"  # tiktoken's rank format: base64(token bytes) <space> rank, one per line
VOCAB_FILE = "vocab.txt"  # human-readable: id, token, and for merged tokens the pair it came from
# LongTensor[vocab]: UTF-8 byte length of each token, 0 for special tokens, so a loss can be turned
# into bits per byte independent of the vocabulary
TOKEN_BYTES_FILE = "token_bytes.pt"
NUM_BYTE_TOKENS = 256
ASSISTANT_PART_TYPES = ("text", "python", "python_output")


def train_bpe(text_iterator, vocab_size: int, pattern: str = SPLIT_PATTERN, buffer_size: int = 8192):
    """
    Learn merges with rustbpe so that bytes + merges + special tokens == vocab_size.
    Returns the trained rustbpe.Tokenizer (its own encoder is what tests compare tiktoken against).
    """
    import rustbpe

    num_mergeable = vocab_size - len(SPECIAL_TOKENS)  # the 256 byte tokens plus the merges
    if num_mergeable < NUM_BYTE_TOKENS:
        raise ValueError(f"vocab_size={vocab_size} is too small: it must hold {NUM_BYTE_TOKENS} byte tokens "
                         f"and {len(SPECIAL_TOKENS)} special tokens (at least {NUM_BYTE_TOKENS + len(SPECIAL_TOKENS)})")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(text_iterator, num_mergeable, buffer_size=buffer_size, pattern=pattern)
    learned = len(trainer.get_mergeable_ranks())
    if learned != num_mergeable:
        raise ValueError(f"rustbpe learned {learned - NUM_BYTE_TOKENS} merges but {num_mergeable - NUM_BYTE_TOKENS} "
                         f"were needed for vocab_size={vocab_size}: the training text is too small or too repetitive; "
                         f"give more text or lower --vocab_size")
    return trainer


class Tokenizer:
    """A tiktoken Encoding over learned BPE ranks, plus the chat format."""

    def __init__(self, pattern: str, mergeable_ranks: dict[bytes, int]):
        _check_ranks(mergeable_ranks, source="mergeable ranks")
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        first_special = len(mergeable_ranks)
        self.special_tokens = {name: first_special + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)

    # -- construction and persistence -----------------------------------------------------------

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size: int, pattern: str = SPLIT_PATTERN) -> "Tokenizer":
        trainer = train_bpe(text_iterator, vocab_size, pattern=pattern)
        return cls(trainer.get_pattern(), {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()})

    @classmethod
    def from_directory(cls, tok_dir) -> "Tokenizer":
        tok_dir = Path(tok_dir)
        config_path, ranks_path = tok_dir / CONFIG_FILE, tok_dir / RANKS_FILE
        for path in (config_path, ranks_path):
            if not path.exists():
                raise FileNotFoundError(f"tokenizer file {path} is missing; train one with `python -m scripts.tok_train`")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        tokenizer = cls(config["pattern"], _read_ranks(ranks_path))
        if tokenizer.special_tokens != config["special_tokens"] or tokenizer.get_vocab_size() != config["vocab_size"]:
            raise ValueError(f"{config_path} disagrees with {ranks_path}: config says vocab_size={config['vocab_size']} "
                             f"and special tokens {config['special_tokens']}, the ranks give {tokenizer.get_vocab_size()} "
                             f"and {tokenizer.special_tokens}; retrain with `python -m scripts.tok_train`")
        return tokenizer

    def save(self, tok_dir):
        tok_dir = Path(tok_dir)
        tok_dir.mkdir(parents=True, exist_ok=True)
        config = {"pattern": self.pattern, "vocab_size": self.get_vocab_size(),
                  "num_merges": len(self.mergeable_ranks) - NUM_BYTE_TOKENS, "special_tokens": self.special_tokens}
        (tok_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda item: item[1])
        (tok_dir / RANKS_FILE).write_bytes(b"".join(base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
                                                    for token, rank in by_rank))
        (tok_dir / VOCAB_FILE).write_text(self._vocab_listing(), encoding="utf-8")
        torch.save(self.token_byte_lengths(), tok_dir / TOKEN_BYTES_FILE)

    # -- plain text ------------------------------------------------------------------------------

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> set[str]:
        return set(self.special_tokens)

    def get_bos_token_id(self) -> int:
        return self.special_tokens["<|bos|>"]

    def encode_special(self, name: str) -> int:
        if name not in self.special_tokens:
            raise KeyError(f"{name!r} is not a special token; known: {', '.join(SPECIAL_TOKENS)}")
        return self.special_tokens[name]

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """
        str -> list[int]; list[str] -> list[list[int]] (encoded in parallel threads).
        Special-token strings inside the text are encoded as ordinary text, so user data can never
        inject control tokens. prepend/append: a token id or a special-token name such as "<|bos|>".
        """
        prefix = [self._as_id(prepend)] if prepend is not None else []
        suffix = [self._as_id(append)] if append is not None else []
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text) + suffix
        if isinstance(text, list):
            return [prefix + ids + suffix for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids) -> str:
        return self.enc.decode(ids.tolist() if isinstance(ids, torch.Tensor) else list(ids))

    def id_to_token(self, token_id: int) -> str:
        return self.enc.decode([token_id])

    def token_byte_lengths(self) -> torch.Tensor:
        """Byte length of each token from its raw bytes (0 for special tokens, which stand for no text)."""
        lengths = torch.zeros(self.get_vocab_size(), dtype=torch.long)
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return lengths

    def _as_id(self, token) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def _vocab_listing(self) -> str:
        """One line per id: id, the token (repr of its text, or of its bytes when not valid UTF-8),
        and for merged tokens the two lower-ranked tokens it was merged from."""
        lines = []
        for token, rank in sorted(self.mergeable_ranks.items(), key=lambda item: item[1]):
            line = f"{rank}\t{_show_token(token)}"
            if rank >= NUM_BYTE_TOKENS:
                parts = _bpe_split(self.mergeable_ranks, token, max_rank=rank)
                if len(parts) == 2:
                    line += f"\t= {_show_token(parts[0])} + {_show_token(parts[1])}"
            lines.append(line)
        lines += [f"{token_id}\t{name}\t(special)" for name, token_id in self.special_tokens.items()]
        return "\n".join(lines) + "\n"

    # -- chat --------------------------------------------------------------------------------------

    def render_conversation(self, conversation, max_tokens: int = 2048):
        """
        Tokenize a conversation for supervised training. Returns (ids, mask): mask is 1 exactly on
        the tokens the assistant must learn to produce (its text, its tool calls including
        <|python_start|>/<|python_end|>, and <|assistant_end|>) and 0 elsewhere (bos, user turns,
        <|assistant_start|>, tool output including <|output_start|>/<|output_end|>).
        Both are truncated to max_tokens.
        """
        ids, mask = self._render_messages(_validated_messages(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation) -> list[int]:
        """
        The prompt the model continues: the conversation up to and including <|assistant_start|>.
        A trailing assistant turn is dropped first (so a finished conversation can be re-sampled);
        after that the conversation must end with a user turn. The prompt is never truncated:
        cutting its end would cut the very question being asked.
        """
        messages = _validated_messages(conversation)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # validation guarantees a user turn before it
        ids, _ = self._render_messages(messages)
        return ids + [self.special_tokens["<|assistant_start|>"]]

    def _render_messages(self, messages):
        ids, mask = [], []

        def add(tokens, trained: int):
            tokens = [self.special_tokens[tokens]] if isinstance(tokens, str) else tokens
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        add("<|bos|>", 0)
        if messages[0]["role"] == "system":
            # nanochat has no system turn: the system prompt is prepended to the first user message.
            system, first_user = messages[0], messages[1]
            messages = [{"role": "user", "content": system["content"] + "\n\n" + first_user["content"]}] + messages[2:]
        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                add("<|user_start|>", 0)
                add(self.enc.encode_ordinary(content), 0)
                add("<|user_end|>", 0)
                continue
            add("<|assistant_start|>", 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                part_ids = self.enc.encode_ordinary(part["text"])
                if part["type"] == "text":
                    add(part_ids, 1)
                elif part["type"] == "python":
                    add("<|python_start|>", 1)
                    add(part_ids, 1)
                    add("<|python_end|>", 1)
                else:  # python_output: produced by the interpreter, not by the model
                    add("<|output_start|>", 0)
                    add(part_ids, 0)
                    add("<|output_end|>", 0)
            add("<|assistant_end|>", 1)
        return ids, mask


# -- conversation validation ------------------------------------------------------------------------

def _validated_messages(conversation) -> list[dict]:
    """The conversation's messages, after checking the shape render_* relies on; ValueError otherwise."""
    if not isinstance(conversation, dict) or "messages" not in conversation:
        raise ValueError(f'a conversation must be a dict with a "messages" list, got {type(conversation).__name__}'
                         + (f" with keys {sorted(conversation)}" if isinstance(conversation, dict) else ""))
    messages = conversation["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError('conversation["messages"] must be a non-empty list')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f'message {i} must be a dict with "role" and "content", got {message!r:.200}')
        role, content = message["role"], message["content"]
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i}: a system message is only allowed first")
            if len(messages) < 2:
                raise ValueError("message 0: a system message must be followed by a user message")
        elif role not in ("user", "assistant"):
            raise ValueError(f"message {i}: unknown role {role!r} (expected system, user or assistant)")
        expected = "user" if (i - (messages[0]["role"] == "system")) % 2 == 0 else "assistant"
        if role != "system" and role != expected:
            raise ValueError(f"message {i}: expected {'a user' if expected == 'user' else 'an assistant'} turn, got {role} "
                             "(turns must alternate user/assistant, starting with user)")
        if role == "assistant" and isinstance(content, list):
            _check_assistant_parts(content, i)
        elif not isinstance(content, str):
            allowed = "a string or a list of parts" if role == "assistant" else "a string"
            raise ValueError(f"message {i}: {role} content must be {allowed}, got {type(content).__name__}")
    return messages


def _check_assistant_parts(parts: list, message_index: int):
    for j, part in enumerate(parts):
        where = f"message {message_index}, part {j}"
        if not isinstance(part, dict) or "type" not in part or "text" not in part:
            raise ValueError(f'{where}: an assistant part must be a dict with "type" and "text", got {part!r:.200}')
        if part["type"] not in ASSISTANT_PART_TYPES:
            raise ValueError(f"{where}: unknown part type {part['type']!r} (expected one of {', '.join(ASSISTANT_PART_TYPES)})")
        if not isinstance(part["text"], str):
            raise ValueError(f"{where}: part text must be a string, got {type(part['text']).__name__}")


# -- files and ranks -----------------------------------------------------------------------------------

def _check_ranks(mergeable_ranks: dict[bytes, int], source: str):
    """tiktoken needs ranks 0..n-1 with each single byte among them, or encoding can fail on some input."""
    ranks = sorted(mergeable_ranks.values())
    if ranks != list(range(len(ranks))):
        raise ValueError(f"{source}: ranks must be exactly 0..{len(ranks) - 1} with no gaps or repeats")
    missing = [b for b in range(NUM_BYTE_TOKENS) if bytes([b]) not in mergeable_ranks]
    if missing:
        raise ValueError(f"{source}: {len(missing)} single-byte tokens are missing (e.g. byte {missing[0]}), "
                         "so some text could not be encoded")


def _read_ranks(path: Path) -> dict[bytes, int]:
    # Parsed here rather than with tiktoken.load.load_tiktoken_bpe, which caches files by path in a temp
    # directory: re-saving a tokenizer to the same path would then load the stale copy.
    ranks = {}
    for line_number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line:
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except ValueError as err:
            raise ValueError(f"{path}:{line_number}: expected 'base64-token rank', got {line[:100]!r} ({err})") from None
    _check_ranks(ranks, source=str(path))
    return ranks


def _bpe_split(mergeable_ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair encode `token` using only merges ranked below max_rank: for a learned token this
    stops one merge short of it, revealing the pair it was made from."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_index = None, None
        for i in range(len(parts) - 1):
            rank = mergeable_ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best_rank, best_index = rank, i
        if best_index is None:
            break
        parts[best_index:best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


def _show_token(token: bytes) -> str:
    try:
        return repr(token.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(token)


# -- the run's tokenizer ---------------------------------------------------------------------------------

def get_tokenizer_dir() -> Path:
    return get_base_dir() / "tok"


def get_tokenizer() -> Tokenizer:
    """The tokenizer trained by scripts.tok_train, from $NANOCHAT_BASE_DIR/tok."""
    return Tokenizer.from_directory(get_tokenizer_dir())


def get_token_bytes(device="cpu") -> torch.Tensor:
    """LongTensor[vocab]: bytes per token (0 for special tokens), for bits-per-byte evaluation."""
    path = get_tokenizer_dir() / TOKEN_BYTES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; train the tokenizer with `python -m scripts.tok_train`")
    return torch.load(path, map_location=device, weights_only=True)
