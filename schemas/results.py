"""The results dataset: one row per input sample (per variant in inverse runs), written under
`{output}/results/`.

Enters: nothing (declarations).
Leaves: `RESULTS_SCHEMA`, every column with a description in its field metadata (`harmonize
schema` prints them); the manifest's extra columns follow these, unchanged. The metric columns
carry their definitions (formula, range, which way is better, whether they need the ground
truth): this is the one place a metric is defined, and the README's tables are made from it
(`metrics_table`).

Inverse runs (`direction` "inverse": the input is the real image, the output a generated
composite): the ground-truth metrics compare the output with the real, so `mse`, `fmse` and
the foreground changes say how strong the generated disharmony is and `bg_psnr` that the
background is the real's; the `composite_*` baseline does not apply (null).
"""

from __future__ import annotations

import pyarrow as pa


def _field(name: str, type_: pa.DataType, description: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": description})


def _metric(
    name: str, formula: str, value_range: str, better: str, note: str = "", real: bool = False
) -> pa.Field:
    """A metric column: float64, null where it does not apply (no ground truth, empty region).

    The one definition of the metric: `formula` (in the README's notation: `out`, `real`,
    `composite`, `m` the binary mask, `C` = 3 channels), its `value_range`, which way is
    `better` ("lower", "higher", "closer to 1", "closer to 0" or "none") with an optional
    `note`, and whether it needs the ground truth (`real`). The description `harmonize schema`
    prints and the README's tables (`metrics_table`) are made from these.
    """
    judged = better + (f": {note}" if note else "")
    field = _field(name, pa.float64(), f"{formula}; range {value_range}; better: {judged}")
    extra = {"formula": formula, "range": value_range, "better": better, "note": note}
    extra["needs"] = "real" if real else ""
    return field.with_metadata({**field.metadata, **{k: v.encode() for k, v in extra.items()}})


_OF_COMPOSITE = "of the composite: the baseline (null in inverse runs)"


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
    # Metrics: computed by pipeline/score.py; these are their definitions (README "Metrics").
    _metric(
        "mse", "mean over pixels and channels of (out − real)²", "0 – 65025", "lower", real=True
    ),
    _metric("psnr", "10 log10(255² / mse) dB (∞ when identical)", "0 – ∞", "higher", real=True),
    _metric(
        "fmse", "Σ m (out − real)² / (C Σ m): MSE inside the mask", "0 – 65025", "lower", real=True
    ),
    _metric("bmse", "the same over 1 − m: MSE outside the mask", "0 – 65025", "lower", real=True),
    _metric("composite_mse", f"`mse` {_OF_COMPOSITE}", "0 – 65025", "lower", real=True),
    _metric("composite_psnr", f"`psnr` {_OF_COMPOSITE}", "0 – ∞", "higher", real=True),
    _metric("composite_fmse", f"`fmse` {_OF_COMPOSITE}", "0 – 65025", "lower", real=True),
    _metric(
        "ssim",
        "mean SSIM, Gaussian window σ 1.5 (11×11), data range 255, K1 0.01, K2 0.03, population "
        "covariances, 5 px border left out; mean over channels (= scikit-image "
        "`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`)",
        "−1 – 1",
        "higher",
        real=True,
    ),
    _metric(
        "mse_full",
        "`mse` at the output's own size, no resize (the real is resized to the output when "
        "`--output-size model` made it square)",
        "0 – 65025",
        "lower",
        real=True,
    ),
    _metric(
        "psnr_full", "`psnr` at the output's own size, as `mse_full`", "0 – ∞", "higher", real=True
    ),
    _metric(
        "bg_psnr",
        "10 log10(255² / bMSE(out, composite)) dB, capped at 100 dB",
        "0 – 100",
        "higher",
        "lower means the model changed the background (e.g. autoencoder distortion)",
    ),
    _metric(
        "fg_change",
        "Σ m \\|out − composite\\| / (C Σ m): mean absolute change inside the mask",
        "0 – 255",
        "none",
        "0 means nothing was done",
    ),
    _metric(
        "lab_gap_before",
        "√(Σ over L, a, b of (μ_fg − μ_bg)² + (σ_fg − σ_bg)²) of the composite, CIE Lab (D65)",
        "0 – ∞",
        "lower",
    ),
    _metric(
        "lab_gap_after",
        "the same of the output: `lab_gap_after < lab_gap_before` means the foreground moved "
        "toward the background's colour statistics, right or wrong (it held for every ruined "
        "Reinhard output of the demo)",
        "0 – ∞",
        "lower",
    ),
    _metric(
        "sharpness_ratio",
        "hf(out) / hf(composite), hf = mean (Laplacian of luma)² over the mask's interior (the "
        "mask eroded by 3×3) ÷ the luma variance there",
        "0 – ∞",
        "closer to 1",
        "< 1 blurrier (what stage 2 exists to remove), > 1 sharper or noisier",
    ),
    _metric(
        "fg_delta_e",
        "mean over the mask of CIEDE2000(composite, output) (= scikit-image `deltaE_ciede2000`; "
        "2.3 is just noticeable)",
        "0 – ~100",
        "none",
        "how much the foreground was recoloured",
    ),
    _metric(
        "fg_delta_e_p95",
        "95th percentile over the mask of the same CIEDE2000",
        "0 – ~100",
        "none",
        "iHarmony4-strength corrections are about 2–12",
    ),
    _metric(
        "fg_hue_shift",
        "hue angle of the foreground's mean (a\\*, b\\*), output minus composite",
        "−180 – 180°",
        "closer to 0",
        "tens of degrees is a recoloured object (a blue face)",
    ),
    _metric(
        "fg_chroma_change",
        "mean chroma C\\* of the foreground, output minus composite",
        "Lab units",
        "none",
        "negative is washed out",
    ),
    _metric(
        "fg_structure",
        "SSIM of luma between output and composite (window as `ssim`), averaged over the mask",
        "−1 – 1",
        "higher",
        "1 is the same structure and contrast; drops with invented content, blur, lost contrast",
    ),
    _metric("mask_area", "Σ m / (H W) at the input's size", "0 – 1", "none"),
    _metric(
        "unharmony_prob",
        "the harmony classifier's probability of class 1 (unharmonious): DiffHarmony++'s "
        "ResNet-50 (2 classes, `--classifier`) on the output as written, resized to 256×256 by "
        "PIL bilinear (the official `Resize((256, 256), bilinear, antialias)`), ImageNet "
        "mean/std, softmax",
        "0 – 1",
        "lower",
        "how unharmonious the image looks; null without `--classifier`",
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
# The metrics that need `real_uri`: null for samples without ground truth.
GROUND_TRUTH_METRICS = [
    name for name in METRIC_COLUMNS if RESULTS_SCHEMA.field(name).metadata[b"needs"] == b"real"
]


def metrics_table(ground_truth: bool) -> str:
    """The README's Markdown table of the metrics with (or without) ground truth, made from the
    columns' definitions above (tests/test_readme_metrics.py checks the README holds it)."""
    lines = ["| column | formula | range | better |", "| --- | --- | --- | --- |"]
    for name in METRIC_COLUMNS:
        meta = {k.decode(): v.decode() for k, v in RESULTS_SCHEMA.field(name).metadata.items()}
        if (meta["needs"] == "real") != ground_truth:
            continue
        better = meta["better"] + (f": {meta['note']}" if meta["note"] else "")
        lines.append(f"| `{name}` | {meta['formula']} | {meta['range']} | {better} |")
    return "\n".join(lines)


def results_schema_with(passthrough: pa.Schema | list[pa.Field]) -> pa.Schema:
    """The results schema followed by the manifest's passthrough columns."""
    own = set(RESULTS_SCHEMA.names)
    extra = [f for f in passthrough if f.name not in own]
    return pa.schema(list(RESULTS_SCHEMA) + extra)
