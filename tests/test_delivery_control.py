"""Delivery control (issue 16), black-box on the real services and the stand-in: signed requests verified by the
reference ``standardwebhooks`` package, one rate limit shared by every consumer, a pause for a ``Retry-After``
seen by any consumer, and a circuit breaker shared through Redis."""

from __future__ import annotations

import base64
import os
import time

import pytest
from standardwebhooks.webhooks import Webhook as Verifier
from standardwebhooks.webhooks import WebhookVerificationError

from common.errors import SettingsError
from common.settings import Settings
from common.store import MessageStore
from consumer.signing import Signer
from tests.chaos_helpers import assert_accounting, insert, start, wait_finished
from tests.procs import Cluster, StandIn


def _secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


async def test_every_request_is_signed_for_each_secret_of_a_rotation(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    """Two secrets (a rotation): each request verifies with either one; webhook-id is the same on a retry;
    a tampered body or an old timestamp is rejected by the reference verifier."""
    old, new = _secret(), _secret()
    ids = await insert(store, 6)
    await standin.behave(script=[{"status": 500}])  # the first request fails: one message is sent twice
    start(cluster, "consumer", WEBHOOK_SIGNING_SECRETS=f"{old} {new}")
    start(cluster, "producer", SEND_BATCH_SIZE=10, SEND_INTERVAL_SECONDS=0.5)
    await wait_finished(settings, 60)
    acc = await assert_accounting(settings, standin)
    assert acc.sent == set(ids)
    received = await standin.received()
    assert len(received) == len(ids) + 1
    for secret in (old, new):
        verifier = Verifier(secret)
        for r in received:
            assert verifier.verify(r["raw"], r["signing"]) == r["body"]
    ids_by_key: dict[str, set[str]] = {}
    for r in received:
        ids_by_key.setdefault(r["key"], set()).add(r["signing"]["webhook-id"])
        assert len(r["signing"]["webhook-signature"].split(" ")) == 2
    assert all(len(v) == 1 for v in ids_by_key.values()), "webhook-id changed between attempts"
    assert len({next(iter(v)) for v in ids_by_key.values()}) == len(ids), "two messages share a webhook-id"

    one = received[0]
    tampered = one["raw"].replace(one["body"]["content"], one["body"]["content"] + "!")
    with pytest.raises(WebhookVerificationError):
        Verifier(new).verify(tampered, one["signing"])
    stale = Signer(Settings.from_env({"WEBHOOK_SIGNING_SECRETS": new}, dotenv=None).signing_keys)
    headers = stale.headers(one["signing"]["webhook-id"], one["raw"].encode(), now=time.time() - 600)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Verifier(new).verify(one["raw"], headers)
    assert Verifier(new).verify(one["raw"], stale.headers(one["signing"]["webhook-id"], one["raw"].encode()))


async def test_unsigned_by_default(store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn) -> None:
    await insert(store, 2)
    start(cluster, "consumer")
    start(cluster, "producer", SEND_BATCH_SIZE=10)
    await wait_finished(settings, 60)
    assert all("signing" not in r for r in await standin.received())


@pytest.mark.parametrize(
    "value", ["plain-s3cr3t", "whsec_not*base64", "whsec_" + base64.b64encode(b"short").decode(), f"{_secret()} oops"]
)
def test_a_malformed_signing_secret_stops_the_start_naming_the_variable_not_the_value(value: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"WEBHOOK_SIGNING_SECRETS": value}, dotenv=None)
    text = str(err.value)
    assert text.startswith("WEBHOOK_SIGNING_SECRETS=*** is invalid") and value not in text
