"""The CUDA path: the model in fp32/fp16/bf16 against fp32, and the whole pipeline on a GPU.

Skipped where there is no CUDA device (CI, the development machines); `bench/gpu_check.sh`
runs them on a GPU machine. Tolerances are relative L2 errors ||out - ref|| / ||ref||: float32
through cuDNN's TF32 convolutions lands near 1e-3, fp16 and bf16 near 1e-2 (bf16 keeps 8 bits
of mantissa); different noise or weights move outputs by far more than 1e-1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tiny_checkpoint import write_tiny_model_dir
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ModelConfig
from pipeline.models import load_harmonizer
from pipeline.models.diffharmony import DiffHarmonyHarmonizer
from pipeline.results import run_folder
from pipeline.storage import filesystem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

# Relative L2 error allowed against CPU fp32, per dtype on CUDA.
TOLERANCE = {"fp32": 1e-2, "fp16": 3e-2, "bf16": 8e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "NaN or inf in the output"
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _harmonizer(model_dir: Path, device: str, dtype: str) -> DiffHarmonyHarmonizer:
    config = ModelConfig(name="diffharmony", model_dir=str(model_dir), resolution=64,
                         output_resolution=32, device=device, dtype=dtype)  # fmt: skip
    harmonizer = load_harmonizer(config)
    assert isinstance(harmonizer, DiffHarmonyHarmonizer)
    return harmonizer


def _inputs(batch_size: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    composite = torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1
    mask = torch.zeros(batch_size, 1, size, size)
    mask[:, :, size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = 1.0
    return composite, mask


def _stages(h: DiffHarmonyHarmonizer, device: str, generators: list[torch.Generator]) -> tuple:
    """Stage 1 on fixed inputs, and stage 2 on a fixed stage-1 image (so each is judged alone)."""
    composite, mask = _inputs(3, 64)
    small = torch.nn.functional.interpolate(composite, size=(32, 32), mode="bilinear")
    small_mask = torch.nn.functional.interpolate(mask, size=(32, 32))
    stage1_input = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    out1 = h.stage1(composite.to(device), mask.to(device), generators)
    out2 = h.stage2(stage1_input.to(device), ((small + 1) / 2).to(device), small_mask.to(device))
    assert out1.dtype == out2.dtype == torch.float32
    return out1, out2


def test_both_stages_on_cuda_fp32_match_the_cpu_with_the_same_noise(tiny_dir: Path) -> None:
    """CPU generators for both (randn_tensor draws on the CPU and moves the noise to the GPU),
    so what is left is the device's arithmetic (TF32 convolutions included)."""
    seeds = (1, 2, 3)
    ref = _stages(_harmonizer(tiny_dir, "cpu", "fp32"), "cpu",
                  [torch.Generator().manual_seed(s) for s in seeds])  # fmt: skip
    gpu = _harmonizer(tiny_dir, "cuda", "fp32")
    assert gpu.unet.device.type == "cuda"
    out = _stages(gpu, "cuda", [torch.Generator().manual_seed(s) for s in seeds])
    errors = [relative_error(o, r) for o, r in zip(out, ref)]
    print(f"cuda fp32 vs cpu fp32: stage 1 {errors[0]:.2e}, stage 2 {errors[1]:.2e}")
    assert max(errors) < TOLERANCE["fp32"], errors
    # Other noise is far outside the tolerance: the check can fail.
    other = _stages(gpu, "cuda", [torch.Generator().manual_seed(9)] * 3)
    assert relative_error(other[0], ref[0]) > 0.2


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_both_stages_in_half_precision_match_fp32_on_the_gpu(tiny_dir: Path, dtype: str) -> None:
    """fp16/bf16 against fp32, both on the GPU with CUDA generators: CUDA draws the same normal
    numbers in every dtype, the CPU need not (torch 2.11's half-precision CPU draws differ from
    its float32 draws), so the CPU comparison is made in fp32 above and this one on the GPU."""
    ref = _stages(_harmonizer(tiny_dir, "cuda", "fp32"), "cuda",
                  [torch.Generator("cuda").manual_seed(s) for s in (1, 2, 3)])  # fmt: skip
    gpu = _harmonizer(tiny_dir, "cuda", dtype)
    assert gpu.unet.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    out = _stages(gpu, "cuda", [torch.Generator("cuda").manual_seed(s) for s in (1, 2, 3)])
    errors = [relative_error(o, r) for o, r in zip(out, ref)]
    print(f"cuda {dtype} vs cuda fp32: stage 1 {errors[0]:.2e}, stage 2 {errors[1]:.2e}")
    assert max(errors) < TOLERANCE[dtype], errors


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_harmony_vae_stage1_in_every_dtype_matches_fp32_on_the_gpu(
    tmp_path_factory: pytest.TempPathFactory, dtype: str
) -> None:
    """DiffHarmony++'s Harmony-VAE decoding (its conditional encoder, the posterior drawn from
    each sample's CUDA generator) in fp32/fp16/bf16 against fp32 on the GPU."""
    model_dir = write_tiny_model_dir(tmp_path_factory.mktemp("cvae") / "model", harmony_vae=True)
    composite, mask = _inputs(3, 64)

    def stage1(model: DiffHarmonyHarmonizer) -> torch.Tensor:
        generators = [torch.Generator("cuda").manual_seed(s) for s in (1, 2, 3)]
        with torch.inference_mode():
            return model.stage1(composite.cuda(), mask.cuda(), generators)

    ref = stage1(_harmonizer(model_dir, "cuda", "fp32"))
    model = _harmonizer(model_dir, "cuda", dtype)
    assert model.harmony_vae and next(model.vae.parameters()).dtype == model.dtype
    error = relative_error(stage1(model), ref)
    print(f"cuda {dtype} Harmony-VAE stage 1 vs fp32: {error:.2e}")
    assert error < TOLERANCE[dtype], error


def _run(manifest: str, output: Path, model_dir: Path, dtype: str) -> dict[str, np.ndarray]:
    """One CLI run; returns sample id -> harmonized image (H, W, 3) uint8."""
    result = CliRunner().invoke(
        app,
        ["run", "-m", manifest, "-o", str(output), "--model", "diffharmony",
         "--model-dir", str(model_dir), "--resolution", "64", "--device", "cuda",
         "--dtype", dtype, "--batch-size", "4", "--no-progress", "--run-id", dtype],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "8 ok, 0 error" in result.output, result.output
    fs, path = filesystem(run_folder(str(output), dtype), {})
    files = [f for f in fs.find(path) if f.endswith(".parquet")]
    rows = pq.read_table(files[0]) if len(files) == 1 else pq.ParquetDataset(files).read()
    assert set(rows["status"].to_pylist()) == {"ok"}
    # Where it ran, as the results record it: the GPU's name, not a silent CPU fallback.
    assert {d.split(":")[0] for d in rows["device"].to_pylist()} == {"cuda"}
    assert f"ran on:  {rows['device'][0]} (8)" in result.output
    return {
        row["sample_id"]: np.asarray(Image.open(row["output_uri"]).convert("RGB"))
        for row in rows.to_pylist()
    }


def test_pipeline_on_cuda_in_fp16_and_bf16(
    ray_cluster: None, demo_manifest: str, tiny_dir: Path, tmp_path: Path
) -> None:
    """`harmonize run --device cuda` through Ray (the actor holds the GPU: without it, CUDA
    would be invisible to the actor and every row an error), fp16 and bf16 against fp32 on the
    same GPU (the same CUDA generators, so the same noise)."""
    outputs = {d: _run(demo_manifest, tmp_path / d, tiny_dir, d) for d in ("fp32", "fp16", "bf16")}
    for dtype in ("fp16", "bf16"):
        errors: list[Any] = []
        for sample_id, ref in outputs["fp32"].items():
            errors.append(relative_error(torch.from_numpy(outputs[dtype][sample_id]).float(),
                                         torch.from_numpy(ref).float()))  # fmt: skip
        print(f"pipeline cuda {dtype} vs fp32, per image: max {max(errors):.2e}")
        assert max(errors) < TOLERANCE[dtype], errors
