"""`harmonize stats`: counts, per-metric quantiles and per-subset means of a results dataset.

Enters: a results URI (as `pipeline.results.connect` takes it), storage options, an optional SQL
condition, which parameter set.
Leaves: `Stats`: ok / error counts, per-metric quantiles over each sample's current row,
per-subset means (as the official table prints them, "All" over every image), where the model
ran, how many rows each direction made (inverse runs: generated composites, their real images
and variants per real), and how the reference-free `QUALITY_FILTER` agrees with the ground
truth; as text or JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.results import Results, connect, quote_identifier
from schemas.results import METRIC_BETTER

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
QUANTILE_LABELS = tuple("median" if q == 0.5 else f"{q:.0%}" for q in QUANTILES)
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
    failed_samples: int  # samples of this parameter set with error rows and no ok row
    metrics: dict[str, dict[str, Any]]  # name -> count, mean, min, quantiles, max, better
    absent: list[str]  # metric columns these results predate
    subsets: list[dict[str, Any]] = field(default_factory=list)  # subset, images, means
    # Where the model ran, over `current`: 'cuda:<GPU name>' / 'cpu' / 'unknown' (older results).
    devices: dict[str, int] = field(default_factory=dict)
    # QUALITY_FILTER against the ground truth (output MSE below the composite's), over the
    # samples with ground truth: kept_better, kept_worse, rejected_better, rejected_worse.
    quality_filter: dict[str, int] = field(default_factory=dict)
    # Over `current`: 'forward' / 'inverse' -> rows; inverse rows' source samples and the
    # variants per source (min, max).
    directions: dict[str, int] = field(default_factory=dict)
    sources: int = 0
    variants_per_source: tuple[int, int] | None = None

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
                "directions": self.directions,
                "sources": self.sources,
                "variants_per_source": list(self.variants_per_source)
                if self.variants_per_source
                else None,
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
        if self.directions.get("inverse"):
            low, high = self.variants_per_source or (0, 0)
            per = f"{low}" if low == high else f"{low} to {high}"
            lines.append(
                f"inverse harmonization: {self.directions['inverse']} generated composites "
                f"from {self.sources} real images ({per} variants each); metrics compare each "
                "with its real image"
            )
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
        "(SELECT count(*) FROM failed), (SELECT count(*) FROM current) FROM results"
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
    directions: dict[str, int] = {}
    sources, per_source = 0, None
    if "direction" in results.columns:
        for direction, n in results.connection.sql(
            "SELECT coalesce(direction, 'forward'), count(*) FROM current GROUP BY ALL ORDER BY 1"
        ).fetchall():
            directions[direction] = n
    if directions.get("inverse") and "source_sample_id" in results.columns:
        sources, low, high = results.connection.sql(
            "SELECT count(*), min(n), max(n) FROM (SELECT source_sample_id, count(*) AS n "
            "FROM current WHERE source_sample_id IS NOT NULL GROUP BY ALL)"
        ).fetchall()[0]
        per_source = (low, high)
    return Stats(
        results_uri=results.uri, params_hash=results.params_hash, model=results.model,
        where=where, rows=counts[0], ok_rows=counts[1], error_rows=counts[2],
        ok_samples=counts[4], samples=values[0], failed_samples=counts[3], metrics=metrics,
        absent=results.absent_metrics, subsets=subsets, devices=devices,
        quality_filter=quality, directions=directions, sources=sources,
        variants_per_source=per_source,
    )  # fmt: skip
