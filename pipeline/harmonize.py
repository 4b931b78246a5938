"""Harmonize and score: the GPU actor of the pipeline (one model per actor, loaded once).

Enters: pyarrow batches from `fetch.py` (decoded pixels, `status`, `error`).
Leaves: the same rows without the input pixels, plus `harmonized_pixels` (raw RGB uint8),
`output_width`, `output_height`, the model's name, fingerprint and parameters, the direction,
where it ran (`device`: `cuda:<GPU name>` or `cpu`), the sample seed (a variant's own in inverse
runs), `harmonize_s`, `score_s` and the metrics of `score.py`, with `unharmony_prob` from the
harmony classifier (`--classifier`, loaded once per actor on its device).

A batch runs through the model in one call. If that call raises, the batch is retried one
sample at a time so that only the samples that fail become error rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import ray
import torch

from pipeline.config import RunConfig
from pipeline.fetch import PIXEL_COLUMNS
from pipeline.models import HarmonizeBatch, load_harmonizer, sample_seed
from pipeline.models.base import variant_seed
from pipeline.placement import PlacementError
from pipeline.score import score_batch
from schemas.results import METRIC_COLUMNS

if TYPE_CHECKING:
    from pipeline.models.classifier import HarmonyClassifier


def params_hash(
    model: str, fingerprint: str, params: dict[str, Any], classifier: str | None = None
) -> str:
    """Identifies one (model, weights, parameters[, classifier weights]) combination: same hash,
    same outputs and columns. Without a classifier, the hash of earlier versions."""
    key = {"model": model, "fingerprint": fingerprint, **params}
    if classifier is not None:
        key["classifier"] = classifier
    text = json.dumps(key, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_classifier(config: RunConfig, device: torch.device) -> HarmonyClassifier | None:
    """The run's harmony classifier on `device`, or None without --classifier."""
    if not config.classifier:
        return None
    from pipeline.models.classifier import HarmonyClassifier  # torch models: load when used

    return HarmonyClassifier.load(
        config.classifier,
        device=device,
        allow_unsafe_pickle=config.model.allow_unsafe_pickle,
        cache_dir=config.model.cache_dir,
        storage_options=config.storage_options,
    )


def row_seeds(config: RunConfig, batch: pa.Table) -> list[int]:
    """Each row's seed: from (seed, sample_id), or for an inverse run's variant from (seed,
    source sample_id, k)."""
    ids = batch.column("sample_id").to_pylist()
    if "variant" not in batch.column_names:
        return [sample_seed(config.model.seed, sample_id) for sample_id in ids]
    sources = batch.column("source_sample_id").to_pylist()
    variants = batch.column("variant").to_pylist()
    return [
        sample_seed(config.model.seed, sample_id)
        if k is None
        else variant_seed(config.model.seed, source, k)
        for sample_id, source, k in zip(ids, sources, variants)
    ]


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


class HarmonizeActor:
    """Ray Data callable class: `map_batches(HarmonizeActor, compute=ActorPoolStrategy(...))`."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        check_device(config.model.device)
        self.harmonizer = load_harmonizer(config.model, config.storage_options)
        self.device = self.harmonizer.device
        self.device_label = device_label(self.device)
        self.params = config.model.output_params()
        self.fingerprint = self.harmonizer.fingerprint
        # On the model's device: the classifier runs in the same pass as the metrics.
        self.classifier = load_classifier(config, self.device)
        self.classifier_fingerprint = self.classifier.fingerprint if self.classifier else None
        self.params_hash = params_hash(
            config.model.name, self.fingerprint, self.params, self.classifier_fingerprint
        )
        self.inverse = config.model.direction == "inverse"

    def _to_device(self, data: bytes, height: int, width: int, channels: int) -> torch.Tensor:
        image = _image(data, height, width, channels)
        if self.device.type == "cuda":
            image = image.pin_memory()
        return image.to(self.device, non_blocking=True).float() / 255.0

    def _run(self, batch: pa.Table, rows: list[int], seeds: list[int]) -> dict[int, Any]:
        """Model + metrics for `rows`; returns row -> (pixels, width, height, metrics)."""
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
            harmonized = self.harmonizer.harmonize(inputs)
        harmonize_s = time.perf_counter() - start

        start = time.perf_counter()
        with torch.inference_mode():
            scored = score_batch(
                harmonized, composites, masks, reals,
                input_is_real=self.inverse, classifier=self.classifier,
            )  # fmt: skip
        metrics = {name: scored[name].cpu().tolist() for name in METRIC_COLUMNS}
        pixels = [
            (image.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous()
            for image in harmonized
        ]
        pixels = [image.cpu().numpy() for image in pixels]
        score_s = time.perf_counter() - start

        share = 1.0 / len(rows)
        return {
            i: (
                pixels[k].tobytes(),
                pixels[k].shape[1],
                pixels[k].shape[0],
                {name: metrics[name][k] for name in METRIC_COLUMNS},
                harmonize_s * share,
                score_s * share,
            )
            for k, i in enumerate(rows)
        }

    def _crash_once(self) -> None:
        marker = self.config.crash_once_marker
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # a hard death, as a segfault or an OOM kill would be

    def __call__(self, batch: pa.Table) -> pa.Table:
        self._crash_once()
        ids = batch.column("sample_id").to_pylist()
        status = batch.column("status").to_pylist()
        errors = batch.column("error").to_pylist()
        seeds = row_seeds(self.config, batch)
        ok_rows = [i for i, s in enumerate(status) if s == "ok"]

        results: dict[int, Any] = {}
        if ok_rows:
            try:
                results = self._run(batch, ok_rows, seeds)
            except Exception:
                # Isolate the failing samples: the rest of the batch still gets its output.
                for i in ok_rows:
                    try:
                        results.update(self._run(batch, [i], seeds))
                    except Exception as exc:
                        status[i] = "error"
                        errors[i] = f"sample {ids[i]!r}: harmonize: {type(exc).__name__}: {exc}"

        n = batch.num_rows
        columns: dict[str, pa.Array] = {
            "harmonized_pixels": pa.array(
                [results[i][0] if i in results else b"" for i in range(n)], pa.large_binary()
            ),
            "output_width": pa.array(
                [results[i][1] if i in results else None for i in range(n)], pa.int32()
            ),
            "output_height": pa.array(
                [results[i][2] if i in results else None for i in range(n)], pa.int32()
            ),
            "harmonize_s": pa.array(
                [results[i][4] if i in results else None for i in range(n)], pa.float64()
            ),
            "score_s": pa.array(
                [results[i][5] if i in results else None for i in range(n)], pa.float64()
            ),
            "model": pa.array([self.config.model.name] * n, pa.string()),
            "model_fingerprint": pa.array([self.fingerprint] * n, pa.string()),
            "params_hash": pa.array([self.params_hash] * n, pa.string()),
            "model_params": pa.array([json.dumps(self.params, sort_keys=True)] * n, pa.string()),
            "classifier_fingerprint": pa.array([self.classifier_fingerprint] * n, pa.string()),
            "direction": pa.array([self.config.model.direction] * n, pa.string()),
            "device": pa.array([self.device_label] * n, pa.string()),
            "resolution": pa.array([self.config.model.resolution] * n, pa.int32()),
            "steps": pa.array([self.config.model.steps] * n, pa.int32()),
            "seed": pa.array([self.config.model.seed] * n, pa.int64()),
            "sample_seed": pa.array(seeds, pa.int64()),
            "refine": pa.array([self.config.model.refine] * n, pa.bool_()),
            "output_size": pa.array([self.config.model.output_size] * n, pa.string()),
        }
        for name in METRIC_COLUMNS:
            values = [results[i][3][name] if i in results else None for i in range(n)]
            # NaN (no ground truth, empty region) is stored as null: "does not apply".
            columns[name] = pa.array([v if v == v else None for v in values], pa.float64())

        batch = batch.drop_columns([c for c in PIXEL_COLUMNS if c in batch.column_names])
        batch = batch.set_column(
            batch.column_names.index("status"), "status", pa.array(status, pa.string())
        )
        batch = batch.set_column(
            batch.column_names.index("error"), "error", pa.array(errors, pa.string())
        )
        for name, column in columns.items():
            batch = batch.append_column(name, column)
        return batch
