"""Helpers of the fault-injection suite (tests/test_chaos.py): load, the accounting invariant, service
logs, and outages of a private server (``tests/private_servers.py``: never one of the machine's own)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import aiomysql
import orjson
import redis.asyncio as redis

from common.settings import Settings
from common.store import LEASE_LAPSED, MessageStore
from deploy.devsupport import RabbitAdmin
from tests.conftest import sql
from tests.private_servers import PrivateServer
from tests.procs import Cluster, Service, StandIn, wait_for

TERMINAL = ("sent", "failed")


class KnownBug(AssertionError):
    """Raised by an assertion that a known, reported service bug makes fail (see the xfail reason)."""


def known_bug(ok: bool, text: str) -> None:
    if not ok:
        raise KnownBug(text)


@contextlib.contextmanager
def noting(bugs: list[str]) -> Iterator[None]:
    """Note a ``KnownBug`` and go on, so that every other assertion still runs; raise them at the end
    with ``known_bug(not bugs, ...)``."""
    try:
        yield
    except KnownBug as exc:
        bugs.append(str(exc))


# --- services --------------------------------------------------------------------------------------


def start(cluster: Cluster, module: str, **env: object) -> Service:
    """A service with JSON logs (ticks and warnings are parsed from them)."""
    return cluster.start(module, LOG_FORMAT="json", **{k: str(v) for k, v in env.items()})


def alive(*services: Service) -> None:
    dead = {s.name: s.proc.returncode for s in services if s.proc.poll() is not None}
    assert not dead, f"services died: {dead}"


def logged(svc: Service, text: str) -> bool:
    return text in svc.log()


async def log_has(svc: Service, text: str) -> bool:
    return logged(svc, text)


async def ready(*services: Service) -> bool:
    """Started (schema migrated, connected): the producer ticks, the consumer consumes."""
    return all(logged(s, "ticking every") or logged(s, "consuming") for s in services)


async def value(v: Any) -> Any:
    return v


async def leader_pid(settings: Settings) -> int | None:
    """The pid of the producer that holds a live leader lease (``producer_lease.holder``, ``host:pid``)."""
    rows = await query(settings, "SELECT holder FROM producer_lease WHERE id = 1 AND expires_at > UTC_TIMESTAMP(6)")
    leader = rows[0][0] if rows else None
    return int(leader.rsplit(":", 1)[1]) if leader else None


async def other_leader(settings: Settings, pid: int) -> bool:
    now = await leader_pid(settings)
    return now is not None and now != pid


async def keys_at_least(standin: StandIn, n: int) -> bool:
    return len(await standin.keys()) >= n


async def sent_by(svc: Service) -> int:
    """How many deliveries this consumer marked sent (its /metrics)."""
    port = svc.env["CONSUMER_METRICS_PORT"]  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    m = re.search(r'^consumer_deliveries_total\{outcome="sent"\} (\S+)$', text, re.M)
    return int(float(m[1])) if m else 0


# --- load ------------------------------------------------------------------------------------------


async def insert(store: MessageStore, n: int) -> list[int]:
    """Insert ``n`` pending messages (multi-row inserts); their ids, oldest first."""
    start = await _max_id(store)
    for base in range(0, n, 1000):
        await store.create_many((f"+9055{i:08d}", f"chaos message {i}") for i in range(base, min(n, base + 1000)))
    async with store.pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT id FROM messages WHERE id > %s ORDER BY id", (start,))
        return [int(r[0]) for r in await cur.fetchall()]


async def _max_id(store: MessageStore) -> int:
    async with store.pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT COALESCE(MAX(id), 0) FROM messages")
        return int((await cur.fetchone())[0])


# One statement on a fresh connection: safe across a MariaDB restart (no pooled dead connections).
query = sql


async def counts(settings: Settings) -> dict[str, int]:
    """Rows by status; an empty dict while MySQL does not answer."""
    try:
        got = await query(settings, "SELECT status, COUNT(*) FROM messages GROUP BY status")
    except (OSError, aiomysql.Error):
        return {}
    return {str(s): int(n) for s, n in got}


async def ids_with_status(settings: Settings, status: str) -> set[int]:
    return {int(r[0]) for r in await query(settings, "SELECT id FROM messages WHERE status = %s", (status,))}


async def wait_finished(settings: Settings, timeout: float, what: str = "every row to end sent or failed") -> None:
    async def done() -> dict[str, int] | None:
        c = await counts(settings)
        return c if c and all(s in TERMINAL for s in c) else None

    await wait_for(done, timeout, what, interval=0.2)


async def wait_sent(settings: Settings, n: int, timeout: float = 30) -> None:
    async def enough() -> bool:
        return (await counts(settings)).get("sent", 0) >= n

    await wait_for(enough, timeout, f"at least {n} rows sent", interval=0.1)


async def wait_claimed(settings: Settings, n: int, timeout: float = 30) -> None:
    """Wait until at least ``n`` rows left ``pending`` (the producer is at work, the rest still waits)."""

    async def enough() -> bool:
        c = await counts(settings)
        return bool(c) and sum(c.values()) - c.get("pending", 0) >= n

    await wait_for(enough, timeout, f"at least {n} rows claimed", interval=0.1)


# --- the accounting invariant ----------------------------------------------------------------------


@dataclass
class Accounting:
    sent: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)
    arrivals: collections.Counter[int] = field(default_factory=collections.Counter)
    duplicated: set[int] = field(default_factory=set)

    def __str__(self) -> str:
        reasons = collections.Counter(e.split(":")[0][:40] for e in self.failed.values())
        return (
            f"sent {len(self.sent)}, failed {len(self.failed)} {dict(reasons)}, requests at the stand-in"
            f" {sum(self.arrivals.values())}, duplicated {len(self.duplicated)}"
        )


async def assert_accounting(
    settings: Settings,
    standin: Any,
    guarantee: str = "at-most-once",
    may_duplicate: Collection[int] = frozenset(),
    redis_client: redis.Redis | None = None,
) -> Accounting:
    """The invariant every scenario ends with:

    - the counts by status kept in ``message_counts`` equal a full ``GROUP BY`` of the table;
    - every row is ``sent`` or ``failed``, every ``failed`` row with a reason (nothing ``pending``,
      ``queued`` or ``sending`` is left);
    - the stand-in got no request for an id that is not a row;
    - at most one attempt per row was accepted by the webhook, and never one of a ``failed`` row;
    - each request the consumers recorded (a ``message_attempts`` row) reached the stand-in exactly once:
      a sent row that needed one attempt arrived exactly once. The only extra arrivals allowed are those of
      a consumer that died mid-request: under at-most-once at most one per "outcome unknown" row (the
      request whose outcome nobody recorded, never resent); under at-least-once any for ``may_duplicate``
      (the rows left ``sending`` by a killed consumer), always with the same Idempotency-Key and body;
    - a sent row's ``remote_message_id`` is a ``messageId`` the stand-in gave for that key, and (when a
      Redis client is given) ``message:<messageId>`` holds that row's id.
    """
    rows = await query(settings, "SELECT id, status, last_error, remote_message_id FROM messages")
    attempts = await query(settings, "SELECT message_id, outcome, error FROM message_attempts")
    received = await standin.received()
    out = Accounting()
    by_status = collections.Counter(str(r[1]) for r in rows)
    assert set(by_status) <= set(TERMINAL), f"rows left unfinished: {dict(by_status)}"
    kept = {
        str(st): int(n) for st, n in await query(settings, "SELECT status, SUM(n) FROM message_counts GROUP BY status")
    }
    assert {st: n for st, n in kept.items() if n} == dict(by_status), (
        f"the counts by status ({kept}) differ from the table ({dict(by_status)})"
    )
    requests: collections.Counter[int] = collections.Counter()
    unknown: collections.Counter[int] = collections.Counter()
    accepted: collections.Counter[int] = collections.Counter()  # attempts the webhook accepted (2xx)
    for message_id, outcome, error in attempts:
        if str(error or "").startswith("not sent:"):
            continue  # provably never reached the service (refused, connect timeout)
        # The sweep's attempt stands for the request of a consumer that died (it may or may not have arrived);
        # every other attempt is a request the consumer made and saw end (answered, timed out, reset).
        (unknown if LEASE_LAPSED in str(error or "") else requests)[int(message_id)] += 1
        accepted[int(message_id)] += outcome == "sent"
    bodies: dict[int, set[bytes]] = collections.defaultdict(set)
    given: dict[int, set[str]] = collections.defaultdict(set)
    for r in received:
        assert r["key"].isdigit(), f"a request without a message id as Idempotency-Key: {r}"
        out.arrivals[int(r["key"])] += 1
        bodies[int(r["key"])].add(orjson.dumps(r["body"], option=orjson.OPT_SORT_KEYS))
        given[int(r["key"])].add(r["messageId"])
    ids = {int(r[0]) for r in rows}
    strangers = set(out.arrivals) - ids
    assert not strangers, f"the stand-in got ids that are not rows: {sorted(strangers)[:20]}"
    problems = []
    for message_id, status, last_error, remote_id in rows:
        message_id = int(message_id)
        if status == "sent":
            out.sent.add(message_id)
            if remote_id is not None and remote_id not in given[message_id]:
                problems.append(f"{message_id}: remote id {remote_id} was not given by the stand-in for that key")
        else:
            out.failed[message_id] = str(last_error or "")
            if not last_error:
                problems.append(f"{message_id}: failed without a reason")
        if accepted[message_id] > 1:
            problems.append(f"{message_id} ({status}): accepted by the webhook {accepted[message_id]} times")
        elif status == "failed" and accepted[message_id]:
            problems.append(f"{message_id}: failed ({last_error}) although the webhook accepted it")
        extra = out.arrivals[message_id] - requests[message_id]
        if extra < 0:
            problems.append(f"{message_id}: {requests[message_id]} attempts recorded, {extra} fewer arrived")
        elif extra > 0:
            if guarantee == "at-least-once" and message_id in may_duplicate:
                out.duplicated.add(message_id)
            elif guarantee == "at-most-once" and extra <= unknown[message_id]:
                pass  # the request of a consumer that died in flight, recorded as "outcome unknown"
            else:
                problems.append(
                    f"{message_id} ({status}): arrived {out.arrivals[message_id]} times for"
                    f" {requests[message_id]} recorded attempts ({unknown[message_id]} outcome unknown)"
                )
        if len(bodies[message_id]) > 1:
            problems.append(f"{message_id}: different bodies under one Idempotency-Key: {bodies[message_id]}")
    assert not problems, f"{len(problems)} accounting problems:\n" + "\n".join(problems[:30])
    if redis_client is not None:
        await assert_cached(settings, redis_client)
    print("accounting:", out)
    return out


async def assert_cached(settings: Settings, redis_client: redis.Redis) -> None:
    """Every sent row with a remote id has ``message:<id>`` in Redis, naming the right local id."""
    rows = await query(
        settings, "SELECT id, remote_message_id FROM messages WHERE status = 'sent' AND remote_message_id IS NOT NULL"
    )
    missing = await missing_cache_entries(settings, redis_client, [(int(i), str(r)) for i, r in rows])
    assert not missing, f"{len(missing)} of {len(rows)} cache entries missing or wrong: {missing[:10]}"


async def missing_cache_entries(
    settings: Settings, redis_client: redis.Redis, rows: list[tuple[int, str]]
) -> list[int]:
    async with redis_client.pipeline(transaction=False) as pipe:
        for _, remote_id in rows:
            pipe.hget(f"{settings.redis_prefix}message:{remote_id}", "message_id")
        got = await pipe.execute()
    return [i for (i, _), value in zip(rows, got, strict=True) if value != str(i).encode()]


# --- service logs ----------------------------------------------------------------------------------


def events(svc: Service) -> list[dict[str, Any]]:
    """The JSON log lines of a service started with LOG_FORMAT=json (other lines as ``{"raw": line}``)."""
    out = []
    for line in svc.log().splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            entry = None
        out.append(entry if isinstance(entry, dict) else {"raw": line})
    return out


TICK = re.compile(
    r"tick: (leader|standby), sending (on|off|-), claimed (\d+), published (\d+), released (\d+),"
    r" stale re-published (\d+)"
)


def claiming_ticks(*producers: Service) -> list[tuple[float, int, str]]:
    """``(time, claimed, producer)`` of every logged tick that claimed something, in time order."""
    import datetime as dt

    out = []
    for svc in producers:
        for e in events(svc):
            m = TICK.search(e.get("message", ""))
            if m and int(m[3]):
                at = dt.datetime.fromisoformat(e["time"]).timestamp()
                out.append((at, int(m[3]), svc.name))
    return sorted(out)


def failed_ticks(svc: Service) -> int:
    """Ticks that claimed but could not publish (RabbitMQ away): their rows were put back."""
    out = 0
    for e in events(svc):
        m = TICK.search(e.get("message", ""))
        out += bool(m and int(m[3]) and not int(m[4])) or "tick incomplete" in e.get("message", "")
    return out


def assert_rate(
    producers: list[Service], batch: int, interval: float, jitter: float | None = None
) -> list[tuple[float, int, str]]:
    """One batch per tick, however many producers: no tick claims more than ``batch``, and in any stretch
    of time the claiming ticks (of all producers together) are no more than one per interval. A tick's
    log time may be off its schedule by up to ``jitter`` (half an interval by default): a tick that ran
    long is logged late, the next one is on time."""
    tolerance = interval / 2 if jitter is None else jitter
    ticks = claiming_ticks(*producers)
    assert ticks, "no tick claimed anything"
    too_big = [t for t in ticks if t[1] > batch]
    assert not too_big, f"ticks claimed more than SEND_BATCH_SIZE={batch}: {too_big[:5]}"
    for i, first in enumerate(ticks):
        for j in range(i + 1, len(ticks)):
            span = ticks[j][0] - first[0]
            allowed = int((span + tolerance) / interval) + 1
            assert j - i + 1 <= allowed, (
                f"{j - i + 1} claiming ticks within {span:.3f}s at one per {interval}s: {ticks[i : j + 1][:6]}"
            )
    return ticks


def mysql_outage_lines(svc: Service) -> int:
    """The consumer's "... failed (...); retrying ... until MySQL answers" warnings."""
    return sum("until MySQL answers" in str(e.get("message", "")) for e in events(svc))


# Loggers of the AMQP client libraries, whose WARNING/ERROR records the services let through.
AMQP_LIBRARIES = ("aiormq", "aio_pika")


def assert_quiet(svc: Service, outage: str | None = None, at_most: int = 0) -> int:
    """No traceback in the service's log; the outage (a regex on the messages) logged at least once and
    at most ``at_most`` times: once with the retry plan, not a stream. Returns how many times it was
    logged. Tracebacks that come only from the AMQP client libraries are a known bug (``KnownBug``,
    raised last, after the other checks)."""
    entries = events(svc)
    with_trace = [e for e in entries if "Traceback" in str(e.get("exc", "")) + str(e.get("raw", ""))]
    ours = [e for e in with_trace if not str(e.get("logger", "")).startswith(AMQP_LIBRARIES)]
    assert not ours, f"{svc.name} logged a traceback:\n{str(ours[0])[:3000]}"
    seen = 0
    if outage is not None:
        seen = sum(1 for e in entries if re.search(outage, str(e.get("message", e.get("raw", "")))))
        assert seen >= 1, f"{svc.name} never logged the outage ({outage!r})"
        assert seen <= at_most, f"{svc.name} logged the outage {seen} times (at most {at_most}): {outage!r}"
    first = with_trace[0] if with_trace else {}
    known_bug(
        not with_trace,
        f"{svc.name}: the AMQP client library logged {len(with_trace)} traceback(s) for a connection loss,"
        f" e.g. {first.get('logger')}: {first.get('message')}",
    )
    return seen


# --- targeted faults: one connection of one service --------------------------------------------------


async def drop_amqp_connections(rabbit: RabbitAdmin, vhost: str) -> int:
    """Have RabbitMQ close every client connection of ``vhost`` (as on a network blip or a missed
    heartbeat); returns how many it closed."""
    return await asyncio.to_thread(rabbit.close_connections, vhost)


# --- outages of a private server -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def outage(server: PrivateServer) -> AsyncIterator[PrivateServer]:
    """``async with outage(private_redis) as server:`` stops the private server and brings it back in any
    case on the way out (``await server.start()`` does it earlier)."""
    try:
        await server.stop()
        yield server
    finally:
        await server.start()


async def ticks_seen(store: MessageStore, n: int) -> None:
    """Wait until the leader has ticked ``n`` more times."""
    seen: set[Any] = set()

    async def check() -> bool:
        seen.add((await store.dispatch_state())["last_tick_at"])
        return len(seen - {None}) > n

    await wait_for(check, 20, f"{n} ticks")
