"""Build the service images (``make images``) and prove them (``make test-images``), with podman or docker.

``build``: every target of deploy/Dockerfile (gateway, producer, consumer, standin) as
``message-sender-<target>:latest``. podman is preferred when installed (no daemon); docker otherwise. podman runs
with ``--pull=never --format docker`` (its OCI format drops HEALTHCHECK) and a CONTAINERS_CONF of its own (the
hard ``nofile`` limit of this shell, runc, cgroupfs). When the Dockerfile's base image is missing and mmdebstrap
is installed, a local stand-in for it is made from Debian bookworm (python3, venv, CA certificates, plus the
host's extra ones from /usr/local/share/ca-certificates so pip inside the build trusts what the host trusts):
no registry needs to be reachable. ``BASE_IMAGE=pull`` pulls the real one instead.

``prove``: builds, then runs each container alone (host networking, read-only root filesystem) against the
host's MySQL, Redis and RabbitMQ in a database, vhost and key prefix of its own, and checks what a user would:
``/readyz``, every HEALTHCHECK, a non-root process, a message end to end (webhook stand-in, MySQL row, Redis
key, and its trace: tracing is on, exported to a receiver here), and a consumer stopped alone (a new message
stays queued, the gateway stays ready) then started again (the message goes out). Then the same through
docker-compose.yml with deploy/compose.host.yml (tracing off, its default). It removes its containers,
database, vhost and keys whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE_OVERRIDE = ROOT / "deploy" / "compose.host.yml"
TARGETS = ("gateway", "producer", "consumer", "standin")
PORT_VARS = {"gateway": "GATEWAY_PORT", "producer": "PRODUCER_METRICS_PORT",
             "consumer": "CONSUMER_METRICS_PORT", "standin": "STANDIN_PORT"}  # fmt: skip
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
DEBIAN_BASE = ["python3", "python3-venv", "python-is-python3", "ca-certificates"]


def log(text: str) -> None:
    print(f"[images {time.strftime('%H:%M:%S')}] {text}", flush=True)


class Failed(Exception):
    """Raised when an image does not do what it promises."""


# --- the engine -------------------------------------------------------------------------------------------------


class Engine:
    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name, self.env = name, env

    @property
    def podman(self) -> bool:
        return self.name == "podman"

    def run(self, *args: str, check: bool = True, timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.name, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw
        )
        if check and result.returncode != 0:
            raise Failed(f"{self.name} {' '.join(args[:3])}... failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result

    def has_image(self, name: str) -> bool:
        return self.run("image", "inspect", name, check=False).returncode == 0


def find_engine(workdir: Path) -> Engine:
    env = dict(os.environ)
    if shutil.which("podman"):
        conf = workdir / "containers.conf"
        hard = _hard_nofile()
        conf.write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={hard}:{hard}", "nproc=32768:32768"]\n'
            '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
        )
        env["CONTAINERS_CONF"] = str(conf)
        env["BUILDAH_FORMAT"] = "docker"  # podman-compose's builds too: keep HEALTHCHECK
        return Engine("podman", env)
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return Engine("docker", env)
    raise Failed("neither podman nor a running docker found (apt-get install podman)")


def _hard_nofile() -> int:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1048576 if hard == resource.RLIM_INFINITY else hard


def base_image() -> str:
    match = re.search(r"^FROM\s+(\S+)\s+AS\s+base\b", DOCKERFILE.read_text(), re.MULTILINE | re.IGNORECASE)
    if not match:
        raise Failed("deploy/Dockerfile has no `FROM <image> AS base`")
    return match.group(1)


def ensure_base(engine: Engine) -> None:
    image = base_image()
    if engine.has_image(image):
        return
    if not engine.podman or os.environ.get("BASE_IMAGE") == "pull" or not shutil.which("mmdebstrap"):
        log(f"pulling {image}")
        engine.run("pull", image)
        return
    log(f"{image} is missing: making a local stand-in from Debian bookworm with mmdebstrap")
    hooks = []
    certs = sorted(HOST_CA_DIR.glob("*.crt")) if HOST_CA_DIR.is_dir() else []
    if certs:
        hooks += ["--customize-hook=copy-in " + " ".join(map(str, certs)) + f" {HOST_CA_DIR}/"]
    hooks += ['--customize-hook=chroot "$1" update-ca-certificates --fresh >/dev/null']
    slim = [f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")]
    slim += ["--dpkgopt=path-include=/usr/share/doc/*/copyright"]
    debootstrap = subprocess.Popen(
        ["mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(DEBIAN_BASE), *slim, *hooks,
         "bookworm", "-"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    imported = subprocess.run(
        [engine.name, "import", "-", image], stdin=debootstrap.stdout, env=engine.env, capture_output=True, text=True
    )
    if debootstrap.wait() != 0 or imported.returncode != 0:
        raise Failed(f"could not make the base image: {imported.stderr[-2000:]}")


def build_target(engine: Engine, target: str, name: str, tag: str = "latest", timeout: float = 600) -> str:
    """Build one target of deploy/Dockerfile as ``name:tag`` (podman: under localhost/, docker format)."""
    image = f"localhost/{name}:{tag}" if engine.podman else f"{name}:{tag}"
    extra = ["--pull=never", "--format", "docker"] if engine.podman else []
    started = time.monotonic()
    engine.run("build", "-q", *extra, "-f", str(DOCKERFILE), "--target", target, "-t", image, ".", timeout=timeout)
    log(f"built {image} in {time.monotonic() - started:.0f}s")
    return image


def build(engine: Engine, tag: str = "latest") -> dict[str, str]:
    ensure_base(engine)
    images = {target: build_target(engine, target, f"message-sender-{target}", tag) for target in TARGETS}
    for target, image in images.items():
        size = int(engine.run("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
        log(f"{target}: {size / 1e6:.0f} MB")
    return images


# --- the host's servers, isolated -------------------------------------------------------------------------------


class Isolation:
    """A database, a vhost and a Redis key prefix of our own on the host's servers (removed on exit)."""

    def __init__(self) -> None:
        from common.settings import Settings
        from deploy.devsupport import amqp_credentials, rabbitmq_admin

        self.host = Settings.from_env(dotenv=None)
        self.name = f"ms_images_{secrets.token_hex(4)}"
        amqp = urlsplit(self.host.amqp_url.reveal())
        self.amqp_url = amqp._replace(path="/" + quote(self.name, safe="")).geturl()
        self.amqp_user = amqp_credentials(self.host)[0]
        # the vhost and the queue depth: the management API when it answers, else rabbitmqctl (as the tests do)
        self.rabbit = rabbitmq_admin(self.host)

    def env(self) -> dict[str, str]:
        h = self.host
        return {"MYSQL_HOST": h.mysql_host, "MYSQL_PORT": str(h.mysql_port), "MYSQL_USER": h.mysql_user,
                "MYSQL_PASSWORD": h.mysql_password.reveal(), "MYSQL_DATABASE": self.name,
                "REDIS_URL": h.redis_url.reveal(), "REDIS_PREFIX": f"{self.name}:", "AMQP_URL": self.amqp_url,
                "AMQP_QUEUE_TYPE": os.environ.get("AMQP_QUEUE_TYPE", "classic")}  # fmt: skip

    def _sql(self, statement: str, args: tuple[Any, ...] = (), database: str | None = None) -> list[tuple[Any, ...]]:
        import pymysql

        h = self.host
        conn = pymysql.connect(host=h.mysql_host, port=h.mysql_port, user=h.mysql_user,
                               password=h.mysql_password.reveal(), database=database, autocommit=True)  # fmt: skip
        try:
            with conn.cursor() as cur:
                cur.execute(statement, args)
                return list(cur.fetchall())
        finally:
            conn.close()

    def row(self, message_id: int) -> dict[str, Any]:
        rows = self._sql(
            "SELECT status, remote_message_id FROM messages WHERE id = %s", (message_id,), database=self.name
        )
        return {"status": rows[0][0], "remote_message_id": rows[0][1]} if rows else {}

    def redis_has(self, key: str) -> bool:
        import redis

        client = redis.Redis.from_url(self.host.redis_url.reveal())
        try:
            return bool(client.exists(f"{self.name}:{key}"))
        finally:
            client.close()

    def dispatch_depth(self) -> int:
        return self.rabbit.queue_messages(self.name).get("message_sender.dispatch", 0)

    def __enter__(self) -> Isolation:
        self.rabbit.create_vhost(self.name, self.amqp_user)
        self._sql(f"CREATE DATABASE `{self.name}` CHARACTER SET utf8mb4")
        log(f"isolated in database/vhost {self.name}, Redis prefix {self.name}:")
        return self

    def __exit__(self, *_: object) -> None:
        import redis

        def delete_keys() -> None:
            client = redis.Redis.from_url(self.host.redis_url.reveal())
            try:
                keys = list(client.scan_iter(match=f"{self.name}:*", count=1000))
                if keys:
                    client.delete(*keys)
            finally:
                client.close()

        steps: list[tuple[str, Callable[[], object]]] = [
            ("vhost", lambda: self.rabbit.delete_vhost(self.name)),
            ("database", lambda: self._sql(f"DROP DATABASE IF EXISTS `{self.name}`")),
            ("Redis keys", delete_keys),
        ]
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # go on with the others, and say what is left behind
                log(f"WARNING: could not remove the {what} {self.name}: {exc!r}")
        log(f"removed database, vhost and Redis keys {self.name}")


# --- checks -----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, method=method, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            raw = answer.read()
            status = answer.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, ValueError, KeyError, IndexError) as exc:
            last = exc
        time.sleep(0.25)
    raise Failed(f"timed out after {timeout:.0f}s waiting until {what}" + (f" (last error: {last!r})" if last else ""))


def answers(url: str, status: int = 200) -> Callable[[], bool]:
    return lambda: http("GET", url)[0] == status


class Stack:
    """The four containers' addresses and the checks on them."""

    def __init__(self, engine: Engine, iso: Isolation, ports: dict[str, int], containers: dict[str, str]) -> None:
        self.engine, self.iso, self.ports, self.containers = engine, iso, ports, containers

    def url(self, service: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}{path}"

    def wait_ready(self) -> None:
        wait_for("the stand-in answers", answers(self.url("standin", "/_control/health")))
        wait_for("the producer's /healthz is ok", answers(self.url("producer", "/healthz")))
        wait_for("the consumer's /healthz is ok", answers(self.url("consumer", "/healthz")))
        wait_for("the gateway's /readyz is ready", answers(self.url("gateway", "/readyz")))
        status, body = http("GET", self.url("gateway", "/readyz"))
        if body.get("status") != "ready":
            raise Failed(f"/readyz: {status} {body}")
        log(f"/readyz: {body}")

    def check_containers(self) -> None:
        for service, container in self.containers.items():
            if self.engine.podman:
                result = self.engine.run("healthcheck", "run", container, check=False)
                if result.returncode != 0:
                    raise Failed(f"{service}: HEALTHCHECK failed: {result.stdout}{result.stderr}")
            else:

                def healthy(c: str = container) -> bool:
                    return (
                        self.engine.run("inspect", "--format", "{{.State.Health.Status}}", c).stdout.strip()
                        == "healthy"
                    )

                wait_for(f"{service} is healthy", healthy, timeout=90)
            status = self.engine.run("exec", container, "cat", "/proc/1/status").stdout
            uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.MULTILINE)
            if not uids or "0" in uids.groups():
                raise Failed(f"{service}: the process runs as {uids.groups() if uids else '?'}")
            log(f"{service}: HEALTHCHECK passes, process uid {uids.group(1)}")

    def send(self, content: str) -> int:
        status, body = http(
            "POST", self.url("gateway", "/messages"), {"recipient": "+905551111111", "content": content}
        )
        if status != 201:
            raise Failed(f"POST /messages: {status} {body}")
        return int(body["id"])

    def received(self) -> list[str]:
        return [r["body"]["content"] for r in http("GET", self.url("standin", "/_control/received"))[1]]

    def wait_sent(self, message_id: int, content: str) -> None:
        wait_for(f"message {message_id} is sent", lambda: self.iso.row(message_id).get("status") == "sent")
        remote = self.iso.row(message_id)["remote_message_id"]
        wait_for(f"Redis has message:{remote}", lambda: self.iso.redis_has(f"message:{remote}"), timeout=10)
        if self.received().count(content) != 1:
            raise Failed(f"the stand-in got {content!r} {self.received().count(content)} times")
        log(f"message {message_id} sent end to end (messageId {remote} cached)")

    def consumer_away_and_back(self, stop: Callable[[], object], start: Callable[[], object]) -> None:
        stop()
        log("consumer stopped")
        content = f"while the consumer was away {secrets.token_hex(3)}"
        message_id = self.send(content)
        wait_for(f"message {message_id} is queued", lambda: self.iso.row(message_id).get("status") == "queued")
        wait_for("the dispatch queue holds it", lambda: self.iso.dispatch_depth() >= 1, timeout=30)
        if self.iso.row(message_id)["status"] != "queued" or content in self.received():
            raise Failed("a message went out with no consumer running")
        status, body = http("GET", self.url("gateway", "/readyz"))
        if status != 200 or not answers(self.url("producer", "/healthz"))():
            raise Failed(f"without a consumer the others are not ready: /readyz {status} {body}")
        log(f"message {message_id} stays queued, gateway ready, producer healthy")
        start()
        log("consumer started again")
        self.wait_sent(message_id, content)

    def prove(self, stop: Callable[[], object], start: Callable[[], object]) -> None:
        self.wait_ready()
        self.check_containers()
        content = f"image proof {secrets.token_hex(3)}"
        self.wait_sent(self.send(content), content)
        self.consumer_away_and_back(stop, start)


def service_env(iso: Isolation, ports: dict[str, int]) -> dict[str, str]:
    return {**iso.env(), **{PORT_VARS[s]: str(p) for s, p in ports.items()},
            "WEBHOOK_URL": f"http://127.0.0.1:{ports['standin']}/webhook", "SEND_INTERVAL_SECONDS": "1",
            "SEND_BATCH_SIZE": "10", "SHUTDOWN_TIMEOUT_SECONDS": "10", "LOG_LEVEL": "INFO"}  # fmt: skip


class TraceReceiver:
    """An OTLP/HTTP receiver on this host (the containers share its network): the spans the services export,
    as (service, span name, trace id), decoded with opentelemetry-proto (the test extras)."""

    def __init__(self) -> None:
        import http.server
        import threading

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list[tuple[str, str, str]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
                    attributes = {a.key: a.value.string_value for a in rs.resource.attributes}
                    service = attributes.get("service.name", "")
                    receiver.spans += [(service, s.name, s.trace_id.hex()) for ss in rs.scope_spans for s in ss.spans]
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def check_one_trace_per_message(self) -> None:
        """A trace whose spans come from the three services and include the webhook request."""

        def found() -> bool:
            by_trace: dict[str, set[str]] = {}
            for service, name, trace in list(self.spans):
                by_trace.setdefault(trace, set()).add(service if name != "webhook request" else name)
            return any({"gateway", "producer", "consumer", "webhook request"} <= seen for seen in by_trace.values())

        wait_for("a trace spans gateway, producer and consumer (tracing on in the images)", found, timeout=30)
        log(f"tracing on: {len(self.spans)} spans received, one trace from POST /messages to the webhook request")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def containers(
    engine: Engine, images: dict[str, str], iso: Isolation, ports: dict[str, int], extra: dict[str, str] | None = None
) -> Iterator[dict[str, str]]:
    names = {s: f"{iso.name}-{s}" for s in TARGETS}
    env = {**service_env(iso, ports), **(extra or {})}
    try:
        for service in ("standin", "gateway", "producer", "consumer"):
            flags = ["--read-only"] + (["--tmpfs", "/tmp"] if not engine.podman else [])
            variables = (
                [f"{PORT_VARS[service]}={ports[service]}"]
                if service == "standin"
                else [f"{k}={v}" for k, v in env.items()]
            )
            engine.run("run", "-d", "--name", names[service], "--network", "host", *flags,
                       *[a for v in variables for a in ("-e", v)], images[service])  # fmt: skip
        yield names
    except Exception:
        for service, name in names.items():
            logs = engine.run("logs", "--tail", "30", name, check=False)
            print(f"--- {service} log ---\n{logs.stdout[-4000:]}{logs.stderr[-4000:]}", file=sys.stderr)
        raise
    finally:
        for name in names.values():
            engine.run("rm", "-f", "-t", "40", name, check=False)


def prove_alone(engine: Engine, images: dict[str, str]) -> None:
    """Each container alone, with tracing on (the images have the extra): the services export to a receiver
    here. (The compose proof runs with tracing off, its default.)"""
    ports = {s: free_port() for s in TARGETS}
    receiver = TraceReceiver()
    traced = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"}
    try:
        with Isolation() as iso, containers(engine, images, iso, ports, traced) as names:
            stack = Stack(engine, iso, ports, names)
            stack.prove(
                stop=lambda: engine.run("stop", "-t", "40", names["consumer"]),
                start=lambda: engine.run("start", names["consumer"]),
            )
            receiver.check_one_trace_per_message()
    finally:
        receiver.close()
    log("each container alone: proved")


def prove_compose(engine: Engine) -> None:
    tool = compose_tool(engine)
    ports = {s: free_port() for s in TARGETS}
    with Isolation() as iso:
        project = iso.name.replace("_", "-")
        env = {**engine.env, **service_env(iso, ports), "WEBHOOK_URL": f"http://127.0.0.1:{ports['standin']}/webhook"}
        command = [*tool, "-p", project, "-f", str(ROOT / "docker-compose.yml"), "-f", str(COMPOSE_OVERRIDE)]

        def compose(*args: str, timeout: float = 600) -> None:
            result = subprocess.run(
                [*command, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
            )
            if result.returncode != 0:
                raise Failed(f"compose {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")

        started = time.monotonic()
        try:
            compose("build")
            compose("up", "-d")
            listed = engine.run("ps", "-a", "--filter", f"label=com.docker.compose.project={project}",
                                "--format", "{{.Names}}").stdout.split()  # fmt: skip
            names = {s: next(n for n in listed if re.search(rf"[-_]{s}[-_]\d+$", n)) for s in TARGETS}
            stack = Stack(engine, iso, ports, names)
            stack.prove(stop=lambda: compose("stop", "consumer"), start=lambda: compose("start", "consumer"))
            log(f"docker-compose.yml with deploy/compose.host.yml: proved in {time.monotonic() - started:.0f}s")
        except Exception:
            logs = subprocess.run([*command, "logs"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
            print(f"--- compose logs ---\n{logs.stdout[-6000:]}", file=sys.stderr)
            raise
        finally:
            subprocess.run([*command, "down", "-t", "40"], env=env, cwd=ROOT, capture_output=True, timeout=300)
            for target in TARGETS:  # compose's tags of the (shared, cached) layers
                engine.run("rmi", f"{project}_{target}", f"{project}-{target}", check=False)


# --- make docker-build / docker-down: the stack in containers ----------------------------------------------------

SERVERS = ("compose", "host")
COMPOSE = ROOT / "docker-compose.yml"


def compose_tool(engine: Engine) -> list[str]:
    """``docker compose`` with docker; with podman, podman-compose (from the test extras' venv or the PATH)."""
    if not engine.podman:
        return ["docker", "compose"]
    beside = Path(sys.executable).parent / "podman-compose"
    found = str(beside) if beside.exists() else shutil.which("podman-compose")
    if found is None:
        raise Failed("podman-compose is not installed: `make install` (with the test extras) or pip install it")
    return [found]


def compose_command(engine: Engine, servers: str) -> list[str]:
    files = ["-f", str(COMPOSE)] + (["-f", str(COMPOSE_OVERRIDE)] if servers == "host" else [])
    return [*compose_tool(engine), *files]


def shown(command: list[str]) -> str:
    """A compose command as a user would type it in the repository (tool and files by their short names)."""
    return " ".join(Path(a).name if a == command[0] else os.path.relpath(a, ROOT) if a.startswith("/") else a
                    for a in command)  # fmt: skip


def server_images() -> list[str]:
    """The images of docker-compose.yml's servers (MySQL, Redis, RabbitMQ): pulled, never built."""
    block = re.search(r"^services:\n(.*?)^  standin:", COMPOSE.read_text(), re.MULTILINE | re.DOTALL)
    return re.findall(r"^    image:\s*(\S+)", block.group(1) if block else "", re.MULTILINE)


def ensure_server_images(engine: Engine) -> None:
    """Every server image is there or can be pulled; otherwise say how to run against this host's servers."""
    for image in server_images():
        if engine.has_image(image):
            continue
        log(f"pulling {image}")
        pulled = engine.run("pull", image, check=False, timeout=900)
        if pulled.returncode != 0:
            raise Failed(
                f"the server image {image} is missing and cannot be pulled ({pulled.stderr.strip()[-300:]}).\n"
                "Run the services against MySQL, Redis and RabbitMQ on this host instead: "
                "make docker-build SERVERS=host (deploy/compose.host.yml)"
            )


def up(engine: Engine, servers: str) -> None:
    """Build the images, start the stack detached, wait for the gateway's /readyz, say where everything is."""
    ensure_base(engine)
    if servers == "compose":
        ensure_server_images(engine)
    command = compose_command(engine, servers)
    for args in (["build"], ["up", "-d"]):
        log(" ".join(["compose", *args]))
        result = subprocess.run([*command, *args], env=engine.env, cwd=ROOT, timeout=1800)
        if result.returncode != 0:
            raise Failed(f"compose {' '.join(args)} failed ({result.returncode}); see its output above")
    gateway = int(os.environ.get("GATEWAY_PORT", "8080"))
    standin = int(os.environ.get("STANDIN_PORT", "8081"))
    base = f"http://127.0.0.1:{gateway}"
    down = "make docker-down" + (" SERVERS=host" if servers == "host" else "")
    try:
        wait_for("the gateway's /readyz is ready", answers(f"{base}/readyz"), timeout=300)
    except Failed as exc:
        raise Failed(f"{exc}; its logs: {shown(command)} logs gateway; stop it: {down}") from None
    for line in (f"Dashboard    {base}/", f"API          {base}/messages", f"Swagger      {base}/swagger/index.html",
                 f"stand-in     http://127.0.0.1:{standin}/webhook (what it got: /_control/received)",
                 f"logs         {shown(command)} logs -f", f"stop         {down}"):  # fmt: skip
        log(line)


def down(engine: Engine, servers: str) -> None:
    result = subprocess.run([*compose_command(engine, servers), "down"], env=engine.env, cwd=ROOT, timeout=600)
    if result.returncode != 0:
        raise Failed(f"compose down failed ({result.returncode})")


# --- make test-docker: the test suite inside the `test` image ----------------------------------------------------

TEST_IMAGE = "message-sender-test"
# What the suite reads to find the servers (as `make test` on this host would) and how it runs.
PASSED_ON = ("MYSQL_HOST", "MYSQL_PORT", "MYSQL_USER", "MYSQL_PASSWORD", "REDIS_URL", "AMQP_URL", "AMQP_QUEUE_TYPE",
             "RABBITMQ_MANAGEMENT_URL", "TEST_WORKERS", "CI")  # fmt: skip
# rabbitmqctl inside the container administers the host's node (vhosts) when its management API is off: it needs
# the node's Erlang cookie and the node name of the host's configuration (Debian's paths).
ERLANG_COOKIE = Path("/var/lib/rabbitmq/.erlang.cookie")
RABBITMQ_ENV = Path("/etc/rabbitmq/rabbitmq-env.conf")


def build_test_image(engine: Engine) -> str:
    ensure_base(engine)
    return build_target(engine, "test", TEST_IMAGE, timeout=1800)


def test_run_args(image: str, name: str, environ: dict[str, str]) -> list[str]:
    """``run`` arguments for the suite in ``image``: host networking (the host's servers on 127.0.0.1), the
    host's process table with ptrace rights (the session guard sees which processes serve the server ports,
    as it does outside), the source mounted at /src, and `make test` with the image's venv."""
    args = ["run", "--rm", "--name", name, "--network", "host", "--pid", "host", "--uts", "host",
            "--cap-add", "SYS_PTRACE", "-v", f"{ROOT}:/src", "-w", "/src", "-e", "IN_CONTAINER=1"]  # fmt: skip
    for var in PASSED_ON:
        if var in environ:
            args += ["-e", f"{var}={environ[var]}"]
    setup = ""
    if ERLANG_COOKIE.is_file():
        args += ["-v", f"{ERLANG_COOKIE}:/run/host-erlang-cookie:ro"]
        setup += "install -o rabbitmq -g rabbitmq -m 400 /run/host-erlang-cookie /var/lib/rabbitmq/.erlang.cookie && "
    if RABBITMQ_ENV.is_file():
        args += ["-v", f"{RABBITMQ_ENV}:/etc/rabbitmq/rabbitmq-env.conf:ro"]
    workers = environ.get("TEST_WORKERS", "2")
    return [*args, image, "sh", "-c", f"{setup}make test VENV=/opt/venv TEST_WORKERS={workers}"]


def test_in_container(engine: Engine) -> int:
    image = build_test_image(engine)
    name = f"ms-test-{secrets.token_hex(4)}"
    log(f"make test inside {image} (container {name}, host networking)")
    try:
        return subprocess.run([engine.name, *test_run_args(image, name, dict(os.environ))], env=engine.env).returncode
    finally:
        engine.run("rm", "-f", "-t", "10", name, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("build", "prove", "up", "down", "test"))
    parser.add_argument("--servers", choices=SERVERS, default=os.environ.get("SERVERS") or "compose",
                        help="up/down: compose: docker-compose.yml's servers; host: this host's")  # fmt: skip
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="message-sender-images-") as workdir:
        try:
            engine = find_engine(Path(workdir))
            log(f"engine: {engine.name}")
            if args.command == "up":
                up(engine, args.servers)
            elif args.command == "down":
                down(engine, args.servers)
            elif args.command == "test":
                status = test_in_container(engine)
                log(f"test: exit status {status} in {time.monotonic() - started:.0f}s")
                sys.exit(status)
            else:
                images = build(engine)
            if args.command == "prove":
                prove_alone(engine, images)
                prove_compose(engine)
        except Failed as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            sys.exit(1)
    log(f"{args.command}: done in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
