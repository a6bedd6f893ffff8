"""Bench-only SQL: bulk loading of pending and sent rows, and the read-outs of the pipeline phase.

Rows are generated server-side by ``INSERT ... SELECT`` from a cross join of digit tables (portable between
MySQL 8 and MariaDB, no recursion limits), into an emptied table inside one transaction with
``unique_checks=0``: MariaDB then builds the indexes by sorting. The insert trigger's count is skipped
(``@message_sender_counted``, as a multi-row insert of the store does) and the counts rebuilt after the load;
a session sort buffer of :data:`SORT_BUFFER` lets each chunk's ``ORDER BY`` sort in memory. Both together took
a load of 800,000 sent rows from 26 s to 8 s on a private MariaDB here; the rows are the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiomysql

from common.store import MessageStore

DIGITS = "(SELECT 0 AS n " + "".join(f"UNION ALL SELECT {i} " for i in range(1, 10)) + ")"
CHUNK = 1_000_000
SORT_BUFFER = 256 * 2**20  # a session variable: nothing of the server's configuration changes


async def _quietly(cur: aiomysql.Cursor, statement: str) -> None:
    """A clean-up statement on a connection that may be gone (a cancelled statement closes it, e.g. on Ctrl-C):
    its own error would replace the one being handled (the cancellation)."""
    with contextlib.suppress(Exception):
        await cur.execute(statement)


@contextlib.asynccontextmanager
async def _counted_here(cur: aiomysql.Cursor, reset: str | None = None) -> AsyncIterator[None]:
    """A transaction whose inserts the insert trigger does not count (``@message_sender_counted``: the caller
    counts them itself, in the transaction), committed at the end or rolled back on any error; the variable,
    and the session settings ``reset`` puts back, are cleared whatever happens."""
    await cur.execute("SET @message_sender_counted = 1")
    await cur.execute("START TRANSACTION")
    try:
        yield
        await cur.execute("COMMIT")
    except BaseException:
        await _quietly(cur, "ROLLBACK")
        raise
    finally:
        if reset is not None:
            await _quietly(cur, reset)
        await _quietly(cur, "SET @message_sender_counted = NULL")


def sequence(count: int) -> str:
    """A derived table ``s`` with a column ``n`` = 0 .. count-1 (count <= CHUNK)."""
    width = max(1, len(str(count - 1)))
    cols = " + ".join(f"d{i}.n * {10**i}" for i in range(width))
    tables = ", ".join(f"{DIGITS} AS d{i}" for i in range(width))
    return f"(SELECT {cols} AS n FROM {tables}) AS s WHERE s.n < {count}"


async def _bulk(pool: aiomysql.Pool, total: int, statement: str) -> None:
    """Run ``statement`` (with ``{seq}`` and ``{offset}``) per chunk, in one transaction on an emptied table. A
    load that fails leaves the table empty (``TRUNCATE`` commits at once), with its counts right."""
    try:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("TRUNCATE TABLE messages")
            await cur.execute("TRUNCATE TABLE message_attempts")
            await cur.execute(
                "SET SESSION unique_checks = 0, foreign_key_checks = 0, sort_buffer_size = %s", (SORT_BUFFER,)
            )
            # counted once, below: recount()
            async with _counted_here(
                cur, "SET SESSION unique_checks = 1, foreign_key_checks = 1, sort_buffer_size = DEFAULT"
            ):
                for offset in range(0, total, CHUNK):
                    await cur.execute(statement.format(seq=sequence(min(CHUNK, total - offset)), offset=offset))
                await cur.execute(
                    "UPDATE counters SET value = (SELECT COALESCE(MAX(sent_seq), 0) FROM messages) WHERE name = 'sent'"
                )
            await cur.execute("ANALYZE TABLE messages")
            await cur.fetchall()
    except Exception:
        with contextlib.suppress(Exception):  # the load's own error is the one to report
            await MessageStore(pool).recount()
        raise
    await MessageStore(pool).recount()  # TRUNCATE bypasses the counts; the numbering follows the loaded rows


async def load_pending(pool: aiomysql.Pool, count: int) -> None:
    """``count`` pending messages, oldest first in id order (distinct increasing ``created_at``)."""
    await _bulk(
        pool,
        count,
        "INSERT INTO messages (recipient, content, created_at)"
        " SELECT CONCAT('+90555', LPAD(s.n + {offset}, 7, '0')), CONCAT('bench message ', s.n + {offset}),"
        " b.t + INTERVAL (s.n + {offset}) * 10 MICROSECOND"
        " FROM (SELECT UTC_TIMESTAMP(6) - INTERVAL 1 DAY AS t) AS b, {seq} ORDER BY s.n",
    )


async def columns(pool: aiomysql.Pool) -> set[str]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = DATABASE() AND table_name = 'messages'"
        )
        return {str(r[0]).lower() for r in await cur.fetchall()}


async def load_sent(pool: aiomysql.Pool, count: int) -> None:
    """``count`` sent messages with distinct ``sent_at`` increasing with the id, a ``remote_message_id`` each,
    ``sent_seq`` 1..count in that order (when the schema has it), and the ``sent`` counter set to the count."""
    seq = ("sent_seq, ", "s.n + {offset} + 1, ") if "sent_seq" in await columns(pool) else ("", "")
    await _bulk(
        pool,
        count,
        f"INSERT INTO messages ({seq[0]}recipient, content, status, attempts, remote_message_id,"
        " created_at, updated_at, queued_at, sent_at)"
        f" SELECT {seq[1]}CONCAT('+90555', LPAD(s.n + {{offset}}, 7, '0')),"
        " CONCAT('bench message ', s.n + {offset}),"
        " 'sent', 1, UUID(), b.t + INTERVAL (s.n + {offset}) * 1000 MICROSECOND,"
        " b.t + INTERVAL (s.n + {offset}) * 1000 + 900000 MICROSECOND,"
        " b.t + INTERVAL (s.n + {offset}) * 1000 + 500000 MICROSECOND,"
        " b.t + INTERVAL (s.n + {offset}) * 1000 + 900000 MICROSECOND"
        " FROM (SELECT TIMESTAMP '2024-01-01 00:00:00' AS t) AS b, {seq} ORDER BY s.n",
    )


async def append_pending(pool: aiomysql.Pool, count: int) -> None:
    """``count`` more pending messages, newer than everything there, counted in the same transaction (one
    ``UPDATE`` of a count row instead of the insert trigger's one per row)."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        async with _counted_here(cur):
            for offset in range(0, count, CHUNK):
                await cur.execute(
                    "INSERT INTO messages (recipient, content, created_at)"
                    f" SELECT CONCAT('+90556', LPAD(s.n + {offset}, 7, '0')), CONCAT('pending ', s.n + {offset}),"
                    f" b.t + INTERVAL (s.n + {offset}) MICROSECOND"
                    f" FROM (SELECT UTC_TIMESTAMP(6) AS t) AS b, {sequence(min(CHUNK, count - offset))}"
                )
            await cur.execute("UPDATE message_counts SET n = n + %s WHERE status = 'pending' AND shard = 0", (count,))


async def append_sent(pool: aiomysql.Pool, count: int) -> None:
    """``count`` more sent rows (``count`` <= CHUNK), sent after every other row (two days ago: past a retention
    of one day) and numbered after them (``sent_seq`` follows ``sent_at``), counted in the same transaction."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        async with _counted_here(cur):
            await cur.execute("SELECT value FROM counters WHERE name = 'sent' FOR UPDATE")
            (last,) = await cur.fetchone()
            await cur.execute(
                "INSERT INTO messages (sent_seq, recipient, content, status, attempts, remote_message_id,"
                " created_at, updated_at, queued_at, sent_at)"
                " SELECT %s + s.n + 1, CONCAT('+90557', LPAD(%s + s.n, 9, '0')), CONCAT('bench message ', %s + s.n),"
                " 'sent', 1, UUID(), b.t + INTERVAL s.n MICROSECOND, b.t + INTERVAL s.n MICROSECOND,"
                " b.t + INTERVAL s.n MICROSECOND, b.t + INTERVAL s.n MICROSECOND"
                f" FROM (SELECT UTC_TIMESTAMP(6) - INTERVAL 2 DAY AS t) AS b, {sequence(count)} ORDER BY s.n",
                (last, last, last),
            )
            await cur.execute("UPDATE counters SET value = value + %s WHERE name = 'sent'", (count,))
            await cur.execute("UPDATE message_counts SET n = n + %s WHERE status = 'sent' AND shard = 0", (count,))


async def counts(pool: aiomysql.Pool) -> dict[str, int]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT status, COUNT(*) FROM messages GROUP BY status")
        out = {s: 0 for s in ("pending", "queued", "sending", "sent", "failed")}
        out.update({str(status): int(n) for status, n in await cur.fetchall()})
        return out


# Rows not finished yet (pending, queued or sending), from the counts by status the transitions keep (a few rows:
# a COUNT over the rows themselves, polled four times a second, read half the table per poll on average).
UNFINISHED = "SELECT COALESCE(SUM(n), 0) FROM message_counts WHERE status IN ('pending', 'queued', 'sending')"


async def progress(pool: aiomysql.Pool) -> tuple[int, int]:
    """``(unfinished rows, sent counter)``: polled four times a second during the drain, so it reads a few rows
    and does not weigh on the server it measures; the end of the run checks every row (:func:`counts`)."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT ({UNFINISHED}), (SELECT value FROM counters WHERE name = 'sent')")
        unfinished, sent = await cur.fetchone()
        return int(unfinished), int(sent or 0)


async def drain_window(pool: aiomysql.Pool) -> dict[str, float]:
    """Seconds from the first claim to the last ``sent``, and the claim span (first to last claim)."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT TIMESTAMPDIFF(MICROSECOND, MIN(queued_at), MAX(sent_at)),"
            " TIMESTAMPDIFF(MICROSECOND, MIN(queued_at), MAX(queued_at)), COUNT(queued_at)"
            " FROM messages WHERE status <> 'pending'"
        )
        window, claims, claimed = await cur.fetchone()
    return {"window_s": (window or 0) / 1e6, "claim_span_s": (claims or 0) / 1e6, "with_queued_at": claimed}


async def latencies_ms(pool: aiomysql.Pool) -> list[float]:
    """Claim -> sent of every sent row (ms), sorted."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT TIMESTAMPDIFF(MICROSECOND, queued_at, sent_at) FROM messages"
            " WHERE status = 'sent' AND queued_at IS NOT NULL"
        )
        return sorted(int(r[0]) / 1000 for r in await cur.fetchall())
