"""Migrations and the database's own constraints."""

import asyncio
import dataclasses
import re

import aiomysql
import pymysql
import pytest

from common.db import connect_kwargs, create_pool
from common.errors import MigrationError
from common.migrations import (
    LATEST,
    MIGRATIONS,
    NEW_RECIPIENT_CHECK,
    OLD_RECIPIENT_CHECK,
    _recipient_check_over_the_whole_string,
    migrate,
)
from common.settings import Settings
from tests.conftest import sql
from tests.procs import wait_for


async def test_migrating_twice_is_a_no_op(pool: aiomysql.Pool) -> None:
    assert await migrate(pool) == []


async def test_concurrent_migrators_end_with_one_schema(settings: Settings) -> None:
    pools = [await create_pool(settings) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(p) for p in pools))
    finally:
        for p in pools:
            p.close()
            await p.wait_closed()
    assert sorted(len(r) for r in results) == [0, 0, 0, len(MIGRATIONS)]
    rows = await sql(settings, "SELECT version FROM schema_migrations ORDER BY version")
    assert rows == [(number,) for number, _, _ in MIGRATIONS] and rows[-1] == (LATEST,)


@pytest.mark.parametrize("waiting_for", ["the migration lock", "a table lock"])
async def test_a_migration_cancelled_while_it_waits_ends_cleanly(settings: Settings, waiting_for: str) -> None:
    """A service stopped (cancelled) while its migration waits: for the lock (another replica migrates), or
    in a statement (a long transaction holds the table). It ends with the cancellation alone (no second error
    from releasing the lock on a connection that is mid-statement), its connection is not put back half-read,
    and the next start finishes the migration."""
    pool = await create_pool(settings, minsize=1, maxsize=1)  # creates the database
    holder = await aiomysql.connect(**connect_kwargs(settings))  # type: ignore[arg-type]
    try:
        async with holder.cursor() as cur:
            if waiting_for == "the migration lock":
                await cur.execute("SELECT GET_LOCK(CONCAT(DATABASE(), '.migrations'), 0)")
                watched, left = "SELECT GET_LOCK%", [n for n, _, _ in MIGRATIONS]
            else:  # the last migration's first statement waits for the table that a transaction reads
                await migrate(pool, upto=LATEST - 1)
                await cur.execute("START TRANSACTION")
                await cur.execute("SELECT COUNT(*) FROM messages")
                watched, left = "ALTER TABLE%", [LATEST]
        task = asyncio.ensure_future(migrate(pool))

        async def waiting() -> bool:
            rows = await sql(
                settings,
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = %s AND INFO LIKE %s",
                (settings.mysql_database, watched),
            )
            return bool(rows[0][0])

        await wait_for(waiting, 10, f"the migration to wait for {waiting_for}")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with holder.cursor() as cur:
            await cur.execute("SELECT RELEASE_LOCK(CONCAT(DATABASE(), '.migrations'))")
            await cur.execute("COMMIT")
        async with pool.acquire() as conn, conn.cursor() as cur:  # the pool's one connection, or a new one
            await cur.execute("SELECT 42")
            assert await cur.fetchone() == (42,)
        assert await asyncio.wait_for(migrate(pool), 30) == left
        rows = await sql(settings, "SELECT version FROM schema_migrations ORDER BY version")
        assert rows[-1] == (LATEST,) and len(rows) == len(MIGRATIONS)
    finally:
        holder.close()
        pool.close()
        await pool.wait_closed()


async def test_an_edited_applied_migration_stops_the_start(pool: aiomysql.Pool, settings: Settings) -> None:
    """Applied migrations are immutable: a changed one (here: its recorded checksum) refuses to migrate."""
    await sql(settings, "UPDATE schema_migrations SET checksum = REPEAT('0', 64) WHERE version = 1")
    with pytest.raises(MigrationError, match=r"migration 1 .* was changed after it was applied"):
        await migrate(pool)


async def test_a_database_from_a_newer_release_is_refused(pool: aiomysql.Pool, settings: Settings) -> None:
    await sql(settings, "INSERT INTO schema_migrations VALUES (9999, 'future', UTC_TIMESTAMP(6), NULL)")
    with pytest.raises(MigrationError, match="schema version 9999, newer than this release"):
        await migrate(pool)


async def test_a_database_created_at_version_1_upgrades_to_the_latest(settings: Settings, pool: aiomysql.Pool) -> None:
    """A database created by the first release (with rows in every state) migrates to exactly the schema a
    new database gets, and keeps its rows; the in-flight ones get their way out."""
    fresh = {t: await _create_table(settings, t) for t in ("messages", "message_attempts", "dispatch_state")}
    old = dataclasses.replace(settings, mysql_database=settings.mysql_database + "_v1")
    old_pool = await create_pool(old)
    try:
        async with old_pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "CREATE TABLE schema_migrations (version INT UNSIGNED NOT NULL PRIMARY KEY,"
                " name VARCHAR(200) NOT NULL, applied_at DATETIME(6) NOT NULL)"
            )
            number, name, statements = MIGRATIONS[0]
            for statement in statements:
                await cur.execute(statement)
            await cur.execute("INSERT INTO schema_migrations VALUES (%s, %s, UTC_TIMESTAMP(6))", (number, name))
            await cur.execute(
                "INSERT INTO messages (recipient, content, status, queued_at) VALUES"
                " ('+905551111111', 'a', 'pending', NULL), ('+905551111112', 'b', 'queued', UTC_TIMESTAMP(6)),"
                " ('+905551111113', 'c', 'sending', UTC_TIMESTAMP(6))"
            )
        assert await migrate(old_pool) == [n for n, _, _ in MIGRATIONS[1:]]
        for table, create in fresh.items():
            assert await _create_table(old, table) == create, f"{table} differs after the upgrade"
        rows = await sql(
            old, "SELECT status, lease_expires_at IS NOT NULL, published_at IS NOT NULL FROM messages ORDER BY id"
        )
        assert rows == [("pending", 0, 0), ("queued", 0, 1), ("sending", 1, 0)]
        assert await migrate(old_pool) == []
    finally:
        old_pool.close()
        await old_pool.wait_closed()
        await sql(settings, f"DROP DATABASE IF EXISTS `{old.mysql_database}`")


async def _create_table(settings: Settings, table: str) -> str:
    (row,) = await sql(settings, f"SHOW CREATE TABLE `{table}`")
    return re.sub(r" AUTO_INCREMENT=\d+", "", str(row[1]))


async def test_a_row_inserted_by_hand_in_another_time_zone_gets_its_utc_time(
    pool: aiomysql.Pool, settings: Settings
) -> None:
    """The README invites hand inserts; a session in UTC+05:00 must not store a created_at 5 h in the future
    (it would sort last in "oldest first")."""
    conn = await aiomysql.connect(**{**connect_kwargs(settings), "init_command": "SET time_zone = '+05:00'"})
    try:
        async with conn.cursor() as cur:
            await cur.execute("INSERT INTO messages (recipient, content) VALUES ('+905551111111', 'from +05:00')")
    finally:
        conn.close()
    await sql(settings, "INSERT INTO messages (recipient, content) VALUES ('+905551111112', 'from UTC')")
    rows = await sql(
        settings,
        "SELECT content, TIMESTAMPDIFF(SECOND, created_at, UTC_TIMESTAMP(6)),"
        " TIMESTAMPDIFF(SECOND, updated_at, UTC_TIMESTAMP(6)) FROM messages ORDER BY created_at, id",
    )
    assert [r[0] for r in rows] == ["from +05:00", "from UTC"], "oldest first"
    assert all(abs(int(r[1])) < 60 and abs(int(r[2])) < 60 for r in rows), rows


async def test_a_hand_inserted_row_is_valid_and_pending(pool: aiomysql.Pool, settings: Settings) -> None:
    await sql(settings, "INSERT INTO messages (recipient, content) VALUES ('+905551111111', 'Insider - Project')")
    rows = await sql(settings, "SELECT status, attempts, created_at IS NOT NULL FROM messages")
    assert rows == [("pending", 0, 1)]


@pytest.mark.parametrize(
    ("recipient", "content"),
    [
        ("+905551111111", ""),
        ("+905551111111", "x" * 161),
        ("905551111111", "hi"),
        ("+12", "hi"),
        ("+9055511111112222", "hi"),
        ("+90555abc1111", "hi"),
        ("+905551111111\n", "hi"),  # `$` of REGEXP matches before a final line break: the CHECK must not
        ("+905551111111\r\n", "hi"),
        ("\n+905551111111", "hi"),
        ("+90555 1111111", "hi"),
        ("+905551111111 ", "hi"),
        ("+90555\u0661\u0661\u0661\u0661\u0661\u0661\u0661", "hi"),  # Arabic-Indic digits
        ("+90555\uff11\uff11\uff11\uff11\uff11\uff11\uff11", "hi"),  # fullwidth digits
        ("+9055+5111111", "hi"),
    ],
)
async def test_database_refuses_bad_rows(pool: aiomysql.Pool, settings: Settings, recipient: str, content: str) -> None:
    with pytest.raises(pymysql.err.MySQLError):
        await sql(settings, "INSERT INTO messages (recipient, content) VALUES (%s, %s)", (recipient, content))
    assert await sql(settings, "SELECT COUNT(*) FROM messages") == [(0,)]


async def test_160_characters_of_any_script_fit(pool: aiomysql.Pool, settings: Settings) -> None:
    await sql(settings, "INSERT INTO messages (recipient, content) VALUES (%s, %s)", ("+905551111111", "ğ😀" * 80))
    assert await sql(settings, "SELECT CHAR_LENGTH(content) FROM messages") == [(160,)]


async def test_upgrading_mends_a_recipient_the_old_check_let_in(settings: Settings) -> None:
    """Version 1's CHECK let a trailing line break through; version 2 strips it from such rows (keeping the rest
    of the row as it was) so that its whole-string CHECK can be added, and refuses new ones."""
    pool = await create_pool(settings)
    try:
        assert await migrate(pool, upto=1) == [1]
        await sql(settings, "INSERT INTO messages (recipient, content) VALUES (%s, 'hi'), ('+905552222222', 'ok')",
                  ("+905551111111\n",))  # fmt: skip
        before = await sql(settings, "SELECT id, updated_at FROM messages ORDER BY id")
        assert await migrate(pool) == [n for n, _, _ in MIGRATIONS[1:]]
    finally:
        pool.close()
        await pool.wait_closed()
    assert await sql(settings, "SELECT recipient FROM messages ORDER BY id") == [("+905551111111",), ("+905552222222",)]
    assert await sql(settings, "SELECT id, updated_at FROM messages ORDER BY id") == before
    with pytest.raises(pymysql.err.MySQLError):
        await sql(settings, "INSERT INTO messages (recipient, content) VALUES (%s, 'hi')", ("+905551111111\n",))


async def test_the_recipient_step_finishes_an_interrupted_run_and_is_a_no_op_after(
    pool: aiomysql.Pool, settings: Settings
) -> None:
    names = "SELECT constraint_name FROM information_schema.check_constraints WHERE constraint_schema = DATABASE()"
    assert {n for (n,) in await sql(settings, names)} >= {NEW_RECIPIENT_CHECK}
    assert OLD_RECIPIENT_CHECK not in {n for (n,) in await sql(settings, names)}
    # Interrupted after the first ALTER: the old CHECK is still there (as a crash would leave it).
    await sql(settings, f"ALTER TABLE messages ADD CONSTRAINT {OLD_RECIPIENT_CHECK} CHECK (recipient LIKE '+%%')")
    for _ in range(2):
        async with pool.acquire() as conn, conn.cursor() as cur:
            await _recipient_check_over_the_whole_string(cur)
        found = {n for (n,) in await sql(settings, names)}
        assert NEW_RECIPIENT_CHECK in found and OLD_RECIPIENT_CHECK not in found, found
