"""Reading results: where they live, every row, and each sample's current row, in one place.

Enters: a run's output prefix, or a results URI as the after-run tools take it (a run's
`--output`, its `results/` folder or one `results/{run_id}/` folder; local or any fsspec URI),
and storage options.
Leaves:
- `results_folder` / `run_folder`: where a run writes its results files;
- `read_results`: every results row of every file as one pyarrow table (the union of the files'
  schemas: results written before a column existed read as null there), or None;
- `done_sample_ids`: the ids a run skips (an ok row with the same `params_hash`);
- `list_runs`: one row per run, with counts;
- `connect`: a `Results`, DuckDB over those rows as the table `results`, with the view
  `current`: one row per sample, its latest `ok` row of one parameter set (results hold error
  rows, and rows of other models or parameters when runs differed), and `failed`: the samples
  of that set with error rows only, and their latest error. `select`, `stats`, `report` and
  `evaluate` all read `current`, so two runs into one output count each sample once.
Any results that cannot be read as asked raise `ResultsError`, whose message says what to do.

The Parquet files are read through pyarrow (fsspec filesystems, so `s3://` needs no DuckDB
extension); DuckDB may read nothing else (no file access from SQL, no Python variables).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.storage import absolute, filesystem, join, parquet_dataset
from schemas.results import METRIC_COLUMNS, RESULTS_SCHEMA

RESULTS = "results"  # the folder under a run's output
# Every results file has these; a Parquet file without them is something else.
_KEY_COLUMNS = {"sample_id", "status"}


class ResultsError(ValueError):
    """The results cannot be read or queried as asked; the message says why and what to do."""


def results_folder(output: str) -> str:
    """`{output}/results/`: every run's results files."""
    return join(output, RESULTS)


def run_folder(output: str, run_id: str) -> str:
    """`{output}/results/{run_id}/`: one run's results files."""
    return join(output, RESULTS, run_id)


def results_location(uri: str, storage_options: dict[str, Any]) -> str:
    """The folder of results Parquet files that `uri` names (an output prefix -> results/)."""
    uri = absolute(uri)
    fs, path = filesystem(uri, storage_options)
    if fs.isdir(join(path, RESULTS)):
        return results_folder(uri)
    return uri


def read_results(
    uri: str,
    storage_options: dict[str, Any],
    columns: list[str] | None = None,
    name_prefix: str = "",
) -> pa.Table | None:
    """Every results row under `uri` (all runs; only the files whose name starts with
    `name_prefix`), the `columns` of them that exist, or None when there are no files."""
    dataset = parquet_dataset(uri, storage_options, name_prefix)
    if dataset is None:
        return None
    if columns is not None:
        columns = [c for c in columns if c in dataset.schema.names]
    return dataset.to_table(columns=columns)


def done_sample_ids(output: str, storage_options: dict[str, Any], params_hash: str) -> pa.Array:
    """Ids already harmonized ok with `params_hash`, in any earlier run into `output`."""
    table = read_results(
        results_folder(output), storage_options, ["sample_id", "status", "params_hash"]
    )
    if table is None or "params_hash" not in table.column_names:
        return pa.array([], pa.string())
    done = pc.and_(pc.equal(table["status"], "ok"), pc.equal(table["params_hash"], params_hash))
    return pc.unique(table.filter(done)["sample_id"]).cast(pa.string())


def list_runs(output: str, storage_options: dict[str, Any]) -> pa.Table:
    """One row per run under `{output}/results/`: counts, model, parameters, when."""
    columns = ["run_id", "status", "model", "params_hash", "created_at"]
    table = read_results(results_folder(output), storage_options, columns)
    if table is None:
        return pa.table({c: pa.array([], pa.string()) for c in ("run_id", "model", "params_hash")})
    table = table.append_column("ok", pc.cast(pc.equal(table["status"], "ok"), pa.int64()))
    table = table.append_column("error", pc.cast(pc.not_equal(table["status"], "ok"), pa.int64()))
    runs = table.group_by(["run_id", "model", "params_hash"]).aggregate(
        [("ok", "sum"), ("error", "sum"), ("created_at", "min"), ("created_at", "max")]
    )
    runs = runs.rename_columns(
        ["run_id", "model", "params_hash", "ok", "error", "started", "finished"]
    )
    return runs.sort_by("started")


# --- the current row of each sample, in DuckDB ----------------------------------------------


def open_dataset(uri: str, storage_options: dict[str, Any]) -> pads.Dataset:
    """Every results Parquet file under `uri`, as one dataset over the union of their schemas."""
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise ResultsError(f"no results at {uri}")
    dataset = parquet_dataset(uri, storage_options)
    if dataset is None:
        raise ResultsError(f"no results Parquet files under {uri}")
    missing = _KEY_COLUMNS - set(dataset.schema.names)
    if missing:
        raise ResultsError(f"{uri} holds Parquet files that are not results (no {sorted(missing)})")
    return dataset


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _check_condition(where: str) -> None:
    """One boolean expression, not a way to run further statements."""
    try:
        statements = duckdb.extract_statements(f"SELECT 1 FROM results WHERE ({where})")
    except duckdb.Error as exc:
        raise ResultsError(f"--where {where!r} is not valid SQL: {_first_line(exc)}") from None
    if len(statements) != 1:
        raise ResultsError(f"--where {where!r} must be a single condition")


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


_MISSING_COLUMN = re.compile(
    r'Referenced column "([^"]+)" not found|does not have a column named "([^"]+)"'
)


@dataclass
class Results:
    """A DuckDB connection with `results`, `current` and `failed` registered (see the top)."""

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
            raise ResultsError(f"--where {where!r}: {_first_line(exc)}") from None

    def count(self, view: str) -> int:
        """Rows of `results`, samples of `current` or of `failed`."""
        return self.connection.sql(f"SELECT count(*) FROM {view}").fetchall()[0][0]

    def failed(self) -> list[tuple[str, str]]:
        """(sample_id, its latest error) of the samples with error rows only, by id."""
        return [tuple(row) for row in self.connection.sql("SELECT * FROM failed").fetchall()]

    def _binder_error(self, exc: duckdb.Error, where: str | None) -> ResultsError:
        match = _MISSING_COLUMN.search(str(exc))
        if not match:
            return ResultsError(f"--where {where!r}: {_first_line(exc)}")
        name = match.group(1) or match.group(2)
        if name in RESULTS_SCHEMA.names:
            return ResultsError(
                f"the results under {self.uri} have no column {name!r}: they were written "
                f"before the pipeline computed it. Re-run the pipeline into a new --output to "
                f"get it (re-running into the same --output skips samples already done). "
                f"Metrics these results have: {', '.join(self.metrics) or 'none'}"
            )
        return ResultsError(
            f"no column {name!r} in the results under {self.uri}; columns: "
            f"{', '.join(self.columns)} (`harmonize schema` describes them)"
        )


def _choose_params_set(
    sets: list[tuple[str | None, str | None, int]], params_hash: str | None, uri: str
) -> tuple[str | None, str | None]:
    """(params_hash, its models) among `sets` = (hash, models, ok samples): the one asked for,
    or the only one. Several and none asked is an error listing them: mixing models or
    parameters in one manifest or one table would mislead."""
    if params_hash is not None:
        found = [s for s in sets if s[0] == params_hash]
        if not found:
            present = ", ".join(f"{h} ({m})" for h, m, _ in sets) or "none"
            raise ResultsError(
                f"no ok results with params_hash {params_hash!r} (present: {present})"
            )
        return params_hash, found[0][1]
    if len(sets) > 1:
        listed = "; ".join(f"{h} ({m}, {n} samples)" for h, m, n in sets)
        raise ResultsError(
            f"the results under {uri} hold {len(sets)} parameter sets: {listed}. Pick one with "
            "--params-hash, or point --results at one run's results/{run_id} folder"
        )
    return (sets[0][0], sets[0][1]) if sets else (None, None)


def connect(
    results_uri: str, storage_options: dict[str, Any], params_hash: str | None = None
) -> Results:
    """Open the results under `results_uri` and pick the parameter set `current` holds (the
    one given, or the only one among the ok rows)."""
    uri = results_location(results_uri, storage_options)
    dataset = open_dataset(uri, storage_options)
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
    chosen, models = _choose_params_set(sets, params_hash, uri)

    this_set = "TRUE"
    if has_hash and chosen is not None:
        this_set = f"params_hash = {_quote_string(chosen)}"
    newest = "ORDER BY created_at DESC NULLS LAST" if "created_at" in names else ""
    error = "error" if "error" in names else "NULL"
    connection.execute(
        f"CREATE TEMP VIEW current AS SELECT * FROM results WHERE status = 'ok' AND {this_set} "
        f"QUALIFY row_number() OVER (PARTITION BY sample_id {newest}) = 1"
    )
    connection.execute(
        f"CREATE TEMP VIEW failed AS SELECT sample_id, first(coalesce({error}, 'status error') "
        f"{newest}) AS error FROM results WHERE (status IS NULL OR status <> 'ok') AND "
        f"{this_set} AND sample_id NOT IN (SELECT sample_id FROM current) "
        "GROUP BY sample_id ORDER BY sample_id"
    )
    return Results(uri, dataset, connection, chosen, models)
