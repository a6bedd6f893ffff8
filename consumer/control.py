"""Delivery control shared by every consumer through Redis: one rate limit in total, one pause after a
``Retry-After``, one circuit breaker. Each decision is one Lua script (atomic on the server, one round trip).

- The rate limit is GCRA: the key holds the theoretical arrival time (µs) of the next request; a request
  reserves the next slot (``1 / rate`` s after the last) if it is at most :data:`HORIZON_MS` ahead, and
  sleeps until it. However many consumers run, the requests leave at most ``rate`` per second.
- A ``429`` or ``503`` with ``Retry-After`` sets a pause until then: every consumer's next request waits.
- The breaker (Convoy's): failures (5xx, timeouts, connection errors) and requests are counted in buckets of
  a tenth of the window; when at least ``min_requests`` were made and the share of failures reaches the
  ratio, it opens for the cooldown. Then one request, the probe, goes (half-open): success closes it,
  failure opens it again. Only the script call that changes the state returns the change: one log line.

Waiting happens before the ``queued -> sending`` compare-and-set, so a waiting message spends no attempt and
no sending lease. While Redis is down the rate limit falls back to this consumer's share (the limit divided
by the consumers seen lately), the pause is this consumer's own, and the breaker lets everything through.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import redis.asyncio as redis
from aiolimiter import AsyncLimiter

from common.cache import breaker_key
from common.settings import Settings
from consumer import metrics

log = logging.getLogger(__name__)

HORIZON_MS = 1000  # how far ahead a rate slot may be reserved
LEAD = 0.25  # seconds before its rate slot a delivery goes on to its compare-and-set
MEMBER_TTL_MS = 10_000  # a consumer counts toward the share for this long after its last request
REDIS_RETRY_SECONDS = 0.2  # while Redis is down, how often a delivery asks it again
POLL_MS = 250  # how often a waiter asks again while a probe is out
BUCKETS = 10  # of the breaker's window
STATES = {"closed": 0, "open": 1, "half-open": 2}

# KEYS: pause, breaker (hash), rate (tat), members (zset)
# ARGV: interval µs (0 = no limit), member, breaker on (0/1), probe lease ms, poll ms, member ttl ms, horizon ms
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pause = tonumber(redis.call('GET', KEYS[1]) or '0')
if pause > now then return {'paused', pause - now, 0, ''} end
local probe = 0
local change = ''
if ARGV[3] == '1' then
  local state = redis.call('HGET', KEYS[2], 'state') or 'closed'
  if state == 'open' then
    local untl = tonumber(redis.call('HGET', KEYS[2], 'until') or '0')
    if now < untl then return {'open', untl - now, 0, ''} end
    probe = 1
    change = 'half-open'
  elseif state == 'half-open' then
    local lease = tonumber(redis.call('HGET', KEYS[2], 'probe_until') or '0')
    if now < lease then return {'half-open', math.min(lease - now, tonumber(ARGV[5])), 0, ''} end
    probe = 1
  end
end
local delay = 0
local members = 0
local interval = tonumber(ARGV[1])
if interval > 0 then
  redis.call('ZADD', KEYS[4], now, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[6]))
  redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[6]))
  members = redis.call('ZCARD', KEYS[4])
  -- the slots in microseconds (a limit above 1000/s still has a spacing); written with %.0f, not tostring
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local horizon = tonumber(ARGV[7]) * 1000
  local tat = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), now_us)
  if tat - now_us > horizon then return {'rate', math.floor((tat - now_us - horizon) / 1000), members, ''} end
  local ttl = math.floor((tat + interval - now_us) / 1000) + 1000
  redis.call('SET', KEYS[3], string.format('%.0f', tat + interval), 'PX', ttl)
  delay = math.floor((tat - now_us) / 1000)
end
if probe == 1 then
  redis.call('HSET', KEYS[2], 'state', 'half-open', 'probe_until', now + tonumber(ARGV[4]))
end
return {probe == 1 and 'probe' or 'go', delay, members, change}
"""

# KEYS: pause, breaker (hash)
# ARGV: retry_after ms (0 = none), breaker on, failed (0/1), probe (0/1), ratio, min requests, bucket ms,
#       buckets, cooldown ms
REPORT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local change = ''
local ra = tonumber(ARGV[1])
if ra > 0 then
  local pause = tonumber(redis.call('GET', KEYS[1]) or '0')
  if now + ra > pause then
    redis.call('SET', KEYS[1], now + ra, 'PX', ra)
    if pause <= now then change = 'paused' end
  end
end
if ARGV[2] ~= '1' then return {change, 0, 0, 0} end
local failed = ARGV[3] == '1'
local state = redis.call('HGET', KEYS[2], 'state') or 'closed'
local cooldown = tonumber(ARGV[9])
if ARGV[4] == '1' then
  if state ~= 'half-open' then return {change, 0, 0, 0} end
  if failed then
    redis.call('HSET', KEYS[2], 'state', 'open', 'until', now + cooldown)
    return {'reopened', 0, 0, tonumber(redis.call('HGET', KEYS[2], 'since') or now)}
  end
  local epoch = redis.call('HINCRBY', KEYS[2], 'epoch', 1)
  redis.call('HSET', KEYS[2], 'state', 'closed')
  redis.call('HDEL', KEYS[2], 'until', 'probe_until', 'since')
  return {'closed', 0, 0, 0}
end
if state ~= 'closed' then return {change, 0, 0, 0} end
local epoch = redis.call('HGET', KEYS[2], 'epoch') or '0'
local step = tonumber(ARGV[7])
local bucket = math.floor(now / step)
local base = KEYS[2] .. ':' .. epoch .. ':'
local ttl = step * (tonumber(ARGV[8]) + 1)
redis.call('INCR', base .. 'n:' .. bucket)
redis.call('PEXPIRE', base .. 'n:' .. bucket, ttl)
if failed then
  redis.call('INCR', base .. 'f:' .. bucket)
  redis.call('PEXPIRE', base .. 'f:' .. bucket, ttl)
end
local total, fails = 0, 0
for b = bucket - tonumber(ARGV[8]) + 1, bucket do
  total = total + tonumber(redis.call('GET', base .. 'n:' .. b) or '0')
  fails = fails + tonumber(redis.call('GET', base .. 'f:' .. b) or '0')
end
if total >= tonumber(ARGV[6]) and fails >= tonumber(ARGV[5]) * total then
  redis.call('HSET', KEYS[2], 'state', 'open', 'until', now + cooldown, 'since', now)
  return {'opened', fails, total, now}
end
return {change, fails, total, 0}
"""


@dataclass(frozen=True, slots=True)
class Ticket:
    """A request admitted: ``probe`` when it is the breaker's half-open probe; ``at`` (monotonic) the rate
    slot it reserved, waited for in two steps: up to :data:`LEAD` before it ahead of the compare-and-set
    (which takes a few ms, more under load), the rest by :meth:`on_time` just before the request, so the
    requests leave at the slots' spacing instead of in the clumps the group commits make."""

    probe: bool = False
    at: float = 0.0
    fallback: bool = False  # the primary's breaker is open: this attempt goes to WEBHOOK_FALLBACK_URL

    async def on_time(self) -> None:
        wait = self.at - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)


class Control:
    """The gate every delivery passes before its compare-and-set, and the report of every answer."""

    def __init__(self, settings: Settings, client: redis.Redis, name: str) -> None:
        s = settings
        self.client = client
        self.name = name
        self.rate = s.webhook_rate_limit_per_second
        self.fallback = bool(s.webhook_fallback_url)
        self.breaker = s.webhook_breaker_failure_ratio > 0
        self.ratio = s.webhook_breaker_failure_ratio
        self.min_requests = s.webhook_breaker_min_requests
        self.bucket_ms = max(1, s.webhook_breaker_window_seconds * 1000 // BUCKETS)
        self.cooldown_ms = round(s.webhook_breaker_cooldown_seconds * 1000)
        self.probe_lease_ms = round((s.webhook_timeout_seconds + 5) * 1000)
        p = s.redis_prefix
        self.keys = [f"{p}webhook:pause", breaker_key(p), f"{p}webhook:rate", f"{p}webhook:consumers"]
        self.admit_script = client.register_script(ADMIT)
        self.report_script = client.register_script(REPORT)
        self.members = 1  # consumers seen lately: the share while Redis is down is rate / members
        self.local: AsyncLimiter | None = None
        self.local_pause = 0.0  # monotonic deadline of this consumer's own pause (Redis down)
        self.redis_down = False
        self.retry_redis_at = 0.0
        metrics.BREAKER_STATE.set(0)

    @property
    def enabled(self) -> bool:
        return self.rate > 0 or self.breaker

    def admit_args(self) -> list[int | str]:
        spacing_us = round(1_000_000 / self.rate) if self.rate > 0 else 0  # µs: above 1000/s too
        return [spacing_us, self.name, int(self.breaker), self.probe_lease_ms, POLL_MS, MEMBER_TTL_MS, HORIZON_MS]

    async def admit(self) -> Ticket:
        """Wait until a request may go out: no pause, the breaker lets it, a rate slot reserved."""
        while True:
            if self.redis_down and time.monotonic() < self.retry_redis_at:
                local = await self._admit_locally(None)
                if local is not None:
                    return local
                continue
            try:
                kind, wait_ms, members, change = await self.admit_script(keys=self.keys, args=self.admit_args())
            except (redis.RedisError, OSError) as exc:
                local = await self._admit_locally(exc)
                if local is not None:
                    return local
                continue
            self._redis_back()
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if members:
                self.members = int(members)
            if change:
                self._changed(change.decode() if isinstance(change, bytes) else str(change))
            if kind in ("go", "probe"):
                at = time.monotonic() + int(wait_ms) / 1000
                if int(wait_ms) / 1000 > LEAD:
                    await asyncio.sleep(int(wait_ms) / 1000 - LEAD)
                    if await self._paused():  # a Retry-After came while this one waited: its slot is let go
                        continue
                return Ticket(probe=kind == "probe", at=at)
            if kind == "open":
                metrics.BREAKER_STATE.set(STATES["open"])
            if self.fallback and kind in ("open", "half-open"):
                metrics.FALLBACK_ATTEMPTS.inc()
                return Ticket(fallback=True)
            metrics.CONTROL_WAITS.labels(kind).inc()
            await asyncio.sleep((int(wait_ms) + random.randint(0, 50)) / 1000)

    async def _paused(self) -> bool:
        try:
            return int(await self.client.pttl(self.keys[0])) > 0
        except (redis.RedisError, OSError):
            return time.monotonic() < self.local_pause

    async def report(self, ticket: Ticket, status: int | None, failed: bool, retry_after: float | None) -> None:
        """What the answer means for everyone: a pause (429/503 with Retry-After), a failure or a success."""
        if ticket.fallback:
            return  # the breaker and the pause are the primary's
        pause_ms = round(retry_after * 1000) if retry_after and status in (429, 503) else 0
        if pause_ms:
            self.local_pause = max(self.local_pause, time.monotonic() + pause_ms / 1000)
        if not self.breaker and not pause_ms:
            return
        try:
            change, fails, total, _ = await self.report_script(
                keys=self.keys[:2],
                args=[
                    pause_ms,
                    int(self.breaker),
                    int(failed),
                    int(ticket.probe),
                    self.ratio,
                    self.min_requests,
                    self.bucket_ms,
                    BUCKETS,
                    self.cooldown_ms,
                ],
            )
        except (redis.RedisError, OSError) as exc:
            self._redis_lost(exc)
            return
        change = change.decode() if isinstance(change, bytes) else str(change)
        if change == "paused":
            log.warning(
                "notification service answered %s with Retry-After: every delivery pauses %.1fs",
                status,
                pause_ms / 1000,
            )
        elif change == "opened":
            log.warning(
                "circuit breaker opened: %d of the last %d requests failed; no requests for %.0fs, then one probe",
                fails,
                total,
                self.cooldown_ms / 1000,
            )
            metrics.BREAKER_STATE.set(STATES["open"])
        elif change:
            self._changed(change)

    def _changed(self, change: str) -> None:
        if change == "half-open":
            log.info("circuit breaker half-open: one probe request goes to the notification service")
            metrics.BREAKER_STATE.set(STATES["half-open"])
        elif change == "reopened":
            log.warning("circuit breaker reopened: the probe failed; next probe in %.0fs", self.cooldown_ms / 1000)
            metrics.BREAKER_STATE.set(STATES["open"])
        elif change == "closed":
            log.warning("circuit breaker closed: the probe succeeded; deliveries go on")
            metrics.BREAKER_STATE.set(STATES["closed"])

    async def _admit_locally(self, exc: BaseException | None) -> Ticket | None:
        """Redis is down: this consumer's share of the limit, its own pause, the breaker closed. Redis is
        asked again at most every :data:`REDIS_RETRY_SECONDS` (not by every delivery: an unreachable host
        would make each one wait for the connect timeout)."""
        if exc is not None:
            self._redis_lost(exc)
            self.retry_redis_at = time.monotonic() + REDIS_RETRY_SECONDS
        wait = self.local_pause - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if self.local is not None:
            await self.local.acquire()
        # None: Redis answered again while this one waited; it takes a slot of the shared limit instead.
        return None if not self.redis_down else Ticket()

    def _redis_lost(self, exc: BaseException) -> None:
        if self.redis_down:
            return
        self.redis_down = True
        # The slots reserved in Redis (up to HORIZON_MS ahead) still go out: the local share starts after them.
        self.local_pause = max(self.local_pause, time.monotonic() + HORIZON_MS / 1000)
        if self.rate > 0:
            share = self.rate / max(1, self.members)
            self.local = AsyncLimiter(1, 1 / share)
            log.warning(
                "Redis unreachable (%s): the rate limit falls back to this consumer's share, %.2f/s (%.0f/s over"
                " %d consumers); the breaker lets requests through until Redis answers",
                type(exc).__name__,
                share,
                self.rate,
                self.members,
            )
        else:
            log.warning(
                "Redis unreachable (%s): the breaker lets requests through until Redis answers", type(exc).__name__
            )

    def _redis_back(self) -> None:
        if self.redis_down:
            self.redis_down = False
            self.local = None
            log.info("Redis answers again: the shared rate limit and breaker are back")
