"""The status dashboard: its JSON endpoints through aiohttp's test client, and the page itself in headless
Chromium (Debian's ``chromium`` driven by ``playwright``) against a real gateway on a free port.

Screenshots of a short demo run are written to ``test-artifacts/dashboard/`` for a person to look at."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from common.models import utcnow
from common.settings import Secret, Settings
from common.store import MessageStore, NewMessage
from gateway.app import create_app
from tests.conftest import sql
from tests.procs import ARTIFACTS, Cluster, StandIn, wait_for
from tests.test_gateway import Client, error_of, fail, send

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # the API tests still run; the browser tests skip (see `browser`)
    async_playwright = None  # type: ignore[assignment]

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
LOCAL = {"127.0.0.1", "localhost"}
TOKEN = "dashboard-token-7a2e9c"
SHOTS = ARTIFACTS / "dashboard"
WAIT_MS = 15_000  # a refresh every 5 s, the counts of /stats cached for 2 s


# --- the JSON endpoints ------------------------------------------------------------------------------


@pytest.fixture
async def client(settings: Settings, store: MessageStore, aiohttp_client: Any) -> Client:
    return await aiohttp_client(create_app(settings))


async def test_timeline_counts_each_minute_oldest_first_with_zeros(
    client: Client, store: MessageStore, settings: Settings
) -> None:
    ids = await send(store, 6)
    failed = await fail(store)
    base = utcnow().replace(second=0, microsecond=0)
    at = {  # minutes ago -> sent message ids; well inside the hour whatever minute the request lands in
        5: ids[:3],
        12: ids[3:4],
        30: ids[4:5],
        90: ids[5:],  # outside the last hour
    }
    for minutes_ago, sent_ids in at.items():
        for message_id in sent_ids:
            when = base - dt.timedelta(minutes=minutes_ago, seconds=-7)
            await sql(settings, "UPDATE messages SET sent_at = %s WHERE id = %s", (when, message_id))
    await sql(settings, "UPDATE messages SET failed_at = %s WHERE id = %s", (base - dt.timedelta(minutes=12), failed))

    resp = await client.get("/stats/timeline")
    assert resp.status == 200
    series = await resp.json()
    assert len(series) == 60 and all(set(m) == {"minute", "sent", "failed"} for m in series)
    minutes = [dt.datetime.fromisoformat(m["minute"].removesuffix("Z")) for m in series]
    assert minutes == [minutes[0] + dt.timedelta(minutes=i) for i in range(60)], "consecutive, oldest first"
    assert series[0]["minute"].endswith(":00Z")
    assert abs(minutes[-1] - utcnow()) < dt.timedelta(minutes=1), "ends with the current minute"
    by_minute = {m: (e["sent"], e["failed"]) for m, e in zip(minutes, series, strict=True)}
    assert by_minute[base - dt.timedelta(minutes=5)] == (3, 0)
    assert by_minute[base - dt.timedelta(minutes=12)] == (1, 1)
    assert by_minute[base - dt.timedelta(minutes=30)] == (1, 0)
    assert sum(s for s, _ in by_minute.values()) == 5, "the message sent 90 minutes ago is outside the hour"
    assert sum(f for _, f in by_minute.values()) == 1

    day = await (await client.get("/stats/timeline?minutes=1440")).json()
    assert len(day) == 1440 and sum(m["sent"] for m in day) == 6
    assert len(await (await client.get("/stats/timeline?minutes=1")).json()) == 1


@pytest.mark.parametrize("value", ["0", "1441", "-1", "abc", "1.5", "", "%2B5"])
async def test_timeline_rejects_a_bad_window(client: Client, value: str) -> None:
    error = await error_of(await client.get(f"/stats/timeline?minutes={value}"), 422, value)
    assert error["details"]["field"] == "minutes"
    assert error["message"] == "minutes: must be an integer between 1 and 1440"


async def test_failed_lists_failed_messages_newest_first_with_their_reason(client: Client, store: MessageStore) -> None:
    await send(store, 2)
    first, second = await fail(store), await fail(store)
    await store.create("+905550000001", "pending")

    rows = await (await client.get("/stats/failed")).json()
    assert [r["id"] for r in rows] == [second, first]
    assert set(rows[0]) == {"id", "recipient", "content", "last_error", "attempts", "updated_at"}
    assert (rows[0]["recipient"], rows[0]["last_error"], rows[0]["attempts"]) == ("+905551234567", "HTTP 400", 2)
    assert [r["id"] for r in await (await client.get("/stats/failed?limit=1&offset=1")).json()] == [first]
    assert await (await client.get("/stats/failed?offset=2")).json() == []
    for query, field in (("limit=0", "limit"), ("limit=101", "limit"), ("offset=-1", "offset")):
        assert (await error_of(await client.get(f"/stats/failed?{query}"), 422, query))["details"]["field"] == field


async def test_page_is_server_rendered_with_its_own_assets(client: Client, store: MessageStore) -> None:
    await send(store, 3)
    await fail(store)
    resp = await client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"], "nothing may load from elsewhere"
    assert re.search(r'data-stat="counts.sent">3<', page) and re.search(r'data-stat="counts.failed">1<', page)
    assert 'aria-checked="true"' in page and "$" not in page, "every placeholder filled"
    assert await (await client.get("/dashboard")).text() == page
    for url in re.findall(r'(?:href|src)="(/[^"]+)"', page):
        asset = await client.get(url)
        assert asset.status == 200, url
        assert asset.content_type in {"text/css", "text/javascript", "text/html"}, url
        if "ETag" in asset.headers:  # the browser revalidates instead of downloading it again
            again = await client.get(url, headers={"If-None-Match": asset.headers["ETag"]})
            assert again.status == 304, url
    assert not re.search(r'(?:href|src)="(?!/|data:)', page), "no external asset"


# --- the page in Chromium ----------------------------------------------------------------------------


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if async_playwright is None:
        pytest.skip("the playwright package is not installed (pip install -e '.[test]')")
    if not CHROMIUM:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def serve(settings: Settings) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Start the gateway on a free port: ``url = await serve(api_token=Secret("x"))``."""
    runners: list[web.AppRunner] = []

    async def start(**overrides: Any) -> str:
        runner = web.AppRunner(create_app(dataclasses.replace(settings, **overrides)), access_log=None)
        runners.append(runner)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()


@dataclasses.dataclass
class Tab:
    """A page of the dashboard with what it did: console errors, uncaught exceptions, every request."""

    page: Page
    url: str
    errors: list[str] = dataclasses.field(default_factory=list)
    requests: list[str] = dataclasses.field(default_factory=list)

    def stat(self, name: str) -> Any:
        return self.page.locator(f'[data-stat="{name}"]')

    async def number(self, name: str) -> int:
        return int(re.sub(r"\D", "", await self.stat(name).inner_text()))

    async def loaded(self) -> Tab:
        await expect(self.page.locator("#updated")).to_contain_text("Updated", timeout=WAIT_MS)
        return self

    def assert_clean(self) -> None:
        assert not self.errors, self.errors
        assert self.requests, "the page made requests"
        away = [u for u in self.requests if urlsplit(u).scheme != "data" and urlsplit(u).hostname not in LOCAL]
        assert not away, f"requests left localhost: {away}"


async def open_tab(browser: Browser, url: str, viewport: dict[str, int] = DESKTOP, wait: bool = True) -> Tab:
    context = await browser.new_context(viewport=viewport)
    page = await context.new_page()
    tab = Tab(page, url)
    page.on("console", lambda m: tab.errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: tab.errors.append(f"page error: {e}"))
    page.on("request", lambda r: tab.requests.append(r.url))

    async def only_local(route: Any) -> None:  # and in case something tries anyway, it gets nowhere
        if urlsplit(route.request.url).hostname in LOCAL:
            await route.continue_()
        else:
            await route.abort()

    await context.route("**/*", only_local)
    await page.goto(url)
    return await tab.loaded() if wait else tab


async def db_counts(settings: Settings) -> dict[str, int]:
    rows = await sql(settings, "SELECT status, COUNT(*) FROM messages GROUP BY status")
    counts = dict.fromkeys(("pending", "queued", "sending", "sent", "failed", "cancelled"), 0)
    counts.update({str(status): int(str(n)) for status, n in rows})
    return counts


async def api(url: str, path: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url + path) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_page_shows_what_the_database_holds(
    browser: Browser, serve: Callable[..., Awaitable[str]], store: MessageStore, settings: Settings
) -> None:
    sent = await send(store, 23)
    failed = [await fail(store), await fail(store)]
    for i in range(4):
        await store.create(f"+9055577{i:05d}", f"waiting {i}")
    url = await serve()
    tab = await open_tab(browser, url + "/")
    page = tab.page

    assert await page.title() == "message-sender · dashboard"
    expected = await db_counts(settings)
    assert expected == {"pending": 4, "queued": 0, "sending": 0, "sent": 23, "failed": 2, "cancelled": 0}
    assert {name: await tab.number(f"counts.{name}") for name in expected} == expected
    await expect(page.get_by_role("switch", name="Automatic sending")).to_have_attribute("aria-checked", "true")

    # The newest sent messages, masked by the server but for the last four digits, ten to a page.
    rows = page.locator("#sent-table tbody tr")
    await expect(rows).to_have_count(10)
    newest = await store.get(sent[-1])
    assert newest is not None
    first = rows.first.locator("td")
    recipient = await first.nth(0).inner_text()
    assert recipient.endswith(newest["recipient"][-4:]) and newest["recipient"][1:-4] not in recipient
    assert re.fullmatch(r"\+•+\d{4}", recipient), recipient
    assert await first.nth(1).inner_text() == newest["content"]
    assert await first.nth(3).inner_text() == newest["remote_message_id"]
    await expect(page.get_by_role("navigation", name="Pages of sent messages")).to_contain_text("1\u201310 of 23")
    await page.get_by_role("navigation", name="Pages of sent messages").get_by_role("button", name="Older").click()
    listed = [r["id"] for r in await api(url, "/messages?limit=10&offset=10")]
    await expect(rows.first).to_have_attribute("data-id", str(listed[0]))
    await expect(page.get_by_role("navigation", name="Pages of sent messages")).to_contain_text("11\u201320 of 23")

    # Failed messages with their reason and a retry button each.
    failed_rows = page.locator("#failed-table tbody tr")
    await expect(failed_rows).to_have_count(2)
    await expect(failed_rows.first).to_contain_text("HTTP 400")
    for message_id in failed:
        await expect(page.get_by_role("button", name=f"Retry message {message_id}")).to_be_visible()

    # The plot: one bar group per minute of the last hour, described for screen readers.
    chart = page.get_by_role("img", name=re.compile(r"^23 sent and 2 failed in the last 60 minutes"))
    await expect(chart).to_be_visible()
    assert await chart.locator("g.minute").count() == 60

    # It refreshes by itself, without reloading.
    await store.create("+905557700099", "one more")
    await expect(tab.stat("counts.pending")).to_have_text("5", timeout=WAIT_MS)
    tab.assert_clean()


async def test_switch_stops_and_starts_sending(
    browser: Browser, serve: Callable[..., Awaitable[str]], store: MessageStore
) -> None:
    url = await serve()
    tab = await open_tab(browser, url + "/dashboard")
    switch = tab.page.get_by_role("switch", name="Automatic sending")
    await expect(switch).to_have_attribute("aria-checked", "true")

    await switch.click()
    await expect(switch).to_have_attribute("aria-checked", "false")
    await expect(switch).to_have_text("Off")
    assert await api(url, "/process_message") == {"sending": "stopped"}
    assert (await api(url, "/stats"))["sending"] is False
    assert await store.is_sending() is False

    await tab.page.reload()  # the stopped state is persisted, and rendered by the server
    await tab.loaded()
    await expect(switch).to_have_attribute("aria-checked", "false")
    await switch.click()
    await expect(switch).to_have_attribute("aria-checked", "true")
    assert await api(url, "/process_message") == {"sending": "started"}
    tab.assert_clean()


async def test_retry_puts_a_failed_message_back_to_pending(
    browser: Browser, serve: Callable[..., Awaitable[str]], store: MessageStore
) -> None:
    keep, retried = await fail(store), await fail(store)
    url = await serve()
    tab = await open_tab(browser, url + "/")

    await tab.page.get_by_role("button", name=f"Retry message {retried}").click()
    await expect(tab.page.locator("#notice")).to_contain_text(f"Message {retried} is pending again")
    row = await store.get(retried)
    assert row is not None and (row["status"], row["attempts"]) == ("pending", 0)
    assert (await api(url, f"/messages/{retried}"))["status"] == "pending"
    await expect(tab.page.locator("#failed-table tbody tr")).to_have_count(1)
    await expect(tab.page.locator("#failed-table tbody tr")).to_have_attribute("data-id", str(keep))
    await expect(tab.stat("counts.failed")).to_have_text("1", timeout=WAIT_MS)
    tab.assert_clean()


async def test_cancel_button_on_waiting_messages_and_the_new_counts(
    browser: Browser, serve: Callable[..., Awaitable[str]], store: MessageStore
) -> None:
    """Not-yet-claimed messages are listed with a Cancel button; cancelling one moves it to the Cancelled
    tile; a scheduled one counts as Scheduled."""
    await store.set_sending(False)
    keep = await store.create("+905551234501", "stays")
    later = (
        await store.create_messages([NewMessage("+905551234502", "later", utcnow() + dt.timedelta(hours=2), "high")])
    ).ids[0]
    url = await serve()
    tab = await open_tab(browser, url + "/")
    page = tab.page
    rows = page.locator("#waiting-table tbody tr")
    await expect(rows).to_have_count(2)
    await expect(rows.first).to_have_attribute("data-id", str(later))
    await expect(rows.first).to_contain_text("high")
    await expect(tab.stat("scheduled")).to_have_text("1", timeout=WAIT_MS)
    await expect(tab.stat("counts.cancelled")).to_have_text("0")

    await page.get_by_role("button", name=f"Cancel message {later}").click()
    await expect(page.locator("#notice")).to_contain_text(f"Message {later} is cancelled")
    assert (await api(url, f"/messages/{later}"))["status"] == "cancelled"
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-id", str(keep))
    await expect(tab.stat("counts.cancelled")).to_have_text("1", timeout=WAIT_MS)
    await expect(tab.stat("scheduled")).to_have_text("0", timeout=WAIT_MS)
    tab.assert_clean()


async def test_with_an_api_token_the_page_asks_once_and_refuses_a_wrong_one(
    browser: Browser, serve: Callable[..., Awaitable[str]], store: MessageStore
) -> None:
    failed = await fail(store)
    url = await serve(api_token=Secret(TOKEN))
    tab = await open_tab(browser, url + "/", wait=False)  # the page itself is open...
    page = tab.page
    switch = page.get_by_role("switch", name="Automatic sending")
    dialog = page.get_by_role("dialog", name="API token needed")
    token = page.get_by_role("textbox", name="API token")

    await expect(dialog).to_be_visible()  # ...its lists of messages are not: one question for all of them
    await token.fill("not-the-token")
    await page.get_by_role("button", name="Use token").click()
    await expect(dialog.get_by_role("alert")).to_contain_text("Wrong token")
    await expect(switch).to_have_attribute("aria-checked", "true")

    await token.fill(TOKEN)
    await page.get_by_role("button", name="Use token").click()
    await expect(dialog).to_be_hidden()
    await tab.loaded()
    await expect(page.locator("#failed-table tbody tr")).to_have_attribute("data-id", str(failed))

    # The token is kept for this tab: the switch and retry do not ask again.
    await switch.click()
    await expect(switch).to_have_attribute("aria-checked", "false")
    assert await api(url, "/process_message") == {"sending": "stopped"}
    await page.get_by_role("button", name=f"Retry message {failed}").click()
    await expect(page.locator("#notice")).to_contain_text(f"Message {failed} is pending again")
    assert not await dialog.is_visible()
    row = await store.get(failed)
    assert row is not None and row["status"] == "pending"

    # ...and for this tab only: another one asks; cancelled, it shows no message and changes nothing.
    other = await open_tab(browser, url + "/", wait=False)
    other_dialog = other.page.get_by_role("dialog", name="API token needed")
    await expect(other_dialog).to_be_visible()
    await other.page.get_by_role("button", name="Cancel").click()
    await other.loaded()
    await expect(other.page.locator("#sent-table tbody")).to_contain_text("Needs the API token")
    await other.page.get_by_role("switch", name="Automatic sending").click()
    await expect(other_dialog).to_be_visible()
    await other.page.get_by_role("button", name="Cancel").click()
    await expect(other.page.locator("#notice")).to_contain_text("Nothing changed")
    assert await store.is_sending() is False
    # The refused requests show as failed loads in the console; nothing else may.
    for t in (tab, other):
        t.errors = [e for e in t.errors if not re.search(r"status of 40[13]", e)]
        t.assert_clean()


async def test_readable_on_a_phone_with_named_controls(
    browser: Browser, serve: Callable[..., Awaitable[str]], store: MessageStore
) -> None:
    await send(store, 12)
    await fail(store)
    url = await serve()
    tab = await open_tab(browser, url + "/", PHONE)
    page = tab.page
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page scrolls sideways on a phone ({width}px)"
    for control in (
        page.get_by_role("switch", name="Automatic sending"),
        page.get_by_role("button", name=re.compile(r"^Retry message \d+$")),
        page.get_by_role("button", name="Older"),
    ):
        await control.scroll_into_view_if_needed()
        box = await control.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"] and box["height"] >= 32
    unnamed = await page.evaluate(
        """[...document.querySelectorAll("button, input")]
           .filter(e => !(e.getAttribute("aria-label") || e.getAttribute("aria-labelledby")
                          || e.textContent.trim() || (e.labels && e.labels.length)))
           .map(e => e.outerHTML)"""
    )
    assert unnamed == []
    tab.assert_clean()


async def test_demo_run_screenshots(
    browser: Browser,
    serve: Callable[..., Awaitable[str]],
    cluster: Cluster,
    standin: StandIn,
    store: MessageStore,
    settings: Settings,
) -> None:
    """A short demo run (producer, consumer, the stand-in refusing two messages for good), then the page
    as a person would see it, saved as test-artifacts/dashboard/{desktop,phone}.png."""
    await standin.behave(delay_ms=40, script=[{"status": 202}] * 8 + [{"status": 400}] * 2)
    await store.create_many((f"+90555{1234000 + i:07d}", f"Demo message {i + 1}") for i in range(42))
    cluster.start("producer", SEND_BATCH_SIZE="3", SEND_INTERVAL_SECONDS="0.5")
    cluster.start("consumer")
    url = await serve()

    async def progressed() -> bool:
        counts = await db_counts(settings)
        return counts["sent"] >= 30 and counts["failed"] == 2

    await wait_for(progressed, 90, "a few dozen sent and two failed")
    SHOTS.mkdir(parents=True, exist_ok=True)
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        tab = await open_tab(browser, url + "/", viewport)
        await expect(tab.page.locator("#failed-table tbody tr")).to_have_count(2)
        assert await tab.number("counts.sent") >= 30
        png = await tab.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
        assert len(png) > 10_000
        tab.assert_clean()
