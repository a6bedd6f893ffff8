"""The dev-support module: the guard that fails a session which changed one of the machine's servers,
and the sandbox that leaves nothing behind on the shared servers."""

from __future__ import annotations

import dataclasses
import os
import sys

import aio_pika
import pymysql
import pytest
import redis

from common.settings import Secret, Settings
from deploy.devsupport import Sandbox, VhostPool, amqp_credentials, changed_servers, rabbitmq_admin, server_processes
from tests.private_servers import PrivateServer


@pytest.mark.skipif(os.geteuid() != 0, reason="only root sees which process owns another user's socket")
def test_the_session_watches_the_machines_own_servers(base_settings: Settings) -> None:
    """The session's guard (conftest ``pytest_sessionfinish``) knows the process behind each configured
    port: otherwise it could not notice a test that stopped one."""
    seen = server_processes(base_settings)
    assert [name.split()[0] for name in seen] == ["MySQL", "Redis", "RabbitMQ"]
    missing = [name for name, proc in seen.items() if proc is None]
    assert not missing, f"no process found behind {missing}"
    assert server_processes(base_settings) == seen, "the same servers, read twice"


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="root on Linux sees the servers' sockets")
def test_a_step_of_the_wall_clock_does_not_look_like_a_restarted_server(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CI run once ended "FAILED: the machine's own servers changed", every server at its old pid but started
    11 s later: the VM's clock had been set forward, and psutil's start time is the boot time, worked out from
    the wall clock, plus the kernel's count. Here the boot time psutil reads is moved 11 s as that step moved it."""
    import psutil
    import psutil._pslinux as pslinux

    before = server_processes(base_settings)
    created = psutil.Process().create_time()
    real_boot_time = pslinux.boot_time
    monkeypatch.setattr(pslinux, "boot_time", lambda: real_boot_time() + 11.0)
    assert psutil.Process().create_time() == pytest.approx(created + 11.0), "the step is simulated"
    assert changed_servers(before, server_processes(base_settings)) == []


@pytest.mark.private("redis")
async def test_the_guard_notices_a_restarted_server(base_settings: Settings, private_redis: PrivateServer) -> None:
    """Restarting a server (here the private Redis) is reported with its old and new pid."""
    watched = private_redis.settings(base_settings)
    before = server_processes(watched)
    assert changed_servers(before, server_processes(watched)) == []
    await private_redis.stop()
    gone = changed_servers(before, server_processes(watched))
    await private_redis.start()
    back = changed_servers(before, server_processes(watched))
    redis_key = next(k for k in before if k.startswith("Redis"))
    assert gone == [gone[0]] and gone[0].startswith(redis_key) and "nothing listens now" in gone[0]
    assert len(back) == 1 and back[0].startswith(redis_key) and "now pid" in back[0]


def test_the_sandbox_creates_and_removes_only_its_own(base_settings: Settings, run_id: str) -> None:
    """A sandbox's database, vhost and prefixed keys are gone after ``remove()``; a key beside it stays."""
    box = Sandbox(base_settings, run_id, rabbitmq_admin(base_settings))
    box.create()
    assert run_id in box.rabbit.vhosts()
    s = box.settings
    neighbour = f"{run_id}-neighbour"
    client = redis.Redis.from_url(s.redis_url.reveal())
    try:
        client.set(f"{s.redis_prefix}k", "1")
        client.set(neighbour, "1")
        conn = pymysql.connect(host=s.mysql_host, port=s.mysql_port, user=s.mysql_user, password=s.mysql_password)
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{run_id}`")
        conn.close()
        assert box.remove() == []
        assert client.get(f"{s.redis_prefix}k") is None
        assert client.get(neighbour) == b"1"
        conn = pymysql.connect(host=s.mysql_host, port=s.mysql_port, user=s.mysql_user, password=s.mysql_password)
        with conn.cursor() as cur:
            cur.execute("SHOW DATABASES LIKE %s", (run_id,))
            assert cur.fetchall() == ()
        conn.close()
    finally:
        client.delete(neighbour)
        client.close()
    assert run_id not in box.rabbit.vhosts()


def test_settings_name_the_sandbox(base_settings: Settings) -> None:
    """Credentials and addresses come from the settings; only database, vhost and prefix are the sandbox's."""
    base = dataclasses.replace(
        base_settings, mysql_user="someone", mysql_password=Secret("pw"), amqp_url=Secret("amqp://u:p@h:5/")
    )
    env = Sandbox(base, "mst_x", rabbit=object()).env()  # type: ignore[arg-type]
    assert env["MYSQL_USER"] == "someone" and env["MYSQL_PASSWORD"] == "pw"
    assert env["MYSQL_DATABASE"] == "mst_x" and env["REDIS_PREFIX"] == "mst_x:"
    assert env["AMQP_URL"] == "amqp://u:p@h:5/mst_x"


async def test_vhosts_made_ahead_serve_sandboxes_and_are_all_deleted(base_settings: Settings, run_id: str) -> None:
    """Without the management API each sandbox's vhost cost three ``rabbitmqctl`` calls: the pool makes them
    16 at a time and deletes them in the background. A sandbox on a pooled vhost connects and declares a
    queue with the settings' user; after ``close()`` every vhost the pool made is gone, given back or not,
    and a vhost that is not the pool's is made and deleted as before."""
    pool = VhostPool(amqp_credentials(base_settings)[0], prefix=f"{run_id}_")
    try:
        boxes = [Sandbox(base_settings, f"{run_id}_{i}", pool, vhost=pool.take()) for i in range(3)]
        ours = {v for v in pool.vhosts() if v.startswith(f"{run_id}_")}
        assert len(ours) == VhostPool.BATCH, "one call made a batch"
        assert {b.vhost for b in boxes} < ours and len({b.vhost for b in boxes}) == 3
        for box in boxes[:2]:
            box.create()
            connection = await aio_pika.connect(box.settings.amqp_url.reveal(), timeout=10)
            async with connection:
                await (await connection.channel()).declare_queue("probe", auto_delete=True)
            assert box.remove() == []
        own = Sandbox(base_settings, f"{run_id}_own", pool)  # not from the pool: straight through
        own.create()
        assert own.vhost in pool.vhosts()
        assert own.remove() == [] and own.vhost not in pool.vhosts()
    finally:
        assert pool.close() == []
    assert not [v for v in pool.vhosts() if v.startswith(f"{run_id}_")], "the third was never given back"
