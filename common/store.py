"""The message store: every statement that moves a message through the pipeline, in one place.

Rows move ``pending -> queued`` (claim), ``queued -> sending`` (the consumer's compare-and-set, which stamps
the row with the delivery's token and a sending lease) and ``sending -> sent | pending (retry) | failed``.
Every transition is a compare-and-set on ``status``, and an outcome is fenced by the delivery's token, so
duplicate deliveries, racing replicas and late answers can never move a row twice. Each non-terminal state
has a way out: a ``queued`` row whose publish was never confirmed is published again after the claim lease,
a ``sending`` row whose lease ran out is settled by :meth:`MessageStore.sweep_sending`.

The read queries (lists, details, statistics) are in :mod:`common.queries`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiomysql
import orjson
import pymysql

from common.errors import ConflictError, IdempotencyConflict, LeaseLost, NotFoundError
from common.models import Delivery, Outcome, Status, is_outcome_unknown, outcome_unknown, utcnow
from common.queries import IN_FLIGHT, MessageQueries, Row, SentPage

__all__ = ["Created", "Fence", "Idempotency", "MessageStore", "NewMessage", "Recorded", "Row", "SentPage", "Swept"]


LEASE_LAPSED = "the sending lease ran out with no outcome recorded (its consumer or AMQP message was lost)"


def _in(ids: Sequence[object]) -> str:
    return ", ".join(["%s"] * len(ids))


def _literal(value: object) -> str | None:
    """``value`` as SQL text when that text can only be a number, NULL or a time: an int through ``int()``, a
    naive datetime through ``isoformat`` (digits and separators); None for anything else, which goes as a
    parameter. PyMySQL's escaping of each parameter costs several times as much, and a consumer's group commits
    write a few thousand such values a second (2.4 instead of 4.8 us a row of attempts)."""
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(int(value))
    if type(value) is dt.datetime and value.tzinfo is None:
        return f"'{value.isoformat(' ')}'"
    return None


def _sql(value: object, args: list[Any]) -> str:
    """``value`` written in (:func:`_literal`), or ``%s`` with the value appended to ``args``."""
    text = _literal(value)
    if text is None:
        args.append(value)
        return "%s"
    return text


def _values(values: Iterable[object]) -> tuple[str, list[Any]]:
    """``v1, v2, ...`` with numbers, NULLs and times written in (:func:`_literal`) and the rest as parameters."""
    args: list[Any] = []
    return ", ".join([_sql(v, args) for v in values]), args


# The claim: two ranges of ix_messages_claimable (one per priority; only pending rows have a claim_priority) read
# in index order, so neither a sort nor the rows scheduled later are ever touched; the retry's due time is
# checked on the index entry.
CLAIM_SQL = (
    "SELECT id FROM messages WHERE claim_priority IN ('high', 'normal')"
    " AND send_at <= UTC_TIMESTAMP(6) AND (next_attempt_at IS NULL OR next_attempt_at <= UTC_TIMESTAMP(6))"
    " ORDER BY claim_priority, send_at, id LIMIT %s FOR UPDATE SKIP LOCKED"
)
INSERT_CHUNK = 1000  # rows per multi-row INSERT
IDEMPOTENCY_HOURS = 24

COUNT_SHARDS = 8  # rows per status in message_counts (the insert trigger takes the connection id % 8)


def _moved(given: Mapping[str, int | str]) -> tuple[str, list[Any]]:
    """The ``message_counts`` update of a transition, for the same transaction: ``{status: delta}`` (a delta
    may be SQL, e.g. ``@moved``), on one shard drawn at random so concurrent transactions rarely meet."""
    moves = {k: v for k, v in given.items() if v != 0}
    if not moves:
        return "DO 0", []
    cases = " ".join(f"WHEN %s THEN {v}" if isinstance(v, str) else "WHEN %s THEN %s" for v in moves.values())
    args: list[Any] = []
    for status, delta in moves.items():
        args += [status] if isinstance(delta, str) else [status, delta]
    sql = (
        f"UPDATE message_counts SET n = n + CASE status {cases} END WHERE shard = %s AND status IN ({_in(list(moves))})"
    )
    return sql, [*args, random.randrange(COUNT_SHARDS), *moves]


def _micros(seconds: float) -> int:
    return int(seconds * 1_000_000)


def _case(key: str, values: Mapping[Any, Any]) -> tuple[str, list[Any]]:
    """``CASE key WHEN %s THEN %s ... END``: a value per row in one single-table ``UPDATE`` of a group of rows
    (``WHERE key IN (...)``). A derived table of ``SELECT ... UNION ALL`` joined to the table did the same at
    about half again the server's CPU per row (each SELECT of the union is a query block of its own); ``VALUES
    ROW`` is not portable between MySQL 8 and MariaDB."""
    args: list[Any] = []
    whens = " ".join([f"WHEN {_sql(k, args)} THEN {_sql(v, args)}" for k, v in values.items()])
    return f"CASE {key} {whens} END", args


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to create: ``send_at`` naive UTC or None (now), ``priority`` 'high' or 'normal'."""

    recipient: str
    content: str
    send_at: dt.datetime | None = None
    priority: str = "normal"
    traceparent: str | None = None  # the W3C context of the request that made it (tracing on)

    def due(self, now: dt.datetime) -> dt.datetime:
        """Its ``send_at`` as stored: a past one (or none) means now."""
        return now if self.send_at is None or self.send_at < now else self.send_at


def _tp(traceparent: str | None) -> str | None:
    """A W3C traceparent as the column holds it (55 characters)."""
    return traceparent[:55] if traceparent else None


# A row of a create's multi-row INSERT (recipient, content, send_at, priority, created_at, updated_at,
# traceparent): the time the rows share is the server's, set once per statement (@message_sender_now; a user
# variable holds it as text, hence the casts where it is compared); a given send_at is kept if it is later.
_ROW_NOW = "(%s, %s, @message_sender_now, %s, @message_sender_now, @message_sender_now, %s)"
_ROW_LATER = (
    "(%s, %s, GREATEST(CAST(%s AS DATETIME(6)), CAST(@message_sender_now AS DATETIME(6))), %s,"
    " @message_sender_now, @message_sender_now, %s)"
)


def _row_values(chunk: Sequence[NewMessage], traceparent: str | None) -> list[Any]:
    values: list[Any] = []
    for m in chunk:
        values += [m.recipient, m.content]
        if m.send_at is not None:
            values.append(m.send_at)
        values += [m.priority, _tp(m.traceparent or traceparent)]
    return values


@dataclass(frozen=True, slots=True)
class Idempotency:
    """The ``Idempotency-Key`` of a create request and the fingerprint of the request it names."""

    key: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Created:
    """The ids a create made (or, ``replayed``, the ones an earlier request with the same key made)."""

    ids: list[int]
    replayed: bool
    at: dt.datetime | None  # the created_at (and updated_at) of every row made now; None when replayed


class _KeyTaken(Exception):
    """Raised when an idempotency key vanished between the duplicate insert and the read (expired, removed)."""


@dataclass(frozen=True, slots=True)
class Fence:
    """A producer's hold on the leader lease: its name and the lease's epoch when it took it. Every statement
    a leader makes that moves rows checks it in the same transaction, so a leader that froze and woke up
    after another took over cannot claim, re-publish or sweep any more."""

    holder: str
    epoch: int


async def _check_fence(cur: aiomysql.Cursor, fence: Fence | None) -> None:
    """Hold the lease row (shared) for the rest of the transaction if ``fence`` is still the valid lease;
    raise :class:`LeaseLost` otherwise. A takeover waits for the transaction to finish."""
    if fence is None:
        return
    await cur.execute(
        "SELECT 1 FROM producer_lease WHERE id = 1 AND holder = %s AND epoch = %s"
        " AND expires_at > UTC_TIMESTAMP(6) LOCK IN SHARE MODE",
        (fence.holder, fence.epoch),
    )
    if await cur.fetchone() is None:
        raise LeaseLost(f"{fence.holder} no longer holds the leader lease (epoch {fence.epoch})")


@dataclass(frozen=True, slots=True)
class Recorded:
    """What a group commit did: the ``sent_at`` of each sent row it recorded (or found recorded by an earlier
    run of the same commit whose answer was lost), and the outcomes it refused because their row no longer
    carries their delivery's token (the sweep settled it meanwhile)."""

    sent_at: dict[int, dt.datetime]
    fenced: list[Outcome]


@dataclass(frozen=True, slots=True)
class Swept:
    """A ``sending`` row whose lease ran out, as the sweep settled it."""

    id: int
    recipient: str
    content: str
    kind: str  # 'failed' | 'retry'
    attempt: int
    error: str


STATUSES = tuple(s.value for s in Status)


async def count_rows(cur: aiomysql.Cursor) -> dict[str, int]:
    """Set ``message_counts`` to a full count of the table, in one transaction: every shard of every status
    to 0 and the totals into shard 0. Every transition updates the counts in its own transaction, so holding
    all their rows first (after the sent counter, in the group commit's lock order) makes those wait: the
    count read next is exact however busy the pipeline is. Also the migration's first count."""
    await cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
    await cur.execute("START TRANSACTION")
    await cur.execute(
        "INSERT INTO message_counts (status, shard, n) VALUES "
        + ", ".join(["(%s, %s, 0)"] * (len(STATUSES) * COUNT_SHARDS))
        + " ON DUPLICATE KEY UPDATE n = n",
        [v for st in STATUSES for shard in range(COUNT_SHARDS) for v in (st, shard)],
    )
    await cur.execute("SELECT value FROM counters WHERE name = 'sent' FOR UPDATE")
    await cur.fetchall()
    await cur.execute("SELECT status FROM message_counts FOR UPDATE")
    await cur.fetchall()
    await cur.execute("SELECT status, COUNT(*) FROM messages GROUP BY status")
    counts = dict.fromkeys(STATUSES, 0) | {str(st): int(n) for st, n in await cur.fetchall()}
    await cur.execute("UPDATE message_counts SET n = 0")
    totals, values = _case("status", counts)
    await cur.execute(f"UPDATE message_counts SET n = {totals} WHERE shard = 0", values)
    await cur.execute(
        "UPDATE counters SET value = GREATEST(value, (SELECT COALESCE(MAX(sent_seq), 0) FROM messages))"
        " WHERE name = 'sent'"
    )
    await cur.execute("COMMIT")
    return counts


async def _rollback(conn: aiomysql.Connection) -> None:
    with contextlib.suppress(Exception):  # a dead connection cannot roll back: the server does
        await conn.rollback()


async def _drain(cur: aiomysql.Cursor) -> None:
    while await cur.nextset():
        pass


T = TypeVar("T")
DEADLOCK = 1213  # ER_LOCK_DEADLOCK: InnoDB rolled the victim's whole transaction back
DEADLOCK_ATTEMPTS = 4


async def _again_on_deadlock(run: Callable[[], Awaitable[T]]) -> T:
    """Run a short transaction, and again (a few times, after a few milliseconds) when InnoDB chose it as a
    deadlock's victim. The claim locks an index entry of ``ix_messages_claimable`` and then the row, while a
    transition by primary key (a cancel) holds the row and then changes that index entry: each waits for the
    other, and InnoDB rolls one back whole, so running it again is safe and is what the server asks for."""
    for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
        try:
            return await run()
        except pymysql.err.OperationalError as exc:
            if not (exc.args and exc.args[0] == DEADLOCK) or attempt == DEADLOCK_ATTEMPTS:
                raise
            await asyncio.sleep(random.uniform(0.001, 0.005 * attempt))
    raise AssertionError("unreachable")


class MessageStore(MessageQueries):
    async def _move(self, update: str, args: Sequence[Any], moves: Mapping[str, int | str]) -> int:
        """One status transition (``update``, an UPDATE) and its counts in one transaction, in one round trip:
        ``moves`` gives each status's change in terms of ``@moved``, the rows the UPDATE changed; returns that."""
        return await _again_on_deadlock(lambda: self._move_once(update, args, moves))

    async def _move_once(self, update: str, args: Sequence[Any], moves: Mapping[str, int | str]) -> int:
        counts, count_args = _moved(moves)
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"START TRANSACTION; {update}; SET @moved = ROW_COUNT(); {counts}; SELECT @moved; COMMIT",
                [*args, *count_args],
            )
            for _ in range(4):
                await cur.nextset()
            (moved,) = await cur.fetchone()
            await _drain(cur)
        return int(moved)

    # --- creating --------------------------------------------------------------------------------

    async def create(self, recipient: str, content: str, traceparent: str | None = None) -> int:
        """Insert one ``pending`` message; ``traceparent``: the W3C context of the request (tracing on)."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            if traceparent is None:
                await cur.execute("INSERT INTO messages (recipient, content) VALUES (%s, %s)", (recipient, content))
            else:
                await cur.execute(
                    "INSERT INTO messages (recipient, content, traceparent) VALUES (%s, %s, %s)",
                    (recipient, content, _tp(traceparent)),
                )
            return int(cur.lastrowid)

    async def create_messages(
        self, items: Sequence[NewMessage], idempotency: Idempotency | None = None, traceparent: str | None = None
    ) -> Created:
        """Insert ``items`` as ``pending`` messages in one transaction, in multi-row statements of up to
        :data:`INSERT_CHUNK` rows; returns their ids in order. A ``send_at`` in the past (or none) means now.
        ``traceparent`` (tracing on) is stored with every item that does not carry its own.

        Without ``idempotency`` it takes two round trips whatever the number of rows up to
        :data:`INSERT_CHUNK` (the rows and the check of their ids, then the counts and the commit): the
        gateway's group commit of single creates (:mod:`gateway.intake`) and ``POST /messages/batch`` both
        come through here.

        With ``idempotency``, the key's row is inserted first in the same transaction: a concurrent request
        with the same key waits on its primary key until this one commits, then finds it. A key seen within
        :data:`IDEMPOTENCY_HOURS` returns the ids it created (``replayed``) and creates nothing; with another
        fingerprint (a different body) it raises :class:`IdempotencyConflict`."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            for _ in range(3):
                counted = False
                try:
                    begin = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION; "
                    if idempotency is not None:
                        await cur.execute(begin.removesuffix("; "))
                        await _drain(cur)
                        begin = ""
                        found = await self._claim_key(cur, conn, idempotency)
                        if found is not None:
                            await conn.commit()
                            return Created(found, replayed=True, at=None)
                    counted = True
                    ids, now = await self._insert_rows(cur, begin, items, traceparent)
                    tail = "SET @message_sender_counted = NULL; {}; {}COMMIT"
                    counts, count_args = _moved({"pending": len(ids)})
                    key_sql, key_args = "", []
                    if idempotency is not None:
                        key_sql = "UPDATE idempotency_keys SET ids = %s WHERE idem_key = %s; "
                        key_args = [orjson.dumps(ids).decode(), idempotency.key]
                    await cur.execute(tail.format(counts, key_sql), [*count_args, *key_args])
                    await _drain(cur)
                    return Created(ids, replayed=False, at=now)
                except _KeyTaken:
                    await _rollback(conn)  # an expired key was removed by another request meanwhile: again
                except BaseException:
                    await _rollback(conn)
                    if counted:  # the pooled connection must not keep skipping the trigger
                        try:
                            await cur.execute("SET @message_sender_counted = NULL")
                        except Exception:
                            conn.close()
                    raise
        raise RuntimeError(f"the idempotency key {idempotency and idempotency.key!r} kept changing hands")

    @staticmethod
    async def _insert_rows(
        cur: aiomysql.Cursor, begin: str, items: Sequence[NewMessage], traceparent: str | None
    ) -> tuple[list[int], dt.datetime]:
        """The rows of :meth:`create_messages`, in the open transaction (``begin`` opens it when not empty):
        their ids in order and the time they share (``created_at = updated_at``, and ``send_at`` unless
        later). The insert trigger is told to skip them (``@message_sender_counted``): the caller counts
        them in one statement."""
        ids: list[int] = []
        now: dt.datetime | None = None
        for start in range(0, len(items), INSERT_CHUNK):
            chunk = items[start : start + INSERT_CHUNK]
            # The time every row shares is set once, on the server (escaping three datetimes a row was a fifth
            # of a batch's time in the gateway); a send_at is sent only when given, and the server keeps
            # the later of it and now.
            head = begin + (
                "SET @message_sender_counted = 1, @message_sender_now = UTC_TIMESTAMP(6); " if start == 0 else ""
            )
            values = ", ".join(_ROW_LATER if m.send_at is not None else _ROW_NOW for m in chunk)
            # One multi-row INSERT takes consecutive auto-increment values (a "simple insert": guaranteed by
            # innodb_autoinc_lock_mode 0 and 1, MariaDB's default). Checked in the same round trip, so that a
            # server that interleaves them refuses the batch (nothing created) instead of answering wrong ids.
            await cur.execute(
                head + "INSERT INTO messages (recipient, content, send_at, priority, created_at, updated_at,"
                f" traceparent) VALUES {values}; SELECT LAST_INSERT_ID(), CAST(@message_sender_now AS DATETIME(6)),"
                " @@auto_increment_increment, (SELECT COUNT(*) FROM messages WHERE id BETWEEN LAST_INSERT_ID()"
                " AND LAST_INSERT_ID() + %s * @@auto_increment_increment AND created_at = @message_sender_now)",
                [*_row_values(chunk, traceparent), len(chunk) - 1],
            )
            while cur.description is None:  # past the SET and the INSERT, to the SELECT
                await cur.nextset()
            first, now, step, mine = await cur.fetchone()
            await _drain(cur)
            if int(mine) != len(chunk):
                raise RuntimeError(
                    f"the {len(chunk)} rows of one INSERT did not get consecutive ids from {first}"
                    " (innodb_autoinc_lock_mode 2?): nothing created"
                )
            ids += [int(first) + i * int(step) for i in range(len(chunk))]
        assert isinstance(now, dt.datetime)
        return ids, now

    @staticmethod
    async def _claim_key(cur: aiomysql.Cursor, conn: aiomysql.Connection, idempotency: Idempotency) -> list[int] | None:
        """Insert the key's row (None: this transaction owns the key) or return the ids of the earlier request
        that used it. A duplicate-key error comes only once the row's owner committed (the insert waits for
        it); the transaction is then begun again before reading, so that no shared lock is held while the
        other waiters read too (holding one and asking for more is what deadlocks)."""
        try:
            await cur.execute(
                "INSERT INTO idempotency_keys (idem_key, fingerprint, ids, created_at)"
                " VALUES (%s, %s, '[]', UTC_TIMESTAMP(6))",
                (idempotency.key, idempotency.fingerprint),
            )
            return None
        except pymysql.err.IntegrityError as exc:
            if exc.args[0] != 1062:
                raise
        await conn.rollback()
        await cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        await conn.begin()
        taken = await cur.execute(  # older than 24 h: the key is free again
            "UPDATE idempotency_keys SET fingerprint = %s, ids = '[]', created_at = UTC_TIMESTAMP(6)"
            " WHERE idem_key = %s AND created_at < UTC_TIMESTAMP(6) - INTERVAL %s HOUR",
            (idempotency.fingerprint, idempotency.key, IDEMPOTENCY_HOURS),
        )
        if taken:
            return None
        await cur.execute("SELECT fingerprint, ids FROM idempotency_keys WHERE idem_key = %s", (idempotency.key,))
        row = await cur.fetchone()
        if row is None:
            raise _KeyTaken
        fingerprint, ids = row
        if fingerprint != idempotency.fingerprint:
            raise IdempotencyConflict(
                f"the Idempotency-Key {idempotency.key!r} was already used with a different request"
                " in the last 24 hours; use a new key for a new request"
            )
        return [int(i) for i in orjson.loads(ids)]

    async def cancel(self, message_id: int) -> Row:
        """Move a message nobody has claimed yet (``pending``: due, scheduled or waiting for a retry) to the
        terminal ``cancelled``. The compare-and-set on ``pending`` and the claim's ``FOR UPDATE`` take the
        same row lock, so a cancel and a claim racing for a row serialise: either the claim took it first
        (the cancel finds it ``queued``: :class:`ConflictError`) or it is cancelled and never claimed.
        Cancelling a cancelled message again changes nothing."""
        changed = await self._move(
            "UPDATE messages SET status = 'cancelled', cancelled_at = UTC_TIMESTAMP(6), next_attempt_at = NULL"
            " WHERE id = %s AND status = 'pending'",
            [message_id],
            {"pending": "-@moved", "cancelled": "@moved"},
        )
        row = await self.get(message_id)
        if row is None:
            raise NotFoundError(f"message {message_id} does not exist")
        if not changed and row["status"] != "cancelled":
            raise ConflictError(
                f"message {message_id} is {row['status']}: only a message not claimed yet (pending, scheduled"
                " or waiting for a retry) can be cancelled"
            )
        return row

    async def create_many(self, rows: Iterable[tuple[str, str]]) -> int:
        """Insert many pending messages in multi-row statements; returns how many."""
        batch = list(rows)
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.executemany("INSERT INTO messages (recipient, content) VALUES (%s, %s)", batch)
        return len(batch)

    async def retry_failed(self, message_id: int, force: bool = False) -> Row:
        """Put a ``failed`` message back to ``pending`` with a fresh attempt budget. A message that failed with
        an unknown outcome may have reached the service: it is retried only with ``force``."""
        row = await self.get(message_id)
        if row is None:
            raise NotFoundError(f"message {message_id} does not exist")
        if row["status"] == "failed" and is_outcome_unknown(row["last_error"]) and not force:
            raise ConflictError(
                f"message {message_id} failed with an unknown outcome: it may have reached the notification"
                " service already; retry with force=true to send it anyway (it may arrive twice)"
            )
        changed = await self._move(
            "UPDATE messages SET status = 'pending', attempts = 0, next_attempt_at = NULL, queued_at = NULL,"
            " published_at = NULL, delivery_token = NULL, failed_at = NULL WHERE id = %s AND status = 'failed'",
            [message_id],
            {"failed": "-@moved", "pending": "@moved"},
        )
        row = await self.get(message_id)
        if row is None:
            raise NotFoundError(f"message {message_id} does not exist")
        if not changed:
            raise ConflictError(f"message {message_id} is {row['status']}, only a failed message can be retried")
        return row

    # --- the producer's side --------------------------------------------------------------------

    async def traceparents(self, ids: Sequence[int]) -> dict[int, str | None]:
        """The stored ``traceparent`` of each of ``ids`` (read by the producer only while tracing is on)."""
        if not ids:
            return {}
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"SELECT id, traceparent FROM messages WHERE id IN ({_in(ids)})", list(ids))
            return {int(i): tp for i, tp in await cur.fetchall()}

    async def claim(self, limit: int, fence: Fence | None = None, budget: bool = False) -> list[int]:
        """Move up to ``limit`` due ``pending`` rows to ``queued``, ``high`` priority first, then ``normal``,
        each the longest due first (``send_at``, then id); return their ids. A row scheduled later, or waiting
        for its retry, is not due.
        ``SKIP LOCKED`` lets concurrent claimers take disjoint rows without waiting on each other.

        With ``budget`` (the producer's tick), claims still waiting in the queue count against ``limit``:
        never more than ``limit`` rows are ``queued`` at once, so a backlog cannot pile up while consumers
        are away and go out in one burst when they come back. With ``fence``, only the lease holder claims."""
        return await _again_on_deadlock(lambda: self._claim_once(limit, fence, budget))

    async def _claim_once(self, limit: int, fence: Fence | None, budget: bool) -> list[int]:
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            await conn.begin()
            try:
                await _check_fence(cur, fence)
                if budget:
                    await cur.execute(f"SELECT COUNT(*) FROM messages WHERE {IN_FLIGHT} AND status = 'queued'")
                    (waiting,) = await cur.fetchone()
                    limit -= int(waiting)
                if limit <= 0:
                    await conn.commit()
                    return []
                await cur.execute(CLAIM_SQL, (limit,))
                ids = [int(r[0]) for r in await cur.fetchall()]
                if ids:
                    await cur.execute(
                        "UPDATE messages SET status = 'queued', queued_at = UTC_TIMESTAMP(6), published_at = NULL"
                        f" WHERE id IN ({_values(ids)[0]})"
                    )
                    await cur.execute(*_moved({"pending": -len(ids), "queued": len(ids)}))
                await conn.commit()
                return ids
            except BaseException:
                await _rollback(conn)
                raise

    async def mark_published(self, ids: Sequence[int]) -> None:
        """Record that the publish of these claims was confirmed by the broker: from now on only a lost AMQP
        message (not a slow consumer) makes them stale (see :meth:`reclaim_stale`)."""
        if not ids:
            return
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "UPDATE messages SET published_at = UTC_TIMESTAMP(6) WHERE status = 'queued'"
                f" AND id IN ({_values(ids)[0]})"
            )

    async def release(self, ids: Sequence[int]) -> int:
        """Return ``queued`` rows whose publish failed to ``pending`` so the next tick claims them again."""
        if not ids:
            return 0
        return await self._move(
            "UPDATE messages SET status = 'pending', queued_at = NULL, published_at = NULL"
            f" WHERE status = 'queued' AND id IN ({_in(ids)})",
            list(ids),
            {"queued": "-@moved", "pending": "@moved"},
        )

    async def reclaim_stale(
        self, lease_seconds: float, limit: int, queue_empty: bool, fence: Fence | None = None
    ) -> list[int]:
        """``queued`` rows whose AMQP message may be lost, with their lease renewed, to be published again:

        - a claim whose publish was never confirmed, older than the lease (a producer died between its
          commit and its publish), or with no claim time at all (a row set to ``queued`` by hand);
        - a confirmed claim older than the lease, but only while the dispatch queue holds no ready message
          (``queue_empty``): then its message was lost with the queue (purged, deleted, a lost node). A
          confirmed claim that merely waits behind a backlog is left alone, so a slow consumer never causes
          extra copies. A duplicate that does reach a consumer is dropped by the compare-and-set."""
        confirmed = " OR published_at < UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND" if queue_empty else ""
        args: list[Any] = [_micros(lease_seconds)] * (2 if queue_empty else 1)
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            await conn.begin()
            try:
                await _check_fence(cur, fence)
                await cur.execute(
                    f"SELECT id FROM messages WHERE {IN_FLIGHT} AND status = 'queued' AND (queued_at IS NULL"
                    " OR (published_at IS NULL AND queued_at < UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND)"
                    f"{confirmed}) ORDER BY created_at, id LIMIT %s FOR UPDATE SKIP LOCKED",
                    [*args, limit],
                )
                ids = [int(r[0]) for r in await cur.fetchall()]
                if ids:
                    await cur.execute(
                        "UPDATE messages SET queued_at = UTC_TIMESTAMP(6), published_at = NULL"
                        f" WHERE id IN ({_in(ids)})",
                        ids,
                    )
                await conn.commit()
                return ids
            except BaseException:
                await _rollback(conn)
                raise

    async def sweep_sending(self, max_attempts: int, limit: int, fence: Fence | None = None) -> list[Swept]:
        """Settle ``sending`` rows whose sending lease ran out: their delivery is over (the request is bounded by
        the webhook timeout) but no outcome was recorded, because its consumer died, or the AMQP message was
        lost with its consumer. Nobody knows whether the service got the request. Under the guarantee of the
        consumer that took the row (recorded by its compare-and-set): at-most-once marks it ``failed``
        "outcome unknown"; at-least-once puts it back to ``pending`` (due now) so it is sent again with the
        same ``Idempotency-Key``, within its attempt budget. Clearing the delivery token fences out a late
        outcome of the old delivery. A row with no lease (set to ``sending`` by hand) is settled at once,
        at-most-once. One attempt row per settled row says what happened."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            await conn.begin()
            try:
                await _check_fence(cur, fence)
                await cur.execute(
                    "SELECT id, recipient, content, attempts, at_least_once FROM messages"
                    f" WHERE {IN_FLIGHT} AND status = 'sending'"
                    " AND (lease_expires_at IS NULL OR lease_expires_at < UTC_TIMESTAMP(6))"
                    " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                    (limit,),
                )
                found = await cur.fetchall()
                swept: list[Swept] = []
                for message_id, recipient, content, attempts, at_least_once in found:
                    attempt = int(attempts) + 1
                    again = at_least_once and attempt < max_attempts
                    error = outcome_unknown(LEASE_LAPSED, resent=again)
                    if at_least_once and not again:
                        error = f"gave up after {attempt} attempts; last: {error}"
                    kind = "retry" if again else "failed"
                    swept.append(Swept(int(message_id), recipient, content, kind, attempt, error))
                if swept:
                    now = utcnow()
                    # Each row's kind is its own CASE in every column it decides (no assignment reads another's
                    # result: MariaDB can be set to evaluate them all on the old row).
                    again, again_args = _case("id", {s.id: s.kind == "retry" for s in swept})
                    errors, error_args = _case("id", {s.id: s.error for s in swept})
                    ids = [s.id for s in swept]
                    await cur.execute(
                        f"UPDATE messages SET status = IF({again}, 'pending', 'failed'), last_error = {errors},"
                        " attempts = attempts + 1, delivery_token = NULL, lease_expires_at = NULL,"
                        f" queued_at = IF({again}, NULL, queued_at),"
                        f" next_attempt_at = IF({again}, UTC_TIMESTAMP(6), NULL),"
                        f" failed_at = IF({again}, NULL, UTC_TIMESTAMP(6))"
                        f" WHERE id IN ({_in(ids)}) AND status = 'sending'",
                        [*again_args, *error_args, *again_args, *again_args, *again_args, *ids],
                    )
                    retried = sum(w.kind == "retry" for w in swept)
                    await cur.execute(
                        *_moved({"sending": -len(swept), "pending": retried, "failed": len(swept) - retried})
                    )
                    await cur.execute(
                        "INSERT INTO message_attempts"
                        " (message_id, attempt, started_at, finished_at, outcome, http_status, error, duration_ms)"
                        " VALUES " + ", ".join(["(%s, %s, %s, %s, %s, NULL, %s, 0)"] * len(swept)),
                        [v for s in swept for v in (s.id, s.attempt, now, now, s.kind, s.error)],
                    )
                await conn.commit()
                return swept
            except BaseException:
                await _rollback(conn)
                raise

    # --- the consumer's side --------------------------------------------------------------------

    async def begin_sending(
        self, claims: Sequence[tuple[int, int]], lease_seconds: float = 60.0, at_least_once: bool = False
    ) -> dict[int, Delivery]:
        """The ``queued -> sending`` compare-and-set for a batch of ``(id, token)`` claims, in one round trip.

        One ``UPDATE`` moves every still-``queued`` row to ``sending``, stamped with its claim's token (each
        delivery draws its own and keeps it across retries) and a sending lease of ``lease_seconds`` (longer
        than the request may take: past it, :meth:`sweep_sending` settles the row, under ``at_least_once``, the
        winner's delivery guarantee); the ``SELECT`` of the
        same round trip reads the rows back: a delivery won its row if the row carries its token, whatever
        else happened, even if this statement's answer was lost and it is run again. Unknown ids are missing
        from the result. While sending is switched off, the same statement puts the claims back to
        ``pending`` instead (stop means stop: nothing new goes out; they wait and are claimed again, oldest
        first, once sending is on)."""
        if not claims:
            return {}
        id_list, _ = _values(sorted({i for i, _ in claims}))  # ints: written in, no parameters
        tokens, token_args = _case("id", dict(reversed(claims)))  # an id claimed twice here: its first token
        counts, count_args = _moved(
            {"queued": "-@moved", "sending": "IF(@on, @moved, 0)", "pending": "IF(@on, 0, @moved)"}
        )
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                # The switch cannot change before this transaction ends: its row is held shared.
                "START TRANSACTION; SET @on = (SELECT sending FROM dispatch_state WHERE id = 1 LOCK IN SHARE MODE);"
                " UPDATE messages SET status = IF(@on, 'sending', 'pending'),"
                f" delivery_token = IF(@on, {tokens}, NULL),"
                " lease_expires_at = IF(@on, UTC_TIMESTAMP(6) + INTERVAL %s MICROSECOND, NULL),"
                " at_least_once = %s, queued_at = IF(@on, queued_at, NULL), published_at = IF(@on, published_at, NULL)"
                f" WHERE id IN ({id_list}) AND status = 'queued';"
                f" SET @moved = ROW_COUNT(); {counts};"
                " SELECT id, recipient, content, status, attempts, delivery_token"
                f" FROM messages WHERE id IN ({id_list}); COMMIT",
                [*token_args, _micros(lease_seconds), at_least_once, *count_args],
            )
            for _ in range(5):
                await cur.nextset()
            found = await cur.fetchall()
            await _drain(cur)
        return {int(r[0]): Delivery(int(r[0]), r[1], r[2], r[3], int(r[4]), r[5]) for r in found}

    async def give_back(self, message_id: int, token: int) -> bool:
        """A row this delivery won (``sending`` with its token) that it will not send after all (the rate limit
        had no slot for it in time): back to ``pending``, due at once, no attempt spent, nothing recorded; the
        next tick claims it again. False if the row is no longer this delivery's."""
        moved = await self._move(
            "UPDATE messages SET status = 'pending', delivery_token = NULL, lease_expires_at = NULL,"
            " queued_at = NULL, published_at = NULL WHERE id = %s AND status = 'sending' AND delivery_token = %s",
            [message_id, token],
            {"sending": "-@moved", "pending": "@moved"},
        )
        return bool(moved)

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> Recorded:
        """Write a batch of delivery outcomes as one transaction (the group commit): the row updates, the sent
        counter, and one ``message_attempts`` row per attempt.

        An outcome applies only while its row is ``sending`` with the outcome's delivery token (fencing): a
        late outcome of a delivery whose row the sweep settled meanwhile changes nothing and is returned in
        ``fenced``; an outcome whose row already carries it finished (this commit ran before and its answer
        was lost) is not written twice. Sent rows get their ``sent_at`` and ``sent_seq`` under the lock of
        the sent counter, so commits number them one after another: ``sent_at`` never goes backwards and
        ``sent_seq`` follows ``(sent_at, id)`` order exactly, which is what lets an offset page be a range of
        ``sent_seq``. Two round trips: lock and read, then write and commit."""
        if not outcomes:
            return Recorded({}, [])
        any_sent = any(o.kind == "sent" for o in outcomes)
        ids = sorted({o.id for o in outcomes})
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            try:
                head = "START TRANSACTION;"
                if any_sent:
                    head += (
                        " SELECT value FROM counters WHERE name = 'sent' FOR UPDATE;"
                        " SELECT GREATEST(UTC_TIMESTAMP(6), COALESCE(MAX(sent_key) + INTERVAL 1 MICROSECOND,"
                        " UTC_TIMESTAMP(6))) FROM messages;"
                    )
                id_list, _ = _values(ids)  # ints: written in, no parameters
                await cur.execute(
                    head + f" SELECT id, status, delivery_token, sent_at FROM messages WHERE id IN ({id_list})"
                    " ORDER BY id FOR UPDATE"
                )
                base, sent_at = 0, None
                if any_sent:
                    await cur.nextset()
                    (base,) = await cur.fetchone()
                    await cur.nextset()
                    (sent_at,) = await cur.fetchone()
                await cur.nextset()
                rows = {int(r[0]): (r[1], r[2], r[3]) for r in await cur.fetchall()}
                await _drain(cur)
                live: list[Outcome] = []
                fenced: list[Outcome] = []
                recorded: dict[int, dt.datetime] = {}
                for o in outcomes:
                    status, token, row_sent_at = rows.get(o.id, (None, None, None))
                    if token != o.token:
                        fenced.append(o)
                    elif status == "sending":
                        live.append(o)
                    elif status == "sent" and row_sent_at is not None:  # recorded by an earlier run of this commit
                        recorded[o.id] = row_sent_at
                statements: list[str] = []
                args: list[Any] = []
                sent = sorted(o.id for o in live if o.kind == "sent")
                if sent:
                    remote = {o.id: o.remote_message_id for o in live if o.kind == "sent"}
                    rids, rid_args = _case("id", {i: remote[i] for i in sent})
                    seqs, seq_args = _case("id", {i: int(base) + n for n, i in enumerate(sent, start=1)})
                    statements += [
                        f"UPDATE messages SET status = 'sent', remote_message_id = {rids}, sent_at = %s,"
                        f" sent_seq = {seqs}, attempts = attempts + 1, last_error = NULL, next_attempt_at = NULL,"
                        f" lease_expires_at = NULL WHERE id IN ({_values(sent)[0]}) AND status = 'sending'",
                        "UPDATE counters SET value = %s WHERE name = 'sent'",
                    ]
                    args += [*rid_args, sent_at, *seq_args, int(base) + len(sent)]
                    assert isinstance(sent_at, dt.datetime)
                    recorded.update(dict.fromkeys(sent, sent_at))
                self._outcome_statements(live, statements, args)
                kinds = [o.kind for o in live]
                moves = {"sending": -len(live), "sent": kinds.count("sent"), "pending": kinds.count("retry")}
                count_sql, count_args = _moved({**moves, "failed": kinds.count("failed")})
                statements.append(count_sql)
                args += count_args
                statements.append("COMMIT")
                await cur.execute(";\n".join(statements), args)
                await _drain(cur)
            except BaseException:
                await _rollback(conn)
                raise
        return Recorded(recorded, fenced)

    @staticmethod
    def _outcome_statements(outcomes: Sequence[Outcome], statements: list[str], args: list[Any]) -> None:
        """The retry and failed updates and the attempt rows of a group commit (rows known to be live)."""
        retry = [o for o in outcomes if o.kind == "retry"]
        failed = [o for o in outcomes if o.kind == "failed"]
        if retry:
            errors, error_args = _case("id", {o.id: o.error for o in retry})
            due, due_args = _case("id", {o.id: o.next_attempt_at for o in retry})
            statements.append(
                f"UPDATE messages SET status = 'pending', last_error = {errors}, next_attempt_at = {due},"
                " attempts = attempts + 1, queued_at = NULL, published_at = NULL, lease_expires_at = NULL"
                f" WHERE id IN ({_values(o.id for o in retry)[0]}) AND status = 'sending'"
            )
            args += [*error_args, *due_args]
        if failed:
            errors, error_args = _case("id", {o.id: o.error for o in failed})
            statements.append(
                f"UPDATE messages SET status = 'failed', last_error = {errors}, attempts = attempts + 1,"
                " next_attempt_at = NULL, lease_expires_at = NULL, failed_at = UTC_TIMESTAMP(6)"
                f" WHERE id IN ({_values(o.id for o in failed)[0]}) AND status = 'sending'"
            )
            args += error_args
        if outcomes:
            rows = []
            for o in outcomes:
                values = (o.id, o.attempt, o.started_at, o.finished_at, o.kind, o.http_status, o.error)
                rows.append(f"({', '.join([_sql(v, args) for v in (*values, o.duration_ms, o.provider)])})")
            statements.append(
                "INSERT INTO message_attempts"
                " (message_id, attempt, started_at, finished_at, outcome, http_status, error, duration_ms, provider)"
                f" VALUES {', '.join(rows)}"
                " ON DUPLICATE KEY UPDATE id = id"  # the same attempt twice is one attempt
            )

    async def record_unrecordable(self, outcome: Outcome, reason: str) -> bool:
        """The last resort for an outcome that cannot be written (e.g. a value out of the column's range): mark
        its row ``failed`` with ``reason``, touching nothing else, so it does not stay ``sending``."""
        moved = await self._move(
            "UPDATE messages SET status = 'failed', last_error = %s, next_attempt_at = NULL, lease_expires_at = NULL,"
            " failed_at = UTC_TIMESTAMP(6) WHERE id = %s AND status = 'sending' AND delivery_token = %s",
            [reason[:1000], outcome.id, outcome.token],
            {"sending": "-@moved", "failed": "@moved"},
        )
        return bool(moved)

    # --- the counts by status, retention ----------------------------------------------------------

    async def recount(self) -> dict[str, int]:
        """Rebuild ``message_counts`` from the table (after rows were changed by hand; ``message-sender
        recount``); exact however busy the pipeline is (see :func:`count_rows`)."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            try:
                return await count_rows(cur)
            except BaseException:
                await _rollback(conn)
                raise

    async def remove_expired(self, days: float, limit: int, fence: Fence | None = None) -> tuple[int, int, int]:
        """One retention batch: up to ``limit`` ``sent`` rows sent, up to ``limit`` ``failed`` rows failed and
        up to ``limit`` ``cancelled`` rows cancelled more than ``days`` ago, oldest first, with their attempt
        rows and their counts, in one short transaction (index ranges of ``ix_messages_sent_key``,
        ``ix_messages_failed_at`` and ``ix_messages_cancelled_at``; rows in use are skipped, not waited for).
        Removing the oldest sent rows keeps offsets and cursors of the sent list right: the numbering of the
        others does not move. Returns ``(sent, failed, cancelled)`` removed."""
        cutoff = "UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND"
        age = _micros(days * 86400)
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            await conn.begin()
            try:
                await _check_fence(cur, fence)
                await cur.execute(
                    f"SELECT id FROM messages WHERE sent_key < {cutoff}"
                    " ORDER BY sent_key, id LIMIT %s FOR UPDATE SKIP LOCKED",
                    (age, limit),
                )
                sent = [int(r[0]) for r in await cur.fetchall()]
                await cur.execute(
                    f"SELECT id FROM messages WHERE failed_at < {cutoff} AND status = 'failed'"
                    " ORDER BY failed_at LIMIT %s FOR UPDATE SKIP LOCKED",
                    (age, limit),
                )
                failed = [int(r[0]) for r in await cur.fetchall()]
                await cur.execute(
                    f"SELECT id FROM messages WHERE cancelled_at < {cutoff} AND status = 'cancelled'"
                    " ORDER BY cancelled_at LIMIT %s FOR UPDATE SKIP LOCKED",
                    (age, limit),
                )
                cancelled = [int(r[0]) for r in await cur.fetchall()]
                ids = sent + failed + cancelled
                if ids:
                    await cur.execute(f"DELETE FROM message_attempts WHERE message_id IN ({_in(ids)})", ids)
                    await cur.execute(f"DELETE FROM messages WHERE id IN ({_in(ids)})", ids)
                    await cur.execute(
                        *_moved({"sent": -len(sent), "failed": -len(failed), "cancelled": -len(cancelled)})
                    )
                await conn.commit()
                return len(sent), len(failed), len(cancelled)
            except BaseException:
                await _rollback(conn)
                raise

    # --- the dispatch switch, leadership and ticks -----------------------------------------------

    async def set_sending(self, sending: bool) -> bool:
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "INSERT INTO dispatch_state (id, sending, changed_at) VALUES (1, %s, UTC_TIMESTAMP(6))"
                " ON DUPLICATE KEY UPDATE sending = VALUES(sending), changed_at = VALUES(changed_at)",
                (sending,),
            )
        return sending

    async def lead(self, holder: str, lease_seconds: float) -> Fence | None:
        """Take or renew the leader lease for ``lease_seconds``; the :class:`Fence` while ``holder`` has it,
        None while another live producer does. A lease that was not renewed in time (its holder died, froze
        or lost MySQL) is taken over with a new epoch, which fences out everything its old holder still
        tries. One round trip."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            # epoch is assigned first: its IF must see the row's old holder and expiry (assignments run left to
            # right in a single-table UPDATE, on MySQL and MariaDB alike).
            await cur.execute(
                "UPDATE producer_lease SET"
                " epoch = IF(holder <=> %s AND expires_at >= UTC_TIMESTAMP(6), epoch, epoch + 1),"
                " holder = %s, expires_at = UTC_TIMESTAMP(6) + INTERVAL %s MICROSECOND"
                " WHERE id = 1 AND (expires_at IS NULL OR expires_at < UTC_TIMESTAMP(6) OR holder <=> %s);"
                " SELECT epoch FROM producer_lease WHERE id = 1 AND holder = %s AND expires_at > UTC_TIMESTAMP(6)",
                (holder, holder, _micros(lease_seconds), holder, holder),
            )
            await cur.nextset()
            row = await cur.fetchone()
            await _drain(cur)
        return Fence(holder, int(row[0])) if row else None

    async def give_up_lead(self, fence: Fence) -> None:
        """On a clean shutdown: let the lease lapse now, so a standby takes over without waiting it out."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "UPDATE producer_lease SET expires_at = NULL WHERE id = 1 AND holder = %s AND epoch = %s",
                (fence.holder, fence.epoch),
            )

    async def record_tick(self, fence: Fence, interval_seconds: float, batch_size: int) -> bool:
        """Record a tick of the lease holder and its schedule (``interval_seconds``, ``batch_size``); False (and
        nothing recorded) if the previous tick was another lease's less than an interval ago: a new leader
        waits out its predecessor's interval, so a failover never doubles the rate. Its own ticks follow its
        schedule."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            changed = await cur.execute(
                "UPDATE producer_lease SET last_tick_at = UTC_TIMESTAMP(6), tick_epoch = epoch,"
                " send_interval_seconds = %s, send_batch_size = %s"
                " WHERE id = 1 AND holder = %s AND epoch = %s AND expires_at > UTC_TIMESTAMP(6)"
                " AND (tick_epoch <=> epoch OR last_tick_at IS NULL"
                " OR last_tick_at <= UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND)",
                (interval_seconds, batch_size, fence.holder, fence.epoch, _micros(interval_seconds)),
            )
            return bool(changed)
