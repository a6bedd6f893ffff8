"""``make bench`` / ``python -m bench``: throughput, API latency and memory of message-sender (spec section 8).

Runs on the real local services (MariaDB/MySQL, Redis, RabbitMQ) with the webhook stand-in, in an isolated
database, Redis prefix and RabbitMQ vhost that are dropped at the end. Phases, each optional:

1. ``limit``: the machine's raw aiohttp-client -> stand-in POST rate (the ceiling of the pipeline);
2. ``pipeline``: ``BENCH_MESSAGES`` pending rows drained by one producer and ``BENCH_CONSUMERS`` consumers;
3. ``api``: ``GET /messages`` over ``BENCH_ROWS`` sent rows (first page, deep cursor, deep offset);
4. RSS of every service idle and under load.

It prints an aligned table (metric, value, bar, verdict) and, as the very last line, one JSON object.
Environment knobs are listed in :mod:`bench.config`.
"""
