"""Group commit: many concurrent callers submit one item each; one flush handles them all together.

While a flush is in flight, newly submitted items wait and go together into the next one, so under
load a flush carries as many items as arrived during the previous one (no timer, no added latency
when idle). A failed flush fails every caller of that flush with the same exception. A flush runs in the
context (``contextvars``) of the first caller it carries: the spans it starts (tracing on) are in that
caller's trace.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    def __init__(
        self, flush: Callable[[Sequence[T]], Awaitable[Sequence[R]]], max_size: int = 500, max_concurrent: int = 2
    ) -> None:
        self._flush = flush
        self._max_size = max_size
        self._slots = max_concurrent
        self._waiting: list[tuple[T, asyncio.Future[R], contextvars.Context]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._starting = False

    async def aclose(self) -> None:
        """Wait for the flushes in flight (on shutdown, before the resources they use are closed)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue ``item`` for a flush; the future is its result. A future, not a coroutine that awaits it: a
        caller awaits it directly, with no extra frame to pass through when it is resumed."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future, contextvars.copy_context()))
        self._maybe_start()
        return future

    def _maybe_start(self) -> None:
        if self._waiting and self._slots > 0 and not self._starting:
            self._slots -= 1
            self._starting = True
            task = asyncio.get_running_loop().create_task(self._run(), context=self._waiting[0][2])
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        # Yield once so that the other deliveries of the same socket read join this flush.
        await asyncio.sleep(0)
        self._starting = False
        batch, self._waiting = self._waiting[: self._max_size], self._waiting[self._max_size :]
        self._maybe_start()
        try:
            results = await self._flush([item for item, _, _ in batch])
            if len(results) != len(batch):  # every caller gets an answer, never a future left waiting
                raise RuntimeError(f"a flush of {len(batch)} items returned {len(results)} results")
        except BaseException as exc:
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            for (_, future, _), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._slots += 1
            self._maybe_start()
