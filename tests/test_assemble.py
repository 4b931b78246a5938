"""`harmonize model assemble` end to end, on downloads laid out as users get them.

`tiny_checkpoint.write_official_download` writes the three downloads (SD inpainting repository
with decoy unet/ and vae/, sd-vae-ft-mse with old names and .bin, the nested DiffHarmony release
with pickled UNet and refiner and a ConditionVAE) holding the tiny model's tensors, so the
assembled folder must give exactly the modern tiny folder's pixels: locally through `harmonize
run` on Ray, and from S3 (moto) through the harmonizer.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from storage_args import cli_args
from tiny_checkpoint import write_official_download, write_tiny_model_dir
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ModelConfig
from pipeline.models import load_harmonizer
from pipeline.models.assemble import MODEL_CARD
from pipeline.models.base import HarmonizeBatch
from pipeline.storage import filesystem

runner = CliRunner()


@pytest.fixture(scope="module")
def download(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_official_download(tmp_path_factory.mktemp("download"))


@pytest.fixture(scope="module")
def modern(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What assembling the download gives by default: the release's Harmony-VAE in vae/."""
    return write_tiny_model_dir(tmp_path_factory.mktemp("modern") / "model", harmony_vae=True)


def _sample_batch() -> HarmonizeBatch:
    generator = torch.Generator().manual_seed(3)
    return HarmonizeBatch(
        sample_ids=["a"],
        composites=[torch.rand(3, 40, 56, generator=generator)],
        masks=[(torch.rand(1, 40, 56, generator=generator) > 0.5).float()],
        seeds=[9],
    )


def _pixels(model_dir: Path | str, **overrides: Any) -> torch.Tensor:
    config = ModelConfig(
        name="diffharmony", model_dir=str(model_dir), resolution=64, output_resolution=32,
        device="cpu", **overrides,
    )  # fmt: skip
    return load_harmonizer(config).harmonize(_sample_batch())[0]


def _assemble(download: dict[str, Any], out: str, *extra: str, env: Any = None) -> Any:
    return runner.invoke(
        app,
        ["model", "assemble", "--inpainting", str(download["inpainting"]),
         "--vae", str(download["vae"]), "--diffharmony", str(download["diffharmony"]),
         "--out", out, *extra],
        env=env,
    )  # fmt: skip


def _images(output: Path) -> dict[str, bytes]:
    folder = output / "images"
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")}


def test_assemble_an_official_download_and_run_it(
    download: dict[str, Path], modern: Path, ray_cluster: None, demo_manifest: str, tmp_path: Path
) -> None:
    out = tmp_path / "diffharmony"
    result = _assemble(download, str(out), "--allow-unsafe-pickle")
    assert result.exit_code == 0, result.output
    release = download["diffharmony"]
    lines = result.output.splitlines()
    assert (
        f"unet/          <- {release}/pretrained/diffharmony/unet: config.json, "
        "diffusion_pytorch_model.bin -> diffusion_pytorch_model.safetensors (converted)"
    ) in lines
    assert (
        f"refiner/       <- {release}/pretrained/refinement/base/unet: config.json, "
        "diffusion_pytorch_model.bin -> diffusion_pytorch_model.safetensors (converted)"
    ) in lines
    # Of the text encoder's safetensors and pickle, the safetensors; of the inpainting
    # repository, not its own unet/ or vae/.
    assert (
        f"text_encoder/  <- {download['inpainting']}/text_encoder: config.json, model.safetensors"
    ) in lines
    # DiffHarmony++'s Harmony-VAE, which the release holds, decodes (--vae is not needed).
    assert (
        f"vae/           <- {release}/pretrained/cvae/vae: config.json, "
        "diffusion_pytorch_model.bin -> diffusion_pytorch_model.safetensors (converted)"
    ) in lines
    assert f"note: --vae {download['vae']}: not used, the Harmony-VAE decodes" in result.output
    assert "diffharmony-gen" not in result.output  # the inverse model's folders are not taken
    assert (
        lines[-1] == f"{out}: OK (checked; MODEL_CARD.md lists the sources and every file's sha256)"
    )

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert not [f for f in files if not f.endswith((".safetensors", ".json", ".txt", ".md"))]
    assert "empty_prompt_embeds.safetensors" in files
    card = (out / MODEL_CARD).read_text()
    listed = dict(re.findall(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|$", card, re.MULTILINE))
    assert listed == {
        f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in files if f != MODEL_CARD
    }
    assert "no licence file" in card and f"`{release}/pretrained/diffharmony/unet`" in card
    assert "Harmony-VAE (`vae/`, a ConditionVAE)" in card
    assert not list(tmp_path.glob(".diffharmony.assemble-*"))  # the staging folder is gone

    check = runner.invoke(app, ["model", "check", str(out)])
    assert check.exit_code == 0 and check.output.strip() == f"{out}: OK"

    # `harmonize run` uses it, and it is the modern tiny model: the same PNG bytes.
    outputs = {}
    for name, model_dir in (("assembled", out), ("modern", modern)):
        output = tmp_path / f"out-{name}"
        ran = runner.invoke(
            app,
            ["run", "-m", demo_manifest, "-o", str(output), "--model", "diffharmony",
             "--model-dir", str(model_dir), "--resolution", "64", "--steps", "2",
             "--no-progress", "--run-id", "same"],
        )  # fmt: skip
        assert ran.exit_code == 0, ran.output
        assert "8 ok, 0 error" in ran.output
        outputs[name] = _images(output)
    assert len(outputs["modern"]) == 8
    assert outputs["assembled"] == outputs["modern"]


def test_plain_vae_and_the_inverse_model(download: dict[str, Path], tmp_path: Path) -> None:
    """--plain-vae: sd-vae-ft-mse decodes (DiffHarmony as first published); --direction
    inverse: the release's 'gen' folders (diffharmony-gen, cvae-gen). Each gives the pixels of
    the modern tiny folder made the same way."""
    release = download["diffharmony"]
    plain = _assemble(download, str(tmp_path / "plain"), "--allow-unsafe-pickle", "--plain-vae")
    assert plain.exit_code == 0, plain.output
    assert (
        f"vae/           <- {download['vae']}: config.json, diffusion_pytorch_model.safetensors"
    ) in plain.output.splitlines()
    assert f"note: {release}/pretrained/cvae/vae: a ConditionVAE" in plain.output
    expected = write_tiny_model_dir(tmp_path / "modern-plain")
    assert torch.equal(_pixels(tmp_path / "plain"), _pixels(expected))

    without_vae = {k: v for k, v in download.items() if k != "vae"}
    inverse = runner.invoke(
        app,
        ["model", "assemble", "--inpainting", str(download["inpainting"]),
         "--diffharmony", str(release), "--direction", "inverse",
         "--out", str(tmp_path / "inverse"), "--allow-unsafe-pickle"],
    )  # fmt: skip
    assert inverse.exit_code == 0, inverse.output
    lines = inverse.output.splitlines()
    assert any(line.startswith(f"unet/          <- {release}/pretrained/diffharmony-gen/unet:")
               for line in lines)  # fmt: skip
    assert any(line.startswith(f"vae/           <- {release}/pretrained/cvae-gen/vae:")
               for line in lines)  # fmt: skip
    card = (tmp_path / "inverse" / MODEL_CARD).read_text()
    assert "--direction inverse" in card and "diffharmony-gen" in card
    expected = write_tiny_model_dir(tmp_path / "modern-inverse", harmony_vae=True,
                                    direction="inverse")  # fmt: skip
    settings = {"refine": False, "direction": "inverse"}
    assert torch.equal(_pixels(tmp_path / "inverse", **settings), _pixels(expected, **settings))

    # Without --vae and with --plain-vae there is no VAE to take: said so.
    none = runner.invoke(
        app,
        ["model", "assemble", "--inpainting", str(without_vae["inpainting"]),
         "--diffharmony", str(release), "--plain-vae", "--out", str(tmp_path / "none"),
         "--allow-unsafe-pickle"],
    )  # fmt: skip
    assert none.exit_code == 1 and "--vae: the sd-vae-ft-mse folder is needed" in none.output


def test_pickles_are_refused_without_the_flag_and_nothing_is_written(
    download: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "diffharmony"
    result = _assemble(download, str(out))
    assert result.exit_code == 1
    release = download["diffharmony"]
    assert f"{release}/pretrained/diffharmony/unet/diffusion_pytorch_model.bin: pickled" in (
        result.output
    )
    assert f"{release}/pretrained/refinement/base/unet/diffusion_pytorch_model.bin: pickled" in (
        result.output
    )
    assert not out.exists() and not list(tmp_path.iterdir())


def test_ambiguity_lists_the_candidates_and_a_named_folder_settles_it(
    download: dict[str, Path], tmp_path: Path
) -> None:
    release = tmp_path / "release"
    shutil.copytree(download["diffharmony"], release)
    shutil.copytree(release / "pretrained" / "diffharmony", release / "pretrained" / "other")
    tree = {**download, "diffharmony": release}
    result = _assemble(tree, str(tmp_path / "a"), "--allow-unsafe-pickle")
    assert result.exit_code == 1
    assert (
        f"--diffharmony {release}: 2 candidates for the forward model's stage-1 UNet (a "
        "config.json saying "
        "UNet2DConditionModel with in_channels 9): "
        "pretrained/diffharmony/unet (UNet2DConditionModel, in_channels 9), "
        "pretrained/other/unet (UNet2DConditionModel, in_channels 9); choose one with --unet URI"
    ) in " ".join(result.output.split())

    named = _assemble(
        tree,
        str(tmp_path / "b"),
        "--allow-unsafe-pickle",
        "--unet",
        str(release / "pretrained" / "other" / "unet"),
    )
    assert named.exit_code == 0, named.output
    assert f"unet/          <- {release}/pretrained/other/unet: config.json" in named.output

    shutil.rmtree(release / "pretrained" / "other")
    shutil.rmtree(release / "pretrained" / "diffharmony")
    none = _assemble(tree, str(tmp_path / "c"), "--allow-unsafe-pickle")
    assert none.exit_code == 1
    assert f"--diffharmony {release}: no forward model's stage-1 UNet" in " ".join(
        none.output.split()
    )


def test_a_broken_download_or_a_used_out_is_refused(
    download: dict[str, Path], tmp_path: Path
) -> None:
    vae = tmp_path / "vae"
    shutil.copytree(download["vae"], vae)
    weights = vae / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    result = _assemble(
        {**download, "vae": vae}, str(tmp_path / "a"), "--allow-unsafe-pickle", "--plain-vae"
    )
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert "the assembled folder fails the check" in output
    assert "vae/diffusion_pytorch_model.safetensors: unreadable" in output
    assert not (tmp_path / "a").exists()

    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    result = _assemble(download, str(used), "--allow-unsafe-pickle")
    assert result.exit_code == 1 and "already holds files" in result.output


def test_assemble_from_s3_to_s3(
    download: dict[str, Path],
    modern: Path,
    s3_server: dict[str, Any],
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    fs, _ = filesystem(f"s3://{s3_bucket}", s3_server)
    for name, folder in download.items():
        fs.put(str(folder), f"{s3_bucket}/downloads/{name}", recursive=True)
    remote = {name: f"s3://{s3_bucket}/downloads/{name}" for name in download}
    out = f"s3://{s3_bucket}/models/diffharmony"
    options = cli_args(s3_server)
    env = {"HOME": str(tmp_path)}  # the node cache of `model check` goes under ~/.cache
    result = _assemble(remote, out, "--allow-unsafe-pickle", *options, env=env)
    assert result.exit_code == 0, result.output
    assert f"unet/          <- {remote['diffharmony']}/pretrained/diffharmony/unet" in result.output
    fs.invalidate_cache()
    files = {
        p.split("/models/diffharmony/", 1)[1] for p in fs.find(f"{s3_bucket}/models/diffharmony")
    }
    assert MODEL_CARD in files and "unet/diffusion_pytorch_model.safetensors" in files
    assert not [f for f in files if f.endswith(".bin")]

    check = runner.invoke(app, ["model", "check", out, *options], env=env)
    assert check.exit_code == 0, check.output

    # The harmonizer loads it from S3 and gives the modern tiny model's pixels.
    generator = torch.Generator().manual_seed(3)
    batch = HarmonizeBatch(
        sample_ids=["a"],
        composites=[torch.rand(3, 40, 56, generator=generator)],
        masks=[(torch.rand(1, 40, 56, generator=generator) > 0.5).float()],
        seeds=[9],
    )
    config = ModelConfig(
        name="diffharmony", model_dir=out, resolution=64, output_resolution=32, device="cpu",
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    from_s3 = load_harmonizer(config, s3_server).harmonize(batch)[0]
    local = load_harmonizer(replace(config, model_dir=str(modern))).harmonize(batch)[0]
    assert torch.equal(from_s3, local)

    again = _assemble(remote, out, "--allow-unsafe-pickle", *options, env=env)
    assert again.exit_code == 1 and "already holds files" in again.output
