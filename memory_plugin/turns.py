"""One generation turn: its input (placed passages, prompt, generation prompt), sampling, streaming
the answer, explaining it, and leaving the memory as before or storing the turn.

A turn holds the memory's lock from its first token to its end. It encodes into the live context
after a checkpoint, so ``remember=False`` (and any failure) rolls back to exactly the state before;
``remember=True`` keeps the model's own tokens when they are exactly what storing the messages
would encode, and otherwise rolls back and appends the messages.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from . import recall
from .blocks import release_free_memory
from .chat import StreamDecoder, check_text
from .history import Entry
from .lexical import locate
from .recall import Answer, MemoryHit

PLACED_HEADER = "Earlier in this conversation:"


@dataclass
class Turn:
    """State of one generation, for ``remember`` and ``explain``."""

    prompt: str | None
    chat: bool = True
    prompt_tokens: int = 0
    answer: str = ""
    ended_by_stop_token: bool = False
    query: str | None = None  # what recall searches for (None: the prompt, else the last message)
    checkpoint: dict | None = field(default_factory=dict)
    placed: list[MemoryHit] = field(default_factory=list)  # placed before the prompt (recall)
    placed_at: list[tuple[int, int]] = field(default_factory=list)  # their spans in the turn's input, (0, 0) if not found
    explanation: Answer | None = None
    held: list = field(default_factory=list)  # the history's segments before the turn (explain)


class TurnStream(Iterator[str]):
    """What :meth:`ContextMemory.stream` returns: the answer's text pieces; once they are read,
    ``explanation`` holds the :class:`Answer` (with ``explain=True``)."""

    def __init__(self, pieces: Iterator[str], turn: Turn, owner: object = None):
        self._pieces, self._turn = pieces, turn
        self._owner = owner  # the memory stays open (not finalized) while its turn streams

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    @property
    def explanation(self) -> Answer | None:
        return self._turn.explanation

    @property
    def placed(self) -> list[MemoryHit]:
        """The passages recall placed before the prompt (known once the first piece is read)."""
        return list(self._turn.placed)


def start(
    engine,
    prompt: str | None,
    max_new_tokens: int,
    temperature: float,
    stop: Sequence[str] | str | None,
    remember: bool,
    *,
    chat: bool,
    min_new_tokens: int,
    top_p: float,
    seed: int | None,
    recall: int | None,
    recall_query: str | None,
    explain: bool,
    owner: object = None,
) -> TurnStream:
    """Check a turn's arguments (errors name the argument) and return its stream, not yet started."""
    if prompt is not None or not chat:
        check_text(prompt, "prompt")
    elif len(engine) == 0:
        raise ValueError("prompt=None answers the history, but the memory is empty")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop)):
        raise TypeError(f"stop must be a str or a list of str, got {stop!r}")
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be a non-negative int, got {min_new_tokens!r}")
    recall = engine.config.recall_k if recall is None else recall
    if isinstance(recall, bool) or not isinstance(recall, int) or recall < 0:
        raise ValueError(f"recall must be a non-negative int, got {recall!r}")
    if recall_query is not None:
        check_text(recall_query, "recall_query")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    turn = Turn(prompt, chat=bool(chat), query=recall_query)
    sampling = dict(temperature=float(temperature), top_p=top_p, gen=gen)
    pieces = _run(engine, turn, max_new_tokens, list(stop or []), remember, sampling, min_new_tokens, recall, explain)
    return TurnStream(pieces, turn, owner)


def _run(engine, turn: Turn, max_new_tokens: int, stop: list[str], remember: bool, sampling: dict, min_new: int, k: int, explain: bool):
    with engine.lock:
        turn.checkpoint = engine.ctx.checkpoint()
        n_history = len(engine)
        trace = None
        try:
            ids = _input_ids(engine, turn, k)
            if explain:  # trace the answer's tokens: the last input token predicts the first one
                turn.held = recall.segments(engine)
                trace = torch.zeros(n_history + len(ids) + max_new_tokens + 1)
                if len(ids) > 1:
                    engine.encode(ids[:-1], atomic=False, logits="none")
                logits = engine.encode(ids[-1:], atomic=False, trace=trace)
            else:
                logits = engine.encode(ids, atomic=False)
            traced = 1
            dec = StreamDecoder(engine.tokenizer, stop)
            for i in range(max_new_tokens):
                if i < min_new:
                    logits = engine.chat.suppress_stop(logits)
                token = sample(logits, **sampling)
                if token in engine.chat.stop_ids:
                    turn.ended_by_stop_token = True
                    break
                piece = dec.push(token)
                if piece:
                    turn.answer += piece
                    yield piece
                if dec.stopped:
                    break
                if i + 1 < max_new_tokens:
                    logits = engine.encode([token], atomic=False, trace=trace)
                    traced += 1
            tail = dec.flush()
            if tail:
                turn.answer += tail
                yield tail
            if explain:
                _explain(engine, turn, trace, n_history, traced)
        except GeneratorExit:  # the caller stopped reading: the turn ends here
            if explain:
                _explain(engine, turn, trace, n_history, traced)
            _finish(engine, turn, remember)
            raise
        except BaseException:
            engine.ctx.rollback(turn.checkpoint)
            raise
        else:
            _finish(engine, turn, remember)


def _explain(engine, turn: Turn, trace: torch.Tensor, n_history: int, traced: int) -> None:
    spans = recall.attended(engine, trace, n_history, traced, turn.placed, turn.placed_at)
    strip = recall.timeline(engine, turn.held, trace, n_history, traced, turn.placed, turn.placed_at)
    turn.explanation = Answer(turn.answer, spans, turn.placed, strip)


def _input_ids(engine, turn: Turn, k: int) -> list[int]:
    """Token ids of the turn's input: placed passages (recall), the prompt, the generation prompt."""
    chat = engine.chat
    query = turn.query if turn.query is not None else turn.prompt
    if query is None:
        query = engine.history[-1].content if len(engine.history) else ""
    turn.placed = recall.place(engine, query, k) if k and query.strip() else []
    placed = "\n".join(h.text for h in reversed(turn.placed))  # the best one nearest the question
    if not turn.chat:
        text = turn.prompt if not placed else f"\n{placed}\n{turn.prompt.lstrip(chr(10))}"
        ids = engine.first_ids(chat.encode(text))
        turn.prompt_tokens = len(ids)
        turn.placed_at = _placed_at(chat, ids, turn.placed)
        return ids
    first = len(engine) == 0
    if turn.prompt is None:
        try:
            ids = chat.message_ids("system", f"{PLACED_HEADER}\n{placed}", first=first) if placed else []
        except ValueError:  # a template that refuses a system message here: nothing is placed
            ids, turn.placed = [], []
    else:
        content = f"{PLACED_HEADER}\n{placed}\n\n{turn.prompt}" if placed else turn.prompt
        ids = chat.message_ids("user", content, first=first)
    turn.prompt_tokens = len(ids)
    turn.placed_at = _placed_at(chat, ids, turn.placed)
    return ids + chat.encode(chat.generation_prompt)


def _placed_at(chat, ids: list[int], placed: list[MemoryHit]) -> list[tuple[int, int]]:
    """Where each placed passage's tokens lie in the turn's input ids."""
    out = []
    for h in placed:
        sub = chat.encode(h.text)
        at = locate(ids, sub)
        out.append((at, at + len(sub)) if at >= 0 else (0, 0))
    return out


def _finish(engine, turn: Turn, remember: bool) -> None:
    """Restore the memory after a turn, or store the turn as history."""
    if remember and turn.chat and turn.ended_by_stop_token and turn.answer and not turn.placed:
        # The model's own tokens are kept; only the template's end-of-turn text is added.
        start = turn.checkpoint["n_tokens"]
        engine.encode(engine.chat.encode(engine.chat.assistant_suffix), logits="none")
        mid = start + turn.prompt_tokens
        user = [Entry("user", turn.prompt, start, mid)] if turn.prompt is not None else []
        engine.record(user + [Entry("assistant", turn.answer, mid, len(engine))], turn.checkpoint)
        turn.checkpoint = None
        engine.settle()
        return
    engine.ctx.rollback(turn.checkpoint)
    if remember and turn.chat:
        user = [] if turn.prompt is None else [("user", turn.prompt)]
        engine.append(user + ([("assistant", turn.answer)] if turn.answer else []))
    elif remember:
        engine.append([(None, turn.prompt + turn.answer)])
    else:
        release_free_memory()  # the turn's working buffers (appending settles, which does it)


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """A token from ``logits [vocab]``: argmax at ``temperature=0``, else nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
