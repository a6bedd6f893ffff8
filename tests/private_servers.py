"""Private, throwaway MariaDB, Redis and RabbitMQ servers for the scenarios that stop a server.

Each is started by the test session on free ports in its own temporary directory (data, socket, logs),
at most once per session and only when a test asks for it (``@pytest.mark.private("mysql")``), and is
stopped and removed at the end. The machine's own servers are never touched: every program is started
with its own configuration, none of the machine's (``/etc/mysql``, ``/etc/rabbitmq``).

The processes are run by mirakuru (the process executor of the pytest dbfixtures family):

- Redis: ``pytest_redis``'s ``RedisExecutor`` as it is.
- RabbitMQ: ``pytest_rabbitmq``'s ``RabbitMqExecutor``, given its own ``rabbitmq.conf``, an empty
  ``rabbitmq-env.conf`` and its own epmd port (otherwise the node reads the machine's configuration, whose
  listener on 5672 makes it fail), and Debian's ``rabbitmq-server`` behind the wrapper script (which as
  root switches to the ``rabbitmq`` user, who cannot write in a temporary directory of root's).
- MariaDB: a mirakuru ``TCPExecutor`` of ``mariadbd --no-defaults``; ``pytest_mysql``'s executor cannot
  pass ``--no-defaults``, so the machine's ``my.cnf`` (``user = mysql``, its log file) makes
  ``mariadb-install-db`` fail, and it runs the server under ``mysqld_safe``, which restarts a killed one.

Credentials are the ones of the settings (``MYSQL_USER``/``MYSQL_PASSWORD``, the user of ``AMQP_URL``):
the private servers get those accounts, so the services connect to them as to the shared ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pymysql
import pytest
import redis
from mirakuru import TCPExecutor
from pytest_rabbitmq.factories.executor import RabbitMqExecutor
from pytest_redis.executor import RedisExecutor

from common.settings import Secret, Settings
from deploy.devsupport import Rabbitmqctl, amqp_credentials, free_port

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def program(name: str, package: str) -> str:
    found = shutil.which(name, path=SBIN)
    if found is None:
        pytest.fail(f"{name} is not installed: a private {package} server needs it (apt-get install {package})")
    return found


class PrivateServer:
    """One private server: ``settings(base)`` points settings at it; ``stop()``/``start()`` for outages."""

    name = ""

    def __init__(self, base: Settings) -> None:
        self.base = base
        self.dir = Path(tempfile.mkdtemp(prefix=f"ms-private-{self.name}-"))
        self.port = free_port()
        self.executor: TCPExecutor | None = None

    def boot(self) -> None:
        """Create the data directory and start the server (``close()`` removes everything in any case)."""
        raise NotImplementedError

    def settings(self, base: Settings) -> Settings:
        raise NotImplementedError

    @property
    def process(self) -> TCPExecutor:
        assert self.executor is not None, f"the private {self.name} server was not started"
        return self.executor

    async def stop(self) -> None:
        await asyncio.to_thread(self.process.stop)

    async def start(self) -> None:
        """Start it again (same port, same data) and wait until it answers; a no-op if it runs."""
        if not self.process.running():
            await asyncio.to_thread(self.process.start)

    def close(self) -> None:
        try:
            if self.executor is not None and self.executor.running():
                self.executor.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class PrivateMariaDB(PrivateServer):
    name = "mysql"

    def boot(self) -> None:
        data, me = self.dir / "data", getpass.getuser()
        server = [
            f"--datadir={data}", f"--socket={self.dir / 'mysqld.sock'}", f"--pid-file={self.dir / 'mysqld.pid'}",
            f"--tmpdir={self.dir}", f"--log-error={self.dir / 'error.log'}", f"--user={me}",
            "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
            "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=16M", "--skip-log-bin",
        ]  # fmt: skip
        install = subprocess.run(
            [program("mariadb-install-db", "mariadb-server"), "--no-defaults", *server,
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if install.returncode != 0:
            pytest.fail(f"mariadb-install-db failed:\n{install.stdout[-2000:]}\n{install.stderr[-2000:]}")
        command = [
            program("mariadbd", "mariadb-server"), "--no-defaults", *server,
            "--bind-address=127.0.0.1", f"--port={self.port}", "--skip-name-resolve",
        ]  # fmt: skip
        self.executor = TCPExecutor(command, "127.0.0.1", self.port, timeout=60)
        self.executor.start()
        self.user, self.password = self.base.mysql_user, self.base.mysql_password.reveal()
        root = pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="")
        try:
            with root.cursor() as cur:
                if self.user != "root" or self.password:
                    cur.execute("CREATE USER IF NOT EXISTS %s@'127.0.0.1' IDENTIFIED BY %s", (self.user, self.password))
                    cur.execute("GRANT ALL ON *.* TO %s@'127.0.0.1' WITH GRANT OPTION", (self.user,))
        finally:
            root.close()

    def settings(self, base: Settings) -> Settings:
        return dataclasses.replace(base, mysql_host="127.0.0.1", mysql_port=self.port)


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
        server.boot()
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
