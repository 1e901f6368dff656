"""The chat page at `/`, driven in a real headless browser (Debian's chromium through
Playwright): a message typed, tokens streamed from the live server, model output kept as text."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from serve.live_server import start_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FIGURE = Path(__file__).resolve().parents[2] / "notes" / "figures" / "chat_ui.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def ui_server(chat_model_dir):
    with start_server(chat_model_dir, max_num_seqs=4) as server:
        yield server


def test_page_is_served_with_a_script_policy(ui_server):
    r = httpx.get(ui_server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'sha256-" in r.headers["content-security-policy"]
    assert "unsafe-inline" not in r.headers["content-security-policy"].split("style-src")[0]
    assert "innerHTML" not in r.text and "insertAdjacentHTML" not in r.text


@pytest.fixture
def page():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("chromium not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        # (launch gives the browser a fresh, empty profile directory of its own)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
        browser.close()
        assert not errors, errors


def test_chat_streams_tokens_from_the_live_server(ui_server, page, tmp_path):
    page.goto(ui_server.url + "/")
    page.wait_for_selector("#model option[value='tiny']", state="attached")
    page.fill("#max_tokens", "24")
    page.fill("#prompt", "Tell me a story")
    page.press("#prompt", "Enter")
    answer = page.locator(".msg.assistant").first
    # (selectors, not wait_for_function: the page's CSP forbids the eval that one needs)
    page.wait_for_selector(".msg.assistant[data-chunks]:not([data-chunks='0'])")
    page.wait_for_selector(".msg.assistant[data-done='1']", timeout=60_000)
    assert page.locator(".msg.user").inner_text() == "Tell me a story"
    assert int(answer.get_attribute("data-chunks")) > 1, "the answer came in one piece"
    assert answer.inner_text().strip()
    stats = page.locator(".stats").inner_text()
    assert "24 tokens" in stats and "tokens/s" in stats
    assert not page.locator(".msg.error").count()
    page.screenshot(path=str(tmp_path / "chat_ui.png"))
    if os.environ.get("KILN_SAVE_FIGURES"):  # refresh the note's picture
        page.screenshot(path=str(FIGURE))


def test_model_output_is_shown_as_text_not_markup(ui_server, page):
    evil = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"><b>bold</b>'
    chunks = [{"choices": [{"index": 0, "delta": {"content": piece}}]}
              for piece in (evil[:20], evil[20:])]  # fmt: skip
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=body))  # fmt: skip
    page.goto(ui_server.url + "/")
    page.fill("#prompt", "<i>hello</i>")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant[data-done='1']")
    answer = page.locator(".msg.assistant")
    assert answer.inner_text() == evil
    assert page.locator(".msg.user").inner_text() == "<i>hello</i>"
    assert page.locator("#messages script, #messages img, #messages b, #messages i").count() == 0
    assert page.evaluate("window.pwned") is None
