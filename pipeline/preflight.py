"""Preflight: what would doom the whole run is found before Ray starts and any model loads.

Enters: a `RunConfig` (manifest URI, output prefix, storage options) and the first composite
of the manifest the driver opened (`pipeline/manifest.py`, which refuses a manifest it cannot
read, in one line, before this runs).
Leaves: nothing, or a `PreflightError`: one line naming the URI and the cause. Also
`storage_failure`, which finds a storage error inside the exception a failed run raised (Ray
wraps it in its own) and says it in one line.

Checks, in order:
- The first sample's composite can be looked up with the given credentials: credentials that
  cannot read the images fail here, not as one error row per sample. A composite that is
  merely missing is left to its own row.
- The output can be written: neither the prefix nor its `images/` or `results/` is a file,
  and a marker object `{output}/.harmonize-preflight-{random}` is written and deleted (a
  read-only disk, a missing bucket, credentials that may read but not write).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

from ray.exceptions import RayTaskError

from pipeline.config import RunConfig
from pipeline.results import results_folder
from pipeline.storage import StorageError, absolute, describe, filesystem, join, write_atomic

log = logging.getLogger(__name__)


class PreflightError(Exception):
    """The run cannot succeed; found before any work (one line)."""


def check_first_composite(config: RunConfig, uri: str | None) -> None:
    """Look up the manifest's first input image (absolute URI: the composite, or the real for an
    inverse run) with the run's credentials."""
    if uri is None:
        return
    try:
        fs, path = filesystem(uri, config.storage_options)
        fs.info(path)
    except (FileNotFoundError, IsADirectoryError):
        pass  # that sample's own problem: its row says so
    except PermissionError as exc:
        raise PreflightError(
            f"images of manifest {absolute(config.manifest)} cannot be read (first "
            f"{'real' if config.model.direction == 'inverse' else 'composite'} {uri}): "
            f"{describe(exc)}"
        ) from None


def check_output(output: str, storage_options: dict) -> None:
    """Write and delete a marker under `output`; refuse files where folders should be."""
    fs, _ = filesystem(output, storage_options)
    for name, uri in (("", output), ("images/", join(output, "images")),
                      ("results/", results_folder(output))):  # fmt: skip
        try:
            is_file = fs.isfile(filesystem(uri, storage_options)[1])
        except OSError:
            is_file = False  # the marker below says what is wrong
        if is_file:
            what = f"output {output}" if not name else f"{name} under output {output}"
            raise PreflightError(f"{what} is a file; it must be a folder (or not exist)")
    marker = join(output, f".harmonize-preflight-{uuid.uuid4().hex}")
    try:
        write_atomic(marker, b"", storage_options)
    except OSError as exc:
        raise PreflightError(f"output {output} cannot be written: {describe(exc)}") from None
    try:
        fs.rm_file(filesystem(marker, storage_options)[1])
    except OSError as exc:  # harmless: the run never deletes anything
        log.warning("could not delete the preflight marker %s: %s", marker, describe(exc))


def check(config: RunConfig, first_composite: str | None) -> None:
    """Every preflight check (raises `PreflightError`); `first_composite`: the absolute URI of
    the manifest's first composite, None for an empty manifest."""
    check_first_composite(config, first_composite)
    check_output(config.output, config.storage_options)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc` and what caused it, through Ray's wrappers (`RayTaskError.cause`)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)


def storage_failure(exc: BaseException) -> str | None:
    """One line for a run that failed on storage (disk full, access revoked mid-run), or None
    when the failure was something else."""
    # Ray's wrappers also pass isinstance checks for their cause, but print as tracebacks.
    errors = [e for e in _chain(exc) if not isinstance(e, RayTaskError)]
    for error in errors:
        if isinstance(error, StorageError):  # Ray Data may append lines about its retries
            return str(error).splitlines()[0]
    for error in errors:
        if isinstance(error, OSError):
            where = f" {error.filename}" if getattr(error, "filename", None) else ""
            return f"storage{where}: {describe(error)}"
    return None
