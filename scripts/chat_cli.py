"""
Chat with a trained stage in the terminal.

    python -m scripts.chat_cli                          # talk to outs/sft
    python -m scripts.chat_cli -i grpo_density          # any stage with a checkpoint (or a path to a .pt file)
    python -m scripts.chat_cli -i rl -p "Why is the sky blue?"    # one streamed reply, then exit

In the conversation, type `clear` to start over and `quit` (or Ctrl-D) to leave. Earlier turns
stay in the prompt, so the model sees the whole conversation.
"""

from dataclasses import dataclass

import torch

from nanochat.checkpoint_manager import load_model
from nanochat.common import autodetect_device_type
from nanochat.engine import Engine
from nanochat.flags import opt, parse_flags, short


@dataclass
class Config:
    """Chat with a trained stage in the terminal."""
    source: str = short("i", "sft", help="stage to load (base, mid, sft, rl, grpo_density, grpo_baseline) or a .pt path")
    prompt: str = short("p", "", help="one-shot prompt: print one streamed reply and exit")
    temperature: float = opt(0.6, help="sampling temperature (0 = greedy)", min=0)
    top_k: int = opt(50, help="sample among the k likeliest tokens (0 = no top-k)", min=0)
    top_p: float = opt(1.0, help="sample within the smallest set of tokens holding this much probability",
                       above=0, max=1)
    max_tokens: int = opt(512, help="longest reply, in tokens", min=1)
    seed: int = opt(42, help="turn t samples with seed+t: a run repeats, turns differ")
    device_type: str = opt("", help="cuda|cpu|mps (default: autodetect)", choices=["", "cuda", "cpu", "mps"])


def stream_reply(engine: Engine, prompt_ids: list[int], config: Config, turn: int) -> str:
    """Print the assistant's reply as it is generated; return its text."""
    room = engine.model.rotary_seq_len - len(prompt_ids)
    pieces = []
    for piece in engine.generate_stream(prompt_ids, max_tokens=min(config.max_tokens, room),
                                        temperature=config.temperature, top_k=config.top_k or None,
                                        top_p=config.top_p if config.top_p < 1.0 else None, seed=config.seed + turn):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print(flush=True)
    return "".join(pieces)


def main(argv=None):
    config = parse_flags(Config, argv)
    device = torch.device(config.device_type or autodetect_device_type())
    model, tokenizer, meta = load_model(config.source, device, phase="eval")
    engine = Engine(model, tokenizer)

    if config.prompt:
        prompt_ids = tokenizer.render_for_completion({"messages": [{"role": "user", "content": config.prompt}]})
        if len(prompt_ids) >= model.rotary_seq_len:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens, past the model's context of {model.rotary_seq_len}")
        stream_reply(engine, prompt_ids, config, turn=0)
        return

    print(f"nanochat: {meta['stage']} (step {meta['step']}) on {device}. "
          "Type 'clear' to start over, 'quit' to leave.", flush=True)
    messages, turn = [], 0
    while True:
        try:
            text = input("\nUser: ").strip()
        except EOFError:  # Ctrl-D, or the end of piped input
            print()
            return
        if text in ("quit", "exit"):
            return
        if text == "clear":
            messages = []
            print("(conversation cleared)", flush=True)
            continue
        if not text:
            continue
        prompt_ids = tokenizer.render_for_completion({"messages": messages + [{"role": "user", "content": text}]})
        if len(prompt_ids) >= model.rotary_seq_len:
            print(f"(the conversation would be {len(prompt_ids)} tokens, past the model's context of "
                  f"{model.rotary_seq_len}; type 'clear' to start over)", flush=True)
            continue
        print("\nAssistant: ", end="", flush=True)
        reply = stream_reply(engine, prompt_ids, config, turn)
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        turn += 1


if __name__ == "__main__":
    main()
