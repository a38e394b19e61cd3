"""Many conversations over one model, each encoded once.

Agent frameworks (LangChain, LlamaIndex) resend the whole conversation on every call. A
:class:`ConversationPool` keeps a small LRU of memories and, for each call, finds the one whose
history is a prefix of the incoming messages, so only the new suffix is encoded. A conversation
that does not extend any kept memory (another user, an edited history) still gets a correct
memory: the last message can be swapped cheaply (a checkpoint is kept before it), otherwise the
conversation is encoded from scratch.

Example:
    >>> pool = ConversationPool(model, tokenizer)  # doctest: +SKIP
    >>> with pool.conversation(messages, thread_id="alice") as conv:  # doctest: +SKIP
    ...     reply = conv.memory.generate(None)  # the assistant's next turn
    ...     conv.reused_tokens  # tokens that were not encoded again
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .chat import check_message
from .config import MemoryConfig
from .memory import Checkpoint, ContextMemory


@dataclass
class Conversation:
    """A memory that holds exactly the messages passed to :meth:`ConversationPool.conversation`."""

    memory: ContextMemory
    reused_tokens: int  # tokens of the history that were already encoded
    new_tokens: int  # tokens encoded for this call
    key: str


@dataclass
class _Slot:
    memory: ContextMemory
    messages: list[dict]
    before_last: Checkpoint | None = None  # state before the last message, to swap it cheaply
    lock: threading.Lock | None = None

    def __post_init__(self):
        self.lock = threading.Lock()


class ConversationPool:
    """An LRU of :class:`ContextMemory` objects sharing one model, keyed by ``thread_id`` when given,
    else by the conversation itself (found by prefix).

    Args:
        model, tokenizer: a loaded Llama-family model (see :func:`memory_plugin.load_model`).
        config: the memory geometry for new conversations.
        max_conversations: memories kept; the least recently used is dropped beyond it.
        memory: an existing memory to serve as the first conversation (its entries must be chat
            messages).
    """

    def __init__(
        self,
        model=None,
        tokenizer=None,
        config: MemoryConfig | None = None,
        *,
        max_conversations: int = 4,
        memory: ContextMemory | None = None,
    ):
        if max_conversations < 1:
            raise ValueError(f"max_conversations must be >= 1, got {max_conversations}")
        if memory is not None:
            model, tokenizer, config = memory.model, memory.tokenizer, memory.config
        if model is None or tokenizer is None:
            raise ValueError("ConversationPool needs a model and tokenizer, or an existing memory")
        self.model, self.tokenizer, self.config = model, tokenizer, config or MemoryConfig()
        self.max_conversations = max_conversations
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._lock = threading.Lock()
        self._anon = 0
        if memory is not None:
            msgs = memory.messages
            if any(m["role"] is None for m in msgs):
                raise ValueError("the memory holds raw text (add_text); a conversation pool needs chat messages")
            self._slots["memory"] = _Slot(memory, msgs)

    @contextlib.contextmanager
    def conversation(self, messages: Sequence[dict], thread_id: str | None = None) -> Iterator[Conversation]:
        """A memory holding exactly ``messages``, locked for the duration of the ``with`` block.

        Generate with ``conversation.memory.generate(None, ...)`` (``remember=False``, the default,
        keeps the memory equal to ``messages`` so the next call's prefix matches).
        """
        msgs = check_messages(messages)
        key, slot = self._checkout(msgs, thread_id)
        with slot.lock:
            reused, new = self._sync(slot, msgs)
            yield Conversation(slot.memory, reused, new, key)

    def __len__(self) -> int:
        return len(self._slots)

    def _checkout(self, msgs: list[dict], thread_id: str | None) -> tuple[str, _Slot]:
        with self._lock:
            if thread_id is not None:
                key = f"thread:{thread_id}"
                slot = self._slots.get(key)
            else:  # the kept conversation sharing the longest prefix, usable only if it is all a prefix
                key, slot, best = None, None, -1
                for k, s in self._slots.items():
                    n = _common_prefix(s.messages, msgs)
                    usable = n == len(s.messages) or (n == len(s.messages) - 1 and s.before_last is not None)
                    if usable and n > best and not k.startswith("thread:"):
                        key, slot, best = k, s, n
                if slot is None:
                    self._anon += 1
                    key = f"anon:{self._anon}"
            if slot is None:
                slot = _Slot(ContextMemory(self.model, self.tokenizer, self.config), [])
                self._slots[key] = slot
            self._slots.move_to_end(key)
            while len(self._slots) > self.max_conversations:
                self._slots.popitem(last=False)
            return key, slot

    def _sync(self, slot: _Slot, msgs: list[dict]) -> tuple[int, int]:
        reused, new, slot.before_last = sync_messages(slot.memory, slot.messages, msgs, slot.before_last)
        slot.messages = list(msgs)
        return reused, new


def check_messages(messages: Sequence[dict]) -> list[dict]:
    """``messages`` as plain ``{"role", "content"}`` dicts, each checked; at least one."""
    if isinstance(messages, (str, dict)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content'")
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    for m in msgs:
        check_message(m["role"], m["content"])
    if not msgs:
        raise ValueError("messages is empty")
    return msgs


def sync_messages(
    mem: ContextMemory, held: list[dict], msgs: list[dict], before_last: Checkpoint | None
) -> tuple[int, int, Checkpoint | None]:
    """Bring ``mem`` (holding the messages ``held``) to hold exactly ``msgs``: what they share
    is kept; when only the last held message differs it is swapped through ``before_last`` (the
    checkpoint taken before it), otherwise the memory is cropped to the shared messages (an open
    memory from its last snapshot before them; see :meth:`ContextMemory.crop`). Returns the tokens
    reused, the tokens encoded, and the new checkpoint before the last message."""
    n = _common_prefix(held, msgs)
    encoded_again = 0
    if n < len(held):
        if n == len(held) - 1 and before_last is not None:
            mem.rollback(before_last)  # only the last message changed (edit, regenerate)
        elif n > 0 and len(mem.entries) == len(held):  # one entry per held message
            encoded_again = mem.crop(n)
        else:
            mem.reset()
            n = 0
        before_last = None
    reused = len(mem) - encoded_again
    todo = msgs[n:]
    if todo:
        if len(todo) > 1:
            mem.add_messages(todo[:-1])
        before_last = mem.checkpoint()
        mem.add_messages(todo[-1:])
    return reused, len(mem) - reused, before_last


def _common_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
