"""``ContextMemory.atomic()``: a turn's input and reply become durable together or not at all
(issue 23: a turn killed mid-way is "either complete or absent")."""

import ast
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from memory_plugin import ContextMemory, testing

from .test_context import _state

ROOT = Path(__file__).resolve().parents[1]
BASE = [("system", "Be brief."), ("user", "The sky is blue."), ("assistant", "Noted.")]


def _open(path, tiny_model, tiny_tokenizer, **kw):
    return ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer, config=testing.TINY_CONFIG, **kw)


def _pairs(mem) -> list[tuple]:
    return [(m["role"], m["content"]) for m in mem.messages]


def test_entries_of_a_block_reach_the_log_together_at_its_end(tmp_path, tiny_model, tiny_tokenizer):
    path = tmp_path / "m"
    mem = _open(path, tiny_model, tiny_tokenizer, snapshot_every=7)  # a snapshot due at every add
    for role, content in BASE:
        mem.add_message(role, content)
    with mem.atomic():
        mem.add_message("user", "What colour is the sky?")
        reply = mem.generate(None, max_new_tokens=6, min_new_tokens=6)
        mem.add_message("assistant", reply)
        # a reader of the directory sees the memory as before the block, snapshot included
        assert _pairs(ContextMemory.load(path, tiny_model, tokenizer=tiny_tokenizer)) == BASE
        assert len(mem.messages) == len(BASE) + 2
    after = _pairs(mem)
    assert after == [*BASE, ("user", "What colour is the sky?"), ("assistant", reply)]
    assert _pairs(ContextMemory.load(path, tiny_model, tokenizer=tiny_tokenizer)) == after
    mem.add_message("user", "and now?")  # outside a block every add is durable at once again
    assert _pairs(ContextMemory.load(path, tiny_model, tokenizer=tiny_tokenizer))[-1] == ("user", "and now?")
    mem.close()


@pytest.mark.parametrize("durable", [False, True])
def test_an_exception_in_a_block_rolls_the_memory_back_to_its_start(tmp_path, tiny_model, tiny_tokenizer, durable):
    mem = _open(tmp_path / "m", tiny_model, tiny_tokenizer) if durable else ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG)
    for role, content in BASE:
        mem.add_message(role, content)
    tokens, state = mem.token_ids, _state(mem._engine.ctx)
    with pytest.raises(RuntimeError, match="client gone"):
        with mem.atomic():
            mem.add_message("user", "half a turn")
            with mem.atomic():  # nested: the outer block decides
                mem.add_message("assistant", "half a reply")
            raise RuntimeError("client gone")
    assert _pairs(mem) == BASE and mem.token_ids == tokens and _state(mem._engine.ctx) == state
    if durable:
        mem.close()
        assert _pairs(ContextMemory.load(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer)) == BASE


CHILD = textwrap.dedent(
    """
    import sys, time
    from memory_plugin import ContextMemory, testing
    tok = testing.tiny_tokenizer()
    model = testing.tiny_llama(len(tok))
    mem = ContextMemory.open(sys.argv[1], model, tokenizer=tok, config=testing.TINY_CONFIG, snapshot_every=50)
    for role, content in {base!r}:
        mem.add_message(role, content)
    for i in range(3):
        with mem.atomic():
            mem.add_message("user", f"question {{i}}")
            reply = ""
            n = 8 if i < 2 else 400  # the last turn is long: it is killed mid-way
            for piece in mem.stream(None, max_new_tokens=n, min_new_tokens=n):
                if not reply:
                    print("GEN", i, flush=True)
                reply += piece
            mem.add_message("assistant", reply)
        print("DONE", i, repr(reply), flush=True)
    time.sleep(60)
    """
)


def test_a_turn_killed_mid_generation_is_absent_after_reopening(tmp_path, tiny_model, tiny_tokenizer):
    path = tmp_path / "m"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(base=BASE), str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    replies = []
    try:
        for line in proc.stdout:
            if line.startswith("DONE"):
                replies.append(ast.literal_eval(line.split(" ", 2)[2]))  # the repr the child printed
            if line.startswith("GEN 2"):
                break
        proc.send_signal(signal.SIGKILL)  # mid-generation of turn 2, its input already encoded
    finally:
        proc.kill()
        proc.wait()
    assert len(replies) == 2
    done = [*BASE]
    for i, reply in enumerate(replies):
        done += [("user", f"question {i}"), ("assistant", reply)]
    mem = _open(path, tiny_model, tiny_tokenizer)
    assert _pairs(mem) == done  # both completed turns whole, the interrupted one absent
    fresh = ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG)
    for role, content in done:  # one call per message, as the writer did: the same chunks
        fresh.add_message(role, content)
    assert mem.token_ids == fresh.token_ids and _state(mem._engine.ctx) == _state(fresh._engine.ctx)
    mem.add_message("user", "still works")
    mem.close()
