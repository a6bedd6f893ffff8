"""What the tests, the benchmark and ``make run`` share to run the system on this machine.

- free ports, "does it answer" and "wait until it answers" (:func:`free_port`, :func:`answers`,
  :func:`wait_for`, :func:`http_ok`, :func:`wait_http`);
- child processes with their output in a log file, stopped by their pid only (:class:`Process`,
  :func:`stop_all`);
- the sandbox of a run on the shared servers: its own database, RabbitMQ vhost and Redis key prefix,
  created and removed (:class:`Sandbox`), the vhost through the RabbitMQ management API when it answers,
  ``rabbitmqctl`` otherwise (:func:`rabbitmq_admin`);
- the process ids and start times of the servers behind the configured ports (:func:`server_processes`),
  so a test session can prove it left the machine's MariaDB, Redis and RabbitMQ as they were.

Connection details and credentials always come from :class:`common.settings.Settings` (``MYSQL_*``,
``REDIS_URL``, ``AMQP_URL``, ``.env``): the same values the services read.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar
from urllib.parse import quote, unquote, urlsplit

from common.settings import Secret, Settings

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "deploy" / "standin.py"
T = TypeVar("T")


# --- ports and waiting -------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(host: str, port: int, timeout: float = 3.0) -> bool:
    """Something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def wait_for(
    check: Callable[[], Awaitable[T]], timeout: float = 30.0, what: str = "condition", interval: float = 0.05
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


async def http_ok(host: str, port: int, path: str) -> bool:
    """``GET path`` at ``host:port`` answers 200 (plain HTTP/1.0, short timeouts)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        return (await asyncio.wait_for(reader.readline(), 2)).split()[1:2] == [b"200"]
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


async def wait_http(
    host: str, port: int, path: str, alive: Callable[[], bool] = lambda: True, timeout: float = 1e9
) -> bool:
    """Poll ``GET path`` until it answers 200 (True), or ``alive()`` turns false or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not await http_ok(host, port, path):
        if not alive() or time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


def dependencies(s: Settings) -> list[tuple[str, str, int]]:
    """``(name, host, port)`` of MySQL, Redis and RabbitMQ as the settings name them (Redis over a unix
    socket is left out: it is the user's own set-up and the services report it if it is wrong)."""
    redis, amqp = urlsplit(s.redis_url.reveal()), urlsplit(s.amqp_url.reveal())
    deps = [("MySQL", s.mysql_host, s.mysql_port)]
    if redis.scheme != "unix":
        deps.append(("Redis", redis.hostname or "127.0.0.1", redis.port or 6379))
    deps.append(("RabbitMQ", amqp.hostname or "127.0.0.1", amqp.port or (5671 if amqp.scheme == "amqps" else 5672)))
    return deps


# --- child processes ---------------------------------------------------------------------------------


class Process:
    """One child process (``python -m <module>``, the stand-in), its output in
    ``<log_dir>/<name>.log``, in its own session (a Ctrl-C of the parent reaches the parent only)."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path, cwd: Path = ROOT) -> None:
        self.name = name
        self.env = dict(env)
        self.port: int | None = None
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                list(argv), cwd=cwd, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    @classmethod
    def module(cls, name: str, module: str, env: Mapping[str, str], log_dir: Path) -> Self:
        return cls(name, [sys.executable, "-m", module], env, log_dir)

    @classmethod
    def standin(cls, name: str, env: Mapping[str, str], log_dir: Path, port: int | None = None) -> Self:
        """The local webhook stand-in on ``port`` (a free one by default), in ``.port``."""
        port = port or free_port()
        proc = cls(name, [sys.executable, str(STANDIN), "--port", str(port)], env, log_dir)
        proc.port = port
        return proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def kill9(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; the exit status."""
        stop_all([self], timeout)
        return int(self.proc.returncode)

    def close(self) -> None:
        self.kill9()


def stop_all(procs: Sequence[Process], timeout: float = 15.0) -> None:
    """SIGTERM each (by its pid), wait up to ``timeout`` for all, then SIGKILL the rest."""
    for p in procs:
        if p.alive():
            p.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill9()


# --- RabbitMQ vhosts: the management API, or rabbitmqctl -----------------------------------------------


class RabbitAdmin(Protocol):
    def create_vhost(self, vhost: str, user: str) -> None: ...
    def delete_vhost(self, vhost: str) -> None: ...
    def close_connections(self, vhost: str) -> int: ...
    def vhosts(self) -> list[str]: ...
    def queue_types(self, vhost: str) -> dict[str, str]: ...
    def queue_messages(self, vhost: str) -> dict[str, int]: ...


class ManagementAPI:
    """The RabbitMQ management HTTP API (``.../api``) with the AMQP user's credentials."""

    def __init__(self, url: str, user: str, password: str) -> None:
        self.url = url.rstrip("/")
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def _call(self, method: str, path: str, body: object = None) -> Any:
        req = urllib.request.Request(
            f"{self.url}{path}", method=method, data=json.dumps(body).encode() if body is not None else None
        )
        req.add_header("Authorization", self.auth)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            if method == "DELETE" and exc.code == 404:
                return None
            raise RuntimeError(f"RabbitMQ management {method} {path}: HTTP {exc.code} {exc.read()[:200]!r}") from None
        return json.loads(raw) if raw else None

    def create_vhost(self, vhost: str, user: str) -> None:
        v = quote(vhost, safe="")
        self._call("PUT", f"/vhosts/{v}")
        self._call("PUT", f"/permissions/{v}/{quote(user, safe='')}", {"configure": ".*", "write": ".*", "read": ".*"})

    def delete_vhost(self, vhost: str) -> None:
        self._call("DELETE", f"/vhosts/{quote(vhost, safe='')}")

    def close_connections(self, vhost: str) -> int:
        names = [c["name"] for c in self._call("GET", f"/vhosts/{quote(vhost, safe='')}/connections") or []]
        for name in names:
            self._call("DELETE", f"/connections/{quote(name, safe='')}")
        return len(names)

    def vhosts(self) -> list[str]:
        return [str(v["name"]) for v in self._call("GET", "/vhosts") or []]

    def queue_types(self, vhost: str) -> dict[str, str]:
        """Each queue of ``vhost`` and its type (``classic``, ``quorum``), as the management UI shows them."""
        return {str(q["name"]): str(q["type"]) for q in self._call("GET", f"/queues/{quote(vhost, safe='')}") or []}

    def queue_messages(self, vhost: str) -> dict[str, int]:
        """Each queue of ``vhost`` and its messages (ready and unacknowledged)."""
        queues = self._call("GET", f"/queues/{quote(vhost, safe='')}") or []
        return {str(q["name"]): int(q.get("messages", 0)) for q in queues}

    def version(self) -> str:
        return str(self._call("GET", "/overview").get("rabbitmq_version"))


class Rabbitmqctl:
    """``rabbitmqctl`` (as a user allowed to run it), optionally for another node (``env``)."""

    def __init__(self, argv: Sequence[str] = ("rabbitmqctl",), env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.env = None if env is None else dict(env)

    def run(self, *args: str, check: bool = True, stdin: str | None = None) -> str:
        done = subprocess.run(
            [*self.argv, "-q", *args], capture_output=True, text=True, timeout=60, check=False, env=self.env,
            input=stdin,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def create_vhost(self, vhost: str, user: str) -> None:
        self.run("add_vhost", vhost)
        self.run("set_permissions", "-p", vhost, user, ".*", ".*", ".*")

    def delete_vhost(self, vhost: str) -> None:
        self.run("delete_vhost", vhost, check=False)

    def create_vhosts(self, vhosts: Sequence[str], user: str) -> None:
        """Several vhosts, each with ``user``'s full permissions, in one call: ``import_definitions`` of
        definitions that name only them (nothing else of the server changes), one Erlang VM boot for all. On
        standard input: Debian's ``rabbitmqctl`` runs as the ``rabbitmq`` user, who may not read our files."""
        permissions = [{"user": user, "vhost": v, "configure": ".*", "write": ".*", "read": ".*"} for v in vhosts]
        definitions = {"vhosts": [{"name": v} for v in vhosts], "permissions": permissions}
        self.run("import_definitions", stdin=json.dumps(definitions))

    def close_connections(self, vhost: str) -> int:
        rows = [line.split("\t") for line in self.run("list_connections", "vhost", "pid").splitlines()]
        pids = [row[1] for row in rows if len(row) == 2 and row[0] == vhost]
        closed = 0
        for pid in pids:
            with contextlib.suppress(RuntimeError):  # gone in the meantime
                self.run("close_connection", pid, "closed by the test suite")
                closed += 1
        return closed

    def vhosts(self) -> list[str]:
        return self.run("list_vhosts", "name").split()

    def queue_types(self, vhost: str) -> dict[str, str]:
        rows = [line.split("\t") for line in self.run("list_queues", "-p", vhost, "name", "type").splitlines()]
        return {row[0]: row[1] for row in rows if len(row) == 2 and row != ["name", "type"]}  # not its header

    def queue_messages(self, vhost: str) -> dict[str, int]:
        rows = [line.split("\t") for line in self.run("list_queues", "-p", vhost, "name", "messages").splitlines()]
        return {row[0]: int(row[1]) for row in rows if len(row) == 2 and row[1].isdigit()}


class VhostPool(Rabbitmqctl):
    """``rabbitmqctl`` with vhosts made ahead, for many short-lived sandboxes (the test suite's). Each call of
    ``rabbitmqctl`` boots an Erlang VM (about 0.5 s and 0.7 s of CPU), and a sandbox's vhost took three (add,
    permissions, delete): ``make test`` took twice as long where RabbitMQ has no management plugin. Here
    :meth:`take` hands out a vhost made with :data:`BATCH` others in one call; :meth:`create_vhost` of it does
    nothing, :meth:`delete_vhost` of it deletes it in the background, and :meth:`close` deletes the ones never
    taken, waits for every deletion and returns what could not be deleted. Other vhosts pass straight through."""

    BATCH = 16

    def __init__(self, user: str, prefix: str = "mst_", argv: Sequence[str] = ("rabbitmqctl",)) -> None:
        super().__init__(argv)
        self.user, self.prefix = user, prefix
        self._ready: list[str] = []
        self._taken: set[str] = set()
        self._lock = threading.Lock()
        self._deleting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vhost-delete")
        self._deletions: list[tuple[str, Future[str]]] = []

    def take(self) -> str:
        with self._lock:
            if not self._ready:
                names = [f"{self.prefix}{secrets.token_hex(5)}" for _ in range(self.BATCH)]
                try:
                    self.create_vhosts(names, self.user)
                except BaseException:  # the import may have made some of them before it failed
                    for vhost in names:
                        super().delete_vhost(vhost)
                    raise
                self._ready = names
            vhost = self._ready.pop()
            self._taken.add(vhost)
            return vhost

    def create_vhost(self, vhost: str, user: str) -> None:
        if vhost not in self._taken:
            super().create_vhost(vhost, user)

    def delete_vhost(self, vhost: str) -> None:
        with self._lock:
            pooled = vhost in self._taken
            if pooled:
                self._taken.discard(vhost)
                self._deletions.append((vhost, self._deleting.submit(self.run, "delete_vhost", vhost)))
        if not pooled:
            super().delete_vhost(vhost)

    def close(self) -> list[str]:
        with self._lock:
            for vhost in [*self._ready, *self._taken]:  # never taken, or taken and never given back
                self._deletions.append((vhost, self._deleting.submit(self.run, "delete_vhost", vhost)))
            self._ready, self._taken = [], set()
        self._deleting.shutdown(wait=True)
        problems = []
        for vhost, done in self._deletions:
            if (exc := done.exception()) is not None:
                problems.append(f"vhost {vhost}: {exc}")
        return problems


def amqp_credentials(s: Settings) -> tuple[str, str]:
    url = urlsplit(s.amqp_url.reveal())
    return unquote(url.username or "guest"), unquote(url.password or "guest")


def rabbitmq_admin(s: Settings) -> RabbitAdmin:
    """The management API when it answers (``RABBITMQ_MANAGEMENT_URL``, default the AMQP host on port
    15672), otherwise ``rabbitmqctl``: the tests do not need the management plugin."""
    host = urlsplit(s.amqp_url.reveal()).hostname or "127.0.0.1"
    url = os.environ.get("RABBITMQ_MANAGEMENT_URL") or f"http://{address(host, 15672)}/api"
    api = urlsplit(url)
    if answers(api.hostname or host, api.port or 80):
        return ManagementAPI(url, *amqp_credentials(s))
    return Rabbitmqctl()


# --- the sandbox of a run on the shared servers ----------------------------------------------------------


class Sandbox:
    """A run's own MySQL database, RabbitMQ vhost and Redis key prefix, all named ``name`` (the vhost
    ``vhost`` when given: one a :class:`VhostPool` made ahead); nothing else of the servers is touched.
    ``create()`` makes the vhost (the database is created by the migrations), ``remove()`` drops all three."""

    def __init__(self, base: Settings, name: str, rabbit: RabbitAdmin | None = None, vhost: str | None = None) -> None:
        self.name = name
        self.vhost = vhost or name
        amqp = urlsplit(base.amqp_url.reveal())
        self.settings = dataclasses.replace(
            base,
            mysql_database=name,
            redis_prefix=f"{name}:",
            amqp_url=Secret(amqp._replace(path="/" + quote(self.vhost, safe="")).geturl()),
        )
        self._rabbit = rabbit
        self.vhost_created = False

    @property
    def rabbit(self) -> RabbitAdmin:
        if self._rabbit is None:
            self._rabbit = rabbitmq_admin(self.settings)
        return self._rabbit

    def env(self) -> dict[str, str]:
        """The connection environment of every service process of this run."""
        s = self.settings
        return {
            "MYSQL_HOST": s.mysql_host,
            "MYSQL_PORT": str(s.mysql_port),
            "MYSQL_USER": s.mysql_user,
            "MYSQL_PASSWORD": s.mysql_password.reveal(),
            "MYSQL_DATABASE": s.mysql_database,
            "REDIS_URL": s.redis_url.reveal(),
            "REDIS_PREFIX": s.redis_prefix,
            "AMQP_URL": s.amqp_url.reveal(),
        }

    def create(self) -> None:
        self.rabbit.create_vhost(self.vhost, amqp_credentials(self.settings)[0])
        self.vhost_created = True

    def remove(self) -> list[str]:
        """Drop the database, the vhost and the prefixed keys; what could not be dropped (empty: all clean)."""
        problems: list[str] = []
        for what, drop in (
            (f"database {self.name}", self._drop_database),
            (f"vhost {self.vhost}", self._drop_vhost),
            (f"redis prefix {self.settings.redis_prefix}", self._drop_redis_prefix),
        ):
            try:
                drop()
            except Exception as exc:
                problems.append(f"{what}: {exc}")
        return problems

    def _drop_database(self) -> None:
        import pymysql

        from common.db import connect_kwargs

        conn = pymysql.connect(**connect_kwargs(self.settings, with_db=False))  # type: ignore[arg-type]
        try:
            with conn.cursor() as cur, warnings.catch_warnings():  # the note when it was never created
                warnings.simplefilter("ignore")
                cur.execute(f"DROP DATABASE IF EXISTS `{self.name}`")
        finally:
            conn.close()

    def _drop_vhost(self) -> None:
        if self.vhost_created:
            self.rabbit.delete_vhost(self.vhost)

    def _drop_redis_prefix(self) -> None:
        import redis

        client = redis.Redis.from_url(self.settings.redis_url.reveal())
        try:
            batch: list[bytes] = []
            for key in client.scan_iter(match=f"{self.settings.redis_prefix}*", count=5000):
                batch.append(key)
                if len(batch) >= 5000:
                    client.unlink(*batch)
                    batch = []
            if batch:
                client.unlink(*batch)
        finally:
            client.close()


# --- the machine's own servers: which process serves each configured port ------------------------------

ServerProcess = tuple[int, float]  # pid, start time (seconds after the machine booted)


def proc_stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (``fields[0]`` is the state, field 3 of
    proc(5)); the name, in parentheses, may hold spaces. Raises ``OSError`` when there is no such process."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _started_after_boot(process: Any) -> float:
    """When ``process`` (a ``psutil.Process``) started, in seconds after boot: the kernel's own count
    (``/proc/<pid>/stat``, clock ticks), which a step of the wall clock cannot move. psutil's ``create_time``
    is boot time plus that count, and the boot time is worked out from the wall clock: when the VM's clock was
    set 11 s forward during a CI run, every server looked restarted. Without ``/proc``: psutil's figures."""
    try:
        return int(proc_stat(process.pid)[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5)
    except (OSError, ValueError, IndexError):
        import psutil

        return float(process.create_time() - psutil.boot_time())


def server_processes(s: Settings) -> dict[str, ServerProcess | None]:
    """For MySQL, Redis and RabbitMQ as the settings name them: the pid and start time of the process that
    listens on that port on this machine (None when none does, or it cannot be seen)."""
    import psutil

    listening: dict[int, int] = {}
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.pid is not None and conn.laddr:
                listening.setdefault(int(conn.laddr.port), conn.pid)
    out: dict[str, ServerProcess | None] = {}
    for name, _, port in dependencies(s):
        pid = listening.get(port)
        try:
            out[f"{name} (port {port})"] = None if pid is None else (pid, _started_after_boot(psutil.Process(pid)))
        except psutil.Error:
            out[f"{name} (port {port})"] = None
    return out


def changed_servers(before: Mapping[str, ServerProcess | None], after: Mapping[str, ServerProcess | None]) -> list[str]:
    """One line per server whose process is not the one seen before (stopped, restarted or replaced)."""
    out = []
    for name, was in before.items():
        now = after.get(name)
        if was is not None and now != was:
            seen = "nothing listens now" if now is None else f"now pid {now[0]} started {now[1]:.2f} s after boot"
            out.append(f"{name}: was pid {was[0]} started {was[1]:.2f} s after boot, {seen}")
    return out
