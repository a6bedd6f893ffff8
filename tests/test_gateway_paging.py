"""Paging the sent list: cursor pages stay exact while messages are being sent; offset pages agree."""

from __future__ import annotations

import collections
import re
from typing import Any

import pytest

from common.settings import Settings
from common.store import MessageStore
from gateway.app import create_app
from tests.test_gateway import Client, send


@pytest.fixture
async def client(settings: Settings, store: MessageStore, aiohttp_client: Any) -> Client:
    return await aiohttp_client(create_app(settings))


def next_url(resp: Any) -> str | None:
    link = resp.headers.get("Link")
    if link is None:
        return None
    match = re.fullmatch(r'<(/messages\?[^>]+)>; rel="next"', link)
    assert match, link
    return match.group(1)


async def seed_history(store: MessageStore, n: int) -> list[int]:
    """``n`` messages sent in pairs, each pair in one commit sharing a ``sent_at`` (the id breaks the tie)."""
    return await send(store, n, per_commit=2)


async def test_cursor_walk_while_messages_are_sent_sees_each_earlier_message_once(
    client: Client, store: MessageStore
) -> None:
    before = await seed_history(store, 61)
    seen: list[int] = []
    url: str | None = "/messages?limit=7"
    pages = 0
    while url is not None:
        resp = await client.get(url)
        assert resp.status == 200
        seen += [row["id"] for row in await resp.json()]
        url = next_url(resp)
        pages += 1
        # Meanwhile the consumer marks three more messages sent: they land at the head of the list.
        await send(store, 3)
        assert int(resp.headers["X-Total-Count"]) == len(before) + 3 * (pages - 1)

    duplicates = [m for m, n in collections.Counter(seen).items() if n > 1]
    assert duplicates == []
    assert set(seen) == set(before), "every message sent before the walk, and only those"
    assert pages == 9  # 61 rows in pages of 7: 8 full pages and a last one of 5
    expected_order = sorted(before, key=lambda m: (before.index(m) // 2, m), reverse=True)
    assert seen == expected_order, "newest sent_at first, then highest id"


async def test_offset_pages_agree_with_the_full_list(client: Client, store: MessageStore) -> None:
    await seed_history(store, 45)
    full_resp = await client.get("/messages?limit=1000")
    full = [row["id"] for row in await full_resp.json()]
    assert len(full) == 45 and full_resp.headers["X-Total-Count"] == "45"

    for limit in (1, 10, 45, 50):
        paged: list[int] = []
        for offset in range(0, 50, limit):
            resp = await client.get("/messages", params={"limit": str(limit), "offset": str(offset)})
            assert resp.headers["X-Total-Count"] == "45"
            page = [row["id"] for row in await resp.json()]
            assert page == full[offset : offset + limit]
            paged += page
        assert paged == full, f"limit={limit}"


async def test_cursor_pages_agree_with_offset_pages(client: Client, store: MessageStore) -> None:
    await seed_history(store, 30)
    resp = await client.get("/messages?limit=10")
    first = await resp.json()
    url = next_url(resp)
    assert url is not None
    second = await (await client.get(url)).json()
    by_offset = await (await client.get("/messages?limit=10&offset=10")).json()
    assert second == by_offset
    assert [row["id"] for row in first + second] == [
        row["id"] for row in await (await client.get("/messages?limit=20")).json()
    ]
