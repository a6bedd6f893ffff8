"""Helpers of the fault-injection suite (tests/test_chaos.py): load, the accounting invariant, service
logs, and stopping the machine's shared servers for a few seconds (always bringing them back)."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import os
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import aiomysql
import orjson
import pytest
import redis.asyncio as redis

from common.models import OUTCOME_UNKNOWN
from common.settings import Settings
from common.store import MessageStore
from tests.conftest import sql
from tests.procs import ROOT, Cluster, Service, StandIn, wait_for

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
    """The pid of the producer that holds the lead (from ``dispatch_state.leader``, ``host:pid``)."""
    (leader,) = (await query(settings, "SELECT leader FROM dispatch_state WHERE id = 1"))[0]
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
    requests: collections.Counter[int] = collections.Counter()
    unknown: collections.Counter[int] = collections.Counter()
    accepted: collections.Counter[int] = collections.Counter()  # attempts the webhook accepted (2xx)
    for message_id, outcome, error in attempts:
        (unknown if error == OUTCOME_UNKNOWN else requests)[int(message_id)] += 1
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


async def drop_amqp_connections(vhost: str) -> int:
    """Have RabbitMQ close every client connection of ``vhost`` (as on a network blip or a missed
    heartbeat); returns how many it closed."""
    from urllib.parse import quote

    from tests.conftest import MANAGEMENT

    auth = {"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()}
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.get(f"{MANAGEMENT}/vhosts/{quote(vhost, safe='')}/connections") as r:
            r.raise_for_status()
            names = [c["name"] for c in await r.json()]
        for name in names:
            async with session.delete(f"{MANAGEMENT}/connections/{quote(name, safe='')}") as r:
                assert r.status in (204, 404), await r.text()
    return len(names)


# --- shared servers: stop for a few seconds, always restore ----------------------------------------


def _ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def other_test_runs() -> list[str]:
    """Other pytest (or benchmark) runs on this machine: stopping a shared server would break them."""
    got = subprocess.run(["pgrep", "-af", r"pytest|-m bench"], capture_output=True, text=True, check=False)
    mine = _ancestors(os.getpid())
    out = []
    for line in got.stdout.splitlines():
        pid = int(line.split(maxsplit=1)[0])
        if pid not in mine and os.getpid() not in _ancestors(pid):
            out.append(line[:120])
    return out


async def wait_alone(limit: float) -> None:
    """Wait until this is the only test run on the machine (CI runs tests one at a time; developers may
    not); skip, saying why, if that does not happen within ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while others := other_test_runs():
        if time.monotonic() > deadline:
            pytest.skip(f"other test runs on this machine would break if a shared server stopped: {others[:3]}")
        await asyncio.sleep(2)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


async def _run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, list(argv), capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
    )


class SharedServer:
    """One of the local servers every test uses: ``rabbitmq``, ``mysql`` or ``redis``."""

    PORTS = {"rabbitmq": 5672, "mysql": 3306, "redis": 6379}

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = self.PORTS[name]
        self.down = False

    async def stop(self) -> None:
        self.down = True
        if self.name == "rabbitmq":
            done = await _run("rabbitmqctl", "-q", "stop_app")
        elif self.name == "mysql":
            done = await _run("mysqladmin", "-uroot", "-h127.0.0.1", f"-P{self.port}", "shutdown")
        else:
            done = await _run("redis-cli", "-p", str(self.port), "shutdown", "nosave")
        assert done.returncode == 0 or self.name == "redis", f"stopping {self.name}: {done.stderr}"
        await wait_for(lambda: _async(not _answers(self.port)), 60, f"{self.name} to stop", interval=0.1)

    async def start(self) -> None:
        """Start it again and wait until it really serves; a no-op if it was not stopped."""
        if not self.down:
            return
        if self.name == "rabbitmq":
            done = await _run("rabbitmqctl", "-q", "start_app")
            assert done.returncode == 0, f"rabbitmqctl start_app: {done.stderr}"
            done = await _run("rabbitmqctl", "-q", "await_startup")
            assert done.returncode == 0, f"rabbitmqctl await_startup: {done.stderr}"
        else:
            # The project's own way to start the installed servers (what `make services` runs).
            done = await _run("bash", "deploy/local-services.sh", "ensure")
            assert done.returncode == 0, f"deploy/local-services.sh ensure: {done.stderr}"
        await wait_for(self._serves, 90, f"{self.name} to serve again", interval=0.5)
        self.down = False

    async def _serves(self) -> bool:
        if not _answers(self.port):
            return False
        try:
            if self.name == "mysql":
                conn = await aiomysql.connect(host="127.0.0.1", port=self.port, user="root", password="")
                conn.close()
            elif self.name == "redis":
                client = redis.Redis(host="127.0.0.1", port=self.port)
                try:
                    await client.ping()
                finally:
                    await client.aclose()
        except (OSError, aiomysql.Error, redis.RedisError):
            return False
        return True


@contextlib.asynccontextmanager
async def shared_outage(name: str, wait_limit: float) -> AsyncIterator[SharedServer]:
    """``async with shared_outage("redis", ...) as server:`` stops the server (after waiting to be the only
    test run), and brings it back in any case on the way out (``await server.start()`` does it earlier)."""
    await wait_alone(wait_limit)
    server = SharedServer(name)
    try:
        await server.stop()
        yield server
    finally:
        await server.start()


async def _async(value: Any) -> Any:
    return value
