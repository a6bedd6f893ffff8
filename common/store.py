"""The message store: every SQL statement of message-sender, in one place.

Rows move ``pending -> queued`` (claim), ``queued -> sending`` (the consumer's compare-and-set) and
``sending -> sent | pending (retry) | failed``. Every transition is a compare-and-set on ``status`` so
that duplicate deliveries and racing replicas can never move a row twice.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiomysql
import orjson

from common.errors import ConflictError, NotFoundError
from common.models import Delivery, Outcome, Status

MESSAGE_COLUMNS = "id, recipient, content, status, remote_message_id, attempts, created_at, sent_at"
DETAIL_COLUMNS = MESSAGE_COLUMNS + ", last_error, next_attempt_at, queued_at, updated_at"
ATTEMPT_COLUMNS = "attempt, started_at, finished_at, outcome, http_status, error, duration_ms"

Row = dict[str, Any]
_EPOCH = dt.datetime(1970, 1, 1)
_ISO = "'%%Y-%%m-%%dT%%H:%%i:%%s.%%fZ'"
_SENT_JSON = (
    "JSON_OBJECT('id', id, 'recipient', recipient, 'content', content, 'status', status,"
    " 'remote_message_id', remote_message_id, 'attempts', attempts,"
    f" 'created_at', DATE_FORMAT(created_at, {_ISO}), 'sent_at', DATE_FORMAT(sent_at, {_ISO}))"
)


@dataclass(frozen=True, slots=True)
class SentPage:
    total: int  # all sent messages
    json: str  # the page as a JSON array
    count: int  # rows on the page
    last_key: str | None  # "<sent_at micros>:<id>" of the last row, for the next cursor


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

    async def sent_page(self, limit: int, offset: int = 0, after: tuple[int, int] | None = None) -> SentPage:
        """A page of sent messages, newest first, already as a JSON array, with the total, in one round trip.

        Sent rows are numbered (``sent_seq`` 1, 2, ...) in the commit that marks them, in ``(sent_at, id)``
        order, so an offset page is a range of ``sent_seq``: as fast at offset 500,000 as at 0. ``after``
        (``(sent_at in microseconds since the epoch, id)`` of the previous page's last row) continues a
        walk that new sends cannot shift. Rows come out as ``JSON_OBJECT`` text: no per-column decoding."""
        if after is None:
            where = "sent_seq <= (SELECT value FROM counters WHERE name = 'sent') - %s"
            args: list[Any] = [offset]
            order = "sent_seq DESC"
        else:
            at = _EPOCH + dt.timedelta(microseconds=after[0])
            # The index hint and the redundant bound make it a range scan starting at the cursor; without them
            # MariaDB 10.11 walks every newer row first (150 ms instead of 0.5 ms 150,000 rows deep).
            where = "status = 'sent' AND sent_at <= %s AND (sent_at < %s OR id < %s)"
            args = [at, at, after[1]]
            order = "sent_at DESC, id DESC"
        hint = "FORCE INDEX (ix_messages_sent)" if after else ""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT value FROM counters WHERE name = 'sent';"
                f" SELECT {_SENT_JSON} FROM messages {hint} WHERE {where} ORDER BY {order} LIMIT %s",
                [*args, limit],
            )
            total_row = await cur.fetchone()
            await cur.nextset()
            rows = [r[0] for r in await cur.fetchall()]
            while await cur.nextset():
                pass
        last_key = None
        if rows:
            last = orjson.loads(rows[-1])
            sent_at = dt.datetime.fromisoformat(last["sent_at"].removesuffix("Z"))
            last_key = f"{(sent_at - _EPOCH) // dt.timedelta(microseconds=1)}:{last['id']}"
        return SentPage(
            total=int(total_row[0]) if total_row else 0,
            json="[" + ",".join(rows) + "]",
            count=len(rows),
            last_key=last_key,
        )

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

    async def sent_since(self, seconds: float) -> int:
        """How many messages were sent in the last ``seconds`` (a range of ``ix_messages_sent``)."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT COUNT(*) FROM messages WHERE status = 'sent'"
                " AND sent_at >= UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND",
                (int(seconds * 1_000_000),),
            )
            (n,) = await cur.fetchone()
            return int(n)

    async def claim_to_sent_seconds(self, limit: int) -> list[float]:
        """``sent_at - queued_at`` (the last claim to the send) of the ``limit`` most recently sent messages
        (rows sent without a claim, e.g. inserted as sent, have no ``queued_at`` and are left out)."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT TIMESTAMPDIFF(MICROSECOND, queued_at, sent_at) FROM messages WHERE status = 'sent'"
                " ORDER BY sent_at DESC LIMIT %s",
                (limit,),
            )
            return [max(int(us), 0) / 1_000_000 for (us,) in await cur.fetchall() if us is not None]

    async def per_minute(self, since: dt.datetime) -> dict[dt.datetime, tuple[int, int]]:
        """``{minute: (sent, failed)}`` from ``since`` on (UTC); minutes with neither are left out. Sent rows
        are counted by ``sent_at`` on a range of ``ix_messages_sent`` (index only: ~0.8 ms per 1,000 rows in
        the window on MariaDB 10.11); failed ones by ``updated_at``, reading every failed row (the ``status``
        prefix of ``ix_messages_claim``): fine while they are few."""
        minute = "DATE_FORMAT({}, '%%Y-%%m-%%d %%H:%%i')"
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT {minute.format('sent_at')} AS m, COUNT(*), 0 FROM messages"
                " WHERE status = 'sent' AND sent_at >= %s GROUP BY m"
                f" UNION ALL SELECT {minute.format('updated_at')} AS m, 0, COUNT(*) FROM messages"
                " WHERE status = 'failed' AND updated_at >= %s GROUP BY m",
                (since, since),
            )
            result: dict[dt.datetime, tuple[int, int]] = {}
            for text, sent, failed in await cur.fetchall():
                at = dt.datetime.strptime(text, "%Y-%m-%d %H:%M")
                before = result.get(at, (0, 0))
                result[at] = (before[0] + int(sent), before[1] + int(failed))
            return result

    async def list_failed(self, limit: int, offset: int = 0) -> list[Row]:
        """Failed messages, newest first, with their reason; the page is found on ``ix_messages_claim``."""
        async with self.pool.acquire() as conn, conn.cursor(aiomysql.DictCursor) as cur:
            await cur.execute(
                "SELECT m.id, m.recipient, m.content, m.last_error, m.attempts, m.updated_at FROM ("
                " SELECT id FROM messages WHERE status = 'failed'"
                " ORDER BY created_at DESC, id DESC LIMIT %s OFFSET %s) AS page"
                " JOIN messages AS m ON m.id = page.id ORDER BY m.created_at DESC, m.id DESC",
                (limit, offset),
            )
            return list(await cur.fetchall())

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
                with contextlib.suppress(Exception):  # a dead connection cannot roll back: the server does
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
                with contextlib.suppress(Exception):  # a dead connection cannot roll back: the server does
                    await conn.rollback()
                raise

    # --- the consumer's side --------------------------------------------------------------------

    async def begin_sending(self, claims: Sequence[tuple[int, int]]) -> dict[int, Delivery]:
        """The ``queued -> sending`` compare-and-set for a batch of ``(id, token)`` claims, in one round trip.

        One ``UPDATE`` moves every still-``queued`` row to ``sending`` stamped with its claim's token (each
        delivery draws its own and keeps it across retries); the ``SELECT`` of the same round trip reads
        the rows back: a delivery won its row if the row carries its token, whatever else happened, even
        if this statement's answer was lost and it is run again. Unknown ids are missing from the result."""
        if not claims:
            return {}
        ids = sorted({i for i, _ in claims})
        table, values = _values_table(list(claims), ("id", "tok"))
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"UPDATE messages AS m JOIN ({table}) AS v ON m.id = v.id"
                " SET m.status = 'sending', m.delivery_token = v.tok WHERE m.status = 'queued';"
                " SELECT id, recipient, content, status, attempts, delivery_token,"
                " TIMESTAMPDIFF(MICROSECOND, updated_at, UTC_TIMESTAMP(6))"
                f" FROM messages WHERE id IN ({_in(ids)})",
                [*values, *ids],
            )
            await cur.nextset()
            found = await cur.fetchall()
            while await cur.nextset():
                pass
        return {
            int(r[0]): Delivery(int(r[0]), r[1], r[2], r[3], int(r[4]), r[5], max(0.0, (r[6] or 0) / 1e6))
            for r in found
        }

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> dt.datetime | None:
        """Write a batch of delivery outcomes as one transaction (the group commit): the row updates (only
        rows still ``sending`` move, so a duplicate outcome changes nothing), the sent counter, and one
        ``message_attempts`` row per attempt. Returns the ``sent_at`` given to this batch's sent rows.

        Sent rows get their ``sent_at`` and ``sent_seq`` under the lock of the sent counter, so commits
        number them one after another: ``sent_at`` never goes backwards and ``sent_seq`` follows
        ``(sent_at, id)`` order exactly, which is what lets an offset page be a range of ``sent_seq``.
        Two round trips with sent rows in the batch (lock and read, then write and commit), else one."""
        if not outcomes:
            return None
        sent = [o for o in outcomes if o.kind == "sent"]
        statements: list[str] = []
        args: list[Any] = []
        sent_at: dt.datetime | None = None
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            try:
                if sent:
                    ids = sorted({o.id for o in sent})
                    await cur.execute(
                        "START TRANSACTION; SELECT value FROM counters WHERE name = 'sent' FOR UPDATE;"
                        " SELECT GREATEST(UTC_TIMESTAMP(6), COALESCE(MAX(sent_at) + INTERVAL 1 MICROSECOND,"
                        " UTC_TIMESTAMP(6))) FROM messages WHERE status = 'sent';"
                        f" SELECT id FROM messages WHERE id IN ({_in(ids)}) AND status = 'sending'"
                        " ORDER BY id FOR UPDATE",
                        ids,
                    )
                    await cur.nextset()
                    (base,) = await cur.fetchone()
                    await cur.nextset()
                    (sent_at,) = await cur.fetchone()
                    await cur.nextset()
                    live = [int(r[0]) for r in await cur.fetchall()]
                    while await cur.nextset():
                        pass
                    remote = {o.id: o.remote_message_id for o in sent}
                    if live:
                        table, values = _values_table(
                            [(i, remote[i], int(base) + n) for n, i in enumerate(live, start=1)], ("id", "rid", "seq")
                        )
                        statements += [
                            f"UPDATE messages AS m JOIN ({table}) AS v ON m.id = v.id"
                            " SET m.status = 'sent', m.remote_message_id = v.rid, m.sent_at = %s, m.sent_seq = v.seq,"
                            " m.attempts = m.attempts + 1, m.last_error = NULL, m.next_attempt_at = NULL"
                            " WHERE m.status = 'sending'",
                            "UPDATE counters SET value = %s WHERE name = 'sent'",
                        ]
                        args += [*values, sent_at, int(base) + len(live)]
                else:
                    statements.append("START TRANSACTION")
                self._outcome_statements(outcomes, statements, args)
                statements.append("COMMIT")
                await cur.execute(";\n".join(statements), args)
                while await cur.nextset():
                    pass
            except BaseException:
                with contextlib.suppress(Exception):  # a dead connection cannot roll back: the server does
                    await conn.rollback()
                raise
        return sent_at

    @staticmethod
    def _outcome_statements(outcomes: Sequence[Outcome], statements: list[str], args: list[Any]) -> None:
        """The retry and failed updates and the attempt rows of a group commit."""
        retry = [o for o in outcomes if o.kind == "retry"]
        failed = [o for o in outcomes if o.kind == "failed"]
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
            # A commit whose answer was lost runs again: its attempts are already there.
            + " ON DUPLICATE KEY UPDATE id = id"
        )
        for o in outcomes:
            args += [o.id, o.attempt, o.started_at, o.finished_at, o.kind, o.http_status, o.error, o.duration_ms]

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
            return bool(got == 1)

    async def release(self) -> None:
        async with self.conn.cursor() as cur:
            await cur.execute("SELECT RELEASE_LOCK(%s)", (self.name,))
            await cur.fetchone()
