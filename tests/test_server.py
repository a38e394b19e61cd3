"""The memory server over HTTP on a free loopback port (uvicorn on a background thread, tiny model):
threads and cached tokens, the stateful responses form, tenants, disconnects, bad input, restarts,
the memory endpoints and ``memory-plugin serve`` under SIGTERM. The framework clients are in
test_server_clients.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from memory_plugin import MemoryPool, testing  # noqa: E402
from memory_plugin.server import create_app  # noqa: E402

MODEL = "tiny"


@contextlib.contextmanager
def running(app):
    """``app`` served on a free loopback port; yields its base URL (``.../v1``). Stopping runs the
    app's shutdown, which closes its pool."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture
def serve(tmp_path, tiny_model, tiny_tokenizer):
    """``serve(keys=None, root=tmp_path, **create_app kwargs)``: a running server (context manager)."""

    @contextlib.contextmanager
    def start(keys=None, root=None, **kw):
        pool = MemoryPool(root or tmp_path / "memories", tiny_model, tiny_tokenizer, testing.TINY_CONFIG, max_open=4)
        app = create_app(pool, keys, model_name=MODEL, **kw)
        with running(app) as url:
            yield url, app

    return start


def chat(url, messages, *, key=None, thread=None, **body):
    headers = {"Authorization": f"Bearer {key or 'none'}"}
    if thread:
        headers["X-Thread-Id"] = thread
    body = {"model": MODEL, "messages": messages, "max_tokens": 3, **body}
    return httpx.post(f"{url}/chat/completions", json=body, headers=headers, timeout=60)


def user(text):
    return {"role": "user", "content": text}


def test_thread_reuses_memory_and_lists_it(serve):
    with serve() as (url, _):
        first = chat(url, [{"role": "system", "content": "Be brief."}, user("Where is the blue folder?")], thread="t1")
        assert first.status_code == 200 and first.headers["x-thread-id"] == "t1"
        body = first.json()
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        reply = body["choices"][0]["message"]["content"] or "ok"
        convo = [{"role": "system", "content": "Be brief."}, user("Where is the blue folder?")]
        second = chat(url, [*convo, {"role": "assistant", "content": reply}, user("And the red one?")], thread="t1")
        usage = second.json()["usage"]
        assert 0 < usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]

        # No thread named: the open thread this conversation extends is found by its prefix.
        third = chat(url, [*convo, {"role": "assistant", "content": reply}, user("And the red one?"),
                           {"role": "assistant", "content": "x"}, user("Thanks")])  # fmt: skip
        assert third.headers["x-thread-id"] == "t1"
        assert third.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > usage["prompt_tokens_details"]["cached_tokens"]
        # A conversation that only repeats a thread's start gets a thread of its own.
        assert chat(url, convo).headers["x-thread-id"] != "t1"
        # The thread can also come from OpenAI's fields.
        assert chat(url, [user("hi")], prompt_cache_key="t2").headers["x-thread-id"] == "t2"
        assert chat(url, [user("hi")], metadata={"thread_id": "t3"}).headers["x-thread-id"] == "t3"

        threads = {t["id"]: t for t in httpx.get(f"{url}/threads").json()["data"]}
        assert {"t1", "t2", "t3"} <= set(threads)
        info = httpx.get(f"{url}/threads/t1").json()
        assert info["entries"] == 6 and info["tokens"] > 0
        msgs = httpx.get(f"{url}/threads/t1/messages").json()["data"]
        assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]


def test_stream_sends_chunks_usage_and_done(serve):
    with serve() as (url, _):
        body = {"model": MODEL, "messages": [user("hi")], "max_tokens": 4, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        with httpx.stream("POST", f"{url}/chat/completions", json=body, headers={"X-Thread-Id": "s"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 4


def test_responses_continue_from_previous_response_id(serve):
    with serve() as (url, app):
        post = lambda **b: httpx.post(f"{url}/responses", json={"model": MODEL, "max_output_tokens": 3, **b}, timeout=60)  # noqa: E731
        first = post(input="The pass key is 12345.", instructions="Remember facts.").json()
        conv = first["conversation"]["id"]
        second = post(input="What is the pass key?", previous_response_id=first["id"]).json()
        assert second["conversation"]["id"] == conv
        assert second["usage"]["input_tokens_details"]["cached_tokens"] > 0
        msgs = httpx.get(f"{url}/threads/{conv}/messages").json()["data"]
        assert [m["role"] for m in msgs][:3] == ["system", "user", "assistant"]  # the reply is held
        assert msgs[1]["content"] == "The pass key is 12345."
        # The conversation id alone continues after everything the thread holds.
        third = post(input=[{"role": "user", "content": "Again?"}], conversation=conv).json()
        assert third["usage"]["input_tokens_details"]["cached_tokens"] >= second["usage"]["input_tokens"]
        # Branching back to an earlier response is refused once the thread went on past it... unless it is
        # still a prefix: continuing from `first` again is a prefix of the thread, so it is allowed.
        assert post(input="Branch", previous_response_id=first["id"]).status_code == 200
        assert post(input="x", previous_response_id=third["id"]).status_code == 409
        assert post(input="x", previous_response_id="resp_missing").status_code == 404


def test_concurrent_responses_on_one_conversation_follow_one_another_whole(serve):
    """Each turn reads the thread's history, adds its input and stores its reply in one hold of the
    thread: turns sent at once on one conversation end as alternating input/reply pairs, each reply
    after its own input (before, two turns could read the same history and leave an input with no
    reply after it)."""
    from concurrent.futures import ThreadPoolExecutor

    with serve(max_concurrency=4) as (url, _):
        conv = "conv-burst"
        notes = [f"note number {i}" for i in range(8)]

        def respond(note):
            body = {"model": MODEL, "input": note, "conversation": conv, "max_output_tokens": 3, "stream": note.endswith(("1", "5"))}
            if not body["stream"]:
                return httpx.post(f"{url}/responses", json=body, timeout=120).json()["output"][0]["content"][0]["text"]
            with httpx.stream("POST", f"{url}/responses", json=body, timeout=120) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
            return events[-1]["response"]["output"][0]["content"][0]["text"]

        with ThreadPoolExecutor(8) as ex:
            replies = dict(zip(notes, ex.map(respond, notes)))
        held = [(m["role"], m["content"]) for m in httpx.get(f"{url}/threads/{conv}/messages").json()["data"]]
        assert [role for role, _ in held] == ["user", "assistant"] * len(notes), held
        pairs = list(zip(held[::2], held[1::2]))
        assert sorted(u for (_, u), _ in pairs) == sorted(notes)  # every input once
        assert all(reply == replies[note] for (_, note), (_, reply) in pairs)  # its own reply after it


def test_tenants_see_only_their_threads(serve):
    keys = {"key-a": "alice", "key-b": "bob"}
    with serve(keys) as (url, _):
        assert chat(url, [user("alice's secret: 4242")], key="key-a", thread="shared-name").status_code == 200
        resp = httpx.post(f"{url}/responses", json={"model": MODEL, "input": "hello", "max_output_tokens": 2},
                          headers={"Authorization": "Bearer key-a"}).json()  # fmt: skip
        bob = {"Authorization": "Bearer key-b"}
        assert httpx.get(f"{url}/threads", headers=bob).json()["data"] == []
        for method, path, body in (
            ("GET", "/threads/shared-name", None),
            ("GET", "/threads/shared-name/messages", None),
            ("POST", "/threads/shared-name/search", {"query": "secret"}),
            ("POST", "/threads/shared-name/forget", {"contains": "secret"}),
            ("DELETE", "/threads/shared-name", None),
            ("GET", f"/threads/{resp['conversation']['id']}", None),
        ):
            r = httpx.request(method, url + path, json=body, headers=bob)
            assert r.status_code == 404, (method, path)
            assert "4242" not in r.text
        r = httpx.post(f"{url}/responses", headers=bob,
                       json={"model": MODEL, "input": "x", "previous_response_id": resp["id"]})  # fmt: skip
        assert r.status_code == 404
        # Bob's thread of the same name is his own, and empty of alice's words.
        assert chat(url, [user("bob here")], key="key-b", thread="shared-name").status_code == 200
        msgs = httpx.get(f"{url}/threads/shared-name/messages", headers=bob).json()["data"]
        assert [{k: m[k] for k in ("role", "content")} for m in msgs] == [{"role": "user", "content": "bob here"}]
        for auth in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.get(f"{url}/threads", headers=auth)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_disconnect_mid_stream_releases_the_thread(serve):
    with serve() as (url, app):
        running = app.state.server.running
        body = {"model": MODEL, "messages": [user("talk")], "max_tokens": 3000, "min_tokens": 3000, "stream": True}
        with httpx.stream("POST", f"{url}/chat/completions", json=body, headers={"X-Thread-Id": "d"}, timeout=60) as r:
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
            assert got and running  # generating
        # The client is gone: the turn stops and the thread is free well before 3000 tokens.
        deadline = time.monotonic() + 20
        while running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running
        t = time.monotonic()
        r = chat(url, [user("talk"), {"role": "assistant", "content": "ok"}, user("again")], thread="d")
        assert r.status_code == 200 and time.monotonic() - t < 20


def test_bad_input_gets_openai_errors_and_stores_nothing(serve, tmp_path):
    good = {"model": MODEL, "messages": [user("hi")]}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    cases = [
        ({**good, "model": "gpt-4"}, 404, "model"),
        ({**good, "messages": []}, 400, "messages"),
        ({**good, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ({**good, "messages": [{"role": "user", "content": "  "}]}, 400, "messages[0].content"),
        ({**good, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content[0]"),
        ({**good, "temperature": -1}, 400, "temperature"),
        ({**good, "top_p": 0}, 400, "top_p"),
        ({**good, "max_tokens": 0}, 400, "max_tokens"),
        ({**good, "max_completion_tokens": 10**6}, 400, "max_completion_tokens"),
        ({**good, "stop": 5}, 400, "stop"),
        ({**good, "n": 2}, 400, "n"),
        ({**good, "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
        ({**good, "tool_choice": "required"}, 400, "tool_choice"),
        ({k: v for k, v in good.items() if k != "model"}, 400, "model"),
    ]
    with serve(max_body_bytes=10_000) as (url, _):
        for body, status, param in cases:
            r = httpx.post(f"{url}/chat/completions", json=body, headers={"X-Thread-Id": "bad"})
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
        r = httpx.post(f"{url}/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"]
        r = httpx.post(f"{url}/chat/completions", json={**good, "messages": [user("x" * 20_000)]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: refused while reading
            yield json.dumps({**good, "messages": [user("y" * 20_000)]}).encode()

        r = httpx.post(f"{url}/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        r = httpx.post(f"{url}/responses", json={"model": MODEL, "input": [{"type": "message", "content": "x"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].role"
        r = httpx.post(f"{url}/threads/bad/forget", json={})
        assert r.status_code == 400
        assert httpx.get(f"{url}/threads").json()["data"] == []
        assert httpx.get(f"{url}/nowhere").json()["error"]["code"] == "not_found"


def test_restart_continues_a_thread_from_disk(serve, tmp_path):
    root = tmp_path / "m"
    convo = [user("The meeting moved to Thursday.")]
    with serve(root=root) as (url, _):
        reply = chat(url, convo, thread="r").json()["choices"][0]["message"]["content"] or "noted"
        first = httpx.post(f"{url}/responses", json={"model": MODEL, "input": "Remember 7.", "max_output_tokens": 2}).json()
    with serve(root=root) as (url, _):  # a new pool on the same directory
        r = chat(url, [*convo, {"role": "assistant", "content": reply}, user("When is it?")], thread="r").json()
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        again = httpx.post(f"{url}/responses", json={"model": MODEL, "input": "Which number?",
                           "previous_response_id": first["id"], "max_output_tokens": 2}).json()  # fmt: skip
        assert again["usage"]["input_tokens_details"]["cached_tokens"] > 0


def test_search_forget_delete(serve):
    with serve() as (url, _):
        convo = [user("The vault code is 8812."), {"role": "assistant", "content": "Noted."}, user("The sky is blue.")]
        chat(url, convo, thread="f")
        hits = httpx.post(f"{url}/threads/f/search", json={"query": "vault code", "k": 2, "mode": "lexical"}).json()
        assert "vault" in hits["data"][0]["text"] and hits["data"][0]["message_index"] == 0
        reranked = httpx.post(f"{url}/threads/f/search", json={"query": "vault code", "k": 3, "mode": "rerank"}).json()
        assert {h["message_index"] for h in reranked["data"]} <= {0, 1, 2} and reranked["data"]
        assert all("rerank" in h["channels"] for h in reranked["data"])
        assert httpx.post(f"{url}/threads/f/search", json={"query": "x", "mode": "bm25"}).status_code in (400, 422)
        r = httpx.post(f"{url}/threads/f/forget", json={"contains": "vault"}).json()
        assert r == {"thread": "f", "forgotten": 1}
        msgs = httpx.get(f"{url}/threads/f/messages").json()["data"]
        assert all("8812" not in m["content"] for m in msgs) and len(msgs) == 2
        assert httpx.post(f"{url}/threads/f/forget", json={"indices": [5]}).status_code == 400
        assert httpx.delete(f"{url}/threads/f").json() == {"id": "f", "object": "thread.deleted", "deleted": True}
        assert httpx.get(f"{url}/threads/f").status_code == 404
        assert httpx.delete(f"{url}/threads/f").status_code == 404


def test_serve_command_refuses_open_host_and_exits_on_sigterm(tmp_path, tiny_model, tiny_tokenizer):
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    cli = [sys.executable, "-m", "memory_plugin.cli", "serve", "--memory-dir", str(tmp_path / "mem"), "--model", str(model_dir)]
    env = {**os.environ, "MEMORY_PLUGIN_API_KEYS": ""}
    refused = subprocess.run([*cli, "--host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 2 and "loopback" in refused.stderr

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([*cli, "--port", str(port), "--model-name", MODEL], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/models")
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
                time.sleep(0.1)
        assert chat(url, [user("hi")], thread="sig").status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "127.0.0.1 only" in err and "Application shutdown complete" in err
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    assert list(Path(tmp_path / "mem" / "t-default" / "t-sig").glob("state-*"))  # the final snapshot
