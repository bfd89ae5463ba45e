"""
Bits per byte of the base model on the train and validation splits, plus a few greedy samples.

    python -m scripts.base_loss
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss -- --split_tokens=20971520
"""

from dataclasses import dataclass


from nanochat.checkpoint_manager import load_model
from nanochat.common import autocast_context, compute_cleanup, compute_init, print0
from nanochat.dataloader import DistributedTokenLoader
from nanochat.engine import Engine
from nanochat.flags import opt, parse_flags
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
]


@dataclass
class Config:
    """Evaluate a base checkpoint's bits per byte on train and val."""
    source: str = opt("base", help="stage name or checkpoint path")
    device_type: str = opt("", help="cuda|cpu|mps; empty autodetects")
    device_batch_size: int = opt(32, help="sequences per forward pass per device", min=1)
    split_tokens: int = opt(20 * 524288, help="tokens evaluated per split", min=1)
    identical_batches: bool = opt(False, help="every rank reads the whole split and takes every world_size-th window "
                                  "(base_train's flag): the same tokens at any world size, and a split with fewer "
                                  "row groups than ranks (the bundled sample's validation file has 2) still works")


def main(argv=None):
    cfg = parse_flags(Config, argv)
    ddp, rank, local_rank, world_size, device = compute_init(cfg.device_type or None)
    model, tokenizer, meta = load_model(cfg.source, device, phase="eval")
    seq_len = model.config.sequence_len
    tokens_per_step = cfg.device_batch_size * seq_len * world_size
    steps = max(1, cfg.split_tokens // tokens_per_step)
    token_bytes = get_token_bytes(device)
    autocast = autocast_context(device)

    results = {}
    for split in ("train", "val"):
        loader = DistributedTokenLoader(tokenizer, cfg.device_batch_size, seq_len, split, rank=rank,
                                        world_size=world_size, device=device, identical_batches=cfg.identical_batches)
        with autocast:
            results[f"{split} bpb"] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb: {results[f'{split} bpb']:.4f}")

    samples = []
    if rank == 0:
        bos = tokenizer.get_bos_token_id()
        with autocast:
            outs, _ = Engine(model, tokenizer).generate_batch(
                [tokenizer.encode(p, prepend=bos) for p in SAMPLE_PROMPTS], num_samples=1, max_tokens=16,
                temperature=0.0)
        for prompt, out in zip(SAMPLE_PROMPTS, outs):
            samples.append(prompt + tokenizer.decode(out[0]))
            print0(samples[-1])
    get_report().log(stage="base", section="Base model loss",
                     data=[{"Checkpoint": meta.get("stage", cfg.source), "Tokens per split": steps * tokens_per_step,
                            "Train bpb": results["train bpb"], "Validation bpb": results["val bpb"]},
                           "Samples:\n\n" + "\n".join(f"    {s!r}" for s in samples)])
    compute_cleanup()


if __name__ == "__main__":
    main()
