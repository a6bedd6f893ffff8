"""Delivery control shared by every consumer through Redis: one rate limit in total, one pause after a
``Retry-After``, one circuit breaker. Each decision is one Lua script (atomic on the server, one round trip).

- The rate limit is GCRA: the key holds the theoretical arrival time (µs) of the next request; a delivery
  reserves the next slot (``1 / rate`` s after the last) if it is at most :data:`HORIZON_MS` ahead, sleeps
  until :data:`LEAD` before it, runs its compare-and-set, and leaves at the slot (:meth:`Control.depart`).
  A delivery whose compare-and-set ran past its slot does not go late (it would go out beside the next
  slot's request): its row already ``sending``, it re-reserves in the late lane, which is not held back by
  the waiters' horizon, only by its own bound (:data:`MAX_SLOT_WAIT` after the compare-and-set, added to the
  sending lease); when no slot is free within that bound the row is given back (``pending``, no attempt).
  So the requests leave at the slots' spacing, however many consumers run, whatever the database does.
  A delivery told to wait queues behind the one of its consumer already waiting, which alone asks again.
- A ``429`` or ``503`` with ``Retry-After`` sets a pause until then: every consumer's next request waits.
- The breaker (Convoy's): failures (5xx, timeouts, connection errors) and requests are counted in buckets of
  a tenth of the window; when at least ``min_requests`` were made and the share of failures reaches the
  ratio, it opens for the cooldown. Then one request, the probe, goes (half-open): success closes it,
  failure opens it again. Only the script call that changes the state returns the change: one log line.

Waiting for admission happens before the ``queued -> sending`` compare-and-set, so a waiting message spends
no attempt and no sending lease. While Redis is down the rate limit falls back to this consumer's share (the
limit divided by the consumers seen lately, the same GCRA in :class:`Slots`), the pause is this consumer's
own, the breaker lets everything through, and Redis is asked again every :data:`REDIS_RETRY_SECONDS`. When it
answers again the share still holds beside the shared limit until Redis has answered for
:data:`SETTLE_SECONDS` with no call failing (the other consumers may still be on their shares): one log line
when an outage starts, one when it is over.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from common.cache import breaker_key
from common.settings import Settings
from consumer import metrics

log = logging.getLogger(__name__)

HORIZON_MS = 1000  # how far ahead a delivery still queued may reserve a rate slot
LEAD = 0.25  # seconds before its rate slot a delivery goes on to its compare-and-set
GRACE = 0.02  # a request at most this late still takes its slot: at most GRACE x rate extra in any second
MAX_SLOT_WAIT = 1.5  # seconds a row already sending may wait for a rate slot; its sending lease is this longer
MEMBER_TTL_MS = 10_000  # a consumer counts toward the share for this long after its last request
REDIS_RETRY_SECONDS = 0.2  # while Redis is down, how often a delivery asks it again
SETTLE_SECONDS = 2.0  # Redis is back once it has answered this long with no call failing (at least)
POLL_MS = 250  # how often a waiter asks again while a probe is out
BUCKETS = 10  # of the breaker's window
STATES = {"closed": 0, "open": 1, "half-open": 2}

# KEYS: pause, breaker (hash), rate (tat), members (zset)
# ARGV: interval µs (0 = no limit), member, breaker on (0/1), probe lease ms, poll ms, member ttl ms, horizon ms,
#       late (0/1: a delivery whose row is sending and missed its slot; the horizon is then its own bound, the
#       breaker and the members are left alone, and a slot beyond it is 'full' rather than a wait)
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local late = ARGV[8] == '1'
local pause = tonumber(redis.call('GET', KEYS[1]) or '0')
if pause > now then return {'paused', pause - now, 0, ''} end
local probe = 0
local change = ''
if ARGV[3] == '1' and not late then
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
  if not late then
    redis.call('ZADD', KEYS[4], now, ARGV[2])
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[6]))
    redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[6]))
    members = redis.call('ZCARD', KEYS[4])
  end
  -- the slots in microseconds (a limit above 1000/s still has a spacing); written with %.0f, not tostring
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local horizon = tonumber(ARGV[7]) * 1000
  local tat = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), now_us)
  if tat - now_us > horizon then
    if late then return {'full', math.floor((tat - now_us) / 1000), 0, ''} end
    return {'rate', math.floor((tat - now_us - horizon) / 1000), members, ''}
  end
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
    slot it reserved (None: no rate limit), waited for in two steps: up to :data:`LEAD` before it ahead of the
    compare-and-set (which takes a few ms, more under load), the rest by :meth:`Control.depart` just before the
    request, so the requests leave at the slots' spacing instead of in the clumps the group commits make."""

    probe: bool = False
    at: float | None = None
    fallback: bool = False  # the primary's breaker is open: this attempt goes to WEBHOOK_FALLBACK_URL


class Slots:
    """The rate part of :data:`ADMIT` for this consumer alone (GCRA on the monotonic clock): its share of the
    limit while Redis is down, and beside the shared limit until Redis has settled."""

    def __init__(self, per_second: float, start: float) -> None:
        self.spacing = 1 / per_second
        self.tat = start  # the next free slot

    def take(self, horizon: float) -> float | None:
        """Reserve the next free slot if it is at most ``horizon`` seconds ahead; None (nothing reserved) if not."""
        now = time.monotonic()
        at = max(self.tat, now)
        if at - now > horizon:
            return None
        self.tat = at + self.spacing
        return at

    def free_in(self, horizon: float) -> float:
        """Seconds until :meth:`take` with this ``horizon`` can succeed."""
        return max(0.0, self.tat - horizon - time.monotonic())


class Control:
    """The gate every delivery passes before its compare-and-set (:meth:`admit`), the wait for its rate slot
    just before the request (:meth:`depart`), and the report of every answer (:meth:`report`)."""

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
        self.probe_lease_ms = round((s.webhook_timeout_seconds + 5 + self.max_slot_wait) * 1000)
        p = s.redis_prefix
        self.keys = [f"{p}webhook:pause", breaker_key(p), f"{p}webhook:rate", f"{p}webhook:consumers"]
        self.admit_script = client.register_script(ADMIT)
        self.report_script = client.register_script(REPORT)
        self.members = 1  # consumers seen lately: the share while Redis is down is rate / members
        # Redis as this consumer sees it: "up" (the shared limit), "down" (this consumer's share, Redis asked
        # again every REDIS_RETRY_SECONDS) or "settling" (answering again: the shared limit and the share both
        # hold until settled_at). Calls are ordered by when they started: an answer to a call older than the
        # latest failure, or a failure of a call older than the latest answer, says nothing new.
        self.redis = "up"
        self.slots: Slots | None = None  # this consumer's share while Redis is not up
        self.local_pause = 0.0  # monotonic deadline of this consumer's own pause (Redis down)
        self.retry_redis_at = 0.0
        self.down_since = 0.0
        self.settled_at = 0.0
        self.settle_seconds = SETTLE_SECONDS
        self.last_answer = 0.0  # when the latest call that was answered started (monotonic)
        self.last_failure = 0.0  # when the latest call that failed started
        self.waiting = asyncio.Lock()  # held by the one delivery of this consumer that waits to ask again
        metrics.BREAKER_STATE.set(0)

    @property
    def enabled(self) -> bool:
        return self.rate > 0 or self.breaker

    @property
    def max_slot_wait(self) -> float:
        """The longest a row already ``sending`` waits for its rate slot: part of its sending lease."""
        return MAX_SLOT_WAIT if self.rate > 0 else 0.0

    def admit_args(self, late_ms: int | None = None) -> list[int | str]:
        """The ADMIT script's arguments; ``late_ms``: a late delivery's re-reservation, bounded by it."""
        spacing_us = round(1_000_000 / self.rate) if self.rate > 0 else 0  # µs: above 1000/s too
        horizon = HORIZON_MS if late_ms is None else late_ms
        return [
            spacing_us,
            self.name,
            int(self.breaker),
            self.probe_lease_ms,
            POLL_MS,
            MEMBER_TTL_MS,
            horizon,
            int(late_ms is not None),
        ]

    async def admit(self) -> Ticket:
        """Wait until a request may go out: no pause, the breaker lets it, a rate slot reserved. The row is
        still ``queued`` all along: waiting here spends no attempt and no sending lease."""
        while True:
            kind, at, mine = await self._reserve()
            if kind == "fallback":
                return Ticket(fallback=True)
            if at is not None and at - time.monotonic() > LEAD:
                await asyncio.sleep(at - time.monotonic() - LEAD)
                # A Retry-After came while this one waited: its slot is let go.
                if (time.monotonic() < self.local_pause) if mine else await self._paused():
                    continue
            if at is not None and time.monotonic() > at + GRACE and kind == "go":
                continue  # overslept (a busy loop): its slot is gone, and it is still queued
            return Ticket(probe=kind == "probe", at=at)

    async def _reserve(self) -> tuple[str, float | None, bool]:
        """``(kind, slot, mine)``: "go" or "probe" with the rate slot reserved (None without a limit) and whether
        it is this consumer's share alone (Redis down), or "fallback". A delivery told to wait queues behind the
        one of this consumer already waiting, which alone asks again (not a herd of every waiting delivery)."""
        queued = False
        try:
            while True:
                if self.redis == "down" and time.monotonic() < self.retry_redis_at:
                    wait = self.local_pause - time.monotonic()  # this consumer's own pause, its share
                    if wait <= 0:
                        if self.slots is None:
                            return "go", None, True  # no rate limit, only the breaker: it lets all through
                        at = self.slots.take(HORIZON_MS / 1000)
                        if at is not None:
                            return "go", at, True
                        wait = self.slots.free_in(HORIZON_MS / 1000)
                else:
                    answer = await self._call(self.admit_script, self.keys, self.admit_args())
                    if answer is None:
                        continue  # no answer: this consumer's share from now on (or ask again: see _failed)
                    kind, wait_ms, members, change = answer
                    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
                    if members:
                        self.members = int(members)
                    if change:
                        self._changed(change.decode() if isinstance(change, bytes) else str(change))
                    if kind in ("go", "probe"):
                        if self.rate <= 0:
                            return kind, None, False
                        at = time.monotonic() + int(wait_ms) / 1000
                        if self.slots is None:
                            return kind, at, False
                        mine = self.slots.take(HORIZON_MS / 1000)  # settling: this consumer's share holds too
                        if mine is not None:
                            return kind, max(at, mine), False
                        wait = self.slots.free_in(HORIZON_MS / 1000)  # the shared slot is let go
                    else:
                        if kind == "open":
                            metrics.BREAKER_STATE.set(STATES["open"])
                        if self.fallback and kind in ("open", "half-open"):
                            metrics.FALLBACK_ATTEMPTS.inc()
                            return "fallback", None, False
                        metrics.CONTROL_WAITS.labels(kind).inc()
                        wait = (int(wait_ms) + random.randint(0, 50)) / 1000
                if not queued:
                    await self.waiting.acquire()
                    queued = True
                    continue  # its turn: ask again at once
                await asyncio.sleep(wait)
        finally:
            if queued:
                self.waiting.release()

    async def depart(self, ticket: Ticket) -> bool:
        """Just before the request (the row is ``sending`` now): wait for the ticket's rate slot; True to go.
        A delivery past its slot by more than :data:`GRACE` (its compare-and-set outlasted the lead) would go
        out beside the next slot's request: it takes a new slot in the late lane instead, bounded by
        :data:`MAX_SLOT_WAIT` from now. False when there is none by then (or a pause came): the caller gives
        the row back, unsent, no attempt spent."""
        if ticket.at is None:
            return True
        deadline = time.monotonic() + MAX_SLOT_WAIT
        at: float | None = ticket.at
        while at is not None:
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if time.monotonic() <= at + GRACE:
                return True
            metrics.CONTROL_WAITS.labels("late").inc()
            at = await self._late_slot(deadline)
        metrics.CONTROL_WAITS.labels("given-back").inc()
        return False

    async def _late_slot(self, deadline: float) -> float | None:
        """A new slot no later than ``deadline`` for a delivery that missed its own, or None."""
        while (bound := deadline - time.monotonic()) > 0:
            shared: float | None = None
            if self.redis != "down" or time.monotonic() >= self.retry_redis_at:
                answer = await self._call(self.admit_script, self.keys, self.admit_args(late_ms=int(bound * 1000)))
                if answer is None:
                    continue  # the next round takes this consumer's share (or asks again)
                kind = answer[0].decode() if isinstance(answer[0], bytes) else str(answer[0])
                if kind != "go":
                    return None  # paused, or no slot within the bound
                shared = time.monotonic() + int(answer[1]) / 1000
            if self.slots is None:
                return shared
            if time.monotonic() < self.local_pause:
                return None
            mine = self.slots.take(deadline - time.monotonic())
            if mine is None:
                return None
            return mine if shared is None else max(shared, mine)
        return None

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
        answer = await self._call(
            self.report_script,
            self.keys[:2],
            [
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
        if answer is None:
            return
        change, fails, total, _ = answer
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

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """One script call; None when Redis did not answer (and the state follows what the call says)."""
        started = time.monotonic()
        try:
            answer = await script(keys=keys, args=args)
        except (redis.RedisError, OSError) as exc:
            self._failed(started, exc)
            return None
        self._answered(started)
        return answer

    def _failed(self, started: float, exc: BaseException) -> None:
        if started < self.last_answer:
            return  # Redis answered a call made after this one: not an outage (the caller asks again)
        self.last_failure = started
        now = time.monotonic()
        self.retry_redis_at = now + REDIS_RETRY_SECONDS
        if self.redis == "settling":
            self.redis = "down"  # the same outage: no new line
            return
        if self.redis == "down":
            return
        self.redis = "down"
        self.down_since = now
        if self.rate > 0:
            share = self.rate / max(1, self.members)
            # The slots reserved in Redis (up to HORIZON_MS ahead) still go out: the share starts after them.
            self.slots = Slots(share, now + HORIZON_MS / 1000)
            # Until every consumer has seen Redis again and its last local slot has gone, its share is kept.
            self.settle_seconds = max(SETTLE_SECONDS, HORIZON_MS / 1000 + 2 / share)
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

    def _answered(self, started: float) -> None:
        if started < self.last_failure:
            return  # a call made after this one failed: Redis is not back
        self.last_answer = max(self.last_answer, started)
        if self.redis == "down":
            self.redis = "settling"
            self.settled_at = time.monotonic() + self.settle_seconds
            # Back then, if no call failed meanwhile, whether or not calls come (an idle consumer says so too).
            asyncio.get_running_loop().call_later(self.settle_seconds + 0.01, self._settle)
        else:
            self._settle()

    def _settle(self) -> None:
        now = time.monotonic()
        if self.redis == "settling" and now >= self.settled_at:
            self.redis = "up"
            self.slots = None
            log.info(
                "Redis answers again (down %.1fs): the shared rate limit and breaker are back", now - self.down_since
            )
