"""The consumer's writer of ``message:<messageId>`` entries: written after the outcome commit, held back
while Redis is down (sending goes on: MySQL has every outcome) and written once it is back."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging

import redis.asyncio as redis

from common.cache import MessageCache
from consumer import metrics

log = logging.getLogger(__name__)

CACHE_BACKLOG_MAX = 100_000
Entry = tuple[str, int, dt.datetime]  # (remote messageId, local id, sent_at)


class CacheWriter:
    def __init__(self, cache: MessageCache) -> None:
        self.cache = cache
        self.backlog: list[Entry] = []
        self.redis_down = False
        metrics.CACHE_BACKLOG.set_function(lambda: len(self.backlog))

    async def write(self, entries: list[Entry], retry: bool = False) -> None:
        """Write cache entries in one pipeline. While Redis is down they are held back and written by
        :meth:`flush_loop` once it is back; past ``CACHE_BACKLOG_MAX`` the oldest are dropped with an error
        naming ``message-sender cache-backfill``, which rewrites the whole cache from MySQL. The backlog is
        only ever taken or extended, never replaced after an await, so entries added by concurrent commits
        meanwhile are kept."""
        if self.backlog and not retry:
            self._hold_back(entries)
            return
        pending, self.backlog = self.backlog + entries, []
        if not pending:
            return
        try:
            await self.cache.put_many(pending)
        except (redis.RedisError, OSError) as exc:
            if not self.redis_down:
                log.warning("Redis unavailable (%s); holding cache entries back, retrying every second", exc)
            self.redis_down = True
            held, self.backlog = self.backlog, []
            self._hold_back(pending + held)
            return
        if self.redis_down:
            self.redis_down = False
            log.info("Redis is back; wrote %d held-back cache entries", len(pending))

    def _hold_back(self, entries: list[Entry]) -> None:
        metrics.CACHE_ERRORS.inc(len(entries))
        self.backlog.extend(entries)
        overflow = len(self.backlog) - CACHE_BACKLOG_MAX
        if overflow > 0:
            del self.backlog[:overflow]
            log.error(
                "Redis still down: %d cache entries dropped from memory; run `message-sender cache-backfill`"
                " once it is back to rewrite them from MySQL",
                overflow,
            )

    async def flush_loop(self, stop: asyncio.Event, every: float = 1.0) -> None:
        """Write entries held back by a Redis outage even when no new delivery comes along."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every)
            if self.backlog:
                await self.write([], retry=True)

    async def drain(self) -> None:
        """On shutdown: one last try; what is still held back is named in the log."""
        if self.backlog:
            await self.write([], retry=True)
        if self.backlog:
            log.error(
                "stopping with %d cache entries unwritten (Redis down); run `message-sender cache-backfill`",
                len(self.backlog),
            )
