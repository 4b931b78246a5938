"""The columns each stage of the Ray job adds, between a manifest row and a results row.

    manifest rows -- fetch --> + DECODED -- harmonize --> - INPUT_PIXELS + HARMONIZED -- write -->
    the results schema (schemas/results.py) + the manifest's passthrough columns

Enters: nothing (declarations).
Leaves: `DECODED` (what `pipeline/fetch.py` adds to each manifest row), `INPUT_PIXELS` (the
decoded columns `pipeline/harmonize.py` drops once the model has run), `HARMONIZED` (what it
adds, read by `pipeline/write.py`), and `arrays`, which types a stage's values by a schema.

Pixels travel as raw `large_binary` columns with their sizes, so blocks stay plain Arrow:
counted by Ray's memory accounting, passthrough columns untouched. A column the results keep
has the results schema's own type and description (one definition).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from schemas.results import METRIC_COLUMNS, RESULTS_SCHEMA


def _field(name: str, type_: pa.DataType, description: str) -> pa.Field:
    return pa.field(name, type_, metadata={"description": description})


def _kept(*names: str) -> list[pa.Field]:
    """Columns the results keep, as the results schema declares them."""
    return [RESULTS_SCHEMA.field(name) for name in names]


DECODED = pa.schema(
    [
        _field(
            "composite_pixels",
            pa.large_binary(),
            "the model's input (the composite; inverse runs: the real), RGB uint8, H*W*3 bytes",
        ),
        _field("mask_pixels", pa.large_binary(), "mask, uint8 in {0, 1}, H*W bytes"),
        _field("real_pixels", pa.large_binary(), "ground truth, RGB uint8, H*W*3 bytes, or null"),
        *_kept("width", "height", "status", "error", "fetch_s", "decode_s"),
    ]
)
INPUT_PIXELS = ("composite_pixels", "mask_pixels", "real_pixels")
HARMONIZED = pa.schema(
    [
        _field("harmonized_pixels", pa.large_binary(), "output, RGB uint8, h*w*3 bytes, or b''"),
        _field("output_width", pa.int32(), "w: the output's width (the input's, or square)"),
        _field("output_height", pa.int32(), "h: the output's height"),
        *_kept(
            "harmonize_s", "score_s", "model", "model_fingerprint", "params_hash", "model_params",
            "classifier_fingerprint", "direction", "device", "resolution", "steps", "seed",
            "sample_seed", "refine", "output_size",
        ),
        *_kept(*METRIC_COLUMNS),
    ]
)  # fmt: skip


def arrays(schema: pa.Schema, values: dict[str, list[Any]]) -> dict[str, pa.Array]:
    """Each column of `schema`, from `values` (column -> one Python value per row), typed as
    the schema says; a column the stage did not give is a KeyError naming it."""
    return {field.name: pa.array(values[field.name], field.type) for field in schema}
