"""Ways out of every state, on the real services: a group commit with one bad row, real MySQL errors that
must fail loudly (not be retried as an outage), the webhook URL kept out of errors and logs, health that
can fail."""

from __future__ import annotations

import asyncio
import time

import pytest

from common import topology
from common.settings import Settings
from common.store import MessageStore
from consumer.service import Consumer
from consumer.webhook import _peer_closed
from producer.service import Producer
from tests.conftest import sql
from tests.private_servers import PrivateServer
from tests.procs import Cluster, StandIn, free_port, wait_for


async def _statuses(settings: Settings) -> dict[int, str]:
    return {int(i): str(s) for i, s in await sql(settings, "SELECT id, status FROM messages")}


async def test_one_bad_row_in_a_group_commit_does_not_strand_the_others(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    """A row whose attempts counter is at the column's maximum cannot take its outcome (``DataError 1264``):
    the group commit is retried one outcome at a time, the bad row ends ``failed`` naming the error, the
    innocent rows of the same commit are recorded ``sent``."""
    ids = [await store.create(f"+9055570000{i}", f"group {i}") for i in range(3)]
    await sql(settings, "UPDATE messages SET attempts = 4294967295 WHERE id = %s", (ids[1],))
    await standin.behave(delay_ms=200)  # the three answers arrive together: one group commit
    cluster.start("producer", SEND_BATCH_SIZE="3")
    consumer = cluster.start("consumer")

    async def settled() -> dict[int, str] | None:
        got = await _statuses(settings)
        return got if all(s in ("sent", "failed") for s in got.values()) else None

    final = await wait_for(settled, 30, "every row to be recorded")
    assert final == {ids[0]: "sent", ids[1]: "failed", ids[2]: "sent"}
    ((reason,),) = await sql(settings, "SELECT last_error FROM messages WHERE id = %s", (ids[1],))
    assert "could not be recorded: MySQL error 1264" in reason
    assert "recording them one by one" in consumer.log()
    assert len(await standin.keys()) == 3, "each sent once"


async def test_a_real_mysql_error_fails_loudly_with_its_number_not_as_an_outage(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    """A schema the code does not expect (a column dropped by hand) is a bug, not an outage: the producer's
    tick says ``MySQL error 1054: Unknown column`` at ERROR, never "MySQL unavailable"."""
    producer = cluster.start("producer")
    await wait_for(lambda: _logged(producer, "tick: leader"), 20, "the producer to tick")
    await sql(settings, "ALTER TABLE messages DROP COLUMN published_at")
    await wait_for(lambda: _logged(producer, "tick failed: MySQL error 1054"), 20, "the error with its number")
    assert "MySQL unavailable" not in producer.log()


async def test_the_webhook_url_stays_out_of_errors_and_logs(
    store: MessageStore, settings: Settings, cluster: Cluster
) -> None:
    """A webhook.site URL is a capability: nothing of its path or query may reach ``last_error`` (served by the
    API) or the log, whatever the error text of the HTTP client carries."""
    secret = "d5b0c1e2-secret-path"
    url = f"http://127.0.0.1:{free_port()}/{secret}?token={secret}"  # nobody listens: connection refused
    (mid,) = [await store.create("+905557000001", "to nowhere")]
    cluster.start("producer")
    consumer = cluster.start("consumer", WEBHOOK_URL=url, MAX_ATTEMPTS="1")
    await wait_for(lambda: _statuses_are(settings, {mid: "failed"}), 30, "the message to fail")
    ((reason,),) = await sql(settings, "SELECT last_error FROM messages WHERE id = %s", (mid,))
    assert reason.startswith("gave up after 1 attempts; last: not sent: ClientConnectorError")
    assert "while connecting" in reason
    assert secret not in reason and secret not in consumer.log()


def test_health_reports_a_stuck_loop_or_a_long_broker_outage(settings: Settings) -> None:
    producer = Producer(settings)
    producer.ready = True
    assert producer.health()["status"] == "ok"
    producer.last_loop = time.monotonic() - 3600
    assert producer.health()["status"] == "unhealthy"
    consumer = Consumer(settings)
    consumer.ready = True
    assert consumer.health()["status"] == "ok"
    consumer.amqp_down_since = time.monotonic() - 3600
    health = consumer.health()
    assert health["status"] == "unhealthy" and "RabbitMQ unreachable" in str(health["problems"])


async def _logged(svc: object, text: str) -> bool:
    return text in svc.log()  # type: ignore[attr-defined]


async def _statuses_are(settings: Settings, expected: dict[int, str]) -> bool:
    return await _statuses(settings) == expected


@pytest.mark.private("rabbitmq")
async def test_a_publish_to_a_blocked_broker_gives_up_in_bounded_time(
    settings: Settings, private_rabbitmq: PrivateServer
) -> None:
    """A broker under a memory alarm blocks publishers instead of refusing them: every publish has a timeout,
    so the producer's tick (and its claims, put back to pending) never waits for it forever."""
    ctl = private_rabbitmq.ctl  # type: ignore[attr-defined]
    conn = await topology.connect(settings.amqp_url.reveal())
    async with conn:
        topo = await topology.open_channel(conn)
        await asyncio.to_thread(ctl.run, "set_vm_memory_high_watermark", "0.0000001")
        try:
            started = time.monotonic()
            assert sorted(await topo.publish_ids([1, 2, 3])) == [1, 2, 3], "not confirmed: all handed back"
            assert time.monotonic() - started < topology.PUBLISH_TIMEOUT_SECONDS + 5
        finally:
            await asyncio.to_thread(ctl.run, "set_vm_memory_high_watermark", "0.4")


async def test_a_pooled_connection_the_server_closed_is_seen_before_writing() -> None:
    """What lets a request on a reused keep-alive connection count as "not sent" rather than unknown: the
    connector looks at an idle connection before using it, and one the server closed is not reused."""
    accepted: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        _, client = await asyncio.open_connection("127.0.0.1", port)
        await wait_for(lambda: _value(accepted), 5, "the server to accept")
        assert not _peer_closed(client.transport), "an idle connection the server keeps is reused"
        accepted[0].close()  # the server ends the idle connection
        await wait_for(lambda: _value(_peer_closed(client.transport)), 5, "the close to be seen")
        client.close()


async def _value(v: object) -> object:
    return v
