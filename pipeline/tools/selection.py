"""`harmonize select`: the samples whose current result satisfies a condition, as a manifest.

Enters: a results URI (as `pipeline.results.connect` takes it), storage options, an SQL
condition over the results columns, the metrics to copy, which parameter set.
Leaves: a training manifest Parquet written atomically at any URI (see `select_samples`), and a
`Selection` saying how many of how many were kept. The manifest is a valid pipeline manifest:
`harmonize run --manifest` reads it back.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from pipeline.results import ResultsError, connect, quote_identifier
from pipeline.storage import absolute, write_atomic
from schemas.manifest import ManifestError, validate_manifest
from schemas.results import METRIC_COLUMNS, RESULTS_SCHEMA

# Prefix of the metric columns of a training manifest: the results schema's own names are
# reserved in a manifest (they would collide with the results of a run on it).
MANIFEST_METRIC_PREFIX = "metric_"


@dataclass(frozen=True)
class Selection:
    out: str
    where: str
    results_uri: str
    params_hash: str | None
    ok_samples: int
    selected: int
    columns: list[str]

    def text(self) -> str:
        return (
            f"selected {self.selected} of {self.ok_samples} ok samples where {self.where}\n"
            f"results:  {self.results_uri} (params_hash {self.params_hash})\n"
            f"manifest: {self.out} ({', '.join(self.columns)})"
        )


def select_samples(
    results_uri: str,
    where: str,
    out: str,
    storage_options: dict[str, Any] | None = None,
    *,
    metrics: list[str] | None = None,
    params_hash: str | None = None,
) -> Selection:
    """Write the samples of `current` that satisfy `where` as a training manifest.

    Columns: `sample_id`; `image_uri` (the harmonized image) and the same URI as
    `composite_uri`, so that `harmonize run --manifest` reads the manifest back; `mask_uri`;
    `real_uri` (ground truth, null without); `source_composite_uri`, `source_model`,
    `source_params_hash`, `source_run_id` (provenance); `metric_{name}` for each of `metrics`
    (default: every metric the results have; prefixed because metric names are reserved
    for the results in a manifest); then the original manifest's extra columns (`subset`, …).
    """
    options = storage_options or {}
    if not where or not where.strip():
        raise ResultsError('--where is empty: give a condition, e.g. "bg_psnr > 35"')
    results = connect(results_uri, options, params_hash)
    chosen = results.metrics if metrics is None else list(metrics)
    unknown = [m for m in chosen if m not in METRIC_COLUMNS]
    if unknown:
        raise ResultsError(f"unknown metric(s) {unknown}; metrics: {', '.join(METRIC_COLUMNS)}")
    absent = [m for m in chosen if m not in results.columns]
    if absent:
        raise ResultsError(
            f"the results under {results.uri} predate metric(s) {absent}; re-run the pipeline "
            "into a new --output to compute them, or leave them out of --metric"
        )

    def column(name: str, alias: str, type_: str = "VARCHAR") -> str:
        value = quote_identifier(name) if name in results.columns else "NULL"
        return f"CAST({value} AS {type_}) AS {quote_identifier(alias)}"

    own = [
        "sample_id",
        "output_uri AS composite_uri",
        "mask_uri",
        column("real_uri", "real_uri"),
        "output_uri AS image_uri",
        "composite_uri AS source_composite_uri",
        column("model", "source_model"),
        column("params_hash", "source_params_hash"),
        column("run_id", "source_run_id"),
    ]
    own += [
        f"{quote_identifier(m)} AS {quote_identifier(MANIFEST_METRIC_PREFIX + m)}" for m in chosen
    ]
    taken = {part.rsplit(" AS ", 1)[-1].strip('"') for part in own}
    passthrough = [c for c in results.columns if c not in RESULTS_SCHEMA.names and c not in taken]
    own += [quote_identifier(c) for c in passthrough]
    table = results.query(
        f"SELECT {', '.join(own)} FROM current WHERE {{where}} ORDER BY sample_id", where
    )
    ok_samples = results.count("current")
    try:
        validate_manifest(table)
    except ManifestError as exc:  # e.g. an ok row without output_uri: a damaged results set
        raise ResultsError(f"the selection is not a valid manifest: {exc}") from None
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    out = absolute(out)
    write_atomic(out, buffer.getvalue(), options)
    return Selection(
        out, where, results.uri, results.params_hash, ok_samples, table.num_rows, table.column_names
    )
