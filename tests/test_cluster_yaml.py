"""cluster.yaml is a valid Ray cluster-launcher config, checked offline with Ray's own code.

`ray up` runs `_bootstrap_config` (ray/autoscaler/_private/commands.py):
  1. `prepare_config`: merge with the provider's defaults.yaml (a file in the Ray wheel), merge
     setup_commands into head/worker_setup_commands, check docker, fill per-type min/max_workers;
  2. `provider.fillout_available_node_types_resources`: for AWS, asks EC2 for instance resources;
  3. `validate_config`: Ray's JSON schema (ray/autoscaler/ray-schema.json) plus cross-checks;
  4. `provider.bootstrap_config`: IAM role, key pair, subnets, security groups (AWS API calls).
Steps 1 and 3 are local and are what this test runs; 2 and 4 need AWS and are skipped. Step 2 only
fills resources a node type leaves out, and cluster.yaml spells them all out. Sockets are blocked
while the config is prepared and validated, so a change that reached for the network would fail.
"""

from __future__ import annotations

import copy
import re
import socket
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "cluster.yaml"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access during config validation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _prepare_and_validate(raw: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to the file before it touches AWS (see the module docstring)."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _resources_are_ints(config: dict[str, Any]) -> bool:
    # Ray's schema is draft-07, where 1.0 counts as an integer; demand real ints (not bools).
    return all(
        type(value) is int
        for node_type in config["available_node_types"].values()
        for value in node_type["resources"].values()
    )


def test_cluster_yaml_passes_ray_validation() -> None:
    config = _prepare_and_validate(_raw())
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] == "us-west-2"
    assert config["auth"]["ssh_user"] == "ubuntu"


def test_node_types() -> None:
    config = _prepare_and_validate(_raw())
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head node type must have no GPU"

    gpu_types = {
        name: node_type
        for name, node_type in node_types.items()
        if name != config["head_node_type"] and node_type["resources"].get("GPU", 0) >= 1
    }
    assert gpu_types, "no worker node type with a GPU"
    assert any(node_type["max_workers"] >= 1 for node_type in gpu_types.values())
    # A GPU worker stays up: placement reads GPUs from the cluster (pipeline/placement.py), and
    # the cluster launcher's autoscaler does not report node types a run could scale up to.
    assert any(node_type["min_workers"] >= 1 for node_type in gpu_types.values())
    assert config["max_workers"] >= 1

    assert _resources_are_ints(config)

    # The documented `--concurrency N` (one GPU per actor) fits on the GPU workers.
    max_gpus = sum(t["resources"]["GPU"] * t["max_workers"] for t in gpu_types.values())
    documented = [int(n) for n in re.findall(r"--concurrency (\d+)", CLUSTER_YAML.read_text())]
    assert documented and all(n <= max_gpus for n in documented)


def test_nodes_install_this_project() -> None:
    config = _prepare_and_validate(_raw())
    remote = next(r for r, local in config["file_mounts"].items() if local == ".")
    assert remote == "~/harmonize"
    assert 'name = "harmonize-pipeline"' in (REPO / "pyproject.toml").read_text()

    def installs(commands: list[str]) -> bool:
        """The tested pins first (deploy/lock.sh), then the project without resolving again."""
        pins = [
            i
            for i, c in enumerate(commands)
            if "pip install" in c and "-r ~/harmonize/deploy/runtime-requirements.txt" in c
        ]
        project = [i for i, c in enumerate(commands)
                   if re.search(r"pip install .*--no-deps -e ~/harmonize\b", c)]  # fmt: skip
        return bool(pins and project and pins[0] < project[0])

    assert installs(config["setup_commands"])
    # prepare_config merged them into what the head and the workers actually run.
    assert installs(config["head_setup_commands"])
    assert installs(config["worker_setup_commands"])

    assert (REPO / "deploy" / "runtime-requirements.txt").is_file()
    # Ray runs from the venv that holds the pins, so the driver and the workers use them.
    assert any(
        "~/venv/bin/ray start --head" in c
        and "--autoscaling-config=~/ray_bootstrap_config.yaml" in c
        for c in config["head_start_ray_commands"]
    )
    assert all("~/venv/bin/ray" in c for c in config["worker_start_ray_commands"] if "ray " in c)
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


def _gpu_type(raw: dict[str, Any]) -> dict[str, Any]:
    return next(t for t in raw["available_node_types"].values() if t["resources"].get("GPU"))


def _with_float_resource(raw: dict[str, Any]) -> None:
    _gpu_type(raw)["resources"]["GPU"] = 0.5


def _with_unknown_top_level_key(raw: dict[str, Any]) -> None:
    raw["max_worker"] = 4  # a typo of max_workers


def _with_bad_min_workers(raw: dict[str, Any]) -> None:
    _gpu_type(raw)["min_workers"] = "0"


@pytest.mark.parametrize(
    "break_config", [_with_float_resource, _with_unknown_top_level_key, _with_bad_min_workers]
)
def test_broken_copies_fail_validation(break_config: Any) -> None:
    raw = _raw()
    break_config(raw)
    with pytest.raises(jsonschema.ValidationError):
        _prepare_and_validate(raw)


def test_head_node_type_must_exist() -> None:
    raw = _raw()
    raw["head_node_type"] = "no.such.type"
    with pytest.raises(ValueError, match="head_node_type"):
        _prepare_and_validate(raw)


def test_float_that_the_schema_accepts_is_still_caught() -> None:
    raw = _raw()
    _gpu_type(raw)["resources"]["GPU"] = 1.0
    config = _prepare_and_validate(raw)  # draft-07 treats 1.0 as an integer
    assert not _resources_are_ints(config)
