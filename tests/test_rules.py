"""Pure rules that need no services: the redelivery decision, backoff, Retry-After, batching, bodies."""

import asyncio
import datetime as dt
import random

import pytest

from common.batching import Batcher
from common.errors import ValidationError
from common.models import Action, decide, validate_content, validate_recipient
from consumer.policy import backoff_seconds, is_retryable_status, next_attempt_delay, parse_retry_after
from consumer.service import parse_body


@pytest.mark.parametrize(
    ("status", "redelivered", "at_least_once", "action"),
    [
        ("queued", False, False, Action.DROP),  # still queued but not won by this delivery
        ("sending", False, False, Action.DROP),  # someone else is sending it right now
        ("sending", True, False, Action.FAIL_UNKNOWN),  # its consumer died mid-request
        ("sending", True, True, Action.SEND),
        ("sent", True, True, Action.DROP),
        ("failed", False, False, Action.DROP),
        ("pending", False, False, Action.DROP),
        (None, False, False, Action.DROP),
    ],
)
def test_decide(status: str | None, redelivered: bool, at_least_once: bool, action: Action) -> None:
    assert decide(status, redelivered, at_least_once) is action


def test_a_redelivery_waits_out_the_lease_of_a_delivery_that_may_still_be_in_flight() -> None:
    assert decide("sending", True, False, sending_for=3, lease=10) is Action.WAIT
    assert decide("sending", True, False, sending_for=11, lease=10) is Action.FAIL_UNKNOWN
    assert decide("sending", True, True, sending_for=11, lease=10) is Action.SEND
    assert decide("sending", False, False, sending_for=3, lease=10) is Action.DROP


def test_the_winner_of_the_compare_and_set_sends() -> None:
    assert decide("sending", False, False, won=True) is Action.SEND
    assert decide("sending", True, False, won=True) is Action.SEND


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    rng = random.Random(7)
    for attempt in range(1, 8):
        value = backoff_seconds(attempt, 2.0, rng)
        assert 2.0 * 2 ** (attempt - 1) * 0.5 <= value <= 2.0 * 2 ** (attempt - 1)
    assert backoff_seconds(50, 2.0) <= 3600


def test_retry_after_forms() -> None:
    now = dt.datetime(2026, 11, 29, 8, 0, 0)
    assert parse_retry_after("7", now) == 7
    assert parse_retry_after("Sun, 29 Nov 2026 08:00:30 GMT", now) == 30
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None
    assert next_attempt_delay(1, 0.1, 30) == 30


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (503, True), (408, True), (429, True), (400, False), (401, False), (404, False), (422, False)],
)
def test_retryable_statuses(status: int, retryable: bool) -> None:
    assert is_retryable_status(status) is retryable


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"id": 5}', [5]),
        (b'{"ids": [5, 6]}', [5, 6]),
        (b'{"ids": []}', None),
        (b'{"ids": [1, "x"]}', None),
        (b'{"ids": 5}', None),
        (b"not json", None),
        (b'{"id": "5"}', None),
        (b'{"id": -1}', None),
        (b"[5]", None),
        (b'{"id": true}', None),
    ],
)
def test_parse_body(body: bytes, expected: list[int] | None) -> None:
    assert parse_body(body) == expected


def test_validation() -> None:
    assert validate_recipient("+905551111111") == "+905551111111"
    for bad in (
        "905551111111",
        "+1234567",
        "+1234567890123456",
        "+90 555",
        5,
        "+905551111111\n",
        "+90555\u0661\u0661\u0661\u0661\u0661\u0661\u0661",
    ):
        with pytest.raises(ValidationError):
            validate_recipient(bad)
    for bad in ("", "   ", "x" * 161, None):
        with pytest.raises(ValidationError):
            validate_content(bad)
    assert validate_content("ğ" * 160)


async def test_batcher_groups_concurrent_submits_and_keeps_order() -> None:
    sizes: list[int] = []

    async def flush(items: list[int]) -> list[int]:
        sizes.append(len(items))
        await asyncio.sleep(0.01)
        return [i * 2 for i in items]

    batcher: Batcher[int, int] = Batcher(flush, max_size=50, max_concurrent=1)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(120)))
    assert results == [i * 2 for i in range(120)]
    assert len(sizes) <= 4 and max(sizes) == 50


async def test_batcher_failure_reaches_every_caller_of_that_flush() -> None:
    async def flush(items: list[int]) -> list[int]:
        raise RuntimeError("down")

    batcher: Batcher[int, int] = Batcher(flush)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
