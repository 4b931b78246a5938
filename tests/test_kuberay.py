"""deploy/kuberay checked by the schemas the cluster checks it with, and against the job's CLI.

- The RayJob against KubeRay v1.7.0's own CRD (vendored in deploy/kuberay/schema/), strictly:
  an unknown field is an error, as `kubectl create --validate=strict` makes it one.
- The CronJob, its ServiceAccount, Role and RoleBinding against Kubernetes' own JSON schemas
  (the kubernetes-validate package), strictly.
- The RayJob's entrypoint parsed by `harmonize run`'s own parser, and equal to the README's
  `ray job submit` command; its pip list equal to the tested pins; no credential inline.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "deploy" / "kuberay"
KUBERNETES_VERSION = "1.33.0"


def _strict(schema: Any) -> Any:
    """The CRD's schema with unknown fields refused wherever the API server would drop them."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayjob_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((KUBERAY / "schema" / "ray.io_rayjobs.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == "RayJob"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: not in a CRD's schema
    return jsonschema.Draft7Validator(schema)


def _rayjob() -> dict[str, Any]:
    return yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())


def _errors(validator: jsonschema.Draft7Validator, document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def test_the_rayjob_is_valid_for_kuberay(rayjob_validator: jsonschema.Draft7Validator) -> None:
    rayjob = _rayjob()
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert _errors(rayjob_validator, rayjob) == []
    # The check can fail: a misspelt field, a wrong type.
    typo = copy.deepcopy(rayjob)
    typo["spec"]["entrypont"] = typo["spec"].pop("entrypoint")
    assert any("entrypont" in e for e in _errors(rayjob_validator, typo))
    wrong = copy.deepcopy(rayjob)
    wrong["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas" in e for e in _errors(rayjob_validator, wrong))


def test_the_rayjob_runs_on_gpus_and_keeps_credentials_out() -> None:
    spec = _rayjob()["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    (workers,) = cluster["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--device cuda" in spec["entrypoint"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    for c in (head, container):
        assert c["envFrom"] == [{"secretRef": {"name": "harmonize-storage"}}]
        for variable in c.get("env", []):
            assert "value" not in variable or not re.search(
                "KEY|SECRET|TOKEN|PASSWORD", variable["name"]
            ), variable
    assert spec["shutdownAfterJobFinishes"] is True


def _pins(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def test_the_rayjob_installs_the_tested_pins() -> None:
    runtime = yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"])
    assert runtime["pip"]["packages"] == _pins(REPO / "deploy" / "runtime-requirements.txt")
    assert runtime["working_dir"].endswith(".zip")


def _run_arguments(command: str) -> list[str]:
    words = shlex.split(command)
    start = words.index("jobs/harmonize.py")
    assert words[start - 1] == "python"
    return words[start + 1 :]


def test_the_entrypoint_is_harmonize_run_with_the_readmes_options() -> None:
    """Parsed by the CLI itself (an unknown option or a bad value fails here), and the same
    command as the README's `ray job submit`: one job, two ways to submit it."""
    from typer.main import get_command

    from pipeline.cli import app

    arguments = _run_arguments(_rayjob()["spec"]["entrypoint"])
    run = get_command(app).get_command(None, "run")  # type: ignore[attr-defined]
    context = run.make_context("run", list(arguments))
    assert context.params["model"] == "diffharmony" and context.params["device"] == "cuda"

    readme = (REPO / "README.md").read_text().replace("\\\n", " ")  # continued lines joined
    submits = re.findall(r"ray job submit [^\n]*", readme)
    commands = [_run_arguments(s) for s in submits if "jobs/harmonize.py" in s]
    assert arguments in commands, commands


def test_the_daily_schedule_is_valid_kubernetes() -> None:
    documents = list(yaml.safe_load_all((KUBERAY / "daily.yaml").read_text()))
    kinds = [d["kind"] for d in documents]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "CronJob"]
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(documents[-1])
    broken["spec"]["schedulle"] = broken["spec"].pop("schedule")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)

    # The CronJob creates the RayJob of rayjob.yaml, from the ConfigMap kustomize makes of it,
    # and may create RayJobs and nothing else.
    cronjob = documents[-1]
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (volume,) = pod["volumes"]
    (container,) = pod["containers"]
    mount = container["volumeMounts"][0]["mountPath"]
    assert container["command"] == ["kubectl", "create", "-f", f"{mount}/rayjob.yaml"]
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    (generated,) = kustomization["configMapGenerator"]
    assert generated["name"] == volume["configMap"]["name"]
    assert generated["files"] == ["rayjob.yaml"] and kustomization["resources"] == ["daily.yaml"]
    role = documents[1]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "verbs": ["create"]}]  # fmt: skip
    assert pod["serviceAccountName"] == documents[0]["metadata"]["name"]
    assert "generateName" in _rayjob()["metadata"]  # a new RayJob each day
