"""`harmonize compose` and `export`: the two ends of the copy-paste recipe.

Enters: an objects manifest (Parquet, or a COCO instances JSON) and a backgrounds manifest,
the placement rules and a seed (compose); a results URI of a run on compose's manifest and a
SQL condition (export).
Leaves: compose's summary (composites, masks, instance masks and a manifest `harmonize run`
reads, written under --output); a COCO instances JSON and its summary (export), exit 1 when
samples had to be left out; a job that cannot start, or whose storage fails, as one line.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer

from pipeline.cli.app import app, fail
from pipeline.cli.job import run_job
from pipeline.cli.options import (
    RUN,
    MaxPixelsArg,
    NumCpusArg,
    ParamsHashArg,
    ProgressArg,
    RayAddressArg,
    ResultsArg,
    RunIdArg,
    VerboseArg,
    with_storage_options,
)
from pipeline.compose.layout import LayoutRules

RULES = LayoutRules()  # the defaults of the placement options


@app.command("compose")
@with_storage_options
def compose_command(
    objects: Annotated[
        str,
        typer.Option(
            help="Objects manifest (Parquet: object_id, image_uri, mask_uri or segmentation, "
            "category) or a COCO instances JSON."
        ),
    ],
    backgrounds: Annotated[
        str, typer.Option(help="Backgrounds manifest (Parquet: background_id, image_uri).")
    ],
    output: Annotated[
        str,
        typer.Option(
            "--output", "-o", help="Output prefix: composites/, masks/, instances/, manifest/."
        ),
    ],
    per_background: Annotated[
        int, typer.Option(help="Composites made from each background.")
    ] = RULES.per_background,
    min_objects: Annotated[
        int, typer.Option(help="Fewest objects pasted per composite.")
    ] = RULES.min_objects,
    max_objects: Annotated[
        int, typer.Option(help="Most objects pasted per composite.")
    ] = RULES.max_objects,
    scale: Annotated[
        tuple[float, float],
        typer.Option(help="Pasted height / background height: MIN MAX (uniform)."),
    ] = RULES.scale,
    position: Annotated[
        str, typer.Option(help="uniform, or ground (bottom edges below --horizon).")
    ] = RULES.position,
    horizon: Annotated[
        float, typer.Option(help="--position ground: bottoms lie below this fraction of height.")
    ] = RULES.horizon,
    keep_inside: Annotated[
        bool,
        typer.Option(
            "--keep-inside/--no-keep-inside",
            help="Objects stay wholly inside (else centred anywhere, cut by the border).",
        ),
    ] = RULES.keep_inside,
    max_overlap: Annotated[
        float, typer.Option(help="Largest fraction of a pasted object that later ones may hide.")
    ] = RULES.max_overlap,
    flip: Annotated[float, typer.Option(help="Probability of a horizontal flip.")] = RULES.flip,
    attempts: Annotated[
        int, typer.Option(help="Positions tried per object before it is left out.")
    ] = RULES.attempts,
    seed: Annotated[int, typer.Option(help="Run seed; each composite's from it and its id.")] = 0,
    coco_images: Annotated[
        str | None,
        typer.Option(help="Folder of a COCO JSON's images (default: the JSON's folder)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Composites per task.")] = 16,
    max_pixels: MaxPixelsArg = RUN["max_pixels"],
    run_id: RunIdArg = None,
    progress: ProgressArg = RUN["show_progress"],
    num_cpus: NumCpusArg = RUN["num_cpus"],
    ray_address: RayAddressArg = RUN["ray_address"],
    verbose: VerboseArg = False,
    *,
    storage_options: dict[str, Any],
) -> None:
    """Paste objects into backgrounds: composites, their masks, instance masks and a manifest
    that `harmonize run` reads as it is.

    Every choice is drawn from a seed derived from --seed and the composite's id, so a rerun
    makes the same composites; rerunning into the same --output makes only the missing ones.
    """
    from pipeline.compose.inputs import ComposeConfig
    from pipeline.compose.job import compose
    from pipeline.console import RunLog, log_uri
    from pipeline.storage import absolute

    rules = LayoutRules(
        per_background=per_background, min_objects=min_objects, max_objects=max_objects,
        scale=scale, position=position, horizon=horizon, keep_inside=keep_inside,  # type: ignore[arg-type]
        max_overlap=max_overlap, flip=flip, attempts=attempts,
    )  # fmt: skip
    if rules.problems():
        raise typer.BadParameter("; ".join(rules.problems()))
    config = ComposeConfig(
        objects=objects, backgrounds=backgrounds, output=output, rules=rules, seed=seed,
        coco_images=coco_images, batch_size=batch_size, max_pixels=max_pixels,
        storage_options=storage_options, ray_address=ray_address, num_cpus=num_cpus,
        show_progress=progress, **({"run_id": run_id} if run_id else {}),
    )  # fmt: skip
    config = dataclasses.replace(config, output=absolute(config.output), log_to_driver=verbose)
    log = RunLog(log_uri(config.output, config.run_id), config.storage_options, verbose)
    run_job(lambda console: compose(config, console), log, config.show_progress)


@app.command("export")
@with_storage_options
def export_command(
    results: ResultsArg,
    where: Annotated[
        str,
        typer.Option(help='SQL condition over the results columns, e.g. "bg_psnr > 35" ("true").'),
    ],
    out: Annotated[str, typer.Option("--out", help="COCO instances JSON to write (path or URI).")],
    params_hash: ParamsHashArg = None,
    workers: Annotated[int, typer.Option(help="Threads reading masks and images.")] = 16,
    *,
    storage_options: dict[str, Any],
) -> None:
    """Harmonized composites (from `harmonize compose`) matching --where -> COCO instances JSON.

    Images are the harmonized ones, by URI; masks are RLE from the instance masks compose
    wrote; categories from the objects manifest. Samples that cannot be annotated are listed
    and left out (exit 1).
    """
    from pipeline.results import ResultsError
    from pipeline.tools.export import export_coco

    try:
        summary = export_coco(results, where, out, storage_options, params_hash=params_hash,
                              workers=workers)  # fmt: skip
    except ResultsError as exc:
        fail(exc, 2)
    typer.echo(summary.text())
    if summary.left_out:
        typer.secho(
            f"error: {len(summary.left_out)} of {summary.selected} samples left out of "
            f"{summary.out} (listed above)",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)
