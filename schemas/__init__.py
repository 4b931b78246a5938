"""Parquet schemas of the pipeline's input manifest and its results, with their validators."""

from schemas.manifest import MANIFEST_SCHEMA, ManifestError, validate_manifest
from schemas.results import RESULTS_SCHEMA, results_schema_with

__all__ = [
    "MANIFEST_SCHEMA",
    "RESULTS_SCHEMA",
    "ManifestError",
    "results_schema_with",
    "validate_manifest",
]
