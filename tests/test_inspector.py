"""The memory inspector (``/inspector``) in a real headless browser: Debian's Chromium driven by
Playwright, against a server on a free loopback port (tiny model). Sign in with a tenant's key, the
threads list, one thread (messages, tool calls and results, the block timeline), search, ask
(not stored; attended and placed spans; the attention strip), forget (preview, cancel, confirm),
delete, bad input (the API's own errors) and another tenant (sees none of it).

Chromium must be installed (``apt-get install -y chromium``; CI does so): without it these tests
fail with that message, unless ``MEMORY_PLUGIN_SKIP_BROWSER=1`` asks to skip them. Screenshots of
each view go to ``tests/artifacts/inspector/`` (not committed; ``MEMORY_PLUGIN_ARTIFACTS`` moves it).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from memory_plugin import MemoryPool, testing  # noqa: E402
from memory_plugin.server import create_app  # noqa: E402

from .test_server import MODEL, running  # noqa: E402

SKIP_ENV = "MEMORY_PLUGIN_SKIP_BROWSER"
CHROMIUM = os.environ.get("MEMORY_PLUGIN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip
ARTIFACTS = Path(os.environ.get("MEMORY_PLUGIN_ARTIFACTS") or Path(__file__).parent / "artifacts") / "inspector"
KEYS = {"key-alice": "alice", "key-bob": "bob"}
ALICE = {"Authorization": "Bearer key-alice"}

FACTS = [
    "The blue folder is in the attic, behind the winter coats.",
    "My locker code at the gym is 4721.",
    "The database for the billing service listens on port 6543.",
    "Grandma's birthday is on the 14th of March; she likes tulips.",
    "The spare key to the shed hangs under the third step of the porch.",
    "Our flight to Lisbon leaves on Friday at 07:40 from gate B12.",
]


def _browser_or_fail():
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: the browser tests of the inspector are skipped")
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install it (apt-get install -y chromium) or set {SKIP_ENV}=1 to skip "
            "the inspector's browser tests",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"playwright is not installed (pip install -e '.[dev]'), or set {SKIP_ENV}=1 to skip", pytrace=False)
    return sync_playwright


def _conversation() -> list[dict]:
    """A thread long enough for blocks and for recall to place passages (>1024 tokens before the
    question), with a tool call and its result."""
    msgs = [{"role": "system", "content": "You are a helpful assistant with a long memory."}]
    others = [f for f in FACTS if "4721" not in f] * 4
    for i, fact in enumerate(others[:2] + [FACTS[1]] + others[2:]):  # the locker code once, early
        msgs.append({"role": "user", "content": f"Note {i}: {fact} Please remember this for later."})
        msgs.append({"role": "assistant", "content": f"Noted ({i}). I will remember that."})
    msgs.append({"role": "user", "content": "What is the weather in Paris?"})
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
    msgs.append({"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees in Paris."})
    msgs.append({"role": "assistant", "content": "It is sunny in Paris."})
    return msgs


def _chat(url, key, thread, messages):
    body = {"model": MODEL, "messages": messages, "max_tokens": 1}
    r = httpx.post(f"{url}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}", "X-Thread-Id": thread}, timeout=120)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model, tiny_tokenizer):
    """A server with two tenants: alice has ``trip`` (long, with a tool call) and ``scratch``."""
    root = tmp_path_factory.mktemp("inspector") / "memories"
    pool = MemoryPool(root, tiny_model, tiny_tokenizer, testing.TINY_CONFIG, max_open=4)
    with running(create_app(pool, KEYS, model_name=MODEL)) as url:
        _chat(url, "key-alice", "trip", _conversation())
        _chat(url, "key-alice", "scratch", [{"role": "user", "content": "A scratch note to delete."}])
        _chat(url, "key-bob", "bobs-thread", [{"role": "user", "content": "Bob's own note."}])
        yield url.removesuffix("/v1")


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _browser_or_fail()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def _signed_in(browser, base: str, key: str):
    page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
    page.set_default_timeout(20_000)
    page.goto(f"{base}/inspector")
    assert page.url.endswith("/inspector/login")  # sent to sign in first
    page.fill("input[name=key]", key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/inspector")
    return page


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _api(base: str, path: str, **kw):
    return httpx.request(kw.pop("method", "GET"), f"{base}/v1{path}", headers=ALICE, timeout=60, **kw)


def test_threads_thread_search_ask_and_forget_in_a_browser(server, browser):
    base = server
    page = _signed_in(browser, base, "key-alice")

    # Threads: size in tokens, blocks by tier, bytes on disk, last activity.
    row = page.locator("tr", has=page.locator("a", has_text=re.compile("^trip$")))
    info = _api(base, "/threads/trip").json()
    cells = row.locator("td").all_inner_texts()
    assert cells[1] == str(info["tokens"]) and cells[2] == str(info["entries"])
    assert cells[3] == f"{info['blocks']['ram']} / {info['blocks']['disk']} / {info['blocks']['cold']}" and info["blocks"]["ram"] > 0
    assert "KiB" in cells[4] and "UTC" in cells[5]
    assert page.locator("a", has_text="bobs-thread").count() == 0
    _shot(page, "1-threads")

    # One thread: messages in order with roles, the tool call and its result; the block timeline.
    row.locator("a").click()
    page.wait_for_selector("#timeline svg")
    msgs = _api(base, "/threads/trip/messages").json()["data"]
    items = page.locator("li.msg")
    assert items.count() == len(msgs)
    roles = page.locator("li.msg .role").all_inner_texts()
    assert roles == ["tool result" if m["role"] == "tool" else m["role"] for m in msgs]
    assert "get_weather" in page.locator("li.msg.role-assistant .call").first.inner_text()
    assert "Sunny, 21 degrees" in page.locator("li.msg.role-tool").inner_text()
    timeline = _api(base, "/threads/trip/timeline").json()
    blocks = [g for g in timeline["segments"] if g["kind"] == "block"]
    assert page.locator("#timeline rect.seg-block").count() == len(blocks) > 3
    assert page.locator("#timeline line.block-start").count() == len(blocks)
    assert page.locator("li.msg .block-tag").count() == len(blocks)  # each block's start, at its message
    _shot(page, "2-thread")

    # Search: the hybrid ranking's hits, each with its channels, highlighted in place.
    page.fill("#search-form input[name=query]", "locker code gym")
    page.click("#search-form button")
    page.wait_for_selector("#hits")
    api_hits = _api(base, "/threads/trip/search", method="POST", json={"query": "locker code gym", "k": 4}).json()["data"]
    hits = page.locator("ol.hits li")
    assert hits.count() == len(api_hits) == 4
    for li, h in zip(hits.all(), api_hits):
        text = li.inner_text()
        assert f"#{h['message_index']}" in text and all(c in text for c in h["channels"])
    first = api_hits[0]
    assert "4721" in msgs[first["message_index"]]["content"]
    mark = page.locator(f"#m-{first['message_index']} mark").first
    assert mark.get_attribute("data-hit") == "1" and first["text"].strip() in mark.inner_text()
    _shot(page, "3-search")

    # Ask: answered from the thread, not stored; attended and placed spans linked to their places;
    # the attention strip along the timeline.
    before = _api(base, "/threads/trip").json()
    page.fill("#ask-form input[name=question]", "What is my locker code at the gym?")
    page.fill("#ask-form input[name=max_tokens]", "8")
    page.fill("#ask-form input[name=recall]", "2")
    page.click("#ask-form button")
    page.wait_for_selector("#answer .answer")
    after = _api(base, "/threads/trip").json()
    assert (after["tokens"], after["entries"]) == (before["tokens"], before["entries"])  # nothing stored
    assert f"still holds {before['tokens']} tokens" in page.locator("#answer .note").first.inner_text()
    attended = page.locator("#attended li a")
    assert attended.count() >= 1
    for a in attended.all():
        target = a.get_attribute("href")
        assert re.fullmatch(r"#m-\d+", target) and page.locator(target).count() == 1
    placed = page.locator("#placed li a")
    assert placed.count() >= 1  # the thread is long enough for recall to place passages
    assert any("4721" in t for t in page.locator("#placed li").all_inner_texts())
    bars = page.locator("#answer svg.attention rect.share")
    assert bars.count() == len(timeline["segments"])
    shares = [float(b.get_attribute("data-share")) for b in bars.all()]
    assert 0 < sum(shares) <= 1.0001 and max(shares) > 0
    page.locator("#attended li a").first.click()  # the link goes to the message in the history
    assert re.search(r"#m-\d+$", page.url)
    _shot(page, "4-ask")

    # The thread page keeps the last answer's strip while the thread is unchanged.
    page.reload()
    assert page.locator("#answer svg.attention rect.share").count() == len(timeline["segments"])

    # Forget: a preview with the re-encode cost; nothing changes until it is confirmed.
    victim = first["message_index"]
    page.locator(f"#m-{victim} button.forget").click()
    page.wait_for_selector("#dialog .confirm")
    preview = _api(base, "/threads/trip/forget/preview", method="POST", json={"indices": [victim]}).json()
    assert page.locator("#dialog .reencode").inner_text() == str(preview["reencode_tokens"])
    assert preview["reencode_tokens"] >= preview["tokens_after"] > 0
    assert "4721" in page.locator("#dialog").inner_text()
    _shot(page, "5-forget-confirm")
    assert _api(base, "/threads/trip/messages").json()["data"] == msgs  # not yet
    page.click("#cancel-forget")
    assert page.locator("#dialog .confirm").count() == 0
    assert _api(base, "/threads/trip/messages").json()["data"] == msgs
    page.locator(f"#m-{victim} button.forget").click()
    page.click("#confirm-forget")
    page.wait_for_selector(".notice")
    assert "1 entry forgotten" in page.locator(".notice").inner_text()
    held = _api(base, "/threads/trip/messages").json()["data"]
    assert len(held) == len(msgs) - 1 and all("4721" not in m["content"] for m in held)
    assert page.locator("li.msg").count() == len(held) and "4721" not in page.locator("#history").inner_text()
    assert page.locator("#answer .answer").count() == 0  # the old strip no longer lines up
    _shot(page, "6-forgotten")

    # Delete, after the browser's confirmation.
    page.goto(f"{base}/inspector")
    page.once("dialog", lambda d: d.accept())
    page.locator("tr", has=page.locator("a", has_text="scratch")).locator("button.danger").click()
    page.wait_for_selector("a:text-is('scratch')", state="detached")
    assert _api(base, "/threads/scratch").status_code == 404
    page.context.close()


def test_bad_input_gets_the_apis_errors_and_changes_nothing(server, browser):
    base = server
    page = _signed_in(browser, base, "key-alice")
    page.goto(f"{base}/inspector/t/trip")
    msgs = _api(base, "/threads/trip/messages").json()["data"]

    def api_error(path, body):
        r = _api(base, path, method="POST", json=body)
        assert r.status_code == 400
        return r.json()["error"]["message"]

    page.fill("#search-form input[name=k]", "500")
    page.fill("#search-form input[name=query]", "tulips")
    page.click("#search-form button")
    page.wait_for_selector("#history .error")
    assert page.locator("#history .error").inner_text() == api_error("/threads/trip/search", {"query": "tulips", "k": 500})
    page.fill("#search-form input[name=k]", "4")
    page.fill("#search-form input[name=query]", "")
    page.click("#search-form button")
    page.wait_for_function("document.querySelector('#history .error').innerText.startsWith('query')")
    assert page.locator("#history .error").inner_text() == api_error("/threads/trip/search", {"query": ""})

    page.fill("#ask-form input[name=question]", "Where is the blue folder?")
    page.fill("#ask-form input[name=max_tokens]", "0")
    page.click("#ask-form button")
    page.wait_for_selector("#answer .error")
    expected = api_error("/threads/trip/ask", {"question": "Where is the blue folder?", "max_tokens": 0})
    assert page.locator("#answer .error").inner_text() == expected
    page.fill("#ask-form input[name=max_tokens]", "abc")
    page.click("#ask-form button")
    page.wait_for_function("document.querySelector('#answer .error').innerText.includes('integer')")
    assert page.locator("#answer .error").inner_text() == api_error("/threads/trip/ask", {"question": "x", "max_tokens": "abc"})
    _shot(page, "7-bad-input")
    assert _api(base, "/threads/trip/messages").json()["data"] == msgs
    page.context.close()


def test_another_tenant_sees_none_of_it(server, browser):
    base = server
    page = _signed_in(browser, base, "key-bob")
    names = page.locator("table.threads td:first-child a").all_inner_texts()
    assert names == ["bobs-thread"]
    page.goto(f"{base}/inspector/t/trip")
    assert page.locator(".error").inner_text() == "thread 'trip' not found"
    assert "Lisbon" not in page.content() and "4721" not in page.content()
    _shot(page, "8-other-tenant")
    # A forged request without the page's header is refused, with the cookie or without.
    r = page.request.post(f"{base}/inspector/t/bobs-thread/forget", form={"indices": "0"})
    assert r.status == 403
    assert len(httpx.get(f"{base}/v1/threads/bobs-thread/messages", headers={"Authorization": "Bearer key-bob"}).json()["data"]) == 1
    page.context.close()

    # A wrong key is refused; a page without a key sends to the sign-in form.
    page = browser.new_context().new_page()
    page.goto(f"{base}/inspector/login")
    page.fill("input[name=key]", "not-a-key")
    page.click("button[type=submit]")
    assert page.locator(".error").inner_text() == "unknown API key"
    page.goto(f"{base}/inspector/t/trip")
    assert page.url.endswith("/inspector/login")
    page.context.close()
