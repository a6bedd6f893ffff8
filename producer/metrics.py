"""Prometheus metrics of the producer."""

from prometheus_client import Counter, Gauge

TICKS = Counter("producer_ticks_total", "Ticks run by this replica")
SKIPPED = Counter("producer_ticks_skipped_total", "Ticks cut short by an unavailable dependency", ["dependency"])
LEADER = Gauge("producer_is_leader", "1 while this replica holds the leader lease")
SENDING = Gauge("producer_sending", "1 while automatic sending is on (as last read by the leader)")
CLAIMED = Counter("producer_claimed_total", "Messages claimed (pending -> queued)")
PUBLISHED = Counter("producer_published_total", "Claimed messages published with a confirm")
REPUBLISHED = Counter("producer_stale_republished_total", "Stale claims published again")
RELEASED = Counter("producer_released_total", "Claims put back to pending because their publish was not confirmed")
SWEPT = Counter("producer_swept_total", "Sending rows settled by the sweep after their lease ran out")
RETENTION = Counter("producer_retention_removed_total", "Messages removed by retention (RETENTION_DAYS)", ["status"])
