"""CPU, pipeline overhead: the full Ray pipeline against the bare model loop, side by side.

What it measures, on the same inputs, same model (random weights, `--size cpu`, 256 px, 5
steps, refinement on), same batch size:

- bare loop: every input decoded first (not timed), the harmonizer loaded (timed apart), then
  `harmonizer.harmonize` + `pipeline.score.score_batch` + the uint8 output pixels, batch after
  batch (timed), in this process with torch's default thread count (and, for the explanation,
  once more with one thread, what each Ray actor gets);
- pipeline: `pipeline.run.run` (manifest -> fetch/decode -> model -> metrics -> encode/write ->
  results Parquet) on a Ray cluster started beforehand (cluster start not timed), for each
  `--concurrency`.

It prints images/s three ways (end to end with the model loads, without the probe's model
load, steady state between the first and the last write task), the ratios pipeline / bare
loop (target >= 0.9), the per-stage seconds from the results' timings, and the CPU seconds
the driver, Ray's own processes and the workers used (psutil), to show where the rest goes.

Run (about 8 minutes on 2 cores):

    .venv/bin/python -m bench.overhead [--samples 160] [--concurrency 1,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import (
    ProcessSampler,
    decode_manifest,
    demo_inputs,
    dump_json,
    model_dir,
    print_header,
    stage_times,
    start_ray,
)
from pipeline.config import ModelConfig, RunConfig
from pipeline.models import load_harmonizer
from pipeline.models.base import HarmonizeBatch, sample_seed
from pipeline.score import score_batch


def _image(array: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 -> (C, H, W) float in [0, 1], as `HarmonizeActor._to_device` on CPU."""
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def bare_loop(
    rows: list[dict[str, Any]], model: ModelConfig, batch_size: int, threads: int | None
) -> dict[str, float]:
    """Model + metrics over decoded inputs; returns load, total and steady-state timings."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        harmonizer = load_harmonizer(model)
        load_s = time.perf_counter() - start
        composites = [_image(r["composite"]) for r in rows]
        masks = [_image(r["mask"]) for r in rows]  # {0, 1} already, as the actor's
        reals = [None if r["real"] is None else _image(r["real"]) for r in rows]
        ids = [r["sample_id"] for r in rows]
        seeds = [sample_seed(model.seed, i) for i in ids]
        batch_ends = []
        start = time.perf_counter()
        for b in range(0, len(rows), batch_size):
            part = slice(b, b + batch_size)
            batch = HarmonizeBatch(ids[part], composites[part], masks[part], seeds[part])
            with torch.inference_mode():
                harmonized = harmonizer.harmonize(batch)
                score_batch(harmonized, composites[part], masks[part], reals[part])
                for image in harmonized:
                    (image.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
            batch_ends.append(time.perf_counter())
        total_s = batch_ends[-1] - start
        steady_n = len(rows) - min(batch_size, len(rows))
        steady_s = batch_ends[-1] - batch_ends[0]
        return {
            "threads": torch.get_num_threads(),
            "samples": len(rows),
            "load_s": load_s,
            "loop_s": total_s,
            "images_per_second": len(rows) / total_s,
            "images_per_second_with_load": len(rows) / (total_s + load_s),
            "steady_images_per_second": steady_n / steady_s if steady_s > 0 else float("nan"),
        }
    finally:
        torch.set_num_threads(previous)


def pipeline_run(
    manifest: str, output: Path, model: ModelConfig, batch_size: int, concurrency: int
) -> dict[str, Any]:
    """One `run()` on the running cluster, with its probe timed and its processes sampled."""
    import pipeline.run as run_module

    probe = run_module.probe_params_hash
    probe_s: list[float] = []

    def timed_probe(config: RunConfig, placement: Any) -> str:
        start = time.perf_counter()
        try:
            return probe(config, placement)
        finally:
            probe_s.append(time.perf_counter() - start)

    config = RunConfig(
        manifest=manifest,
        output=str(output),
        model=model,
        batch_size=batch_size,
        concurrency=concurrency,
        show_progress=False,
        run_id=f"bench-{uuid.uuid4().hex[:8]}",
    )
    run_module.probe_params_hash = timed_probe
    try:
        with ProcessSampler(interval=0.25) as sampler:
            summary = run_module.run(config)
    finally:
        run_module.probe_params_hash = probe
    times = stage_times(summary.results_dir)
    shutil.rmtree(output, ignore_errors=True)  # hundreds of MB of images per run
    seconds = summary.seconds
    return {
        "concurrency": concurrency,
        "samples": summary.samples,
        "ok": summary.ok,
        "seconds": seconds,
        "probe_s": probe_s[0] if probe_s else 0.0,
        "images_per_second": summary.images_per_second,
        "images_per_second_without_probe": summary.ok / (seconds - (probe_s or [0.0])[0]),
        "steady_images_per_second": times.steady_images_per_second(),
        "stage_sums": times.sums,
        "cpu_seconds": sampler.stats.cpu_seconds,
        "errors": summary.errors[:3],
    }


def report(bare: dict[str, Any], bare_1: dict[str, Any] | None, runs: list[dict[str, Any]]) -> None:
    print(
        f"\nbare loop ({bare['threads']} threads, {bare['samples']} samples): "
        f"{bare['images_per_second']:.3f} images/s (loop {bare['loop_s']:.1f} s), "
        f"{bare['images_per_second_with_load']:.3f} with the model load ({bare['load_s']:.1f} s), "
        f"steady {bare['steady_images_per_second']:.3f}"
    )
    if bare_1:
        print(
            f"bare loop (1 thread, as in a Ray actor, {bare_1['samples']} samples): "
            f"{bare_1['images_per_second']:.3f} images/s, steady "
            f"{bare_1['steady_images_per_second']:.3f}"
        )
    for r in runs:
        ok = max(r["ok"], 1)
        print(
            f"\npipeline, concurrency {r['concurrency']}: {r['ok']}/{r['samples']} ok in "
            f"{r['seconds']:.1f} s (probe {r['probe_s']:.1f} s)"
        )
        for label, key, bare_key in (
            ("end to end, with model loads", "images_per_second", "images_per_second_with_load"),
            ("end to end, without the probe", "images_per_second_without_probe",
             "images_per_second"),
            ("steady state", "steady_images_per_second", "steady_images_per_second"),
        ):  # fmt: skip
            value = r[key] or float("nan")
            print(
                f"  {label:32s} {value:7.3f} images/s   ratio to bare loop "
                f"{value / bare[bare_key]:.3f}   (target >= 0.9)"
            )
        per_image = {k.removesuffix("_s"): v / ok for k, v in r["stage_sums"].items()}
        print(
            "  per-stage seconds per image (each stage's own clock): "
            + ", ".join(f"{k} {v:.3f}" for k, v in per_image.items())
        )
        bare_model = 1.0 / bare["images_per_second"]
        print(
            "  model+metrics per image: pipeline actor "
            f"{per_image['harmonize'] + per_image['score']:.3f} s"
            f" vs bare loop {bare_model:.3f} s"
            + (f" ({1.0 / bare_1['images_per_second']:.3f} s at 1 thread)" if bare_1 else "")
        )
        cpu = r["cpu_seconds"]
        total_cpu = sum(cpu.values())
        print(
            "  CPU seconds per image by process: "
            + ", ".join(f"{k} {v / ok:.3f}" for k, v in sorted(cpu.items()))
            + f"; total {total_cpu / ok:.3f}"
        )
        io = sum(per_image[k] for k in ("fetch", "decode", "write"))
        print(f"  I/O stages (fetch+decode+write) per image: {io:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--size", default="cpu", choices=("tiny", "cpu"))
    parser.add_argument("--concurrency", default="1,2", help="comma-separated actor counts")
    parser.add_argument("--bare-1thread-samples", type=int, default=32,
                        help="samples for the one-thread bare loop (0: skip)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("/tmp/harmonize-bench"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)

    work = args.work
    manifest = demo_inputs(work, args.samples)
    model_folder = model_dir(work, args.size)
    model = ModelConfig(
        name="diffharmony", model_dir=str(model_folder), resolution=args.resolution, device="cpu"
    )
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    print_header(
        "bench.overhead: full pipeline vs bare model loop (CPU)",
        {"samples": args.samples, "batch_size": args.batch_size, "model": f"{args.size} size, "
         f"{args.resolution} px, {model.steps} steps, refine on", "concurrency": concurrencies},
    )  # fmt: skip

    rows = decode_manifest(manifest)  # decoded up front: not part of the bare loop's time
    bare = bare_loop(rows, model, args.batch_size, threads=None)
    bare_1 = None
    if args.bare_1thread_samples:
        bare_1 = bare_loop(rows[: args.bare_1thread_samples], model, args.batch_size, threads=1)
    del rows

    start = time.perf_counter()
    start_ray()
    print(f"ray started in {time.perf_counter() - start:.1f} s (not counted)")
    runs = []
    for concurrency in concurrencies:
        output = work / f"out-overhead-{uuid.uuid4().hex[:6]}"
        runs.append(pipeline_run(manifest, output, model, args.batch_size, concurrency))
    report(bare, bare_1, runs)
    dump_json(args.json, {"args": vars(args), "bare": bare, "bare_1thread": bare_1, "runs": runs})


if __name__ == "__main__":
    main()
