"""
Shared by the chat tests (CLI, web server, browser UI): a tiny tokenizer and tiny random GPTs saved
as stages through the checkpoint manager, an in-process server on a free port or the server as a
user starts it, and the replies the engine gives directly, to compare what the front ends show against.
"""

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict

import httpx
import torch

from nanochat.checkpoint_manager import load_model, save_checkpoint
from nanochat.common import REPO_ROOT, stage_dir
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir
from tests.http_fixtures import free_port

# "a" * 8000 is in the training text, so runs of "a" merge up to 4096-character tokens and the
# limit-sized messages below stay a few tokens long: boundary requests are cheap to answer.
TRAINING_TEXT = ["the cat sat on the mat. the dog sat on the log. hello there, how are you? " * 40, "a" * 8192]
SEQUENCE_LEN = 256  # the context is 10x this (the rotary table), room for 500 short messages
CHAT_STAGE_SEEDS = {"sft": 0, "grpo_density": 1, "grpo_baseline": 2}


def random_gpt(tokenizer: Tokenizer, seed: int) -> GPT:
    """Random weights everywhere (the real init zeroes output projections and would make every
    stage say the same thing). Only short printable-ASCII tokens keep their lm_head rows; the rest
    (special tokens, control bytes, long runs of "a") get zero rows and are rarely sampled, so
    replies neither end at once nor fill with thousands of "a"s, and read as text."""
    vocab_size = tokenizer.get_vocab_size()
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=SEQUENCE_LEN, vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.size(-1)))
        model.lm_head.weight.mul_(4.0)
        readable = [rank for token, rank in tokenizer.mergeable_ranks.items()
                    if len(token) <= 4 and all(32 <= b < 127 for b in token)]
        keep = torch.zeros(vocab_size, dtype=torch.bool)
        keep[readable] = True
        model.lm_head.weight[~keep] = 0.0
    return model


def make_chat_stages(stages=CHAT_STAGE_SEEDS) -> Tokenizer:
    """Train the tiny tokenizer into $NANOCHAT_BASE_DIR/tok and save one random GPT per stage
    under $NANOCHAT_OUTS_DIR, as a training script would."""
    tokenizer = Tokenizer.train_from_iterator(iter(TRAINING_TEXT), 256 + 32 + 9)
    tokenizer.save(get_tokenizer_dir())
    for stage, seed in stages.items():
        model = random_gpt(tokenizer, seed)
        save_checkpoint(stage_dir(stage), 10, model, [], final=True,
                        meta={"model_config": asdict(model.config), "init_from": "random"})
    return tokenizer


def save_silent_stage(stage: str, tokenizer: Tokenizer):
    """A stage whose every reply ends at once: its blocks are zeroed (the identity) and every token
    embeds to the same vector, so the hidden state is constant and lm_head's <|assistant_end|> row wins."""
    model = GPT(GPTConfig(sequence_len=SEQUENCE_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2,
                          n_kv_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.transformer.h.parameters():
            p.zero_()
        model.transformer.wte.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.encode_special("<|assistant_end|>")] = 1.0  # logit 32 before the softcap
    save_checkpoint(stage_dir(stage), 1, model, [], final=True, meta={"model_config": asdict(model.config)})


_engines = {}


def stage_engine(stage: str) -> Engine:
    key = (stage, str(stage_dir(stage)))  # each test module has its own outs dir
    if key not in _engines:
        model, tokenizer, _ = load_model(stage, "cpu")
        _engines[key] = Engine(model, tokenizer)
    return _engines[key]


def engine_reply(stage: str, messages: list[dict], max_tokens: int, temperature=0.0, top_k=None, seed=42):
    """(text, completion token count) straight from the engine: what a front end must show."""
    engine = stage_engine(stage)
    tokenizer = engine.tokenizer
    prompt = tokenizer.render_for_completion({"messages": messages})
    (tokens,), _ = engine.generate_batch([prompt], max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed)
    return tokenizer.decode(tokens[0]), len(tokens[0])


@contextmanager
def serve(app):
    """Run the app with uvicorn in a thread on 127.0.0.1 and a free port; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start (see the log above)")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def running_chat_web(log_path, *flags, env=None, api_key=None):
    """`python -m scripts.chat_web *flags` on a free port, run as a user runs it; yields its loopback URL
    once /health answers (sent with api_key, when the server has one). Stopped with SIGINT."""
    port = free_port()  # free right now; the server binds it a moment later
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", f"--port={port}", *flags],
                                  cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        try:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, f"chat_web exited early:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, f"chat_web never answered /health:\n{log_path.read_text()}"
                try:
                    if httpx.get(url + "/health", headers=headers, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:  # not listening yet
                    time.sleep(0.2)
            yield url
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)
    assert "Traceback" not in log_path.read_text(), log_path.read_text()
