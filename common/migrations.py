"""Versioned schema migrations, applied on start-up by every service and by ``message-sender migrate``.

Each migration is a list of statements applied in order and recorded in ``schema_migrations``. A
database-wide named lock (``GET_LOCK``) makes replicas that start at the same moment take turns: the
first applies, the others find nothing left to do. Statements are written so that re-running a
migration interrupted half-way (DDL commits implicitly) is harmless. All SQL runs unchanged on
MySQL 8 and MariaDB 10.11.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import aiomysql

from common.errors import MigrationError

log = logging.getLogger(__name__)

LOCK_TIMEOUT_SECONDS = 60
# E.164 over the whole string: the structure, and no character outside `+` and ASCII digits anywhere (which
# also shuts out the trailing line break that `$` lets through).
RECIPIENT_CHECK = "recipient REGEXP '^[+][0-9]{8,15}$' AND NOT recipient REGEXP '[^+0-9]'"
OLD_RECIPIENT_CHECK, NEW_RECIPIENT_CHECK = "ck_messages_recipient", "ck_messages_recipient_e164"

Step = str | Callable[[aiomysql.Cursor], Awaitable[None]]


async def _check_names(cur: aiomysql.Cursor) -> set[str]:
    """The CHECK constraints of this database (their names are unique per schema in MySQL)."""
    await cur.execute(
        "SELECT constraint_name FROM information_schema.check_constraints WHERE constraint_schema = DATABASE()"
    )
    return {str(name) for (name,) in await cur.fetchall()}


async def _recipient_check_over_the_whole_string(cur: aiomysql.Cursor) -> None:
    """Add the whole-string CHECK under a new name, then drop version 1's: each step only if still needed,
    so a run interrupted between the two (each ALTER commits on its own) is finished by the next one."""
    if NEW_RECIPIENT_CHECK not in await _check_names(cur):
        await cur.execute(f"ALTER TABLE messages ADD CONSTRAINT {NEW_RECIPIENT_CHECK} CHECK ({RECIPIENT_CHECK})")
    if OLD_RECIPIENT_CHECK in await _check_names(cur):
        await cur.execute(f"ALTER TABLE messages DROP CONSTRAINT {OLD_RECIPIENT_CHECK}")


MIGRATIONS: list[tuple[int, str, list[Step]]] = [
    (
        1,
        "messages, attempts, dispatch state, counters",
        [
            """
            CREATE TABLE IF NOT EXISTS messages (
                id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
                recipient VARCHAR(20) NOT NULL,
                content VARCHAR(160) NOT NULL,
                status ENUM('pending','queued','sending','sent','failed') NOT NULL DEFAULT 'pending',
                attempts INT UNSIGNED NOT NULL DEFAULT 0,
                next_attempt_at DATETIME(6) NULL,
                last_error VARCHAR(1000) NULL,
                remote_message_id VARCHAR(128) NULL,
                created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
                updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
                queued_at DATETIME(6) NULL,
                sent_at DATETIME(6) NULL,
                delivery_token BIGINT UNSIGNED NULL,
                sent_seq BIGINT UNSIGNED NULL,
                PRIMARY KEY (id),
                UNIQUE KEY ux_messages_sent_seq (sent_seq),
                KEY ix_messages_claim (status, created_at, id, next_attempt_at),
                KEY ix_messages_sent (status, sent_at, id),
                CONSTRAINT ck_messages_content CHECK (CHAR_LENGTH(content) BETWEEN 1 AND 160),
                CONSTRAINT ck_messages_recipient CHECK (recipient REGEXP '^[+][0-9]{8,15}$')
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
            """,
            """
            CREATE TABLE IF NOT EXISTS message_attempts (
                id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
                message_id BIGINT UNSIGNED NOT NULL,
                attempt INT UNSIGNED NOT NULL,
                started_at DATETIME(6) NOT NULL,
                finished_at DATETIME(6) NOT NULL,
                outcome ENUM('sent','retry','failed') NOT NULL,
                http_status SMALLINT UNSIGNED NULL,
                error VARCHAR(1000) NULL,
                duration_ms INT UNSIGNED NOT NULL,
                PRIMARY KEY (id),
                KEY ix_attempts_message (message_id, id),
                UNIQUE KEY ux_attempts_once (message_id, started_at)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
            """,
            """
            CREATE TABLE IF NOT EXISTS dispatch_state (
                id TINYINT UNSIGNED NOT NULL,
                sending BOOLEAN NOT NULL DEFAULT TRUE,
                changed_at DATETIME(6) NULL,
                leader VARCHAR(255) NULL,
                last_tick_at DATETIME(6) NULL,
                PRIMARY KEY (id),
                CONSTRAINT ck_dispatch_state_single CHECK (id = 1)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
            """,
            "INSERT INTO dispatch_state (id, sending, changed_at) SELECT 1, TRUE, UTC_TIMESTAMP(6) FROM DUAL"
            " WHERE NOT EXISTS (SELECT 1 FROM dispatch_state WHERE id = 1)",
            """
            CREATE TABLE IF NOT EXISTS counters (
                name VARCHAR(32) NOT NULL,
                value BIGINT NOT NULL DEFAULT 0,
                PRIMARY KEY (name)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
            """,
            "INSERT INTO counters (name, value) SELECT 'sent', COUNT(*) FROM messages WHERE status = 'sent'"
            " AND NOT EXISTS (SELECT 1 FROM counters WHERE name = 'sent')",
        ],
    ),
    (
        2,
        "recipient CHECK over the whole string",
        [
            # `$` of MySQL's and MariaDB's REGEXP also matches before a final line break, so version 1 let
            # '+905551111111\n' in. Such a row is brought back to the number before the break (the only thing
            # the old CHECK let through), keeping its updated_at, so that the new constraint can be added.
            "UPDATE messages SET recipient = REGEXP_SUBSTR(recipient, '^[+][0-9]{8,15}'), updated_at = updated_at"
            " WHERE recipient REGEXP '[^+0-9]' AND recipient REGEXP '^[+][0-9]{8,15}'",
            _recipient_check_over_the_whole_string,
        ],
    ),
]

LATEST = MIGRATIONS[-1][0]


async def current_version(conn: aiomysql.Connection) -> int:
    async with conn.cursor() as cur:
        await cur.execute(
            "SELECT COUNT(*) FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_name = 'schema_migrations'"
        )
        (exists,) = await cur.fetchone()
        if not exists:
            return 0
        await cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        (version,) = await cur.fetchone()
        return int(version)


async def migrate(pool: aiomysql.Pool, upto: int = LATEST) -> list[int]:
    """Bring the schema to :data:`LATEST` (or to version ``upto``); return the versions applied by this call
    (empty: nothing to do)."""
    applied: list[int] = []
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT GET_LOCK(CONCAT(DATABASE(), '.migrations'), %s)", (LOCK_TIMEOUT_SECONDS,))
        (locked,) = await cur.fetchone()
        if locked != 1:
            raise MigrationError(f"could not take the migration lock within {LOCK_TIMEOUT_SECONDS}s")
        try:
            version = await current_version(conn)
            if version == 0:
                await cur.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version INT UNSIGNED NOT NULL PRIMARY KEY,"
                    " name VARCHAR(200) NOT NULL,"
                    " applied_at DATETIME(6) NOT NULL"
                    ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
                )
            for number, name, statements in MIGRATIONS:
                if number <= version or number > upto:
                    continue
                log.info("applying migration %d: %s", number, name)
                for statement in statements:
                    if isinstance(statement, str):
                        await cur.execute(statement)
                    else:
                        await statement(cur)
                await cur.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, UTC_TIMESTAMP(6))",
                    (number, name),
                )
                applied.append(number)
        finally:
            await cur.execute("SELECT RELEASE_LOCK(CONCAT(DATABASE(), '.migrations'))")
            await cur.fetchone()
    if applied:
        log.info("schema migrated to version %d", applied[-1])
    return applied
