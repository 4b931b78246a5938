"""Harmonize and score: the GPU actor of the pipeline (one model per actor, loaded once).

Enters: pyarrow batches from `fetch.py` (the columns of `schemas.stages.DECODED`).
Leaves: the same rows without the input pixels (`INPUT_PIXELS`), `status` / `error` updated,
and the columns of `schemas.stages.HARMONIZED`: the output pixels and size, the model's name,
fingerprint and parameters, the direction, where it ran (`device`: `cuda:<GPU name>` or
`cpu`), the sample seed (a variant's own in inverse runs), `harmonize_s`, `score_s` and the
metrics of `score.py`, with `unharmony_prob` from the harmony classifier (`--classifier`,
loaded once per actor on its device).

A batch runs through the model in one call. If that call raises, the batch is retried one
sample at a time so that only the samples that fail become error rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import ray
import torch

from pipeline.config import RunConfig
from pipeline.models import load_harmonizer
from pipeline.models.base import HarmonizeBatch, Harmonizer, sample_seed, variant_seed
from pipeline.placement import PlacementError
from pipeline.score import score_batch
from schemas.results import METRIC_COLUMNS
from schemas.stages import HARMONIZED, INPUT_PIXELS, arrays

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
    one `config.model` names, loaded here, where the actor runs. `classifier` likewise: by
    default `config.classifier`'s, loaded on the harmonizer's device (the metrics' pass).
    """

    def __init__(
        self,
        config: RunConfig,
        harmonizer: Harmonizer | None = None,
        classifier: HarmonyClassifier | None = None,
    ) -> None:
        self.config = config
        if harmonizer is None:
            check_device(config.model.device)
            harmonizer = load_harmonizer(config.model, config.storage_options)
        self.harmonizer = harmonizer
        self.device = harmonizer.device
        self.device_label = device_label(self.device)
        self.params = config.model.output_params()
        self.fingerprint = harmonizer.fingerprint
        self.classifier = classifier or load_classifier(config, self.device)
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
            scored = score_batch(
                harmonized, composites, masks, reals,
                input_is_real=self.inverse, classifier=self.classifier,
            )  # fmt: skip
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
        seeds = row_seeds(self.config, batch)
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
            "classifier_fingerprint": self.classifier_fingerprint, "direction": model.direction,
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
