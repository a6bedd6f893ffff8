"""The consumer: the AMQP side. It consumes the dispatch queue (manual ack, prefetch), hands each id of a
dispatch message to :class:`~consumer.delivery.Deliveries` (slot, compare-and-set, webhook, fenced outcome
commit, cache) and acknowledges the AMQP message only after every outcome is committed. Dead-letter copies
are published on a connection of their own, so a broker that blocks publishers never holds up the acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time

import aio_pika
import aiomysql
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from common import topology, tracing
from common.cache import MessageCache, connect
from common.db import SERVICE_READ_TIMEOUT_SECONDS, pool_ctx
from common.metrics import start_listener
from common.migrations import migrate
from common.models import Delivery, Outcome
from common.settings import Settings
from common.store import MessageStore
from consumer import metrics
from consumer.cachewriter import CacheWriter
from consumer.control import Control
from consumer.delivery import Deliveries
from consumer.webhook import Webhook

REDIS_TIMEOUT_SECONDS = 5.0  # one Redis command (the cache, the delivery control), connecting included
log = logging.getLogger(__name__)

MAX_IDS = 10_000
# /healthz turns unhealthy when RabbitMQ has been unreachable this long, or when deliveries are in flight but
# none has finished for this long beyond the webhook timeout, with MySQL answering (the event loop or a
# connection is wedged: a restart is the cure; an outage of MySQL is not a reason to restart).
AMQP_DOWN_UNHEALTHY_SECONDS = 60.0
STUCK_SECONDS = 60.0


def parse_body(body: bytes) -> list[int] | None:
    """The message ids of a dispatch message body, ``{"id": 42}`` or ``{"ids": [42, 43]}``; None for
    anything else (not JSON, wrong shape, an id that is not a positive integer)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    values = [data["id"]] if "id" in data else data.get("ids")
    if not isinstance(values, list) or not 0 < len(values) <= MAX_IDS:
        return None
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return values
    return None


class Consumer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.inflight: dict[asyncio.Task[None], float] = {}  # task -> when it started (monotonic)
        self.ready = False
        self.amqp_down_since: float | None = None
        metrics.INFLIGHT.set_function(lambda: len(self.inflight))

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        async with contextlib.AsyncExitStack() as stack:
            listener = await start_listener(s.consumer_metrics_port, self.health)
            if listener:
                stack.push_async_callback(listener.cleanup)
            pool: aiomysql.Pool = await stack.enter_async_context(
                pool_ctx(s, maxsize=8, read_timeout=SERVICE_READ_TIMEOUT_SECONDS)
            )
            await migrate(pool)
            client = connect(s.redis_url.reveal(), REDIS_TIMEOUT_SECONDS)
            stack.push_async_callback(client.aclose)
            self.cache = CacheWriter(MessageCache(client, s.cache_ttl_seconds, s.redis_prefix))
            session = Webhook.open_session(s)
            stack.push_async_callback(session.close)
            publisher = await self._connect(stack, "publish")
            self.dead_letters = await topology.open_channel(publisher, queue_type=s.amqp_queue_type)
            consuming = await self._connect(stack, "consume")
            self.topology = await topology.open_channel(
                consuming, prefetch=s.consumer_prefetch, queue_type=s.amqp_queue_type
            )
            control = Control(s, client, self.name)
            self.deliveries = Deliveries(
                s, MessageStore(pool), Webhook(s, session), self.cache, self._dead_letter_copy, control
            )
            stack.push_async_callback(self.deliveries.close)  # before the pool and the session close
            tag = await self.topology.dispatch_queue.consume(self._on_message)
            self.ready = True
            log.info(
                "consumer %s consuming %s (prefetch %d, guarantee %s)",
                self.name,
                topology.DISPATCH_QUEUE,
                s.consumer_prefetch,
                s.delivery_guarantee,
            )
            if control.enabled or s.webhook_signing_secrets:
                log.info(
                    "delivery control: signing %s, rate limit %s, breaker %s, fallback %s",
                    f"on ({len(s.signing_keys)} secrets)" if s.webhook_signing_secrets else "off",
                    f"{s.webhook_rate_limit_per_second:g}/s over all consumers" if control.rate else "off",
                    f"at {s.webhook_breaker_failure_ratio:g} of >= {s.webhook_breaker_min_requests} requests in"
                    f" {s.webhook_breaker_window_seconds}s"
                    if control.breaker
                    else "off",
                    "on" if control.fallback and control.breaker else "off",
                )
            flusher = asyncio.get_running_loop().create_task(self.cache.flush_loop(stop))
            await stop.wait()
            await flusher
            self.ready = False
            log.info("stopping: no new deliveries; waiting for %d in flight", len(self.inflight))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.topology.dispatch_queue.cancel(tag), 5)
            await self._drain(s.shutdown_timeout_seconds)

    async def _connect(self, stack: contextlib.AsyncExitStack, role: str) -> AbstractRobustConnection:
        conn = await topology.connect(self.settings.amqp_url.reveal(), name=f"message-sender consumer {role}")
        stack.push_async_callback(conn.close)
        if role == "consume":
            conn.close_callbacks.add(lambda *_: self._amqp_down())
            conn.reconnect_callbacks.add(lambda *_: self._amqp_up())
        return conn

    def _amqp_down(self) -> None:
        if self.amqp_down_since is None:
            self.amqp_down_since = time.monotonic()

    def _amqp_up(self) -> None:
        self.amqp_down_since = None

    def health(self) -> dict[str, object]:
        """``ok`` while consuming; unhealthy when RabbitMQ has been away for long, or a delivery is stuck."""
        now = time.monotonic()
        problems = []
        if self.amqp_down_since is not None and now - self.amqp_down_since > AMQP_DOWN_UNHEALTHY_SECONDS:
            problems.append(f"RabbitMQ unreachable for {now - self.amqp_down_since:.0f}s")
        deliveries = getattr(self, "deliveries", None)
        if deliveries is not None and self.inflight and not deliveries.db_down:
            idle = now - max(deliveries.last_progress, min(self.inflight.values()))
            if idle > self.settings.webhook_timeout_seconds + STUCK_SECONDS:
                problems.append(f"deliveries in flight, none finished for {idle:.0f}s")
        status = "unhealthy" if problems else ("ok" if self.ready else "starting")
        return {"status": status, "inflight": len(self.inflight), "problems": problems}

    async def _drain(self, grace: float) -> None:
        """Let the deliveries in flight finish within ``grace``; cancel the rest and wait for them to unwind
        (their rows stay ``sending`` until the lease's sweep settles them), then flush the cache."""
        if self.inflight:
            _, late = await asyncio.wait(set(self.inflight), timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
                log.warning(
                    "%d deliveries did not finish within %.0fs; their sending lease settles them", len(late), grace
                )
        await self.cache.drain()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.get_running_loop().create_task(self._guarded(message))
        self.inflight[task] = time.monotonic()
        task.add_done_callback(self.inflight.pop)

    async def _guarded(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._handle(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug or a database error that is not an outage (outages are retried inside). Do not hold the
            # prefetch slot forever: dead-letter the delivery; each row's own state (the claim's lease, the
            # sending lease's sweep) still gives it a way out.
            log.exception(
                "unexpected error handling delivery %s",
                message.message_id,
                extra={"message_ids": parse_body(message.body)},
            )
            await self._reject(message, "unexpected error", message.message_id)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        ids = parse_body(message.body)
        if ids is None:
            await self._reject(message, "malformed body", message.body[:200])
            return
        carried = tracing.decode((message.headers or {}).get(tracing.HEADER)) if tracing.enabled() else {}
        results = await asyncio.gather(
            *(self.deliveries.process(i, carried.get(i)) for i in ids), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        unknown = [i for i, known in zip(ids, results, strict=True) if not known]
        if unknown and len(unknown) == len(ids):
            await self._reject(message, "unknown message id", unknown)
            return
        if unknown:
            await self._dead_letter_ids(unknown)
        await self._ack(message)

    async def _dead_letter_copy(self, outcome: Outcome, row: Delivery) -> None:
        body = orjson.dumps(
            {
                "id": row.id,
                "recipient": row.recipient,
                "content": row.content,
                "error": outcome.error,
                "attempts": outcome.attempt,
            }
        )
        try:
            await self.dead_letters.dead_letter_copy(body, {"x-reason": "failed", "x-error": outcome.error or ""})
            metrics.DEAD_LETTERED.labels("failed").inc()
        except Exception as exc:  # the row says failed; the copy is a convenience
            log.warning("message %d: dead-letter copy not published (%r)", row.id, exc, extra={"message_id": row.id})

    async def _dead_letter_ids(self, ids: list[int]) -> None:
        """Unknown ids inside an otherwise good dispatch message: dead-letter a copy naming them."""
        log.warning("unknown message ids %s sent to the dead-letter queue", ids, extra={"message_ids": ids})
        metrics.DEAD_LETTERED.labels("poison").inc()
        try:
            await self.dead_letters.dead_letter_copy(orjson.dumps({"ids": ids}), {"x-reason": "unknown message id"})
        except Exception as exc:
            log.warning("dead-letter copy of unknown ids %s not published (%r)", ids, exc, extra={"message_ids": ids})

    async def _reject(self, message: AbstractIncomingMessage, reason: str, what: object) -> None:
        """Reject without requeue: the dispatch queue dead-letters it."""
        log.warning("poison message (%s: %r) sent to the dead-letter queue", reason, what)
        metrics.DEAD_LETTERED.labels("poison").inc()
        with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError, ConnectionError):
            await message.reject(requeue=False)

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.ack()
        except (aio_pika.exceptions.AMQPError, RuntimeError, ConnectionError) as exc:
            # The channel went away: the broker redelivers, and the row's status makes that a no-op.
            log.info(
                "ack of %s lost (%s); the redelivery will be dropped",
                message.message_id,
                exc,
                extra={"message_ids": parse_body(message.body)},
            )
