"""One delivery to the notification service (SPEC section 4), turned into an :class:`Outcome`."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

import aiohttp
import orjson

from common.models import Delivery, Outcome, utcnow
from common.settings import Settings, mask_webhook_url
from consumer import metrics
from consumer.policy import is_retryable_status, next_attempt_delay, parse_retry_after

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
MAX_REMOTE_ID = 128
MAX_ERROR = 1000


class Webhook:
    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.session = session
        self.url = settings.webhook_url.reveal()
        self.shown_url = mask_webhook_url(self.url)  # what an error stored in last_error may say of it
        self.headers = {"Content-Type": "application/json"}
        if settings.webhook_auth_key:
            self.headers["x-ins-auth-key"] = settings.webhook_auth_key.reveal()

    @staticmethod
    def open_session(settings: Settings) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout_seconds),
            connector=aiohttp.TCPConnector(limit=settings.consumer_concurrency, keepalive_timeout=30),
        )

    async def deliver(self, row: Delivery) -> Outcome:
        attempt = row.attempts + 1
        started, t0 = utcnow(), time.perf_counter()
        status: int | None = None
        retry_after: float | None = None
        try:
            async with self.session.post(
                self.url,
                data=orjson.dumps({"to": row.recipient, "content": row.content}),
                headers={**self.headers, "Idempotency-Key": str(row.id)},
                allow_redirects=False,
            ) as resp:
                status = resp.status
                body = await resp.content.read(MAX_BODY)
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), utcnow())
                location = resp.headers.get("Location", "")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            error = error.replace(self.url, self.shown_url)
            if isinstance(exc, asyncio.TimeoutError):
                error = f"timeout after {self.settings.webhook_timeout_seconds:g}s"
            metrics.WEBHOOK_ANSWERS.labels("error").inc()
            return self._retry_or_fail(row, attempt, started, None, error, None)
        finally:
            metrics.LATENCY.observe(time.perf_counter() - t0)
        metrics.WEBHOOK_ANSWERS.labels(str(status)).inc()
        finished = utcnow()
        if 200 <= status <= 299:
            remote_id = _message_id(body)
            if remote_id is None:
                log.warning(
                    "message %d: webhook answered %d without a usable messageId; marked sent",
                    row.id,
                    status,
                    extra={"message_id": row.id},
                )
            return Outcome(row.id, "sent", attempt, started, finished, status, remote_message_id=remote_id)
        if 300 <= status <= 399:
            return Outcome(
                row.id,
                "failed",
                attempt,
                started,
                finished,
                status,
                error=_cut(f"HTTP {status}: redirect to {location!r} not followed"),
            )
        error = _cut(f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}")
        if is_retryable_status(status):
            return self._retry_or_fail(row, attempt, started, status, error, retry_after)
        return Outcome(row.id, "failed", attempt, started, finished, status, error=error)

    def _retry_or_fail(
        self,
        row: Delivery,
        attempt: int,
        started: dt.datetime,
        status: int | None,
        error: str,
        retry_after: float | None,
    ) -> Outcome:
        finished = utcnow()
        if attempt >= self.settings.max_attempts:
            return Outcome(
                row.id,
                "failed",
                attempt,
                started,
                finished,
                status,
                error=_cut(f"gave up after {attempt} attempts; last: {error}"),
            )
        delay = next_attempt_delay(attempt, self.settings.retry_base_seconds, retry_after)
        return Outcome(
            row.id,
            "retry",
            attempt,
            started,
            finished,
            status,
            error=_cut(error),
            next_attempt_at=finished + dt.timedelta(seconds=delay),
        )


def _message_id(body: bytes) -> str | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    value = data.get("messageId") if isinstance(data, dict) else None
    if isinstance(value, str) and 0 < len(value) <= MAX_REMOTE_ID:
        return value
    return None


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 1] + "…"
