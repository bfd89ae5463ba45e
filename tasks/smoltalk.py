"""
SmolTalk: general chat conversations, the bulk of midtraining and SFT data.
https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk (the "smol" cut suits small models;
about 460K train and 24K test rows). Each row has `messages`: an optional system message, then
user and assistant turns alternating, starting with the user.
"""

from tasks.common import HubSplit, RowsTask, check_chat_messages


class SmolTalk(RowsTask):
    def __init__(self, split: str, rows=None, **slicing):
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train or test, got {split!r}")
        self.split = split
        super().__init__(HubSplit("HuggingFaceTB/smol-smoltalk", None, split, f"smoltalk_{split}"), rows, **slicing)

    def row_to_conversation(self, row: dict) -> dict:
        messages = row["messages"]
        check_chat_messages(messages, "messages")
        return {"messages": messages}
