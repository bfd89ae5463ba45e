"""
Serve the chat models over HTTP: the web UI (nanochat/ui.html) and an OpenAI-compatible API.

    python -m scripts.chat_web                                     # every chat stage with a checkpoint
    python -m scripts.chat_web --models=grpo_density,grpo_baseline --port=8000

Then open http://<host>:8000/, or point any OpenAI client at http://<host>:8000/v1 (any api key).

    GET  /                      the chat UI
    POST /chat/completions      the UI's stream: `data: {"token": ..., "model": ...}` events, then `data: {"done": true, ...}`
    POST /v1/chat/completions   OpenAI chat completions, streamed (chat.completion.chunk ... [DONE]) or not
    GET  /v1/models             the loaded stages, as model ids
    GET  /health, GET /stats    liveness; requests served, tokens generated, each worker busy or idle, uptime
    GET  /viz                   the embedding map, once the KAT stage that draws it has run

Serving model: every loaded stage is replicated once per GPU (or once on the CPU); one device with
its models is a worker. Idle workers wait in an asyncio.Queue: a request takes one, generates in a
thread (so the event loop keeps answering other requests), streams its text back through an
asyncio.Queue, and returns the worker when the thread ends. Requests beyond the number of workers
wait in line for the next free one.
"""

import asyncio
import json
import logging
import math
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from nanochat.checkpoint_manager import find_stage_checkpoint, latest_checkpoint, load_model
from nanochat.common import REPO_ROOT, autodetect_device_type, setup_logging, stage_dir
from nanochat.engine import Engine, utf8_pieces
from nanochat.flags import opt, parse_flags
from nanochat.kat.data import KatData

log = logging.getLogger(__name__)

UI_PATH = REPO_ROOT / "nanochat" / "ui.html"
VIZ_PATH = REPO_ROOT / "nanochat" / "viz.html"
EMBEDDING_MAP_STAGE = "python -m nanochat.kat.embedding_map (after scripts.kat_embed)"  # writes .cache/data/embedding_map.json

# Stages one can chat with, in the order they are offered (the first one found is the default model).
# rm is left out: it is a reward model with a scalar head, not a generator.
CHAT_STAGES = ("sft", "rl", "grpo_density", "grpo_baseline", "mid", "base")

# What one request may ask for. Past these it is refused with a 400 naming the limit.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (0, 200)  # 0 = no top-k filtering
MAX_TOKENS_RANGE = (1, 4096)


@dataclass
class Config:
    """Serve the chat models: web UI plus an OpenAI-compatible API."""
    models: str = opt("", help="comma-separated stages to load (default: every chat stage with a checkpoint)")
    host: str = opt("0.0.0.0", help="interface to listen on (127.0.0.1 keeps it local to this machine)")
    port: int = opt(8000, help="port to listen on", min=0, max=65535)
    device_type: str = opt("", help="cuda|cpu|mps (default: autodetect)", choices=["", "cuda", "cpu", "mps"])
    num_gpus: int = opt(0, help="GPUs to serve from, one replica of every model each (0 = all visible)", min=0)
    temperature: float = opt(0.8, help="sampling temperature for requests that do not set one", min=0)
    top_k: int = opt(50, help="top-k for requests that do not set one (0 = no top-k)", min=0)
    max_tokens: int = opt(512, help="reply length limit for requests that do not set one", min=1)


# -----------------------------------------------------------------------------
# Requests: parsing and limits

class RequestError(Exception):
    """A request we refuse; answered as an OpenAI-style JSON error with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    temperature: float
    top_k: int | None
    top_p: float | None
    max_tokens: int
    seed: int
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default, kind, bounds):
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python, but "temperature": true is a client bug worth naming; Python's json
    # also reads NaN and Infinity, which no range admits
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (kind is int and value != int(value))):
        raise RequestError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, got {json.dumps(value)}", name)
    low, high = bounds
    if not low <= value <= high:
        raise RequestError(400, f"{name} must be between {low} and {high}, got {value}", name)
    return kind(value)


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(400, f"at most {MAX_MESSAGES} messages per request, got {len(messages)}", "messages")
    total = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RequestError(400, f"messages[{i}] must be an object with a string content", f"messages[{i}]")
        role, content = message.get("role"), message["content"]
        if role not in ("user", "assistant") and not (role == "system" and i == 0):
            raise RequestError(400, f"messages[{i}] has role {json.dumps(role)}: roles are user and assistant "
                                    "(a system message is allowed first)", f"messages[{i}].role")
        if len(content) > MAX_MESSAGE_CHARS:
            raise RequestError(400, f"messages[{i}] has {len(content)} characters; the limit is {MAX_MESSAGE_CHARS}",
                               f"messages[{i}].content")
        total += len(content)
    if total > MAX_TOTAL_CHARS:
        raise RequestError(400, f"the messages hold {total} characters in all; the limit is {MAX_TOTAL_CHARS}", "messages")
    if messages[-1]["role"] != "user":
        raise RequestError(400, "the last message must be from the user (it is what the model replies to)", "messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_chat_request(body, models: list[str], defaults: Config) -> ChatRequest:
    """Validate a chat request body (UI or OpenAI form) against the limits and the loaded models."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model") or models[0]
    if model not in models:
        raise RequestError(404, f"model {json.dumps(model)} is not loaded; available models: {', '.join(models)}",
                           "model", code="model_not_found")
    if body.get("n") not in (None, 1):
        raise RequestError(400, "n must be 1: ask once per sample (a fresh seed gives a fresh reply)", "n")
    # newer OpenAI clients send max_completion_tokens, older ones max_tokens
    length_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    top_k = _number(body, "top_k", defaults.top_k, int, TOP_K_RANGE)
    top_p = _number(body, "top_p", 1.0, float, (0.0, 1.0))
    if top_p == 0.0:
        raise RequestError(400, "top_p must be in (0, 1]; use temperature 0 for greedy decoding", "top_p")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"stream must be true or false, got {json.dumps(stream)}", "stream")
    stream_options = body.get("stream_options") or {}
    return ChatRequest(
        model=model,
        messages=_check_messages(body.get("messages")),
        temperature=_number(body, "temperature", defaults.temperature, float, TEMPERATURE_RANGE),
        top_k=top_k or None,
        top_p=top_p if top_p < 1.0 else None,
        max_tokens=_number(body, length_key, defaults.max_tokens, int, MAX_TOKENS_RANGE),
        seed=_number(body, "seed", secrets.randbits(62), int, (-(2 ** 63), 2 ** 63 - 1)),
        stream=stream,
        include_usage=isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
    )


# -----------------------------------------------------------------------------
# Workers: one device with a replica of every served model

@dataclass
class Worker:
    index: int
    device: str
    engines: dict  # stage -> Engine
    busy: bool = False
    model: str | None = None  # the stage generating right now
    requests: int = 0
    tokens: int = 0


def find_chat_stages() -> list[str]:
    """The chat stages that have a checkpoint under outs/, in CHAT_STAGES order."""
    return [stage for stage in CHAT_STAGES if latest_checkpoint(stage_dir(stage)) is not None]


def load_workers(stages: list[str], device_type: str, num_gpus: int = 0) -> list[Worker]:
    if not stages:
        raise FileNotFoundError(f"no chat model to serve: none of {', '.join(CHAT_STAGES)} has a checkpoint under "
                                f"{stage_dir('sft').parent}; train one (e.g. python -m scripts.chat_sft) or pass --models")
    if device_type == "cuda":
        visible = torch.cuda.device_count()
        if num_gpus > visible:
            raise ValueError(f"--num_gpus={num_gpus} but only {visible} GPUs are visible")
        devices = [f"cuda:{i}" for i in range(num_gpus or visible)]
    else:
        devices = [device_type]  # one replica: a second on the same CPU would only split its cores
    workers = []
    for index, device in enumerate(devices):
        engines = {}
        for stage in stages:
            model, tokenizer, _ = load_model(stage, device, phase="eval")
            engines[stage] = Engine(model, tokenizer)
            log.info("worker %d: loaded %s on %s", index, stage, device)
        workers.append(Worker(index, device, engines))
    return workers


# -----------------------------------------------------------------------------
# Generation: a worker's thread produces, the event loop streams

_END = object()


@dataclass
class Reply:
    """What a finished generation reports besides its text."""
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "length" when max_tokens ran out first


def reply_pieces(engine: Engine, prompt_ids: list[int], request: ChatRequest, max_tokens: int, reply: Reply):
    """Yield the reply's text in whole UTF-8 characters, counting generated tokens into `reply`."""
    def counted(stream):
        for token, _ in stream:
            reply.completion_tokens += 1
            yield token
    stream = engine.stream_tokens(prompt_ids, max_tokens, request.temperature, request.top_k, request.top_p,
                                  request.seed)
    yield from utf8_pieces(engine.tokenizer, counted(stream))
    if reply.completion_tokens == max_tokens:  # stream_tokens yields max_tokens only when no stop came
        reply.finish_reason = "length"


@dataclass
class ServerStats:
    started: float = field(default_factory=time.time)
    requests_served: int = 0
    requests_rejected: int = 0
    requests_failed: int = 0
    requests_waiting: int = 0
    tokens_generated: int = 0


class ChatService:
    def __init__(self, workers: list[Worker], defaults: Config):
        self.workers = workers
        self.defaults = defaults
        self.models = list(workers[0].engines)
        first_engine = workers[0].engines[self.models[0]]
        self.tokenizer = first_engine.tokenizer  # every stage shares the run's tokenizer
        self.context = {stage: engine.model.rotary_seq_len for stage, engine in workers[0].engines.items()}
        self.created = {stage: int(find_stage_checkpoint(stage).stat().st_mtime) for stage in self.models}
        self.stats = ServerStats()
        self.executor = ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="generate")
        self.idle: asyncio.Queue | None = None  # made inside the server's event loop

    def start(self):
        self.idle = asyncio.Queue()
        for worker in self.workers:
            self.idle.put_nowait(worker)

    def prepare(self, request: ChatRequest) -> tuple[list[int], int]:
        """The prompt's token ids and the reply budget that fits the model's context."""
        try:
            prompt_ids = self.tokenizer.render_for_completion({"messages": request.messages})
        except ValueError as e:  # e.g. turns that do not alternate user/assistant
            raise RequestError(400, f"messages: {e}", "messages") from e
        room = self.context[request.model] - len(prompt_ids)
        if room < 1:
            raise RequestError(400, f"the conversation is {len(prompt_ids)} tokens, more than model {request.model}'s "
                                    f"context of {self.context[request.model]}; start a new conversation", "messages",
                               code="context_length_exceeded")
        return prompt_ids, min(request.max_tokens, room)

    async def generate(self, request: ChatRequest, prompt_ids: list[int], max_tokens: int, reply: Reply):
        """Async iterator over the reply's text pieces; waits for an idle worker first."""
        loop = asyncio.get_running_loop()
        self.stats.requests_waiting += 1
        try:
            worker = await self.idle.get()
        finally:
            self.stats.requests_waiting -= 1
        worker.busy, worker.model = True, request.model
        pieces: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()  # set when the client goes away: stop generating for nobody

        def produce():
            # kernels launch on the worker's GPU, whatever device this pool thread last used
            on_device = torch.cuda.device(worker.device) if worker.device.startswith("cuda") else nullcontext()
            try:
                with on_device:
                    engine = worker.engines[request.model]
                    for text in reply_pieces(engine, prompt_ids, request, max_tokens, reply):
                        if cancelled.is_set():
                            break
                        loop.call_soon_threadsafe(pieces.put_nowait, text)
            finally:
                loop.call_soon_threadsafe(pieces.put_nowait, _END)

        def release(future):
            worker.busy, worker.model = False, None
            worker.requests += 1
            worker.tokens += reply.completion_tokens
            self.stats.tokens_generated += reply.completion_tokens
            self.idle.put_nowait(worker)  # only now: the thread is done with this worker's models

        done = loop.run_in_executor(self.executor, produce)
        done.add_done_callback(release)
        try:
            while (item := await pieces.get()) is not _END:
                yield item
            await done  # raises the thread's exception, if it had one
            self.stats.requests_served += 1
        finally:
            cancelled.set()

    def stats_dict(self) -> dict:
        s = self.stats
        return {
            "uptime_s": round(time.time() - s.started, 1),
            "models": self.models,
            "requests_served": s.requests_served,
            "requests_rejected": s.requests_rejected,
            "requests_failed": s.requests_failed,
            "requests_waiting": s.requests_waiting,
            "tokens_generated": s.tokens_generated,
            "workers": [{"index": w.index, "device": w.device, "status": "busy" if w.busy else "idle", "model": w.model,
                         "requests": w.requests, "tokens": w.tokens} for w in self.workers],
        }


# -----------------------------------------------------------------------------
# The app

def _sse(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


def create_app(workers: list[Worker], defaults: Config | None = None):
    """The FastAPI app serving these workers (fastapi is imported here: `import nanochat` never needs it)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

    service = ChatService(workers, defaults or Config())

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        service.executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="nanochat", lifespan=lifespan)
    app.state.service = service
    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream

    @app.exception_handler(RequestError)
    async def refuse(request: Request, error: RequestError):
        service.stats.requests_rejected += 1
        log.info("refused %s %s (%d): %s", request.method, request.url.path, error.status, error.message)
        return JSONResponse(error.body(), status_code=error.status)

    async def accept(request: Request) -> tuple[ChatRequest, list[int], int]:
        """(chat request, prompt ids, max_tokens), or a RequestError answered by refuse()."""
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
        chat = parse_chat_request(body, service.models, service.defaults)
        return (chat, *service.prepare(chat))

    def failure(e: Exception) -> dict:
        service.stats.requests_failed += 1
        log.exception("generation failed")
        return {"message": f"generation failed: {type(e).__name__}: {e}", "type": "server_error", "param": None,
                "code": "generation_failed"}

    @app.get("/")
    async def ui():
        return FileResponse(UI_PATH, media_type="text/html")

    @app.get("/health")
    async def health():
        d = service.defaults  # the UI shows what a request gets when it sets nothing
        return {"status": "ok", "models": service.models, "workers": len(service.workers),
                "defaults": {"temperature": d.temperature, "top_k": d.top_k, "max_tokens": d.max_tokens}}

    @app.get("/stats")
    async def stats():
        return service.stats_dict()

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": service.created[m], "owned_by": "nanochat"}
                                           for m in service.models]}

    @app.post("/chat/completions")
    async def ui_completion(request: Request):
        chat, prompt_ids, max_tokens = await accept(request)

        async def events():
            reply = Reply(prompt_tokens=len(prompt_ids))
            try:
                async for text in service.generate(chat, prompt_ids, max_tokens, reply):
                    yield _sse({"token": text, "model": chat.model})
            except Exception as e:  # the status line is sent already: report it in the stream
                yield _sse({"error": failure(e)["message"]})
                return
            yield _sse({"done": True, "model": chat.model, "finish_reason": reply.finish_reason,
                        "completion_tokens": reply.completion_tokens})

        return StreamingResponse(events(), media_type="text/event-stream", headers=sse_headers)

    @app.post("/v1/chat/completions")
    async def openai_completion(request: Request):
        chat, prompt_ids, max_tokens = await accept(request)
        reply = Reply(prompt_tokens=len(prompt_ids))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": chat.model}

        def usage():
            return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                    "total_tokens": reply.prompt_tokens + reply.completion_tokens}

        if not chat.stream:
            try:
                text = "".join([piece async for piece in service.generate(chat, prompt_ids, max_tokens, reply)])
            except Exception as e:
                return JSONResponse({"error": failure(e)}, status_code=500)
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reply.finish_reason}
            return {**head, "object": "chat.completion", "choices": [choice], "usage": usage()}

        def chunk(delta, finish_reason=None):
            return _sse({**head, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for text in service.generate(chat, prompt_ids, max_tokens, reply):
                    yield chunk({"content": text})
            except Exception as e:
                yield _sse({"error": failure(e)})
                return
            yield chunk({}, reply.finish_reason)
            if chat.include_usage:
                yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=sse_headers)

    # Hook for the embedding-map page: nanochat/viz.html, drawing the JSON it fetches from /viz/embedding_map.json.
    def embedding_map():
        path = KatData().map_file
        if not path.exists():
            raise RequestError(404, f"no embedding map yet: {path} is written by {EMBEDDING_MAP_STAGE}; run it, then reload",
                               code="not_found")
        return path

    @app.get("/viz")
    async def viz_page():
        embedding_map()
        return FileResponse(VIZ_PATH, media_type="text/html")

    @app.get("/viz/embedding_map.json")
    async def viz_data():
        return FileResponse(embedding_map(), media_type="application/json")

    return app


def main():
    import uvicorn

    setup_logging()
    config = parse_flags(Config)
    device_type = config.device_type or autodetect_device_type()
    stages = [s for s in config.models.split(",") if s] if config.models else find_chat_stages()
    workers = load_workers(stages, device_type, config.num_gpus)
    app = create_app(workers, config)
    log.info("serving %s on %d worker(s) at http://%s:%d/ (OpenAI API under /v1)", ", ".join(stages), len(workers),
             config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")


if __name__ == "__main__":
    main()
