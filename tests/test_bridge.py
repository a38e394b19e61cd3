"""The sync -> async bridge: items in order on one worker thread, a consumer that stops stops the
generator (closed on its own thread), errors reach the consumer."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import doctest
import threading
import time

import pytest

from memory_plugin import bridge
from memory_plugin.bridge import iterate_in_thread

N = 1000


class Counted:
    """A generator of ``N`` items that records how many it produced, on which threads, and whether
    its ``finally`` ran (as a memory's stream ends its turn there)."""

    def __init__(self, delay: float = 0.0, fail_after: int | None = None):
        self.delay, self.fail_after = delay, fail_after
        self.produced = 0
        self.threads: set[int] = set()
        self.closed_on: int | None = None
        self.finally_ran = threading.Event()

    def __call__(self):
        try:
            for i in range(N):
                self.threads.add(threading.get_ident())
                if self.fail_after is not None and i == self.fail_after:
                    raise ValueError(f"failed at {i}")
                if self.delay:
                    time.sleep(self.delay)
                self.produced += 1
                yield i
        finally:
            self.closed_on = threading.get_ident()
            self.finally_ran.set()


def collect(make, **kw):
    async def run():
        return [x async for x in iterate_in_thread(make, **kw)]

    return asyncio.run(run())


def test_items_arrive_in_order_from_one_worker_thread():
    gen = Counted()
    assert collect(gen) == list(range(N))
    assert len(gen.threads) == 1 and threading.get_ident() not in gen.threads
    assert gen.finally_ran.is_set() and gen.closed_on in gen.threads


def test_the_event_loop_stays_free_while_the_worker_blocks():
    gen = Counted(delay=0.3)

    async def run():
        items = iterate_in_thread(gen)
        first = asyncio.create_task(items.__anext__())
        t0 = time.perf_counter()
        await asyncio.sleep(0.01)  # the loop runs other work while the worker sleeps in the generator
        assert time.perf_counter() - t0 < 0.2 and not first.done()
        assert await first == 0
        await items.aclose()

    asyncio.run(run())
    assert gen.finally_ran.is_set()


def test_cancelling_the_consumer_closes_the_generator_promptly():
    gen = Counted(delay=0.001)

    async def run():
        got = []
        three = asyncio.Event()

        async def consume():
            async for x in iterate_in_thread(gen):
                got.append(x)
                if len(got) == 3:
                    three.set()

        task = asyncio.create_task(consume())
        await three.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The cancellation returned only once the generator's finally had run, on its own thread.
        assert gen.finally_ran.is_set() and gen.closed_on in gen.threads
        return got

    got = asyncio.run(run())
    assert len(got) >= 3 and gen.produced < N
    assert gen.produced <= len(got) + 2  # back-pressure: nothing ran far ahead of the consumer


def test_closing_the_async_iterator_early_closes_the_generator():
    gen = Counted()  # no delay: only back-pressure keeps it from running to the end

    async def run():
        async with contextlib.aclosing(iterate_in_thread(gen)) as items:
            async for x in items:
                if x == 4:
                    break
        assert gen.finally_ran.is_set()

    asyncio.run(run())
    assert gen.produced <= 7


def test_an_exception_in_the_generator_reaches_the_consumer():
    gen = Counted(fail_after=5)
    got = []

    async def run():
        async for x in iterate_in_thread(gen):
            got.append(x)

    with pytest.raises(ValueError, match="failed at 5"):
        asyncio.run(run())
    assert got == [0, 1, 2, 3, 4] and gen.finally_ran.is_set()


def test_an_exception_making_the_iterator_reaches_the_consumer():
    def make():
        raise LookupError("no such conversation")

    with pytest.raises(LookupError, match="no such conversation"):
        collect(make)


def test_the_worker_sees_the_callers_context_variables():
    var = contextvars.ContextVar("thread_id", default=None)

    async def run():
        var.set("alice")
        return [x async for x in iterate_in_thread(lambda: iter([var.get()]))]

    assert asyncio.run(run()) == ["alice"]


def test_ahead_lets_the_worker_compute_further_and_is_checked():
    assert collect(lambda: range(5), ahead=3) == [0, 1, 2, 3, 4]  # any iterable
    with pytest.raises(ValueError, match="ahead"):
        collect(lambda: range(5), ahead=0)


def test_module_doctests():
    assert doctest.testmod(bridge).failed == 0
