"""``message-sender``: operator commands (migrate, demo, cache-backfill, recount)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys

from common.cache import MessageCache, connect
from common.db import create_pool
from common.errors import SettingsError
from common.logs import secrets_of, setup_logging
from common.migrations import migrate
from common.settings import Settings
from common.store import MessageStore

log = logging.getLogger("message_sender")

SAMPLES = [
    "Insider - Project",
    "Your code is 4821",
    "Your order has shipped",
    "Meeting moved to 3pm",
    "Welcome aboard!",
    "Reminder: appointment tomorrow",
]


async def _migrate(settings: Settings, _: argparse.Namespace) -> None:
    pool = await create_pool(settings)
    try:
        applied = await migrate(pool)
        print(f"schema is at the latest version ({'applied ' + str(applied) if applied else 'nothing to apply'})")
    finally:
        pool.close()
        await pool.wait_closed()


async def _demo(settings: Settings, args: argparse.Namespace) -> None:
    pool = await create_pool(settings)
    try:
        await migrate(pool)
        store = MessageStore(pool)
        rows = [(f"+90555{random.randrange(10**6, 10**7)}", random.choice(SAMPLES)) for _ in range(args.count)]
        await store.create_many(rows)
        schedule = await store.leader_schedule()
        if schedule is None:
            print(
                f"inserted {args.count} pending messages; no producer leads right now (or it has not recorded"
                f" its schedule yet): one run with this environment sends {settings.send_batch_size} every"
                f" {settings.send_interval_seconds:g}s while sending is on"
            )
        else:
            holder, interval, batch = schedule
            print(
                f"inserted {args.count} pending messages; the running producer ({holder}) sends {batch} every"
                f" {interval:g}s while sending is on"
            )
    finally:
        pool.close()
        await pool.wait_closed()


async def _backfill(settings: Settings, args: argparse.Namespace) -> None:
    """Write ``message:<messageId>`` for every sent row (after a Redis outage or flush)."""
    pool = await create_pool(settings)
    client = connect(settings.redis_url.reveal(), 30.0)  # a batch of 1,000 entries per command
    try:
        store = MessageStore(pool)
        cache = MessageCache(client, settings.cache_ttl_seconds, settings.redis_prefix)
        after, written = 0, 0
        while batch := await store.sent_with_remote_id(after, 1000):
            await cache.put_many([(rid, mid, at) for mid, rid, at in batch])
            written += len(batch)
            after = batch[-1][0]
        print(f"wrote {written} cache entries")
    finally:
        await client.aclose()
        pool.close()
        await pool.wait_closed()


async def _recount(settings: Settings, _: argparse.Namespace) -> None:
    """Rebuild the counts by status from the table (after rows were changed or deleted by hand)."""
    pool = await create_pool(settings)
    try:
        await migrate(pool)
        counts = await MessageStore(pool).recount()
        print("recounted: " + ", ".join(f"{status} {n}" for status, n in counts.items()))
    finally:
        pool.close()
        await pool.wait_closed()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="message-sender", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply the schema migrations").set_defaults(run=_migrate)
    demo = sub.add_parser("demo", help="insert sample pending messages")
    demo.add_argument("--count", type=int, default=10)
    demo.set_defaults(run=_demo)
    sub.add_parser("cache-backfill", help="rewrite the Redis cache from MySQL").set_defaults(run=_backfill)
    sub.add_parser("recount", help="rebuild the counts by status from the table").set_defaults(run=_recount)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"message-sender: {exc}")
    setup_logging(settings.log_level, settings.log_format, secrets_of(settings))
    asyncio.run(args.run(settings, args))


if __name__ == "__main__":
    main()
