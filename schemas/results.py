"""The results dataset: exactly one row per input sample, written under `{output}/results/`.

Every column has a description in its field metadata (`harmonize schema` prints them). The
manifest's extra columns follow these, unchanged.
"""

from __future__ import annotations

import pyarrow as pa


def _field(name: str, type_: pa.DataType, description: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": description})


RESULTS_FIELDS = [
    _field("sample_id", pa.string(), "the manifest's sample id", nullable=False),
    _field("composite_uri", pa.string(), "composite image read (absolute URI)"),
    _field("mask_uri", pa.string(), "mask read (absolute URI)"),
    _field("real_uri", pa.string(), "ground truth read (absolute URI), null without one"),
    _field("output_uri", pa.string(), "harmonized image written; null when status is error"),
    _field("status", pa.string(), "'ok' or 'error'", nullable=False),
    _field("error", pa.string(), "null when ok, else the sample id, stage and cause"),
    _field("width", pa.int32(), "the composite's original width in pixels"),
    _field("height", pa.int32(), "the composite's original height in pixels"),
    _field("model", pa.string(), "harmonizer name: reinhard, diffharmony, identity"),
    _field("model_fingerprint", pa.string(), "hash of the model's weights and configuration"),
    _field("params_hash", pa.string(), "hash of model, fingerprint and every output parameter"),
    _field("model_params", pa.string(), "JSON of every parameter that affects the output"),
    _field("resolution", pa.int32(), "square working resolution of the model"),
    _field("steps", pa.int32(), "stage-1 scheduler steps"),
    _field("seed", pa.int64(), "run seed"),
    _field("sample_seed", pa.int64(), "this sample's seed, derived from (seed, sample_id)"),
    _field("refine", pa.bool_(), "stage-2 refinement applied"),
    _field("output_size", pa.string(), "'input' (original size) or 'model' (square)"),
    _field("image_format", pa.string(), "png, jpg or webp"),
    _field("fetch_s", pa.float64(), "seconds fetching this sample's objects"),
    _field("decode_s", pa.float64(), "seconds decoding this sample's images"),
    _field("harmonize_s", pa.float64(), "seconds of model time (batch time / batch size)"),
    _field("score_s", pa.float64(), "seconds computing metrics (batch time / batch size)"),
    _field("write_s", pa.float64(), "seconds encoding and writing the output image"),
    _field("mse", pa.float64(), "MSE harmonized vs real, 256x256 uint8 scale; lower is better"),
    _field("psnr", pa.float64(), "PSNR harmonized vs real (dB, data range 255); higher is better"),
    _field("fmse", pa.float64(), "foreground MSE harmonized vs real, 256x256; lower is better"),
    _field("bmse", pa.float64(), "background MSE harmonized vs real, 256x256; lower is better"),
    _field("composite_mse", pa.float64(), "MSE composite vs real, same convention (baseline)"),
    _field("composite_psnr", pa.float64(), "PSNR composite vs real, same convention (baseline)"),
    _field("composite_fmse", pa.float64(), "fMSE composite vs real, same convention (baseline)"),
    _field("run_id", pa.string(), "the run that produced this row", nullable=False),
    _field("created_at", pa.timestamp("us", tz="UTC"), "when the row was written"),
]
RESULTS_SCHEMA = pa.schema(RESULTS_FIELDS)
METRIC_COLUMNS = [
    "mse",
    "psnr",
    "fmse",
    "bmse",
    "composite_mse",
    "composite_psnr",
    "composite_fmse",
]


def results_schema_with(passthrough: pa.Schema | list[pa.Field]) -> pa.Schema:
    """The results schema followed by the manifest's passthrough columns."""
    own = set(RESULTS_SCHEMA.names)
    extra = [f for f in passthrough if f.name not in own]
    return pa.schema(list(RESULTS_SCHEMA) + extra)
