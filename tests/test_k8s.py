"""The Kubernetes manifests under deploy/k8s/: every one valid against the Kubernetes schemas
(kubernetes-validate), and the promises a cluster operator relies on, read from the YAML: probes on the
endpoints the services serve, a grace period longer than the shutdown timeout, non-root pods with a read-only
root filesystem, resources, budgets, autoscaling and network policies that allow each service what it uses."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from common import topology
from common.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
# Kubernetes versions to validate against: the oldest still common and the newest the package knows
VERSIONS = ["1.29.0", "1.33.0"]
# service -> (its port, the readiness path, the ports it must reach: MySQL, Redis, RabbitMQ, the webhook)
SERVICES = {
    "gateway": (8080, "/readyz", {3306, 6379, 5672}),
    "producer": (9101, "/healthz", {3306, 5672}),
    "consumer": (9102, "/healthz", {3306, 6379, 5672, 443, 80}),
}


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return doc


def base() -> list[dict[str, Any]]:
    """Every resource of the kustomize base, as the plain files hold them."""
    return [doc for name in kustomization()["resources"] for doc in load(K8S / name)]


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in base() if doc["kind"] == kind}


def config() -> dict[str, str]:
    """The environment every pod gets: the ConfigMap and the Secret."""
    (cm,) = of_kind("ConfigMap").values()
    (secret,) = of_kind("Secret").values()
    return {**cm["data"], **secret["stringData"]}


def test_every_file_is_in_the_base_or_a_documented_alternative() -> None:
    listed = set(kustomization()["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, f"not in kustomization.yaml: {present - listed}; missing: {listed - present}"
    assert (K8S / "README.md").is_file()
    assert {*of_kind("Deployment")} == set(SERVICES)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    for doc in base():
        kubernetes_validate.validate(doc, version, strict=True)  # raises with the path of what is wrong


def test_kustomize_renders_the_base_with_the_image_names() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True)
    rendered = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in base()
    )
    for doc in rendered:
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "message-sender"
        for container in pod_spec(doc)["containers"] if pod_spec(doc) else []:
            new = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kustomization()["images"]}
            assert container["image"] in new.values(), container["image"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "message-sender"


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in ("Deployment", "Job"):
        spec: dict[str, Any] = doc["spec"]["template"]["spec"]
        return spec
    return None


def test_the_configuration_is_valid_settings() -> None:
    settings = Settings.from_env(config(), dotenv=None)
    assert settings.amqp_queue_type == "quorum", "a cluster's RabbitMQ replicates quorum queues"
    assert settings.log_format == "json"
    for name, secret in (("MYSQL_PASSWORD", True), ("AMQP_URL", True), ("REDIS_URL", True), ("API_TOKEN", True)):
        (cm,) = of_kind("ConfigMap").values()
        assert (name not in cm["data"]) is secret, f"{name} belongs in the Secret"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_deployment_probes_grace_and_security(name: str) -> None:
    port, ready_path, _ = SERVICES[name]
    deployment = of_kind("Deployment")[name]
    spec = deployment["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > float(config()["SHUTDOWN_TIMEOUT_SECONDS"])
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    assert container["image"] == f"message-sender-{name}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert list(ports.values()) == [port]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", ready_path), ("startupProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert (get["path"], ports[get["port"]]) == (path, port), f"{name}: {probe} {get}"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and container["resources"]["limits"]["memory"]
    assert [next(iter(e.values()))["name"] for e in container["envFrom"]] == [
        "message-sender-config",
        "message-sender-secrets",
    ]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_migration_job_runs_the_migrate_command_as_non_root() -> None:
    (job,) = of_kind("Job").values()
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"] == ["message-sender", "migrate"]
    assert spec["securityContext"]["runAsNonRoot"] is True and container["securityContext"]["readOnlyRootFilesystem"]
    assert spec["restartPolicy"] in ("OnFailure", "Never") and job["spec"]["backoffLimit"] >= 1
    before = {
        d["kind"] for d in base() if d["metadata"].get("labels", {}).get("message-sender/phase") == "before-services"
    }
    assert before == {"Namespace", "ConfigMap", "Secret", "Job"}, "kubectl apply -l selects what the Job needs"


def test_the_gateway_service_reaches_the_gateway_pods() -> None:
    service = of_kind("Service")["gateway"]
    pods = of_kind("Deployment")["gateway"]["spec"]["template"]
    assert service["spec"]["selector"].items() <= pods["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == pods["spec"]["containers"][0]["ports"][0]["name"]


def test_every_service_has_a_disruption_budget_and_consumers_autoscale() -> None:
    budgets = of_kind("PodDisruptionBudget")
    for name in SERVICES:
        (budget,) = [
            b for b in budgets.values() if b["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        ]
        replicas = of_kind("Deployment")[name]["spec"]["replicas"]
        assert budget["spec"]["minAvailable"] < replicas, f"{name}: a budget no drain can satisfy"
    (hpa,) = of_kind("HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "consumer"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_keda_scales_consumers_on_the_dispatch_queue_depth() -> None:
    docs = {d["kind"]: d for d in load(K8S / "keda" / "scaled-object.yaml")}
    scaled = docs["ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["spec"]["scaleTargetRef"]["name"] == "consumer"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq" and trigger["metadata"]["queueName"] == topology.DISPATCH_QUEUE
    assert trigger["metadata"]["mode"] == "QueueLength" and int(trigger["metadata"]["value"]) > 0
    auth = docs["TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert (ref["name"], ref["key"]) == ("message-sender-secrets", "AMQP_URL") and "AMQP_URL" in config()


def allowed_egress_ports(labels: dict[str, str]) -> set[int]:
    """The TCP ports pods with ``labels`` may reach under the namespace's policies (DNS aside)."""
    ports: set[int] = set()
    for policy in of_kind("NetworkPolicy").values():
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if selector.items() <= labels.items():
            for rule in policy["spec"].get("egress", []):
                ports |= {p["port"] for p in rule.get("ports", []) if p["port"] != 53}
                assert rule.get("ports"), f"{policy['metadata']['name']}: an egress rule open to every port"
    return ports


def test_network_policies_deny_by_default_and_allow_each_service_what_it_uses() -> None:
    deny = of_kind("NetworkPolicy")["default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for name, (port, _, uses) in SERVICES.items():
        labels = of_kind("Deployment")[name]["spec"]["template"]["metadata"]["labels"]
        assert allowed_egress_ports(labels) == uses, name
        ingress = [
            p["port"]
            for policy in of_kind("NetworkPolicy").values()
            if policy["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
            for rule in policy["spec"].get("ingress", [])
            for p in rule["ports"]
        ]
        assert ingress == [port], f"{name}: ingress {ingress}"
    job = of_kind("Job")["message-sender-migrate"]["spec"]["template"]["metadata"]["labels"]
    assert allowed_egress_ports(job) == {3306}
