"""The memory server on Ray Serve (``memory_plugin/server/ray_app.py``) on a local Ray cluster this
module starts on loopback: 2 replicas of the tiny model over one shared memory directory.

Routing (a thread's turns land on the replica holding it, threads spread over both), same-thread
turns at once (serialised on one replica, the thread left holding one whole turn), a thread held
open by another process (waited for, then a 409 ``thread_busy``), and a replica killed (SIGKILL)
mid-turn (completed turns kept, the interrupted one absent, the thread reopened elsewhere). ~47 s
in all on 2 shared cores, 34 s of it starting the cluster, so both run in ``make test``."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from ray import serve  # noqa: E402

from memory_plugin import MemoryPool  # noqa: E402
from memory_plugin.server.ray_app import HELD_HEADER, REPLICA_HEADER, THREAD_HEADER, deployment  # noqa: E402

MODEL = "memory-plugin"
LOCK_WAIT = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-memories")
    port = _free_port()
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(
            str(root), replicas=2, loader="memory_plugin.testing:tiny_pair", lock_wait=LOCK_WAIT,
            replica_cpus=0.5, torch_threads=1,
        )  # fmt: skip
        serve.run(app, name="memory-plugin", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=120) as client:
            yield client, root
    finally:
        serve.shutdown()
        ray.shutdown()


def chat(client, thread: str, content: str, *, max_tokens: int = 3, system: str | None = None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    body = {"model": MODEL, "messages": msgs, "max_tokens": max_tokens}
    return client.post("/chat/completions", json=body, headers={"X-Thread-Id": thread, THREAD_HEADER: thread})


def retry_busy(send, tries: int = 30):
    """``send()`` until it is not a 409; each refusal must be thread_busy, retried after its
    Retry-After (what docs/SCALING.md asks of clients: the replica not holding a thread refuses)."""
    for _ in range(tries):
        r = send()
        if r.status_code != 409:
            return r
        assert r.json()["error"]["code"] == "thread_busy", r.text
        time.sleep(float(r.headers["retry-after"]))
    return r


def messages(client, thread: str) -> list[dict]:
    """The thread's messages, read as a client must (``retry_busy``: a fresh-clone run's read right
    after a burst of turns reached the replica not holding the thread)."""
    r = retry_busy(lambda: client.get(f"/threads/{thread}/messages", headers={THREAD_HEADER: thread}))
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_threads_route_to_their_replica_serialise_and_wait_for_another_writer(cluster, tiny_model, tiny_tokenizer):
    client, root = cluster
    # Routing: each thread's turns land on one replica (multiplexing), and the threads use both.
    where: dict[str, set[str]] = {}
    held = []
    for turn in range(3):
        for thread in ("t0", "t1", "t2", "t3"):
            # A turn right after the thread's last may still reach the replica that does not hold it
            # (Ray learns the holder asynchronously; docs/SCALING.md): it is refused, never served,
            # and retried after Retry-After as clients must. Every turn that is served, is served
            # by the thread's one replica.
            r = retry_busy(lambda: chat(client, thread, f"turn {turn} of {thread}"))
            assert r.status_code == 200, r.text
            where.setdefault(thread, set()).add(r.headers[REPLICA_HEADER])
            held.append((turn, r.headers[HELD_HEADER]))
    assert all(len(replicas) == 1 for replicas in where.values()), where
    assert len(set().union(*where.values())) == 2, where
    # the replica says whether it already held the thread open: not on a thread's first turn, then yes
    assert held == [(turn, "0" if turn == 0 else "1") for turn, _ in held], held

    # Six turns at once on one thread, once a first turn made a replica hold it. Ray learns which
    # replica holds a thread asynchronously, so a turn may still reach the other one, which refuses
    # with 409 thread_busy (never writes); it is retried after Retry-After, as clients must
    # (docs/SCALING.md). Each resends the conversation with its own last message; the thread ends
    # holding the conversation of exactly one of them, whole.
    first = chat(client, "same", "first", system="Keep notes.")
    assert first.status_code == 200, first.text
    start = [("system", "Keep notes."), ("user", "first"), ("assistant", first.json()["choices"][0]["message"]["content"])]

    def turn(note):
        msgs = [{"role": role, "content": text} for role, text in start] + [{"role": "user", "content": note}]
        body = {"model": MODEL, "messages": msgs, "max_tokens": 3}
        return retry_busy(lambda: client.post("/chat/completions", json=body, headers={"X-Thread-Id": "same", THREAD_HEADER: "same"}))

    notes = [f"note number {i}" for i in range(6)]
    with ThreadPoolExecutor(6) as ex:
        replies = list(ex.map(turn, notes))
    assert [r.status_code for r in replies] == [200] * 6, [r.text for r in replies if r.status_code != 200]
    assert all(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0 for r in replies)
    held = [(m["role"], m["content"]) for m in messages(client, "same")]
    assert held[:3] == start and len(held) == 4 and held[3][0] == "user" and held[3][1] in notes, held

    # Another process holds the thread open for writing (as a second replica would): the replica
    # waits LOCK_WAIT seconds, then refuses clearly; once it lets go, the turn goes through.
    other = MemoryPool(root, tiny_model, tiny_tokenizer)
    with other.thread("default", "held") as mem:
        mem.add_message("user", "written by the other process")
    refused = chat(client, "held", "from the server")
    assert refused.status_code == 409 and refused.headers["retry-after"] == "1"
    err = refused.json()["error"]
    assert err["code"] == "thread_busy" and "another server replica" in err["message"]
    other.close()
    r = chat(client, "held", "from the server")
    assert r.status_code == 200, r.text
    assert [m["content"] for m in messages(client, "held")][0] == "from the server"  # the conversation sent


def test_a_replica_killed_mid_turn_loses_no_completed_turn(cluster):
    client, _ = cluster
    thread, headers = "fault", {THREAD_HEADER: "fault"}

    def respond(text):
        # As a client should: retry a 409 thread_busy after its Retry-After. Ray tells its router
        # which replica loaded a thread asynchronously, so a turn right after the thread's first
        # one (or after a restart) can reach a replica that does not hold it.
        body = {"model": MODEL, "input": text, "conversation": thread, "max_output_tokens": 3}
        for _ in range(30):
            r = client.post("/responses", json=body, headers=headers)
            if r.status_code != 409:
                return r
            time.sleep(float(r.headers["retry-after"]))
        return r

    completed = []
    for i in range(2):  # two completed turns (the Responses API stores each reply)
        r = respond(f"fact {i}")
        assert r.status_code == 200, r.text
        completed += [("user", f"fact {i}"), ("assistant", r.json()["output"][0]["content"][0]["text"])]

    # A long streamed turn; its replica is killed (SIGKILL, no clean-up) once the first piece arrives.
    body = {"model": MODEL, "input": "interrupted", "conversation": thread, "max_output_tokens": 400, "stream": True}
    with client.stream("POST", "/responses", json=body, headers=headers) as s:
        pid = int(s.headers[REPLICA_HEADER].rsplit(":", 1)[1])
        lines = s.iter_lines()
        for line in lines:
            if "output_text.delta" in line:
                break
        os.kill(pid, signal.SIGKILL)
        try:  # the stream ends with an error or is cut; either way it stops
            for _ in lines:
                pass
        except httpx.HTTPError:
            pass

    # Ray restarts the replica (or routes elsewhere); the thread reopens from its durable directory.
    deadline = time.monotonic() + 300
    while True:
        try:
            r = client.get(f"/threads/{thread}/messages", headers=headers)
            if r.status_code == 200 and r.headers[REPLICA_HEADER].rsplit(":", 1)[1] != str(pid):
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "no replica answered for the thread after the kill"
        time.sleep(1)
    held = [(m["role"], m["content"]) for m in r.json()["data"]]
    # Every completed turn is there, and the interrupted one is absent: a Responses turn's input and
    # reply become durable together at its end (ContextMemory.atomic), so a replica killed while it
    # generated left neither (it could only be whole had it finished its 400 tokens first).
    assert held == completed or held == [*completed, ("user", "interrupted"), held[-1]], held
    assert held[-1][0] == "assistant"
    # and the thread goes on from it
    r = respond("after")
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["input_tokens_details"]["cached_tokens"] > 0


def test_cli_refuses_bad_ray_flags(tmp_path, capsys):
    from memory_plugin.cli import main

    assert main(["serve", "--ray", "--replicas", "0", "--memory-dir", str(tmp_path)]) == 2
    assert "--replicas must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--ray", "--host", "0.0.0.0", "--memory-dir", str(tmp_path)]) == 2
    assert "only loopback" in capsys.readouterr().err
