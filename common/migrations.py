"""Versioned schema migrations, applied on start-up by every service and by ``message-sender migrate``.

Each migration is a list of statements applied in order and recorded in ``schema_migrations`` with a
checksum of its statements. A migration is never edited once released: every schema change is a new
numbered migration, and a service refuses to start when an applied migration's checksum no longer matches
its code (someone changed history; the schema may not be what the code expects). A database-wide named
lock (``GET_LOCK``) makes replicas that start at the same moment take turns: the first applies, the others
find nothing left to do. Statements are written so that re-running a migration interrupted half-way (DDL
commits implicitly) is harmless. All SQL runs unchanged on MySQL 8 and MariaDB 10.11.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
from collections.abc import Awaitable, Callable

import aiomysql
import pymysql

from common.errors import MigrationError

log = logging.getLogger(__name__)

LOCK_TIMEOUT_SECONDS = 60
# E.164 over the whole string: the structure, and no character outside `+` and ASCII digits anywhere (which
# also shuts out the trailing line break that `$` lets through).
RECIPIENT_CHECK = "recipient REGEXP '^[+][0-9]{8,15}$' AND NOT recipient REGEXP '[^+0-9]'"
OLD_RECIPIENT_CHECK, NEW_RECIPIENT_CHECK = "ck_messages_recipient", "ck_messages_recipient_e164"

# A step of a migration: a statement, or a coroutine for a step that must look before it acts.
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


async def _count_rows(cur: aiomysql.Cursor) -> None:
    """Set the counts by status from a full count of the table (:func:`common.store.count_rows`)."""
    from common.store import count_rows

    await count_rows(cur)


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
    (
        3,
        "sending lease, confirmed publishes, UTC defaults whatever the session's time zone",
        [
            # The lease of a `sending` row (past it the producer's sweep settles it) and when the publish of a
            # `queued` row's claim was confirmed (only unconfirmed claims are published again after the lease).
            "ALTER TABLE messages ADD COLUMN lease_expires_at DATETIME(6) NULL",
            "ALTER TABLE messages ADD COLUMN published_at DATETIME(6) NULL",
            # The delivery guarantee of the consumer that won the compare-and-set: what the sweep applies to it.
            "ALTER TABLE messages ADD COLUMN at_least_once BOOLEAN NULL",
            # A row inserted by hand from a session in another time zone gets its true UTC time.
            "ALTER TABLE messages MODIFY created_at DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6)),"
            " MODIFY updated_at DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6)) ON UPDATE CURRENT_TIMESTAMP(6)",
            # Rows in flight under the previous version get a lease (their consumer's timeout is unknown: a minute).
            "UPDATE messages SET lease_expires_at = updated_at + INTERVAL 1 MINUTE"
            " WHERE status = 'sending' AND lease_expires_at IS NULL",
            # Claims made before this version count as confirmed (they were published or are re-published).
            "UPDATE messages SET published_at = queued_at WHERE status = 'queued' AND published_at IS NULL",
        ],
    ),
    (
        4,
        "the producers' leader lease (renewed by a live leader, taken over when it lapses, fenced by an epoch)",
        [
            """
            CREATE TABLE producer_lease (
                id TINYINT UNSIGNED NOT NULL,
                epoch BIGINT UNSIGNED NOT NULL DEFAULT 0,
                holder VARCHAR(255) NULL,
                expires_at DATETIME(6) NULL,
                last_tick_at DATETIME(6) NULL,
                tick_epoch BIGINT UNSIGNED NULL,
                PRIMARY KEY (id),
                CONSTRAINT ck_producer_lease_single CHECK (id = 1)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
            """,
            "INSERT INTO producer_lease (id, holder, last_tick_at) SELECT 1, leader, last_tick_at FROM dispatch_state"
            " WHERE id = 1 AND NOT EXISTS (SELECT 1 FROM producer_lease WHERE id = 1)",
            "INSERT INTO producer_lease (id) SELECT 1 FROM DUAL WHERE NOT EXISTS (SELECT 1 FROM producer_lease)",
        ],
    ),
    (
        5,
        "counts by status kept in the transactions that move rows (O(1) statistics); failed_at for the timeline",
        [
            # A few rows per status (summed on read), so concurrent transactions rarely wait on the same one.
            """
            CREATE TABLE message_counts (
                status VARCHAR(16) NOT NULL,
                shard TINYINT UNSIGNED NOT NULL,
                n BIGINT NOT NULL DEFAULT 0,
                PRIMARY KEY (status, shard)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
            """,
            # Rows inserted by anyone (the API, a script, a person at a mysql prompt) are counted by the database.
            "CREATE TRIGGER messages_counted AFTER INSERT ON messages FOR EACH ROW"
            " UPDATE message_counts SET n = n + 1 WHERE status = NEW.status AND shard = NEW.id % 8",
            # Its rows (eight per status) and the existing rows, counted exactly (also when this migration runs
            # again after a crash, or while rows are inserted meanwhile): every shard set from one full count.
            _count_rows,
            # When a row failed: the failed-per-minute timeline and retention read a range of it.
            "ALTER TABLE messages ADD COLUMN failed_at DATETIME(6) NULL",
            "ALTER TABLE messages ADD INDEX ix_messages_failed_at (failed_at)",
            "UPDATE messages SET failed_at = updated_at WHERE status = 'failed' AND failed_at IS NULL",
        ],
    ),
    (
        6,
        "scheduled sends (send_at), priority, the cancelled status, idempotency keys, filter indexes",
        [
            # Appending a value to an ENUM changes only the table's metadata (instant on MySQL 8 and MariaDB).
            "ALTER TABLE messages MODIFY status"
            " ENUM('pending','queued','sending','sent','failed','cancelled') NOT NULL DEFAULT 'pending'",
            # When a message may be sent at the earliest; a hand-inserted row is due at once (UTC whatever the
            # session's time zone). ENUM order makes 'high' sort before 'normal'.
            "ALTER TABLE messages ADD COLUMN send_at DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6)),"
            " ADD COLUMN priority ENUM('high','normal') NOT NULL DEFAULT 'normal',"
            " ADD COLUMN cancelled_at DATETIME(6) NULL",
            # The claim: the due range of each priority (status, priority IN (...), send_at <= now), read in
            # index order, so it never walks the rows scheduled later. The retry's due time is read from the index.
            "ALTER TABLE messages ADD INDEX ix_messages_due (status, priority, send_at, id, next_attempt_at)",
            # GET /messages?recipient=...(&status=...): one range per status, newest first.
            "ALTER TABLE messages ADD INDEX ix_messages_recipient (recipient, status, created_at, id)",
            # Retention of cancelled rows.
            "ALTER TABLE messages ADD INDEX ix_messages_cancelled_at (cancelled_at)",
            "INSERT INTO message_counts (status, shard, n) SELECT 'cancelled', h.shard, 0 FROM"
            " (SELECT 0 AS shard UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4"
            " UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7) AS h ON DUPLICATE KEY UPDATE n = n",
            # A multi-row insert that counts its rows itself (one statement for all of them) sets
            # @message_sender_counted for its duration; every other insert is counted row by row as before.
            "DROP TRIGGER IF EXISTS messages_counted",
            # One shard per connection (not per row): the rows of one multi-row insert all count on the same
            # row of message_counts, so an insert never holds several of them while waiting for another (which,
            # against the transitions' own count updates, made deadlocks).
            "CREATE TRIGGER messages_counted AFTER INSERT ON messages FOR EACH ROW"
            " BEGIN IF @message_sender_counted IS NULL THEN UPDATE message_counts SET n = n + 1"
            " WHERE status = NEW.status AND shard = CONNECTION_ID() % 8; END IF; END",
            # Idempotency-Key of POST /messages and /messages/batch: the request's fingerprint and the ids it
            # created, for 24 h; the primary key makes concurrent requests with one key wait for the first.
            """
            CREATE TABLE IF NOT EXISTS idempotency_keys (
                idem_key VARCHAR(255) NOT NULL,
                fingerprint CHAR(64) NOT NULL,
                ids JSON NOT NULL,
                created_at DATETIME(6) NOT NULL,
                PRIMARY KEY (idem_key),
                KEY ix_idempotency_created (created_at)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin
            """,
        ],
    ),
    (
        7,
        "which provider took each attempt (WEBHOOK_FALLBACK_URL)",
        [
            # 'primary' or 'fallback'; NULL for the attempts made before this version (all to the primary).
            "ALTER TABLE message_attempts ADD COLUMN provider VARCHAR(16) NULL",
        ],
    ),
    (
        8,
        "the recipient filter's index without status (one index fewer changed by every status transition)",
        [
            # Every transition of a row (pending -> queued -> sending -> sent) rewrote its entry in each index
            # that holds `status`; this one does not need it: a recipient's rows are read newest first and
            # their status checked on the row, so its cost follows that recipient's messages.
            "ALTER TABLE messages ADD INDEX ix_messages_recipient_created (recipient, created_at, id)",
            "ALTER TABLE messages DROP INDEX ix_messages_recipient",
        ],
    ),
    (
        9,
        "the leader's schedule (its SEND_INTERVAL_SECONDS and SEND_BATCH_SIZE), recorded with each tick",
        [
            # What the running system does, for `message-sender demo`, whatever the caller's own environment says.
            "ALTER TABLE producer_lease ADD COLUMN send_interval_seconds DOUBLE NULL,"
            " ADD COLUMN send_batch_size INT UNSIGNED NULL",
        ],
    ),
    (
        10,
        "the W3C traceparent of the request that created a message (tracing; NULL when off or inserted by hand)",
        [
            # Read by the producer's claim only when tracing is on: its publish span continues the request's trace.
            "ALTER TABLE messages ADD COLUMN traceparent VARCHAR(55) NULL",
        ],
    ),
    (
        11,
        "status indexes keyed on generated columns: a transition rewrites only the index entries whose key moves",
        [
            # ix_messages_due, ix_messages_sent and ix_messages_claim each began with `status`, so every transition
            # of every row (pending -> queued -> sending -> sent) rewrote its entry in all three: nine index entry
            # moves per message, most of the server's work per row. Each new key is a virtual column that only
            # changes when its index needs it: a message that goes out now moves four entries, not nine.
            # Virtual columns are added without copying the table (metadata only on MariaDB and MySQL 8) and
            # their indexes are built online, so this migration does not block writers on a large table.
            "ALTER TABLE messages"
            # the claim's priority while the row may be claimed (pending), NULL otherwise
            " ADD COLUMN claim_priority ENUM('high','normal') AS (IF(status = 'pending', priority, NULL)) VIRTUAL,"
            # sent_at, only for sent rows: the sent list, throughput and retention of sent rows
            " ADD COLUMN sent_key DATETIME(6) AS (IF(status = 'sent', sent_at, NULL)) VIRTUAL,"
            # the status as the lists group it: queued and sending (a message in flight, a few per consumer)
            # share one key, so the compare-and-set between them moves no entry
            " ADD COLUMN list_status ENUM('pending','in_flight','sent','failed','cancelled')"
            " AS (IF(status IN ('queued', 'sending'), 'in_flight', status)) VIRTUAL",
            "ALTER TABLE messages ADD INDEX ix_messages_claimable (claim_priority, send_at, id, next_attempt_at),"
            " ADD INDEX ix_messages_sent_key (sent_key, id),"
            " ADD INDEX ix_messages_listed (list_status, created_at, id)",
            "ALTER TABLE messages DROP INDEX ix_messages_due, DROP INDEX ix_messages_sent,"
            " DROP INDEX ix_messages_claim",
        ],
    ),
]

LATEST = MIGRATIONS[-1][0]


def checksum(statements: list[Step]) -> str:
    """The SHA-256 of a migration's statements (a coroutine step by its source), whitespace-normalised
    (re-indenting is not a change)."""
    texts = [s if isinstance(s, str) else inspect.getsource(s) for s in statements]
    text = "\n".join(re.sub(r"\s+", " ", t).strip() for t in texts)
    return hashlib.sha256(text.encode()).hexdigest()


# "Already done" answers to DDL, met when a migration interrupted half-way runs again (DDL commits at once,
# so a crash can leave some statements of a migration applied): duplicate table, column, key or trigger,
# and a key or column already dropped. MySQL 8 has no ``ADD COLUMN IF NOT EXISTS``; this keeps the SQL portable.
ALREADY_DONE = frozenset({1050, 1060, 1061, 1091, 1359})  # 1359: the trigger exists


async def _run(cur: aiomysql.Cursor, statement: str) -> None:
    try:
        await cur.execute(statement)
    except pymysql.err.MySQLError as exc:
        if not (exc.args and exc.args[0] in ALREADY_DONE):
            raise
        log.info("migration statement already applied (%s): %s", exc.args[1], " ".join(statement.split())[:80])


async def _bookkeeping(cur: aiomysql.Cursor) -> None:
    """Create ``schema_migrations`` (version, name, applied_at, checksum) or add the checksum column to one of
    a release before checksums; databases migrated then get their checksums on first sight (trust on first use)."""
    await cur.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = DATABASE() AND table_name = 'schema_migrations'"
    )
    columns = {str(c).lower() for (c,) in await cur.fetchall()}
    if not columns:
        await cur.execute(
            "CREATE TABLE schema_migrations ("
            " version INT UNSIGNED NOT NULL PRIMARY KEY,"
            " name VARCHAR(200) NOT NULL,"
            " applied_at DATETIME(6) NOT NULL,"
            " checksum CHAR(64) NULL"
            ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
        )
    elif "checksum" not in columns:
        await _run(cur, "ALTER TABLE schema_migrations ADD COLUMN checksum CHAR(64) NULL")


async def migrate(pool: aiomysql.Pool, upto: int = LATEST) -> list[int]:
    """Bring the schema to :data:`LATEST` (or to version ``upto``); return the versions applied by this call
    (empty: nothing to do).

    Raises :class:`MigrationError` when an applied migration was changed since (its checksum differs) or the
    database is at a version this code does not know (a newer release ran against it)."""
    applied: list[int] = []
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT GET_LOCK(CONCAT(DATABASE(), '.migrations'), %s)", (LOCK_TIMEOUT_SECONDS,))
        (locked,) = await cur.fetchone()
        if locked != 1:
            raise MigrationError(f"could not take the migration lock within {LOCK_TIMEOUT_SECONDS}s")
        try:
            await _bookkeeping(cur)
            await cur.execute("SELECT version, checksum FROM schema_migrations ORDER BY version")
            done = {int(v): c for v, c in await cur.fetchall()}
            known = {number: (name, statements) for number, name, statements in MIGRATIONS}
            unknown = sorted(set(done) - set(known))
            if unknown:
                raise MigrationError(
                    f"the database is at schema version {max(unknown)}, newer than this release knows"
                    f" ({LATEST}): run the release that migrated it"
                )
            for number, recorded in done.items():
                expected = checksum(known[number][1])
                if recorded is None:
                    await cur.execute(
                        "UPDATE schema_migrations SET checksum = %s WHERE version = %s", (expected, number)
                    )
                elif recorded != expected:
                    raise MigrationError(
                        f"migration {number} ({known[number][0]}) was changed after it was applied"
                        f" (checksum {recorded[:12]}... in the database, {expected[:12]}... in the code):"
                        " applied migrations are never edited; add a new numbered migration instead"
                    )
            for number, name, statements in MIGRATIONS:
                if number in done or number > upto:
                    continue
                log.info("applying migration %d: %s", number, name)
                for statement in statements:
                    if isinstance(statement, str):
                        await _run(cur, statement)
                    else:
                        await statement(cur)
                await cur.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at, checksum)"
                    " VALUES (%s, %s, UTC_TIMESTAMP(6), %s)",
                    (number, name, checksum(statements)),
                )
                applied.append(number)
        except BaseException:
            # A statement may be unfinished (cancelled by a stop, timed out, the connection lost): this
            # connection cannot run another one. Closing it ends the session, which frees the lock once the
            # server is done with that statement (each statement may be applied again: ALREADY_DONE).
            conn.close()
            raise
        await cur.execute("SELECT RELEASE_LOCK(CONCAT(DATABASE(), '.migrations'))")
        await cur.fetchone()
    if applied:
        log.info("schema migrated to version %d", LATEST)
    return applied
