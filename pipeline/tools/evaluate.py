"""The official iHarmony4 evaluation table, recomputed from a run's images.

Enters: results Parquet under a URI (a run's output prefix, its `results/` folder or one
`results/{run_id}/` folder) and storage options. From each sample's current row
(`pipeline.results`): `output_uri` (or, to score the unharmonized baseline, `composite_uri`),
`real_uri`, `mask_uri`, `subset`; the samples with error rows only are listed as not scored.
Leaves: an `Evaluation`: per-image MSE / PSNR / fMSE / bMSE and foreground ratio, their means
per subset and over all images, per foreground-ratio bucket, the samples not scored and why;
as text (`text()`) or JSON (`summary()`).

Convention, as the official script (DiffHarmony `scripts/evaluate/main.py`) computes it:
  - output and ground truth are decoded to RGB and resized to 256x256 with PIL's bilinear
    (antialiased) filter, unless already that size; the mask is made 1-bit, then resized
    (PIL resizes 1-bit images nearest); values stay on the uint8 scale [0, 255]. (The mask is
    thresholded at 128 as the pipeline does; PIL's `convert("1")` in the official script would
    dither grey levels, which iHarmony4's 0/255 masks do not have.)
  - mse = mean over pixels and channels of (out - real)^2; psnr = 10 log10(255^2 / mse);
    fmse = sum(m (out - real)^2) / (3 sum m); bmse the same over (1 - m);
  - with `use_gt_bg`, out = out * m + real * (1 - m) first (the official `--use_gt_bg`);
  - every mean is over images ("All" is not the mean of the subset means); the foreground
    ratio is sum(m) / (256 * 256) and the buckets are [0, 5 %), [5 %, 15 %), [15 %, 100 %).
We resize with PIL, as the official script does (`imaging.eval_resize`), so that the table
is the official one to the last digit; the pipeline's per-sample columns resize with the same
function, so for lossless outputs (PNG, WebP lossless) a row's `mse`/`fmse`/`bmse`/`psnr`
equal its line here.
Departures: images are decoded by the pipeline's rules (`decode.py`: each file's own EXIF
orientation, the mask rule, the pixel limit; files without an orientation tag and 0/255 masks
are unaffected); a metric that is undefined for an image (fMSE when the mask vanishes at
256 px) is left out of that metric's mean and counted, where the official script's mean would
become NaN.

Images are fetched and resized in threads, a bounded number at a time, and scored in torch
batches, so memory does not grow with the number of results.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import DEFAULT_MAX_PIXELS
from pipeline.decode import decode_mask, decode_rgb
from pipeline.imaging import EVAL_SIZE, eval_resize, eval_resize_mask
from pipeline.results import ResultsError, connect
from pipeline.score import mse, psnr, region_mse
from pipeline.storage import absolute, read_bytes, write_atomic

METRICS = ("mse", "psnr", "fmse", "bmse")
# (label, low, high): low <= ratio < high, as the official script buckets them.
BUCKETS = (("0-5%", 0.0, 0.05), ("5-15%", 0.05, 0.15), ("15-100%", 0.15, 1.0))
# The published tables' order; other subsets follow alphabetically.
SUBSET_ORDER = ("HCOCO", "HAdobe5k", "HFlickr", "Hday2night")
_SHOWN = 10


class EvaluationError(ResultsError):
    """The results cannot be evaluated as asked (no ground-truth columns, an unknown kind of
    score); like every `ResultsError` (none found, several parameter sets)."""


@dataclass(frozen=True)
class GroupScore:
    """Means over the images of one group; `undefined` counts images left out of a mean."""

    images: int
    means: dict[str, float]
    undefined: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {"images": self.images}
        values.update({k: (v if math.isfinite(v) else None) for k, v in self.means.items()})
        if any(self.undefined.values()):
            values["undefined"] = {k: n for k, n in self.undefined.items() if n}
        return values


@dataclass
class Evaluation:
    results_uri: str
    scored: str  # "output" or "composite"
    use_gt_bg: bool
    params_hash: str | None
    model: str | None
    per_image: pa.Table  # sample_id, subset, mse, psnr, fmse, bmse, fg_ratio
    not_scored: list[tuple[str, str]] = field(default_factory=list)  # (sample_id, reason)

    def _group(self, keep: np.ndarray) -> GroupScore:
        means, undefined = {}, {}
        for name in METRICS:
            values = self.per_image.column(name).to_numpy(zero_copy_only=False)[keep]
            defined = ~np.isnan(values)
            undefined[name] = int((~defined).sum())
            means[name] = float(values[defined].mean()) if defined.any() else math.nan
        return GroupScore(int(keep.sum()), means, undefined)

    def subsets(self) -> list[str]:
        present = set(self.per_image.column("subset").to_pylist()) - {None}
        known = [s for s in SUBSET_ORDER if s in present]
        return known + sorted(present - set(known))

    def _masks(self) -> tuple[np.ndarray, np.ndarray]:
        subset = np.array(self.per_image.column("subset").to_pylist(), dtype=object)
        ratio = self.per_image.column("fg_ratio").to_numpy(zero_copy_only=False)
        return subset, ratio

    def by_subset(self) -> dict[str, GroupScore]:
        subset, _ = self._masks()
        return {name: self._group(subset == name) for name in self.subsets()}

    def overall(self) -> GroupScore:
        return self._group(np.ones(self.per_image.num_rows, dtype=bool))

    def by_foreground_ratio(self) -> dict[str, tuple[GroupScore, dict[str, GroupScore]]]:
        """bucket -> (all images in it, per subset)."""
        subset, ratio = self._masks()
        out = {}
        for label, low, high in BUCKETS:
            inside = (ratio >= low) & (ratio < high)
            out[label] = (
                self._group(inside),
                {name: self._group(inside & (subset == name)) for name in self.subsets()},
            )
        return out

    def summary(self) -> dict[str, Any]:
        """JSON-ready; non-finite means (an infinite PSNR, no defined value) become null."""
        buckets = {}
        for (label, low, high), (score, per_subset) in zip(
            BUCKETS, self.by_foreground_ratio().values()
        ):
            buckets[label] = {
                "range": [low, high],
                **score.as_dict(),
                "subsets": {name: s.as_dict() for name, s in per_subset.items()},
            }
        return {
            "results": self.results_uri,
            "model": self.model,
            "params_hash": self.params_hash,
            "convention": {
                "size": EVAL_SIZE,
                "scale": "uint8",
                "resampling": "PIL bilinear (images), nearest (1-bit mask)",
                "scored": self.scored,
                "use_gt_bg": self.use_gt_bg,
                "mean": "over images",
            },
            "subsets": {name: score.as_dict() for name, score in self.by_subset().items()},
            "all": self.overall().as_dict(),
            "foreground_ratio": buckets,
            "not_scored": [{"sample_id": i, "reason": r} for i, r in self.not_scored],
        }

    def to_json(self) -> str:
        return json.dumps(self.summary(), indent=2)

    def write_per_image(self, uri: str, storage_options: dict[str, Any]) -> str:
        """The per-image metrics as one Parquet file (e.g. to find the worst samples)."""
        buffer = io.BytesIO()
        pq.write_table(self.per_image, buffer)
        uri = absolute(uri)
        write_atomic(uri, buffer.getvalue(), storage_options)
        return uri

    def text(self) -> str:
        what = "composites (unharmonized baseline)" if self.scored == "composite" else "outputs"
        lines = [
            f"iHarmony4 evaluation of {self.per_image.num_rows} {what}: {EVAL_SIZE}x{EVAL_SIZE}, "
            "uint8 scale, means over images"
            + (", ground-truth background pasted (use_gt_bg)" if self.use_gt_bg else ""),
            f"results: {self.results_uri}  model: {self.model}  params_hash: {self.params_hash}",
            "",
        ]
        header = f"{{:<12}}{'images':>8}{'MSE':>10}{'PSNR':>9}{'fMSE':>11}{'bMSE':>10}"
        lines.append(header.format("subset"))
        rows = [*self.by_subset().items(), ("All", self.overall())]
        lines.extend(_row(name, score) for name, score in rows)
        lines.append("")
        lines.append(header.format("foreground"))
        lines.extend(_row(label, s) for label, (s, _) in self.by_foreground_ratio().items())
        undefined = self.overall().undefined
        if any(undefined.values()):
            counts = ", ".join(f"{name} for {n}" for name, n in undefined.items() if n)
            lines.append(f"undefined (left out of the means): {counts} image(s)")
        if self.not_scored:
            lines.append("")
            lines.append(f"not scored: {len(self.not_scored)} sample(s)")
            for sample_id, reason in self.not_scored[:_SHOWN]:
                lines.append(f"  {sample_id}: {reason}")
            if len(self.not_scored) > _SHOWN:
                lines.append(f"  … and {len(self.not_scored) - _SHOWN} more (--json lists all)")
        return "\n".join(lines)


def _row(name: str, score: GroupScore) -> str:
    m = score.means
    return (
        f"{name:<12}{score.images:>8}{m['mse']:>10.2f}{m['psnr']:>9.2f}"
        f"{m['fmse']:>11.2f}{m['bmse']:>10.2f}"
    )


# --- images ---------------------------------------------------------------------------------


def load_eval_images(
    image_uri: str,
    real_uri: str,
    mask_uri: str,
    storage_options: dict[str, Any],
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample at the evaluation scale: image and real (256, 256, 3) uint8, mask (256, 256)
    uint8 in {0, 1}, resampled as the official script does. Images over `max_pixels` are
    refused from their header."""
    arrays: dict[str, np.ndarray] = {}
    for what, uri in (("image", image_uri), ("real", real_uri), ("mask", mask_uri)):
        try:
            data = read_bytes(uri, storage_options)
            if what == "mask":
                arrays[what] = decode_mask(data, what, max_pixels)
            else:
                arrays[what] = decode_rgb(data, what, max_pixels)
        except FileNotFoundError:
            raise ValueError(f"{what} not found: {uri}") from None
        except Exception as exc:
            raise ValueError(f"{what} {uri} unreadable: {type(exc).__name__}: {exc}") from None
    return (
        eval_resize(arrays["image"]),
        eval_resize(arrays["real"]),
        eval_resize_mask(arrays["mask"]),
    )


def table_metrics(
    images: np.ndarray, reals: np.ndarray, masks: np.ndarray, use_gt_bg: bool = False
) -> dict[str, torch.Tensor]:
    """(B, 256, 256, 3) uint8 images and reals, (B, 256, 256) {0, 1} masks -> (B,) metrics."""
    image = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    real = torch.from_numpy(reals).permute(0, 3, 1, 2).double()
    mask = torch.from_numpy(masks)[:, None].double()
    if use_gt_bg:
        image = image * mask + real * (1.0 - mask)
    return {
        "mse": mse(image, real),
        "psnr": psnr(image, real),
        "fmse": region_mse(image, real, mask),
        "bmse": region_mse(image, real, 1.0 - mask),
        "fg_ratio": mask.mean(dim=(1, 2, 3)),
    }


# --- rows -----------------------------------------------------------------------------------


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate(
    results_uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    use_gt_bg: bool = False,
    params_hash: str | None = None,
    score: str = "output",
    batch_size: int = 64,
    workers: int = 16,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Evaluation:
    """Score every sample of the results the way the official iHarmony4 script does.

    score: "output" (the harmonized images) or "composite" (the unharmonized baseline).
    An image over `max_pixels` is not scored (refused from its header, as a run refuses it).
    """
    if score not in ("output", "composite"):
        raise EvaluationError(f"score must be 'output' or 'composite', not {score!r}")
    options = storage_options or {}
    results = connect(results_uri, options, params_hash)
    image_column = f"{score}_uri"
    missing = {"real_uri", "mask_uri", image_column} - set(results.columns)
    if missing:
        raise EvaluationError(
            f"{results.uri} holds Parquet without results column(s) {sorted(missing)}"
        )
    subset = "subset" if "subset" in results.columns else "NULL AS subset"
    ok = results.query(
        f"SELECT sample_id, {image_column}, real_uri, mask_uri, {subset} FROM current "
        "ORDER BY sample_id"
    ).to_pylist()
    not_scored = [(sample_id, f"no ok result: {error}") for sample_id, error in results.failed()]
    todo = []
    for row in ok:
        if not row.get("real_uri"):
            not_scored.append((row["sample_id"], "no ground truth (real_uri is null)"))
        elif not row.get(image_column):
            not_scored.append((row["sample_id"], f"{image_column} is null"))
        else:
            todo.append(row)

    per_image: dict[str, list[Any]] = {
        name: [] for name in ("sample_id", "subset", *METRICS, "fg_ratio")
    }

    def load(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
        try:
            return load_eval_images(
                row[image_column], row["real_uri"], row["mask_uri"], options, max_pixels
            )
        except ValueError as exc:
            return str(exc)

    def submit(pool: ThreadPoolExecutor, chunk: list[dict[str, Any]]) -> list[Future[Any]]:
        return [pool.submit(load, row) for row in chunk]

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        chunks = list(_chunks(todo, max(1, batch_size)))
        pending = submit(pool, chunks[0]) if chunks else []
        for index, chunk in enumerate(chunks):
            loaded = [future.result() for future in pending]
            # Fetch the next chunk while this one is scored: at most two chunks in memory.
            pending = submit(pool, chunks[index + 1]) if index + 1 < len(chunks) else []
            good = [
                (row, arrays) for row, arrays in zip(chunk, loaded) if not isinstance(arrays, str)
            ]
            not_scored.extend(
                (row["sample_id"], arrays)
                for row, arrays in zip(chunk, loaded)
                if isinstance(arrays, str)
            )
            if not good:
                continue
            metrics = table_metrics(
                np.stack([a[0] for _, a in good]),
                np.stack([a[1] for _, a in good]),
                np.stack([a[2] for _, a in good]),
                use_gt_bg,
            )
            per_image["sample_id"].extend(row["sample_id"] for row, _ in good)
            per_image["subset"].extend(
                None if row.get("subset") is None else str(row["subset"]) for row, _ in good
            )
            for name, values in metrics.items():
                per_image[name].extend(values.tolist())

    schema = pa.schema(
        [("sample_id", pa.string()), ("subset", pa.string())]
        + [(name, pa.float64()) for name in (*METRICS, "fg_ratio")]
    )
    return Evaluation(
        results_uri=results.uri,
        scored=score,
        use_gt_bg=use_gt_bg,
        params_hash=results.params_hash,
        model=results.model,
        per_image=pa.table(per_image, schema=schema),
        not_scored=not_scored,
    )
