"""Manifests of any folder: files found by a glob, each one's other files named by patterns.

Enters: a folder (local path or any fsspec URI), a glob relative to it, and patterns naming
each found file's companions, its id and its label: composites with their mask and ground
truth (`harmonize run`'s manifest), object images with their masks and category (compose's
objects), or background images (compose's backgrounds).
Leaves: the manifest written by `build.finish`, and its `BuildReport` (files whose companions
are missing, or whose path does not match `--match`, are listed and left out).
"""

from __future__ import annotations

import posixpath
import re
import string
from typing import Any

from pipeline.datasets.build import (
    BACKGROUNDS,
    COMPOSITES,
    OBJECTS,
    BuildReport,
    DatasetRoot,
    ManifestBuildError,
    ManifestKind,
    Sample,
    finish,
)
from pipeline.storage import has_protocol, join

BUILTIN_FIELDS = ("stem", "filename", "ext", "dir")


def _fields(pattern: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
    except ValueError as exc:
        raise ManifestBuildError(f"pattern {pattern!r}: {exc}") from None


def build_folder(
    root: str,
    out: str,
    composites: str,
    masks: str,
    real: str | None = None,
    match: str | None = None,
    sample_id: str = "{stem}",
    subset: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> BuildReport:
    """Build a manifest from any folder: composites found by a glob, the rest named by rules.

    composites: glob relative to `root` (`composites/*.jpg`, `**/*_comp.png`).
    masks, real, sample_id, subset: patterns relative to `root`, filled from each composite's
      `{stem}` (file name without extension), `{filename}`, `{ext}` (no dot), `{dir}` (its
      folder relative to `root`) and the named groups of `match`.
    match: a regular expression that must match the composite's path relative to `root` in
      full, e.g. `(?P<name>.+)_(?P<i>\\d+)_\\d+\\.jpg` (non-matching composites are reported
      and left out).
    """
    return build_from_glob(
        COMPOSITES, root, out, composites, {"mask": masks, "real": real}, sample_id, subset,
        match, storage_options,
    )  # fmt: skip


def build_objects(
    root: str,
    out: str,
    images: str,
    masks: str,
    object_id: str = "{stem}",
    category: str | None = None,
    match: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> BuildReport:
    """compose's objects manifest from a folder: object images by a glob, each one's mask (and
    category) by patterns, as `build_folder` names them."""
    return build_from_glob(
        OBJECTS, root, out, images, {"mask": masks}, object_id, category, match, storage_options
    )


def build_backgrounds(
    root: str,
    out: str,
    images: str,
    background_id: str = "{stem}",
    match: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> BuildReport:
    """compose's backgrounds manifest from a folder: background images by a glob."""
    return build_from_glob(
        BACKGROUNDS, root, out, images, {}, background_id, None, match, storage_options
    )


def build_from_glob(
    kind: ManifestKind,
    root: str,
    out: str,
    glob: str,
    companions: dict[str, str | None],
    id_pattern: str,
    label_pattern: str | None,
    match: str | None,
    storage_options: dict[str, Any] | None,
) -> BuildReport:
    """The manifest of `kind`: the files `glob` finds (its first file kind), each one's
    `companions` (file kind -> pattern, None: none), id and label filled from its name."""
    options = storage_options or {}
    regex = None
    groups: set[str] = set()
    if match is not None:
        try:
            regex = re.compile(match)
        except re.error as exc:
            raise ManifestBuildError(
                f"--match {match!r} is not a regular expression: {exc}"
            ) from None
        groups = set(regex.groupindex)
        clash = groups & set(BUILTIN_FIELDS)
        if clash:
            raise ManifestBuildError(f"--match group(s) {sorted(clash)} shadow built-in fields")
    known = set(BUILTIN_FIELDS) | groups
    patterns = {**companions, kind.id_column: id_pattern, str(kind.label): label_pattern}
    for what, pattern in patterns.items():
        if pattern is None:
            continue
        unknown = _fields(pattern) - known
        if unknown:
            raise ManifestBuildError(
                f"{what} pattern {pattern!r} uses {sorted(unknown)}; available: "
                + ", ".join(sorted(known))
            )
        if what in companions and (has_protocol(pattern) or pattern.startswith("/")):
            raise ManifestBuildError(f"{what} pattern {pattern!r} must be relative to the folder")

    folder = DatasetRoot(root, options)
    paths = sorted(
        path
        for path, info in folder.fs.glob(join(folder.path, glob), detail=True).items()
        if info.get("type") == "file"
    )
    source = f"{folder.to_uri(glob)} (glob)"
    if not paths:
        raise ManifestBuildError(f"no file matches {glob!r} under {folder.uri}")
    report = BuildReport(root=folder.uri, sources=[source])
    samples = []
    for path in paths:
        rel = folder.relative(path)
        filename = posixpath.basename(rel)
        stem, ext = posixpath.splitext(filename)
        values = {"stem": stem, "filename": filename, "ext": ext.lstrip("."),
                  "dir": posixpath.dirname(rel) or "."}  # fmt: skip
        if regex is not None:
            found = regex.fullmatch(rel)
            if found is None:
                report.skipped.append(f"{rel}: does not match --match {match!r}")
                continue
            values.update({k: v or "" for k, v in found.groupdict().items()})
        files = {kind.files[0]: rel}
        files.update(
            (what, posixpath.normpath(pattern.format(**values)))
            for what, pattern in companions.items()
            if pattern is not None
        )
        label = label_pattern.format(**values) if label_pattern is not None else None
        samples.append(Sample(id_pattern.format(**values), files, label, rel))
    return finish(folder, samples, report, out, options, with_label=label_pattern is not None,
                  kind=kind)  # fmt: skip
