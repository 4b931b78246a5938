"""The manifest of any folder: composites found by a glob, each one's mask and ground truth named
by patterns.

Enters: a folder (local path or any fsspec URI), a glob of the composites relative to it, and
patterns naming each composite's mask, ground truth, sample id and subset.
Leaves: the manifest written by `build.finish`, and its `BuildReport` (composites whose files
are missing, or whose path does not match `--match`, are listed and left out).
"""

from __future__ import annotations

import posixpath
import re
import string
from typing import Any

from pipeline.datasets.build import (
    BuildReport,
    DatasetRoot,
    ManifestBuildError,
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
    patterns = {"mask": masks, "real": real, "sample_id": sample_id, "subset": subset}
    for what, pattern in patterns.items():
        if pattern is None:
            continue
        unknown = _fields(pattern) - known
        if unknown:
            raise ManifestBuildError(
                f"{what} pattern {pattern!r} uses {sorted(unknown)}; available: "
                + ", ".join(sorted(known))
            )
        if what in ("mask", "real") and (has_protocol(pattern) or pattern.startswith("/")):
            raise ManifestBuildError(f"{what} pattern {pattern!r} must be relative to the folder")

    folder = DatasetRoot(root, options)
    paths = sorted(
        path
        for path, info in folder.fs.glob(join(folder.path, composites), detail=True).items()
        if info.get("type") == "file"
    )
    source = f"{folder.to_uri(composites)} (glob)"
    if not paths:
        raise ManifestBuildError(f"no file matches {composites!r} under {folder.uri}")
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
        files = {"composite": rel, "mask": posixpath.normpath(masks.format(**values))}
        if real is not None:
            files["real"] = posixpath.normpath(real.format(**values))
        samples.append(
            Sample(
                sample_id.format(**values),
                files,
                subset.format(**values) if subset is not None else None,
                rel,
            )
        )
    return finish(folder, samples, report, out, options, with_subset=subset is not None)
