"""Private, throwaway servers on this machine, for the tests that stop a server and for the benchmark's growth
phase, which needs a MariaDB configured for its data size (the machine's shared one may not be reconfigured).

Each is started on a free port in its own temporary directory (data, socket, logs), and :meth:`close` stops it
by its own process (group) id and removes that directory. The machine's own servers are never touched: every
program is started with its own configuration, none of the machine's (``/etc/mysql``).

MariaDB is a mirakuru ``TCPExecutor`` (the process executor of the pytest dbfixtures family) of ``mariadbd
--no-defaults``: ``pytest_mysql``'s executor cannot pass ``--no-defaults``, so the machine's ``my.cnf`` (``user
= mysql``, its log file) makes ``mariadb-install-db`` fail, and it runs the server under ``mysqld_safe``, which
restarts a killed one. The private Redis and RabbitMQ of the tests (``tests/private_servers.py``) build on
:class:`PrivateServer` with the executors of their pytest plugins.

Credentials are the ones of the settings (``MYSQL_USER``/``MYSQL_PASSWORD``): the private server gets that
account, so the services connect to it as to the shared one.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import getpass
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import pymysql
from mirakuru import TCPExecutor

from common.settings import Settings
from deploy.devsupport import free_port

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


_OPEN: set[PrivateServer] = set()


@atexit.register
def _close_open() -> None:
    """At interpreter exit, every server not closed yet (an exception that bypassed its owner's clean-up)."""
    for server in list(_OPEN):
        server.close()


class PrivateServerError(RuntimeError):
    """Raised when a private server cannot be set up (its program is missing, its data directory not made)."""


def program(name: str, package: str) -> str:
    found = shutil.which(name, path=SBIN)
    if found is None:
        raise PrivateServerError(
            f"{name} is not installed: a private {package} server needs it (apt-get install {package})"
        )
    return found


class PrivateServer:
    """One private server: ``settings(base)`` points settings at it; ``stop()``/``start()`` for outages;
    ``close()`` ends it and removes its directory (also when ``boot()`` failed half-way)."""

    name = ""

    def __init__(self, base: Settings) -> None:
        self.base = base
        self.dir = Path(tempfile.mkdtemp(prefix=f"ms-private-{self.name}-"))
        self.port = free_port()
        self.executor: TCPExecutor | None = None
        _OPEN.add(self)

    def boot(self) -> None:
        """Create the data directory and start the server (``close()`` removes everything in any case)."""
        raise NotImplementedError

    def settings(self, base: Settings) -> Settings:
        raise NotImplementedError

    @property
    def process(self) -> TCPExecutor:
        assert self.executor is not None, f"the private {self.name} server was not started"
        return self.executor

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (it leads its own process group)."""
        proc = self.executor.process if self.executor is not None else None
        return None if proc is None else proc.pid

    async def stop(self) -> None:
        await asyncio.to_thread(self.process.stop)

    async def start(self) -> None:
        """Start it again (same port, same data) and wait until it answers; a no-op if it runs."""
        if not self.process.running():
            await asyncio.to_thread(self.process.start)

    def end(self) -> None:
        """End the process for good (its data is about to be removed): a clean stop by default."""
        if self.executor is not None and self.executor.running():
            self.executor.stop()

    def close(self) -> None:
        try:
            self.end()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            _OPEN.discard(self)


class PrivateMariaDB(PrivateServer):
    """``mariadbd --no-defaults`` with the options of :data:`OPTIONS`, overridden by ``options`` (names as on
    the command line without the dashes, e.g. ``{"innodb-buffer-pool-size": "4G"}``)."""

    name = "mysql"
    # A small server for the tests: little memory, a fast start.
    OPTIONS: Mapping[str, str] = {
        "character-set-server": "utf8mb4",
        "collation-server": "utf8mb4_general_ci",
        "innodb-buffer-pool-size": "64M",
        "innodb-log-file-size": "16M",
        "skip-log-bin": "",
    }

    def __init__(self, base: Settings, options: Mapping[str, str] | None = None) -> None:
        super().__init__(base)
        self.options = {**self.OPTIONS, **(options or {})}
        self.stderr: IO[str] | None = None

    def boot(self) -> None:
        data, me = self.dir / "data", getpass.getuser()
        server = [
            f"--datadir={data}", f"--socket={self.dir / 'mysqld.sock'}", f"--pid-file={self.dir / 'mysqld.pid'}",
            f"--tmpdir={self.dir}", f"--log-error={self.error_log}", f"--user={me}",
            *(f"--{name}={value}" if value else f"--{name}" for name, value in self.options.items()),
        ]  # fmt: skip
        install = subprocess.run(
            [program("mariadb-install-db", "mariadb-server"), "--no-defaults", *server,
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if install.returncode != 0:
            raise PrivateServerError(f"mariadb-install-db failed:\n{install.stdout[-2000:]}\n{install.stderr[-2000:]}")
        command = [
            program("mariadbd", "mariadb-server"), "--no-defaults", *server,
            "--bind-address=127.0.0.1", f"--port={self.port}", "--skip-name-resolve",
        ]  # fmt: skip
        # What it says before its error log is open (a warning about open files) goes beside that log.
        self.stderr = (self.dir / "stderr.log").open("w")
        self.executor = TCPExecutor(command, "127.0.0.1", self.port, timeout=60, stderr=self.stderr)
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

    @property
    def error_log(self) -> Path:
        return self.dir / "error.log"

    def settings(self, base: Settings) -> Settings:
        return dataclasses.replace(base, mysql_host="127.0.0.1", mysql_port=self.port)

    def end(self) -> None:
        """SIGKILL: its data is thrown away, and a clean shutdown first writes every dirty page of the buffer
        pool (tens of seconds after a bulk load into a pool of gigabytes)."""
        if self.executor is not None:
            self.executor.kill()
        if self.stderr is not None:
            self.stderr.close()
