"""Model folders on the Hugging Face Hub: `--model-dir hf://ORG/REPO[@REVISION]/FOLDER`.

End to end against a stand-in Hub on 127.0.0.1 (`tests/hub_server.py`), which huggingface_hub
reaches through `HF_ENDPOINT`, as users of a Hub mirror point it. The commands run as users run
them, in subprocesses: huggingface_hub reads `HF_ENDPOINT` when it is imported, and the workers
of the local Ray cluster a run starts inherit the environment (`HF_TOKEN` included). Checked:
`harmonize model check` and `harmonize run` on the Hub give what the local folder gives, each
file is downloaded once per node (the probe and the actor share the node cache, a second run
downloads nothing), a bad revision or a missing repository is one line before any work, and the
token reaches the server but no output, log or file.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hub_server import StandInHub
from PIL import Image
from tiny_checkpoint import write_tiny_model_dir

from pipeline.config import ModelConfig, RunConfig
from pipeline.models.cache import cache_path
from pipeline.results import read_results, run_folder
from pipeline.run import run
from pipeline.storage import filesystem, read_bytes

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_secretTOKENthatmustneverbeprinted0123"
MODEL = "hf://org/tiny@v1/diffharmony"
# The tiny model at the resolution and steps the other end-to-end tests use.
MODEL_ARGS = ["--model", "diffharmony", "--resolution", "64", "--steps", "1", "--no-refine"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandInHub]:
    """org/tiny at `main` and `v1`: the tiny model under diffharmony/, beside a README and
    .gitattributes, as a Hub repository holds them."""
    repo = tmp_path_factory.mktemp("hub") / "org-tiny"
    write_tiny_model_dir(repo / "diffharmony")
    (repo / "README.md").write_text("# tiny\n")
    (repo / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    with StandInHub({"org/tiny": {"main": repo, "v1": repo}}) as server:
        yield server


@pytest.fixture
def local_model(hub: StandInHub, tmp_path: Path) -> Path:
    """The same folder, local: what the Hub runs are compared with."""
    return write_tiny_model_dir(tmp_path / "local-model")


def _env(hub: StandInHub, home: Path, ray_tmp: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RAY_ADDRESS"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_TOKEN=TOKEN,
        HOME=str(home),  # the node cache: ~/.cache/harmonize/models
        HF_HOME=str(home / "huggingface"),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)  # the run's Ray session logs, searched for the token
    return env


def harmonize(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


def _problems(stderr: str, prefix: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


def _assert_token_sent_never_shown(hub: StandInHub, *texts: str) -> None:
    api = [r for r in hub.requests if r.path.startswith("/api/models/") or "/resolve/" in r.path]
    assert api and {r.authorization for r in api} == {f"Bearer {TOKEN}"}
    for text in texts:
        assert TOKEN not in text


def _assert_token_in_no_file(*roots: Path) -> None:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_socket():
                assert TOKEN.encode() not in path.read_bytes(), path


def test_hub_uris_go_to_huggingface_hub_without_the_object_store_options() -> None:
    """The URI is huggingface_hub's own form; the run's S3 options and secrets stay with S3;
    each revision has its own place in the node cache."""
    s3_options = {"key": "s3-key", "secret": "s3-secret", "endpoint_url": "http://127.0.0.1:9"}
    fs, path = filesystem(MODEL, s3_options)
    assert type(fs).__name__ == "HfFileSystem" and path == "org/tiny@v1/diffharmony"
    assert "s3-secret" not in repr(fs.storage_options) and "endpoint_url" not in fs.storage_options
    assert filesystem("hf://datasets/org/data@refs%2Fpr%2F1/x", {})[1] == (
        "datasets/org/data@refs%2Fpr%2F1/x"
    )
    assert cache_path(MODEL) != cache_path(MODEL.replace("@v1", "@v2"))
    assert cache_path(MODEL) == cache_path(MODEL + "/")


def test_model_check_on_the_hub(hub: StandInHub, tmp_path: Path) -> None:
    hub.requests.clear()
    env = _env(hub, tmp_path / "home")
    ok = harmonize(["model", "check", MODEL], env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{MODEL}: OK"
    # Each file once, in one streaming GET (no ranged reads); the README beside it not at all.
    downloads = Counter(hub.downloads())
    assert set(downloads.values()) == {1} and len(downloads) == 11
    assert all(p.startswith("/org/tiny/resolve/v1/diffharmony/") for p in downloads)
    assert {r.status for r in hub.requests if "/resolve/" in r.path} == {200}

    bad_revision = harmonize(["model", "check", "hf://org/tiny@nope/diffharmony"], env)
    missing_repo = harmonize(["model", "check", "hf://org/missing/diffharmony"], env)
    for result, says in ((bad_revision, "revision not found"),
                         (missing_repo, "repository not found")):  # fmt: skip
        assert result.returncode == 1
        (line,) = _problems(result.stderr, "problem:")
        assert says in line, result.stderr
    outputs = [r.stdout + r.stderr for r in (ok, bad_revision, missing_repo)]
    _assert_token_sent_never_shown(hub, *outputs)
    _assert_token_in_no_file(tmp_path / "home" / ".cache" / "harmonize")


def test_a_branch_that_moves_on_is_fetched_again(hub: StandInHub, tmp_path: Path) -> None:
    """`hf://org/tiny/diffharmony` follows `main`: a commit that rewrites a file with the same
    size (retrained weights have the same shapes) changes its blob id, and the next load fetches
    the folder again; an unchanged branch is served from the cache."""
    env = _env(hub, tmp_path / "home")
    uri = "hf://org/tiny/diffharmony"
    files = hub.repos["org/tiny"]["main"]
    config = "diffharmony/scheduler/scheduler_config.json"
    original = files[config]
    try:
        hub.requests.clear()
        assert harmonize(["model", "check", uri], env).returncode == 0
        first = len(hub.downloads())
        assert harmonize(["model", "check", uri], env).returncode == 0
        assert len(hub.downloads()) == first  # unchanged: from the cache
        files[config] = original.replace(b'"steps_offset": 1', b'"steps_offset": 0')
        assert len(files[config]) == len(original) and files[config] != original
        assert harmonize(["model", "check", uri], env).returncode == 0
        assert len(hub.downloads()) == 2 * first
        cached = cache_path(uri, tmp_path / "home" / ".cache" / "harmonize" / "models")
        assert (cached / "scheduler" / "scheduler_config.json").read_bytes() == files[config]
    finally:
        files[config] = original


def _images(results: pa.Table) -> dict[str, np.ndarray]:
    return {
        row["sample_id"]: np.asarray(Image.open(io.BytesIO(read_bytes(row["output_uri"], {}))))
        for row in results.to_pylist()
    }


def test_run_with_a_model_dir_on_the_hub(
    hub: StandInHub, local_model: Path, ray_cluster: None, demo_manifest: str, tmp_path: Path
) -> None:
    # The reference: the same model from a local folder.
    model = ModelConfig(name="diffharmony", model_dir=str(local_model), resolution=64, steps=1,
                        refine=False)  # fmt: skip
    local = RunConfig(demo_manifest, str(tmp_path / "local"), model=model, run_id="local",
                      show_progress=False)  # fmt: skip
    assert run(local).ok == 8
    expected = read_results(run_folder(local.output, "local"), {})
    assert expected is not None

    hub.requests.clear()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    try:
        env = _env(hub, tmp_path / "home", ray_tmp)
        output = str(tmp_path / "hub")
        common = ["-m", demo_manifest, *MODEL_ARGS, "--no-progress", "--ray-address", "local",
                  "--num-cpus", "4"]  # fmt: skip
        first = harmonize(["run", *common, "-o", output, "--model-dir", MODEL,
                           "--run-id", "hub"], env)  # fmt: skip
        assert first.returncode == 0, first.stderr[-3000:]
        assert "8 ok, 0 error" in first.stdout
        results = read_results(run_folder(output, "hub"), {})
        assert results is not None
        # The same weights (the same fingerprint, so the same params_hash) and the same images.
        assert set(results["params_hash"].to_pylist()) == set(expected["params_hash"].to_pylist())
        images, reference = _images(results), _images(expected)
        assert images.keys() == reference.keys()
        for sample_id, image in images.items():
            assert np.abs(image.astype(int) - reference[sample_id]).max() <= 1

        # The probe task and the actor ran on this node: one copy, each file fetched once.
        downloads = Counter(hub.downloads())
        assert len(downloads) == 11 and set(downloads.values()) == {1}

        # A second run finds everything done; its probe still loads the model, from the cache
        # (the remote listing is compared, nothing downloaded).
        listings = sum("/tree/" in r.path for r in hub.requests)
        second = harmonize(["run", *common, "-o", output, "--model-dir", MODEL,
                            "--run-id", "again"], env)  # fmt: skip
        assert second.returncode == 0, second.stderr[-3000:]
        assert "8 already done, skipped" in second.stdout
        assert Counter(hub.downloads()) == downloads
        assert sum("/tree/" in r.path for r in hub.requests) > listings

        # A revision that does not exist: one line, exit 2, before any sample is read.
        failed_output = tmp_path / "bad"
        bad = harmonize(["run", *common, "-o", str(failed_output), "--model-dir",
                         "hf://org/tiny@nope/diffharmony"], env)  # fmt: skip
        assert bad.returncode == 2, bad.stderr[-3000:]
        (line,) = _problems(bad.stderr, "error:")
        assert "hf://org/tiny@nope/diffharmony" in line and "revision not found" in line
        assert "Traceback" not in bad.stderr
        assert not (failed_output / "images").exists()
        assert not (failed_output / "results").exists()

        runs = (first, second, bad)
        _assert_token_sent_never_shown(hub, *(r.stdout + r.stderr for r in runs))
        _assert_token_in_no_file(ray_tmp, tmp_path / "home" / ".cache" / "harmonize",
                                 Path(output))  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
