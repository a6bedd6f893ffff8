"""`make run` as a person runs it: a message put into MySQL by hand reaches the webhook stand-in, Ctrl-C stops
everything and leaves no process behind, and a dependency that does not answer gives one clear line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from common.db import ensure_database
from common.settings import Settings
from tests.conftest import sql
from tests.procs import ARTIFACTS, ROOT, free_port, wait_for
from tests.test_deploy import healthcheck_command

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
MARKER = "MESSAGE_SENDER_TEST_RUN"
CAPABILITY = "5a1f0c3e-7b2d-4e8f-9a6b-c4d3e2f1a0b9"  # the path of a webhook.site URL: whoever has it reads all


class MakeRun:
    """``make run`` in its own session, as a terminal would start it; its output in a file."""

    def __init__(self, env: dict[str, str], log_dir: Path, marker: str) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / "make-run.log"
        self.marker = marker
        full = {**os.environ, **env, MARKER: marker}
        for inherited in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # when the suite itself runs under make
            full.pop(inherited, None)
        with self.log_path.open("wb") as log:
            # -o: never reinstall the venv under a running test suite (`make install` is CI's first step)
            self.proc = subprocess.Popen(
                ["make", "-s", "-o", ".venv/.installed-run", "run"], cwd=ROOT, env=full, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def processes(self) -> list[int]:
        """Every live process started by this run, whatever its session: they all inherit the marker."""
        wanted = f"{MARKER}={self.marker}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    async def exited(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"make run still running after {timeout}s:\n{self.tail()}"
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for pid in self.processes():  # only if the test already failed: do not leave them running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def make_run() -> Iterator[list[MakeRun]]:
    """The runs a test starts; whatever is left of them is killed at the end, pass or fail."""
    runs: list[MakeRun] = []
    yield runs
    for run in runs:
        run.close()


def own_lines(output: str) -> list[str]:
    """What run.py and make print unprefixed (service output, and run.py's notes, are ``<name> | ...``)."""
    return [ln for ln in output.splitlines() if not re.match(r"^\w+ +\| ", ln)]


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, object]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.json(content_type=None)


@pytest.fixture
async def db_account(settings: Settings, run_id: str) -> AsyncIterator[dict[str, str]]:
    """A MySQL account with a password (the test server's root has none), dropped at the end."""
    password = "make-run-db-pw-93b1e"
    await ensure_database(settings)  # the account may use it; make run migrates it as usual
    await sql(settings, f"CREATE USER '{run_id}'@'%%' IDENTIFIED BY %s", (password,))
    try:
        await sql(settings, f"GRANT ALL ON `{run_id}`.* TO '{run_id}'@'%%'")
        yield {"MYSQL_USER": run_id, "MYSQL_PASSWORD": password}
    finally:
        await sql(settings, f"DROP USER IF EXISTS '{run_id}'@'%%'")


async def test_make_run_delivers_a_message_and_ctrl_c_stops_everything(
    env: dict[str, str],
    settings: Settings,
    make_run: list[MakeRun],
    run_id: str,
    request: pytest.FixtureRequest,
    db_account: dict[str, str],
) -> None:
    ports = {"GATEWAY_PORT": free_port(), "PRODUCER_METRICS_PORT": free_port(), "CONSUMER_METRICS_PORT": free_port()}
    standin = f"http://127.0.0.1:{free_port()}"
    # Every secret set, the webhook URL a capability as a webhook.site one is: none may show in the output.
    secrets = {"WEBHOOK_URL": f"{standin}/{CAPABILITY}", "API_TOKEN": "make-run-token-4c1d9e2f",
               "WEBHOOK_AUTH_KEY": "k9", **db_account}  # fmt: skip
    run_env = {**env, **{k: str(v) for k, v in ports.items()}, **secrets,
               "SEND_INTERVAL_SECONDS": "1", "RETRY_BASE_SECONDS": "0.2", "SHUTDOWN_TIMEOUT_SECONDS": "5"}  # fmt: skip
    run = MakeRun(run_env, ARTIFACTS / request.node.name, run_id)
    make_run.append(run)
    gateway = f"http://localhost:{ports['GATEWAY_PORT']}"

    async def ready() -> bool:
        assert run.proc.poll() is None, f"make run exited with {run.proc.returncode}:\n{run.tail()}"
        return f"Swagger      {gateway}/swagger/index.html" in run.output()

    await wait_for(ready, 60, "make run to print the Swagger address")
    out = run.output()
    assert f"API          {gateway}/messages" in out
    assert f"webhook      {standin}/{CAPABILITY[:4]}*** (local stand-in" in out, "scheme, host, a glimpse of the path"
    for name in ("standin", "gateway", "producer", "consumer"):
        assert f"\n{name:<8} | " in out, f"no output prefixed with {name}:\n{run.tail()}"
    status, _ = await get(f"{gateway}/messages", {"Authorization": f"Bearer {secrets['API_TOKEN']}"})
    assert status == 200, "the printed API address answers"
    assert (await get(f"{gateway}/messages"))[0] == 401, "and wants the token"
    assert len(run.processes()) >= 6, "make, run.py, the stand-in, gateway, producer and consumer"

    # the images' healthchecks work against the real services (the variable names the port they probe)
    for service, var in (("gateway", "GATEWAY_PORT"), ("producer", "PRODUCER_METRICS_PORT"),
                         ("consumer", "CONSUMER_METRICS_PORT"), ("standin", "STANDIN_PORT")):  # fmt: skip
        probe = {**os.environ, var: str(ports.get(var) or standin.rsplit(":", 1)[1])}

        async def healthy(command: str = healthcheck_command(service), probe: dict[str, str] = probe) -> bool:
            check = await asyncio.create_subprocess_exec("sh", "-c", command, env=probe, stderr=subprocess.DEVNULL)
            return await check.wait() == 0

        await wait_for(healthy, 30, f"the {service} image's healthcheck to pass", interval=0.5)

    content = f"hello from make run {run_id}"
    await sql(settings, "INSERT INTO messages (recipient, content) VALUES (%s, %s)", ("+905551234567", content))

    async def delivered() -> bool:
        _, received = await get(f"{standin}/_control/received")
        assert isinstance(received, list)
        return any(r["body"] == {"to": "+905551234567", "content": content} for r in received)

    await wait_for(delivered, 30, "the stand-in to receive the message inserted into MySQL")

    os.killpg(run.proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: SIGINT to the foreground group
    await run.exited(30)
    assert run.processes() == [], "processes left behind after Ctrl-C"
    out = run.output()
    assert "all stopped" in out and "killing" not in out, run.tail()
    assert not [ln for ln in own_lines(out) if "Traceback" in ln], run.tail()
    shown = {"WEBHOOK_URL": CAPABILITY[4:], **{k: v for k, v in secrets.items() if k != "WEBHOOK_URL"}}
    shown.pop("MYSQL_USER")
    for name, secret in shown.items():
        assert secret not in out, f"{name} shows in the output of make run"


@pytest.mark.parametrize("dependency", ["MySQL", "Redis", "RabbitMQ"])
async def test_make_run_names_the_dependency_that_does_not_answer(
    env: dict[str, str], make_run: list[MakeRun], run_id: str, request: pytest.FixtureRequest, dependency: str
) -> None:
    closed = free_port()
    override = {
        "MySQL": {"MYSQL_PORT": str(closed)},
        "Redis": {"REDIS_URL": f"redis://127.0.0.1:{closed}/0"},
        "RabbitMQ": {"AMQP_URL": f"amqp://guest:guest@127.0.0.1:{closed}/"},
    }[dependency]
    run = MakeRun({**env, **override}, ARTIFACTS / request.node.name, run_id)
    make_run.append(run)
    assert await run.exited(30) != 0
    out = run.output()
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out
    assert errors[0].startswith(f"error: {dependency} does not answer at 127.0.0.1:{closed} — start it ("), out
    assert errors[0].endswith("or use docker compose up"), out
    assert not [ln for ln in own_lines(out) if "Traceback" in ln], out
    assert run.processes() == []


async def test_make_run_stops_everything_when_a_service_dies(
    env: dict[str, str], make_run: list[MakeRun], run_id: str, request: pytest.FixtureRequest
) -> None:
    """The producer cannot bind its metrics port (taken, though not listening, so the pre-flight check passes):
    the others are stopped and the exit status is 1."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        run_env = {**env, "WEBHOOK_URL": f"http://127.0.0.1:{free_port()}/webhook", "GATEWAY_PORT": str(free_port()),
                   "PRODUCER_METRICS_PORT": str(port), "CONSUMER_METRICS_PORT": "0"}  # fmt: skip
        run = MakeRun(run_env, ARTIFACTS / request.node.name, run_id)
        make_run.append(run)
        assert await run.exited(60) != 0
    out = run.output()
    assert "started gateway" in out and "started consumer" in out, out
    assert any(ln.startswith("error: producer exited with status") for ln in out.splitlines()), out
    assert "all stopped" in out and "killing" not in out, out
    assert run.processes() == []


def test_a_malformed_setting_is_one_line_and_exit_2(tmp_path: Path, run_id: str) -> None:
    run = MakeRun({"SEND_BATCH_SIZE": "two"}, tmp_path, run_id)
    try:
        assert run.proc.wait(30) != 0
        errors = [ln for ln in run.output().splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith("error: SEND_BATCH_SIZE='two' is invalid"), run.output()
        assert "Traceback" not in run.output()
    finally:
        run.close()


def test_a_fresh_install_prints_no_setuptools_warning(tmp_path: Path) -> None:
    """`make run` from a fresh clone installs the project the way the Makefile does; setuptools says nothing
    (`package-dir = {"" = "."}` in pyproject.toml: a flat layout that setuptools links with one .pth line)."""
    venv = tmp_path / "venv"
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True, capture_output=True, timeout=300)  # as the Makefile does
    result = subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    said = result.stdout + result.stderr
    for noise in ("Warning", "!!", "package would be ignored", "license"):
        assert noise not in said, said
