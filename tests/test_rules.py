"""Pure rules that need no services: the redelivery decision, backoff, Retry-After, batching, bodies."""

import asyncio
import contextvars
import datetime as dt
import random
import traceback

import pymysql
import pytest

from common.batching import Batcher
from common.errors import ValidationError
from common.models import Delivery, is_outcome_unknown, outcome_unknown, validate_content, validate_recipient
from consumer.delivery import Deliveries
from consumer.policy import backoff_seconds, is_retryable_status, next_attempt_delay, parse_retry_after
from consumer.service import parse_body


@pytest.mark.parametrize(
    ("status", "token", "sends"),
    [
        ("sending", 7, True),  # this delivery's compare-and-set moved the row: it sends
        ("sending", 8, False),  # another delivery is sending it (or a crashed one: the lease's sweep settles it)
        ("queued", 7, False),
        ("sent", 7, False),  # a re-run after the outcome commit: never twice
        ("failed", 7, False),
        ("pending", 7, False),  # sending was stopped or the row went back for a retry
    ],
)
def test_only_the_winner_of_the_compare_and_set_sends(status: str, token: int, sends: bool) -> None:
    assert Delivery(1, "+905551111111", "hi", status, 0, token).won_by(7) is sends


def test_outcome_unknown_says_what_happened_and_what_follows() -> None:
    assert outcome_unknown("timeout after the request was written", resent=False) == (
        "outcome unknown: timeout after the request was written; not resent (at-most-once)"
    )
    assert is_outcome_unknown(outcome_unknown("x", resent=True))
    assert not is_outcome_unknown("HTTP 400: bad number") and not is_outcome_unknown(None)
    assert is_outcome_unknown("gave up after 5 attempts; last: outcome unknown: timeout after the request was written")


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
    assert parse_retry_after(" 7 ", now) == 7
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


CALLER: contextvars.ContextVar[int] = contextvars.ContextVar("caller")


async def test_each_flush_runs_in_the_context_of_the_first_caller_it_carries() -> None:
    """So that what a flush traces (the Redis pipeline of a group commit) joins its first message's trace, also
    for a flush started when the previous one ends (from that flush's own task and context)."""
    seen: list[tuple[int, int]] = []

    async def flush(items: list[int]) -> list[int]:
        seen.append((items[0], CALLER.get()))
        await asyncio.sleep(0.01)  # the others arrive meanwhile: the next flush starts from this one's end
        return items

    batcher: Batcher[int, int] = Batcher(flush, max_size=3, max_concurrent=1)

    async def caller(i: int) -> int:
        CALLER.set(i)
        return await batcher.submit(i)

    assert await asyncio.gather(*(caller(i) for i in range(10))) == list(range(10))
    assert [first for first, _ in seen] == [0, 3, 6, 9]
    assert seen == [(first, first) for first, _ in seen]


async def test_batcher_failure_reaches_every_caller_of_that_flush() -> None:
    async def flush(items: list[int]) -> list[int]:
        raise RuntimeError("down")

    batcher: Batcher[int, int] = Batcher(flush)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_a_real_error_after_an_outage_is_raised_as_itself_and_the_outage_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A delivery step's database retry: an outage (here a reset connection, twice) is retried and logged once;
    a real error on a retry is raised as it is, its traceback not chained to the outage that came before."""
    deliveries = Deliveries.__new__(Deliveries)  # the retry needs nothing of a consumer but its outage flag
    deliveries.db_down = False
    errors = iter(
        [
            ConnectionResetError("reset"),
            ConnectionResetError("reset again"),
            pymysql.err.OperationalError(1054, "Unknown column 'x'"),
        ]
    )

    async def work() -> None:
        raise next(errors)

    with pytest.raises(pymysql.err.OperationalError) as caught:
        await deliveries._persist(work, "compare-and-set")  # the first run fails, then _persist_after retries
    text = "".join(traceback.format_exception(caught.value))
    assert "Unknown column" in text and "ConnectionResetError:" not in text and "During handling" not in text
    assert deliveries.db_down, "MySQL has not answered a statement yet"
    assert [r.getMessage() for r in caplog.records if "MySQL unavailable" in r.getMessage()] == [
        "MySQL unavailable during compare-and-set (reset); deliveries wait and retry every <=2s"
    ]
