"""Property-based conformance: schemathesis generates requests from the served Swagger spec and checks
that no answer is a 5xx and every answer matches what the spec documents (status, content type, schema)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import re
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import hypothesis
import hypothesis.errors
import pytest
import requests
import schemathesis
from aiohttp import web
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from common.db import create_pool
from common.migrations import migrate
from common.settings import Secret, Settings
from common.store import MessageStore
from gateway.app import create_app
from tests.test_gateway import fail, send

T = TypeVar("T")
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
TOKEN = "schemathesis-token-3d8f1b"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]
EXAMPLES = hypothesis.settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same cases every run: a failure here is a bug, never bad luck
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)


class LiveGateway:
    """The gateway on a free port, its event loop in a thread (schemathesis calls it with requests)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-gateway", daemon=True)
        self.runner = web.AppRunner(create_app(settings), access_log=None)
        self.url = ""

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def start(self) -> None:
        self.thread.start()
        self.run(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.run(site.start())
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        deadline = time.monotonic() + 20
        while requests.get(f"{self.url}/readyz", timeout=5).status_code != 200:  # RabbitMQ connects in the background
            assert time.monotonic() < deadline, "the gateway did not become ready"
            time.sleep(0.1)

    def stop(self) -> None:
        self.run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@contextlib.contextmanager
def live_gateway(settings: Settings) -> Iterator[LiveGateway]:
    gateway = LiveGateway(settings)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


async def seed(settings: Settings) -> dict[str, int]:
    """Some sent messages, a failed and a pending one, so lists and details have rows to check against the
    schema (and a cancel has something to cancel)."""
    pool = await create_pool(settings)
    try:
        await migrate(pool)
        store = MessageStore(pool)
        sent = await send(store, 25)
        failed = await fail(store)
        pending = await store.create("+905551234500", "to cancel")
        return {"sent": sent[0], "failed": failed, "pending": pending}
    finally:
        pool.close()
        await pool.wait_closed()


@pytest.mark.parametrize("token", [TOKEN, None], ids=["with-token", "without-token"])
def test_every_operation_conforms_to_the_served_spec(settings: Settings, token: str | None) -> None:
    settings = dataclasses.replace(settings, api_token=Secret(token or ""))
    ids = asyncio.run(seed(settings))
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    failures: list[str] = []
    with live_gateway(settings) as gateway, requests.Session() as session:
        before = answered_statuses(session.get(f"{gateway.url}/metrics", timeout=5).text)
        schema = schemathesis.openapi.from_url(f"{gateway.url}/swagger/swagger.json")
        # The API ignores parameters and body fields it does not know (so they are not "invalid" input),
        # and the token (when the gateway has one) is sent with every request (auth itself is tested in
        # test_gateway.py and test_security.py).
        schema.config.generation.update(allow_extra_parameters=False, with_security_parameters=False)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 14

        for operation in operations:
            fixed: list[dict[str, Any]] = [{}]
            if "{id}" in operation.path:  # also hit existing rows, not only random (missing) ids
                fixed += [{"path_parameters": {"id": ids[k]}} for k in ("sent", "failed", "pending")]
            runs = [(POSITIVE, overrides) for overrides in fixed] + [(NEGATIVE, {})]
            for mode, overrides in runs:
                strategy = operation.as_strategy(generation_mode=mode, **overrides)

                @EXAMPLES
                @hypothesis.given(case=strategy)
                def check(case: schemathesis.Case) -> None:
                    case.call_and_validate(base_url=gateway.url, session=session, headers=auth, checks=CHECKS)

                try:
                    check()
                except hypothesis.errors.Unsatisfiable:
                    assert mode is NEGATIVE, operation.label  # no parameters: nothing invalid to send
                except (Exception, BaseExceptionGroup) as exc:  # collect every failure, report them together
                    failures.append(f"{operation.label} ({mode.value}, {overrides or 'generated'}): {exc}")
        answered = answered_statuses(session.get(f"{gateway.url}/metrics", timeout=5).text) - before
    assert not failures, "\n\n".join(failures)
    # The run really exercised the API: many requests, successes and each kind of rejection, no 5xx.
    assert sum(answered.values()) > 300, answered
    assert {"200", "201", "400", "404", "409", "422"} <= set(answered), answered
    assert not [status for status in answered if status.startswith("5")], answered


def answered_statuses(metrics: str) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for match in re.finditer(r'^gateway_http_requests_total\{.*status="(\d+)"\} ([0-9.]+)$', metrics, re.M):
        counts[match.group(1)] += int(float(match.group(2)))
    return counts
