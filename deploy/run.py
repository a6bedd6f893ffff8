"""``make run``: the whole system on this machine, in the foreground, until Ctrl-C.

Checks that MySQL, Redis and RabbitMQ answer (one ``error:`` line and exit 1 if one does not), applies the
migrations, then runs the local webhook stand-in (when ``WEBHOOK_URL`` points at this machine), the gateway,
the producer and the consumer as child processes, each line of their output prefixed with its name.
Ctrl-C, SIGTERM or SIGHUP stops them all (SIGTERM, then SIGKILL after the grace period; a second Ctrl-C
kills at once). If one of them dies, the others are stopped and the exit status is 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from common.errors import SettingsError
from common.settings import Settings, mask_webhook_url
from deploy.devsupport import STANDIN, address, answers, dependencies, http_ok, wait_http

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
HINTS = {
    "MySQL": "start it (make services, or start mariadbd / mysqld)",
    "Redis": "start it (redis-server --daemonize yes, or make services)",
    "RabbitMQ": "start it (rabbitmq-server -detached, or make services)",
}
COLOURS = {"standin": "35", "gateway": "36", "producer": "33", "consumer": "32", "run": "1"}
FIRST = asyncio.FIRST_COMPLETED
TTY = sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def say(name: str, line: str) -> None:
    label = f"{name:<8} |"
    if TTY:
        label = f"\033[{COLOURS.get(name, '0')}m{label}\033[0m"
    try:
        sys.stdout.write(f"{label} {line}\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `make run | head` ended: keep supervising, silently
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 1


async def apply_migrations(s: Settings) -> list[int]:
    from common.db import create_pool
    from common.migrations import migrate

    pool = await create_pool(s, maxsize=1)
    try:
        return await migrate(pool)
    finally:
        pool.close()
        await pool.wait_closed()


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes a child get SIGTERM if this supervisor is killed outright (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    return lambda: libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.children: dict[str, asyncio.subprocess.Process] = {}
        self.pumps: list[asyncio.Task[None]] = []
        self.stop, self.kill = asyncio.Event(), asyncio.Event()
        self.preexec = _die_with_parent()

    def on_signal(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            self.kill.set()
            return
        say("run", f"{sig.name}: stopping everything (Ctrl-C again to kill at once)")
        self.stop.set()

    async def spawn(self, name: str, *argv: str) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True, preexec_fn=self.preexec,
            limit=1 << 20,
        )  # fmt: skip
        self.children[name] = proc
        self.pumps.append(asyncio.create_task(self.pump(name, proc)))
        say("run", f"started {name} (pid {proc.pid})")
        return proc

    async def pump(self, name: str, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:
                say(name, "(a line longer than 1 MiB was dropped)")
                continue
            if not line:
                return
            say(name, line.decode(errors="replace").rstrip())

    async def run(self, standin: tuple[str, int] | None) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self.on_signal, sig)
        if standin:  # up before the consumer posts to it
            proc = await self.spawn(
                "standin", sys.executable, str(STANDIN), "--host", standin[0], "--port", str(standin[1])
            )
            await wait_http(*standin, "/_control/health", lambda: proc.returncode is None, timeout=10)
        for name in ("gateway", "producer", "consumer"):
            if not self.stop.is_set() and all(p.returncode is None for p in self.children.values()):
                await self.spawn(name, sys.executable, "-m", name)
        waits = {asyncio.create_task(p.wait()): name for name, p in self.children.items()}
        announce = asyncio.create_task(self.announce(standin))
        stopped = asyncio.create_task(self.stop.wait())
        done, _ = await asyncio.wait([*waits, stopped], return_when=FIRST)
        announce.cancel()
        status = 0
        if not self.stop.is_set():
            name = next(waits[t] for t in done if t in waits)
            status = fail(f"{name} exited with status {self.children[name].returncode}; stopping the others")
        await self.shutdown()
        stopped.cancel()
        return status

    async def shutdown(self) -> None:
        """SIGTERM to the services, then to the stand-in (in-flight deliveries still reach it); SIGKILL what is
        left after ``SHUTDOWN_TIMEOUT_SECONDS`` + 5 s or on a second Ctrl-C."""
        loop = asyncio.get_running_loop()
        grace = self.s.shutdown_timeout_seconds + 5
        deadline = loop.time() + grace
        killed = asyncio.create_task(self.kill.wait())
        for names in ([n for n in self.children if n != "standin"], ["standin"]):
            procs = [p for n, p in self.children.items() if n in names]
            self.signal(procs, signal.SIGTERM)
            pending: list[asyncio.Future[Any]] = [asyncio.gather(*(p.wait() for p in procs)), killed]
            await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()), return_when=FIRST)
        killed.cancel()
        left = {n: p for n, p in self.children.items() if p.returncode is None}
        if left:
            why = "Ctrl-C again" if self.kill.is_set() else f"still running after {grace:g}s"
            say("run", f"killing {', '.join(left)} ({why})")
            self.signal(list(left.values()), signal.SIGKILL)
        await asyncio.gather(*(p.wait() for p in self.children.values()), *self.pumps)
        say("run", "all stopped")

    @staticmethod
    def signal(procs: list[asyncio.subprocess.Process], sig: signal.Signals) -> None:
        for proc in procs:
            if proc.returncode is None:  # each child leads its own process group: signal the whole group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)

    async def announce(self, standin: tuple[str, int] | None) -> None:
        s = self.s
        wildcard = s.gateway_host in ("0.0.0.0", "::", "")
        probe, shown = ("127.0.0.1", "localhost") if wildcard else (s.gateway_host, s.gateway_host)
        if s.gateway_host == "127.0.0.1":  # the default
            shown = "localhost"
        gateway = self.children.get("gateway")

        def alive() -> bool:
            return gateway is not None and gateway.returncode is None

        if gateway is None or not await wait_http(probe, s.gateway_port, "/healthz", alive):
            return
        base = f"http://{address(shown, s.gateway_port)}"
        amqp = urlsplit(s.amqp_url.reveal()).hostname or "127.0.0.1"
        ui = f"http://{address(amqp, 15672)}"
        if not await http_ok(amqp, 15672, "/"):
            ui = "off (rabbitmq-plugins enable rabbitmq_management)"
        token = "set: message data and state changes need it" if s.api_token else "not set"
        if not s.api_token:
            token += " (anyone who reaches the gateway may read and change everything; see README, Security)"
        hook = mask_webhook_url(s.webhook_url.reveal())  # a webhook.site URL is a capability: never shown whole
        if standin:
            hook += f" (local stand-in; what it got: http://{address(*standin)}/_control/received)"
        for line in (f"Dashboard    {base}/", f"API          {base}/messages",
                     f"Swagger      {base}/swagger/index.html", f"RabbitMQ UI  {ui}", f"webhook      {hook}",
                     f"API token    {token}",
                     "ready: `make demo` inserts sample messages; Ctrl-C stops everything"):  # fmt: skip
            say("run", line)


def main() -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        down = [(name, host, port) for name, host, port in dependencies(settings) if not answers(host, port)]
    except ValueError as exc:  # a port that is not a number in REDIS_URL or AMQP_URL
        return fail(f"REDIS_URL or AMQP_URL: {exc}")
    for name, host, port in down:
        fail(f"{name} does not answer at {address(host, port)} — {HINTS[name]} or use docker compose up")
    if down:
        return 1
    hook = urlsplit(settings.webhook_url.reveal())
    standin = None
    if hook.scheme == "http" and hook.hostname in LOCAL_HOSTS and hook.port:
        if answers(hook.hostname, hook.port, 1):
            shown = mask_webhook_url(settings.webhook_url.reveal())
            say("run", f"something already answers at {shown}: using it, not starting the stand-in")
        else:
            standin = ("::1" if hook.hostname == "::1" else "127.0.0.1", hook.port)
    ports = {"GATEWAY_PORT": settings.gateway_port, "PRODUCER_METRICS_PORT": settings.producer_metrics_port,
             "CONSUMER_METRICS_PORT": settings.consumer_metrics_port}  # fmt: skip
    for var, port in ports.items():
        if port and answers("127.0.0.1", port, 1):
            return fail(f"port {port} ({var}) is already in use — stop what listens there or set {var}")
    try:
        applied = asyncio.run(apply_migrations(settings))
    except Exception as exc:
        return fail(f"could not apply the migrations on {settings.mysql_host}:{settings.mysql_port}: {exc}")
    say("run", f"schema is at the latest version ({f'applied {applied}' if applied else 'nothing to apply'})")
    return asyncio.run(Supervisor(settings).run(standin))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before the children started: nothing to stop
        sys.exit(130)
