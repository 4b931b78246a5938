"""A self-contained HTML report of a results dataset: metric histograms and sample galleries.

Enters: a results URI (as `harmonize stats` takes it), storage options, the metric to rank
samples by, how many samples per gallery, an optional SQL condition.
Leaves: one HTML page written atomically to any URI, and a `ReportSummary`. The page holds
the run's counts and per-metric quantiles, a histogram of each metric (inline SVG), where
there is ground truth a scatter of composite MSE against output MSE (points above the
diagonal got worse), and composite / harmonized / mask (/ real) thumbnails with the
difference |harmonized - composite| amplified (JPEG as base64 data URIs) of the best, the
worst and a random sample by the ranking metric.

Nothing is loaded from elsewhere: a Content-Security-Policy allows only data: images,
inline styles and the one inline script (by its hash). That script records on <body> how
many images loaded and how many failed (`data-images-loaded`, `data-images-broken`), which
the browser test reads back. Aggregates and picks are computed by DuckDB over the results
(`pipeline.results`, `pipeline.tools.stats`); only the picked samples' images are fetched.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from PIL import Image

from pipeline.config import DEFAULT_MAX_PIXELS
from pipeline.decode import decode_mask, decode_rgb
from pipeline.results import Results, ResultsError, connect, quote_identifier
from pipeline.storage import absolute, read_bytes, write_atomic
from pipeline.tools.stats import QUANTILE_LABELS, Stats, compute_stats, format_number
from schemas.results import METRIC_BETTER

# The ranking metric when none is asked: ground truth first, then the harmony proxy.
DEFAULT_RANKING = ("psnr", "lab_gap_after", "bg_psnr", "fg_change")
BINS = 30
IMAGE_KINDS = (
    ("composite_uri", "composite"), ("output_uri", "harmonized"), ("mask_uri", "mask"),
    ("real_uri", "real"),
)  # fmt: skip

_SCRIPT = (
    'window.addEventListener("load",function(){var n=0,b=0,i,m=document.images;'
    "for(i=0;i<m.length;i++){if(m[i].complete&&m[i].naturalWidth>0)n++;else b++;}"
    'var d=document.body;d.setAttribute("data-images-loaded",n);'
    'd.setAttribute("data-images-broken",b);d.setAttribute("data-images-total",m.length);});'
)
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{_SCRIPT_HASH}'"
)
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px}h3{font-size:15px}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd}
th:first-child,td:first-child{text-align:left}
.hists{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:16px}
.hist{border:1px solid #ddd;padding:8px}.hist svg{display:block}
.sample{border:1px solid #ddd;margin:8px 0;padding:8px}
.thumbs{display:flex;gap:8px;flex-wrap:wrap}figure{margin:0}
figcaption{font-size:12px;color:#555}.meta{font-size:13px;margin-bottom:4px}
.missing{width:160px;height:120px;background:#fee;color:#a00;font-size:12px;padding:4px;
overflow:hidden}.note{color:#555}code{background:#f4f4f4;padding:0 3px}
"""


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


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


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


DIFFERENCE_GAIN = 4  # |output - composite| x 4: a change of 16 grey levels shows as 64


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


def _scatter_svg(points: list[tuple[float, float]]) -> str:
    """Composite MSE (x) against output MSE (y), both on log10(1 + MSE) axes: a point above
    the diagonal got further from the ground truth than its composite was."""
    import math

    size, pad = 300, 30
    top = max([math.log10(1 + max(x, y)) for x, y in points] + [1.0])

    def at(value: float) -> float:
        return pad + (size - 2 * pad) * math.log10(1 + value) / top

    dots = []
    for x, y in points:
        colour = "#c0392b" if y >= x else "#27ae60"
        dots.append(
            f'<circle cx="{at(x):.1f}" cy="{size - at(y):.1f}" r="3" fill="{colour}" '
            f'fill-opacity="0.7"><title>composite {format_number(x)}, output '
            f"{format_number(y)}</title></circle>"
        )
    far = at(10**top - 1)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" role="img" '
        f'aria-label="composite MSE against output MSE" data-points="{len(points)}">'
        f'<line x1="{pad}" y1="{size - pad}" x2="{far:.1f}" y2="{size - far:.1f}" '
        f'stroke="#999" stroke-dasharray="4 3"/>'
        f'<line x1="{pad}" y1="{size - pad}" x2="{size - pad}" y2="{size - pad}" stroke="#999"/>'
        f'<line x1="{pad}" y1="{size - pad}" x2="{pad}" y2="{pad}" stroke="#999"/>'
        f"{''.join(dots)}"
        f'<text x="{size - pad}" y="{size - 8}" font-size="11" text-anchor="end">composite MSE'
        f'</text><text x="4" y="{pad - 8}" font-size="11">output MSE (log scale)</text></svg>'
    )


def _scatter_html(results: Results, where: str | None, limit: int = 5000) -> str:
    if not {"mse", "composite_mse"} <= set(results.columns):
        return ""
    rows = results.query(
        "SELECT composite_mse, mse FROM current WHERE mse IS NOT NULL AND composite_mse IS NOT "
        f"NULL AND {{where}} ORDER BY md5(sample_id) LIMIT {limit}",
        where,
    ).to_pylist()
    if not rows:
        return ""
    points = [(r["composite_mse"], r["mse"]) for r in rows]
    worse = sum(1 for x, y in points if y >= x)
    return (
        "<h2>Against the ground truth</h2>"
        f'<div class="hist">{_scatter_svg(points)}<div class="note">{len(points)} samples'
        f"{' (a sample of them)' if len(points) == limit else ''}: {len(points) - worse} "
        f"closer to the ground truth than their composite (green, below the diagonal), "
        f"{worse} further or equal (red, above it)</div></div>"
    )


def _histogram_svg(name: str, h: dict[str, Any]) -> str:
    width, height, bottom = 300, 110, 18
    counts = h["counts"]
    top = max(counts) or 1
    bar = width / BINS
    step = (h["high"] - h["low"]) / BINS if h["finite"] else 0.0
    rects = []
    for i, count in enumerate(counts):
        if not count:
            continue
        bar_height = max(1.0, (height - bottom) * count / top)
        low = h["low"] + i * step
        label = (
            f"[{format_number(low)}, {format_number(low + step)}): {count}" if step else f"{count}"
        )
        rects.append(
            f'<rect x="{i * bar:.1f}" y="{height - bottom - bar_height:.1f}" '
            f'width="{bar - 1:.1f}" height="{bar_height:.1f}" fill="#4a7bb7">'
            f"<title>{_esc(label)}</title></rect>"
        )
    axis = (
        f'<text x="0" y="{height - 4}" font-size="11">{_esc(format_number(h["low"]))}</text>'
        f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">'
        f"{_esc(format_number(h['high']))}</text>"
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="histogram of {_esc(name)}">'
        f'<line x1="0" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" '
        f'stroke="#999"/>{"".join(rects)}{axis}</svg>'
    )


def _histograms_html(histograms: dict[str, dict[str, Any]], stats: Stats) -> str:
    figures = []
    for name, h in histograms.items():
        if not h["finite"] and not h["infinite"]:
            continue
        m = stats.metrics[name]
        notes = [f"n={h['finite']}"]
        if h["infinite"]:
            notes.append(f"{h['infinite']} infinite (not drawn)")
        if h["null"]:
            notes.append(f"{h['null']} null")
        notes.append(
            f"mean {format_number(m['mean'])}, median {format_number(m['quantiles']['0.5'])}"
        )
        better = METRIC_BETTER[name]
        direction = "no better direction" if better == "none" else f"{better} is better"
        figures.append(
            f'<div class="hist" data-metric="{_esc(name)}"><b>{_esc(name)}</b> '
            f'<span class="note">({_esc(direction)})</span>{_histogram_svg(name, h)}'
            f'<div class="note">{_esc("; ".join(notes))}</div></div>'
        )
    if not figures:
        return '<p class="note">No metric has a value in these results.</p>'
    return f'<div class="hists">{"".join(figures)}</div>'


def _stats_html(stats: Stats) -> str:
    columns = ["metric", "better", "n", "mean", "min", *QUANTILE_LABELS, "max"]
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    rows = []
    for name, m in stats.metrics.items():
        values = [m["mean"], m["min"], *m["quantiles"].values(), m["max"]]
        cells = "".join(f"<td>{_esc(format_number(v))}</td>" for v in values)
        rows.append(
            f"<tr><td>{_esc(name)}</td><td>{_esc(m['better'])}</td><td>{m['count']}</td>"
            f"{cells}</tr>"
        )
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _sample_html(
    row: dict[str, Any],
    images: dict[str, str | None],
    errors: dict[str, str],
    metric: str | None,
    metrics: list[str],
) -> str:
    shown = [metric] if metric else []
    shown += [m for m in ("psnr", "bg_psnr", "lab_gap_after", "sharpness_ratio") if m != metric]
    values = ", ".join(
        f"{m} {format_number(row[m])}" for m in shown if m in metrics and row.get(m) is not None
    )
    figures = []
    for column, kind in (*IMAGE_KINDS, ("output_uri", "difference")):
        if not row.get(column):
            continue
        if images.get(kind):
            content = f'<img src="{images[kind]}" alt="{_esc(kind)} of {_esc(row["sample_id"])}">'
        else:
            content = f'<div class="missing">{_esc(kind)} not shown: {_esc(errors[kind])}</div>'
        caption = kind if kind != "difference" else f"|harmonized - composite| x {DIFFERENCE_GAIN}"
        figures.append(f"<figure>{content}<figcaption>{_esc(caption)}</figcaption></figure>")
    subset = f" ({_esc(row['subset'])})" if row.get("subset") else ""
    return (
        f'<div class="sample" data-sample-id="{_esc(row["sample_id"])}"><div class="meta">'
        f"<b>{_esc(row['sample_id'])}</b>{subset}: {_esc(values)}</div>"
        f'<div class="thumbs">{"".join(figures)}</div></div>'
    )


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

    # Fetch each picked sample's images once (a sample can be in several sections).
    wanted: dict[tuple[str, str], str] = {}
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
        body.append(f"<h3>{_esc(title)}</h3>")
        if not rows:
            body.append('<p class="note">No sample.</p>')
        for row in rows:
            sid = row["sample_id"]
            kinds = [kind for c, kind in IMAGE_KINDS if row.get(c)]
            kinds += ["difference"] if row.get("output_uri") else []
            images = {kind: loaded[(sid, kind)][0] for kind in kinds}
            errors = {kind: loaded[(sid, kind)][1] or "" for kind in kinds}
            body.append(_sample_html(row, images, errors, metric, results.metrics))

    ranking = ""
    if metric is not None:
        better = METRIC_BETTER[metric]
        direction = "no better direction" if better == "none" else f"{better} is better"
        ranking = f" by <code>{_esc(metric)}</code> ({_esc(direction)})"
    absent = (
        f'<p class="note">Not in these results (written before they existed): '
        f"{_esc(', '.join(stats.absent))}</p>"
        if stats.absent
        else ""
    )
    condition = f"; where <code>{_esc(where)}</code>" if where else ""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    ran_on = ", ".join(f"{d} ({n})" for d, n in stats.devices.items()) or "not recorded"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_esc(_CSP)}">
<title>Harmonization report: {_esc(results.uri)}</title>
<style>{_STYLE}</style>
<script>{_SCRIPT}</script>
</head><body>
<h1>Harmonization report</h1>
<p>results <code>{_esc(results.uri)}</code>; model {_esc(results.model)}; params_hash
<code>{_esc(results.params_hash)}</code>{condition};
generated {now}</p>
<p>rows {stats.rows} (ok {stats.ok_rows}, error {stats.error_rows}); samples with an ok result
{stats.ok_samples}, with errors only {stats.failed_samples}; in this report {stats.samples}</p>
<p>ran on: {_esc(ran_on)}</p>
<h2>Metrics</h2>
{_stats_html(stats)}
{absent}
{_histograms_html(histograms, stats)}
{_scatter_html(results, where)}
<h2>Samples{ranking}</h2>
{"".join(body)}
</body></html>
"""
    data = page.encode()
    out = absolute(out)
    write_atomic(out, data, options)
    return ReportSummary(
        out, metric, stats.samples, page.count("<img "), len(wanted), failed, len(data)
    )
