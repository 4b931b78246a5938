"""`harmonize manifest iharmony4 / folder / objects / backgrounds`: manifests from folders.

Enters: a dataset root (path or URI), the naming rule (iHarmony4's own, or patterns), where
the manifest goes, storage options. `iharmony4` and `folder` make what `harmonize run` reads;
`objects` and `backgrounds` what `harmonize compose` reads.
Leaves: the manifest written and the build's report printed (samples left out, and why); a
build that cannot be made at all as one line (exit 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from pipeline.cli.app import fail, manifest_app
from pipeline.cli.options import ManifestOutArg, with_storage_options


@contextlib.contextmanager
def _buildable() -> Iterator[None]:
    """A manifest that cannot be built at all is one line and exit 1."""
    from pipeline.datasets.build import ManifestBuildError
    from schemas.manifest import ManifestError

    try:
        yield
    except (ManifestBuildError, ManifestError) as exc:
        fail(exc, 1)


@manifest_app.command("iharmony4")
@with_storage_options
def manifest_iharmony4_command(
    root: Annotated[str, typer.Argument(help="iHarmony4 root (path or URI).")],
    out: ManifestOutArg,
    split: Annotated[str, typer.Option(help="train or test (IHD_{split}.txt).")] = "test",
    subset: Annotated[
        list[str], typer.Option(help="Only this subset (repeatable), e.g. HAdobe5k.")
    ] = [],  # noqa: B006 (typer reads the default)
    *,
    storage_options: dict[str, Any],
) -> None:
    """Manifest of an iHarmony4 split: sample_id = composite stem, real_uri, subset.

    Samples with missing files are left out and listed; the build goes on.
    """
    from pipeline.datasets.iharmony4 import build_iharmony4

    with _buildable():
        report = build_iharmony4(root, out, split, subset or None, storage_options)
    typer.echo(report.text())


@manifest_app.command("folder")
@with_storage_options
def manifest_folder_command(
    root: Annotated[str, typer.Argument(help="Folder (path or URI).")],
    composites: Annotated[str, typer.Option(help="Glob of the composites, relative to ROOT.")],
    masks: Annotated[str, typer.Option(help="Mask of each composite, e.g. 'masks/{stem}.png'.")],
    out: ManifestOutArg,
    real: Annotated[
        str | None, typer.Option(help="Ground truth of each composite, e.g. 'real/{stem}.jpg'.")
    ] = None,
    match: Annotated[
        str | None,
        typer.Option(help="Regex on the composite's path under ROOT; named groups fill patterns."),
    ] = None,
    sample_id: Annotated[str, typer.Option(help="sample_id pattern.")] = "{stem}",
    subset: Annotated[str | None, typer.Option(help="Pattern of a 'subset' column.")] = None,
    *,
    storage_options: dict[str, Any],
) -> None:
    """Manifest of any folder. Patterns use {stem}, {filename}, {ext}, {dir} and --match groups.

    Samples with missing files are left out and listed; the build goes on.
    """
    from pipeline.datasets.folder import build_folder

    with _buildable():
        report = build_folder(
            root, out, composites, masks, real, match, sample_id, subset, storage_options
        )
    typer.echo(report.text())


MatchArg = Annotated[
    str | None,
    typer.Option(help="Regex on the image's path under ROOT; named groups fill patterns."),
]


@manifest_app.command("objects")
@with_storage_options
def manifest_objects_command(
    root: Annotated[str, typer.Argument(help="Folder (path or URI).")],
    images: Annotated[str, typer.Option(help="Glob of the object images, relative to ROOT.")],
    masks: Annotated[str, typer.Option(help="Mask of each image, e.g. 'masks/{stem}.png'.")],
    out: ManifestOutArg,
    category: Annotated[
        str | None, typer.Option(help="Category pattern, e.g. '{dir}' (one folder a class).")
    ] = None,
    object_id: Annotated[str, typer.Option(help="object_id pattern.")] = "{stem}",
    match: MatchArg = None,
    *,
    storage_options: dict[str, Any],
) -> None:
    """Objects manifest for `harmonize compose`: each image found, its mask, its category.

    Patterns use {stem}, {filename}, {ext}, {dir} and --match groups; objects with a missing
    mask are left out and listed; the build goes on.
    """
    from pipeline.datasets.folder import build_objects

    with _buildable():
        report = build_objects(
            root, out, images, masks, object_id, category, match, storage_options
        )
    typer.echo(report.text())


@manifest_app.command("backgrounds")
@with_storage_options
def manifest_backgrounds_command(
    root: Annotated[str, typer.Argument(help="Folder (path or URI).")],
    images: Annotated[str, typer.Option(help="Glob of the background photos, relative to ROOT.")],
    out: ManifestOutArg,
    background_id: Annotated[str, typer.Option(help="background_id pattern.")] = "{stem}",
    match: MatchArg = None,
    *,
    storage_options: dict[str, Any],
) -> None:
    """Backgrounds manifest for `harmonize compose`: one row per photo the glob finds."""
    from pipeline.datasets.folder import build_backgrounds

    with _buildable():
        report = build_backgrounds(root, out, images, background_id, match, storage_options)
    typer.echo(report.text())
