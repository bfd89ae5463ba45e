"""
Load test of scripts/chat_web.py: random stages served from every visible GPU (or the CPU),
N concurrent streaming requests. Checks that every streamed reply is exactly the engine's own
reply for its model and seed, that requests spread over the workers, and that /health answers
quickly under load; reports generated tokens per second across the server.

    python -m dev.bench_chat_web                           # d12 on CUDA (every GPU), d1 on CPU
    python -m dev.bench_chat_web --depth=20 --requests=128 --max_tokens=256

Random weights (throughput does not depend on their values) and a byte-level tokenizer, so it
runs before any training; lm_head rows of non-printable bytes and special tokens are zeroed so
replies are readable text that rarely stops early.
"""

import asyncio
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import autodetect_device_type, stage_dir
from nanochat.flags import opt, parse_flags
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer, get_tokenizer_dir
from scripts.chat_web import Config as ServerConfig
from scripts.chat_web import create_app, load_workers
from tests.chat_fixtures import serve

STAGES = ("sft", "grpo_density")


@dataclass
class Config:
    device_type: str = opt("", help="cuda|cpu (empty: autodetect)")
    depth: int = opt(-1, help="model depth (-1: 12 on CUDA, 1 elsewhere)")
    requests: int = opt(64, help="concurrent streaming requests")
    max_tokens: int = opt(128, help="tokens per reply")


def save_random_stages(depth: int, device):
    tokenizer = Tokenizer(SPLIT_PATTERN, {bytes([b]): b for b in range(256)})
    tokenizer.save(get_tokenizer_dir())
    vocab = tokenizer.get_vocab_size()
    for seed, stage in enumerate(STAGES):
        torch.manual_seed(seed)
        model = GPT(config_from_depth(depth, vocab, 2048)).to(device)
        model.init_weights()
        model.randomize_outputs(lm_head_std=0.5)
        with torch.no_grad():
            printable = torch.zeros(vocab, dtype=torch.bool)
            printable[32:127] = True
            model.lm_head.weight[~printable.to(device)] = 0.0
        save_checkpoint(stage_dir(stage), 1, model, [], final=True, meta={"model_config": asdict(model.config)})


async def load(url, bodies, health_latencies):
    async def stream(http, body):
        text, done = "", None
        async with http.stream("POST", "/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    text += event.get("token", "")
                    done = event if event.get("done") else done
        return text, done

    async def poll_health(http, stop):
        while not stop.is_set():
            started = time.perf_counter()
            (await http.get("/health")).raise_for_status()
            health_latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=len(bodies) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_health(http, stop))
        results = await asyncio.gather(*(stream(http, body) for body in bodies))
        stop.set()
        await poller
        return results


def main():
    cfg = parse_flags(Config)
    device_type = cfg.device_type or autodetect_device_type()
    depth = cfg.depth if cfg.depth > 0 else (12 if device_type == "cuda" else 1)
    root = Path(tempfile.mkdtemp(prefix="bench_chat_web_"))
    os.environ.update(NANOCHAT_BASE_DIR=str(root / "base"), NANOCHAT_OUTS_DIR=str(root / "outs"))
    save_random_stages(depth, device_type)
    workers, unavailable = load_workers(list(STAGES), device_type)
    if unavailable:  # the stages were saved a moment ago: each must load
        raise RuntimeError(f"stages failed to load: {unavailable}")
    engines = workers[0].engines

    bodies = [{"model": STAGES[i % 2], "messages": [{"role": "user", "content": f"question number {i}"}],
               "temperature": 1.0, "top_k": 50, "seed": i, "max_tokens": cfg.max_tokens} for i in range(cfg.requests)]
    want = []
    for body in bodies:  # what the engine itself streams for each request, on worker 0's device
        e = engines[body["model"]]
        prompt = e.tokenizer.render_for_completion({"messages": body["messages"]})
        want.append("".join(e.generate_stream(prompt, max_tokens=cfg.max_tokens, temperature=1.0, top_k=50,
                                              seed=body["seed"])))

    with serve(create_app(workers, ServerConfig())) as url:
        health_latencies = []
        started = time.perf_counter()
        results = asyncio.run(load(url, bodies, health_latencies))
        elapsed = time.perf_counter() - started
        stats = httpx.get(url + "/stats").json()

    tokens = sum(done["completion_tokens"] for _, done in results)
    mismatches = [i for i, ((text, _), expected) in enumerate(zip(results, want)) if text != expected]
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if device_type == "cuda" else ["cpu"]
    print(f"devices: {names} | d{depth}, {sum(p.numel() for p in engines[STAGES[0]].model.parameters()):,} params per model")
    print(f"{cfg.requests} concurrent streams x {cfg.max_tokens} max tokens: {tokens:,} tokens in {elapsed:.2f}s "
          f"= {tokens / elapsed:,.0f} generated tok/s across {len(workers)} worker(s)")
    print("requests per worker: " + ", ".join(f"{w['device']}: {w['requests']}" for w in stats["workers"]))
    print(f"/health under load: {len(health_latencies)} polls, max {max(health_latencies) * 1000:.0f} ms, "
          f"median {sorted(health_latencies)[len(health_latencies) // 2] * 1000:.0f} ms")
    print(f"replies equal to the engine's own: {cfg.requests - len(mismatches)}/{cfg.requests}"
          + (f" (differ: {mismatches[:10]})" if mismatches else ""))
    if mismatches or stats["requests_served"] != cfg.requests:
        raise SystemExit("FAILED: see above")


if __name__ == "__main__":
    main()
