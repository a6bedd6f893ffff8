"""The AMQP topology: every exchange and queue name, their declarations and publishing, in one place.

- ``message_sender.dispatch`` (direct exchange) -> ``message_sender.dispatch`` (durable queue): the
  claimed row ids, ``{"id": 42}`` or ``{"ids": [42, 43, ...]}`` (up to ``DISPATCH_CHUNK``); only ids
  travel, the rows are the truth.
- ``message_sender.dead_letter`` (fanout exchange) -> ``message_sender.dead_letter`` (durable queue):
  messages a consumer rejects (poison bodies, unknown ids) and a copy of every message that ended ``failed``.

Both queues are of the type ``AMQP_QUEUE_TYPE`` names: ``classic`` (the default) or ``quorum`` (replicated
over a RabbitMQ cluster's nodes, what a cluster needs; a single node runs them too). A queue keeps the type
it was created with: declaring it with another one fails with a :class:`~common.errors.SettingsError`
naming the setting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from common import tracing
from common.errors import SettingsError

log = logging.getLogger(__name__)

DISPATCH_EXCHANGE = "message_sender.dispatch"
DISPATCH_QUEUE = "message_sender.dispatch"
DISPATCH_ROUTING_KEY = "dispatch"
DEAD_LETTER_EXCHANGE = "message_sender.dead_letter"
DEAD_LETTER_QUEUE = "message_sender.dead_letter"
# Ids per dispatch message: one AMQP message (and one publisher confirm, one ack) carries a chunk of a
# tick's claim, which cuts the broker's and both services' per-message work by this factor.
DISPATCH_CHUNK = 50
# Every publish waits this long for its confirm at most (a broker under a memory or disk alarm blocks
# publishers instead of refusing them): an unconfirmed publish is then handled like a nacked one.
PUBLISH_TIMEOUT_SECONDS = 10.0


class Topology:
    """The declared exchanges and queues of one channel."""

    def __init__(
        self,
        channel: AbstractChannel,
        dispatch: AbstractExchange,
        dead_letter: AbstractExchange,
        dispatch_queue: AbstractQueue,
        dead_letter_queue: AbstractQueue,
        queue_type: str = "classic",
    ) -> None:
        self.channel = channel
        self.queue_type = queue_type
        self.dispatch = dispatch
        self.dead_letter = dead_letter
        self.dispatch_queue = dispatch_queue
        self.dead_letter_queue = dead_letter_queue

    async def publish_ids(
        self, ids: Sequence[int], chunk: int = DISPATCH_CHUNK, traceparents: Mapping[int, str] | None = None
    ) -> list[int]:
        """Publish the ids in persistent, mandatory messages of up to ``chunk`` ids each and wait for all
        publisher confirms at once. Returns the ids whose publish was not confirmed (nacked, returned,
        failed): the caller puts those rows back."""
        chunks = [list(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
        results = await asyncio.gather(*(self._publish_chunk(c, traceparents) for c in chunks), return_exceptions=True)
        failed: list[int] = []
        for part, result in zip(chunks, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("publish of messages %s not confirmed: %r", part, result, extra={"message_ids": part})
                failed.extend(part)
        return failed

    async def _publish_chunk(self, ids: list[int], traceparents: Mapping[int, str] | None = None) -> None:
        message = dispatch_message(ids)
        if not traceparents:
            await self._publish_dispatch(message)
            return
        # Tracing on: each id's publish span, for the consumer's spans (common.tracing). The AMQP message's own
        # send span (the aio-pika instrumentation) can be in one trace only: its first id's.
        carried = {i: traceparents[i] for i in ids if i in traceparents}
        message.headers[tracing.HEADER] = tracing.encode(carried)
        with tracing.within(carried.get(ids[0])):
            await self._publish_dispatch(message)

    async def _publish_dispatch(self, message: aio_pika.Message) -> None:
        await self.dispatch.publish(
            message, routing_key=DISPATCH_ROUTING_KEY, mandatory=True, timeout=PUBLISH_TIMEOUT_SECONDS
        )

    async def dispatch_ready(self) -> int:
        """Messages ready (not yet delivered to a consumer) in the dispatch queue. The topology is declared
        again for it (idempotent): a queue that was deleted is back, bound, and reported empty."""
        fresh = await declare(self.channel, self.queue_type)
        return int(fresh.dispatch_queue.declaration_result.message_count or 0)

    async def dead_letter_copy(self, body: bytes, headers: Mapping[str, Any]) -> None:
        """Publish a copy of a finished-as-failed message to the dead-letter exchange (confirmed)."""
        await self.dead_letter.publish(
            aio_pika.Message(
                body,
                headers=dict(headers),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type="application/json",
            ),
            routing_key=DISPATCH_ROUTING_KEY,
            timeout=PUBLISH_TIMEOUT_SECONDS,
        )


def dispatch_message(ids: Sequence[int]) -> aio_pika.Message:
    body = {"id": ids[0]} if len(ids) == 1 else {"ids": list(ids)}
    return aio_pika.Message(
        orjson.dumps(body),
        message_id=str(ids[0]) if len(ids) == 1 else f"{ids[0]}..{ids[-1]}",
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def declare(channel: AbstractChannel, queue_type: str = "classic") -> Topology:
    """Declare (idempotently) the whole topology on ``channel``, both queues of type ``queue_type``."""
    dead_letter = await channel.declare_exchange(DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    dead_letter_queue = await _declare_queue(channel, DEAD_LETTER_QUEUE, queue_type, {})
    await dead_letter_queue.bind(dead_letter)
    dispatch = await channel.declare_exchange(DISPATCH_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    dispatch_queue = await _declare_queue(
        channel, DISPATCH_QUEUE, queue_type, {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}
    )
    await dispatch_queue.bind(dispatch, routing_key=DISPATCH_ROUTING_KEY)
    return Topology(channel, dispatch, dead_letter, dispatch_queue, dead_letter_queue, queue_type)


async def _declare_queue(
    channel: AbstractChannel, name: str, queue_type: str, arguments: dict[str, Any]
) -> AbstractQueue:
    try:
        return await channel.declare_queue(name, durable=True, arguments={**arguments, "x-queue-type": queue_type})
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        if "x-queue-type" not in str(exc):
            raise
        raise SettingsError(
            f"AMQP_QUEUE_TYPE={queue_type} does not match the queue {name} that exists in RabbitMQ with another "
            "type (a queue keeps its type): set AMQP_QUEUE_TYPE to the existing type, or drain and delete the "
            f"queue to recreate it as {queue_type}"
        ) from exc


async def connect(url: str, name: str = "message-sender") -> aio_pika.abc.AbstractRobustConnection:
    """A robust connection (it reconnects by itself), retried with backoff until RabbitMQ answers.
    A lost connection is logged once, with the retry plan, and its return once."""
    from common.settings import mask_url

    delay = 0.5
    while True:
        try:
            conn = await aio_pika.connect_robust(url, client_properties={"connection_name": name})
            break
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            log.warning("RabbitMQ at %s unreachable (%s); retrying in %.1fs", mask_url(url), exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
    log.info("connected to %s", mask_url(url))

    def lost(*args: object) -> None:
        exc = next((a for a in args if isinstance(a, BaseException)), None)
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            log.warning("RabbitMQ connection lost (%r); reconnecting every %ss", exc, conn.reconnect_interval)

    def back(*_: object) -> None:
        log.info("RabbitMQ reconnected")

    conn.close_callbacks.add(lost)
    conn.reconnect_callbacks.add(back)
    return conn


async def open_channel(
    conn: aio_pika.abc.AbstractRobustConnection, prefetch: int = 0, *, queue_type: str = "classic"
) -> Topology:
    """A channel with publisher confirms, returns raised as errors, and the topology declared (its queues of
    type ``queue_type``, the setting ``AMQP_QUEUE_TYPE``)."""
    channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
    if prefetch:
        await channel.set_qos(prefetch_count=prefetch)
    return await declare(channel, queue_type)
