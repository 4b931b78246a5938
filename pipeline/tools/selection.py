"""`harmonize select`: the samples whose current result satisfies a condition, as a manifest.

Enters: a results URI (as `pipeline.results.connect` takes it), storage options, an SQL
condition over the results columns, optionally a per-source pick (the row with the highest or
lowest metric per source sample: an inverse run's variants of one real image), the metrics to
copy, which parameter set.
Leaves: a training manifest Parquet written atomically at any URI (see `select_samples`), and a
`Selection` saying how many of how many were kept. The manifest is a valid pipeline manifest:
`harmonize run --manifest` reads it back.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from pipeline.results import Results, ResultsError, connect, quote_identifier
from pipeline.storage import absolute, write_atomic
from schemas.manifest import ManifestError, validate_manifest
from schemas.results import METRIC_COLUMNS, RESULTS_SCHEMA

# Prefix of the metric columns of a training manifest: the results schema's own names are
# reserved in a manifest (they would collide with the results of a run on it).
MANIFEST_METRIC_PREFIX = "metric_"


@dataclass(frozen=True)
class Selection:
    out: str
    where: str | None
    results_uri: str
    params_hash: str | None
    ok_samples: int
    selected: int
    columns: list[str]
    per_source: tuple[str, str] | None = None  # ("max" | "min", metric)

    def text(self) -> str:
        how = [f"where {self.where}"] if self.where and self.where.strip() else []
        if self.per_source:
            how.append(f"the {self.per_source[0]} {self.per_source[1]} per source sample")
        return (
            f"selected {self.selected} of {self.ok_samples} ok samples: {', '.join(how)}\n"
            f"results:  {self.results_uri} (params_hash {self.params_hash})\n"
            f"manifest: {self.out} ({', '.join(self.columns)})"
        )


def select_samples(
    results_uri: str,
    where: str | None,
    out: str,
    storage_options: dict[str, Any] | None = None,
    *,
    metrics: list[str] | None = None,
    params_hash: str | None = None,
    per_source: tuple[str, str] | None = None,
) -> Selection:
    """Write the samples of `current` that satisfy `where` as a training manifest.

    Columns: `sample_id`; `image_uri` (the output image) and the same URI as
    `composite_uri`, so that `harmonize run --manifest` reads the manifest back (an inverse
    run's generated composites become a forward run's inputs); `mask_uri`; `real_uri` (ground
    truth, null without); `source_composite_uri`, `source_model`, `source_params_hash`,
    `source_run_id` (provenance); for inverse results, `generated_from` and
    `generated_variant` (the real image's sample id and k); `metric_{name}` for each of
    `metrics` (default: every metric the results have; prefixed because metric names are
    reserved for the results in a manifest); then the original manifest's extra columns
    (`subset`, …).

    `per_source` = ("max" | "min", metric): of the rows `where` keeps, only the one with the
    highest (lowest) metric per source sample (`source_sample_id`: an inverse run's variants
    of one real image; a forward row is its own source), ties to the lowest sample id. With
    it, `where` may be empty. E.g. ("max", "unharmony_prob"): the most unharmonious generated
    composite of each real image, as the official HumanHarmony selection keeps it.
    """
    options = storage_options or {}
    if per_source is None and (not where or not where.strip()):
        raise ResultsError('--where is empty: give a condition, e.g. "bg_psnr > 35"')
    if per_source is not None:
        order, by = per_source
        if order not in ("max", "min") or by not in METRIC_COLUMNS:
            raise ResultsError(
                f"per source: 'max' or 'min' of a metric ({', '.join(METRIC_COLUMNS)}), "
                f"not {order!r} of {by!r}"
            )
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
    generated = "source_sample_id" in results.columns and bool(
        results.connection.sql(
            "SELECT count(*) FROM current WHERE source_sample_id IS NOT NULL"
        ).fetchall()[0][0]
    )
    if generated:  # inverse results: which real image and variant each composite came from
        own += [
            "source_sample_id AS generated_from",
            "CAST(variant AS INTEGER) AS generated_variant",
        ]
    own += [
        f"{quote_identifier(m)} AS {quote_identifier(MANIFEST_METRIC_PREFIX + m)}" for m in chosen
    ]
    taken = {part.rsplit(" AS ", 1)[-1].strip('"') for part in own}
    passthrough = [c for c in results.columns if c not in RESULTS_SCHEMA.names and c not in taken]
    own += [quote_identifier(c) for c in passthrough]
    table = results.query(
        f"SELECT {', '.join(own)} FROM current WHERE {{where}} {_pick(results, per_source)} "
        "ORDER BY sample_id",
        where,
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
        out, where, results.uri, results.params_hash, ok_samples, table.num_rows,
        table.column_names, per_source,
    )  # fmt: skip


def _pick(results: Results, per_source: tuple[str, str] | None) -> str:
    """The SQL after WHERE that keeps one row per source sample (nothing without a pick)."""
    if per_source is None:
        return ""
    order, by = per_source
    if by not in results.columns:
        raise ResultsError(
            f"the results under {results.uri} have no column {by!r} to pick by"
            + (" (run with --classifier)" if by == "unharmony_prob" else "")
        )
    source = (
        "coalesce(source_sample_id, sample_id)"
        if "source_sample_id" in results.columns
        else "sample_id"
    )
    metric = quote_identifier(by)
    direction = "DESC" if order == "max" else "ASC"
    return (
        f"AND {metric} IS NOT NULL QUALIFY row_number() OVER (PARTITION BY {source} "
        f"ORDER BY {metric} {direction}, sample_id) = 1"
    )
