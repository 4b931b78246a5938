"""The pinned dependency set: what CI tested is what the lock says and what clusters install.

`make` installs requirements.lock (deploy/lock.sh writes it); clusters install
deploy/runtime-requirements.txt (cluster.yaml, the RayJob). These tests run in the environment
`make test` built, so a lock that drifts from it, or two files that disagree, fail here.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if match:
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


LOCK = pins(REPO / "requirements.lock")
RUNTIME = pins(REPO / "deploy" / "runtime-requirements.txt")


def test_this_environment_is_the_lock() -> None:
    """Every pinned package is installed at its pinned version (a local build label such as
    torch's `+cpu` aside): the tests that pass here are the tests of the locked set."""
    wrong = {}
    for name, version in LOCK.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            wrong[name] = (version, None)
            continue
        if Version(installed).public != Version(version).public:
            wrong[name] = (version, installed)
    assert not wrong, f"installed differs from requirements.lock (make install): {wrong}"


def test_clusters_run_the_locked_versions_of_what_the_project_needs() -> None:
    assert RUNTIME and set(RUNTIME) < set(LOCK)
    assert {n: v for n, v in RUNTIME.items() if LOCK[n] != v} == {}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in map(Requirement, project["dependencies"]):
        name = canonicalize_name(requirement.name)
        assert name in RUNTIME, name
        assert RUNTIME[name] in requirement.specifier, (name, RUNTIME[name])
    # The test-only tools stay off the clusters.
    assert not {"pytest", "moto", "ruff"} & set(RUNTIME)


def test_the_makefile_installs_the_lock_and_the_same_torch() -> None:
    makefile = (REPO / "Makefile").read_text()
    torch = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", makefile, re.M)
    assert torch and LOCK["torch"] == torch.group(1) == RUNTIME["torch"]
    assert "pip install -q -r $(LOCK)" in makefile and "LOCK   := requirements.lock" in makefile
