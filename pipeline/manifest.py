"""Manifest: a Parquet file or folder of files on any fsspec URI, checked before the run.

Enters: the manifest URI and storage options.
Leaves: a `Manifest` naming the Parquet files for Ray Data's `read_parquet`, the folder that
relative URIs resolve against and the passthrough columns. Only the key columns are read
here (to check them); the rows themselves stream through Ray later.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.storage import absolute, filesystem, to_pyarrow
from schemas.manifest import KEY_COLUMNS, ManifestError, validate_manifest, validate_schema


@dataclass(frozen=True)
class Manifest:
    uri: str
    files: list[str]  # paths inside `filesystem`, for read_parquet
    base_dir: str  # URI of the folder that relative sample URIs resolve against
    schema: pa.Schema
    num_rows: int

    @property
    def passthrough(self) -> list[pa.Field]:
        return [field for field in self.schema if field.name not in KEY_COLUMNS]


def open_manifest(uri: str, storage_options: dict[str, Any]) -> Manifest:
    """Find the manifest's files and validate its structure (raises `ManifestError`)."""
    uri = absolute(uri)
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise ManifestError(f"manifest not found: {uri}")
    if fs.isdir(path):
        files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
        base_dir = uri
        if not files:
            raise ManifestError(f"manifest folder {uri} holds no .parquet file")
    else:
        files = [path]
        base_dir = posixpath.dirname(uri)
    try:
        dataset = pads.dataset(files, filesystem=to_pyarrow(fs), format="parquet")
        schema = dataset.schema
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"manifest {uri} is not readable Parquet: {exc}") from None
    validate_schema(schema)
    keys = dataset.to_table(columns=[c for c in KEY_COLUMNS if c in schema.names])
    validate_manifest(keys)
    return Manifest(uri=uri, files=files, base_dir=base_dir, schema=schema, num_rows=keys.num_rows)
