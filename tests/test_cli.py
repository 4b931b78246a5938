"""The command line as people use it: help texts and `harmonize model check`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from storage_args import cli_args
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
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("  ")}
    # DiffHarmony++'s columns, described.
    assert "harmony classifier's probability" in lines["unharmony_prob"]
    assert "double" in lines["unharmony_prob"]
    assert "seeded from (seed, sample_id, k)" in lines["variant"]
    assert "made from" in lines["source_sample_id"]
    assert "'inverse'" in lines["direction"]
    assert "--classifier" in lines["classifier_fingerprint"]


def test_model_check_validates_a_harmony_vae(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model_dir = write_tiny_model_dir(tmp_path / "model", harmony_vae=True)
    ok = runner.invoke(app, ["model", "check", str(model_dir)])
    assert ok.exit_code == 0 and "OK" in ok.output
    weights = model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["conditional_encoder.down_block_skip_convs.3.weight"]
    save_file(tensors, str(weights))
    broken = runner.invoke(app, ["model", "check", str(model_dir)])
    assert broken.exit_code == 1
    assert (
        "vae/: 1 missing weights: conditional_encoder.down_block_skip_convs.3.weight"
        in broken.output
    )
    config = json.loads((model_dir / "vae" / "config.json").read_text())
    (model_dir / "vae" / "config.json").write_text(
        json.dumps({**config, "additional_in_channels": 3})
    )
    other = runner.invoke(app, ["model", "check", str(model_dir)])
    assert other.exit_code == 1 and "additional_in_channels 3" in other.output


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
        ["model", "check", f"s3://{s3_bucket}/tiny", *cli_args(s3_server)],
        env={"HOME": str(tmp_path)},  # the node cache goes under ~/.cache
    )  # fmt: skip
    assert result.exit_code == 0, result.output
