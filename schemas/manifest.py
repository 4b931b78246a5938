"""The input manifest: one row per sample, Parquet, a single file or a directory of files.

Required: `sample_id` (unique, non-empty string), `mask_uri`, and the image the model reads:
`composite_uri` for harmonization (forward), `real_uri` for inverse harmonization (which makes
a composite from the real image).
Optional: `real_uri` (ground truth) forward, `composite_uri` inverse (not read). Every other
column is passed through to the results.
URIs are absolute (`s3://…`, `/data/…`) or relative to the manifest's folder.
"""

from __future__ import annotations

from bisect import bisect_left

import pyarrow as pa
import pyarrow.compute as pc

_STRING_TYPES = (pa.string(), pa.large_string())

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False, metadata={"description": "unique id"}),
        pa.field("composite_uri", pa.string(), nullable=False),
        pa.field("mask_uri", pa.string(), nullable=False),
        pa.field("real_uri", pa.string(), nullable=True),
    ]
)
REQUIRED_COLUMNS = ("sample_id", "composite_uri", "mask_uri")
OPTIONAL_COLUMNS = ("real_uri",)
KEY_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
# The image the model reads, by direction: the composite to harmonize, or the real image that
# inverse harmonization makes a composite from.
INPUT_COLUMN = {"forward": "composite_uri", "inverse": "real_uri"}


def required_columns(direction: str = "forward") -> tuple[str, ...]:
    """sample_id, the input image's column for `direction`, mask_uri."""
    return ("sample_id", INPUT_COLUMN[direction], "mask_uri")


_MAX_LISTED = 10


class ManifestError(ValueError):
    """A structural problem of the manifest: raised before any model is loaded."""


def _listed(values: list[object]) -> str:
    shown = ", ".join(repr(v) for v in values[:_MAX_LISTED])
    more = len(values) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def validate_schema(schema: pa.Schema, direction: str = "forward") -> None:
    """Fail on a missing key column or a key column that is not a string."""
    problems = []
    for name in required_columns(direction):
        if schema.get_field_index(name) < 0:
            what = " (inverse runs read the real image)" if direction == "inverse" else ""
            problems.append(f"missing required column {name!r}{what}")
    for name in KEY_COLUMNS:
        index = schema.get_field_index(name)
        if index >= 0 and schema.field(index).type not in _STRING_TYPES:
            problems.append(f"column {name!r} must be a string, found {schema.field(index).type}")
    from schemas.results import RESULTS_SCHEMA

    for name in schema.names:
        if name in RESULTS_SCHEMA.names and name not in KEY_COLUMNS:
            problems.append(f"column {name!r} is reserved for the results; rename it")
    if problems:
        have = ", ".join(schema.names)
        raise ManifestError("manifest: " + "; ".join(problems) + f" (columns present: {have})")


def _rows(rows: list[int], files: list[tuple[str, int]] | None) -> str:
    """Global row numbers as the reader can find them: per file when there are several."""
    if not files or len(files) == 1:
        return f"rows {_listed(rows)}"
    rows = sorted(rows)
    places, start = [], 0
    for name, count in files:
        first, last = bisect_left(rows, start), bisect_left(rows, start + count)
        if first < last:
            places.append(f"{name} rows {_listed([r - start for r in rows[first:last]])}")
        start += count
    shown = "; ".join(places[:_MAX_LISTED])
    more = len(places) - _MAX_LISTED
    return shown + (f" and {more} more files" if more > 0 else "")


def validate_manifest(
    table: pa.Table, files: list[tuple[str, int]] | None = None, direction: str = "forward"
) -> None:
    """Check a manifest table's key columns: schema, empty or null values, duplicate ids.

    `table` may hold only the key columns (the driver reads no more than those). `files`, the
    name and row count of each file the rows came from in order, makes messages name files.
    """
    validate_schema(table.schema, direction)
    problems = []
    row_numbers = pa.array(range(table.num_rows), pa.int64())
    for name in required_columns(direction):
        column = table.column(name)
        bad = pc.or_kleene(pc.is_null(column), pc.equal(pc.utf8_length(column), 0))
        bad_rows = pc.filter(row_numbers, pc.fill_null(bad, True)).to_pylist()
        if bad_rows:
            problems.append(f"column {name!r} is null or empty in {_rows(bad_rows, files)}")
    counts = pc.value_counts(table.column("sample_id")).flatten()
    duplicated = pc.filter(counts[0], pc.greater(counts[1], 1))
    if len(duplicated):
        rows = pc.filter(row_numbers, pc.is_in(table.column("sample_id"), duplicated)).to_pylist()
        problems.append(
            f"column 'sample_id' has {len(duplicated)} duplicated value(s) "
            f"{_listed(duplicated.to_pylist())} in {_rows(rows, files)}"
        )
    if problems:
        raise ManifestError("manifest: " + "; ".join(problems))
