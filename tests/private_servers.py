"""Private, throwaway MariaDB, Redis and RabbitMQ servers for the scenarios that stop a server.

Each is started by the test session on free ports in its own temporary directory (data, socket, logs),
at most once per session and only when a test asks for it (``@pytest.mark.private("mysql")``), and is
stopped and removed at the end. The machine's own servers are never touched: every program is started
with its own configuration, none of the machine's (``/etc/mysql``, ``/etc/rabbitmq``).

MariaDB and the common part live in ``deploy/private_servers.py`` (the benchmark starts one too); the
processes here are run by mirakuru (the process executor of the pytest dbfixtures family):

- Redis: ``pytest_redis``'s ``RedisExecutor`` as it is.
- RabbitMQ: ``pytest_rabbitmq``'s ``RabbitMqExecutor``, given its own ``rabbitmq.conf``, an empty
  ``rabbitmq-env.conf`` and its own epmd port (otherwise the node reads the machine's configuration, whose
  listener on 5672 makes it fail), and Debian's ``rabbitmq-server`` behind the wrapper script (which as
  root switches to the ``rabbitmq`` user, who cannot write in a temporary directory of root's).

Credentials are the ones of the settings (``MYSQL_USER``/``MYSQL_PASSWORD``, the user of ``AMQP_URL``):
the private servers get those accounts, so the services connect to them as to the shared ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import redis
from pytest_rabbitmq.factories.executor import RabbitMqExecutor
from pytest_redis.executor import RedisExecutor

from common.settings import Secret, Settings
from deploy.devsupport import Rabbitmqctl, amqp_credentials, free_port
from deploy.private_servers import PrivateMariaDB, PrivateServer, PrivateServerError, program

__all__ = ["PrivateMariaDB", "PrivateRabbitMQ", "PrivateRedis", "PrivateServer"]


class PrivateRedis(PrivateServer):
    name = "redis"

    def boot(self) -> None:
        self.executor = RedisExecutor(
            program("redis-server", "redis-server"), databases=4, redis_timeout=30, loglevel="notice",
            host="127.0.0.1", port=self.port, datadir=self.dir, startup_timeout=30,
        )  # fmt: skip
        self.executor.start()

    def settings(self, base: Settings) -> Settings:
        url = urlsplit(base.redis_url.reveal())
        db = url.path if url.scheme != "unix" and url.path not in ("", "/") else "/0"
        return dataclasses.replace(base, redis_url=Secret(f"redis://127.0.0.1:{self.port}{db}"))

    async def stop(self) -> None:
        """Like the shared server's ``redis-cli shutdown nosave`` of old: it comes back empty."""
        client = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            client.shutdown(nosave=True)
        except redis.ConnectionError:
            pass  # the answer to SHUTDOWN is the connection closing
        finally:
            client.close()
        await super().stop()


class PrivateRabbitMQ(PrivateServer):
    name = "rabbitmq"

    def boot(self) -> None:
        server = Path(program("rabbitmq-server", "rabbitmq-server")).resolve()
        if server.name == "rabbitmq-script-wrapper":  # Debian's wrapper: the real scripts are beside it
            server = server.parent / "rabbitmq-server"
        ctl = server.parent / "rabbitmqctl"
        (self.dir / "plugins").write_text("[].\n")  # no plugins: a fast start
        config = self.dir / "rabbitmq.conf"
        config.write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        executor = self.executor = RabbitMqExecutor(
            str(server), "127.0.0.1", self.port, free_port(), str(ctl), logpath=self.dir, path=self.dir,
            plugin_path=self.dir, node_name=f"ms-private-{self.port}@localhost",
        )  # fmt: skip
        executor._envvars.update(
            {
                "RABBITMQ_CONFIG_FILE": str(config),
                "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
                "ERL_EPMD_PORT": str(free_port()),  # its own epmd, stopped with it
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "HOME": str(self.dir),  # its own Erlang cookie
            }
        )
        executor.start()
        self.ctl = Rabbitmqctl([str(ctl)], executor.envvars)
        self.user, self.password = amqp_credentials(self.base)
        if (self.user, self.password) != ("guest", "guest"):
            self.ctl.run("add_user", self.user, self.password)
            self.ctl.run("set_user_tags", self.user, "administrator")

    def settings(self, base: Settings) -> Settings:
        auth = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}"
        return dataclasses.replace(base, amqp_url=Secret(f"amqp://{auth}@127.0.0.1:{self.port}/"))

    async def stop(self) -> None:
        """Like ``rabbitmqctl stop_app``: the node stays, the broker goes (connections are closed)."""
        await asyncio.to_thread(self.ctl.run, "stop_app")
        self.app_stopped = True

    async def start(self) -> None:
        if getattr(self, "app_stopped", False):
            await asyncio.to_thread(self.ctl.run, "start_app")
            await asyncio.to_thread(self.ctl.run, "await_startup")
            self.app_stopped = False


def _serve(server: PrivateServer) -> Iterator[PrivateServer]:
    try:
        try:
            server.boot()
        except PrivateServerError as exc:
            pytest.fail(str(exc))
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def private_mysql(base_settings: Settings) -> Iterator[PrivateServer]:
    yield from _serve(PrivateMariaDB(base_settings))


@pytest.fixture(scope="session")
def private_redis(base_settings: Settings) -> Iterator[PrivateServer]:
    yield from _serve(PrivateRedis(base_settings))


@pytest.fixture(scope="session")
def private_rabbitmq(base_settings: Settings) -> Iterator[PrivateServer]:
    yield from _serve(PrivateRabbitMQ(base_settings))
