"""Shared pieces of the benchmarks: machine facts, the model folder, inputs, Ray, process sampling.

Nothing here is timed by itself. The model sizes (`tiny`, `cpu`, `sd15`) and their random
weights are `bench/random_model.py`'s, which the test suite builds its checkpoint from too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.random_model import write_model_dir

REPO = Path(__file__).resolve().parent.parent

# Read by Ray when it is imported, so set before anything imports it (as tests/conftest.py):
# one footer-reading actor, so that small clusters cannot starve; token auth as Ray 2.60 wants.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")

# --- the model ---------------------------------------------------------------------------------


def model_dir(work: Path, size: str, seed: int = 0) -> Path:
    """A random-weight model directory of `size` (`random_model.write_model_dir`, the empty
    prompt precomputed, as `harmonize model assemble` writes it) under `work`: written once,
    reused by later runs."""
    root = work / f"model-{size}-{seed}"
    if not root.is_dir():
        partial = work / f".model-{size}-{seed}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        write_model_dir(partial, size, seed, text="embeds")
        partial.rename(root)
    return root


# --- inputs ------------------------------------------------------------------------------------


def grown_manifest(demo_manifest: str, path: Path, samples: int) -> str:
    """The demo rows repeated under new sample ids (same image files) up to `samples` rows."""
    table = pq.read_table(demo_manifest)
    base = Path(demo_manifest).parent
    parts = []
    for copy in range(-(-samples // table.num_rows)):
        ids = pa.array([f"{sid}-{copy}" for sid in table["sample_id"].to_pylist()])
        part = table.set_column(0, "sample_id", ids)
        for column in ("composite_uri", "mask_uri", "real_uri"):
            absolute = [str(base / uri) for uri in part[column].to_pylist()]
            part = part.set_column(part.schema.get_field_index(column), column, pa.array(absolute))
        parts.append(part)
    pq.write_table(pa.concat_tables(parts).slice(0, samples), path)
    return str(path)


def demo_inputs(work: Path, samples: int) -> str:
    """The demo dataset under `work/demo` (built once) and a manifest of `samples` rows."""
    from pipeline.datasets.demo import build_demo

    demo = work / "demo" / "manifest.parquet"
    if not demo.is_file():
        build_demo(str(work / "demo"))
    return grown_manifest(str(demo), work / f"manifest-{samples}.parquet", samples)


def decode_manifest(manifest: str) -> list[dict[str, Any]]:
    """Every row decoded exactly as the pipeline's fetch stage does (not timed by callers)."""
    from pipeline.config import DEFAULT_MAX_PIXELS
    from pipeline.decode import decode_sample

    rows = []
    for row in pq.read_table(manifest).to_pylist():
        files = [Path(row[c]).read_bytes() for c in ("composite_uri", "mask_uri", "real_uri")]
        composite, mask, real = decode_sample(*files, max_pixels=DEFAULT_MAX_PIXELS)
        rows.append({"sample_id": row["sample_id"], "composite": composite, "mask": mask,
                     "real": real})  # fmt: skip
    return rows


# --- Ray ---------------------------------------------------------------------------------------


def start_ray(num_cpus: int | None = None) -> None:
    """A local cluster sized as `pipeline.run.init_ray` sizes one (2 logical CPUs per core)."""
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus or max(4, 2 * (os.cpu_count() or 1)),
        include_dashboard=False,
        log_to_driver=False,
    )


@dataclass
class StageTimes:
    """Per-sample seconds summed over a run's results (each stage's own clock)."""

    ok: int
    created_at: list[datetime]  # one per row: when its write task finished
    sums: dict[str, float]

    def steady_images_per_second(self) -> float | None:
        """Images/s between the end of the first and of the last write task: excludes Ray's
        start, the model-load probe, actor start-up and the first batch's fill."""
        if not self.created_at:
            return None
        times = sorted(self.created_at)
        first, last = times[0], times[-1]
        after_first = sum(1 for t in times if t > first)
        seconds = (last - first).total_seconds()
        return after_first / seconds if seconds > 0 else None


STAGES = ("fetch_s", "decode_s", "harmonize_s", "score_s", "write_s")


def stage_times(results_dir: str) -> StageTimes:
    import pyarrow.dataset as pads

    table = pads.dataset(results_dir, format="parquet").to_table(
        columns=["status", "created_at", *STAGES]
    )
    ok = table.filter(pa.compute.equal(table["status"], "ok"))
    sums = {name: float(pa.compute.sum(ok[name]).as_py() or 0.0) for name in STAGES}
    return StageTimes(ok=ok.num_rows, created_at=ok["created_at"].to_pylist(), sums=sums)


# --- process sampling (RSS, CPU time) ----------------------------------------------------------


@dataclass
class ProcessStats:
    """What `ProcessSampler` saw: peaks in bytes, CPU seconds used while it ran."""

    driver_peak_rss: int = 0
    worker_peak_rss: int = 0  # the largest single worker process
    workers_total_peak_rss: int = 0  # the peak of the sum over all worker processes
    system_total_peak_rss: int = 0  # raylet, GCS, agents: Ray's own processes
    # RSS counts the object store's shared-memory pages a worker has touched (and shared
    # libraries); "private" = RSS - shared (Linux) is the memory the process itself holds.
    driver_peak_private: int = 0
    worker_peak_private: int = 0
    workers_total_peak_private: int = 0
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # category -> CPU s
    samples: int = 0


def _category(proc: Any) -> str:
    try:
        cmdline = " ".join(proc.cmdline())
    except Exception:
        return "system"
    if cmdline.startswith("ray::") or "default_worker.py" in cmdline:
        return "workers"
    return "system"


class ProcessSampler:
    """Samples the driver and every descendant (Ray's processes, its workers) with psutil.

    A local cluster started by `ray.init` runs GCS and raylet as children of the driver, and the
    workers as children of the raylet, so the driver's descendants are the whole cluster.
    """

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.me = psutil.Process()
        self.stats = ProcessStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._cpu_first: dict[int, tuple[str, float]] = {}
        self._cpu_last: dict[int, float] = {}

    @staticmethod
    def _cpu(proc: Any) -> float:
        times = proc.cpu_times()
        return times.user + times.system

    def _sample(self) -> None:
        psutil = self._psutil
        stats = self.stats
        try:
            children = self.me.children(recursive=True)
        except psutil.Error:
            return
        worker_total = system_total = worker_private_total = 0
        for proc in [self.me, *children]:
            try:
                memory = proc.memory_info()
                rss = memory.rss
                private = rss - getattr(memory, "shared", 0)
                cpu = self._cpu(proc)
                category = "driver" if proc.pid == self.me.pid else _category(proc)
            except psutil.Error:
                continue
            if proc.pid not in self._cpu_first:
                # Processes already there at the first sample count from then; later ones from 0.
                self._cpu_first[proc.pid] = (category, cpu if stats.samples == 0 else 0.0)
            self._cpu_last[proc.pid] = cpu
            if category == "driver":
                stats.driver_peak_rss = max(stats.driver_peak_rss, rss)
                stats.driver_peak_private = max(stats.driver_peak_private, private)
            elif category == "workers":
                stats.worker_peak_rss = max(stats.worker_peak_rss, rss)
                worker_total += rss
                stats.worker_peak_private = max(stats.worker_peak_private, private)
                worker_private_total += private
            else:
                system_total += rss
        stats.workers_total_peak_rss = max(stats.workers_total_peak_rss, worker_total)
        stats.system_total_peak_rss = max(stats.system_total_peak_rss, system_total)
        stats.workers_total_peak_private = max(
            stats.workers_total_peak_private, worker_private_total
        )
        stats.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> ProcessSampler:
        self._sample()  # the CPU time already spent before the window is not counted
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        cpu: dict[str, float] = {}
        for pid, (category, first) in self._cpu_first.items():
            cpu[category] = cpu.get(category, 0.0) + self._cpu_last.get(pid, first) - first
        self.stats.cpu_seconds = cpu


# --- reporting ---------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        ram_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        ram_gib = None
    import ray

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model,
        "ram_gib": ram_gib,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ray": ray.__version__,
    }


def mib(value: float) -> str:
    return f"{value / 2**20:.0f} MiB"


def print_header(title: str, extra: dict[str, Any] | None = None) -> None:
    info = machine_info()
    print(f"== {title}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    for key, value in (extra or {}).items():
        print(f"{key}: {value}")


def dump_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return

    def default(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        if isinstance(value, datetime):
            return value.isoformat()
        return str(value)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_info(), **payload}, indent=1, default=default))


def wall() -> float:
    return time.perf_counter()
