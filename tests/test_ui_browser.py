"""
nanochat/ui.html in a real headless Chromium (Debian's `chromium` package, driven over the
DevTools protocol on a pipe: tests/cdp_pipe.py), against `python -m scripts.chat_web` serving
tiny random stages. The UI must show, token by token, exactly the replies the engine gives.
"""

import json

import pytest
import torch

from tests.cdp_pipe import HeadlessChromium
from tests.chat_fixtures import engine_reply, make_chat_stages, running_chat_web

pytestmark = pytest.mark.slow  # every test here starts processes and drives a browser

torch.set_num_threads(1)
MAX_TOKENS = 12  # the server's default reply length here; the UI leaves it unset

# Every assignment of streamed text into a reply is one childList mutation of its .text element
# (render() builds elements detached from the page, so it adds none).
OBSERVE = """
window.__updates = 0;
new MutationObserver((records) => {
  window.__updates += records.filter((r) => r.target.classList && r.target.classList.contains("text")
                                           && r.target.parentElement.classList.contains("reply")).length;
}).observe(document.getElementById("chat"), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui_browser")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NANOCHAT_BASE_DIR", str(root / "base"))
        env.setenv("NANOCHAT_OUTS_DIR", str(root / "outs"))
        make_chat_stages()
        # the server as a user starts it (the other chat tests run it in-process)
        with running_chat_web(root / "server.log", "--host=127.0.0.1", "--device_type=cpu", "--temperature=0.8",
                              "--top_k=50", f"--max_tokens={MAX_TOKENS}") as url:
            browser = HeadlessChromium(root / "profile", root / "chromium.log")
            try:
                page = browser.open_page(url + "/")
                page.wait_for('document.body && document.body.dataset.ready === "true"')
                page.evaluate(OBSERVE)
                yield page
            finally:
                browser.close()


def submit(page, text):
    page.evaluate(f'document.getElementById("input").value = {json.dumps(text)}; document.getElementById("send").click()')


def replies_when_done(page, count):
    """[(model, text)] of the page's replies once `count` of them exist and none is still streaming."""
    page.wait_for(f'document.querySelectorAll(".reply").length === {count} && '
                  '!document.querySelector(".reply:not([data-status=done])")')
    return [tuple(pair) for pair in page.evaluate(
        '[...document.querySelectorAll(".reply")].map((r) => [r.dataset.model, r.querySelector(".text").textContent])')]


def click(page, selector, index=0):
    page.evaluate(f'document.querySelectorAll({json.dumps(selector)})[{index}].click()')


def user(text):
    return {"role": "user", "content": text}


def test_model_picker_lists_the_served_stages(page):
    options = page.evaluate('[...document.querySelectorAll("#model-a option")].map((o) => o.value)')
    assert options == ["sft", "grpo_density", "grpo_baseline"]


def test_chat_streams_regenerates_edits_and_continues(page):
    submit(page, "/temperature 0")  # greedy, so the engine's reply is the one to expect
    assert "temperature 0 " in page.evaluate('document.getElementById("settings").textContent')

    want, n = engine_reply("sft", [user("hello there")], max_tokens=MAX_TOKENS)
    page.evaluate("window.__updates = 0")
    submit(page, "hello there")
    assert replies_when_done(page, 1) == [("sft", want)]
    assert page.evaluate("window.__updates") == n > 1, "the reply must appear token by token"

    click(page, ".reply .actions button")  # Regenerate: same prompt, greedy, same reply
    assert replies_when_done(page, 1) == [("sft", want)]

    click(page, ".user .actions button")  # Edit the message, then continue from the edit
    page.evaluate('document.querySelector(".user textarea").value = "how are you"')
    click(page, ".user.editing .actions button")
    edited, _ = engine_reply("sft", [user("how are you")], max_tokens=MAX_TOKENS)
    assert replies_when_done(page, 1) == [("sft", edited)]

    submit(page, "and then?")  # a second turn sees the first
    history = [user("how are you"), {"role": "assistant", "content": edited}, user("and then?")]
    assert replies_when_done(page, 2)[1] == ("sft", engine_reply("sft", history, max_tokens=MAX_TOKENS)[0])


def test_side_by_side_sends_one_prompt_to_two_models(page):
    submit(page, "/clear")
    submit(page, "/temperature 0")
    submit(page, "/compare grpo_density grpo_baseline")
    submit(page, "hello there")
    assert replies_when_done(page, 2) == [
        ("grpo_density", engine_reply("grpo_density", [user("hello there")], max_tokens=MAX_TOKENS)[0]),
        ("grpo_baseline", engine_reply("grpo_baseline", [user("hello there")], max_tokens=MAX_TOKENS)[0])]


def test_slash_commands_check_their_arguments(page):
    submit(page, "/clear")
    for command in ("/model gpt-4", "/temperature 3", "/topk 1.5", "/nonsense", "/help"):
        submit(page, command)
    notes = page.evaluate('[...document.querySelectorAll(".note")].map((n) => n.textContent)')
    assert 'unknown model "gpt-4"' in notes[0] and "sft, grpo_density, grpo_baseline" in notes[0]
    assert "from 0 to 2" in notes[1] and "an integer from 0 to 200" in notes[2]
    assert "unknown command /nonsense" in notes[3] and "/compare A B" in notes[4]
    assert page.evaluate('document.querySelectorAll(".turn").length') == 0  # commands never reach a model
