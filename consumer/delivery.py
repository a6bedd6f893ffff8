"""The delivery state machine of one message id, and the group commits it goes through.

Per id the order is fixed, and it is what makes "never twice" hold whatever crashes:
1. a concurrency slot (a webhook connection) is taken, so a row is never ``sending`` while it waits for one;
2. the ``queued -> sending`` compare-and-set with a fresh delivery token and a sending lease (grouped with
   other deliveries into one statement); only the winner goes on, everything else is a dropped duplicate;
3. with a rate limit, the wait for the delivery's rate slot (bounded; a row that finds none in time is given
   back to ``pending`` unsent, no attempt spent: :meth:`~consumer.control.Control.depart`);
4. the webhook POST (whatever happens, it ends in an :class:`Outcome`; a bug becomes an unknown outcome);
5. the outcome and an attempts row, group-committed, fenced by the token; a failing group commit is retried
   one outcome at a time so one bad row cannot strand the others; then ``message:<messageId>`` in Redis.
A crash before 2 or after 5 is harmless (the row says what happened); a crash between them leaves the row
``sending`` until its lease runs out, and the producer's sweep settles it (outcome unknown).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from common import tracing
from common.batching import Batcher
from common.db import error_text, is_transient
from common.models import Delivery, Outcome, is_outcome_unknown, mask_recipient, outcome_unknown
from common.settings import Settings
from common.store import MessageStore, Recorded
from consumer import metrics
from consumer.cachewriter import CacheWriter, Entry
from consumer.control import Control, Ticket
from consumer.webhook import Webhook

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long after the compare-and-set a delivery may still be in flight beyond the request timeout (the
# outcome commit, a slow event loop): past the lease the sweep takes the row for lost.
SENDING_LEASE_MARGIN = 5.0
Start = tuple[int, int]  # (message id, the delivery's token)
DeadLetter = Callable[[Outcome, Delivery], Awaitable[None]]


class Deliveries:
    def __init__(
        self,
        settings: Settings,
        store: MessageStore,
        webhook: Webhook,
        cache: CacheWriter,
        dead_letter: DeadLetter,
        control: Control | None = None,
    ) -> None:
        self.control = control if control is not None and control.enabled else None
        self.store = store
        self.webhook = webhook
        self.cache = cache
        self.dead_letter = dead_letter
        # The sending lease: the request's timeout, the longest wait for a rate slot (0 without a limit), a margin.
        slot_wait = self.control.max_slot_wait if self.control is not None else 0.0
        self.lease = settings.webhook_timeout_seconds + slot_wait + SENDING_LEASE_MARGIN
        self.at_least_once = settings.is_at_least_once
        self.slots = asyncio.Semaphore(settings.consumer_concurrency)
        # One flush of each kind at a time: what arrives meanwhile goes into the next one, so under load the
        # groups are twice as large as with two flushes in flight, and every statement, commit and socket write
        # is shared by twice as many messages (measured in the drain: MySQL 190 -> 165 us and each consumer
        # 150 -> 130 us of CPU per message). An idle consumer still flushes a lone delivery at once.
        self.starts: Batcher[Start, Delivery | None] = Batcher(self._flush_starts, max_concurrent=1)
        self.finishes: Batcher[tuple[Outcome, Delivery], None] = Batcher(self._flush_finishes, max_concurrent=1)
        self.db_down = False
        self.last_progress = time.monotonic()  # when an outcome was last committed (for /healthz)

    def process(self, message_id: int, traceparent: str | None = None) -> Coroutine[Any, Any, bool]:
        """Take one id through the steps above; False if the id is unknown (no such row). With tracing on, in
        a span whose parent is the producer's publish span (``traceparent``, from the AMQP headers). Off, the
        delivery's own coroutine is returned, not wrapped in another: every resumption of a delivery passes
        through each coroutine it awaits in, so a layer that only forwards costs on every step of the request."""
        if not tracing.enabled():
            return self._process(message_id)
        return self._traced(message_id, traceparent)

    async def _traced(self, message_id: int, traceparent: str | None) -> bool:
        with tracing.span("consumer delivery", parent=traceparent, root=True, attributes={"message.id": message_id}):
            return await self._process(message_id)

    async def _process(self, message_id: int) -> bool:
        token = secrets.randbits(63)  # kept across retries of the statement: a lost answer cannot hide a won row
        async with self.slots:
            # Delivery control waits here, before the compare-and-set: a waiting message spends no attempt.
            ticket = await self.control.admit() if self.control is not None else None
            with tracing.span("compare-and-set", attributes={"message.id": message_id}):
                try:
                    row = await self.starts.submit((message_id, token))
                except Exception as exc:  # an outage is retried, anything else raised (see _persist_after)
                    retry_start = functools.partial(self.starts.submit, (message_id, token))
                    row = await self._persist_after(exc, retry_start, "compare-and-set")
            if row is None:
                return False
            if not row.won_by(token):
                metrics.DUPLICATES.inc()
                log.info(
                    "message %d is %s; duplicate delivery dropped",
                    message_id,
                    row.status,
                    extra={"message_id": message_id},
                )
                return True
            if ticket is not None and self.control is not None and not await self.control.depart(ticket):
                await self._give_back(message_id, token)
                return True
            try:
                # its span (tracing on) is the aiohttp client instrumentation's "webhook request", which sends its
                # traceparent
                outcome = await self.webhook.deliver(row, token, fallback=ticket is not None and ticket.fallback)
            except Exception as exc:
                log.exception("message %d: delivery failed unexpectedly", message_id, extra={"message_id": message_id})
                outcome = self.webhook.unexpected(row, token, exc)
            if ticket is not None:
                await self._report(ticket, outcome)
        with tracing.span("outcome commit", attributes={"message.id": message_id, "outcome": outcome.kind}):
            try:
                await self.finishes.submit((outcome, row))
            except Exception as exc:
                retry_finish = functools.partial(self.finishes.submit, (outcome, row))
                await self._persist_after(exc, retry_finish, "outcome commit")
        return True

    async def _give_back(self, message_id: int, token: int) -> None:
        moved = await self._persist(lambda: self.store.give_back(message_id, token), "give-back")
        log.info(
            "message %d: no rate slot within %.1fs of its compare-and-set; %s, no attempt spent",
            message_id,
            self.control.max_slot_wait if self.control is not None else 0.0,
            "back to pending" if moved else "no longer this delivery's",
            extra={"message_id": message_id},
        )

    async def _report(self, ticket: Ticket, outcome: Outcome) -> None:
        assert self.control is not None
        status = outcome.http_status
        failed = outcome.kind != "sent" and (status is None or status >= 500)
        try:
            await self.control.report(ticket, status, failed, outcome.retry_after)
        except Exception:  # the outcome must be committed whatever happens to the report
            log.exception("message %d: delivery control report failed", outcome.id, extra={"message_id": outcome.id})

    async def close(self) -> None:
        await self.starts.aclose()
        await self.finishes.aclose()

    async def _persist(self, work: Callable[[], Awaitable[T]], what: str) -> T:
        """Run database work until it succeeds (see :meth:`_persist_after`)."""
        try:
            result = await work()
        except Exception as exc:
            return await self._persist_after(exc, work, what)
        self._answers_again()
        return result

    async def _persist_after(self, first: Exception, work: Callable[[], Awaitable[T]], what: str) -> T:
        """Database work whose first run raised ``first``, run again until it succeeds. An outage
        (:func:`~common.db.is_transient`) is retried and logged once for the whole consumer, with the retry
        plan, and once when MySQL answers again; any other error is raised with its number and message (a bug
        or a misconfiguration, not an outage). The first run is the caller's own ``await`` (the delivery
        steps): a helper coroutine around it would be one more frame that every resumption passes through."""
        exc: Exception = first
        delay = 0.2
        while True:
            if not is_transient(exc):
                if exc is first:
                    raise exc
                # Raised from a retry, which runs inside the caller's ``except`` of the first failure: without
                # ``from None`` its traceback would show that outage as its cause.
                raise exc from None
            if not self.db_down:
                self.db_down = True
                log.warning("MySQL unavailable during %s (%s); deliveries wait and retry every <=2s", what, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)  # soon after MySQL is back: well within the sweep's grace
            try:
                result = await work()
            except Exception as again:
                exc = again
                continue
            self._answers_again()
            return result

    def _answers_again(self) -> None:
        """A statement succeeded: if MySQL was down, say once that it answers again. Called where the database
        answered: each group commit's flush (the delivery steps), and the other work of :meth:`_persist`."""
        if self.db_down:
            self.db_down = False
            log.info("MySQL answers again; deliveries go on")

    async def _flush_starts(self, items: Sequence[Start]) -> list[Delivery | None]:
        rows = await self.store.begin_sending(items, self.lease, self.at_least_once)
        self._answers_again()
        return [rows.get(message_id) for message_id, _ in items]

    async def _flush_finishes(self, items: Sequence[tuple[Outcome, Delivery]]) -> list[None]:
        unrecorded: set[int] = set()
        try:
            recorded = await self.store.record_outcomes([o for o, _ in items])
        except Exception as exc:
            if is_transient(exc):
                raise
            recorded = await self._one_by_one(items, exc, unrecorded)
        metrics.BATCH_SIZE.observe(len(items))
        self.last_progress = time.monotonic()
        self._answers_again()
        fenced = {o.id for o in recorded.fenced}
        entries: list[Entry] = []
        for outcome, row in items:
            extra = {"message_id": outcome.id, "attempt": outcome.attempt}
            if outcome.id in unrecorded:
                continue
            if outcome.id in fenced:
                log.warning(
                    "message %d: its sending lease ran out before this outcome (%s) could be recorded; the"
                    " sweep settled it (see its last_error)",
                    outcome.id,
                    outcome.kind,
                    extra=extra,
                )
                continue
            metrics.delivered(outcome.kind)
            if outcome.kind == "sent":
                if log.isEnabledFor(logging.INFO):  # the masking is not paid for when nobody reads it
                    log.info(
                        "message %d sent to %s in %d ms (attempt %d%s, messageId %s)",
                        outcome.id,
                        mask_recipient(row.recipient),
                        outcome.duration_ms,
                        outcome.attempt,
                        ", fallback provider" if outcome.provider == "fallback" else "",
                        outcome.remote_message_id or "none",
                        extra=extra,
                    )
                sent_at = recorded.sent_at.get(outcome.id)
                if outcome.remote_message_id and sent_at is not None:
                    entries.append((outcome.remote_message_id, outcome.id, sent_at))
            elif outcome.kind == "retry":
                metrics.RETRIES.inc()
                log.info(
                    "message %d: attempt %d failed (%s); next at %s",
                    outcome.id,
                    outcome.attempt,
                    outcome.error,
                    outcome.next_attempt_at,
                    extra=extra,
                )
            else:
                log.warning("message %d failed: %s", outcome.id, outcome.error, extra=extra)
                await self.dead_letter(outcome, row)
        await self.cache.write(entries)
        return [None] * len(items)

    async def _one_by_one(
        self, items: Sequence[tuple[Outcome, Delivery]], first: Exception, unrecorded: set[int]
    ) -> Recorded:
        """A group commit failed for a reason other than an outage: record its outcomes one at a time, so the
        bad row is found, marked ``failed`` with the reason, and the others are recorded as they are."""
        log.error("group commit of %d outcomes failed (%s); recording them one by one", len(items), error_text(first))
        sent_at: dict[int, dt.datetime] = {}
        fenced: list[Outcome] = []
        for outcome, _ in items:
            try:
                one = await self.store.record_outcomes([outcome])
            except Exception as exc:
                if is_transient(exc):
                    raise
                reason = f"its outcome ({outcome.kind}) could not be recorded: {error_text(exc)}"
                if outcome.kind == "sent" or is_outcome_unknown(outcome.error):  # it may have reached the service
                    reason = outcome_unknown(reason, resent=False)
                unrecorded.add(outcome.id)
                marked = await self.store.record_unrecordable(outcome, reason)
                log.error(
                    "message %d: %s; %s",
                    outcome.id,
                    reason,
                    "marked failed" if marked else "left for the sending lease's sweep",
                    extra={"message_id": outcome.id},
                )
                continue
            sent_at.update(one.sent_at)
            fenced += one.fenced
        return Recorded(sent_at, fenced)
