"""What every manifest builder shares: the samples found, the check that their files exist, the
manifest written, and the report of what was left out.

Enters: a dataset root (local path or any fsspec URI: `s3://`, `gs://`, `file://`), the kind
of manifest (`ManifestKind`: composites for `harmonize run`, or compose's objects or
backgrounds) and the samples a builder (`iharmony4.py`, `folder.py`) found there: an id, its
files relative to the root, its label (subset, category).
Leaves: one manifest Parquet file, written atomically at any URI, checked against its kind's
contract: composites have `sample_id`, `composite_uri`, `mask_uri`, `real_uri` and (when asked)
`subset`; objects `object_id`, `image_uri`, `mask_uri` (and `category`); backgrounds
`background_id`, `image_uri`. And a `BuildReport` saying what went in, and which samples were
left out and why.

Decisions:
  - URIs are absolute (`s3://bucket/…`, `/data/…`): the manifest may live anywhere, not only
    inside the dataset folder. (A local dataset therefore needs the same path on every node.)
  - A sample with a missing file is left out of the manifest and named in the report (the
    build does not stop); an entry a builder does not understand likewise. Two different files
    that give the same `sample_id` are an error (the naming rule is wrong); repeated entries
    count once.
"""

from __future__ import annotations

import io
import posixpath
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import absolute, filesystem, resolve, write_atomic
from schemas.compose import validate_inputs
from schemas.manifest import validate_manifest

_SHOWN = 10  # problems listed in full in the report text; the rest are counted


class ManifestBuildError(ValueError):
    """The manifest cannot be built at all (no list file, bad pattern, no sample left)."""


@dataclass(frozen=True)
class ManifestKind:
    """What a manifest's rows are."""

    id_column: str
    files: tuple[str, ...]  # file kinds, the first found by the builder; column f"{kind}_uri"
    label: str | None  # the optional label column
    validate: Callable[[pa.Table], None]  # the contract of the table written
    row: str = "sample"  # what a row is, in the report


COMPOSITES = ManifestKind("sample_id", ("composite", "mask", "real"), "subset", validate_manifest)
OBJECTS = ManifestKind(
    "object_id", ("image", "mask"), "category",
    lambda table: validate_inputs(table, "objects", "object_id", ("image_uri",), ("mask_uri",)),
    "object",
)  # fmt: skip
BACKGROUNDS = ManifestKind(
    "background_id", ("image",), None,
    lambda table: validate_inputs(table, "backgrounds", "background_id", ("image_uri",), ()),
    "background",
)  # fmt: skip


@dataclass
class BuildReport:
    """What a build read, wrote and left out."""

    root: str
    sources: list[str]  # list files read, or the glob
    manifest_uri: str | None = None
    rows: int = 0
    subsets: dict[str, int] = field(default_factory=dict)  # rows per label
    # file kind ("composite", "mask", "image", ...) -> missing URI -> ids that need it
    missing: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # entries not understood, with the reason
    duplicate_lines: int = 0
    row: str = "sample"  # what a row is (`ManifestKind.row`)

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
            f"manifest {self.manifest_uri}: {self.rows} {self.row}s"
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
                f"WARNING: {len(self.left_out)} {self.row}(s) left out: {self.missing_files} "
                f"file(s) missing ({kinds})"
            )
            shown = 0
            for kind, by_uri in self.missing.items():
                for uri, ids in sorted(by_uri.items()):
                    if shown < _SHOWN:
                        samples = ", ".join(ids[:3]) + (f" +{len(ids) - 3}" if len(ids) > 3 else "")
                        noun = self.row if len(ids) == 1 else f"{self.row}s"
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
class Sample:
    sample_id: str
    files: dict[str, str]  # kind -> path relative to the root
    subset: str | None  # the label: subset of a composite, category of an object
    source: str  # where it came from, for error messages


class DatasetRoot:
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


def finish(
    root: DatasetRoot,
    samples: list[Sample],
    report: BuildReport,
    out: str,
    storage_options: dict[str, Any],
    with_label: bool,
    kind: ManifestKind = COMPOSITES,
) -> BuildReport:
    """Check the files exist, write the complete samples as the manifest (with the label
    column when `with_label`), fill the report."""
    report.row = kind.row
    report.missing = {file_kind: {} for file_kind in kind.files}  # reported in this order
    by_id: dict[str, Sample] = {}
    for sample in samples:
        earlier = by_id.get(sample.sample_id)
        if earlier is None:
            by_id[sample.sample_id] = sample
        elif earlier.files == sample.files:
            report.duplicate_lines += 1
        else:
            first = kind.files[0]
            raise ManifestBuildError(
                f"{kind.id_column} {sample.sample_id!r} is given by two different {first}s: "
                f"{earlier.files[first]} ({earlier.source}) and "
                f"{sample.files[first]} ({sample.source}); ids must be unique"
            )
    unique = list(by_id.values())
    needed = {root.to_path(rel) for s in unique for rel in s.files.values()}
    present = existing_files(root.fs, needed)

    kinds = [k for k in kind.files if any(k in s.files for s in unique)]  # no real: no column
    rows: dict[str, list[str | None]] = {kind.id_column: [], **{f"{k}_uri": [] for k in kinds}}
    label = kind.label if with_label else None
    if label:
        rows[label] = []
    subsets: dict[str, int] = defaultdict(int)
    for sample in unique:
        absent = [k for k, rel in sample.files.items() if root.to_path(rel) not in present]
        for file_kind in absent:
            uri = root.to_uri(sample.files[file_kind])
            report.missing[file_kind].setdefault(uri, []).append(sample.sample_id)
        if absent:
            continue
        rows[kind.id_column].append(sample.sample_id)
        for file_kind in kinds:
            rows[f"{file_kind}_uri"].append(root.to_uri(sample.files[file_kind]))
        if label:
            rows[label].append(sample.subset)
            subsets[sample.subset or ""] += 1
    report.subsets = dict(subsets)
    report.rows = len(rows[kind.id_column])
    if not report.rows:
        raise ManifestBuildError(f"no complete sample to write\n{report.text()}")

    table = pa.table(rows, schema=pa.schema([(name, pa.string()) for name in rows]))
    kind.validate(table)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    report.manifest_uri = absolute(out)
    write_atomic(report.manifest_uri, buffer.getvalue(), storage_options)
    return report
