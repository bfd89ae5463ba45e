"""
scripts/chat_web.py against tiny random stages on the CPU, served by uvicorn in this process:
every endpoint, the SSE formats, each request limit, the OpenAI client, concurrency, and what keeps
it safe by default (loopback bind, API key, body limit, content type, the schema, broken checkpoints).
Replies are compared with what the engine gives directly for the same model, prompt and seed.
"""

import asyncio
import http.client
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
import torch
from fastapi.testclient import TestClient

from nanochat.common import REPO_ROOT, stage_dir
from scripts.chat_web import (RequestError, Config, chat_request_schema, create_app, find_chat_stages, load_workers,
                              parse_chat_request)
from tests.chat_fixtures import (engine_reply, make_chat_stages, running_chat_web, save_silent_stage, serve,
                                 stage_engine)

torch.set_num_threads(1)
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_web")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NANOCHAT_BASE_DIR", str(root / "base"))
        env.setenv("NANOCHAT_OUTS_DIR", str(root / "outs"))
        env.setenv("NANOCHAT_KAT_CACHE", str(root / "kat"))
        tokenizer = make_chat_stages()  # sft, grpo_density, grpo_baseline
        save_silent_stage("mid", tokenizer)
        (root / "outs" / "base").mkdir()  # a stage folder without a checkpoint is not served
        yield root


@pytest.fixture(scope="module")
def url(stages):
    workers, unavailable = load_workers(find_chat_stages(), "cpu")
    assert unavailable == {}
    with serve(create_app(workers, Config(temperature=0.8, top_k=50, max_tokens=16))) as base_url:
        yield base_url


@pytest.fixture
def client(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def sse_events(response) -> list:
    """The data payloads of a server-sent event stream; checks the framing (data lines, blank separators)."""
    text = response.text
    assert text.endswith("\n\n"), "every event ends with a blank line"
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, f"malformed event {block!r}"
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# -----------------------------------------------------------------------------
# Pages, health, models, stats

@pytest.mark.slow
def test_import_needs_neither_fastapi_nor_uvicorn():
    code = ("import sys, nanochat, scripts.chat_web, scripts.chat_cli; "
            "assert not {'fastapi', 'uvicorn', 'starlette'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=120)


def test_models_are_the_chat_stages_with_a_checkpoint(client):
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["sft", "grpo_density", "grpo_baseline", "mid"]
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in listing["data"])


def test_ui_page_is_self_contained_html(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "/chat/completions" in html and "/v1/models" in html
    links = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', html)
    assert all(link.startswith("data:") for link in links), links  # nothing fetched from elsewhere: works offline
    assert "http://" not in html and "https://" not in html and "@import" not in html


def test_health_reports_models_and_defaults(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["workers"] == 1
    assert health["defaults"] == {"temperature": 0.8, "top_k": 50, "max_tokens": 16}


def test_viz_says_which_stage_creates_the_map(client, stages):
    missing = client.get("/viz")
    assert missing.status_code == 404 and "nanochat.kat.embedding_map" in missing.json()["error"]["message"]
    assert client.get("/viz/embedding_map.json").status_code == 404
    data_dir = stages / "kat" / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "embedding_map.json").write_text('{"points": []}')
    try:
        assert client.get("/viz/embedding_map.json").json() == {"points": []}
    finally:
        (data_dir / "embedding_map.json").unlink()


# -----------------------------------------------------------------------------
# The UI's stream

def test_ui_stream_is_the_engine_reply_of_the_chosen_model(client):
    want, n = engine_reply("grpo_density", HELLO, max_tokens=12)
    assert want != engine_reply("sft", HELLO, max_tokens=12)[0], "stages must differ for this test to mean anything"
    response = client.post("/chat/completions", json={"model": "grpo_density", "messages": HELLO,
                                                      "temperature": 0, "max_tokens": 12})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    *tokens, done = sse_events(response)
    assert len(tokens) > 1 and all(set(e) == {"token", "model"} and e["model"] == "grpo_density" for e in tokens)
    assert "".join(e["token"] for e in tokens) == want
    assert done == {"done": True, "model": "grpo_density", "completion_tokens": n,
                    "finish_reason": "length" if n == 12 else "stop"}


def test_model_defaults_to_the_first_stage_and_seeded_sampling_repeats(client):
    want, _ = engine_reply("sft", HELLO, max_tokens=10, temperature=1.0, top_k=20, seed=7)
    for _ in range(2):
        events = sse_events(client.post("/chat/completions", json={"messages": HELLO, "temperature": 1.0,
                                                                   "top_k": 20, "seed": 7, "max_tokens": 10}))
        assert "".join(e["token"] for e in events[:-1]) == want and events[0]["model"] == "sft"


def test_a_reply_that_ends_itself_reports_stop(client):
    events = sse_events(client.post("/chat/completions", json={"model": "mid", "messages": HELLO}))
    assert events == [{"done": True, "model": "mid", "completion_tokens": 0, "finish_reason": "stop"}]


# -----------------------------------------------------------------------------
# OpenAI compatibility

def test_openai_client_without_streaming(url):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="anything")
    want, n = engine_reply("grpo_baseline", HELLO, max_tokens=12)
    completion = client.chat.completions.create(model="grpo_baseline", messages=HELLO, temperature=0, max_tokens=12)
    assert completion.object == "chat.completion" and completion.model == "grpo_baseline"
    assert completion.choices[0].message.role == "assistant" and completion.choices[0].message.content == want
    assert completion.choices[0].finish_reason == ("length" if n == 12 else "stop")
    prompt_tokens = len(stage_engine("grpo_baseline").tokenizer.render_for_completion({"messages": HELLO}))
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt_tokens, n)
    assert completion.usage.total_tokens == prompt_tokens + n
    silent = client.chat.completions.create(model="mid", messages=HELLO)
    assert silent.choices[0].message.content == "" and silent.choices[0].finish_reason == "stop"
    assert silent.usage.completion_tokens == 0


def test_openai_client_streaming(url):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="anything")
    want, n = engine_reply("sft", HELLO, max_tokens=12)
    stream = client.chat.completions.create(model="sft", messages=HELLO, temperature=0, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length" if n == 12 else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n


def test_openai_stream_wire_format(client):
    response = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 5, "stream": True})
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "usage" not in chunks[-1]  # only when stream_options.include_usage asks for it


# -----------------------------------------------------------------------------
# Limits: each refused with a 4xx JSON error that names it

def conversation(*lengths):
    """Alternating user/assistant messages of these many characters (odd count: ends with a user turn)."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "a" * n} for i, n in enumerate(lengths)]


REFUSED = {
    "501 messages": ({"messages": conversation(*[1] * 501)}, 400, "at most 500 messages"),
    "8001 characters": ({"messages": conversation(8001)}, 400, "limit is 8000"),
    "32001 characters in all": ({"messages": conversation(8000, 8000, 8000, 8000, 1)}, 400, "limit is 32000"),
    "tool role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, "roles are user and assistant"),
    "system not first": ({"messages": HELLO + [{"role": "system", "content": "x"}]}, 400, "roles are user and assistant"),
    "temperature 2.1": ({"messages": HELLO, "temperature": 2.1}, 400, "temperature must be between 0.0 and 2.0"),
    "temperature -0.1": ({"messages": HELLO, "temperature": -0.1}, 400, "temperature must be between"),
    "temperature as text": ({"messages": HELLO, "temperature": "hot"}, 400, "temperature must be a number"),
    "top_k 201": ({"messages": HELLO, "top_k": 201}, 400, "top_k must be between 0 and 200"),
    "max_tokens 0": ({"messages": HELLO, "max_tokens": 0}, 400, "max_tokens must be between 1 and 4096"),
    "max_tokens 4097": ({"messages": HELLO, "max_tokens": 4097}, 400, "max_tokens must be between 1 and 4096"),
    "max_tokens 2.5": ({"messages": HELLO, "max_tokens": 2.5}, 400, "max_tokens must be an integer"),
    "no messages": ({"messages": []}, 400, "non-empty list"),
    "ends with the assistant": ({"messages": conversation(3, 3)}, 400, "last message must be from the user"),
    "turns out of order": ({"messages": HELLO + HELLO}, 400, "alternate"),
    "unknown model": ({"messages": HELLO, "model": "gpt-4"}, 404, "available models: sft, grpo_density, grpo_baseline, mid"),
}


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/chat/completions"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_limits_are_refused_with_json_errors(client, endpoint, case):
    body, status, phrase = REFUSED[case]
    response = client.post(endpoint, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert phrase in error["message"], error["message"]


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[1, 2]", b"",
                                  b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": Infinity}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'])
def test_malformed_bodies_are_400(client, body):
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


ACCEPTED = {
    "500 messages": {"messages": [{"role": "system", "content": "a"}] + conversation(*[1] * 499)},
    "8000 characters": {"messages": conversation(8000)},
    "32000 characters in all": {"messages": conversation(8000, 8000, 8000, 7999, 1)},
    "temperature 2, top_k 200": {"messages": HELLO, "temperature": 2.0, "top_k": 200},
    "top_k 0 means none": {"messages": HELLO, "top_k": 0},
    "max_tokens 4096": {"messages": HELLO, "max_tokens": 4096},
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_requests_at_each_limit_are_answered(client, case):
    # the silent stage answers at once, even to 4096; its stop token's softcapped logit still leaves the other
    # tokens ~17% at temperature 2, so the seed is fixed (requests without one draw a random seed)
    body = {"max_tokens": 1, "seed": 0, **ACCEPTED[case], "model": "mid"}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "stop"


def test_conversation_longer_than_the_context_is_refused(client):
    # letters the tiny vocabulary never merged: ~8,000 tokens, past the 2,560-position context
    long_text = "qzxj " * 1600
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long_text}]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


# -----------------------------------------------------------------------------
# Concurrency: a pool of one CPU worker, requests queue, none crash, the loop stays free

def test_fifty_concurrent_streams_all_complete_with_their_own_reply(url, client):
    seeds = list(range(50))
    models = ["sft", "grpo_baseline"]
    want = {s: engine_reply(models[s % 2], HELLO, max_tokens=8, temperature=1.0, seed=s)[0] for s in seeds}
    before = client.get("/stats").json()

    async def one(http, seed):
        body = {"model": models[seed % 2], "messages": HELLO, "temperature": 1.0, "top_k": 0, "seed": seed, "max_tokens": 8}
        async with http.stream("POST", "/chat/completions", json=body) as response:
            assert response.status_code == 200
            text, done = "", None
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    text += event.get("token", "")
                    done = event if event.get("done") else done
            return seed, text, done

    async def all_of_them():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.wait_for(asyncio.gather(*(one(http, s) for s in seeds)), timeout=90)

    results = asyncio.run(all_of_them())
    assert all(done is not None for _, _, done in results)
    assert {seed: text for seed, text, _ in results} == want
    after = client.get("/stats").json()
    assert after["requests_served"] - before["requests_served"] == 50
    generated = sum(done["completion_tokens"] for _, _, done in results)
    assert after["tokens_generated"] - before["tokens_generated"] == generated
    assert after["workers"][0]["status"] == "idle" and after["requests_waiting"] == 0


def test_loop_answers_while_generating_and_a_dropped_stream_frees_the_worker(url, client):
    first_token = threading.Event()
    hang_up = threading.Event()

    def long_stream():
        body = {"model": "sft", "messages": HELLO, "temperature": 1.0, "seed": 0, "max_tokens": 2000}
        with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    first_token.set()
                    if hang_up.is_set():
                        return  # leaving the with-blocks closes the connection mid-stream

    before = client.get("/stats").json()
    reader = threading.Thread(target=long_stream)
    reader.start()
    try:
        assert first_token.wait(30)
        # answered while the worker is still busy: the event loop does not wait for generation
        assert client.get("/health").status_code == 200
        busy = client.get("/stats").json()["workers"][0]
        assert (busy["status"], busy["model"]) == ("busy", "sft")
    finally:
        hang_up.set()
        reader.join(60)
    deadline = time.monotonic() + 20
    while client.get("/stats").json()["workers"][0]["status"] != "idle":
        assert time.monotonic() < deadline, "the worker was never given back after the client left"
        time.sleep(0.05)
    after = client.get("/stats").json()
    assert after["requests_served"] == before["requests_served"]  # an abandoned reply is not counted as served
    assert after["tokens_generated"] - before["tokens_generated"] < 2000  # generation stopped early
    assert client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3}).status_code == 200


# -----------------------------------------------------------------------------
# Safe by default

KEY = "test-key-4f1d"
MODELS = ["sft", "grpo_density", "grpo_baseline", "mid"]
CHAT_ROUTES = ["/v1/chat/completions", "/chat/completions"]
API_GETS = ["/health", "/stats", "/v1/models", "/viz/embedding_map.json"]


def local_app(**config):
    """A fresh app over its own workers (two apps must not share a worker's engines), as a test client
    that reaches it as the browser does (Host 127.0.0.1)."""
    workers, unavailable = load_workers(find_chat_stages(), "cpu")
    return TestClient(create_app(workers, Config(max_tokens=4, **config), unavailable), base_url="http://127.0.0.1")


@pytest.fixture
def embedding_map(stages):
    path = stages / "kat" / "data" / "embedding_map.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"points": []}')
    yield path
    path.unlink()


def listening_addresses(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


@pytest.mark.parametrize("flags, env, address, warns", [
    ((), {}, "127.0.0.1", False),
    (("--host=0.0.0.0",), {}, "0.0.0.0", True),
    (("--host=0.0.0.0",), {"NANOCHAT_API_KEY": KEY}, "0.0.0.0", False),
], ids=["default", "public without a key", "public with a key from the environment"])
@pytest.mark.slow
def test_binds_loopback_unless_told_and_warns_when_public_without_a_key(stages, tmp_path, flags, env, address, warns):
    log = tmp_path / "server.log"
    key = env.get("NANOCHAT_API_KEY")
    with running_chat_web(log, "--device_type=cpu", *flags, env={"NANOCHAT_API_KEY": "", **env}, api_key=key) as url:
        assert listening_addresses(int(url.rsplit(":", 1)[1])) == {address}
        if key:
            assert httpx.get(url + "/v1/models").status_code == 401
            assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    warned = [line for line in log.read_text().splitlines() if "NO API KEY on a public address" in line]
    assert len(warned) == (1 if warns else 0), log.read_text()
    if warns:
        assert "WARNING" in warned[0] and "NANOCHAT_API_KEY" in warned[0] and "--host=127.0.0.1" in warned[0]


def test_api_key_is_required_on_the_api_and_the_pages_still_load(stages, embedding_map):
    import openai

    with local_app(api_key=KEY) as client:
        for page in ("/", "/viz"):  # the pages load without it: they ask for the key, then send it
            assert client.get(page).status_code == 200
        ask = {"json": {"messages": HELLO, "model": "mid"}}
        requests = [("GET", path, {}) for path in API_GETS] + [("POST", path, ask) for path in CHAT_ROUTES]
        for method, path, body in requests:
            for headers, code in [({}, "missing_api_key"), ({"Authorization": "Bearer wrong"}, "invalid_api_key"),
                                  ({"Authorization": f"Basic {KEY}"}, "missing_api_key")]:
                refused = client.request(method, path, headers=headers, **body)
                assert refused.status_code == 401, (method, path, headers)
                assert refused.headers["www-authenticate"].startswith("Bearer")
                assert refused.json()["error"]["code"] == code
            assert client.request(method, path, headers={"Authorization": f"Bearer {KEY}"}, **body).status_code == 200
        assert "Authorization: `Bearer ${key}`" in client.get("/").text  # the UI sends the key it asked for

        openai_client = openai.OpenAI(base_url="http://127.0.0.1/v1", api_key=KEY, http_client=client)
        want, _ = engine_reply("grpo_baseline", HELLO, max_tokens=6)
        completion = openai_client.chat.completions.create(model="grpo_baseline", messages=HELLO, temperature=0,
                                                            max_tokens=6)
        assert completion.choices[0].message.content == want
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url="http://127.0.0.1/v1", api_key="wrong", http_client=client).models.list()


def test_a_body_past_the_limit_is_413_before_it_is_read(url):
    # 200 MB declared, none of it sent: the answer comes without the server waiting for (or buffering) the body
    port = int(url.rsplit(":", 1)[1])
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {200_000_000}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        answer = http.client.HTTPResponse(sock)  # reads by the answer's own framing: the head and body may come apart
        answer.begin()
        body = answer.read()
    assert answer.status == 413, body
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and "1,048,576 bytes (--max_body_bytes)" in error["message"]


def test_a_streamed_body_stops_being_read_at_the_limit(stages):
    # no Content-Length (chunked): the app pulls the body chunk by chunk and stops at the first past the limit
    workers, _ = load_workers(["mid"], "cpu")
    app = create_app(workers, Config(max_body_bytes=1 << 20))
    chunk, pulled = b" " * (1 << 16), []

    async def body():
        for i in range(200_000_000 // len(chunk)):  # 200 MB if it were read to the end
            pulled.append(i)
            yield chunk

    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1") as client:
            return await client.post("/v1/chat/completions", content=body(), headers={"content-type": "application/json"})

    response = asyncio.run(post())
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert len(pulled) == (1 << 20) // len(chunk) + 1  # 16 chunks fill the limit, the 17th passes it


@pytest.mark.slow
def test_a_body_limit_below_one_byte_is_refused_at_startup():
    run = subprocess.run([sys.executable, "-m", "scripts.chat_web", "--max_body_bytes=0"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "--max_body_bytes=0 is out of range" in run.stderr


def test_the_largest_valid_request_fits_under_the_default_body_limit(client):
    # 32,000 characters that JSON escapes at 12 bytes each (a surrogate pair) in 500 messages: ~0.4 MB, read
    # whole and refused only for what it is (far past the tiny model's context), not for its size
    messages = [{"role": "system", "content": "\U0001F600" * 64}] + conversation(*[64] * 499)
    for message in messages:
        message["content"] = "\U0001F600" * len(message["content"])
    body = json.dumps({"messages": messages, "model": "mid"}).encode()
    assert 380_000 < len(body) < Config().max_body_bytes
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "context_length_exceeded", response.text


def nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


@pytest.mark.parametrize("endpoint", CHAT_ROUTES)
@pytest.mark.parametrize("body", [
    nested(1_000),
    nested(100_000),
    '{"messages": ' + nested(50_000) + "}",
    '{"a":' * 20_000 + "1" + "}" * 20_000,
    '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + "9" * 5_000 + "}",
], ids=["1,000 lists", "100,000 lists", "100,000 inside messages", "20,000 objects", "a 5,000-digit integer"])
def test_deeply_nested_json_is_400(client, endpoint, body):
    response = client.post(endpoint, content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("field", ["model", "temperature", "seed", "stream", "stream_options", "role"])
def test_a_deep_value_that_parsed_is_refused_without_recursing(field):
    # what json.loads could read, e.g. 900 levels, must not recurse again in the error message that shows it
    value = []
    for _ in range(100_000):
        value = [value]
    body = {"messages": [{"role": value, "content": "hi"}]} if field == "role" else {"messages": HELLO, field: value}
    with pytest.raises(RequestError) as refused:
        parse_chat_request(body, MODELS, Config())
    assert refused.value.status in (400, 404) and "a list" in refused.value.message


@pytest.mark.parametrize("endpoint", CHAT_ROUTES)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/jsonx", None])
def test_a_chat_post_that_is_not_declared_json_is_415(client, endpoint, content_type):
    # a page on another site can POST text/plain here without asking the browser first; JSON needs a preflight
    headers = {"content-type": content_type} if content_type else {}
    response = client.post(endpoint, content=json.dumps({"messages": HELLO, "model": "mid"}).encode(), headers=headers)
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_media_type"
    declared = client.post(endpoint, content=json.dumps({"messages": HELLO, "model": "mid"}).encode(),
                           headers={"content-type": "Application/JSON; charset=utf-8"})
    assert declared.status_code == 200


def test_viz_data_only_from_a_loopback_server_or_with_the_key(stages, embedding_map, client):
    assert client.get("/viz/embedding_map.json").json() == {"points": []}  # loopback, no key: this machine only
    with local_app(host="0.0.0.0") as public:
        assert public.get("/viz").status_code == 200  # the page; its data fetch explains the refusal
        refused = public.get("/viz/embedding_map.json")
        assert refused.status_code == 403 and "NANOCHAT_API_KEY" in refused.json()["error"]["message"]
        assert public.get("/v1/models").status_code == 200  # the chat API stays open (with the startup warning)
    with local_app(host="0.0.0.0", api_key=KEY) as keyed:
        assert keyed.get("/viz/embedding_map.json").status_code == 401
        assert keyed.get("/viz/embedding_map.json", headers={"Authorization": f"Bearer {KEY}"}).json() == {"points": []}


@pytest.mark.parametrize("path", ["/", "/v1/models", "/viz/embedding_map.json"])
def test_a_loopback_server_refuses_other_host_names(client, embedding_map, path):
    # DNS rebinding: a page whose domain now resolves to 127.0.0.1 still sends its own name as Host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        refused = client.get(path, headers={"host": host})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_host"
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert client.get(path, headers={"host": host}).status_code == 200


def resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def test_openapi_schema_states_the_bodies_and_the_errors(client, stages):
    schema = client.get("/openapi.json").json()
    for path in CHAT_ROUTES:
        operation = schema["paths"][path]["post"]
        body = resolve(schema, operation["requestBody"]["content"]["application/json"]["schema"])
        assert operation["requestBody"]["required"] is True
        assert body["required"] == ["messages"]
        assert body["properties"]["messages"]["maxItems"] == 500 and body["properties"]["messages"]["minItems"] == 1
        message = resolve(schema, body["properties"]["messages"]["items"])
        assert message["properties"]["content"]["maxLength"] == 8000
        assert message["properties"]["role"]["enum"] == ["system", "user", "assistant"]
        assert body["properties"]["model"]["anyOf"][0]["enum"] == MODELS
        assert body["properties"]["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 4096}
        for status in ("400", "404", "413", "415"):
            error = resolve(schema, operation["responses"][status]["content"]["application/json"]["schema"])
            assert error["required"] == ["error"], status
            assert set(resolve(schema, error["properties"]["error"])["required"]) == {"message", "type", "param", "code"}
        event = operation["responses"]["200"]["content"]["text/event-stream"]["schema"]  # one event, before OpenAPI 3.2
        assert event["required"] == ["data"] and event["properties"]["data"]["type"] == "string"
        assert "401" not in operation["responses"] and "security" not in operation  # no key on this server
    with local_app(api_key=KEY) as keyed:
        schema = keyed.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["api_key"] == {
            "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["api_key"]["description"]}
        for path in API_GETS + CHAT_ROUTES:
            operation = next(iter(schema["paths"][path].values()))
            assert "401" in operation["responses"] and operation["security"] == [{"api_key": []}], path
        for page in ("/", "/viz"):
            assert "security" not in schema["paths"][page]["get"]


# Bodies the schema must refuse too (each field's own limit), and those only the server can refuse
# (between fields, or against the model): the schema describes them in words.
SCHEMA_REFUSES = ["501 messages", "8001 characters", "tool role", "temperature 2.1", "temperature -0.1",
                  "temperature as text", "top_k 201", "max_tokens 0", "max_tokens 4097", "max_tokens 2.5",
                  "no messages", "unknown model"]
ONLY_THE_SERVER_REFUSES = ["32001 characters in all", "system not first", "ends with the assistant", "turns out of order"]


def test_the_schema_and_the_server_agree_on_each_request(stages):
    assert set(SCHEMA_REFUSES) | set(ONLY_THE_SERVER_REFUSES) == set(REFUSED)
    from pydantic import ValidationError

    model = chat_request_schema(MODELS)
    for case in ACCEPTED:
        model.model_validate({**ACCEPTED[case], "model": "mid"})
    for case in ONLY_THE_SERVER_REFUSES:
        model.model_validate(REFUSED[case][0])
    for case in SCHEMA_REFUSES:
        with pytest.raises(ValidationError):
            model.model_validate(REFUSED[case][0])
        with pytest.raises(RequestError):
            parse_chat_request(REFUSED[case][0], MODELS, Config())
    extra = {"n": 2, "top_p": 0, "seed": 2 ** 63, "stream": None, "stream_options": 5, "model": "",
             "max_completion_tokens": 5000}
    for field, value in extra.items():  # fields outside the REFUSED table: both refuse
        with pytest.raises(ValidationError):
            model.model_validate({"messages": HELLO, field: value})
        with pytest.raises(RequestError):
            parse_chat_request({"messages": HELLO, field: value}, MODELS, Config())


def test_a_corrupt_checkpoint_takes_out_its_stage_not_the_server(stages, tmp_path, monkeypatch):
    sft = stage_dir("sft") / "ckpt.pt"
    monkeypatch.setenv("NANOCHAT_OUTS_DIR", str(tmp_path / "outs"))
    for stage in ("sft", "grpo_density", "grpo_baseline"):
        stage_dir(stage).mkdir(parents=True)
    shutil.copy(sft, stage_dir("sft") / "ckpt.pt")
    (stage_dir("grpo_density") / "ckpt.pt").write_bytes(sft.read_bytes()[: sft.stat().st_size // 2])  # cut short
    (stage_dir("grpo_baseline") / "ckpt.pt").write_bytes(b"")  # a save that never wrote

    workers, unavailable = load_workers(find_chat_stages(), "cpu")
    assert list(workers[0].engines) == ["sft"] and set(unavailable) == {"grpo_density", "grpo_baseline"}
    for stage, why in unavailable.items():
        assert str(stage_dir(stage) / "ckpt.pt") in why, why
    with serve(create_app(workers, Config(max_tokens=4), unavailable)) as base_url, httpx.Client(base_url=base_url) as http:
        health = http.get("/health").json()
        assert health["models"] == ["sft"] and health["unavailable"] == unavailable
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["sft"]
        missing = http.post("/v1/chat/completions", json={"model": "grpo_density", "messages": HELLO})
        assert missing.status_code == 404 and unavailable["grpo_density"] in missing.json()["error"]["message"]
        assert http.post("/v1/chat/completions", json={"model": "sft", "messages": HELLO}).status_code == 200

    (stage_dir("sft") / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="no chat model could be loaded") as none_loads:
        load_workers(find_chat_stages(), "cpu")
    assert all(stage in str(none_loads.value) for stage in ("sft", "grpo_density", "grpo_baseline"))


def test_further_seeds_and_the_shuffled_arm_are_served_after_their_arm(tmp_path, monkeypatch):
    """grpo_density_s1 (a further seed) follows grpo_density; grpo_shuffled comes after the arms."""
    from scripts.chat_web import find_chat_stages
    monkeypatch.setenv("NANOCHAT_OUTS_DIR", str(tmp_path))
    for stage in ("sft", "grpo_density", "grpo_density_s1", "grpo_baseline", "grpo_shuffled", "grpo_other", "rm"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "ckpt.pt").write_bytes(b"x")
    (tmp_path / "grpo_baseline_s1").mkdir()  # no checkpoint: not offered
    assert find_chat_stages() == ["sft", "grpo_density", "grpo_density_s1", "grpo_baseline", "grpo_shuffled"]
