"""The container set-up, checked without a Docker engine: docker-compose.yml as `docker-compose config` reads
it, its host-services override, each target of deploy/Dockerfile, .dockerignore, and .env.example against the
settings. (`make test-images` builds and runs the images themselves.)"""

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
from deploy import images

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


def test_each_service_is_built_from_its_own_target(services: dict[str, dict[str, Any]]) -> None:
    for name in BUILT:
        build = services[name]["build"]
        assert (build["dockerfile"], build["target"]) == ("deploy/Dockerfile", name), f"{name}: {build}"
        assert Path(build["context"]).resolve() == ROOT
    assert not list((ROOT / "deploy").glob("*.Dockerfile")), "one Dockerfile, one target per service"


def test_every_service_is_health_checked_and_waits_for_healthy_dependencies(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in INFRA:
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"
    for name in BUILT:  # their healthcheck is in their image
        assert any(op == "HEALTHCHECK" for op, _ in target_steps(name)), f"{name}: no HEALTHCHECK"
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


def test_the_observability_profile_receives_and_shows_traces_and_tracing_is_off_by_default(tmp_path: Path) -> None:
    services = compose_config(tmp_path)["services"]
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:") and jaeger["profiles"] == ["observability"]
    assert services["prometheus"]["profiles"] == ["observability"], "beside the Prometheus already there"
    assert {16686, 4318} <= targets(jaeger), "the UI and OTLP over HTTP"
    assert published(jaeger) == {"127.0.0.1"}
    for name in ("producer", "consumer", "gateway"):
        env = services[name]["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "", f"{name}: tracing must stay off unless a user sets it"
        assert "profiles" not in services[name]
    traced = compose_config(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT="http://jaeger:4318")["services"]
    for name in ("producer", "consumer", "gateway"):
        assert traced[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318", name


def test_host_override_runs_only_the_app_services_against_the_hosts_servers() -> None:
    class Loader(yaml.SafeLoader):
        pass

    def tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        return loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode) else None

    Loader.add_constructor("!reset", tagged)
    Loader.add_constructor("!override", tagged)
    override = yaml.load((ROOT / "deploy" / "compose.host.yml").read_text(), Loader=Loader)["services"]
    for name in INFRA:
        assert override[name] == {"profiles": ["servers"]}, f"{name} would start beside the host's server"
    for name in BUILT:
        assert override[name]["network_mode"] == "host", name
    for name in ("gateway", "producer", "consumer"):
        env = override[name]["environment"]
        assert env["MYSQL_HOST"] == "${MYSQL_HOST:-127.0.0.1}" and "REDIS_PREFIX" in env and "AMQP_URL" in env
    for name, var in (("producer", "PRODUCER_METRICS_PORT"), ("consumer", "CONSUMER_METRICS_PORT")):
        assert f"os.environ['{var}']" in " ".join(override[name]["healthcheck"]["test"]), name


# --- Dockerfile -------------------------------------------------------------------------------------------

DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))
    )
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1].strip()) for ln in text.splitlines() if ln.strip()]


def stages() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Each named stage: (what it is FROM, its own instructions)."""
    found: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    steps: list[tuple[str, str]] = []
    for op, arg in instructions():
        if op == "FROM":
            image, _, alias = arg.split()
            steps = []
            found[alias] = (image, steps)
        else:
            steps.append((op, arg))
    return found


def target_steps(target: str) -> list[tuple[str, str]]:
    """The instructions that make up ``target``: its ancestors' (base image first), then its own."""
    chain: list[tuple[str, str]] = []
    all_stages = stages()
    while target in all_stages:
        parent, own = all_stages[target]
        chain = own + chain
        target = parent
    return chain


def test_one_dockerfile_with_a_target_per_service() -> None:
    all_stages = stages()
    assert set(BUILT) <= set(all_stages), f"targets: {sorted(all_stages)}"
    for name, (image, _) in all_stages.items():
        if image not in all_stages:
            assert PINNED.match(image), f"{name}: base image {image} is not pinned to a full version"
    for service in BUILT:  # multi-stage: what runs copies a build from a stage it does not descend from
        copies = [arg.split()[0].removeprefix("--from=") for op, arg in target_steps(service) if op == "COPY"]
        assert any(c in all_stages for c in copies), f"{service}: copies no build stage"
        assert not any(op == "RUN" and "pip install" in arg for op, arg in target_steps(service)), service


@pytest.mark.parametrize("service", sorted(BUILT))
def test_dockerfile_target(service: str) -> None:
    steps = target_steps(service)
    ops = {op: arg for op, arg in steps}  # the last of each instruction in the target
    user = ops.get("USER", "root").split(":")[0]
    assert user not in ("root", "0"), f"{service} runs as {user}"
    var, port = BUILT[service]
    assert re.search(rf"\b{var}={port}\b", " ".join(arg for op, arg in steps if op == "ENV")), f"ENV {var}={port}"
    assert ops["EXPOSE"] == str(port)
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


def test_the_service_images_have_the_tracing_extra() -> None:
    """Setting OTEL_EXPORTER_OTLP_ENDPOINT turns tracing on in a container: the services' virtualenv is built
    with the extra (make run's is not: tracing stays an extra there)."""
    venv = [arg for op, arg in stages()["app"][1] if op == "COPY" and "/opt/venv" in arg]
    assert venv == ["--from=build /opt/venv /opt/venv"], venv
    installs = [arg for op, arg in target_steps("build") if op == "RUN" and "pip install" in arg]
    assert len(installs) == 1 and "pip install '.[tracing]'" in installs[0], installs
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for package in ("sdk", "exporter-otlp-proto-http", "instrumentation-aiohttp-server",
                    "instrumentation-aiohttp-client", "instrumentation-aio-pika", "instrumentation-redis"):  # fmt: skip
        assert any(r.startswith(f"opentelemetry-{package}>=") for r in extras["tracing"]), package
    makefile = (ROOT / "Makefile").read_text()
    assert "$(BIN)/pip install --quiet -e .\n" in makefile, "make run installs only what running needs"


def test_dockerfile_copies_only_what_the_build_context_holds() -> None:
    for op, arg in instructions():
        if op == "COPY" and not arg.startswith("--from="):
            for source in arg.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
                assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"


def healthcheck_command(service: str) -> str:
    """The shell command of the image's HEALTHCHECK (run against live processes by test_make_run)."""
    ops = dict(target_steps(service))
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
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^ENV .*\bGATEWAY_HOST=0\.0\.0\.0\b", dockerfile, re.M), "in its container it listens on all"


# --- make docker-build / docker-down / test-docker (deploy/images.py up, down, test) -----------------------------


def make_dry_run(*args: str) -> str:
    result = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_runs_the_stack_and_the_tests_in_containers() -> None:
    assert "images.py up --servers compose" in make_dry_run("docker-build")
    assert "images.py up --servers host" in make_dry_run("docker-build", "SERVERS=host")
    assert "images.py down --servers host" in make_dry_run("docker-down", "SERVERS=host")
    assert "images.py test" in make_dry_run("test-docker")
    assert make_dry_run("up") == make_dry_run("docker-build") and make_dry_run("down") == make_dry_run("docker-down")
    readme = (ROOT / "README.md").read_text()
    for target in ("make docker-build", "make test-docker", "SERVERS=host", "make docker-down"):
        assert target in readme, f"the README does not mention {target}"


def test_the_test_image_has_the_test_extras_and_what_the_suite_starts() -> None:
    image, _ = stages()["test"]
    assert image == "base", "the test image shares the services' base"
    steps = " ".join(arg for op, arg in target_steps("test") if op == "RUN")
    assert "pip install -e '.[test]'" in steps
    for package in ("make", "mariadb-server", "redis-server", "rabbitmq-server", "chromium", "docker-compose"):
        assert re.search(rf"\b{package}\b", steps), f"the test image lacks {package}"


def test_the_suite_runs_on_the_hosts_network_and_sees_its_server_processes() -> None:
    args = images.test_run_args("img", "ms-test-x", {"MYSQL_PORT": "3307", "HOME": "/somewhere"})
    assert args[:2] == ["run", "--rm"] and args[args.index("--network") + 1] == "host"
    assert args[args.index("--pid") + 1] == "host" and "SYS_PTRACE" in args, "the session guard must see the servers"
    assert "MYSQL_PORT=3307" in args and not any(a.startswith("HOME=") for a in args)
    assert args[-1].endswith("make test VENV=/opt/venv TEST_WORKERS=2") and f"{ROOT}:/src" in args


class NoPull(images.Engine):
    """An engine with no image at all and no registry to pull from."""

    def __init__(self) -> None:
        super().__init__("podman", {})

    def run(self, *args: str, check: bool = True, timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess([self.name, *args], 125, "", "Error: unable to pull: no such host")


def test_missing_server_images_that_cannot_be_pulled_name_the_host_servers_option() -> None:
    assert [i.split(":")[0] for i in images.server_images()] == ["mysql", "redis", "rabbitmq"]
    with pytest.raises(images.Failed, match=r"make docker-build SERVERS=host") as failed:
        images.ensure_server_images(NoPull())
    assert "mysql:" in str(failed.value) and "cannot be pulled" in str(failed.value)
