"""Manifest builders: the iHarmony4 benchmark layout, or any folder with a naming rule.

Enters: a dataset root (local path or any fsspec URI: `s3://`, `gs://`, `file://`) and either
  - the iHarmony4 layout: `ROOT/{HCOCO,HAdobe5k,HFlickr,Hday2night}/{composite_images,masks,
    real_images}` with the list file `ROOT/IHD_{split}.txt` (lines such as
    `HCOCO/composite_images/c100_1_1.jpg`) or, when that is absent, the per-subset
    `ROOT/{subset}/{subset}_{split}.txt` (lines with or without the folders); or
  - a glob for the composites and patterns that name each composite's mask (and ground truth).
Leaves: one manifest Parquet file, written atomically at any URI, with `sample_id`,
`composite_uri`, `mask_uri`, `real_uri` and (iHarmony4, or `subset=`) `subset`; and a
`BuildReport` saying what went in, and which samples were left out and why.

Decisions:
  - URIs are absolute (`s3://bucket/…`, `/data/…`): the manifest may live anywhere, not only
    inside the dataset folder. (A local dataset therefore needs the same path on every node.)
  - iHarmony4 `sample_id` is the composite's stem (`c100_1_1`). Stems are unique across the
    four subsets (the c/a/f/d prefixes), and the pipeline names its outputs after the id, so
    `{output}/images/c100_1_1.png` is also the file name the official evaluation script expects.
  - Names follow the dataset's rule `name_i_j.jpg` -> mask `name_i.png`, real `name.jpg`,
    splitting off the last two `_` parts (so a `name` holding `_` still works).
  - A sample with a missing file is left out of the manifest and named in the report (the
    build does not stop); a line that is not `name_i_j` likewise. Two different files that
    give the same `sample_id` are an error (the naming rule is wrong); repeated list lines
    count once.
"""

from __future__ import annotations

import io
import posixpath
import re
import string
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import absolute, filesystem, has_protocol, join, resolve, write_atomic
from schemas.manifest import validate_manifest

IHARMONY4_SUBSETS = ("HCOCO", "HAdobe5k", "HFlickr", "Hday2night")
SPLITS = ("train", "test")
FILE_KINDS = ("composite", "mask", "real")
_SHOWN = 10  # problems listed in full in the report text; the rest are counted


class ManifestBuildError(ValueError):
    """The manifest cannot be built at all (no list file, bad pattern, no sample left)."""


@dataclass
class BuildReport:
    """What a build read, wrote and left out."""

    root: str
    sources: list[str]  # list files read, or the composites glob
    manifest_uri: str | None = None
    rows: int = 0
    subsets: dict[str, int] = field(default_factory=dict)
    # kind ("composite", "mask", "real") -> missing URI -> sample ids that need it
    missing: dict[str, dict[str, list[str]]] = field(
        default_factory=lambda: {kind: {} for kind in FILE_KINDS}
    )
    skipped: list[str] = field(default_factory=list)  # entries not understood, with the reason
    duplicate_lines: int = 0

    @property
    def left_out(self) -> list[str]:
        """Samples left out of the manifest because a file is missing."""
        ids = {i for by_uri in self.missing.values() for ids in by_uri.values() for i in ids}
        return sorted(ids)

    @property
    def missing_files(self) -> int:
        return sum(len(by_uri) for by_uri in self.missing.values())

    @property
    def complete(self) -> bool:
        return not self.missing_files and not self.skipped

    def text(self) -> str:
        counts = ", ".join(f"{name} {count}" for name, count in self.subsets.items())
        lines = [
            f"manifest {self.manifest_uri}: {self.rows} samples"
            + (f" ({counts})" if counts else ""),
            "from: " + ", ".join(self.sources),
        ]
        if self.duplicate_lines:
            lines.append(f"note: {self.duplicate_lines} repeated list line(s) counted once")
        if self.missing_files:
            kinds = ", ".join(
                f"{len(by_uri)} {kind}" for kind, by_uri in self.missing.items() if by_uri
            )
            lines.append(
                f"WARNING: {len(self.left_out)} sample(s) left out: {self.missing_files} "
                f"file(s) missing ({kinds})"
            )
            shown = 0
            for kind, by_uri in self.missing.items():
                for uri, ids in sorted(by_uri.items()):
                    if shown < _SHOWN:
                        samples = ", ".join(ids[:3]) + (f" +{len(ids) - 3}" if len(ids) > 3 else "")
                        noun = "sample" if len(ids) == 1 else "samples"
                        lines.append(f"  missing {kind}: {uri} ({noun} {samples})")
                    shown += 1
            if shown > _SHOWN:
                lines.append(f"  … and {shown - _SHOWN} more missing files")
        if self.skipped:
            noun = "entry" if len(self.skipped) == 1 else "entries"
            lines.append(f"WARNING: {len(self.skipped)} {noun} not understood, left out:")
            lines.extend(f"  {reason}" for reason in self.skipped[:_SHOWN])
            if len(self.skipped) > _SHOWN:
                lines.append(f"  … and {len(self.skipped) - _SHOWN} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Sample:
    sample_id: str
    files: dict[str, str]  # kind -> path relative to the root
    subset: str | None
    source: str  # where it came from, for error messages


class _Root:
    """A dataset root: relative paths -> URIs (for the manifest) and fs paths (for listing)."""

    def __init__(self, uri: str, storage_options: dict[str, Any]) -> None:
        self.uri = absolute(uri)
        self.fs, self.path = filesystem(self.uri, storage_options)
        self.path = self.path.rstrip("/")

    def to_uri(self, relative: str) -> str:
        return resolve(self.uri, relative)

    def to_path(self, relative: str) -> str:
        return posixpath.normpath(posixpath.join(self.path, relative))

    def relative(self, path: str) -> str:
        return posixpath.relpath(path, self.path) if self.path != "/" else path.lstrip("/")

    def exists(self, relative: str) -> bool:
        return self.fs.isfile(self.to_path(relative))

    def read_text(self, relative: str) -> str:
        with self.fs.open(self.to_path(relative), "rb") as handle:
            return handle.read().decode("utf-8-sig")


def existing_files(fs: fsspec.AbstractFileSystem, paths: Iterable[str]) -> set[str]:
    """The subset of `paths` that exist, listing each parent folder once.

    One listing per folder instead of one request per file: the iHarmony4 test split needs
    ~22,000 objects, which are ~25 LIST calls on S3 against 22,000 HEADs.
    """
    by_folder: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        by_folder[posixpath.dirname(path)].add(path)
    found: set[str] = set()
    for folder, wanted in by_folder.items():
        fs.invalidate_cache(folder)  # s3fs caches listings per instance, and fsspec shares them
        try:
            names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False)}
        except (FileNotFoundError, NotADirectoryError):
            continue
        found.update(p for p in wanted if posixpath.basename(p) in names)
    return found


def _finish(
    root: _Root,
    samples: list[_Sample],
    report: BuildReport,
    out: str,
    storage_options: dict[str, Any],
    with_subset: bool,
) -> BuildReport:
    """Check the files exist, write the complete samples as the manifest, fill the report."""
    by_id: dict[str, _Sample] = {}
    for sample in samples:
        earlier = by_id.get(sample.sample_id)
        if earlier is None:
            by_id[sample.sample_id] = sample
        elif earlier.files == sample.files:
            report.duplicate_lines += 1
        else:
            raise ManifestBuildError(
                f"sample_id {sample.sample_id!r} is given by two different composites: "
                f"{earlier.files['composite']} ({earlier.source}) and "
                f"{sample.files['composite']} ({sample.source}); sample ids must be unique"
            )
    unique = list(by_id.values())
    needed = {root.to_path(rel) for s in unique for rel in s.files.values()}
    present = existing_files(root.fs, needed)

    kinds = [k for k in FILE_KINDS if any(k in s.files for s in unique)]  # no real: no column
    rows: dict[str, list[str | None]] = {"sample_id": [], **{f"{k}_uri": [] for k in kinds}}
    if with_subset:
        rows["subset"] = []
    subsets: dict[str, int] = defaultdict(int)
    for sample in unique:
        absent = [k for k, rel in sample.files.items() if root.to_path(rel) not in present]
        for kind in absent:
            uri = root.to_uri(sample.files[kind])
            report.missing[kind].setdefault(uri, []).append(sample.sample_id)
        if absent:
            continue
        rows["sample_id"].append(sample.sample_id)
        for kind in kinds:
            rows[f"{kind}_uri"].append(root.to_uri(sample.files[kind]))
        if with_subset:
            rows["subset"].append(sample.subset)
            subsets[sample.subset or ""] += 1
    report.subsets = dict(subsets)
    report.rows = len(rows["sample_id"])
    if not report.rows:
        raise ManifestBuildError(f"no complete sample to write\n{report.text()}")

    table = pa.table(rows, schema=pa.schema([(name, pa.string()) for name in rows]))
    validate_manifest(table)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    report.manifest_uri = absolute(out)
    write_atomic(report.manifest_uri, buffer.getvalue(), storage_options)
    return report


# --- iHarmony4 ------------------------------------------------------------------------------


def iharmony4_files(subset: str, composite_name: str) -> dict[str, str] | None:
    """`name_i_j.jpg` -> the three files relative to the root, or None when not `name_i_j`."""
    stem = posixpath.splitext(composite_name)[0]
    parts = stem.rsplit("_", 2)
    if len(parts) != 3 or not all(parts):
        return None
    name, i, _ = parts
    return {
        "composite": f"{subset}/composite_images/{composite_name}",
        "mask": f"{subset}/masks/{name}_{i}.png",
        "real": f"{subset}/real_images/{name}.jpg",
    }


def _parse_list(
    text: str, source: str, default_subset: str | None, report: BuildReport
) -> list[_Sample]:
    samples = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip().replace("\\", "/").removeprefix("./")
        if not line or line.startswith("#"):
            continue
        parts = line.split("/")
        # `SUBSET/composite_images/x.jpg`, `composite_images/x.jpg` or `x.jpg`
        subset = parts[0] if len(parts) >= 2 and parts[0] != "composite_images" else default_subset
        if subset is None:
            report.skipped.append(f"{source} line {number}: {raw.strip()!r} names no subset folder")
            continue
        files = iharmony4_files(subset, parts[-1])
        if files is None:
            report.skipped.append(
                f"{source} line {number}: {raw.strip()!r} is not named name_i_j.<ext>"
            )
            continue
        stem = posixpath.splitext(parts[-1])[0]
        samples.append(_Sample(stem, files, subset, f"{source} line {number}"))
    return samples


def build_iharmony4(
    root: str,
    out: str,
    split: str = "test",
    subsets: Iterable[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> BuildReport:
    """Build the manifest of one split of an iHarmony4 tree at `root`; write it to `out`.

    `subsets` restricts the manifest to some of the four datasets (default: all listed).
    Raises `ManifestBuildError` when no list file is found or no sample is complete.
    """
    options = storage_options or {}
    if split not in SPLITS:
        raise ManifestBuildError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    wanted = tuple(subsets) if subsets else None
    dataset = _Root(root, options)
    combined = f"IHD_{split}.txt"
    samples: list[_Sample] = []
    if dataset.exists(combined):
        report = BuildReport(root=dataset.uri, sources=[dataset.to_uri(combined)])
        samples = _parse_list(dataset.read_text(combined), combined, None, report)
    else:
        per_subset = [f"{s}/{s}_{split}.txt" for s in (wanted or IHARMONY4_SUBSETS)]
        found = [rel for rel in per_subset if dataset.exists(rel)]
        if not found:
            looked = ", ".join(dataset.to_uri(rel) for rel in [combined, *per_subset])
            raise ManifestBuildError(
                f"no iHarmony4 list file for split {split!r} under {dataset.uri} "
                f"(looked for {looked})"
            )
        report = BuildReport(root=dataset.uri, sources=[dataset.to_uri(rel) for rel in found])
        for rel in found:
            subset = rel.split("/", 1)[0]
            samples += _parse_list(dataset.read_text(rel), posixpath.basename(rel), subset, report)
    if wanted is not None:
        unknown = sorted(set(wanted) - {s.subset for s in samples})
        if unknown:
            present = sorted({s.subset or "" for s in samples})
            raise ManifestBuildError(
                f"subset(s) {', '.join(unknown)} not in the {split} list "
                f"(present: {', '.join(present)})"
            )
        samples = [s for s in samples if s.subset in wanted]
    return _finish(dataset, samples, report, out, options, with_subset=True)


# --- any folder -----------------------------------------------------------------------------

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

    folder = _Root(root, options)
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
            _Sample(
                sample_id.format(**values),
                files,
                subset.format(**values) if subset is not None else None,
                rel,
            )
        )
    return _finish(folder, samples, report, out, options, with_subset=subset is not None)
