"""The benchmarks run with one command each: smoke runs at the test suite's sizes.

Nothing here checks a speed (timings belong in bench/, never in tests); it checks that each
benchmark completes, measures what it says and reports it, so that bench/RESULTS.md can be
reproduced from a clean checkout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def bench(module: str, *args: str, timeout: int = 600) -> str:
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_gpu_bench_smoke_on_cpu(tmp_path: Path) -> None:
    out = bench(
        "gpu", "--device", "cpu", "--tiny", "--batch-sizes", "1,2", "--iters", "1",
        "--json", str(tmp_path / "gpu.json"),
    )  # fmt: skip
    payload = json.loads((tmp_path / "gpu.json").read_text())
    kinds = {(row["impl"], row["variant"]) for row in payload["rows"]}
    assert {("ours", "baseline"), ("official", "official loop"), ("actor", "HarmonizeActor"),
            ("ours", "math attention"), ("ours", "channels_last")} <= kinds  # fmt: skip
    assert all(row["images_per_second"] > 0 for row in payload["rows"])
    assert payload["flops"]["64"]["harmonize"] > payload["flops"]["64"]["unet_per_step"] > 0
    (parts,) = payload["components"].values()
    assert {"unet_call", "vae_encode", "vae_decode", "refiner", "harmonize", "other"} == set(parts)
    assert all(parts[k]["seconds"] > 0 < parts[k]["tflops"] for k in ("unet_call", "harmonize"))
    assert "vs official" in out


def test_flops_only_counts_sd15_sizes_without_a_gpu(tmp_path: Path) -> None:
    out = bench("gpu", "--flops-only", "--resolutions", "512", "--json", str(tmp_path / "f.json"))
    flops = json.loads((tmp_path / "f.json").read_text())["flops"]["512"]
    # SD-1.5's UNet at a 64x64 latent is about 0.8 TFLOP per call (FlopCounterMode: 2 per MAC).
    assert 0.5e12 < flops["unet_per_step"] < 1.2e12
    assert flops["total_5_steps"] > 5 * flops["unet_per_step"]
    assert "512 px, FLOPs per image" in out


def test_overhead_and_io_path_benches_run_the_real_pipeline(tmp_path: Path) -> None:
    out = bench(
        "overhead", "--size", "tiny", "--samples", "8", "--concurrency", "1",
        "--bare-1thread-samples", "0", "--resolution", "64", "--work", str(tmp_path / "work"),
        "--json", str(tmp_path / "overhead.json"),
    )  # fmt: skip
    overhead = json.loads((tmp_path / "overhead.json").read_text())
    assert overhead["runs"][0]["ok"] == 8 and overhead["bare"]["images_per_second"] > 0
    assert "ratio to bare loop" in out and "per-stage seconds per image" in out

    out = bench(
        "io_path", "--samples", "4", "--concurrency", "1", "--work", str(tmp_path / "work"),
        "--json", str(tmp_path / "io.json"),
    )  # fmt: skip
    io = json.loads((tmp_path / "io.json").read_text())
    assert sorted(run["ok"] for run in io["runs"]) == [4, 40]
    assert all(run["private"]["driver_peak"] > 0 for run in io["runs"])
    assert "memory (private), concurrency 1, 4 -> 40 samples" in out
