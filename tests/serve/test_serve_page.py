"""The chat page at / in a real headless Chromium (Debian's package, driven by playwright): it
streams replies, keeps the conversation, and shows the server's error for an image upload the
text-only model cannot take. Skipped when Chromium is absent, except where G3N_REQUIRE_BROWSER=1
(CI installs Chromium and sets it, so the page is never silently untested there)."""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from g3n.inference.backends import TorchEngine
from g3n.serve import create_app
from helpers import ServerThread

CHROMIUM = os.environ.get("G3N_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip


def _require_browser():
    if os.environ.get("G3N_REQUIRE_BROWSER") == "1":
        assert CHROMIUM, "G3N_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)"
        import playwright  # noqa: F401 - fails loudly when the test extra is missing
    elif not CHROMIUM:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright")


@pytest.fixture(scope="module")
def pw():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        yield pw


def _browser(pw, profile, **kw):
    """Chromium with a fresh profile directory (playwright passes it as --user-data-dir)."""
    return pw.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                 **kw)  # fmt: skip


@pytest.fixture(scope="module")
def browser_page(pw, tiny, tmp_path_factory):
    model, tok = tiny
    engine = TorchEngine(model, tok, "tiny")
    with ServerThread(create_app(engine)) as server:
        browser = _browser(pw, tmp_path_factory.mktemp("chromium-profile"))
        page = browser.new_page()
        page.set_default_timeout(60_000)
        yield server, engine, page
        browser.close()


def _greedy_reply(engine, messages):
    from g3n.inference.generate import generate
    from g3n.inference.sampling import SamplingParams

    ids = engine.encode_chat(messages)
    return engine.tok.decode(generate(engine.model, [ids], SamplingParams(greedy=True, max_new_tokens=512),
                                      engine.tok.stop_ids)[0])  # fmt: skip


def _ask(page, text):
    done = page.locator('#messages [data-done="1"]').count()
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_function(f"document.querySelectorAll('#messages [data-done=\"1\"]').length > {done}")
    return page.locator("#messages .msg").last


def test_page_streams_replies_and_keeps_the_conversation(browser_page):
    server, engine, page = browser_page
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')")
    page.click("summary")
    page.fill("#temperature", "0")
    # count how often the reply bubble changes: a streamed reply arrives in many pieces
    page.evaluate("""() => { window.updates = 0;
        new MutationObserver(() => window.updates++).observe(document.getElementById('messages'),
            {subtree: true, childList: true, characterData: true}); }""")
    first = _ask(page, "What is the capital of France?")
    question = {"role": "user", "content": "What is the capital of France?"}
    expected = _greedy_reply(engine, [question])
    assert "Paris" in expected and first.text_content() == expected
    assert "assistant" in first.get_attribute("class")
    assert page.evaluate("window.updates") > 4
    second = _ask(page, "What is the capital of Peru?")
    history = [
        question,
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "What is the capital of Peru?"},
    ]
    assert second.text_content() == _greedy_reply(engine, history)


def test_page_uploads_an_image_and_shows_the_servers_error(browser_page, tmp_path):
    from PIL import Image

    _, _, page = browser_page
    path = tmp_path / "red.png"
    Image.new("RGB", (16, 16), (220, 20, 20)).save(path)
    page.set_input_files("#file", str(path))
    page.wait_for_function("document.getElementById('attachments').textContent.includes('red.png')")
    error = _ask(page, "What is in this picture?")
    assert "error" in error.get_attribute("class")
    assert "without a vision tower" in error.text_content()
    assert page.locator("#messages .msg.user img").count() == 1  # the upload was shown with the message
    assert page.locator("#attachments").text_content() == ""


def test_page_behind_an_api_key(pw, tiny, tmp_path):
    """With --api-key the browser is asked for it (HTTP Basic, key as password) and the page's own
    requests then carry it: the page loads the model list and answers."""
    model, tok = tiny
    with ServerThread(create_app(TorchEngine(model, tok, "tiny"), api_key="s3cret")) as server:
        for password, works in [("wrong", False), ("s3cret", True)]:
            browser = _browser(pw, tmp_path / password, http_credentials={"username": "me", "password": password})
            page = browser.new_page()
            page.set_default_timeout(60_000)
            status = page.goto(server.url + "/").status
            if works:
                assert status == 200
                page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')")
                page.fill("#prompt", "What is the capital of France?")
                page.press("#prompt", "Enter")
                page.wait_for_function("document.querySelector('#messages [data-done=\"1\"]') !== null")
                assert "Paris" in page.locator("#messages .msg.assistant").last.text_content()
            else:
                assert status == 401
            browser.close()
