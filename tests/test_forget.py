"""forget(): removed entries leave nothing behind, in RAM, in files, after a crash."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memory_plugin import ContextMemory, testing

from .test_context import _state

ROOT = Path(__file__).resolve().parents[1]
FILLER = "The grass is green. The sky is blue. Here we go. There and back again. "
SECRET = "The vault combination is zebra-quartz-8812."
MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": FILLER * 6},
    {"role": "user", "content": SECRET},
    {"role": "assistant", "content": "Noted."},
    {"role": "user", "content": FILLER * 4 + "My badge is 5531."},
]


def _memory(model, tok, **kw):
    mem = ContextMemory(model, tok, testing.TINY_CONFIG, **kw)
    mem.add_messages(MSGS)
    return mem


def _bytes_under(path: Path) -> bytes:
    return b"".join(f.read_bytes() for f in path.rglob("*") if f.is_file())


def test_forget_removes_the_entries_and_what_was_derived_from_them(tiny_model, tiny_tokenizer):
    mem = _memory(tiny_model, tiny_tokenizer)
    cp = mem.checkpoint()
    secret_ids = mem.token_ids[mem.entries[2].start : mem.entries[2].end]
    assert mem.forget(where=lambda e: "vault" in e.content) == 1
    assert mem.messages == MSGS[:2] + MSGS[3:]
    assert not any("zebra" in h.text for h in mem.retrieve("vault combination zebra quartz", k=10))
    ids = mem.token_ids
    assert all(ids[i : i + len(secret_ids)] != secret_ids for i in range(len(ids)))
    # the same memory as one that never held it, from the same token ids
    fresh = ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG)
    for e in mem.entries:
        fresh.add_messages([{"role": e.role, "content": e.content}])
    assert fresh.token_ids == ids and _state(fresh._engine.ctx) == _state(mem._engine.ctx)
    with pytest.raises(ValueError, match="no longer valid"):
        mem.rollback(cp)
    kept = [mem.token_ids[e.start : e.end] for e in mem.entries[1:-1]]
    assert mem.forget([0, -1]) == 2 and mem.messages == [MSGS[1], MSGS[3]]
    bos = mem._engine.chat.bos  # the new first entry starts the history (with BOS, if the model has one)
    assert mem.token_ids == bos + sum(kept, []) or mem.token_ids == sum(kept, [])
    assert mem.forget([]) == 0 and mem.messages == [MSGS[1], MSGS[3]]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: m.forget(), ValueError, "indices= or where="),
        (lambda m: m.forget([9]), IndexError, "indices: 9"),
        (lambda m: m.forget(["0"]), IndexError, "indices: '0'"),
        (lambda m: m.forget("0"), TypeError, "indices must be"),
        (lambda m: m.forget(where="vault"), TypeError, "where must be"),
    ],
)
def test_bad_forget_arguments_name_the_argument_and_change_nothing(tiny_model, tiny_tokenizer, call, error, match):
    mem = _memory(tiny_model, tiny_tokenizer)
    before, msgs = _state(mem._engine.ctx), mem.messages
    with pytest.raises(error, match=match):
        call(mem)
    assert _state(mem._engine.ctx) == before and mem.messages == msgs


@pytest.mark.parametrize("snapshot_every", [10_000, 64])  # no snapshot before the entry / one before it
def test_a_forgotten_entry_is_in_no_file_of_an_open_memory(tmp_path, tiny_model, tiny_tokenizer, snapshot_every):
    path = tmp_path / "m"
    mem = ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer, config=testing.TINY_CONFIG, snapshot_every=snapshot_every)
    mem.add_messages(MSGS[:2])
    mem.save(path)  # a snapshot covering the first two entries
    mem.add_messages(MSGS[2:])
    secret_ids = torch.tensor(mem.token_ids[mem.entries[2].start : mem.entries[2].end], dtype=torch.int32)
    assert b"zebra" in _bytes_under(path)
    mem.forget([2])
    mem.add_message("user", "still writable")
    msgs, ids, state = mem.messages, mem.token_ids, _state(mem._engine.ctx)
    data = _bytes_under(path)
    assert b"zebra" not in data and secret_ids.numpy().tobytes() not in data
    mem.close()
    data = _bytes_under(path)
    assert b"zebra" not in data and secret_ids.numpy().tobytes() not in data
    with ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer) as again:
        assert again.messages == msgs and again.token_ids == ids and _state(again._engine.ctx) == state
        assert not again.retrieve("vault zebra", k=5) or all("zebra" not in h.text for h in again.retrieve("vault zebra", k=5))


def _same_as_fresh(mem, model, tok, groups=None):
    """``mem`` holds what a new memory holds after adding its messages in ``groups`` (by default one
    at a time, as a crop encodes them: chunks start at each entry)."""
    fresh = ContextMemory(model, tok, testing.TINY_CONFIG)
    for g in groups or [[m] for m in mem.messages]:
        fresh.add_messages(g)
    return fresh.token_ids == mem.token_ids and _state(fresh._engine.ctx) == _state(mem._engine.ctx)


def test_crop_keeps_a_prefix_as_if_the_rest_had_never_been_said(tiny_model, tiny_tokenizer):
    mem = _memory(tiny_model, tiny_tokenizer)
    assert mem.crop(len(MSGS)) == 0 and mem.messages == MSGS  # nothing to drop
    kept = mem.entries[2].end
    assert mem.crop(3) == kept  # in RAM the kept entries are encoded again from their token ids
    assert mem.messages == MSGS[:3] and len(mem) == kept and _same_as_fresh(mem, tiny_model, tiny_tokenizer)
    mem.add_message("user", "and then")
    assert mem.messages == MSGS[:3] + [{"role": "user", "content": "and then"}]
    assert mem.crop(0) == 0 and mem.messages == [] and len(mem) == 0


@pytest.mark.parametrize(
    "arg, error, match",
    [(-1, IndexError, "n_entries: -1"), (6, IndexError, "n_entries: 6"), ("2", TypeError, "n_entries must be"),
     (True, TypeError, "n_entries must be")],  # fmt: skip
)
def test_bad_crop_arguments_name_the_argument_and_change_nothing(tiny_model, tiny_tokenizer, arg, error, match):
    mem = _memory(tiny_model, tiny_tokenizer)
    before = _state(mem._engine.ctx)
    with pytest.raises(error, match=match):
        mem.crop(arg)
    assert _state(mem._engine.ctx) == before and mem.messages == MSGS


def test_an_open_memory_crops_from_its_snapshot_and_its_files_lose_the_rest(tmp_path, tiny_model, tiny_tokenizer):
    path = tmp_path / "m"
    with ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer, config=testing.TINY_CONFIG) as mem:
        mem.add_messages(MSGS[:2])
    with ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer, snapshot_every=10_000) as mem:
        mem.add_messages(MSGS[2:])  # after the snapshot, which covers the first two entries
        assert mem.crop(3) == mem.entries[2].end - mem.entries[1].end  # only the entry after the snapshot
        assert mem.messages == MSGS[:3] and _same_as_fresh(mem, tiny_model, tiny_tokenizer, [MSGS[:2], MSGS[2:3]])
        again = mem.crop(2)  # the crop's own snapshot covers three entries: no snapshot before two
        assert again == len(mem) and mem.messages == MSGS[:2]
        msgs, ids = mem.messages, mem.token_ids
    assert b"zebra" not in _bytes_under(path)
    with ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer) as again:
        assert again.messages == msgs == MSGS[:2] and again.token_ids == ids


_FORGETTER = """
import sys
from memory_plugin import ContextMemory, testing
tok = testing.tiny_tokenizer()
model = testing.tiny_llama(len(tok))
mem = ContextMemory.open(sys.argv[1], model, tokenizer=tok, config=testing.TINY_CONFIG)
print("READY", flush=True)
mem.forget(where=lambda e: "vault" in e.content)
print("DONE", flush=True)
mem.close()
"""


@pytest.mark.parametrize("seed", range(4))
def test_kill_9_during_a_forget_leaves_the_memory_before_or_after(tmp_path, tiny_model, tiny_tokenizer, seed):
    path = tmp_path / "m"
    with ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer, config=testing.TINY_CONFIG) as mem:
        for i in range(6):  # enough history that a forget re-encodes for a while
            mem.add_messages([{"role": "user", "content": f"{i}: " + FILLER * 5}])
        mem.add_messages(MSGS)
        before = mem.messages
    after = [m for m in before if "vault" not in m["content"]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _FORGETTER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "READY"
    time.sleep(random.Random(seed).uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    with ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer) as again:
        assert again.messages in (before, after)
        if again.messages == after:
            assert b"zebra" not in _bytes_under(path)
        else:  # not committed: forgetting again completes it
            again.forget(where=lambda e: "vault" in e.content)
            assert again.messages == after
    assert b"zebra" not in _bytes_under(path)


@pytest.mark.real_model
def test_a_forgotten_fact_is_no_longer_answered_and_others_still_are(real_model):
    model, tok = real_model
    mem = ContextMemory(model, tok)
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 8
    mem.add_text(filler + "The locker code of Ada is 4721. " + filler)
    mem.add_text(filler + "The badge number of Bruno is 9138. " + filler)
    ask = lambda q: mem.generate(q, max_new_tokens=6, chat=False)  # noqa: E731
    assert "4721" in ask("\nThe locker code of Ada is") and "9138" in ask("\nThe badge number of Bruno is")
    mem.forget(where=lambda e: "4721" in e.content)
    assert "4721" not in ask("\nThe locker code of Ada is")
    assert "9138" in ask("\nThe badge number of Bruno is")


@pytest.mark.parametrize("snapshot_every", [64, 10**9])
def test_forget_cost_is_what_the_forget_encodes_again_and_changes_nothing(tmp_path, tiny_model, tiny_tokenizer, snapshot_every):
    mem = ContextMemory.open(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer, config=testing.TINY_CONFIG, snapshot_every=snapshot_every)
    for i in range(10):
        mem.add_message("user", f"message {i} is about locker {i} and code {100 + i}.")
    for n in (7, 3):
        before = (mem.token_ids, mem.messages)
        cost = mem.forget_cost(list(range(n, len(mem.entries))))
        assert (mem.token_ids, mem.messages) == before
        assert cost == mem.crop(n) > 0  # crop(n) forgets the same entries and returns the tokens encoded again
    assert mem.forget_cost(where=lambda e: "nothing like this" in e.content) == 0
    with pytest.raises(IndexError, match="not an entry position"):
        mem.forget_cost([99])
    mem.close()
    ram = ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG)
    ram.add_messages([{"role": "user", "content": f"note {i}"} for i in range(4)])
    kept = [e for i, e in enumerate(ram.entries) if i != 2]
    assert ram.forget_cost([2]) == sum(e.end - e.start for e in kept)  # in RAM every kept entry is encoded again
