"""`harmonize demo`: the bundled demo datasets, built and run on local Ray.

Enters: a folder to build the demo in, an output folder, the model; with `--copy-paste`, the
copy-paste recipe instead of the harmonization demo.
Leaves: the demo dataset (scikit-image photos) and the run's summary; with `--copy-paste`,
each command of the README's recipe (compose, run, export, report) run in turn, as printed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.app import app
from pipeline.cli.compose import compose_command, export_command
from pipeline.cli.job import run_and_report
from pipeline.cli.options import MODEL, ModelArg, ModelDirArg, VerboseArg, checked_config
from pipeline.cli.tools import report_command
from pipeline.config import ModelConfig, RunConfig


@app.command("demo")
def demo_command(
    root: Annotated[Path, typer.Option(help="Where to build the demo dataset.")] = Path(
        "demo_data"
    ),
    output: Annotated[Path, typer.Option(help="Where to write the demo run's outputs.")] = Path(
        "demo_output"
    ),
    model: ModelArg = MODEL.name,
    model_dir: ModelDirArg = MODEL.model_dir,
    build_only: Annotated[bool, typer.Option(help="Only build the dataset.")] = False,
    copy_paste: Annotated[
        bool,
        typer.Option(
            "--copy-paste",
            help="The copy-paste recipe instead: objects cut from the photos pasted into the "
            "others (compose), harmonized (run), filtered and exported to COCO (export), and a "
            "report with a before/after contact sheet.",
        ),
    ] = False,
    verbose: VerboseArg = False,
) -> None:
    """Build the bundled demo dataset (scikit-image photos) and harmonize it on local Ray.

    The previous demo output, if any, is replaced.
    """
    from pipeline.datasets.demo import build_demo

    with checked_config():
        model_config = ModelConfig(name=model, model_dir=model_dir)
    if copy_paste:
        copy_paste_demo(root, output, model_config, build_only, verbose)
        return
    manifest = build_demo(str(root.resolve()))
    if build_only:
        typer.echo(f"demo dataset: {manifest}")
        return
    if output.exists():  # the demo starts afresh; a re-run would skip every done sample
        shutil.rmtree(output)
    # A Ray of its own, as the demo says: not whatever cluster this machine happens to run.
    config = RunConfig(
        manifest=manifest, output=str(output.resolve()), model=model_config, ray_address="local"
    )
    run_and_report(config, verbose)


def copy_paste_demo(
    root: Path, output: Path, model: ModelConfig, build_only: bool, verbose: bool = False
) -> None:
    """`harmonize demo --copy-paste`: the README's copy-paste recipe, command for command, on
    the bundled photos."""
    from pipeline.datasets.copy_paste import (
        RECIPE_FILTER,
        RECIPE_RULES,
        build_copy_paste_inputs,
    )

    objects, backgrounds = build_copy_paste_inputs(str(root.resolve()))
    typer.echo(f"objects: {objects}\nbackgrounds: {backgrounds}")
    if build_only:
        return
    if output.exists():  # the demo starts afresh; a re-run would skip every done composite
        shutil.rmtree(output)
    out = output.resolve()
    typer.echo("\n$ harmonize compose ...")
    rules = RECIPE_RULES
    compose_command(
        objects=objects, backgrounds=backgrounds, output=str(out / "composed"),
        per_background=rules.per_background, min_objects=rules.min_objects,
        max_objects=rules.max_objects, scale=rules.scale, position=rules.position,
        horizon=rules.horizon, max_overlap=rules.max_overlap, progress=False,
        ray_address="local", verbose=verbose, storage_option=[], endpoint_url=None,
    )  # fmt: skip
    typer.echo("\n$ harmonize run ...")
    harmonized = RunConfig(
        manifest=str(out / "composed" / "manifest"), output=str(out / "harmonized"), model=model,
        show_progress=False, ray_address="local",
    )  # fmt: skip
    run_and_report(harmonized, verbose)  # on the Ray that compose started
    typer.echo(f'\n$ harmonize export --where "{RECIPE_FILTER}" ...')
    try:
        export_command(results=str(out / "harmonized"), where=RECIPE_FILTER,
                       out=str(out / "train" / "instances.json"),
                       storage_option=[], endpoint_url=None)  # fmt: skip
    finally:
        typer.echo("\n$ harmonize report --sheet 10 ...")
        report_command(results=str(out / "harmonized"), out=str(out / "report.html"), sheet=10,
                       count=3, storage_option=[], endpoint_url=None)  # fmt: skip
