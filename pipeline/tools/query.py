"""Quality filtering and statistics over a results dataset, in SQL (DuckDB).

Enters: a results URI (a run's `--output`, its `results/` folder or one `results/{run_id}/`
folder; local or any fsspec URI), storage options, an SQL condition over the results columns.
Leaves: `select` writes a training manifest Parquet (see `select`) and returns a
`Selection`; `stats` returns `Stats`: ok / error counts, per-metric quantiles, per-subset means,
as text or JSON.

The Parquet files are read through pyarrow (fsspec filesystems, so `s3://` needs no DuckDB
extension) as one dataset whose schema is the union of every file's, so results written
before a column existed read as null there. DuckDB scans that dataset as the table `results`.
Queries run over `current`: one row per sample, its latest `ok` row, of one parameter set
(results hold error rows, and rows of other models or parameters when runs differed).
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.storage import absolute, filesystem, parquet_dataset, results_location, write_atomic
from schemas.manifest import ManifestError, validate_manifest
from schemas.results import METRIC_BETTER, METRIC_COLUMNS, RESULTS_SCHEMA

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
QUANTILE_LABELS = tuple("median" if q == 0.5 else f"{q:.0%}" for q in QUANTILES)
# Prefix of the metric columns of a training manifest: the results schema's own names are
# reserved in a manifest (they would collide with the results of a run on it).
MANIFEST_METRIC_PREFIX = "metric_"
# A reference-free quality filter: background kept, foreground recoloured at most moderately
# (CIEDE2000, 95th percentile), hue and structure kept. Thresholds from realistic composites:
# iHarmony4-strength corrections change the foreground by 2-12 at the 95th percentile, keep
# the hue within 20 degrees and luma SSIM above 0.8 (tests/test_quality_filter.py). It cannot
# tell a right change from a wrong one of the same size; `stats` shows how it agrees with the
# ground truth where there is one.
QUALITY_FILTER = (
    "bg_psnr > 35 AND fg_delta_e_p95 < 12 AND abs(fg_hue_shift) < 30 AND fg_structure > 0.8"
)
# Columns of the per-subset table printed by `stats` (all metrics are in the JSON).
SUBSET_TABLE = ("mse", "psnr", "fmse", "ssim", "bg_psnr", "lab_gap_after", "sharpness_ratio")


class QueryError(ValueError):
    """The results cannot be queried as asked; the message says why and what to do."""


def open_results(uri: str, storage_options: dict[str, Any]) -> pads.Dataset:
    """Every results Parquet file under `uri`, as one dataset over the union of their schemas."""
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise QueryError(f"no results at {uri}")
    dataset = parquet_dataset(uri, storage_options)
    if dataset is None:
        raise QueryError(f"no results Parquet files under {uri}")
    schema = dataset.schema
    missing = {"sample_id", "status"} - set(schema.names)
    if missing:
        raise QueryError(f"{uri} holds Parquet files that are not results (no {sorted(missing)})")
    return dataset


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _check_condition(where: str) -> None:
    """One boolean expression, not a way to run further statements."""
    try:
        statements = duckdb.extract_statements(f"SELECT 1 FROM results WHERE ({where})")
    except duckdb.Error as exc:
        raise QueryError(f"--where {where!r} is not valid SQL: {_first_line(exc)}") from None
    if len(statements) != 1:
        raise QueryError(f"--where {where!r} must be a single condition")


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


_MISSING_COLUMN = re.compile(
    r'Referenced column "([^"]+)" not found|does not have a column named "([^"]+)"'
)


@dataclass
class Results:
    """A DuckDB connection with `results` (every row) and `current` (see the top) registered."""

    uri: str
    dataset: pads.Dataset
    connection: duckdb.DuckDBPyConnection
    params_hash: str | None
    model: str | None

    @property
    def columns(self) -> list[str]:
        return list(self.dataset.schema.names)

    @property
    def metrics(self) -> list[str]:
        return [name for name in METRIC_COLUMNS if name in self.columns]

    @property
    def absent_metrics(self) -> list[str]:
        """Metric columns these results predate."""
        return [name for name in METRIC_COLUMNS if name not in self.columns]

    def query(self, sql: str, where: str | None = None) -> pa.Table:
        """Run `sql` (over `current`, filtered by `where` where it says `{where}`)."""
        condition = "TRUE"
        if where and where.strip():
            _check_condition(where)
            condition = f"({where})"
        try:
            return self.connection.sql(sql.replace("{where}", condition)).to_arrow_table()
        except duckdb.BinderException as exc:
            raise self._binder_error(exc, where) from None
        except duckdb.Error as exc:
            raise QueryError(f"--where {where!r}: {_first_line(exc)}") from None

    def _binder_error(self, exc: duckdb.Error, where: str | None) -> QueryError:
        match = _MISSING_COLUMN.search(str(exc))
        if not match:
            return QueryError(f"--where {where!r}: {_first_line(exc)}")
        name = match.group(1) or match.group(2)
        if name in RESULTS_SCHEMA.names:
            return QueryError(
                f"the results under {self.uri} have no column {name!r}: they were written "
                f"before the pipeline computed it. Re-run the pipeline into a new --output to "
                f"get it (re-running into the same --output skips samples already done). "
                f"Metrics these results have: {', '.join(self.metrics) or 'none'}"
            )
        return QueryError(
            f"no column {name!r} in the results under {self.uri}; columns: "
            f"{', '.join(self.columns)} (`harmonize schema` describes them)"
        )


def connect(
    results_uri: str, storage_options: dict[str, Any], params_hash: str | None = None
) -> Results:
    """Open the results under `results_uri` and pick the parameter set `current` holds.

    With several parameter sets among the ok rows, `params_hash` must name one (the error
    lists them): mixing models or parameters in one manifest or one set of quantiles would
    mislead.
    """
    uri = results_location(results_uri, storage_options)
    dataset = open_results(uri, storage_options)
    # No replacement scans of Python variables, no file access from SQL: the only table is
    # the registered dataset, which pyarrow reads.
    connection = duckdb.connect(
        config={"python_enable_replacements": False, "enable_external_access": False}
    )
    connection.register("results", dataset)
    names = set(dataset.schema.names)
    has_hash = "params_hash" in names
    model = "model" if "model" in names else "NULL"
    sets = (
        connection.sql(
            f"SELECT params_hash, string_agg(DISTINCT {model}, ', '), count(DISTINCT sample_id) "
            "FROM results WHERE status = 'ok' GROUP BY params_hash ORDER BY params_hash"
        ).fetchall()
        if has_hash
        else []
    )
    chosen, models = params_hash, None
    if params_hash is not None:
        found = [s for s in sets if s[0] == params_hash]
        if not found:
            present = ", ".join(f"{h} ({m})" for h, m, _ in sets) or "none"
            raise QueryError(f"no ok results with params_hash {params_hash!r} (present: {present})")
        models = found[0][1]
    elif len(sets) > 1:
        listed = "; ".join(f"{h} ({m}, {n} samples)" for h, m, n in sets)
        raise QueryError(
            f"the results under {uri} hold {len(sets)} parameter sets: {listed}. Pick one with "
            "--params-hash, or point --results at one run's results/{run_id} folder"
        )
    elif sets:
        chosen, models = sets[0][0], sets[0][1]

    conditions = ["status = 'ok'"]
    if has_hash and chosen is not None:
        conditions.append(f"params_hash = '{chosen.replace(chr(39), chr(39) * 2)}'")
    newest = "ORDER BY created_at DESC NULLS LAST" if "created_at" in names else ""
    connection.execute(
        f"CREATE TEMP VIEW current AS SELECT * FROM results WHERE {' AND '.join(conditions)} "
        f"QUALIFY row_number() OVER (PARTITION BY sample_id {newest}) = 1"
    )
    return Results(uri, dataset, connection, chosen, models)


# --- select ---------------------------------------------------------------------------------


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


def select(
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
        raise QueryError('--where is empty: give a condition, e.g. "bg_psnr > 35"')
    results = connect(results_uri, options, params_hash)
    chosen = results.metrics if metrics is None else list(metrics)
    unknown = [m for m in chosen if m not in METRIC_COLUMNS]
    if unknown:
        raise QueryError(f"unknown metric(s) {unknown}; metrics: {', '.join(METRIC_COLUMNS)}")
    absent = [m for m in chosen if m not in results.columns]
    if absent:
        raise QueryError(
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
    ok_samples = results.connection.sql("SELECT count(*) FROM current").fetchall()[0][0]
    try:
        validate_manifest(table)
    except ManifestError as exc:  # e.g. an ok row without output_uri: a damaged results set
        raise QueryError(f"the selection is not a valid manifest: {exc}") from None
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    out = absolute(out)
    write_atomic(out, buffer.getvalue(), options)
    return Selection(
        out, where, results.uri, results.params_hash, ok_samples, table.num_rows, table.column_names
    )


# --- stats ----------------------------------------------------------------------------------


@dataclass
class Stats:
    results_uri: str
    params_hash: str | None
    model: str | None
    where: str | None
    rows: int  # every results row (all runs, all parameter sets)
    ok_rows: int
    error_rows: int
    ok_samples: int  # samples in `current`: with an ok row of this parameter set
    samples: int  # of those, the ones `where` keeps (what the metrics describe)
    failed_samples: int  # samples with error rows and no ok row at all
    metrics: dict[str, dict[str, Any]]  # name -> count, mean, min, quantiles, max, better
    absent: list[str]  # metric columns these results predate
    subsets: list[dict[str, Any]] = field(default_factory=list)  # subset, images, means
    # Where the model ran, over `current`: 'cuda:<GPU name>' / 'cpu' / 'unknown' (older results).
    devices: dict[str, int] = field(default_factory=dict)
    # QUALITY_FILTER against the ground truth (output MSE below the composite's), over the
    # samples with ground truth: kept_better, kept_worse, rejected_better, rejected_worse.
    quality_filter: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers become null)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return clean(
            {
                "results": self.results_uri,
                "params_hash": self.params_hash,
                "model": self.model,
                "where": self.where,
                "rows": {"total": self.rows, "ok": self.ok_rows, "error": self.error_rows},
                "samples": {
                    "ok": self.ok_samples,
                    "matching": self.samples,
                    "failed": self.failed_samples,
                },
                "metrics": self.metrics,
                "absent_metrics": self.absent,
                "subsets": self.subsets,
                "devices": self.devices,
                "quality_filter": {"condition": QUALITY_FILTER, **self.quality_filter}
                if self.quality_filter
                else None,
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.summary(), indent=2)

    def text(self) -> str:
        lines = [
            f"results: {self.results_uri}  model: {self.model}  params_hash: {self.params_hash}"
            + (f"  where: {self.where}" if self.where else ""),
            f"rows: {self.rows} (ok {self.ok_rows}, error {self.error_rows}); samples: "
            f"{self.ok_samples} with an ok result, {self.failed_samples} with errors only"
            + (f"; {self.samples} where {self.where}" if self.where else ""),
        ]
        if self.devices:
            lines.append("ran on: " + ", ".join(f"{d} ({n})" for d, n in self.devices.items()))
        lines.append("")
        header = f"{'metric':<18}{'better':<13}{'n':>6}{'mean':>10}{'min':>10}"
        header += "".join(f"{label:>10}" for label in QUANTILE_LABELS) + f"{'max':>10}"
        lines.append(header)
        for name, m in self.metrics.items():
            values = [m["mean"], m["min"], *m["quantiles"].values(), m["max"]]
            lines.append(
                f"{name:<18}{m['better']:<13}{m['count']:>6}"
                + "".join(f"{format_number(v):>10}" for v in values)
            )
        if self.absent:
            lines.append(
                f"not in these results (written before they existed): {', '.join(self.absent)}"
            )
        if self.quality_filter:
            q = self.quality_filter
            lines += [
                "",
                f"reference-free filter ({QUALITY_FILTER}) against the ground truth "
                "(better = output MSE below the composite's):",
                f"  kept:     {q['kept_better']:>6} better, {q['kept_worse']:>6} worse",
                f"  rejected: {q['rejected_better']:>6} better, {q['rejected_worse']:>6} worse",
            ]
        if self.subsets:
            shown = [c for c in SUBSET_TABLE if c in self.metrics]
            lines += ["", "means per subset (over images):"]
            lines.append(f"{'subset':<14}{'images':>8}" + "".join(f"{c:>16}" for c in shown))
            for row in self.subsets:
                lines.append(
                    f"{row['subset']!s:<14}{row['images']:>8}"
                    + "".join(f"{format_number(row['means'][c]):>16}" for c in shown)
                )
        return "\n".join(lines)


def format_number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.0f}" if abs(value) >= 10_000 else f"{value:.4g}"


def stats(
    results_uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    params_hash: str | None = None,
    where: str | None = None,
) -> Stats:
    """Counts, per-metric quantiles (over `current`, filtered by `where`) and subset means."""
    return compute_stats(connect(results_uri, storage_options or {}, params_hash), where)


def compute_stats(results: Results, where: str | None = None) -> Stats:
    """`stats` on an open `Results`."""
    counts = results.connection.sql(
        "SELECT count(*), count(*) FILTER (WHERE status = 'ok'), "
        "count(*) FILTER (WHERE status <> 'ok' OR status IS NULL), "
        "count(DISTINCT sample_id) FILTER (WHERE sample_id NOT IN "
        "(SELECT sample_id FROM results WHERE status = 'ok')), "
        "(SELECT count(*) FROM current) FROM results"
    ).fetchall()[0]
    names = results.metrics
    quantiles = "[" + ", ".join(str(q) for q in QUANTILES) + "]"
    parts = ["count(*) AS images"]
    for name in names:
        q = quote_identifier(name)
        parts += [
            f"count({q})", f"avg({q})", f"min({q})", f"quantile_cont({q}, {quantiles})",
            f"max({q})",
        ]  # fmt: skip
    row = results.query(f"SELECT {', '.join(parts)} FROM current WHERE {{where}}", where)
    values = [row.column(i)[0].as_py() for i in range(row.num_columns)]
    metrics = {}
    for i, name in enumerate(names):
        count, mean, low, qs, high = values[1 + 5 * i : 6 + 5 * i]
        metrics[name] = {
            "better": METRIC_BETTER[name], "count": count, "mean": mean, "min": low,
            "quantiles": {str(q): v for q, v in zip(QUANTILES, qs or [None] * len(QUANTILES))},
            "max": high,
        }  # fmt: skip
    subsets = []
    if "subset" in results.columns:
        means = "".join(f", avg({quote_identifier(n)})" for n in names)
        grouped = results.query(
            f"SELECT subset, count(*){means} FROM current WHERE {{where}} "
            "GROUP BY ALL ORDER BY subset NULLS LAST",
            where,
        )
        for cells in (list(entry.values()) for entry in grouped.to_pylist()):
            subsets.append(
                {"subset": cells[0], "images": cells[1], "means": dict(zip(names, cells[2:]))}
            )
        # "All" is the mean over every image, not of the subset means (as the official table).
        subsets.append(
            {"subset": "All", "images": values[0], "means": {n: metrics[n]["mean"] for n in names}}
        )
    quality: dict[str, int] = {}
    needed = {"mse", "composite_mse", "bg_psnr", "fg_delta_e_p95", "fg_hue_shift", "fg_structure"}
    if needed <= set(results.columns):
        keep, better = f"coalesce(({QUALITY_FILTER}), false)", "mse < composite_mse"
        cells = results.query(
            f"SELECT count(*) FILTER (WHERE {keep} AND {better}), "
            f"count(*) FILTER (WHERE {keep} AND NOT {better}), "
            f"count(*) FILTER (WHERE NOT {keep} AND {better}), "
            f"count(*) FILTER (WHERE NOT {keep} AND NOT {better}) "
            "FROM current WHERE mse IS NOT NULL AND composite_mse IS NOT NULL AND {where}",
            where,
        )
        counts_ = [cells.column(i)[0].as_py() for i in range(4)]
        if sum(counts_):
            names_ = ("kept_better", "kept_worse", "rejected_better", "rejected_worse")
            quality = dict(zip(names_, counts_))
    devices: dict[str, int] = {}
    if "device" in results.columns:
        for device, n in results.connection.sql(
            "SELECT coalesce(device, 'unknown'), count(*) FROM current GROUP BY ALL ORDER BY 2 DESC"
        ).fetchall():
            devices[device] = n
    return Stats(
        results_uri=results.uri, params_hash=results.params_hash, model=results.model,
        where=where, rows=counts[0], ok_rows=counts[1], error_rows=counts[2],
        ok_samples=counts[4], samples=values[0], failed_samples=counts[3], metrics=metrics,
        absent=results.absent_metrics, subsets=subsets, devices=devices,
        quality_filter=quality,
    )  # fmt: skip
