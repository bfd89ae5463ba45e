"""
Rollout throughput of the engine: generated tokens per second for P prompts x S samples x N new
tokens, the shape GRPO uses (SPEC section 7: 8 x 16 x 256 at d20 on one H100; nanochat's Oct 2025
engine did 1.1k tok/s, ours must do >= 11k).

    python -m dev.bench_engine                   # d20 on CUDA, a tiny model on CPU
    python -m dev.bench_engine --depth=4 --vocab_size=4096

Random weights (timing does not depend on their values) and a synthetic tokenizer of the same
vocabulary size, so it runs before any training. Tokens counted are the ones actually returned
(a row that samples a stop token ends early and is counted only up to there).
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nanochat.checkpoint_manager import build_model
from nanochat.common import autodetect_device_type, peak_memory_gb, synchronize
from nanochat.engine import Engine
from nanochat.flags import opt, parse_flags
from nanochat.gpt import config_from_depth
from nanochat.tokenizer import NUM_BYTE_TOKENS, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

REFERENCE_TOK_PER_S = 1100  # nanochat's Oct 2025 engine, same shape, 1xH100


@dataclass
class Config:
    device_type: str = opt("", help="cuda|cpu|mps (empty: autodetect)")
    depth: int = opt(-1, help="model depth (-1: 20 on CUDA, 2 elsewhere)")
    vocab_size: int = opt(-1, help="vocabulary size (-1: 65536 on CUDA, 1024 elsewhere)")
    num_prompts: int = opt(8, help="prompts per request")
    num_samples: int = opt(16, help="samples per prompt")
    max_tokens: int = opt(256, help="new tokens per sample")
    min_prompt_len: int = opt(32, help="shortest prompt (lengths spread evenly up to max_prompt_len)")
    max_prompt_len: int = opt(160, help="longest prompt")
    temperature: float = opt(1.0, help="sampling temperature")
    top_k: int = opt(50, help="top-k filter (0: off)")
    repeats: int = opt(3, help="timed runs; the median is reported")
    check: bool = opt(True, help="first check that CUDA-graph decoding returns exactly the eager tokens")
    time_eager: bool = opt(True, help="also time one run without CUDA graphs")
    dump_greedy: str = opt("", help="write the greedy (temperature 0) tokens of the first 4 prompts x 2 samples "
                                    "x 64 tokens to this JSON file, to compare two versions of the engine")
    compare_greedy: str = opt("", help="a --dump_greedy file of another version: print where this one first differs")
    profile: bool = opt(False, help="print the top CUDA kernels of one timed run")


def synthetic_tokenizer(vocab_size):
    """Byte tokens, then filler multi-byte tokens, then the special tokens: the right ids and size."""
    filler = vocab_size - NUM_BYTE_TOKENS - len(SPECIAL_TOKENS)
    ranks = {bytes([b]): b for b in range(NUM_BYTE_TOKENS)}
    ranks.update({b"\xf0" + i.to_bytes(3, "big"): NUM_BYTE_TOKENS + i for i in range(filler)})
    return Tokenizer(SPLIT_PATTERN, ranks)


def random_model(depth, vocab_size, device):
    torch.manual_seed(0)
    model = build_model(asdict(config_from_depth(depth, vocab_size, 2048)), device)
    model.randomize_outputs()  # real attention/MLP work and varied samples
    return model.eval()


def main():
    cfg = parse_flags(Config)
    device = torch.device(cfg.device_type or autodetect_device_type())
    on_cuda = device.type == "cuda"
    depth = cfg.depth if cfg.depth > 0 else (20 if on_cuda else 2)
    vocab_size = cfg.vocab_size if cfg.vocab_size > 0 else (65536 if on_cuda else 1024)
    if on_cuda:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    model = random_model(depth, vocab_size, device)
    engine = Engine(model, synthetic_tokenizer(vocab_size))

    g = torch.Generator().manual_seed(0)
    lengths = torch.linspace(cfg.min_prompt_len, cfg.max_prompt_len, cfg.num_prompts).round().long().tolist()
    prompts = [torch.randint(0, NUM_BYTE_TOKENS, (n,), generator=g).tolist() for n in lengths]
    kwargs = dict(num_samples=cfg.num_samples, temperature=cfg.temperature, top_k=cfg.top_k or None)

    if cfg.check and on_cuda:
        small = dict(kwargs, num_samples=4, max_tokens=64, seed=5)
        graphed, _ = engine.generate_batch(prompts[:4], **small)
        again, _ = engine.generate_batch(prompts[:4], **small)
        eager, _ = Engine(model, engine.tokenizer, cuda_graphs=False).generate_batch(prompts[:4], **small)
        flat = lambda results: [sample for samples in results for sample in samples]
        first_diff = [next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(flat(graphed), flat(eager))]
        print(f"check: seeded CUDA-graph runs identical: {graphed == again}; graph vs eager: first differing "
              f"position per sample (None = identical; bf16 kernels may differ under capture): {first_diff}")

    def timed_runs(eng, repeats):
        eng.generate_batch(prompts, max_tokens=cfg.max_tokens, seed=99, **kwargs)  # warm-up at full shape
        times, counts = [], []
        for r in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            results, _ = eng.generate_batch(prompts, max_tokens=cfg.max_tokens, seed=r, **kwargs)
            synchronize(device)
            times.append(time.perf_counter() - t0)
            counts.append(sum(len(sample) for samples in results for sample in samples))
        mid = sorted(range(repeats), key=lambda i: times[i])[repeats // 2]
        return times, counts, counts[mid] / times[mid]

    if cfg.dump_greedy or cfg.compare_greedy:
        greedy, _ = engine.generate_batch(prompts[:4], num_samples=2, max_tokens=64, temperature=0.0)
        if cfg.dump_greedy:
            Path(cfg.dump_greedy).write_text(json.dumps(greedy))
        if cfg.compare_greedy:
            other = json.loads(Path(cfg.compare_greedy).read_text())
            flat = lambda results: [sample for samples in results for sample in samples]
            first_diff = [next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
                          for a, b in zip(flat(greedy), flat(other))]
            print(f"greedy vs {cfg.compare_greedy}: first differing position per sample (None = identical): {first_diff}")

    times, counts, tok_per_s = timed_runs(engine, cfg.repeats)
    name = torch.cuda.get_device_name(device) if on_cuda else device.type
    print(f"device: {name} | d{depth}, {model.num_params():,} params, vocab {vocab_size:,}")
    print(f"shape: {cfg.num_prompts} prompts ({min(lengths)}-{max(lengths)} tokens) x {cfg.num_samples} samples "
          f"x {cfg.max_tokens} new tokens, temperature {cfg.temperature}, top_k {cfg.top_k}")
    print("runs: " + ", ".join(f"{c:,} tok in {t:.2f}s" for c, t in zip(counts, times)))
    print(f"generated tok/s (median of {cfg.repeats}): {tok_per_s:,.0f}   reference (nanochat Oct 2025, d20, 1xH100): "
          f"{REFERENCE_TOK_PER_S:,}   target: >= 11,000")
    print(f"peak memory: {peak_memory_gb(device):.1f} GB")
    if cfg.profile and on_cuda:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.generate_batch(prompts, max_tokens=cfg.max_tokens, seed=0, **kwargs)
            synchronize(device)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    if cfg.time_eager and on_cuda:
        _, _, eager_tok_per_s = timed_runs(Engine(model, engine.tokenizer, cuda_graphs=False), 1)
        print(f"without CUDA graphs: {eager_tok_per_s:,.0f} tok/s")


if __name__ == "__main__":
    main()
