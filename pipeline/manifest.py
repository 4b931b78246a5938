"""Manifest: a Parquet file or folder of files on any fsspec URI, checked before the run.

Enters: the manifest URI and storage options.
Leaves: a `Manifest` naming the Parquet files for Ray Data's `read_parquet`, the schema every
file is read with (the files' schemas unified), the folder that relative URIs resolve
against and the passthrough columns; or a `ManifestError` in one line (a bad column, file or
row, or storage that refuses to read it). Only the footers and the key columns are read here (to
check them); the rows themselves stream through Ray later.

Files of one folder may differ: a column missing from some files reads as null there, and a
column whose type differs is promoted where no value can change (a wider integer, an integer
of up to 32 bits to float64, a wider float, string to large_string, a dictionary to its
values, null to anything). Any other difference is refused before the run, naming the column
and the files.
"""

from __future__ import annotations

import dataclasses
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import absolute, describe, filesystem, resolve, to_pyarrow
from schemas.manifest import (
    INPUT_COLUMN,
    KEY_COLUMNS,
    ManifestError,
    validate_manifest,
    validate_schema,
)

_READERS = 16  # footers and key columns read concurrently (object-store latency)


@dataclass(frozen=True)
class Manifest:
    uri: str
    files: list[str]  # paths inside `filesystem`, for read_parquet
    base_dir: str  # URI of the folder that relative sample URIs resolve against
    schema: pa.Schema  # every file is read with this schema
    num_rows: int
    # The first row's input image (composite forward, real inverse) as written (for preflight).
    first_composite: str | None = None
    sample_ids: pa.Array | None = dataclasses.field(
        default=None, repr=False
    )  # read for the validation

    @property
    def first_composite_uri(self) -> str | None:
        """The first sample's input image (composite, or real inverse) as an absolute URI
        (None: no rows)."""
        return resolve(self.base_dir, self.first_composite) if self.first_composite else None

    @property
    def passthrough(self) -> list[pa.Field]:
        return [field for field in self.schema if field.name not in KEY_COLUMNS]


def promote(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """A type that holds every value of `a` and of `b` unchanged, or None when there is none."""
    if pa.types.is_dictionary(a):
        return promote(a.value_type, b)
    if pa.types.is_dictionary(b):
        return promote(a, b.value_type)
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        if pa.types.is_signed_integer(a) == pa.types.is_signed_integer(b):
            return a if a.bit_width >= b.bit_width else b
        unsigned, signed = (a, b) if pa.types.is_unsigned_integer(a) else (b, a)
        width = max(signed.bit_width, 2 * unsigned.bit_width)
        return {8: pa.int8(), 16: pa.int16(), 32: pa.int32(), 64: pa.int64()}.get(width)
    if pa.types.is_floating(a) and pa.types.is_floating(b):
        return a if a.bit_width >= b.bit_width else b
    if pa.types.is_integer(a) and pa.types.is_floating(b):
        return pa.float64() if a.bit_width <= 32 else None  # float64 holds every int32
    if pa.types.is_floating(a) and pa.types.is_integer(b):
        return promote(b, a)
    for narrow, wide in ((pa.string(), pa.large_string()), (pa.binary(), pa.large_binary())):
        if {a, b} == {narrow, wide}:
            return wide
    return None


def unify_schemas(names: list[str], schemas: list[pa.Schema]) -> pa.Schema:
    """One schema for files `names` with `schemas`: columns in order of first appearance,
    types promoted where lossless (raises `ManifestError` naming the column and files)."""
    fields: dict[str, pa.Field] = {}
    for schema in schemas:
        for field in schema:
            if field.name not in fields:
                fields[field.name] = field.with_metadata(None)
                continue
            seen = fields[field.name]
            promoted = promote(seen.type, field.type)
            if promoted is None:
                by_type: dict[str, list[str]] = {}
                for name, other in zip(names, schemas):
                    index = other.get_field_index(field.name)
                    if index >= 0:
                        by_type.setdefault(str(other.field(index).type), []).append(name)
                found = " but ".join(
                    f"{kind} in {_listed(files)}" for kind, files in by_type.items()
                )
                raise ManifestError(
                    f"manifest: column {field.name!r} is {found}; no type holds both without "
                    "changing values: write it with one type in every file"
                )
            fields[field.name] = pa.field(field.name, promoted, seen.nullable or field.nullable)
    return pa.schema(list(fields.values()))


def _listed(files: list[str], shown: int = 3) -> str:
    more = len(files) - shown
    return ", ".join(files[:shown]) + (f" and {more} more files" if more > 0 else "")


def open_manifest(
    uri: str, storage_options: dict[str, Any], direction: str = "forward"
) -> Manifest:
    """Find the manifest's files and validate their structure for `direction`. Raises
    `ManifestError`, also for a manifest the storage refuses to read (one line naming the URI
    and the cause)."""
    try:
        return _open_manifest(absolute(uri), storage_options, direction)
    except OSError as exc:
        raise ManifestError(f"manifest {uri} cannot be read: {describe(exc)}") from None


def _open_manifest(uri: str, storage_options: dict[str, Any], direction: str) -> Manifest:
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise ManifestError(f"manifest not found: {uri}")
    if fs.isdir(path):
        files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
        base_dir = uri
        if not files:
            raise ManifestError(f"manifest folder {uri} holds no .parquet file")
        names = [posixpath.relpath(f, path) for f in files]
    else:
        files = [path]
        base_dir = posixpath.dirname(uri)
        names = [posixpath.basename(path)]
    arrow_fs = to_pyarrow(fs)

    def footer(index: int) -> pa.Schema:
        try:
            return pq.read_schema(files[index], filesystem=arrow_fs)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ManifestError(
                f"manifest file {names[index]} is not readable Parquet: {exc}"
            ) from None

    with ThreadPoolExecutor(max_workers=min(_READERS, len(files))) as pool:
        schemas = list(pool.map(footer, range(len(files))))
    schema = unify_schemas(names, schemas)
    validate_schema(schema, direction)
    key_fields = [schema.field(c) for c in KEY_COLUMNS if c in schema.names]

    def keys(index: int) -> pa.Table:
        columns = [f.name for f in key_fields if f.name in schemas[index].names]
        table = pq.read_table(files[index], columns=columns, filesystem=arrow_fs)
        return pa.table(
            [
                table[f.name].cast(f.type) if f.name in columns else pa.nulls(len(table), f.type)
                for f in key_fields
            ],
            schema=pa.schema(key_fields),
        )

    with ThreadPoolExecutor(max_workers=min(_READERS, len(files))) as pool:
        tables = list(pool.map(keys, range(len(files))))
    keys_table = pa.concat_tables(tables)
    validate_manifest(keys_table, [(n, len(t)) for n, t in zip(names, tables)], direction)
    first = keys_table[INPUT_COLUMN[direction]][0].as_py() if keys_table.num_rows else None
    return Manifest(
        uri, files, base_dir, schema, keys_table.num_rows, first, keys_table["sample_id"]
    )
