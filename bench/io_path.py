"""CPU, I/O path: the pipeline with the identity model against plain PIL in one process.

What it measures, on the same files (the demo dataset's images under new sample ids):

- plain PIL, one process: read composite, mask and ground truth; decode them (RGB, L, RGB);
  encode the composite as the pipeline encodes its output (PNG, compress_level 1); write it to
  a file. No metrics, no fsync;
- the same loop plus the pipeline's metrics (`pipeline.score.score_batch`, batches of
  `--batch-size`), which every pipeline row carries: the fair reference for a pipeline that
  scores;
- the pipeline (`pipeline.run.run`, `--model identity`) on a Ray cluster started beforehand, for
  each `--concurrency`, on N and 10 N samples, with the driver's and every Ray process's RSS
  sampled (psutil, every 0.25 s): the peaks must stay flat when the manifest grows 10x.

Prints images/s, the ratios pipeline / plain PIL (target >= 0.8) and pipeline / PIL + metrics,
the per-stage seconds from the results, CPU seconds per process kind, and the RSS peaks.

Run (about 10 minutes on 2 cores):

    .venv/bin/python -m bench.io_path [--samples 100] [--concurrency 1,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from bench.common import (
    ProcessSampler,
    demo_inputs,
    dump_json,
    mib,
    print_header,
    stage_times,
    start_ray,
)
from pipeline.config import ModelConfig, RunConfig


def plain_pil(manifest: str, output: Path, batch_size: int, metrics: bool) -> dict[str, Any]:
    """Decode + encode (+ the pipeline's metrics) of every row, in this process."""
    from pipeline.score import score_batch

    def tensor(array: np.ndarray) -> torch.Tensor:
        if array.ndim == 2:
            array = array[..., None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0

    rows = pq.read_table(manifest).to_pylist()
    output.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def score(pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        composites = [tensor(c) for c, _, _ in pending]
        masks = [tensor((m >= 128).astype(np.uint8)) for _, m, _ in pending]
        reals = [tensor(r) for _, _, r in pending]
        with torch.inference_mode():
            score_batch(composites, composites, masks, reals)

    start = time.perf_counter()
    for row in rows:
        composite = np.asarray(Image.open(row["composite_uri"]).convert("RGB"))
        mask = np.asarray(Image.open(row["mask_uri"]).convert("L"))
        real = np.asarray(Image.open(row["real_uri"]).convert("RGB"))
        buffer = io.BytesIO()
        Image.fromarray(composite).save(buffer, format="PNG", compress_level=1)
        (output / f"{row['sample_id']}.png").write_bytes(buffer.getvalue())
        if metrics:
            pending.append((composite, mask, real))
            if len(pending) == batch_size:
                score(pending)
                pending = []
    if pending:
        score(pending)
    seconds = time.perf_counter() - start
    shutil.rmtree(output, ignore_errors=True)
    return {"samples": len(rows), "seconds": seconds, "images_per_second": len(rows) / seconds}


def pipeline_run(manifest: str, output: Path, batch_size: int, concurrency: int) -> dict[str, Any]:
    from pipeline.run import run

    config = RunConfig(
        manifest=manifest,
        output=str(output),
        model=ModelConfig(name="identity"),
        batch_size=batch_size,
        concurrency=concurrency,
        show_progress=False,
        run_id=f"bench-{uuid.uuid4().hex[:8]}",
    )
    with ProcessSampler(interval=0.25) as sampler:
        summary = run(config)
    times = stage_times(summary.results_dir)
    shutil.rmtree(output, ignore_errors=True)  # hundreds of MB of images per run
    return {
        "concurrency": concurrency,
        "samples": summary.samples,
        "ok": summary.ok,
        "seconds": summary.seconds,
        "images_per_second": summary.images_per_second,
        "steady_images_per_second": times.steady_images_per_second(),
        "stage_sums": times.sums,
        "cpu_seconds": sampler.stats.cpu_seconds,
        "rss": {
            "driver_peak": sampler.stats.driver_peak_rss,
            "worker_peak": sampler.stats.worker_peak_rss,
            "workers_total_peak": sampler.stats.workers_total_peak_rss,
            "ray_system_total_peak": sampler.stats.system_total_peak_rss,
        },
        "private": {
            "driver_peak": sampler.stats.driver_peak_private,
            "worker_peak": sampler.stats.worker_peak_private,
            "workers_total_peak": sampler.stats.workers_total_peak_private,
        },
        "errors": summary.errors[:3],
    }


def report(plain: dict[str, Any], scored: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    print(
        f"\nplain PIL decode+encode, one process: {plain['images_per_second']:.2f} images/s "
        f"({plain['samples']} samples in {plain['seconds']:.1f} s)"
    )
    print(
        f"plain PIL + the pipeline's metrics:   {scored['images_per_second']:.2f} images/s "
        f"({scored['samples']} samples in {scored['seconds']:.1f} s)"
    )
    for r in runs:
        ok = max(r["ok"], 1)
        steady = r["steady_images_per_second"] or float("nan")
        print(
            f"\npipeline, identity, concurrency {r['concurrency']}, {r['samples']} samples: "
            f"{r['ok']} ok in {r['seconds']:.1f} s"
        )
        for label, value in (("end to end", r["images_per_second"]), ("steady state", steady)):
            print(
                f"  {label:13s} {value:6.2f} images/s   ratio to plain PIL "
                f"{value / plain['images_per_second']:.3f} (target >= 0.8)   ratio to PIL + "
                f"metrics {value / scored['images_per_second']:.3f}"
            )
        print(
            "  per-stage seconds per image: "
            + ", ".join(f"{k.removesuffix('_s')} {v / ok:.4f}" for k, v in r["stage_sums"].items())
        )
        cpu = r["cpu_seconds"]
        print(
            "  CPU seconds per image by process: "
            + ", ".join(f"{k} {v / ok:.4f}" for k, v in sorted(cpu.items()))
            + f"; total {sum(cpu.values()) / ok:.4f}"
        )
        rss = r["rss"]
        print(
            f"  peak RSS: driver {mib(rss['driver_peak'])}, largest worker "
            f"{mib(rss['worker_peak'])}, all workers {mib(rss['workers_total_peak'])}, "
            f"Ray's own processes {mib(rss['ray_system_total_peak'])}"
        )
        private = r["private"]
        print(
            f"  peak private (RSS - shared): driver {mib(private['driver_peak'])}, largest worker "
            f"{mib(private['worker_peak'])}, all workers {mib(private['workers_total_peak'])}"
        )
    by_concurrency: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        by_concurrency.setdefault(r["concurrency"], []).append(r)
    for concurrency, pair in by_concurrency.items():
        if len(pair) != 2:
            continue
        small, big = sorted(pair, key=lambda r: r["samples"])
        for kind in ("rss", "private"):
            print(
                f"\nmemory ({kind}), concurrency {concurrency}, {small['samples']} -> "
                f"{big['samples']} samples: "
                + ", ".join(
                    f"{name} {mib(small[kind][key])} -> {mib(big[kind][key])} "
                    f"(x{big[kind][key] / max(small[kind][key], 1):.2f})"
                    for name, key in (
                        ("driver", "driver_peak"),
                        ("largest worker", "worker_peak"),
                        ("all workers", "workers_total_peak"),
                    )
                )
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100, help="N (the big run has 10 N)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--concurrency", default="1,2", help="comma-separated actor counts")
    parser.add_argument("--work", type=Path, default=Path("/tmp/harmonize-bench"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    work = args.work
    small = demo_inputs(work, args.samples)
    big = demo_inputs(work, 10 * args.samples)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    print_header(
        "bench.io_path: pipeline with the identity model vs plain PIL (CPU)",
        {"samples": f"{args.samples} and {10 * args.samples}", "batch_size": args.batch_size,
         "concurrency": concurrencies},
    )  # fmt: skip

    tag = uuid.uuid4().hex[:6]
    plain = plain_pil(big, work / f"out-plain-{tag}", args.batch_size, metrics=False)
    scored = plain_pil(small, work / f"out-scored-{tag}", args.batch_size, metrics=True)

    start = time.perf_counter()
    start_ray()
    print(f"ray started in {time.perf_counter() - start:.1f} s (not counted)")
    runs = []
    for concurrency in concurrencies:
        for manifest in (small, big):
            output = work / f"out-io-{uuid.uuid4().hex[:6]}"
            runs.append(pipeline_run(manifest, output, args.batch_size, concurrency))
    report(plain, scored, runs)
    dump_json(args.json, {"args": vars(args), "plain": plain, "plain_metrics": scored,
                          "runs": runs})  # fmt: skip


if __name__ == "__main__":
    main()
