"""A self-contained HTML report of a results dataset: metric histograms and sample galleries.

Enters: a results URI (as `harmonize stats` takes it), storage options, the metric to rank
samples by, how many samples per gallery, an optional SQL condition.
Leaves: one HTML page written atomically to any URI, and a `ReportSummary`. The page holds
the run's counts and per-metric quantiles, a histogram of each metric (inline SVG), where
there is ground truth a scatter of composite MSE against output MSE (points above the
diagonal got worse), and composite / harmonized / mask (/ real) thumbnails with the
difference |harmonized - composite| amplified (JPEG as base64 data URIs) of the best, the
worst and a random sample by the ranking metric; with `sheet`, a contact sheet: the first
`sheet` samples by id, each composite next to its harmonized output.

This module gathers what the page shows: aggregates and picks computed by DuckDB over the
results (`pipeline.results`, `pipeline.tools.stats`), and the thumbnails of the picked samples
only; `report_page.py` renders the page (self-contained: nothing is loaded from elsewhere).
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pipeline.config import DEFAULT_MAX_PIXELS
from pipeline.decode import decode_mask, decode_rgb
from pipeline.results import Results, ResultsError, connect, quote_identifier
from pipeline.storage import absolute, read_bytes, write_atomic
from pipeline.tools import report_page
from pipeline.tools.report_page import BINS, DIFFERENCE_GAIN, IMAGE_KINDS
from pipeline.tools.stats import compute_stats
from schemas.results import METRIC_BETTER

# The ranking metric when none is asked: ground truth first, then the harmony proxy.
DEFAULT_RANKING = ("psnr", "lab_gap_after", "bg_psnr", "fg_change")
SCATTER_LIMIT = 5000  # points of the composite-vs-output MSE scatter (a sample of them beyond)


@dataclass
class ReportSummary:
    out: str
    metric: str | None
    samples: int  # samples in the report's population
    thumbnails: int  # <img> elements in the page (a sample in two sections counts twice)
    images: int = 0  # distinct images the page shows (sample, kind)
    failed: list[str] = field(default_factory=list)  # "sample_id kind: reason"
    size: int = 0  # bytes of the page

    def text(self) -> str:
        lines = [
            f"report: {self.out} ({self.size / 1e6:.1f} MB): {self.samples} samples, "
            f"ranked by {self.metric or '(no metric)'}, {self.thumbnails} thumbnails"
        ]
        lines += [f"thumbnail failed: {message}" for message in self.failed]
        return "\n".join(lines)


# --- data -----------------------------------------------------------------------------------


def _histograms(results: Results, where: str | None) -> dict[str, dict[str, Any]]:
    """Per metric: finite range, BINS counts, and how many values are null or infinite."""
    names = results.metrics
    if not names:
        return {}
    parts = []
    for name in names:
        q = quote_identifier(name)
        parts += [
            f"min({q}) FILTER (WHERE isfinite({q}))", f"max({q}) FILTER (WHERE isfinite({q}))",
            f"count({q}) FILTER (WHERE isfinite({q}))", f"count(*) FILTER (WHERE isinf({q}))",
            f"count(*) FILTER (WHERE {q} IS NULL)",
        ]  # fmt: skip
    row = results.query(f"SELECT {', '.join(parts)} FROM current WHERE {{where}}", where)
    values = [row.column(i)[0].as_py() for i in range(row.num_columns)]
    ranges = {}
    for i, name in enumerate(names):
        low, high, finite, infinite, null = values[5 * i : 5 * i + 5]
        ranges[name] = {"low": low, "high": high, "finite": finite, "infinite": infinite,
                        "null": null, "counts": [0] * BINS}  # fmt: skip
    bucketed = []
    for name, r in ranges.items():
        if not r["finite"]:
            continue
        q = quote_identifier(name)
        width = (r["high"] - r["low"]) / BINS or 1.0  # all equal: everything in the first bin
        bucket = f"least(CAST(floor(({q} - {r['low']!r}) / {width!r}) AS INTEGER), {BINS - 1})"
        bucketed.append((name, f"histogram({bucket}) FILTER (WHERE isfinite({q}))"))
    if bucketed:
        row = results.query(
            f"SELECT {', '.join(sql for _, sql in bucketed)} FROM current WHERE {{where}}", where
        )
        for i, (name, _) in enumerate(bucketed):
            for bucket, count in row.column(i)[0].as_py() or []:
                ranges[name]["counts"][max(0, min(BINS - 1, int(bucket)))] += count
    return ranges


def _order(metric: str, best: bool) -> str:
    """ORDER BY for the best (or worst) first, by the metric's better direction."""
    q = quote_identifier(metric)
    better = METRIC_BETTER[metric]
    if better == "closer to 1":
        key, ascending = f"abs(ln(greatest({q}, 1e-12)))", True
    elif better == "closer to 0":
        key, ascending = f"abs({q})", True
    else:
        key, ascending = q, better == "lower"  # "none": the highest first, as "best"
    if not best:
        ascending = not ascending
    return f"{key} {'ASC' if ascending else 'DESC'} NULLS LAST, sample_id"


def _picks(
    results: Results, metric: str | None, count: int, seed: int, where: str | None
) -> list[tuple[str, list[dict[str, Any]]]]:
    """(title, rows) for the best, the worst and a random sample."""
    names = [c for c, _ in IMAGE_KINDS if c in results.columns] + ["sample_id"]
    names += [c for c in ("subset",) if c in results.columns] + results.metrics
    columns = ", ".join(quote_identifier(c) for c in names)
    base = f"SELECT {columns} FROM current WHERE {{where}}"
    sections = []
    if metric is not None:
        q = quote_identifier(metric)
        better = METRIC_BETTER[metric]
        high, low = ("best", "worst") if better != "none" else ("highest", "lowest")
        for title, first in ((high, True), (low, False)):
            sql = f"{base} AND {q} IS NOT NULL ORDER BY {_order(metric, first)} LIMIT {count}"
            sections.append((f"{title.capitalize()} {count} by {metric}", sql))
    # A stable pseudo-random order: the same seed picks the same samples.
    random_sql = f"{base} ORDER BY md5(sample_id || ':{int(seed)}'), sample_id LIMIT {count}"
    sections.append((f"Random {count} (seed {seed})", random_sql))
    return [(title, results.query(sql, where).to_pylist()) for title, sql in sections]


def _scatter_points(results: Results, where: str | None, limit: int) -> list[tuple[float, float]]:
    """(composite MSE, output MSE) of at most `limit` samples with ground truth."""
    if not {"mse", "composite_mse"} <= set(results.columns):
        return []
    rows = results.query(
        "SELECT composite_mse, mse FROM current WHERE mse IS NOT NULL AND composite_mse IS NOT "
        f"NULL AND {{where}} ORDER BY md5(sample_id) LIMIT {limit}",
        where,
    ).to_pylist()
    return [(r["composite_mse"], r["mse"]) for r in rows]


def thumbnail(
    data: bytes, size: int, mask: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
) -> str:
    """Encoded image -> a JPEG data URI at most `size` px a side (decoded as the pipeline does,
    with its pixel limit)."""
    draft = (size * 2, size * 2)  # JPEG: decode at a reduced scale, much faster
    if mask:
        picture = Image.fromarray(decode_mask(data, "mask", max_pixels, draft) * 255)
    else:
        picture = Image.fromarray(decode_rgb(data, "image", max_pixels, draft))
    picture.thumbnail((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def difference_thumbnail(
    composite: bytes, output: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> str:
    """|output - composite| x DIFFERENCE_GAIN as a JPEG data URI: what the model changed (the
    output resized to the composite's size when `--output-size model` made it square)."""
    import numpy as np

    before, after = (
        Image.fromarray(decode_rgb(data, what, max_pixels))
        for data, what in ((composite, "composite"), (output, "output"))
    )
    if after.size != before.size:
        after = after.resize(before.size, Image.Resampling.BILINEAR)
    change = np.abs(np.asarray(after, np.int16) - np.asarray(before, np.int16))
    picture = Image.fromarray(np.clip(change * DIFFERENCE_GAIN, 0, 255).astype(np.uint8))
    picture.thumbnail((size, size), Image.Resampling.BOX)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


# --- HTML -----------------------------------------------------------------------------------


def build_report(
    results_uri: str,
    out: str,
    storage_options: dict[str, Any] | None = None,
    *,
    metric: str | None = None,
    count: int = 6,
    seed: int = 0,
    params_hash: str | None = None,
    where: str | None = None,
    thumbnail_size: int = 192,
    workers: int = 16,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    sheet: int = 0,
) -> ReportSummary:
    """Write the report page to `out`; see the top of the file. Images over `max_pixels` are
    refused from their header and shown as a red box naming the cause."""
    options = storage_options or {}
    results = connect(results_uri, options, params_hash)
    stats = compute_stats(results, where)
    if metric is not None and metric not in results.metrics:
        if metric in METRIC_BETTER:
            raise ResultsError(
                f"the results under {results.uri} predate metric {metric!r}; re-run the "
                f"pipeline into a new --output to compute it, or rank by one of "
                f"{', '.join(results.metrics)}"
            )
        raise ResultsError(f"unknown metric {metric!r}; metrics: {', '.join(results.metrics)}")
    if metric is None:  # the first default that has values here
        metric = next((m for m in DEFAULT_RANKING if stats.metrics.get(m, {}).get("count")), None)
    histograms = _histograms(results, where)
    sections = _picks(results, metric, max(1, count), seed, where)
    sheet_rows = []
    if sheet > 0:
        ranked = f", {quote_identifier(metric)}" if metric else ""
        sheet_rows = results.query(
            f"SELECT sample_id, composite_uri, output_uri{ranked} FROM current WHERE {{where}} "
            f"ORDER BY sample_id LIMIT {int(sheet)}",
            where,
        ).to_pylist()

    # Fetch each picked sample's images once (a sample can be in several sections).
    wanted: dict[tuple[str, str], str] = {}
    for row in sheet_rows:
        wanted[(row["sample_id"], "composite")] = row["composite_uri"]
        wanted[(row["sample_id"], "harmonized")] = row["output_uri"]
    for _, rows in sections:
        for row in rows:
            for column, kind in IMAGE_KINDS:
                if row.get(column):
                    wanted[(row["sample_id"], kind)] = row[column]

    def load(key: tuple[str, str]) -> tuple[str | None, str | None, bytes | None]:
        try:
            data = read_bytes(wanted[key], options)
            picture = thumbnail(data, thumbnail_size, key[1] == "mask", max_pixels)
            return picture, None, data
        except Exception as exc:  # shown in the page and the summary; the report goes on
            return None, f"{type(exc).__name__}: {exc}", None

    def difference(sid: str) -> tuple[str | None, str | None]:
        before, after = loaded.get((sid, "composite")), loaded.get((sid, "harmonized"))
        if not (before and after and before[2] and after[2]):
            return None, "composite or harmonized image not loaded"
        try:
            return difference_thumbnail(before[2], after[2], thumbnail_size, max_pixels), None
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        loaded = dict(zip(wanted, pool.map(load, list(wanted))))
        sids = sorted({sid for sid, kind in wanted if kind == "harmonized"})
        for sid, result in zip(sids, pool.map(difference, sids)):
            loaded[(sid, "difference")] = (*result, None)

    failed = [
        f"{sid} {kind}: {error}"
        for (sid, kind), (_, error, _) in loaded.items()
        if error and kind != "difference"  # follows from its two images
    ]
    body = []
    for title, rows in sections:
        body.append(f"<h3>{report_page.esc(title)}</h3>")
        if not rows:
            body.append('<p class="note">No sample.</p>')
        for row in rows:
            sid = row["sample_id"]
            kinds = [kind for c, kind in IMAGE_KINDS if row.get(c)]
            kinds += ["difference"] if row.get("output_uri") else []
            images = {kind: loaded[(sid, kind)][0] for kind in kinds}
            errors = {kind: loaded[(sid, kind)][1] or "" for kind in kinds}
            body.append(report_page.sample_html(row, images, errors, metric, results.metrics))

    sheet_html = ""
    if sheet_rows:
        sheet_html = report_page.sheet_html(sheet_rows, loaded, metric, stats.samples)
    page = report_page.render(
        results_uri=results.uri, model=results.model, params_hash=results.params_hash,
        where=where, stats=stats, histograms=histograms,
        points=_scatter_points(results, where, SCATTER_LIMIT), point_limit=SCATTER_LIMIT,
        metric=metric, body=body, sheet=sheet_html,
    )  # fmt: skip
    data = page.encode()
    out = absolute(out)
    write_atomic(out, data, options)
    return ReportSummary(
        out, metric, stats.samples, page.count("<img "), len(wanted), failed, len(data)
    )
