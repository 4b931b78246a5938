"""The report's page: HTML and inline SVG, from what `report.py` gathered.

Enters: the results' identity and counts (`Stats`), per-metric histograms, the composite-vs-
output MSE points, the picked samples with their thumbnails (JPEG data URIs) or why not.
Leaves: one self-contained HTML page as a string. Nothing is loaded from elsewhere: a
Content-Security-Policy allows only data: images, inline styles and the one inline script (by
its hash). That script records on <body> how many images loaded and how many failed
(`data-images-loaded`, `data-images-broken`), which the browser test reads back.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
from datetime import datetime, timezone
from typing import Any

from pipeline.tools.stats import QUANTILE_LABELS, Stats, format_number
from schemas.results import METRIC_BETTER

BINS = 30  # histogram bars
IMAGE_KINDS = (
    ("composite_uri", "composite"), ("output_uri", "harmonized"), ("mask_uri", "mask"),
    ("real_uri", "real"),
)  # fmt: skip
DIFFERENCE_GAIN = 4  # |output - composite| x 4: a change of 16 grey levels shows as 64

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
.sheet{display:flex;flex-wrap:wrap;gap:8px}.pair img{display:inline-block;margin-right:2px}
.missing{width:160px;height:120px;background:#fee;color:#a00;font-size:12px;padding:4px;
overflow:hidden}.note{color:#555}code{background:#f4f4f4;padding:0 3px}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def direction(metric: str) -> str:
    """Which way `metric` is better, as the page says it."""
    better = METRIC_BETTER[metric]
    return "no better direction" if better == "none" else f"{better} is better"


def _scatter_svg(points: list[tuple[float, float]]) -> str:
    """Composite MSE (x) against output MSE (y), both on log10(1 + MSE) axes: a point above
    the diagonal got further from the ground truth than its composite was."""

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


def scatter_html(points: list[tuple[float, float]], limit: int) -> str:
    """The ground-truth section: (composite MSE, output MSE) points, at most `limit` of them."""
    if not points:
        return ""
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
            f"<title>{esc(label)}</title></rect>"
        )
    axis = (
        f'<text x="0" y="{height - 4}" font-size="11">{esc(format_number(h["low"]))}</text>'
        f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">'
        f"{esc(format_number(h['high']))}</text>"
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="histogram of {esc(name)}">'
        f'<line x1="0" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" '
        f'stroke="#999"/>{"".join(rects)}{axis}</svg>'
    )


def histograms_html(histograms: dict[str, dict[str, Any]], stats: Stats) -> str:
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
        figures.append(
            f'<div class="hist" data-metric="{esc(name)}"><b>{esc(name)}</b> '
            f'<span class="note">({esc(direction(name))})</span>{_histogram_svg(name, h)}'
            f'<div class="note">{esc("; ".join(notes))}</div></div>'
        )
    if not figures:
        return '<p class="note">No metric has a value in these results.</p>'
    return f'<div class="hists">{"".join(figures)}</div>'


def stats_html(stats: Stats) -> str:
    columns = ["metric", "better", "n", "mean", "min", *QUANTILE_LABELS, "max"]
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    rows = []
    for name, m in stats.metrics.items():
        values = [m["mean"], m["min"], *m["quantiles"].values(), m["max"]]
        cells = "".join(f"<td>{esc(format_number(v))}</td>" for v in values)
        rows.append(
            f"<tr><td>{esc(name)}</td><td>{esc(m['better'])}</td><td>{m['count']}</td>{cells}</tr>"
        )
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def sample_html(
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
            content = f'<img src="{images[kind]}" alt="{esc(kind)} of {esc(row["sample_id"])}">'
        else:
            content = f'<div class="missing">{esc(kind)} not shown: {esc(errors[kind])}</div>'
        caption = kind if kind != "difference" else f"|harmonized - composite| x {DIFFERENCE_GAIN}"
        figures.append(f"<figure>{content}<figcaption>{esc(caption)}</figcaption></figure>")
    subset = f" ({esc(row['subset'])})" if row.get("subset") else ""
    return (
        f'<div class="sample" data-sample-id="{esc(row["sample_id"])}"><div class="meta">'
        f"<b>{esc(row['sample_id'])}</b>{subset}: {esc(values)}</div>"
        f'<div class="thumbs">{"".join(figures)}</div></div>'
    )


def sheet_html(
    rows: list[dict[str, Any]],
    loaded: dict[tuple[str, str], tuple],
    metric: str | None,
    samples: int,
) -> str:
    """The contact sheet: per sample, its composite and its harmonized output side by side."""
    cells = []
    for row in rows:
        sid = row["sample_id"]
        pictures = []
        for kind in ("composite", "harmonized"):
            image, error, _ = loaded[(sid, kind)]
            pictures.append(
                f'<img src="{image}" alt="{kind} of {esc(sid)}">'
                if image
                else f'<div class="missing">{kind} not shown: {esc(error)}</div>'
            )
        value = row.get(metric) if metric else None
        caption = esc(sid) + (
            f": {esc(metric)} {esc(format_number(value))}" if value is not None else ""
        )
        cells.append(
            f'<figure class="pair" data-pair-id="{esc(sid)}">{"".join(pictures)}'
            f"<figcaption>{caption} (composite, harmonized)</figcaption></figure>"
        )
    return (
        f'<h2>Before / after</h2><p class="note">{len(rows)} of {samples} samples, by '
        f'sample_id</p><div class="sheet">{"".join(cells)}</div>'
    )


def render(
    *,
    results_uri: str,
    model: str | None,
    params_hash: str | None,
    where: str | None,
    stats: Stats,
    histograms: dict[str, dict[str, Any]],
    points: list[tuple[float, float]],
    point_limit: int,
    metric: str | None,
    body: list[str],
    sheet: str = "",
) -> str:
    """The whole page; `body` holds each section's title and samples, `sheet` the contact
    sheet (or nothing), already rendered."""
    ranking = ""
    if metric is not None:
        ranking = f" by <code>{esc(metric)}</code> ({esc(direction(metric))})"
    absent = (
        f'<p class="note">Not in these results (written before they existed): '
        f"{esc(', '.join(stats.absent))}</p>"
        if stats.absent
        else ""
    )
    condition = f"; where <code>{esc(where)}</code>" if where else ""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    ran_on = ", ".join(f"{d} ({n})" for d, n in stats.devices.items()) or "not recorded"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{esc(_CSP)}">
<title>Harmonization report: {esc(results_uri)}</title>
<style>{_STYLE}</style>
<script>{_SCRIPT}</script>
</head><body>
<h1>Harmonization report</h1>
<p>results <code>{esc(results_uri)}</code>; model {esc(model)}; params_hash
<code>{esc(params_hash)}</code>{condition};
generated {now}</p>
<p>rows {stats.rows} (ok {stats.ok_rows}, error {stats.error_rows}); samples with an ok result
{stats.ok_samples}, with errors only {stats.failed_samples}; in this report {stats.samples}</p>
<p>ran on: {esc(ran_on)}</p>
<h2>Metrics</h2>
{stats_html(stats)}
{absent}
{histograms_html(histograms, stats)}
{scatter_html(points, point_limit)}
{sheet}
<h2>Samples{ranking}</h2>
{"".join(body)}
</body></html>
"""
    return page
