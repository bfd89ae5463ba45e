"""
scripts/chat_web.py against tiny random stages on the CPU, served by uvicorn in this process:
every endpoint, the SSE formats, each request limit, the OpenAI client, and concurrency.
Replies are compared with what the engine gives directly for the same model, prompt and seed.
"""

import asyncio
import json
import re
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from nanochat.common import REPO_ROOT
from scripts.chat_web import Config, create_app, find_chat_stages, load_workers
from tests.chat_fixtures import engine_reply, make_chat_stages, save_silent_stage, serve, stage_engine

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
    workers = load_workers(find_chat_stages(), "cpu")
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
