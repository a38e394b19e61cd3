"""A blocking iterator consumed from asyncio: the model's work runs on a worker thread, the event
loop stays free, and a consumer that stops reading stops the work.

Why one thread for the whole iteration: a memory's stream holds the memory's lock, which is
re-entrant and owned by a thread, from its first piece to its last, so the generator must not hop
between executor threads. And why close it there: closing the generator (``.close()``) ends the
memory's turn, which restores the memory and releases the lock; it must run on the thread that
holds the lock, and it must run when the consumer goes away, not when the model would have finished.

Back-pressure: the worker advances the iterator only when the consumer has taken what came before
(``ahead`` items at most are waiting), so a cancelled or closed consumer leaves at most that many
pieces generated for nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

_END = object()


async def iterate_in_thread(make: Callable[[], Iterable[T]], *, ahead: int = 1) -> AsyncIterator[T]:
    """Items of ``make()`` (called on the worker thread, in a copy of the caller's context) as an
    async iterator.

    The worker computes at most ``ahead`` items before the consumer takes them. When the consumer
    stops early (its task cancelled, or the async iterator closed with ``aclose()``; use
    ``contextlib.aclosing`` around an ``async for`` that may ``break``), the worker stops at its next
    item and closes the iterator on its own thread; the close has happened by the time the
    cancellation or ``aclose()`` returns. An exception in ``make()`` or the iteration is raised to
    the consumer.

    Example:
        >>> import asyncio
        >>> async def first_two():
        ...     return [x async for x in iterate_in_thread(lambda: iter(range(2)))]
        >>> asyncio.run(first_two())
        [0, 1]
    """
    if isinstance(ahead, bool) or not isinstance(ahead, int) or ahead < 1:
        raise ValueError(f"ahead must be a positive int, got {ahead!r}")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    room = threading.Semaphore(ahead)
    stop = threading.Event()

    def hand_over(item, error=None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stop.set()

    def produce() -> None:
        it, error = None, None
        try:
            it = iter(make())
            while True:
                room.acquire()
                if stop.is_set():
                    break
                try:
                    item = next(it)
                except StopIteration:
                    break
                hand_over(item)
        except BaseException as e:  # handed to the consumer and raised there
            error = e
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except BaseException as e:
                    error = error or e
            hand_over(_END, error)

    worker = loop.run_in_executor(None, contextvars.copy_context().run, produce)
    try:
        while True:
            item, error = await queue.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            room.release()  # the worker may compute the next item while this one is used
            yield item
    finally:
        stop.set()
        room.release()  # wake a worker waiting for room, so it sees the stop
        await asyncio.shield(worker)
