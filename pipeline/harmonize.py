"""Harmonize and score: the GPU actor of the pipeline (one model per actor, loaded once).

Enters: pyarrow batches from `fetch.py` (the columns of `schemas.stages.DECODED`).
Leaves: the same rows without the input pixels (`INPUT_PIXELS`), `status` / `error` updated,
and the columns of `schemas.stages.HARMONIZED`: the output pixels and size, the model's name,
fingerprint and parameters, where it ran (`device`: `cuda:<GPU name>` or `cpu`), the sample
seed, `harmonize_s`, `score_s` and the metrics of `score.py`.

A batch runs through the model in one call. If that call raises, the batch is retried one
sample at a time so that only the samples that fail become error rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from pipeline.config import RunConfig
from pipeline.models import load_harmonizer
from pipeline.models.base import HarmonizeBatch, Harmonizer, sample_seed
from pipeline.placement import PlacementError
from pipeline.score import score_batch
from schemas.results import METRIC_COLUMNS
from schemas.stages import HARMONIZED, INPUT_PIXELS, arrays


def params_hash(model: str, fingerprint: str, params: dict[str, Any]) -> str:
    """Identifies one (model, weights, parameters) combination: same hash, same outputs."""
    text = json.dumps({"model": model, "fingerprint": fingerprint, **params}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_device(device: str) -> None:
    """Where the placement put this worker on a GPU, torch must be able to use it: a GPU node
    with a CPU-only torch (or hidden devices) fails here, loudly, instead of running the model
    on the node's CPU hundreds of times slower."""
    if device != "cuda" or torch.cuda.is_available():
        return
    import socket

    context = ray.get_runtime_context() if ray.is_initialized() else None
    node = context.get_node_id()[:12] if context else "-"
    gpus = ray.get_gpu_ids() if context else []
    raise PlacementError(
        f"node {socket.gethostname()} ({node}): Ray gave this worker GPU {gpus} but torch "
        f"{torch.__version__} sees no CUDA device (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): install a CUDA build of torch on the GPU "
        "nodes, or run with --device cpu"
    )


def device_label(device: torch.device) -> str:
    """What a results row records of where it ran: `cuda:<GPU name>` or `cpu`."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def _image(data: bytes, height: int, width: int, channels: int) -> torch.Tensor:
    """Raw uint8 bytes -> (C, H, W) uint8 tensor on the CPU."""
    array = np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


@dataclass(frozen=True)
class SampleOutcome:
    """One sample through the model and the metrics."""

    pixels: np.ndarray  # (h, w, 3) uint8: the output as it will be written
    metrics: dict[str, float]  # every column of METRIC_COLUMNS; NaN where it does not apply
    harmonize_s: float  # its share of the batch's model time
    score_s: float  # its share of the batch's metrics time


class HarmonizeActor:
    """Ray Data callable class: `map_batches(HarmonizeActor, compute=ActorPoolStrategy(...))`.

    `harmonizer`: one already built, used as it is (its device, its weights); by default the
    one `config.model` names, loaded here, where the actor runs.
    """

    def __init__(self, config: RunConfig, harmonizer: Harmonizer | None = None) -> None:
        self.config = config
        if harmonizer is None:
            check_device(config.model.device)
            harmonizer = load_harmonizer(config.model, config.storage_options)
        self.harmonizer = harmonizer
        self.device = harmonizer.device
        self.device_label = device_label(self.device)
        self.params = config.model.output_params()
        self.fingerprint = harmonizer.fingerprint
        self.params_hash = params_hash(config.model.name, self.fingerprint, self.params)

    def _to_device(self, data: bytes, height: int, width: int, channels: int) -> torch.Tensor:
        image = _image(data, height, width, channels)
        if self.device.type == "cuda":
            image = image.pin_memory()
        return image.to(self.device, non_blocking=True).float() / 255.0

    def _run(self, batch: pa.Table, rows: list[int], seeds: list[int]) -> dict[int, SampleOutcome]:
        """Model + metrics for `rows` of the batch, in one call of each."""
        heights = batch.column("height").to_pylist()
        widths = batch.column("width").to_pylist()
        composites, masks, reals = [], [], []
        for i in rows:
            h, w = heights[i], widths[i]
            composites.append(self._to_device(batch["composite_pixels"][i].as_py(), h, w, 3))
            masks.append(self._to_device(batch["mask_pixels"][i].as_py(), h, w, 1) * 255.0)
            real = batch["real_pixels"][i].as_py()
            reals.append(None if real is None else self._to_device(real, h, w, 3))
        ids = batch.column("sample_id").to_pylist()
        inputs = HarmonizeBatch([ids[i] for i in rows], composites, masks, [seeds[i] for i in rows])

        start = time.perf_counter()
        with torch.inference_mode():
            harmonized = self.harmonizer.harmonize(inputs)  # each (3, h, w) in [0, 1]
        harmonize_s = time.perf_counter() - start

        start = time.perf_counter()
        with torch.inference_mode():
            scored = score_batch(harmonized, composites, masks, reals)
        metrics = {name: scored[name].cpu().tolist() for name in METRIC_COLUMNS}
        pixels = [
            (image.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous()
            for image in harmonized
        ]  # each (h, w, 3) uint8
        pixels = [image.cpu().numpy() for image in pixels]
        score_s = time.perf_counter() - start

        share = 1.0 / len(rows)
        return {
            i: SampleOutcome(
                pixels[k],
                {name: metrics[name][k] for name in METRIC_COLUMNS},
                harmonize_s * share,
                score_s * share,
            )
            for k, i in enumerate(rows)
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("sample_id").to_pylist()
        status = batch.column("status").to_pylist()
        errors = batch.column("error").to_pylist()
        seeds = [sample_seed(self.config.model.seed, sample_id) for sample_id in ids]
        ok_rows = [i for i, s in enumerate(status) if s == "ok"]

        outcomes: dict[int, SampleOutcome] = {}
        if ok_rows:
            try:
                outcomes = self._run(batch, ok_rows, seeds)
            except Exception:
                # Isolate the failing samples: the rest of the batch still gets its output.
                for i in ok_rows:
                    try:
                        outcomes.update(self._run(batch, [i], seeds))
                    except Exception as exc:
                        status[i] = "error"
                        errors[i] = f"sample {ids[i]!r}: harmonize: {type(exc).__name__}: {exc}"

        columns = arrays(
            HARMONIZED, self._values([outcomes.get(i) for i in range(len(ids))], seeds)
        )
        batch = batch.drop_columns([c for c in INPUT_PIXELS if c in batch.column_names])
        batch = batch.set_column(
            batch.column_names.index("status"), "status", pa.array(status, pa.string())
        )
        batch = batch.set_column(
            batch.column_names.index("error"), "error", pa.array(errors, pa.string())
        )
        for name, column in columns.items():
            batch = batch.append_column(name, column)
        return batch

    def _values(self, outcomes: list[SampleOutcome | None], seeds: list[int]) -> dict[str, list]:
        """The HARMONIZED columns of a batch: each row's outcome (None: no output), and what
        says which model, with which parameters, made it."""
        n = len(outcomes)
        model = self.config.model
        same = {
            "model": model.name, "model_fingerprint": self.fingerprint,
            "params_hash": self.params_hash,
            "model_params": json.dumps(self.params, sort_keys=True), "device": self.device_label,
            "resolution": model.resolution, "steps": model.steps, "seed": model.seed,
            "refine": model.refine, "output_size": model.output_size,
        }  # fmt: skip
        values: dict[str, list[Any]] = {name: [value] * n for name, value in same.items()}
        values["sample_seed"] = seeds
        values["harmonized_pixels"] = [o.pixels.tobytes() if o else b"" for o in outcomes]
        values["output_width"] = [o.pixels.shape[1] if o else None for o in outcomes]
        values["output_height"] = [o.pixels.shape[0] if o else None for o in outcomes]
        values["harmonize_s"] = [o.harmonize_s if o else None for o in outcomes]
        values["score_s"] = [o.score_s if o else None for o in outcomes]
        for name in METRIC_COLUMNS:
            # NaN (no ground truth, empty region) is stored as null: "does not apply".
            metric = [o.metrics[name] if o else None for o in outcomes]
            values[name] = [v if v == v else None for v in metric]
        return values
