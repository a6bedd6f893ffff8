"""Prometheus metrics of the consumer."""

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

DELIVERIES = Counter("consumer_deliveries_total", "Deliveries by outcome", ["outcome"])
WEBHOOK_ANSWERS = Counter("consumer_webhook_responses_total", "Webhook answers by HTTP status (or error)", ["status"])
RETRIES = Counter("consumer_retries_total", "Deliveries scheduled for another attempt")
DEAD_LETTERED = Counter("consumer_dead_lettered_total", "Messages sent to the dead-letter queue", ["reason"])
DUPLICATES = Counter("consumer_duplicates_dropped_total", "AMQP deliveries dropped by the compare-and-set")
LATENCY = Histogram(
    "consumer_webhook_latency_seconds",
    "Webhook request duration",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_SIZE = Histogram(
    "consumer_commit_batch_size", "Outcomes per group commit", buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500)
)
CACHE_ERRORS = Counter("consumer_cache_errors_total", "Redis writes that failed (entries kept for a retry)")
INFLIGHT = Gauge("consumer_inflight_deliveries", "AMQP deliveries being handled right now")
CACHE_BACKLOG = Gauge("consumer_cache_backlog", "Cache entries held back while Redis is down")
BREAKER_STATE = Gauge(
    "consumer_webhook_breaker_state",
    "The webhook's circuit breaker as this consumer last saw it: 0 closed, 1 open, 2 half-open",
)
FALLBACK_ATTEMPTS = Counter(
    "consumer_webhook_fallback_attempts_total", "Attempts sent to WEBHOOK_FALLBACK_URL while the breaker was open"
)
CONTROL_WAITS = Counter(
    "consumer_delivery_control_waits_total", "Deliveries told to wait before sending, by reason", ["reason"]
)


_ANSWERED: dict[int | str, Any] = {}  # the child of WEBHOOK_ANSWERS per status: labels() takes a lock and a lookup
_DELIVERED: dict[str, Any] = {}


def answered(status: int | str) -> None:
    """Count a webhook answer (an HTTP status, or ``error``); one label child per status, made once."""
    child = _ANSWERED.get(status)
    if child is None:
        child = _ANSWERED[status] = WEBHOOK_ANSWERS.labels(str(status))
    child.inc()


def delivered(outcome: str) -> None:
    """Count a recorded delivery by outcome (``sent``, ``retry``, ``failed``)."""
    child = _DELIVERED.get(outcome)
    if child is None:
        child = _DELIVERED[outcome] = DELIVERIES.labels(outcome)
    child.inc()
