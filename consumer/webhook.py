"""One delivery to the notification service (SPEC section 4), turned into an :class:`Outcome`.

What an answer means depends on whether the request may have reached the service:

- it provably did not (connection refused or unreachable, connect timeout, a failure before the request
  was written, a pooled keep-alive connection the server had already closed): retried, nothing was sent;
- it may have (a timeout or reset after the request was written): the outcome is unknown. At-most-once
  fails the message ("outcome unknown", never resent); at-least-once retries it with the same
  ``Idempotency-Key`` so the receiver can de-duplicate;
- an HTTP answer: 2xx is sent (with the ``messageId`` when the body has one), 408/429/5xx are retried
  (honouring ``Retry-After``), a redirect is not followed, every other answer fails the message.

Error texts are built from parts that cannot carry the webhook's URL (a webhook.site URL is a secret).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import datetime as dt
import errno
import logging
import os
import select
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from yarl import URL

from common.models import Delivery, Outcome, outcome_unknown, utcnow
from common.settings import Settings
from consumer import metrics
from consumer.policy import is_retryable_status, next_attempt_delay, parse_retry_after
from consumer.signing import Signer, webhook_id

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
MAX_REMOTE_ID = 128
MAX_ERROR = 1000
REDIRECTS = frozenset({301, 302, 303, 307, 308})
KEEPALIVE_SECONDS = 15.0  # below the idle timeout of common servers (nginx, aiohttp 75 s; many 60 s; some 20 s)
_IDLE_EVENTS = select.POLLIN | select.POLLERR | select.POLLHUP


def _peer_closed(transport: asyncio.BaseTransport | None) -> bool:
    """Whether the other end already closed this idle pooled connection: its socket is readable (an EOF, a reset
    or bytes nobody asked for, which on an idle HTTP/1.1 connection only come before a close) or in error."""
    raw = transport.get_extra_info("socket") if transport is not None else None
    if raw is None:
        return True
    # One poll(2) with no wait on the descriptor (about 1 us; a peek through a second socket object cost 12 us).
    try:
        poller = select.poll()
        poller.register(raw.fileno(), _IDLE_EVENTS)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True  # no usable descriptor: dropped like a closed one (its pool slot comes back)


class FreshConnector(aiohttp.TCPConnector):
    """A pooled connection is only reused when its server has not closed it already: a request written to a
    connection the server closed while it sat idle never reaches the service, but its failure would look
    like an unknown outcome. Such a connection is dropped and another one taken (closed before the request
    went out). What remains is a close racing the request within one round trip, counted as unknown.

    Only a reused connection is looked at: a new one is used as it is, so the loop ends after at most the
    pooled connections. (Looking at new ones too would open connection after connection, for the whole
    request timeout, to a server that closes or speaks first on every new connection.)"""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._seen: weakref.WeakSet[Any] = weakref.WeakSet()

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        while True:
            conn = await super().connect(req, traces, timeout)
            proto = conn.protocol
            if proto is None or proto not in self._seen:
                if proto is not None:
                    self._seen.add(proto)
                return conn
            if not _peer_closed(conn.transport):
                return conn
            conn.close()  # not back into the pool: the server is gone from it


# Set around each request: the request marks it once aiohttp has a connection for it and starts writing.
_WRITING: contextvars.ContextVar[list[bool]] = contextvars.ContextVar("webhook_writing")


class _Request(aiohttp.ClientRequest):
    """aiohttp's request, noting (in the delivery's :data:`_WRITING` flag) the moment it starts writing on a
    connection: from there on the service may have it. Before, a failure (connecting, a pooled connection
    the server closed, a connect timeout) provably sent nothing. It replaces a ``TraceConfig``, whose dozen
    signals a request cost a fifth of the client's CPU (92,000 of 477,000 instructions a request, callgrind).
    ``send`` is aiohttp's own step, not a documented hook: should an aiohttp release stop calling it, every
    failure would look "not sent", so ``test_12_webhook_slower_than_the_timeout`` (in ``make test``) asserts
    that a timeout after the request went out is still an unknown outcome."""

    async def send(self, conn: Any) -> aiohttp.ClientResponse:
        flag = _WRITING.get(None)
        if flag is not None:
            flag[0] = True
        return await super().send(conn)


def describe_exception(exc: BaseException) -> str:
    """A short text for an exception of the request, without anything it may carry of the URL."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    name = type(exc).__name__
    code = getattr(exc, "errno", None) or getattr(getattr(exc, "os_error", None), "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        return f"{name} [{errno.errorcode[code]}] {os.strerror(code)}"
    return name


class Webhook:
    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.session = session
        self.url = URL(settings.webhook_url.reveal())  # parsed once, not per request
        self.headers = {"Content-Type": "application/json"}
        if settings.webhook_auth_key:
            self.headers["x-ins-auth-key"] = settings.webhook_auth_key.reveal()
        fallback_url = settings.webhook_fallback_url.reveal()
        self.fallback_url = URL(fallback_url) if fallback_url else None
        self.fallback_headers = {"Content-Type": "application/json"}
        if settings.webhook_fallback_auth_key:
            self.fallback_headers["x-ins-auth-key"] = settings.webhook_fallback_auth_key.reveal()
        keys = settings.signing_keys
        self.signer = Signer(keys) if keys else None

    @staticmethod
    def open_session(settings: Settings) -> aiohttp.ClientSession:
        """The webhook's session: at most ``CONSUMER_CONCURRENCY`` connections (the consumer holds one of as
        many slots before each compare-and-set, so a request never waits for a connection and its timeout is
        the request's own), kept alive for :data:`KEEPALIVE_SECONDS`, fresh ones when the server closed them."""
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout_seconds),
            connector=FreshConnector(limit=settings.consumer_concurrency, keepalive_timeout=KEEPALIVE_SECONDS),
            request_class=_Request,
        )

    def deliver(self, row: Delivery, token: int, fallback: bool = False) -> Coroutine[Any, Any, Outcome]:
        """One attempt, to the primary or (``fallback``: while the primary's breaker is open) the fallback
        provider, never both: the attempt's outcome (and its ``messageId``) is that provider's. To the primary,
        the attempt's own coroutine, not one that only forwards to it (see ``Deliveries.process``)."""
        return self._fallback(row, token) if fallback else self._deliver(row, token, False)

    async def _fallback(self, row: Delivery, token: int) -> Outcome:
        return dataclasses.replace(await self._deliver(row, token, True), provider="fallback")

    async def _deliver(self, row: Delivery, token: int, fallback: bool) -> Outcome:
        attempt = row.attempts + 1
        started, t0 = utcnow(), time.perf_counter()
        writing = [False]
        status: int | None = None
        retry_after: float | None = None
        location: str | None = None
        payload = orjson.dumps({"to": row.recipient, "content": row.content})
        headers = {**(self.fallback_headers if fallback else self.headers), "Idempotency-Key": str(row.id)}
        if self.signer is not None:
            headers.update(self.signer.headers(webhook_id(row.id), payload))
        target = self.fallback_url if fallback else self.url
        if target is None:
            raise RuntimeError("a fallback delivery without WEBHOOK_FALLBACK_URL")
        mark = _WRITING.set(writing)
        try:
            async with self.session.post(target, data=payload, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                if (header := resp.headers.get("Retry-After")) is not None:
                    retry_after = parse_retry_after(header, utcnow())
                location = resp.headers.get("Location")
                content = resp.content
                body = await content.read(MAX_BODY)  # a small answer comes whole: no helper, no second read
                if body and len(body) < MAX_BODY and not content.at_eof():
                    body = await _read_rest(resp, body)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if status is not None:  # the service answered; only its body was cut: the status decides
                return self._answered(row, token, attempt, started, status, retry_after, b"", location)
            metrics.answered("error")
            what = describe_exception(exc)
            if not writing[0]:
                error = f"not sent: {what} while connecting"
                return self._retry_or_fail(row, token, attempt, started, None, error, None)
            return self._unknown(row, token, attempt, started, f"{what} after the request was written")
        finally:
            _WRITING.reset(mark)
            metrics.LATENCY.observe(time.perf_counter() - t0)
        return self._answered(row, token, attempt, started, status, retry_after, body, location)

    def _answered(
        self,
        row: Delivery,
        token: int,
        attempt: int,
        started: dt.datetime,
        status: int,
        retry_after: float | None,
        body: bytes,
        location: str | None,
    ) -> Outcome:
        metrics.answered(status)
        finished = utcnow()
        done: Callable[..., Outcome] = lambda kind, **kw: Outcome(  # noqa: E731
            row.id, kind, attempt, token, started, finished, status, **kw
        )
        if 200 <= status <= 299:
            remote_id = _message_id(body)
            if remote_id is None:
                log.warning(
                    "message %d: webhook answered %d without a usable messageId; marked sent",
                    row.id,
                    status,
                    extra={"message_id": row.id},
                )
            return done("sent", remote_message_id=remote_id)
        if status in REDIRECTS and location:
            return done("failed", error=f"HTTP {status}: redirect to {_origin(location)} not followed")
        if 300 <= status <= 399:
            return done("failed", error=f"HTTP {status}: a {status} answer is not an acceptance; not retried")
        error = _cut(f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}")
        if is_retryable_status(status):
            return self._retry_or_fail(row, token, attempt, started, status, error, retry_after)
        return done("failed", error=error)

    def _unknown(self, row: Delivery, token: int, attempt: int, started: dt.datetime, what: str) -> Outcome:
        """The request may have reached the service: at-least-once tries again (same key), at-most-once fails."""
        if self.settings.is_at_least_once:
            return self._retry_or_fail(row, token, attempt, started, None, outcome_unknown(what, resent=True), None)
        error = outcome_unknown(what, resent=False)
        return Outcome(row.id, "failed", attempt, token, started, utcnow(), None, error=error)

    def unexpected(self, row: Delivery, token: int, exc: BaseException) -> Outcome:
        """An outcome for a bug after the compare-and-set (the row must not stay ``sending``): whether the
        request went out is unknown, so the guarantee's rule for an unknown outcome applies."""
        now = utcnow()
        return self._unknown(row, token, row.attempts + 1, now, f"internal error ({type(exc).__name__})")

    def _retry_or_fail(
        self,
        row: Delivery,
        token: int,
        attempt: int,
        started: dt.datetime,
        status: int | None,
        error: str,
        retry_after: float | None,
    ) -> Outcome:
        finished = utcnow()
        if attempt >= self.settings.max_attempts:
            error = _cut(f"gave up after {attempt} attempts; last: {error}")
            return Outcome(row.id, "failed", attempt, token, started, finished, status, error=error)
        delay = next_attempt_delay(attempt, self.settings.retry_base_seconds, retry_after)
        return Outcome(
            row.id,
            "retry",
            attempt,
            token,
            started,
            finished,
            status,
            error=_cut(error),
            next_attempt_at=finished + dt.timedelta(seconds=delay),
            retry_after=retry_after,
        )


async def _read_rest(resp: aiohttp.ClientResponse, first: bytes) -> bytes:
    """The rest of a body that came in several pieces, after its ``first``, up to :data:`MAX_BODY` in all;
    beyond the limit the rest is not read."""
    parts = [first]
    size = len(first)
    while size < MAX_BODY:
        chunk = await resp.content.read(MAX_BODY - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _origin(location: str) -> str:
    """``scheme://host`` of a redirect target (its path and query may be secrets)."""
    try:
        parts = urlsplit(location)
    except ValueError:
        return "an invalid URL"
    return f"{parts.scheme}://{parts.hostname}" if parts.scheme and parts.hostname else "a relative URL"


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
