"""The message store: every SQL statement of message-sender, in one place.

Rows move ``pending -> queued`` (claim), ``queued -> sending`` (the consumer's compare-and-set) and
``sending -> sent | pending (retry) | failed``. Every transition is a compare-and-set on ``status`` so
that duplicate deliveries and racing replicas can never move a row twice.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import aiomysql

from common.errors import ConflictError, NotFoundError
from common.models import Action, Delivery, Outcome, Status

MESSAGE_COLUMNS = "id, recipient, content, status, remote_message_id, attempts, created_at, sent_at"
DETAIL_COLUMNS = MESSAGE_COLUMNS + ", last_error, next_attempt_at, queued_at, updated_at"
ATTEMPT_COLUMNS = "attempt, started_at, finished_at, outcome, http_status, error, duration_ms"

Row = dict[str, Any]


def _in(ids: Sequence[int]) -> str:
    return ", ".join(["%s"] * len(ids))


def _values_table(rows: Sequence[Sequence[Any]], names: Sequence[str]) -> tuple[str, list[Any]]:
    """A derived table ``(SELECT %s AS a, %s AS b UNION ALL SELECT %s, %s ...)`` for set-based updates
    (portable between MySQL 8 and MariaDB, unlike ``VALUES ROW``)."""
    first = "SELECT " + ", ".join(f"%s AS {n}" for n in names)
    rest = " UNION ALL SELECT " + ", ".join(["%s"] * len(names))
    sql = first + rest * (len(rows) - 1)
    return sql, [v for row in rows for v in row]


class MessageStore:
    def __init__(self, pool: aiomysql.Pool) -> None:
        self.pool = pool

    # --- creating and reading -------------------------------------------------------------------

    async def create(self, recipient: str, content: str) -> int:
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("INSERT INTO messages (recipient, content) VALUES (%s, %s)", (recipient, content))
            return int(cur.lastrowid)

    async def create_many(self, rows: Iterable[tuple[str, str]]) -> int:
        """Insert many pending messages in multi-row statements; returns how many."""
        batch = list(rows)
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.executemany("INSERT INTO messages (recipient, content) VALUES (%s, %s)", batch)
        return len(batch)

    async def get(self, message_id: int) -> Row | None:
        async with self.pool.acquire() as conn, conn.cursor(aiomysql.DictCursor) as cur:
            await cur.execute(f"SELECT {DETAIL_COLUMNS} FROM messages WHERE id = %s", (message_id,))
            row: Row | None = await cur.fetchone()
            if row is None:
                return None
            await cur.execute(
                f"SELECT {ATTEMPT_COLUMNS} FROM message_attempts WHERE message_id = %s ORDER BY id",
                (message_id,),
            )
            row["attempt_log"] = list(await cur.fetchall())
            return row

    async def list_sent(self, limit: int, offset: int = 0) -> list[Row]:
        """Sent messages, newest ``sent_at`` first; the offset is walked on the covering index only."""
        async with self.pool.acquire() as conn, conn.cursor(aiomysql.DictCursor) as cur:
            await cur.execute(
                f"SELECT {', '.join('m.' + c.strip() for c in MESSAGE_COLUMNS.split(','))} FROM ("
                " SELECT id FROM messages WHERE status = 'sent'"
                " ORDER BY sent_at DESC, id DESC LIMIT %s OFFSET %s) AS page"
                " JOIN messages AS m ON m.id = page.id ORDER BY m.sent_at DESC, m.id DESC",
                (limit, offset),
            )
            return list(await cur.fetchall())

    async def list_sent_after(self, sent_at: dt.datetime, message_id: int, limit: int) -> list[Row]:
        """The page of sent messages that follows the one ending at ``(sent_at, message_id)``.

        The index hint and the redundant ``sent_at <= %s`` make it a range scan of ``ix_messages_sent`` that
        starts at the cursor; without them MariaDB 10.11 walks every newer row first (150 ms instead of 0.5 ms
        150,000 rows deep)."""
        async with self.pool.acquire() as conn, conn.cursor(aiomysql.DictCursor) as cur:
            await cur.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages FORCE INDEX (ix_messages_sent) WHERE status = 'sent'"
                " AND sent_at <= %s AND (sent_at < %s OR id < %s)"
                " ORDER BY sent_at DESC, id DESC LIMIT %s",
                (sent_at, sent_at, message_id, limit),
            )
            return list(await cur.fetchall())

    async def sent_total(self) -> int:
        """How many messages are ``sent``: a counter kept in the same transactions that mark them."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SELECT value FROM counters WHERE name = 'sent'")
            row = await cur.fetchone()
            return int(row[0]) if row else 0

    async def counts_by_status(self) -> dict[str, int]:
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SELECT status, COUNT(*) FROM messages GROUP BY status")
            counts = {s.value: 0 for s in Status}
            counts.update({status: int(n) for status, n in await cur.fetchall()})
            return counts

    # --- the producer's side --------------------------------------------------------------------

    async def claim(self, limit: int) -> list[int]:
        """Move up to ``limit`` due ``pending`` rows, oldest first, to ``queued``; return their ids.
        ``SKIP LOCKED`` lets concurrent claimers take disjoint rows without waiting on each other."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            await conn.begin()
            try:
                await cur.execute(
                    "SELECT id FROM messages WHERE status = 'pending'"
                    " AND (next_attempt_at IS NULL OR next_attempt_at <= UTC_TIMESTAMP(6))"
                    " ORDER BY created_at, id LIMIT %s FOR UPDATE SKIP LOCKED",
                    (limit,),
                )
                ids = [int(r[0]) for r in await cur.fetchall()]
                if ids:
                    await cur.execute(
                        f"UPDATE messages SET status = 'queued', queued_at = UTC_TIMESTAMP(6) WHERE id IN ({_in(ids)})",
                        ids,
                    )
                await conn.commit()
                return ids
            except BaseException:
                await conn.rollback()
                raise

    async def release(self, ids: Sequence[int]) -> int:
        """Return ``queued`` rows whose publish failed to ``pending`` so the next tick claims them again."""
        if not ids:
            return 0
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            return int(
                await cur.execute(
                    "UPDATE messages SET status = 'pending', queued_at = NULL"
                    f" WHERE status = 'queued' AND id IN ({_in(ids)})",
                    list(ids),
                )
            )

    async def reclaim_stale(self, lease_seconds: float, limit: int) -> list[int]:
        """``queued`` rows older than the lease (their AMQP message may be lost): renew their lease and
        return their ids so they are published again. A duplicate that does reach a consumer is dropped
        by the compare-and-set."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            await conn.begin()
            try:
                await cur.execute(
                    "SELECT id FROM messages WHERE status = 'queued'"
                    " AND queued_at < UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND"
                    " ORDER BY created_at, id LIMIT %s FOR UPDATE SKIP LOCKED",
                    (int(lease_seconds * 1_000_000), limit),
                )
                ids = [int(r[0]) for r in await cur.fetchall()]
                if ids:
                    await cur.execute(f"UPDATE messages SET queued_at = UTC_TIMESTAMP(6) WHERE id IN ({_in(ids)})", ids)
                await conn.commit()
                return ids
            except BaseException:
                await conn.rollback()
                raise

    # --- the consumer's side --------------------------------------------------------------------

    async def begin_sending(
        self, ids: Sequence[int], decide: Callable[[int, str | None, bool], Action]
    ) -> list[tuple[int, Action, Delivery | None]]:
        """The ``queued -> sending`` compare-and-set for a batch of deliveries, in one round trip.

        One ``UPDATE`` moves every still-``queued`` row of the batch to ``sending`` and stamps it with a
        fresh random token; the ``SELECT`` that follows (same round trip) reads the rows back, and a row
        carrying this call's token was won by this call, whatever other consumers did meanwhile.
        ``decide(id, status, won)`` then says what to do with each (unknown ids: status None)."""
        if not ids:
            return []
        unique = sorted(set(ids))
        token = secrets.randbits(63)
        marks = _in(unique)
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"UPDATE messages SET status = 'sending', delivery_token = %s"
                f" WHERE status = 'queued' AND id IN ({marks});"
                f" SELECT id, recipient, content, status, attempts, delivery_token FROM messages WHERE id IN ({marks})",
                [token, *unique, *unique],
            )
            await cur.nextset()
            found = await cur.fetchall()
            while await cur.nextset():
                pass
        rows = {int(r[0]): (Delivery(int(r[0]), r[1], r[2], r[3], int(r[4])), r[5] == token) for r in found}
        result: list[tuple[int, Action, Delivery | None]] = []
        for message_id in unique:
            row, won = rows.get(message_id, (None, False))
            result.append((message_id, decide(message_id, row.status if row else None, won), row))
        return result

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        """Write a batch of delivery outcomes as one transaction in one round trip (the group commit):
        the row updates (only rows still ``sending`` move, so a duplicate outcome changes nothing), the
        sent counter (by the rows that really moved), and one ``message_attempts`` row per attempt."""
        if not outcomes:
            return
        statements, args = ["START TRANSACTION"], []
        sent = [o for o in outcomes if o.kind == "sent"]
        retry = [o for o in outcomes if o.kind == "retry"]
        failed = [o for o in outcomes if o.kind == "failed"]
        if sent:
            table, values = _values_table(
                [(o.id, o.remote_message_id, o.finished_at) for o in sent], ("id", "rid", "at")
            )
            statements += [
                f"UPDATE messages AS m JOIN ({table}) AS v ON m.id = v.id"
                " SET m.status = 'sent', m.remote_message_id = v.rid, m.sent_at = v.at,"
                " m.attempts = m.attempts + 1, m.last_error = NULL, m.next_attempt_at = NULL"
                " WHERE m.status = 'sending'",
                "UPDATE counters SET value = value + ROW_COUNT() WHERE name = 'sent'",
            ]
            args += values
        if retry:
            table, values = _values_table([(o.id, o.error, o.next_attempt_at) for o in retry], ("id", "err", "due"))
            statements.append(
                f"UPDATE messages AS m JOIN ({table}) AS v ON m.id = v.id"
                " SET m.status = 'pending', m.last_error = v.err, m.next_attempt_at = v.due,"
                " m.attempts = m.attempts + 1, m.queued_at = NULL WHERE m.status = 'sending'"
            )
            args += values
        if failed:
            table, values = _values_table([(o.id, o.error) for o in failed], ("id", "err"))
            statements.append(
                f"UPDATE messages AS m JOIN ({table}) AS v ON m.id = v.id"
                " SET m.status = 'failed', m.last_error = v.err, m.attempts = m.attempts + 1,"
                " m.next_attempt_at = NULL WHERE m.status = 'sending'"
            )
            args += values
        statements.append(
            "INSERT INTO message_attempts"
            " (message_id, attempt, started_at, finished_at, outcome, http_status, error, duration_ms) VALUES "
            + ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s)"] * len(outcomes))
        )
        for o in outcomes:
            args += [o.id, o.attempt, o.started_at, o.finished_at, o.kind, o.http_status, o.error, o.duration_ms]
        statements.append("COMMIT")
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            try:
                await cur.execute(";\n".join(statements), args)
                while await cur.nextset():
                    pass
            except BaseException:
                await conn.rollback()
                raise

    async def retry_failed(self, message_id: int) -> Row:
        """Put a ``failed`` message back to ``pending`` with a fresh attempt budget."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            changed = await cur.execute(
                "UPDATE messages SET status = 'pending', attempts = 0, next_attempt_at = NULL, queued_at = NULL"
                " WHERE id = %s AND status = 'failed'",
                (message_id,),
            )
        row = await self.get(message_id)
        if row is None:
            raise NotFoundError(f"message {message_id} does not exist")
        if not changed:
            raise ConflictError(f"message {message_id} is {row['status']}, only a failed message can be retried")
        return row

    async def sent_with_remote_id(self, after_id: int, limit: int) -> list[tuple[int, str, dt.datetime]]:
        """``(id, remote_message_id, sent_at)`` of sent rows by id, for rebuilding the Redis cache."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT id, remote_message_id, sent_at FROM messages"
                " WHERE id > %s AND status = 'sent' AND remote_message_id IS NOT NULL ORDER BY id LIMIT %s",
                (after_id, limit),
            )
            return [(int(i), r, s) for i, r, s in await cur.fetchall()]

    # --- the dispatch switch, leadership and ticks -----------------------------------------------

    async def dispatch_state(self) -> Row:
        async with self.pool.acquire() as conn, conn.cursor(aiomysql.DictCursor) as cur:
            await cur.execute("SELECT sending, changed_at, leader, last_tick_at FROM dispatch_state WHERE id = 1")
            row: Row = await cur.fetchone() or {"sending": 1, "changed_at": None, "leader": None, "last_tick_at": None}
            row["sending"] = bool(row["sending"])
            return row

    async def is_sending(self) -> bool:
        return bool((await self.dispatch_state())["sending"])

    async def set_sending(self, sending: bool) -> bool:
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "INSERT INTO dispatch_state (id, sending, changed_at) VALUES (1, %s, UTC_TIMESTAMP(6))"
                " ON DUPLICATE KEY UPDATE sending = VALUES(sending), changed_at = VALUES(changed_at)",
                (sending,),
            )
        return sending

    async def record_tick(self, leader: str, interval_seconds: float) -> bool:
        """Record a tick of ``leader``; False (and nothing recorded) if another replica ticked less than an
        interval ago: a new leader waits out its predecessor's interval, so a failover never doubles the rate."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            changed = await cur.execute(
                "UPDATE dispatch_state SET leader = %s, last_tick_at = UTC_TIMESTAMP(6) WHERE id = 1"
                " AND (leader = %s OR leader IS NULL OR last_tick_at IS NULL"
                " OR last_tick_at <= UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND)",
                (leader, leader, int(interval_seconds * 1_000_000)),
            )
            return bool(changed)


class LeaderLock:
    """A MySQL named lock held on one dedicated connection: when the holder dies its connection closes
    and the server frees the lock, so another replica takes over on its next tick."""

    def __init__(self, conn: aiomysql.Connection, name: str) -> None:
        self.conn = conn
        self.name = name

    async def try_acquire(self) -> bool:
        """True if this connection holds the lock (taking it if free)."""
        async with self.conn.cursor() as cur:
            await cur.execute("SELECT IS_USED_LOCK(%s) = CONNECTION_ID()", (self.name,))
            (held,) = await cur.fetchone()
            if held == 1:
                return True
            await cur.execute("SELECT GET_LOCK(%s, 0)", (self.name,))
            (got,) = await cur.fetchone()
            return got == 1

    async def release(self) -> None:
        async with self.conn.cursor() as cur:
            await cur.execute("SELECT RELEASE_LOCK(%s)", (self.name,))
            await cur.fetchone()
