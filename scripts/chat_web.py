"""
Serve the chat models over HTTP: the web UI (nanochat/ui.html) and an OpenAI-compatible API.

    python -m scripts.chat_web                                     # every chat stage with a checkpoint, on 127.0.0.1
    NANOCHAT_API_KEY=<secret> python -m scripts.chat_web --host=0.0.0.0 --models=grpo_density,grpo_baseline
Then open http://localhost:8000/, or point any OpenAI client at http://localhost:8000/v1 (api_key = the key, if set).

    GET  /                      the chat UI (asks for the key when the server has one)
    POST /chat/completions      the UI's stream: `data: {"token": ..., "model": ...}` events, then `data: {"done": true, ...}`
    POST /v1/chat/completions   OpenAI chat completions, streamed (chat.completion.chunk ... [DONE]) or not
    GET  /v1/models             the loaded stages, as model ids
    GET  /health, GET /stats    liveness, defaults and stages that failed to load; requests, tokens, workers, uptime
    GET  /viz                   the embedding map (its data only from a loopback server or with the key)
    GET  /docs, /openapi.json   the API's contract: request bodies, limits and error responses
"""

import asyncio
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from nanochat.checkpoint_manager import find_stage_checkpoint, load_model
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
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)

API_KEY_ENV = "NANOCHAT_API_KEY"  # read when --api_key is not given (a flag shows in `ps` to every user)


@dataclass
class Config:
    """Serve the chat models: web UI plus an OpenAI-compatible API."""
    models: str = opt("", help="comma-separated stages to load (default: every chat stage with a checkpoint)")
    host: str = opt("127.0.0.1", help="interface to listen on (0.0.0.0 = every interface: set an API key first)")
    port: int = opt(8000, help="port to listen on", min=0, max=65535)
    api_key: str = opt("", help=f"require 'Authorization: Bearer <key>' on the API (default: ${API_KEY_ENV}; empty = open)")
    max_body_bytes: int = opt(1 << 20, help="largest request body accepted (413 past it); the largest valid chat is ~0.4 MB",
                              min=1)
    device_type: str = opt("", help="cuda|cpu|mps (default: autodetect)", choices=["", "cuda", "cpu", "mps"])
    num_gpus: int = opt(0, help="GPUs to serve from, one replica of every model each (0 = all visible)", min=0)
    temperature: float = opt(0.8, help="sampling temperature for requests that do not set one", min=0)
    top_k: int = opt(50, help="top-k for requests that do not set one (0 = no top-k)", min=0)
    max_tokens: int = opt(512, help="reply length limit for requests that do not set one", min=1)


# -----------------------------------------------------------------------------
# Requests: parsing and limits

class RequestError(Exception):
    """A request we refuse; answered as an OpenAI-style JSON error with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

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


def _shown(value) -> str:
    """A client's value in an error message: short JSON for a scalar, only the kind of a container
    (dumping one would recurse as deep as the client nested it)."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(body: dict, name: str, default, kind, bounds):
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python, but "temperature": true is a client bug worth naming; Python's json
    # also reads NaN and Infinity, which no range admits
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (kind is int and value != int(value))):
        raise RequestError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, got {_shown(value)}", name)
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
            raise RequestError(400, f"messages[{i}] has role {_shown(role)}: roles are user and assistant "
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


def parse_chat_request(body, models: list[str], defaults: Config, unavailable: dict | None = None) -> ChatRequest:
    """Validate a chat request body (UI or OpenAI form) against the limits and the loaded models
    (`unavailable`: stage -> why it failed to load, named when a request asks for it)."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    model = models[0] if model is None else model
    if model not in models:
        reason = (unavailable or {}).get(model) if isinstance(model, str) else None
        failed = f" (it failed to load: {reason})" if reason else ""
        raise RequestError(404, f"model {_shown(model)} is not loaded{failed}; available models: {', '.join(models)}",
                           "model", code="model_not_found")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError(400, "n must be 1: ask once per sample (a fresh seed gives a fresh reply)", "n")
    # newer OpenAI clients send max_completion_tokens, older ones max_tokens; each is checked when sent
    max_tokens = _number(body, "max_tokens", defaults.max_tokens, int, MAX_TOKENS_RANGE)
    max_tokens = _number(body, "max_completion_tokens", max_tokens, int, MAX_TOKENS_RANGE)
    top_k = _number(body, "top_k", defaults.top_k, int, TOP_K_RANGE)
    top_p = _number(body, "top_p", 1.0, float, (0.0, 1.0))
    if top_p == 0.0:
        raise RequestError(400, "top_p must be in (0, 1]; use temperature 0 for greedy decoding", "top_p")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"stream must be true or false, got {_shown(stream)}", "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise RequestError(400, f"stream_options must be an object, got {_shown(stream_options)}", "stream_options")
    include_usage = (stream_options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise RequestError(400, f"stream_options.include_usage must be true or false, got {_shown(include_usage)}",
                           "stream_options.include_usage")
    return ChatRequest(
        model=model,
        messages=_check_messages(body.get("messages")),
        temperature=_number(body, "temperature", defaults.temperature, float, TEMPERATURE_RANGE),
        top_k=top_k or None,
        top_p=top_p if top_p < 1.0 else None,
        max_tokens=max_tokens,
        seed=_number(body, "seed", secrets.randbits(62), int, SEED_RANGE),
        stream=stream,
        include_usage=bool(include_usage),
    )


def chat_request_schema(models: list[str]):
    """The pydantic model of a chat request body, for the OpenAPI schema: the per-field limits that
    parse_chat_request enforces (it stays the validator, for its messages; tests keep the two agreeing)."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"] = Field(description="system only as the first message")
        content: str = Field(max_length=MAX_MESSAGE_CHARS)

    class StreamOptions(BaseModel):
        include_usage: bool | None = Field(None, description="end the stream with a chunk holding the token counts")

    class ChatCompletionRequest(BaseModel):
        model_config = ConfigDict(json_schema_extra={"description": (
            "A conversation to continue. Beyond each field's limits: user and assistant turns alternate, the last "
            f"is the user's, the messages hold at most {MAX_TOTAL_CHARS:,} characters in all, and the prompt must fit "
            "the model's context.")})
        model: Literal[tuple(models)] | None = Field(None, description=f"default: {models[0]}")
        messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
        temperature: float | None = Field(None, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])
        top_k: int | None = Field(None, ge=TOP_K_RANGE[0], le=TOP_K_RANGE[1], description="0 = no top-k")
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        max_tokens: int | None = Field(None, ge=MAX_TOKENS_RANGE[0], le=MAX_TOKENS_RANGE[1])
        max_completion_tokens: int | None = Field(None, ge=MAX_TOKENS_RANGE[0], le=MAX_TOKENS_RANGE[1],
                                                  description="wins over max_tokens")
        n: Literal[1] | None = None
        seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="default: a random one")
        stream: bool = Field(False, description="/v1/chat/completions only; /chat/completions always streams")
        stream_options: StreamOptions | None = None

    return ChatCompletionRequest


# -----------------------------------------------------------------------------
# Workers: one device with a replica of every served model (every loaded stage once per GPU, or once on the CPU)

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
    """The chat stages with a checkpoint file under outs/, in CHAT_STAGES order, each GRPO arm followed by its
    further seeds' runs (grpo_density_s1, ...) and the shuffled arm's; whether each loads is load_workers' call."""
    outs = stage_dir("sft").parent
    grpo_runs = sorted(p.name for p in outs.glob("grpo_*") if re.fullmatch(r"grpo_(density|baseline|shuffled)(_s\d+)?", p.name))
    stages = []
    for stage in CHAT_STAGES:
        stages += [stage] + ([run for run in grpo_runs if run.startswith(stage + "_s")] if stage.startswith("grpo_") else [])
    stages += [run for run in grpo_runs if run.startswith("grpo_shuffled")]
    return [stage for stage in stages if any(stage_dir(stage).glob("ckpt*.pt"))]


# what a missing, truncated, foreign or mis-shaped checkpoint raises from load_model
CHECKPOINT_ERRORS = (OSError, RuntimeError, KeyError, TypeError, ValueError)


def load_workers(stages: list[str], device_type: str, num_gpus: int = 0) -> tuple[list[Worker], dict[str, str]]:
    """One worker per device holding an Engine for every stage, and {stage: why it could not be loaded}:
    a broken checkpoint takes out its own stage, not the server (which fails only when none loads)."""
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
    engines = [{} for _ in devices]  # per device: stage -> Engine
    unavailable = {}
    for stage in stages:
        try:
            replicas = [Engine(*load_model(stage, device, phase="eval")[:2]) for device in devices]
        except CHECKPOINT_ERRORS as e:
            unavailable[stage] = f"{type(e).__name__}: {e}"
            log.warning("stage %s is unavailable, serving the others: %s", stage, unavailable[stage])
            continue
        for device_engines, engine in zip(engines, replicas):
            device_engines[stage] = engine
        log.info("loaded %s on %s", stage, ", ".join(devices))
    if not engines[0]:
        reasons = "\n".join(f"  {stage}: {why}" for stage, why in unavailable.items())
        raise RuntimeError(f"no chat model could be loaded:\n{reasons}")
    return [Worker(index, device, engines[index]) for index, device in enumerate(devices)], unavailable


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
    def __init__(self, workers: list[Worker], defaults: Config, unavailable: dict[str, str]):
        self.workers = workers
        self.defaults = defaults
        self.unavailable = unavailable  # stage -> why it failed to load
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
            # Idle workers wait in a queue: a request takes one, generates in a thread (the event loop keeps
            # answering other requests), streams its text back through `pieces` and returns the worker when the
            # thread ends. Requests beyond the number of workers wait here for the next free one.
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


def is_loopback(host: str) -> bool:
    """Whether a --host value or a Host header's name (port stripped) names only this machine."""
    name = host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # another name: it may resolve anywhere
        return False


def host_header_name(header: str) -> str:
    """The name in a Host header: "[::1]:8000" -> "[::1]", "localhost:8000" -> "localhost"."""
    return header[:header.index("]") + 1] if header.startswith("[") and "]" in header else header.rsplit(":", 1)[0]


def create_app(workers: list[Worker], config: Config | None = None, unavailable: dict[str, str] | None = None):
    """The FastAPI app serving these workers (fastapi is imported here: `import nanochat` never needs it);
    `unavailable` lists the stages that failed to load, with the reason, for /health and 404s."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, Request, Security
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel

    config = config or Config()
    service = ChatService(workers, config, unavailable or {})
    local = is_loopback(config.host)  # bound to loopback: only this machine's clients (and pages) reach it

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        service.executor.shutdown(wait=True, cancel_futures=True)

    async def host_is_local(request: Request):
        # a web page can point its own domain at 127.0.0.1 (DNS rebinding) and then read this server as
        # same-origin; its requests still carry that domain in Host, so a loopback server refuses them
        if local and not is_loopback(host_header_name(request.headers.get("host", ""))):
            raise RequestError(400, f"Host {_shown(request.headers.get('host', ''))} is not this machine: a server bound "
                                    f"to {config.host} answers only localhost, 127.0.0.1 and [::1] (set --host to serve "
                                    "other names)", code="invalid_host")

    app = FastAPI(title="nanochat", summary="nanochat's chat models: web UI and OpenAI-compatible API",
                  lifespan=lifespan, dependencies=[Depends(host_is_local)])
    app.state.service = service
    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream

    class EventStream(StreamingResponse):
        media_type = "text/event-stream"

    # -- the contract, as the OpenAPI schema states it

    class ErrorDetail(BaseModel):
        message: str
        type: str
        param: str | None
        code: str | None

    class ErrorBody(BaseModel):
        error: ErrorDetail

    def error_response(description: str) -> dict:
        # every error is JSON, also on the HTML pages' routes, so the media type is spelled out
        return {"description": description,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}

    no_map = error_response("no embedding map yet (the message names the stage that writes it)")
    host_errors = {400: error_response("a Host that is not this machine (the server is bound to loopback)")} if local else {}
    api_errors = dict(host_errors)  # and those of the routes behind the key, when there is one
    protected = []  # the API routes' dependencies: the key check, when there is a key
    if config.api_key:
        bearer = HTTPBearer(auto_error=False, scheme_name="api_key",
                            description=f"the server's --api_key (or ${API_KEY_ENV}), as OpenAI clients send it")

        async def authorised(credentials: HTTPAuthorizationCredentials | None = Security(bearer)):
            if credentials is None:
                raise RequestError(401, "this server needs an API key: send 'Authorization: Bearer <key>' (OpenAI "
                                        "clients: api_key=<key>)", code="missing_api_key",
                                   headers={"WWW-Authenticate": "Bearer"})
            if not secrets.compare_digest(credentials.credentials.encode(), config.api_key.encode()):
                raise RequestError(401, "the API key is not the one this server was started with", code="invalid_api_key",
                                   headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

        protected = [Security(authorised)]
        api_errors[401] = error_response("no API key, or not the server's (send 'Authorization: Bearer <key>')")
    chat_errors = {**api_errors,
                   400: error_response("malformed or too deeply nested JSON, a request past a documented limit (the "
                                       "message names which)" + (", or a Host that is not this machine" if local else "")),
                   404: error_response("the model is not loaded (the message lists those that are)"),
                   413: error_response(f"the body is larger than the server's --max_body_bytes ({config.max_body_bytes:,})"),
                   415: error_response("the body is not sent as Content-Type: application/json")}

    def event_schema(data: str) -> dict:
        # before OpenAPI 3.2 (itemSchema), an event stream's schema describes one event
        return {"schema": {"type": "object", "required": ["data"],
                           "properties": {"data": {"type": "string", "description": data}}}}

    request_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}}

    def openapi():
        # the chat routes read their body themselves (for their own error messages) and errors are plain
        # JSONResponses, so FastAPI sees neither model: add both, with the models they refer to
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (chat_request_schema(service.models), ErrorBody):
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
        return app.openapi_schema

    app.openapi = openapi

    # -- reading a request

    @app.exception_handler(RequestError)
    async def refuse(request: Request, error: RequestError):
        service.stats.requests_rejected += 1
        log.info("refused %s %s (%d): %s", request.method, request.url.path, error.status, error.message)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def read_body(request: Request) -> bytes:
        """The body, refused with a 413 as soon as it passes the limit (never buffered whole first)."""
        limit = config.max_body_bytes
        too_large = RequestError(413, f"the request body is larger than this server's limit of {limit:,} bytes "
                                      "(--max_body_bytes)", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def accept(request: Request) -> tuple[ChatRequest, list[int], int]:
        """(chat request, prompt ids, max_tokens), or a RequestError answered by refuse()."""
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise RequestError(415, f"send the body as JSON with 'Content-Type: application/json' (got "
                                    f"{_shown(content_type) if content_type else 'no Content-Type'})",
                               code="unsupported_media_type")
        raw = await read_body(request)
        try:
            body = json.loads(raw)
        except RecursionError as e:  # Python's parser recurses once per nesting level
            raise RequestError(400, "the request body is nested too deeply to parse; a chat request nests 3 levels",
                               code="invalid_json") from e
        except ValueError as e:  # bad JSON or UTF-8, or an integer past Python's 4300-digit limit
            raise RequestError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
        chat = parse_chat_request(body, service.models, service.defaults, service.unavailable)
        return (chat, *service.prepare(chat))

    def failure(e: Exception) -> dict:
        service.stats.requests_failed += 1
        log.exception("generation failed")
        return {"message": f"generation failed: {type(e).__name__}: {e}", "type": "server_error", "param": None,
                "code": "generation_failed"}

    # -- pages (served without the key: the UI asks for it) and status

    @app.get("/", response_class=HTMLResponse, responses=host_errors)
    async def ui():
        return FileResponse(UI_PATH, media_type="text/html")

    @app.get("/health", dependencies=protected, responses=api_errors)
    async def health():
        d = service.defaults  # the UI shows what a request gets when it sets nothing
        return {"status": "ok", "models": service.models, "unavailable": service.unavailable,
                "workers": len(service.workers),
                "defaults": {"temperature": d.temperature, "top_k": d.top_k, "max_tokens": d.max_tokens}}

    @app.get("/stats", dependencies=protected, responses=api_errors)
    async def stats():
        return service.stats_dict()

    @app.get("/v1/models", dependencies=protected, responses=api_errors)
    async def list_models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": service.created[m], "owned_by": "nanochat"}
                                           for m in service.models]}

    # -- chat

    @app.post("/chat/completions", dependencies=protected, response_class=EventStream, openapi_extra=request_body,
              responses={**chat_errors, 200: {"description": "the reply as server-sent events", "content": {
                  "text/event-stream": event_schema('{"token", "model"} for each piece of text, then {"done": true, '
                                                    '"model", "finish_reason", "completion_tokens"}, or {"error"}')}}})
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

        return EventStream(events(), headers=sse_headers)

    @app.post("/v1/chat/completions", dependencies=protected, openapi_extra=request_body,
              responses={**chat_errors, 500: error_response("generation failed (a non-streamed reply)"),
                         200: {"description": "a chat.completion, or with stream=true server-sent events", "content": {
                             "text/event-stream": event_schema("a chat.completion.chunk as JSON, and [DONE] last")}}})
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

        return EventStream(events(), headers=sse_headers)

    # Hook for the embedding-map page: nanochat/viz.html, drawing the JSON it fetches from /viz/embedding_map.json.
    def embedding_map():
        path = KatData().map_file
        if not path.exists():
            raise RequestError(404, f"no embedding map yet: {path} is written by {EMBEDDING_MAP_STAGE}; run it, then reload",
                               code="not_found")
        return path

    async def viz_allowed():  # the map holds the training prompts: only a loopback server or the key opens it
        if not local and not config.api_key:
            raise RequestError(403, f"the embedding map holds the training prompts: a server bound to {config.host} "
                                    f"serves it only with an API key (set ${API_KEY_ENV}) or on --host=127.0.0.1",
                               code="forbidden")

    @app.get("/viz", response_class=HTMLResponse,
             responses={**host_errors, 404: no_map})
    async def viz_page():
        if local and not config.api_key:  # otherwise the page's own fetch of the data reports what is missing
            embedding_map()
        return FileResponse(VIZ_PATH, media_type="text/html")

    @app.get("/viz/embedding_map.json", dependencies=[*protected, Depends(viz_allowed)],
             responses={**api_errors, 404: no_map, 403: error_response("a server on a public address without an "
                                                                      "API key does not serve the embedding map")})
    async def viz_data():
        return FileResponse(embedding_map(), media_type="application/json")

    return app


def main():
    import uvicorn

    setup_logging()
    config = parse_flags(Config)
    device_type = config.device_type or autodetect_device_type()
    stages = [s for s in config.models.split(",") if s] if config.models else find_chat_stages()
    config.api_key = config.api_key or os.environ.get(API_KEY_ENV, "")
    workers, unavailable = load_workers(stages, device_type, config.num_gpus)
    app = create_app(workers, config, unavailable)
    served = [stage for stage in stages if stage not in unavailable]
    log.info("serving %s on %d worker(s) at http://%s:%d/ (OpenAI API under /v1)%s", ", ".join(served), len(workers),
             config.host, config.port, f"; unavailable (see /health): {', '.join(unavailable)}" if unavailable else "")
    if not is_loopback(config.host) and not config.api_key:
        log.warning("NO API KEY on a public address: anyone who can reach %s:%d can use these models. Set $%s (or "
                    "--api_key) to require a key, or serve on --host=127.0.0.1 (the default); /viz withholds its data "
                    "until then", config.host, config.port, API_KEY_ENV)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")


if __name__ == "__main__":
    main()
