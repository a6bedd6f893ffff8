"""Migrations and the database's own constraints."""

import asyncio

import aiomysql
import pymysql
import pytest

from common.db import create_pool
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
    assert rows == [(n,) for n, _, _ in MIGRATIONS] and rows[-1] == (LATEST,)


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
        assert await migrate(pool) == [2]
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
