"""`harmonize model assemble` and `harmonize model check`: DiffHarmony model directories.

Enters: the downloads (SD inpainting, sd-vae-ft-mse, the DiffHarmony release) or a model
directory, as paths or URIs, and storage options.
Leaves: the assembled folder and what came from where (exit 0), or every problem one line each
(exit 1).
"""

from __future__ import annotations

from typing import Annotated, Any, get_args

import typer

from pipeline.cli.app import fail, model_app
from pipeline.cli.options import MODEL, PickleArg, with_storage_options
from pipeline.config import Direction


@model_app.command("check")
@with_storage_options
def model_check_command(
    model_dir: Annotated[
        str,
        typer.Argument(help="Model directory (path or URI; hf://ORG/REPO[@REVISION]/FOLDER)."),
    ],
    allow_unsafe_pickle: PickleArg = False,
    *,
    storage_options: dict[str, Any],
) -> None:
    """Validate a DiffHarmony model directory: layout, configs, shapes, weight keys."""
    from pipeline.models.check import check_model_dir

    problems = check_model_dir(
        model_dir, allow_unsafe_pickle=allow_unsafe_pickle, storage_options=storage_options
    )
    if problems:
        for problem in problems:
            typer.secho(f"problem: {problem}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"{model_dir}: OK")


@model_app.command("assemble")
@with_storage_options
def model_assemble_command(
    inpainting: Annotated[
        str,
        typer.Option(
            help="Stable Diffusion inpainting folder (path or URI); its tokenizer/, "
            "text_encoder/ and scheduler/ are taken."
        ),
    ],
    out: Annotated[
        str, typer.Option(help="Where the model directory goes (path or URI; absent or empty).")
    ],
    vae: Annotated[
        str | None,
        typer.Option(
            help="The sd-vae-ft-mse folder (path or URI): vae/ when the release holds no "
            "Harmony-VAE for the model, or with --plain-vae."
        ),
    ] = None,
    diffharmony: Annotated[
        str | None,
        typer.Option(
            help="The extracted DiffHarmony release (path or URI), searched at any depth for the "
            "stage-1 UNet (UNet2DConditionModel, in_channels 9), the refiner (UNet2DCustom) and "
            "DiffHarmony++'s Harmony-VAE (ConditionVAE)."
        ),
    ] = None,
    unet: Annotated[
        str | None, typer.Option(help="The stage-1 UNet folder, when the release holds several.")
    ] = None,
    refiner: Annotated[
        str | None, typer.Option(help="The refiner folder, when the release holds several.")
    ] = None,
    harmony_vae: Annotated[
        str | None,
        typer.Option(
            help="The Harmony-VAE folder (DiffHarmony++ ConditionVAE), when the release holds "
            "several for the model."
        ),
    ] = None,
    plain_vae: Annotated[
        bool,
        typer.Option(
            "--plain-vae",
            help="Decode with --vae's AutoencoderKL even if the release holds a "
            "Harmony-VAE (DiffHarmony as first published).",
        ),
    ] = False,
    direction: Annotated[
        str,
        typer.Option(
            help="forward: the harmonization model; inverse: the inverse model that makes new "
            "composites (the release's 'gen' folders: diffharmony-gen, cvae-gen), for "
            "`harmonize run --direction inverse`."
        ),
    ] = MODEL.direction,
    allow_unsafe_pickle: PickleArg = False,
    *,
    storage_options: dict[str, Any],
) -> None:
    """Build a DiffHarmony model directory from the downloads, check it, and say what came from
    where: safetensors only (pickles converted with --allow-unsafe-pickle), the empty prompt
    precomputed, MODEL_CARD.md with the sources and every file's sha256. The release's
    Harmony-VAE decodes when it holds one (--plain-vae for sd-vae-ft-mse)."""
    from pipeline.models.assemble import AssembleError, assemble

    if direction not in get_args(Direction):
        raise typer.BadParameter(
            f"{direction!r} is not one of {', '.join(get_args(Direction))}",
            param_hint="--direction",
        )
    try:
        report = assemble(
            inpainting=inpainting,
            vae=vae,
            out=out,
            diffharmony=diffharmony,
            unet=unet,
            refiner=refiner,
            harmony_vae=harmony_vae,
            direction=direction,
            plain_vae=plain_vae,
            allow_unsafe_pickle=allow_unsafe_pickle,
            storage_options=storage_options,
        )
    except AssembleError as error:
        fail(error, 1)
    for line in report.lines():
        typer.echo(line)
    typer.echo(f"{out}: OK (checked; MODEL_CARD.md lists the sources and every file's sha256)")
