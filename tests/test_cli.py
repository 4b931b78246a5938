"""The command line as people use it: help texts and `harmonize model check`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tiny_checkpoint import write_tiny_model_dir
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.storage import filesystem

runner = CliRunner()


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "demo", "runs", "schema", "model"):
        assert command in result.output
    run_help = runner.invoke(app, ["run", "--help"], terminal_width=200).output
    for option in ("--manifest", "--output", "--model", "--model-dir", "--concurrency"):
        assert option in run_help


def test_schema_prints_descriptions() -> None:
    result = runner.invoke(app, ["schema"])
    assert (
        result.exit_code == 0
        and "output_uri" in result.output
        and "'ok' or 'error'" in result.output
    )


def test_model_check_ok_and_broken(tmp_path: Path) -> None:
    model_dir = write_tiny_model_dir(tmp_path / "model")
    ok = runner.invoke(app, ["model", "check", str(model_dir)])
    assert ok.exit_code == 0 and "OK" in ok.output
    shutil.rmtree(model_dir / "vae")
    broken = runner.invoke(app, ["model", "check", str(model_dir)])
    assert broken.exit_code == 1 and "vae" in broken.output


def test_model_check_on_s3(tmp_path: Path, s3_server: dict[str, Any], s3_bucket: str) -> None:
    model_dir = write_tiny_model_dir(tmp_path / "model")
    fs, _ = filesystem(f"s3://{s3_bucket}", s3_server)
    fs.put(str(model_dir), f"{s3_bucket}/tiny", recursive=True)
    result = runner.invoke(
        app,
        ["model", "check", f"s3://{s3_bucket}/tiny", "--endpoint-url", s3_server["endpoint_url"],
         "--storage-option", f"key={s3_server['key']}",
         "--storage-option", f"secret={s3_server['secret']}"],
        env={"HOME": str(tmp_path)},  # the node cache goes under ~/.cache
    )  # fmt: skip
    assert result.exit_code == 0, result.output
