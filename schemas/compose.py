"""Contracts of `harmonize compose`: its two input manifests and the two datasets it writes.

Inputs (Parquet, a file or a folder of files, any fsspec URI; URIs absolute or relative to the
manifest's folder; other columns are ignored):
- objects: `object_id` (unique, non-empty), `image_uri`, and the object's mask as `mask_uri`
  (an image, read by the pipeline's mask rule) or `segmentation` (COCO JSON: polygons or RLE,
  at the image's size); optional `category`. A COCO instances JSON is turned into this table.
- backgrounds: `background_id` (unique, non-empty), `image_uri`.
Outputs (under the compose `--output`):
- `manifest/{run_id}/*.parquet`, the composite manifest: one row per composite made, in the
  run manifest's contract (`schemas/manifest.py`: `sample_id`, `composite_uri`, `mask_uri`)
  so that `harmonize run` reads it as it is, the rest passed through to the results:
  instance masks, annotations and provenance (`COMPOSITE_FIELDS`).
- `errors/{run_id}/*.parquet`: one row per composite that could not be made, with the cause.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from schemas.manifest import ManifestError


def _field(name: str, type_: pa.DataType, description: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": description})


OBJECT_FIELDS = [
    _field("object_id", pa.string(), "unique id of the object", nullable=False),
    _field("image_uri", pa.string(), "image the object is cut from", nullable=False),
    _field("mask_uri", pa.string(), "the object's mask (an image); or give segmentation"),
    _field("segmentation", pa.string(), "COCO segmentation JSON (polygons or RLE); or mask_uri"),
    _field("category", pa.string(), "category name, copied to the annotations"),
]
BACKGROUND_FIELDS = [
    _field("background_id", pa.string(), "unique id of the background", nullable=False),
    _field("image_uri", pa.string(), "background image", nullable=False),
]
OBJECTS_SCHEMA = pa.schema(OBJECT_FIELDS)
BACKGROUNDS_SCHEMA = pa.schema(BACKGROUND_FIELDS)

# One pasted object of a composite, as the finished composite shows it.
INSTANCE_TYPE = pa.struct(
    [
        pa.field("label", pa.int32()),  # its value in the instances PNG
        pa.field("object_id", pa.string()),
        pa.field("category", pa.string()),
        pa.field("bbox", pa.list_(pa.float64())),  # COCO x, y, width, height of visible pixels
        pa.field("area", pa.int64()),  # visible pixels
        pa.field("visible", pa.float64()),  # visible / its pixels inside the background
        pa.field("x", pa.int32()),  # where it was pasted: top-left corner (may be outside)
        pa.field("y", pa.int32()),
        pa.field("width", pa.int32()),  # pasted size
        pa.field("height", pa.int32()),
        pa.field("scale", pa.float64()),  # pasted height / background height
        pa.field("flip", pa.bool_()),
    ]
)

COMPOSITE_FIELDS = [
    _field("sample_id", pa.string(), "composite id: {background_id}-{k}", nullable=False),
    _field("composite_uri", pa.string(), "the composite image", nullable=False),
    _field("mask_uri", pa.string(), "binary mask of every pasted pixel (0/255 PNG)", False),
    _field(
        "instances_uri",
        pa.string(),
        "instance label PNG: 0 background, i = the instance with label i, after occlusion",
    ),
    _field("background_id", pa.string(), "the background it was made on"),
    _field("background_uri", pa.string(), "the background image (absolute URI)"),
    _field("instances", pa.list_(INSTANCE_TYPE), "pasted objects, bottom to top"),
    _field(
        "dropped",
        pa.list_(pa.string()),
        "objects drawn but left out: no position kept --max-overlap",
    ),
    _field("compose_seed", pa.int64(), "this composite's seed, from (run seed, sample_id)"),
    _field("compose_params", pa.string(), "JSON of the placement rules and the run seed"),
    _field("compose_params_hash", pa.string(), "hash of compose_params"),
    _field("compose_run_id", pa.string(), "the compose run that made it"),
    _field("composed_at", pa.timestamp("us", tz="UTC"), "when it was written"),
]
COMPOSITE_SCHEMA = pa.schema(COMPOSITE_FIELDS)

COMPOSE_ERROR_FIELDS = [
    _field("sample_id", pa.string(), "composite id", nullable=False),
    _field("background_id", pa.string(), "the background it was to be made on"),
    _field("background_uri", pa.string(), "the background image (absolute URI)"),
    _field("object_ids", pa.list_(pa.string()), "the objects drawn for it"),
    _field("error", pa.string(), "the composite, what failed and why", nullable=False),
    _field("compose_params_hash", pa.string(), "hash of compose_params"),
    _field("compose_run_id", pa.string(), "the compose run that tried it"),
    _field("composed_at", pa.timestamp("us", tz="UTC"), "when it was tried"),
]
COMPOSE_ERROR_SCHEMA = pa.schema(COMPOSE_ERROR_FIELDS)

_STRING_TYPES = (pa.string(), pa.large_string())
_LISTED = 10


def validate_inputs(
    table: pa.Table, what: str, id_column: str, required: tuple[str, ...], one_of: tuple[str, ...]
) -> None:
    """Check an objects or backgrounds table (only the columns named need be present): key
    columns present and strings, ids unique and non-empty, required values present, and for
    each row one of `one_of` (objects: `mask_uri` or `segmentation`). Raises `ManifestError`
    naming the manifest (`what`), the column and the rows."""
    problems = []
    names = set(table.column_names)
    for name in (id_column, *required):
        if name not in names:
            problems.append(f"missing required column {name!r}")
    if one_of and not names & set(one_of):
        problems.append(f"needs a column {' or '.join(repr(c) for c in one_of)}")
    for name in (id_column, *required, *one_of):
        if name in names and table.schema.field(name).type not in _STRING_TYPES:
            problems.append(
                f"column {name!r} must be a string, found {table.schema.field(name).type}"
            )
    if problems:
        raise ManifestError(
            f"{what}: "
            + "; ".join(problems)
            + f" (columns present: {', '.join(table.column_names)})"
        )
    rows = pa.array(range(table.num_rows), pa.int64())

    def listed(values: list[object]) -> str:
        more = len(values) - _LISTED
        return ", ".join(map(repr, values[:_LISTED])) + (f" and {more} more" if more > 0 else "")

    def empty(name: str) -> pa.Array:
        column = table.column(name)
        return pc.fill_null(
            pc.or_kleene(pc.is_null(column), pc.equal(pc.utf8_length(column), 0)), True
        )

    for name in (id_column, *required):
        bad = pc.filter(rows, empty(name)).to_pylist()
        if bad:
            problems.append(f"column {name!r} is null or empty in rows {listed(bad)}")
    present = [c for c in one_of if c in names]
    if present:
        missing = empty(present[0])
        for name in present[1:]:
            missing = pc.and_(missing, empty(name))
        bad = pc.filter(rows, missing).to_pylist()
        if bad:
            problems.append(f"rows {listed(bad)} have no {' or '.join(present)}")
    counts = pc.value_counts(table.column(id_column)).flatten()
    duplicated = pc.filter(counts[0], pc.greater(counts[1], 1)).to_pylist()
    if duplicated:
        problems.append(f"column {id_column!r} has duplicated value(s) {listed(duplicated)}")
    if problems:
        raise ManifestError(f"{what}: " + "; ".join(problems))
