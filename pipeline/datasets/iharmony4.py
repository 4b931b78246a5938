"""The manifest of an iHarmony4 split, from the benchmark's own layout and list files.

Enters: an iHarmony4 root (local path or any fsspec URI) laid out as
`ROOT/{HCOCO,HAdobe5k,HFlickr,Hday2night}/{composite_images,masks,real_images}`, with the list
file `ROOT/IHD_{split}.txt` (lines such as `HCOCO/composite_images/c100_1_1.jpg`) or, when that
is absent, the per-subset `ROOT/{subset}/{subset}_{split}.txt` (lines with or without the
folders).
Leaves: the manifest (`sample_id`, `composite_uri`, `mask_uri`, `real_uri`, `subset`) written by
`build.finish`, and its `BuildReport`.

Decisions:
  - `sample_id` is the composite's stem (`c100_1_1`). Stems are unique across the four subsets
    (the c/a/f/d prefixes), and the pipeline names its outputs after the id, so
    `{output}/images/c100_1_1.png` is also the file name the official evaluation script expects.
  - Names follow the dataset's rule `name_i_j.jpg` -> mask `name_i.png`, real `name.jpg`,
    splitting off the last two `_` parts (so a `name` holding `_` still works). A line that is
    not `name_i_j` is reported and left out.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from typing import Any

from pipeline.datasets.build import (
    BuildReport,
    DatasetRoot,
    ManifestBuildError,
    Sample,
    finish,
)

IHARMONY4_SUBSETS = ("HCOCO", "HAdobe5k", "HFlickr", "Hday2night")
SPLITS = ("train", "test")


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
) -> list[Sample]:
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
        samples.append(Sample(stem, files, subset, f"{source} line {number}"))
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
    dataset = DatasetRoot(root, options)
    combined = f"IHD_{split}.txt"
    samples: list[Sample] = []
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
    return finish(dataset, samples, report, out, options, with_label=True)
