"""The container set-up, checked without a Docker engine: docker-compose.yml as `docker-compose config` reads
it, each Dockerfile's structure, .dockerignore, and .env.example against the settings."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# service -> (the variable naming the port its healthcheck probes, the image's value for it)
BUILT = {"producer": ("PRODUCER_METRICS_PORT", 9101), "consumer": ("CONSUMER_METRICS_PORT", 9102),
         "gateway": ("GATEWAY_PORT", 8080), "standin": ("STANDIN_PORT", 8081)}  # fmt: skip
INFRA = {"mysql": "mysql:8", "redis": "redis:7", "rabbitmq": "rabbitmq:3"}
PINNED = re.compile(r"^[\w./-]+(:[\w.-]*\d+\.\d+\.\d+[\w.-]*|@sha256:[0-9a-f]{64})$")  # a full version or a digest


def compose_config(tmp_path: Path, **env: str) -> dict[str, Any]:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; .ci/run installs it)")
    empty = tmp_path / "empty.env"  # neither a developer's .env nor the caller's environment leaks in
    empty.write_text("")
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path)), **env}
    result = subprocess.run(
        ["docker-compose", "--env-file", str(empty), "-f", str(ROOT / "docker-compose.yml"), "config"],
        cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, f"docker-compose config rejected the file:\n{result.stderr}"
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


@pytest.fixture
def services(tmp_path: Path) -> dict[str, dict[str, Any]]:
    return dict(compose_config(tmp_path)["services"])


def test_compose_has_the_whole_stack(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= {*INFRA, *BUILT}
    for name, image in INFRA.items():
        assert services[name]["image"].startswith(image), f"{name}: {services[name]['image']}"
    for name, svc in services.items():
        if "image" in svc:
            assert PINNED.match(svc["image"]), f"{name}: image {svc['image']} is not pinned to a version"
    assert {5672, 15672} <= targets(services["rabbitmq"]), "RabbitMQ must publish AMQP and the management UI"
    assert "management" in services["rabbitmq"]["image"]
    assert targets(services["gateway"]) == {8080}


def targets(service: dict[str, Any]) -> set[int]:
    """The container ports a service publishes (short "[ip:]host:container[/proto]" or long syntax)."""
    ports = service.get("ports") or []
    return {int(p["target"]) if isinstance(p, dict) else int(str(p).split("/")[0].rsplit(":", 1)[-1]) for p in ports}


def test_each_service_is_built_from_its_own_image(services: dict[str, dict[str, Any]]) -> None:
    dockerfiles = {name: services[name]["build"]["dockerfile"] for name in BUILT}
    assert len(set(dockerfiles.values())) == len(BUILT), dockerfiles
    for name, dockerfile in dockerfiles.items():
        assert dockerfile.startswith("deploy/") and (ROOT / dockerfile).is_file(), f"{name}: {dockerfile}"
        assert Path(services[name]["build"]["context"]).resolve() == ROOT


def test_every_service_is_health_checked_and_waits_for_healthy_dependencies(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in INFRA:
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"
    for name in BUILT:  # their healthcheck is in their image
        assert "HEALTHCHECK" in (ROOT / services[name]["build"]["dockerfile"]).read_text()
    for name in ("producer", "consumer", "gateway"):
        deps = services[name]["depends_on"]
        assert {"mysql", "redis", "rabbitmq"} <= set(deps), f"{name}: {deps}"
        assert all(d["condition"] == "service_healthy" for d in deps.values()), f"{name}: {deps}"
    assert services["consumer"]["depends_on"]["standin"]["condition"] == "service_healthy"
    for name, svc in services.items():
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), f"{name} has no restart policy"


def test_producer_and_consumer_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        assert "container_name" not in svc, f"{name}: a fixed container name prevents --scale"
    for name in ("producer", "consumer"):
        assert not targets(services[name]), f"{name}: a published host port prevents --scale"


def test_containers_reach_each_other_by_service_name(services: dict[str, dict[str, Any]]) -> None:
    for name in ("producer", "consumer", "gateway"):
        env = services[name]["environment"]
        Settings.from_env({k: str(v) for k, v in env.items()}, dotenv=None)  # every value is valid
        assert env["MYSQL_HOST"] == "mysql"
        assert "@rabbitmq:5672" in env["AMQP_URL"] and not env["AMQP_URL"].startswith("amqp://guest:")
        assert env["REDIS_URL"].startswith("redis://redis:6379")
        assert env["WEBHOOK_URL"] == "http://standin:8081/webhook"
        assert (env["SEND_INTERVAL_SECONDS"], env["SEND_BATCH_SIZE"]) == ("120", "2")
    rabbit = services["rabbitmq"]["environment"]
    assert f"amqp://{rabbit['RABBITMQ_DEFAULT_USER']}:{rabbit['RABBITMQ_DEFAULT_PASS']}@" in env["AMQP_URL"]
    mysql = services["mysql"]["environment"]
    assert (mysql["MYSQL_USER"], mysql["MYSQL_PASSWORD"]) == (env["MYSQL_USER"], env["MYSQL_PASSWORD"])


def test_webhook_url_can_point_at_webhook_site(tmp_path: Path) -> None:
    url = "https://webhook.site/0b7e7a5e-7a2b-4d0e-9a51-3f0c2b1e9d11"
    services = compose_config(tmp_path, WEBHOOK_URL=url, WEBHOOK_AUTH_KEY="k", SEND_INTERVAL_SECONDS="5")["services"]
    for name in ("producer", "consumer", "gateway"):
        env = services[name]["environment"]
        assert (env["WEBHOOK_URL"], env["WEBHOOK_AUTH_KEY"], env["SEND_INTERVAL_SECONDS"]) == (url, "k", "5")


def test_prometheus_scrapes_every_replica() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job["dns_sd_configs"][0] for job in config["scrape_configs"]}
    assert {name: (sd["names"], sd["port"]) for name, sd in jobs.items()} == {
        "gateway": (["gateway"], 8080), "producer": (["producer"], 9101), "consumer": (["consumer"], 9102),
    }  # fmt: skip


# --- Dockerfiles ------------------------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))
    )
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1].strip()) for ln in text.splitlines() if ln.strip()]


@pytest.mark.parametrize("service", sorted(BUILT))
def test_dockerfile_structure(service: str) -> None:
    path = ROOT / "deploy" / f"{service}.Dockerfile"
    steps = instructions(path)
    stages = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(stages) >= 2, "multi-stage: build in one stage, run from a clean one"
    aliases = set()
    for i in stages:
        image, *rest = steps[i][1].split()
        if image not in aliases:
            assert PINNED.match(image), f"base image {image} is not pinned to a full version"
        if rest:
            aliases.add(rest[-1])
    final = steps[stages[-1] :]
    ops = {op: arg for op, arg in final}  # the last of each instruction in the final stage
    assert any(op == "COPY" and arg.startswith("--from=") for op, arg in final), "the final stage copies a build"
    user = ops.get("USER", "root").split(":")[0]
    assert user not in ("root", "0"), f"the final stage runs as {user}"
    var, port = BUILT[service]
    assert re.search(rf"\b{var}={port}\b", " ".join(arg for op, arg in final if op == "ENV")), f"ENV {var}={port}"
    command = healthcheck_command(service)
    assert f"os.environ['{var}']" in command, command
    assert ("/_control/health" if service == "standin" else "/healthz") in command, command
    entrypoint = yaml.safe_load(ops["ENTRYPOINT"])  # the exec (JSON) form
    assert isinstance(entrypoint, list), "ENTRYPOINT in exec form, so the service gets the signals"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    if service == "standin":
        assert entrypoint[:2] == ["python", "/app/standin.py"] and "0.0.0.0" in entrypoint
    else:
        assert entrypoint == [f"message-sender-{service}"] and entrypoint[0] in scripts
    for op, arg in steps:  # what a COPY takes from the build context exists and is not ignored
        if op == "COPY" and not arg.startswith("--from="):
            for source in arg.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
                assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"


def healthcheck_command(service: str) -> str:
    """The shell command of the image's HEALTHCHECK (run against live processes by test_make_run)."""
    ops = dict(instructions(ROOT / "deploy" / f"{service}.Dockerfile"))
    match = re.search(r"\bCMD\s+(.*)$", ops["HEALTHCHECK"])
    assert match and not match.group(1).startswith("["), "HEALTHCHECK CMD in shell form"
    return match.group(1)


def dockerignored(path: str) -> bool:
    """Whether .dockerignore (a whitelist: `*`, then `!` exceptions) keeps ``path`` out of the build context."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    for path in (".env", ".venv", ".git", "test-artifacts", "tests", "bench"):
        assert dockerignored(path), f"{path} would be sent to the Docker daemon"


# --- .env.example -----------------------------------------------------------------------------------------


def test_env_example_documents_every_setting_with_its_default() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    documented: dict[str, str] = {}
    for i, line in enumerate(lines):
        match = re.match(r"^# ([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match and match.group(1) not in documented:
            documented[match.group(1)] = match.group(2)
            start = i
            while start > 0 and lines[start - 1].startswith("#"):
                start -= 1
            block = lines[start:i]
            assert any(not re.match(r"^# [A-Z][A-Z0-9_]*=", ln) for ln in block), f"{match.group(1)}: no comment"
    defaults = Settings()
    for field in dataclasses.fields(Settings):
        name = field.name.upper()
        assert name in documented, f".env.example does not document {name}"
        parsed = Settings.from_env({name: documented[name]}, dotenv=None)
        assert getattr(parsed, field.name) == getattr(defaults, field.name), f"{name}: not the default"
    assert Settings.from_env({}, dotenv=ROOT / ".env.example") == defaults, "copying it to .env changes nothing"


def test_services_get_more_time_to_stop_than_their_shutdown_timeout_and_real_health_checks(
    services: dict[str, dict[str, Any]],
) -> None:
    shutdown = Settings().shutdown_timeout_seconds
    for name in ("gateway", "producer", "consumer"):
        grace = str(services[name]["stop_grace_period"])
        assert grace.endswith("s") and float(grace[:-1]) > shutdown, f"{name}: stop_grace_period {grace}"
    for name, port in (("producer", 9101), ("consumer", 9102)):
        check = " ".join(services[name]["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/healthz" in check, f"{name}'s health check does not ask its /healthz"


def published(service: dict[str, Any]) -> set[str]:
    """The host addresses a service's ports are published on ("" for every interface)."""
    found = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            found.add(str(port.get("host_ip", "")))
        else:
            parts = str(port).split("/")[0].split(":")
            found.add(parts[0] if len(parts) == 3 else "")
    return found


def test_every_published_port_is_on_this_machine_unless_opened_on_purpose(tmp_path: Path) -> None:
    services = compose_config(tmp_path)["services"]
    for name, svc in services.items():
        assert published(svc) <= {"127.0.0.1"}, f"{name} is published on {published(svc)}"
    opened = compose_config(tmp_path, GATEWAY_BIND="0.0.0.0", API_TOKEN="t" * 32)["services"]
    assert published(opened["gateway"]) == {"0.0.0.0"}
    assert opened["gateway"]["environment"]["API_TOKEN"] == "t" * 32
    dockerfile = (ROOT / "deploy" / "gateway.Dockerfile").read_text()
    assert re.search(r"^ENV .*\bGATEWAY_HOST=0\.0\.0\.0\b", dockerfile, re.M), "in its container it listens on all"
