"""Secure by default: only JSON bodies, no state change from another site, security headers on every answer,
a Swagger UI that shows nothing but the gateway's own API, and a warning when the gateway is exposed.

The browser tests drive Debian's Chromium (as in test_dashboard.py) against a real gateway on a free port."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from common.settings import Secret, Settings
from common.store import MessageStore
from gateway.__main__ import exposure_warning
from tests.conftest import sql
from tests.procs import ARTIFACTS, wait_for
from tests.test_dashboard import LOCAL, Browser, browser, expect, serve  # noqa: F401 (fixtures)
from tests.test_gateway import TOKEN, Client, error_of, fail

JSON = "application/json"
MESSAGE = b'{"recipient": "+905551111111", "content": "from elsewhere"}'
BODY_ENDPOINTS = [("/messages", MESSAGE), ("/process_message", b'{"command": "stop"}')]
NOT_JSON = [
    "text/plain",
    "text/plain;charset=UTF-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "application/json; charset=latin-1",
    "application/jsonx",
    None,  # no Content-Type at all
]


@pytest.fixture
async def client(settings: Settings, store: MessageStore, aiohttp_client: Any) -> Client:
    return await aiohttp_client(create_app_for(settings))


def create_app_for(settings: Settings, **overrides: Any) -> web.Application:
    from gateway.app import create_app

    return create_app(dataclasses.replace(settings, **overrides))


async def post_raw(client: Client, path: str, body: bytes, content_type: str | None, **headers: str) -> Any:
    if content_type is None:
        return await client.post(path, data=body, headers=headers, skip_auto_headers={"Content-Type"})
    return await client.post(path, data=body, headers={"Content-Type": content_type, **headers})


# --- JSON means JSON ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body"), BODY_ENDPOINTS)
async def test_a_body_that_is_not_declared_json_is_415(
    client: Client, store: MessageStore, settings: Settings, path: str, body: bytes
) -> None:
    for content_type in NOT_JSON:
        resp = await post_raw(client, path, body, content_type)
        error = await error_of(resp, 415, content_type)
        assert error["code"] == "unsupported_media_type"
        assert "application/json" in error["message"] and error["details"]["accepted"][0] == JSON
    assert await sql(settings, "SELECT COUNT(*) FROM messages") == [(0,)], "nothing was created"
    assert await store.is_sending() is True, "nothing was switched"


async def test_json_with_or_without_charset_is_accepted(client: Client, store: MessageStore) -> None:
    for content_type in (JSON, "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"):
        assert (await post_raw(client, "/messages", MESSAGE, content_type)).status == 201, content_type
    resp = await post_raw(client, "/process_message", b'{"command": "stop"}', "application/json; charset=utf-8")
    assert (resp.status, await resp.json()) == (200, {"sending": "stopped"})
    # A command in the query string needs no body at all (curl -X POST '...?command=start').
    resp = await post_raw(client, "/process_message?command=start", b"", None)
    assert (resp.status, await resp.json()) == (200, {"sending": "started"})


async def test_the_415_is_documented_on_every_operation_with_a_body(client: Client) -> None:
    spec = await (await client.get("/swagger/swagger.json")).json()
    with_body = [
        (method, path, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if any(p["in"] == "body" for p in op.get("parameters", []))
    ]
    assert {(m, p) for m, p, _ in with_body} == {
        ("post", "/messages"),
        ("post", "/messages/batch"),
        ("post", "/process_message"),
    }
    assert all("415" in op["responses"] for _, _, op in with_body)


# --- no state change from another site -------------------------------------------------------------


FOREIGN = [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}, {"Origin": "http://evil.example"}]


async def test_a_browser_on_another_site_changes_nothing(
    client: Client, store: MessageStore, settings: Settings
) -> None:
    failed = await fail(store)
    for headers in FOREIGN:
        calls = [
            client.post("/messages", data=MESSAGE, headers={"Content-Type": JSON, **headers}),
            client.post(f"/messages/{failed}/retry", headers=headers),
            client.post("/process_message?command=stop", headers=headers),
            client.get("/process_message?command=stop", headers=headers),  # an <img src=...>
        ]
        for call in calls:
            error = await error_of(await call, 403, headers)
            assert error["code"] == "cross_origin", error
    assert await store.is_sending() is True
    assert await sql(settings, "SELECT COUNT(*), MIN(status) FROM messages") == [(1, "failed")]
    # Its own pages (same-origin), a typed address (none) and clients that are not browsers still work.
    for headers in ({"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {}):
        assert (await client.get("/process_message?command=stop", headers=headers)).status == 200, headers
    origin = f"http://{client.server.host}:{client.server.port}"
    resp = await client.post("/messages", data=MESSAGE, headers={"Content-Type": JSON, "Origin": origin})
    assert resp.status == 201
    assert (await client.get("/messages", headers={"Sec-Fetch-Site": "cross-site"})).status == 200, "reads: CORS"


# --- headers -----------------------------------------------------------------------------------------


async def test_every_answer_carries_the_security_headers(client: Client) -> None:
    answers = [
        await client.get("/messages"),
        await client.get("/healthz"),
        await client.get("/metrics"),
        await client.get("/nope"),
        await client.delete("/messages"),
        await post_raw(client, "/messages", MESSAGE, "text/plain"),
        await client.get("/swagger/index.html"),
        await client.get("/swagger/init.js"),
        await client.get("/swagger/static/swagger-ui.css"),
        await client.get("/swagger/swagger.json"),
        await client.get("/"),
        await client.get("/dashboard/dashboard.js"),
    ]
    for resp in answers:
        where = f"{resp.method} {resp.url.path} {resp.status}"
        assert resp.headers["X-Content-Type-Options"] == "nosniff", where
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"], where
        assert resp.headers["Referrer-Policy"] == "no-referrer", where


async def test_the_docs_pages_have_a_strict_content_security_policy(client: Client) -> None:
    for path in ("/swagger/index.html", "/swagger/init.js"):
        policy = (await client.get(path)).headers["Content-Security-Policy"]
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        assert directives["connect-src"] == "'self'" and directives["script-src"] == "'self'", policy
        assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'", policy


# --- exposure ----------------------------------------------------------------------------------------


def test_an_exposed_gateway_without_a_token_warns_naming_the_risk_and_the_fix() -> None:
    exposed = Settings.from_env({"GATEWAY_HOST": "0.0.0.0"}, dotenv=None)
    warning = exposure_warning(exposed)
    assert warning is not None
    assert "0.0.0.0" in warning and "reads every recipient" in warning
    assert "API_TOKEN" in warning and "GATEWAY_HOST=127.0.0.1" in warning and "GATEWAY_BIND" in warning
    assert exposure_warning(dataclasses.replace(exposed, api_token=Secret("x" * 16))) is None
    assert exposure_warning(Settings.from_env({}, dotenv=None)) is None, "loopback by default: nothing to warn of"
    assert exposure_warning(Settings.from_env({"GATEWAY_HOST": "::1"}, dotenv=None)) is None


# --- in Chromium -------------------------------------------------------------------------------------


@pytest.fixture
async def elsewhere() -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    """Another origin (``localhost`` on another port) serving one page of HTML, as an attacker's site would."""
    runners: list[web.AppRunner] = []

    async def start(html: str) -> str:
        app = web.Application()
        spec = {"swagger": "2.0", "info": {"title": "EVIL phishing API", "version": "6.6.6"}, "paths": {}}

        async def page(_: web.Request) -> web.Response:
            return web.Response(text=html, content_type="text/html")

        async def foreign_spec(_: web.Request) -> web.Response:
            return web.json_response(spec, headers={"Access-Control-Allow-Origin": "*"})

        app.router.add_get("/", page)
        app.router.add_get("/spec.json", foreign_spec)
        runner = web.AppRunner(app, access_log=None)
        runners.append(runner)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://localhost:{runner.addresses[0][1]}"  # another host name than the gateway's: another site

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_swagger_ui_shows_only_the_gateways_own_api(
    browser: Browser,  # noqa: F811
    serve: Callable[..., Awaitable[str]],  # noqa: F811
    elsewhere: Callable[[str], Awaitable[str]],
) -> None:
    url = await serve()
    evil = await elsewhere("")
    context = await browser.new_context()
    page = await context.new_page()
    problems: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    await page.goto(f"{url}/swagger/index.html?url={evil}/spec.json&configUrl={evil}/spec.json#/")
    await expect(page.locator(".info .title")).to_contain_text("message-sender gateway", timeout=15_000)
    await expect(page.locator(".opblock-summary-path").first).to_be_visible()
    assert "/process_message" in await page.locator("#swagger-ui").inner_text()
    assert "EVIL" not in await page.content()
    await expect(page.get_by_role("button", name="Authorize")).to_be_visible()  # where the token goes
    # "Try it out" still works under the page's Content-Security-Policy (connect-src 'self').
    await page.locator("#operations-operations-get_healthz .opblock-summary").click()
    await page.get_by_role("button", name="Try it out").click()
    await page.get_by_role("button", name="Execute").click()
    await expect(page.locator("#operations-operations-get_healthz .live-responses-table")).to_contain_text(
        '"status": "ok"'
    )
    await page.screenshot(path=str(ARTIFACTS / "swagger-ui.png"), full_page=False)
    assert not [u for u in requests if urlsplit(u).port != urlsplit(url).port], "nothing asked of another origin"
    assert not [p for p in problems if "Content Security Policy" in p or "Refused" in p], problems
    await context.close()


async def test_a_page_elsewhere_cannot_create_stop_or_retry(
    browser: Browser,  # noqa: F811
    serve: Callable[..., Awaitable[str]],  # noqa: F811
    elsewhere: Callable[[str], Awaitable[str]],
    store: MessageStore,
    settings: Settings,
) -> None:
    """The attacks of the issue, from a real browser on a token-less gateway: a text/plain form post and a
    no-cors fetch (both "simple requests": no preflight), a retry, and an <img> that stops sending."""
    failed = await fail(store)
    url = await serve()
    evil = await elsewhere(
        f"""<!DOCTYPE html><html><body>
        <form id="f" method="POST" action="{url}/messages" enctype="text/plain" target="sink">
          <input name='{{"recipient": "+905551111111", "content": "x", "pad": "' value='"}}'>
        </form>
        <iframe name="sink"></iframe>
        <img src="{url}/process_message?command=stop">
        <script>
          fetch("{url}/messages", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}},
                body: JSON.stringify({{recipient: "+905551111111", content: "y"}})}});
          fetch("{url}/messages/{failed}/retry", {{method: "POST", mode: "no-cors"}});
          fetch("{url}/process_message?command=stop", {{method: "POST", mode: "no-cors"}});
          document.getElementById("f").submit();
        </script></body></html>"""
    )
    context = await browser.new_context()
    page = await context.new_page()
    settled: list[str] = []  # the browser's own answers are opaque (CORS) or blocked (CORP): count them settled
    for event in ("requestfinished", "requestfailed"):
        page.on(event, lambda r: settled.append(r.url) if r.url.startswith(url) else None)
    await page.goto(evil + "/")

    async def all_settled() -> bool:
        return len(settled) >= 5

    await wait_for(all_settled, 15, "the five requests of the page to the gateway", interval=0.1)
    await context.close()
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        metrics = await resp.text()
    answered = re.findall(
        r'^gateway_http_requests_total\{method="(\w+)",route="([^"]+)",status="(\d+)"\} ', metrics, re.M
    )
    assert {(m, r) for m, r, status in answered if status == "403"} == {
        ("POST", "/messages"),
        ("POST", "/messages/{id}/retry"),
        ("POST", "/process_message"),
        ("GET", "/process_message"),
    }, answered
    assert not [a for a in answered if a[2].startswith("2")], answered
    assert await store.is_sending() is True
    assert await sql(settings, "SELECT COUNT(*), MIN(status) FROM messages") == [(1, "failed")]


async def test_with_a_token_the_dashboard_asks_once_and_gets_masked_rows_from_the_server(
    browser: Browser,  # noqa: F811
    serve: Callable[..., Awaitable[str]],  # noqa: F811
    store: MessageStore,
) -> None:
    failed = await fail(store)
    url = await serve(api_token=Secret(TOKEN))
    context = await browser.new_context()
    page = await context.new_page()
    bodies: list[str] = []

    async def keep(response: Any) -> None:
        if "/messages" in response.url or "/stats/failed" in response.url:
            bodies.append(await response.text())

    page.on("response", keep)
    await page.goto(url + "/")
    dialog = page.get_by_role("dialog", name="API token needed")
    await expect(dialog).to_be_visible()  # the lists need the token: asked once for all of them
    await page.get_by_role("textbox", name="API token").fill(TOKEN)
    await page.get_by_role("button", name="Use token").click()
    await expect(dialog).to_be_hidden()
    row = page.locator("#failed-table tbody tr").first
    await expect(row).to_have_attribute("data-id", str(failed))
    assert re.fullmatch(r"\+•+4567", await row.locator("td").first.inner_text())
    await page.get_by_role("button", name=f"Retry message {failed}").click()  # no second question
    await expect(page.locator("#notice")).to_contain_text(f"Message {failed} is pending again")
    assert not await dialog.is_visible()
    assert bodies and not [b for b in bodies if "+905551234567" in b], "the full number never reached the page"
    await context.close()
