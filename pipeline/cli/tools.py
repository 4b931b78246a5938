"""`harmonize evaluate`, `select`, `stats` and `report`: the after-run tools on a results URI.

Enters: a results URI (a run's `--output`, its `results/` folder or one `results/{run_id}/`),
the tool's options, storage options.
Leaves: the tool's output (a table, JSON, a manifest, an HTML page) and its summary printed;
results that cannot be read as asked as one line (exit 2); an evaluation with nothing scored,
or a report with images it could not show, exits 1.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from pipeline.cli.app import app, fail
from pipeline.cli.options import (
    RUN,
    MaxPixelsArg,
    ParamsHashArg,
    ResultsArg,
    WhereArg,
    with_storage_options,
)

JsonArg = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


@app.command("evaluate")
@with_storage_options
def evaluate_command(
    results: ResultsArg,
    as_json: JsonArg = False,
    use_gt_bg: Annotated[
        bool, typer.Option(help="Paste the ground-truth background first (official --use_gt_bg).")
    ] = False,
    composites: Annotated[
        bool, typer.Option(help="Score the composites instead (the unharmonized baseline).")
    ] = False,
    params_hash: ParamsHashArg = None,
    per_image: Annotated[
        str | None, typer.Option(help="Also write per-image metrics to this Parquet URI.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Threads fetching and decoding images.")] = 16,
    max_pixels: MaxPixelsArg = RUN["max_pixels"],
    *,
    storage_options: dict[str, Any],
) -> None:
    """The official iHarmony4 table, recomputed from the images of a run.

    MSE, PSNR, fMSE and bMSE at 256x256 on the uint8 scale, per subset and All (mean over
    images), and by foreground ratio (0-5 %, 5-15 %, 15-100 %).
    """
    from pipeline.results import ResultsError
    from pipeline.tools.evaluate import evaluate

    try:
        evaluation = evaluate(
            results, storage_options, use_gt_bg=use_gt_bg, params_hash=params_hash,
            score="composite" if composites else "output", workers=workers,
            max_pixels=max_pixels,
        )  # fmt: skip
    except ResultsError as exc:
        fail(exc, 2)
    if per_image:
        written = evaluation.write_per_image(per_image, storage_options)
        typer.echo(f"per-image metrics: {written}", err=True)
    typer.echo(evaluation.to_json() if as_json else evaluation.text())
    if evaluation.per_image.num_rows == 0:
        typer.secho("error: no sample could be scored", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command("select")
@with_storage_options
def select_command(
    results: ResultsArg,
    where: Annotated[
        str,
        typer.Option(
            help="SQL condition over the results columns (DuckDB), e.g. "
            '"bg_psnr > 35 AND lab_gap_after < lab_gap_before".'
        ),
    ],
    out: Annotated[str, typer.Option("--out", help="Training manifest Parquet to write.")],
    metric: Annotated[
        list[str], typer.Option(help="Metric to copy as metric_NAME (repeatable; default all).")
    ] = [],  # noqa: B006 (typer reads the default)
    params_hash: ParamsHashArg = None,
    *,
    storage_options: dict[str, Any],
) -> None:
    """Keep the samples whose latest ok result satisfies --where: a training manifest.

    It holds sample_id, image_uri (harmonized) and the same URI as composite_uri (so that
    `harmonize run` reads it back), mask_uri, real_uri, provenance, metric_* columns and the
    original manifest's extra columns.
    """
    from pipeline.results import ResultsError
    from pipeline.tools.selection import select_samples

    try:
        selection = select_samples(results, where, out, storage_options,
                                   metrics=metric or None, params_hash=params_hash)  # fmt: skip
    except ResultsError as exc:
        fail(exc, 2)
    typer.echo(selection.text())
    if selection.selected == 0:
        typer.secho("warning: no sample matched; the manifest is empty", err=True)


@app.command("stats")
@with_storage_options
def stats_command(
    results: ResultsArg,
    where: WhereArg = None,
    params_hash: ParamsHashArg = None,
    as_json: JsonArg = False,
    *,
    storage_options: dict[str, Any],
) -> None:
    """Ok / error counts, per-metric quantiles and, with a subset column, means per subset."""
    from pipeline.results import ResultsError
    from pipeline.tools.stats import stats

    try:
        summary = stats(results, storage_options, params_hash=params_hash, where=where)
    except ResultsError as exc:
        fail(exc, 2)
    typer.echo(summary.to_json() if as_json else summary.text())


@app.command("report")
@with_storage_options
def report_command(
    results: ResultsArg,
    out: Annotated[str, typer.Option("--out", help="HTML file to write (path or URI).")],
    metric: Annotated[
        str | None,
        typer.Option(help="Rank samples by this metric (default psnr, else lab_gap_after)."),
    ] = None,
    count: Annotated[int, typer.Option(help="Samples in each of best / worst / random.")] = 6,
    seed: Annotated[int, typer.Option(help="Seed of the random pick.")] = 0,
    where: WhereArg = None,
    params_hash: ParamsHashArg = None,
    thumbnail_size: Annotated[int, typer.Option(help="Longest thumbnail side in px.")] = 192,
    max_pixels: MaxPixelsArg = RUN["max_pixels"],
    sheet: Annotated[
        int,
        typer.Option(help="Contact sheet: this many samples' composite and harmonized output."),
    ] = 0,
    *,
    storage_options: dict[str, Any],
) -> None:
    """One self-contained HTML page: metric histograms, best / worst / random thumbnails, and
    with --sheet a before/after contact sheet."""
    from pipeline.results import ResultsError
    from pipeline.tools.report import build_report

    try:
        summary = build_report(
            results, out, storage_options, metric=metric, count=count, seed=seed, where=where,
            params_hash=params_hash, thumbnail_size=thumbnail_size, max_pixels=max_pixels,
            sheet=sheet,
        )  # fmt: skip
    except ResultsError as exc:
        fail(exc, 2)
    typer.echo(summary.text())
    if summary.failed:  # the page is written, but it is missing pictures: say so, exit 1
        typer.secho(
            f"error: {len(summary.failed)} of {summary.images} images could not be shown in "
            f"{summary.out} (listed above as 'thumbnail failed')",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)
