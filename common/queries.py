"""The read queries of message-sender (the gateway's lists, details and statistics, the cache backfill).

They never change a row; the transitions of the pipeline are in :mod:`common.store`, whose
:class:`~common.store.MessageStore` extends this class.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import aiomysql
import orjson

from common.models import Status

MESSAGE_COLUMNS = "id, recipient, content, status, remote_message_id, attempts, created_at, sent_at"
DETAIL_COLUMNS = (
    MESSAGE_COLUMNS + ", last_error, next_attempt_at, queued_at, updated_at, send_at, priority, cancelled_at"
)
ATTEMPT_COLUMNS = "attempt, started_at, finished_at, outcome, http_status, error, duration_ms, provider"

Row = dict[str, Any]

# Queued and sending rows (a message in flight: at most a batch and what the consumers hold) share one key of
# ix_messages_listed (migration 11), so the compare-and-set between them moves no index entry; a list of either
# reads that short range and checks the status on the row.
IN_FLIGHT_STATUSES = ("queued", "sending")
IN_FLIGHT = "list_status = 'in_flight'"
_EPOCH = dt.datetime(1970, 1, 1)
_ISO = "'%%Y-%%m-%%dT%%H:%%i:%%s.%%fZ'"
_SENT_JSON = (
    "JSON_OBJECT('id', id, 'recipient', recipient, 'content', content, 'status', status,"
    " 'remote_message_id', remote_message_id, 'attempts', attempts,"
    f" 'created_at', DATE_FORMAT(created_at, {_ISO}), 'sent_at', DATE_FORMAT(sent_at, {_ISO}))"
)


# A row of a filtered list: the sent list's fields and when and how urgently it is to be sent.
_FILTERED_JSON = _SENT_JSON.removesuffix(")") + f", 'send_at', DATE_FORMAT(send_at, {_ISO}), 'priority', priority)"


# A created message as POST /messages/batch answers it: the detail without the attempts.
_CREATED_JSON = _FILTERED_JSON.removesuffix(")") + (
    ", 'last_error', last_error"
    f", 'next_attempt_at', DATE_FORMAT(next_attempt_at, {_ISO}), 'queued_at', DATE_FORMAT(queued_at, {_ISO})"
    f", 'updated_at', DATE_FORMAT(updated_at, {_ISO}), 'cancelled_at', DATE_FORMAT(cancelled_at, {_ISO}))"
)


@dataclass(frozen=True, slots=True)
class FilteredPage:
    total: int  # the messages that match the filter
    json: str  # the page as a JSON array
    count: int
    last_key: str | None  # "<created_at micros>:<id>" of the last row, for the next cursor


# The sent rows' numbering high-water mark and how many sent rows there are now (retention removes the oldest):
# together they change whenever the sent list does, which is what a cached page is validated against.
_SENT_VERSION = (
    "SELECT (SELECT value FROM counters WHERE name = 'sent'),"
    " (SELECT COALESCE(SUM(n), 0) FROM message_counts WHERE status = 'sent')"
)


@dataclass(frozen=True, slots=True)
class SentPage:
    version: tuple[int, int]  # (numbering high-water mark, sent rows) when the page was read
    total: int  # all sent messages
    json: str  # the page as a JSON array
    count: int  # rows on the page
    last_key: str | None  # "<sent_at micros>:<id>" of the last row, for the next cursor


def filtered_sql(
    statuses: list[str], recipient: str | None, limit: int, after: tuple[int, int] | None
) -> tuple[str, list[Any]]:
    """The page statement of :meth:`MessageQueries.filtered_page` and its arguments."""
    parts: list[str] = []
    args: list[Any] = []
    part_args: list[Any]
    for status in statuses:
        if recipient is not None:
            index, where = "ix_messages_recipient_created", "recipient = %s AND status = %s"
            part_args = [recipient, status]
        elif status in IN_FLIGHT_STATUSES:  # one key for both: the status is checked on the row
            index, where, part_args = "ix_messages_listed", f"{IN_FLIGHT} AND status = %s", [status]
        else:
            index, where, part_args = "ix_messages_listed", "list_status = %s", [status]
        if after is not None:
            at = _EPOCH + dt.timedelta(microseconds=after[0])
            where += " AND created_at <= %s AND (created_at < %s OR id < %s)"
            part_args += [at, at, after[1]]
        parts.append(
            f"(SELECT id, created_at AS c FROM messages FORCE INDEX ({index}) WHERE {where}"
            " ORDER BY created_at DESC, id DESC LIMIT %s)"
        )
        args += [*part_args, limit]
    page_sql = (
        f"SELECT {_FILTERED_JSON} FROM ({' UNION ALL '.join(parts)}) AS p JOIN messages USING (id)"
        " ORDER BY p.c DESC, p.id DESC LIMIT %s"
    )
    return page_sql, [*args, limit]


class MessageQueries:
    def __init__(self, pool: aiomysql.Pool) -> None:
        self.pool = pool

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

    async def created_json(self, ids: list[int]) -> str:
        """The rows of ``ids`` (ascending, as a create makes them) as a JSON array of their details without the
        attempts, built by the database (``JSON_OBJECT``: no per-column decoding of a thousand rows here)."""
        if not ids:
            return "[]"
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT {_CREATED_JSON} FROM messages WHERE id IN ({', '.join(['%s'] * len(ids))}) ORDER BY id", ids
            )
            return "[" + ",".join(r[0] for r in await cur.fetchall()) + "]"

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
            where = "sent_key <= %s AND (sent_key < %s OR id < %s)"
            args = [at, at, after[1]]
            order = "sent_key DESC, id DESC"
        hint = "FORCE INDEX (ix_messages_sent_key)" if after else ""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"{_SENT_VERSION}; SELECT {_SENT_JSON} FROM messages {hint} WHERE {where} ORDER BY {order} LIMIT %s",
                [*args, limit],
            )
            hwm, total = await cur.fetchone()
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
            version=(int(hwm or 0), int(total)),
            total=int(total),
            json="[" + ",".join(rows) + "]",
            count=len(rows),
            last_key=last_key,
        )

    async def filtered_page(
        self, statuses: list[str], recipient: str | None, limit: int, after: tuple[int, int] | None = None
    ) -> FilteredPage:
        """A page of the messages in ``statuses`` (of ``recipient`` if given), newest first (``created_at``,
        then id), with their total. Each status is one range of an index, read newest first and cut at
        ``limit``: ``ix_messages_listed`` (list_status, created_at, id; queued and sending share a key and are
        told apart on the row), or with a recipient
        ``ix_messages_recipient_created`` (recipient, created_at, id), each row's status checked on the row (the
        cost follows that recipient's messages); the few rows of the ranges are merged.
        ``after`` is the ``(created_at micros, id)`` of the previous page's last row."""
        page_sql, args = filtered_sql(statuses, recipient, limit, after)
        if recipient is None:
            total_sql = (
                f"SELECT COALESCE(SUM(n), 0) FROM message_counts WHERE status IN ({', '.join(['%s'] * len(statuses))})"
            )
            total_args: list[Any] = list(statuses)
        else:
            total_sql = (
                "SELECT COUNT(*) FROM messages FORCE INDEX (ix_messages_recipient_created)"
                f" WHERE recipient = %s AND status IN ({', '.join(['%s'] * len(statuses))})"
            )
            total_args = [recipient, *statuses]
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"{total_sql}; {page_sql}", [*total_args, *args])
            (total,) = await cur.fetchone()
            await cur.nextset()
            rows = [r[0] for r in await cur.fetchall()]
            while await cur.nextset():
                pass
        last_key = None
        if rows:
            last = orjson.loads(rows[-1])
            created = dt.datetime.fromisoformat(last["created_at"].removesuffix("Z"))
            last_key = f"{(created - _EPOCH) // dt.timedelta(microseconds=1)}:{last['id']}"
        return FilteredPage(total=int(total), json="[" + ",".join(rows) + "]", count=len(rows), last_key=last_key)

    async def scheduled_count(self) -> int:
        """``pending`` messages whose ``send_at`` is still ahead (part of ``pending``): the not-yet-due ranges
        of ``ix_messages_claimable``, so the cost follows the scheduled rows, not the table."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT COUNT(*) FROM messages WHERE claim_priority IN ('high', 'normal')"
                " AND send_at > UTC_TIMESTAMP(6)"
            )
            (n,) = await cur.fetchone()
            return int(n)

    async def sent_version(self) -> tuple[int, int]:
        """``(numbering high-water mark, sent rows)``: one primary-key read each; see :class:`SentPage`."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(_SENT_VERSION)
            hwm, total = await cur.fetchone()
            return int(hwm or 0), int(total)

    async def sent_total(self) -> int:
        """How many messages are ``sent`` (the counts kept in the same transactions that move rows)."""
        return (await self.sent_version())[1]

    async def counts_by_status(self) -> dict[str, int]:
        """Messages by status, from ``message_counts`` (a few rows per status, kept by the transactions that
        move rows and by the insert trigger): the same cost at ten rows as at ten million."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SELECT status, SUM(n) FROM message_counts GROUP BY status")
            counts = {s.value: 0 for s in Status}
            counts.update({status: int(n) for status, n in await cur.fetchall() if status in counts})
            return counts

    async def sent_since(self, seconds: float) -> int:
        """How many messages were sent in the last ``seconds`` (a range of ``ix_messages_sent_key``)."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT COUNT(*) FROM messages WHERE sent_key >= UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND",
                (int(seconds * 1_000_000),),
            )
            (n,) = await cur.fetchone()
            return int(n)

    async def claim_to_sent_seconds(self, limit: int) -> list[float]:
        """``sent_at - queued_at`` (the last claim to the send) of the ``limit`` most recently sent messages
        (rows sent without a claim, e.g. inserted as sent, have no ``queued_at`` and are left out)."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT TIMESTAMPDIFF(MICROSECOND, queued_at, sent_at) FROM messages WHERE sent_key IS NOT NULL"
                " ORDER BY sent_key DESC LIMIT %s",
                (limit,),
            )
            return [max(int(us), 0) / 1_000_000 for (us,) in await cur.fetchall() if us is not None]

    async def per_minute(self, since: dt.datetime) -> dict[dt.datetime, tuple[int, int]]:
        """``{minute: (sent, failed)}`` from ``since`` on (UTC); minutes with neither are left out. Sent rows
        are counted by ``sent_at`` on a range of ``ix_messages_sent_key`` (index only: ~0.8 ms per 1,000 rows in
        the window on MariaDB 10.11), failed ones by ``failed_at`` on a range of ``ix_messages_failed_at``:
        the cost follows the rows in the window, not the table."""
        minute = "DATE_FORMAT({}, '%%Y-%%m-%%d %%H:%%i')"
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT {minute.format('sent_key')} AS m, COUNT(*), 0 FROM messages"
                " WHERE sent_key >= %s GROUP BY m"
                f" UNION ALL SELECT {minute.format('failed_at')} AS m, 0, COUNT(*) FROM messages"
                " WHERE failed_at >= %s GROUP BY m",
                (since, since),
            )
            result: dict[dt.datetime, tuple[int, int]] = {}
            for text, sent, failed in await cur.fetchall():
                at = dt.datetime.strptime(text, "%Y-%m-%d %H:%M")
                before = result.get(at, (0, 0))
                result[at] = (before[0] + int(sent), before[1] + int(failed))
            return result

    async def list_failed(self, limit: int, offset: int = 0) -> list[Row]:
        """Failed messages, newest first, with their reason; the page is found on ``ix_messages_listed``."""
        async with self.pool.acquire() as conn, conn.cursor(aiomysql.DictCursor) as cur:
            await cur.execute(
                "SELECT m.id, m.recipient, m.content, m.last_error, m.attempts, m.updated_at FROM ("
                " SELECT id FROM messages WHERE list_status = 'failed'"
                " ORDER BY created_at DESC, id DESC LIMIT %s OFFSET %s) AS page"
                " JOIN messages AS m ON m.id = page.id ORDER BY m.created_at DESC, m.id DESC",
                (limit, offset),
            )
            return list(await cur.fetchall())

    async def sent_with_remote_id(self, after_id: int, limit: int) -> list[tuple[int, str, dt.datetime]]:
        """``(id, remote_message_id, sent_at)`` of sent rows by id, for rebuilding the Redis cache."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT id, remote_message_id, sent_at FROM messages"
                " WHERE id > %s AND status = 'sent' AND remote_message_id IS NOT NULL ORDER BY id LIMIT %s",
                (after_id, limit),
            )
            return [(int(i), r, s) for i, r, s in await cur.fetchall()]

    async def dispatch_state(self) -> Row:
        async with self.pool.acquire() as conn, conn.cursor(aiomysql.DictCursor) as cur:
            # The leader is the holder of a lease that has not lapsed (none while no producer leads).
            await cur.execute(
                "SELECT d.sending, d.changed_at, IF(l.expires_at > UTC_TIMESTAMP(6), l.holder, NULL) AS leader,"
                " l.last_tick_at FROM dispatch_state AS d LEFT JOIN producer_lease AS l ON l.id = 1 WHERE d.id = 1"
            )
            row: Row = await cur.fetchone() or {"sending": 1, "changed_at": None, "leader": None, "last_tick_at": None}
            row["sending"] = bool(row["sending"])
            return row

    async def leader_schedule(self) -> tuple[str, float, int] | None:
        """``(holder, SEND_INTERVAL_SECONDS, SEND_BATCH_SIZE)`` of the producer that leads now (its lease has
        not lapsed and it recorded its schedule with a tick); None while no producer leads."""
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT holder, send_interval_seconds, send_batch_size FROM producer_lease"
                " WHERE id = 1 AND expires_at > UTC_TIMESTAMP(6) AND send_interval_seconds IS NOT NULL"
            )
            row = await cur.fetchone()
        return None if row is None else (str(row[0]), float(row[1]), int(row[2]))

    async def is_sending(self) -> bool:
        return bool((await self.dispatch_state())["sending"])
