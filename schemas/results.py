"""The results dataset: one row per input sample (per variant in inverse runs), written under
`{output}/results/`.

Every column has a description in its field metadata (`harmonize schema` prints them). The
manifest's extra columns follow these, unchanged.
"""

from __future__ import annotations

import pyarrow as pa


def _field(name: str, type_: pa.DataType, description: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": description})


def _metric(name: str, description: str, better: str) -> pa.Field:
    """A metric column: float64, null where it does not apply (no ground truth, empty region)."""
    suffix = "no better direction" if better == "none" else f"{better} is better"
    field = _field(name, pa.float64(), f"{description}; {suffix}")
    return field.with_metadata({**field.metadata, b"better": better.encode()})


RESULTS_FIELDS = [
    _field(
        "sample_id",
        pa.string(),
        "the manifest's sample id; inverse runs: one per variant, '{source_sample_id}__v{k}'",
        nullable=False,
    ),
    _field(
        "source_sample_id",
        pa.string(),
        "inverse runs: the manifest's sample id the variant was made from; null forward",
    ),
    _field(
        "variant",
        pa.int32(),
        "inverse runs: k of the sample's variants, seeded from (seed, sample_id, k); null forward",
    ),
    _field(
        "direction",
        pa.string(),
        "'forward' (harmonize the composite) or 'inverse' (make a composite from the real)",
    ),
    _field(
        "composite_uri",
        pa.string(),
        "composite image read (absolute URI); null inverse (output_uri is the new composite)",
    ),
    _field("mask_uri", pa.string(), "mask read (absolute URI)"),
    _field(
        "real_uri",
        pa.string(),
        "ground truth read (absolute URI), null without one; inverse runs: the input image",
    ),
    _field(
        "output_uri",
        pa.string(),
        "image written (harmonized, or inverse: the new composite); null when status is error",
    ),
    _field("status", pa.string(), "'ok' or 'error'", nullable=False),
    _field("error", pa.string(), "null when ok, else the sample id, stage and cause"),
    _field("width", pa.int32(), "the composite's original width in pixels"),
    _field("height", pa.int32(), "the composite's original height in pixels"),
    _field("model", pa.string(), "harmonizer name: reinhard, diffharmony, identity"),
    _field("model_fingerprint", pa.string(), "hash of the model's weights and configuration"),
    _field("params_hash", pa.string(), "hash of model, fingerprint and every output parameter"),
    _field("model_params", pa.string(), "JSON of every parameter that affects the output"),
    _field(
        "classifier_fingerprint",
        pa.string(),
        "sha256 of the harmony classifier's weights (--classifier); null without one",
    ),
    _field("device", pa.string(), "where the model ran: 'cuda:<GPU name>' or 'cpu'"),
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
    # Metrics (pipeline/score.py; README "Metrics"). "better" says which way is better.
    _metric("mse", "MSE harmonized vs real, 256x256 uint8 scale; [0, 65025]", "lower"),
    _metric("psnr", "PSNR harmonized vs real, 10 log10(255^2 / mse) dB; [0, inf]", "higher"),
    _metric("fmse", "foreground MSE harmonized vs real, 256x256; [0, 65025]", "lower"),
    _metric("bmse", "background MSE harmonized vs real, 256x256; [0, 65025]", "lower"),
    _metric(
        "composite_mse", "MSE composite vs real, same convention (baseline); null inverse", "lower"
    ),
    _metric(
        "composite_psnr",
        "PSNR composite vs real, same convention (baseline); null inverse",
        "higher",
    ),
    _metric(
        "composite_fmse",
        "fMSE composite vs real, same convention (baseline); null inverse",
        "lower",
    ),
    _metric("ssim", "SSIM harmonized vs real, 256x256, Gaussian window; [-1, 1]", "higher"),
    _metric("mse_full", "MSE harmonized vs real at the output's own size; [0, 65025]", "lower"),
    _metric("psnr_full", "PSNR harmonized vs real at the output's own size (dB)", "higher"),
    _metric(
        "bg_psnr",
        "PSNR output vs composite outside the mask (dB), capped at 100 (untouched background)",
        "higher",
    ),
    _metric(
        "fg_change", "mean |output - composite| inside the mask, uint8 scale; [0, 255]", "none"
    ),
    _metric(
        "lab_gap_before",
        "distance of foreground to background Lab mean/std in the composite; [0, inf)",
        "lower",
    ),
    _metric(
        "lab_gap_after",
        "distance of foreground to background Lab mean/std in the output; [0, inf)",
        "lower",
    ),
    _metric(
        "sharpness_ratio",
        "foreground Laplacian energy / variance, output over composite; <1 blurrier, 1 same",
        "closer to 1",
    ),
    _metric(
        "fg_delta_e",
        "mean CIEDE2000 output vs composite inside the mask, 256 px; [0, ~100], 2.3 just visible",
        "none",
    ),
    _metric(
        "fg_delta_e_p95", "95th percentile of the same CIEDE2000 inside the mask; [0, ~100]", "none"
    ),
    _metric(
        "fg_hue_shift",
        "hue angle of the foreground's mean (a*, b*), output minus composite; degrees (-180, 180]",
        "closer to 0",
    ),
    _metric(
        "fg_chroma_change",
        "mean chroma C* of the foreground, output minus composite (Lab units); < 0 washed out",
        "none",
    ),
    _metric(
        "fg_structure",
        "SSIM of luma, output vs composite, over the mask (256 px); [-1, 1], 1 same structure",
        "higher",
    ),
    _metric("mask_area", "fraction of the image inside the mask; (0, 1)", "none"),
    _metric(
        "unharmony_prob",
        "harmony classifier's probability that the output looks unharmonious (ResNet-50, "
        "256 px); [0, 1]; null without --classifier",
        "lower",
    ),
    _field("run_id", pa.string(), "the run that produced this row", nullable=False),
    _field("created_at", pa.timestamp("us", tz="UTC"), "when the row was written"),
]
RESULTS_SCHEMA = pa.schema(RESULTS_FIELDS)
METRIC_COLUMNS = [f.name for f in RESULTS_FIELDS if f.metadata and b"better" in f.metadata]
# Which way each metric is better: "higher", "lower", "closer to 1", "closer to 0" or "none".
METRIC_BETTER = {
    f.name: f.metadata[b"better"].decode() for f in RESULTS_FIELDS if f.name in METRIC_COLUMNS
}


def results_schema_with(passthrough: pa.Schema | list[pa.Field]) -> pa.Schema:
    """The results schema followed by the manifest's passthrough columns."""
    own = set(RESULTS_SCHEMA.names)
    extra = [f for f in passthrough if f.name not in own]
    return pa.schema(list(RESULTS_SCHEMA) + extra)
