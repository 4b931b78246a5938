"""What dooms a run is found before Ray starts and any model loads, and said in one line.

Each preflight case runs `harmonize run` as a user would, with Ray's start replaced by a
failure (so a check that does not fire fails the test instead of running the pipeline). A
storage failure in the middle of a run (a bucket policy that lets the run write images but
not results) also ends in one line and a non-zero exit, the traceback only with --verbose.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from storage_args import cli_args
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ModelConfig, RunConfig
from pipeline.datasets.demo import build_demo
from pipeline.preflight import storage_failure
from pipeline.run import run
from pipeline.storage import describe, filesystem

REPO = Path(__file__).resolve().parent.parent
S3_ALL = "arn:aws:s3:::"


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def started(*_: Any) -> None:
        raise AssertionError("Ray was started: the problem was not found before the run")

    monkeypatch.setattr("pipeline.run.init_ray", started)


def harmonize(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, ["run", "--no-progress", *args])
    print(result.output)  # shown when a test fails
    return result.exit_code, result.output.strip().splitlines()


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody may write to: by permissions, or for root a read-only mount."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "harmonize-test", str(folder)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("running as root where mount is not allowed: no folder is read-only to root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_output_prefix_that_is_a_file(no_ray: None, demo_manifest: str, tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    code, lines = harmonize("-m", demo_manifest, "-o", str(tmp_path / "out"))
    assert (code, lines) == (
        2, [f"error: output {tmp_path / 'out'} is a file; it must be a folder (or not exist)"]
    )  # fmt: skip


def test_results_folder_that_is_a_file(no_ray: None, demo_manifest: str, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results").write_text("not a folder")
    code, lines = harmonize("-m", demo_manifest, "-o", str(tmp_path / "out"))
    assert (code, lines) == (
        2, [f"error: results/ under output {tmp_path / 'out'} is a file; it must be a folder "
            "(or not exist)"],
    )  # fmt: skip


def test_read_only_output(no_ray: None, demo_manifest: str, read_only_dir: Path) -> None:
    code, lines = harmonize("-m", demo_manifest, "-o", str(read_only_dir / "out"))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: output {read_only_dir / 'out'} cannot be written: ")
    assert lines[0].endswith(("read-only file system", "permission denied (Permission denied)"))


def test_missing_output_bucket(no_ray: None, demo_manifest: str, s3_server: dict[str, Any]) -> None:
    code, lines = harmonize("-m", demo_manifest, "-o", "s3://no-such-bucket/out",
                            *cli_args(s3_server))  # fmt: skip
    assert (code, lines) == (
        2, ["error: output s3://no-such-bucket/out cannot be written: not found (The specified "
            "bucket does not exist)"],
    )  # fmt: skip


@pytest.fixture
def s3_demo(s3_server: dict[str, Any], s3_bucket: str) -> str:
    """The demo set on S3 (uploaded before credentials are checked); its manifest URI."""
    return build_demo(f"s3://{s3_bucket}/demo", s3_server)


def test_wrong_s3_credentials(
    no_ray: None, s3_demo: str, s3_iam: Callable[..., dict[str, Any]], s3_bucket: str
) -> None:
    known = s3_iam([{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}])
    wrong = {**known, "key": "AKIAUNKNOWNKEY000000"}
    code, lines = harmonize("-m", s3_demo, "-o", f"s3://{s3_bucket}/out", *cli_args(wrong))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: manifest {s3_demo} cannot be read: permission denied")
    assert known["secret"] not in lines[0]


def test_credentials_that_may_only_read(
    no_ray: None, s3_demo: str, s3_iam: Callable[..., dict[str, Any]], s3_bucket: str
) -> None:
    reader = s3_iam([{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                      "Resource": [f"{S3_ALL}{s3_bucket}", f"{S3_ALL}{s3_bucket}/*"]}])  # fmt: skip
    code, lines = harmonize("-m", s3_demo, "-o", f"s3://{s3_bucket}/out", *cli_args(reader))
    assert (code, lines) == (
        2, [f"error: output s3://{s3_bucket}/out cannot be written: permission denied (Access "
            "Denied)"],
    )  # fmt: skip


def test_credentials_that_cannot_read_the_images(
    no_ray: None, s3_demo: str, s3_iam: Callable[..., dict[str, Any]], s3_bucket: str
) -> None:
    """The manifest is readable, the images it names are not: one line, not 8 error rows."""
    manifest_only = s3_iam([
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"{S3_ALL}{s3_bucket}"},
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"{S3_ALL}{s3_demo[5:]}"},
        {"Effect": "Allow", "Action": "s3:*", "Resource": f"{S3_ALL}{s3_bucket}/out/*"},
    ])  # fmt: skip
    code, lines = harmonize("-m", s3_demo, "-o", f"s3://{s3_bucket}/out", *cli_args(manifest_only))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(
        f"error: images of manifest {s3_demo} cannot be read (first composite "
        f"s3://{s3_bucket}/demo/composites/"
    )
    assert "permission denied" in lines[0]


def test_storage_failure_mid_run_is_one_line(
    ray_cluster: None, s3_demo: str, s3_iam: Callable[..., dict[str, Any]], s3_bucket: str
) -> None:
    """A policy lets the run write its images but not its results: all the work is done, then
    the results write fails. One line on stderr, exit 1; the rerun with access completes."""
    out = f"s3://{s3_bucket}/out"
    no_results = s3_iam([
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
         "Resource": [f"{S3_ALL}{s3_bucket}", f"{S3_ALL}{s3_bucket}/*"]},
        {"Effect": "Allow", "Action": ["s3:PutObject", "s3:DeleteObject"],
         "Resource": [f"{S3_ALL}{s3_bucket}/out/images/*",
                      f"{S3_ALL}{s3_bucket}/out/.harmonize-*"]},
    ])  # fmt: skip
    command = [sys.executable, str(REPO / "jobs" / "harmonize.py"), "--manifest", s3_demo,
               "--output", out, "--no-progress", "--ray-address", "local", "--num-cpus", "4",
               "--resolution", "64", "--run-id", "denied", *cli_args(no_results)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and done.stderr.rstrip().endswith(errors[0]), done.stderr[-3000:]
    assert errors[0].startswith(f"error: cannot write results file {out}/results/denied/part-")
    assert errors[0].endswith(".parquet: permission denied (Access Denied)")
    print(done.stderr)  # shown when a later check fails
    fs, path = filesystem(out, no_results)
    assert len(fs.ls(f"{path}/images")) == 8  # the work was done; only the results failed
    assert not fs.exists(f"{path}/results")  # and nothing half-written

    # --verbose adds the traceback (in this process, on the running cluster).
    verbose = CliRunner().invoke(app, ["run", *command[2:], "--verbose"])
    assert verbose.exit_code == 1 and "Traceback" in verbose.output
    assert f"\nerror: cannot write results file {out}/results/denied/part-" in verbose.output

    # Given access, the rerun completes.
    writer = s3_iam([{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}])
    summary = run(RunConfig(s3_demo, out, model=ModelConfig(resolution=64), run_id="denied",
                            storage_options=writer, show_progress=False))  # fmt: skip
    assert (summary.samples, summary.ok) == (8, 8)


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory"),
         "a file is where a folder should be (Not a directory)"),
        (PermissionError("Access Denied"), "permission denied (Access Denied)"),
        (FileNotFoundError("The specified bucket does not exist"),
         "not found (The specified bucket does not exist)"),
    ],
)  # fmt: skip
def test_storage_errors_in_a_few_words(error: OSError, said: str) -> None:
    assert describe(error) == said
    try:  # raised deep inside something else, as a failed run raises it
        try:
            raise error
        except OSError as exc:
            raise RuntimeError("write task failed") from exc
    except RuntimeError as wrapped:
        assert storage_failure(wrapped) == f"storage: {said}"


def test_a_failure_that_is_not_storage_is_not_reworded() -> None:
    assert storage_failure(ValueError("a bug")) is None
