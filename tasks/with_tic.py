"""
A task with a stylistic tic planted in some of its conversations: the positive control's SFT
mixture (scripts/control_sft.py), kept out of the core SFT path.
"""

from nanochat.kat.style_injection import STYLES, inject_style, pair_rng
from tasks.common import Task


class WithTic(Task):
    """
    Another task with a stylistic tic planted in the assistant turns of a seeded fraction of its
    conversations (nanochat/kat/style_injection.py's rules: em dashes, "not just X, but Y").

    The positive control fine-tunes its starting policy on such a mixture so that the policy
    emits the tic at a small base rate, as real SFT models emit em dashes: GRPO can only
    reinforce what the policy samples. Which conversations carry it depends only on (seed, index),
    so every rank and every resume sees the same ones. A conversation with no prose that can carry
    the tic (code, arithmetic) stays as it is.
    """

    def __init__(self, task: Task, style: str, rate: float, seed: int = 0, **slicing):
        super().__init__(**slicing)
        if style not in STYLES:
            raise ValueError(f"WithTic: unknown style {style!r}; choose from {', '.join(STYLES)}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"WithTic: rate is the fraction of conversations to rewrite, in [0, 1]; got {rate}")
        self.task, self.style, self.rate, self.seed = task, style, rate, seed

    def num_examples(self) -> int:
        return len(self.task)

    def get_example(self, index: int) -> dict:
        conversation = self.task[index]
        rng = pair_rng(self.seed, f"with_tic:{index}")
        if rng.random() >= self.rate:
            return conversation

        def styled(text):
            result = inject_style(text, self.style, rng)
            return text if result is None else result[0]

        messages = []
        for message in conversation["messages"]:
            if message["role"] == "assistant":
                content = message["content"]
                if isinstance(content, str):
                    content = styled(content)
                else:  # parts: only the prose, never the tool calls or their outputs
                    content = [{**part, "text": styled(part["text"])} if part["type"] == "text" else part
                               for part in content]
                message = {**message, "content": content}
            messages.append(message)
        return {**conversation, "messages": messages}
