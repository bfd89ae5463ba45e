"""
Conversations from a JSONL file: each line is a JSON list of {"role", "content"} messages, user
first, alternating, ending on the assistant. nanochat's identity conversations (who the model is,
who made it) use this format; midtraining and SFT mix them in so the model can say what it is.
"""

from pathlib import Path

from nanochat.common import print0
from tasks.common import RowCheck, Task, check_chat_messages, read_jsonl, resolve_data_file

IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"
IDENTITY_FILENAME = "identity_conversations.jsonl"


class CustomJSON(Task):
    def __init__(self, filepath, **slicing):
        super().__init__(**slicing)
        self.filepath = Path(filepath)
        if not self.filepath.exists():
            raise FileNotFoundError(f"CustomJSON: no file {self.filepath}; each line must be a JSON list of "
                                    f'{{"role", "content"}} messages (see tasks/samples/identity_conversations.jsonl)')
        check = RowCheck("CustomJSON", check_conversation)
        self.conversations = [messages for line_number, messages in enumerate(read_jsonl(self.filepath), 1)
                              if check.accepts(messages, f"{self.filepath}: conversation {line_number}")]
        summary = check.finish()  # a few bad conversations are skipped and counted, most bad is an error
        if summary:
            print0(summary)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return {"messages": self.conversations[index]}


def check_conversation(messages):
    if not isinstance(messages, list):
        raise ValueError("must be a JSON list of messages")
    check_chat_messages(messages, "messages")


def identity_conversations_path() -> Path:
    """$NANOCHAT_BASE_DIR/identity_conversations.jsonl, downloaded if missing (bundled sample offline)."""
    return resolve_data_file(IDENTITY_FILENAME, IDENTITY_URL, IDENTITY_FILENAME)


class IdentityConversations(CustomJSON):
    def __init__(self, **slicing):
        super().__init__(identity_conversations_path(), **slicing)
