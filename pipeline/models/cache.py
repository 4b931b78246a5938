"""Remote model directories, copied once per node into a checksummed local cache.

Enters: a model directory URI (s3://, gs://, hf://ORG/REPO[@REVISION]/FOLDER, file://,
memory://, ...) and storage options, or a plain local path.
Leaves: the local folder to load from (`resolve_model_dir`); the cache's own checks
(`verify_cache`) and the checksums of a folder's files (`file_checksums`, `read_manifest`).

Remote directories are copied once per node to `<cache_dir>/<sha256(uri)[:16]>/` (default cache
`~/.cache/harmonize/models`): files go to a temporary folder, their sha256 is computed while they
stream and written to a manifest, and the folder is renamed into place; an exclusive file lock
serialises actors on the same node. Every later load re-hashes the copy against the manifest and
lists the remote afresh (paths, sizes and the store's version of each file: the Hub's blob id,
S3's ETag), fetching again if either differs. Every remote read goes through
`storage.filesystem`, with the retry settings of every other read. A folder on the Hugging Face
Hub (`hf://`, huggingface_hub's HfFileSystem) takes the same path; its files are read in one
streaming request each, and its token is huggingface_hub's own (`HF_TOKEN` or the saved login),
sent to the Hub and written nowhere by this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.models.layout import ModelDirError
from pipeline.storage import describe, filesystem, has_protocol

logger = logging.getLogger(__name__)

MANIFEST = ".harmonize-manifest.json"
DEFAULT_CACHE = Path("~/.cache/harmonize/models")

_CHUNK = 8 << 20


def is_remote(uri: str) -> bool:
    """fsspec URIs (anything with a protocol, file:// included) are copied; plain paths are not."""
    return has_protocol(uri)


def cache_path(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Where a remote model directory is cached on this node."""
    root = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return root.expanduser() / key


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_checksums(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (the cache manifest excluded)."""
    return {
        path.relative_to(root).as_posix(): _sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def read_manifest(local: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> {"sha256", "size"} as recorded when the copy was made."""
    return json.loads((local / MANIFEST).read_text())["files"]


def verify_cache(local: Path) -> list[str]:
    """Problems with a cached copy: files missing, resized or not matching their sha256."""
    if not (local / MANIFEST).is_file():
        return [f"{local}: no {MANIFEST} (incomplete copy)"]
    problems = []
    for rel, entry in read_manifest(local).items():
        path = local / rel
        if not path.is_file():
            problems.append(f"{rel}: missing from the cache")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{rel}: size {path.stat().st_size}, manifest says {entry['size']}")
        elif _sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (corrupted)")
    return problems


@contextlib.contextmanager
def _node_lock(lock_file: Path) -> Iterator[None]:
    """An exclusive lock among the processes of this node (released if the holder dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename still protects the cache
        yield
        return
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# What a store says changes with a file's content: the Hub's git blob id, S3's ETag.
_VERSION_KEYS = ("blob_id", "ETag", "etag")


def list_files(fs: Any, remote_root: str) -> dict[str, tuple[int, str | None]]:
    """Relative path -> (size, version) of every file under the remote directory; the version
    is the store's content tag (`_VERSION_KEYS`), None where it has none."""
    remote_root = remote_root.rstrip("/")
    listing = {}
    for path, info in fs.find(remote_root, detail=True).items():
        if info.get("type", "file") != "file":
            continue
        rel = path.rstrip("/")[len(remote_root) :].lstrip("/")
        if rel and rel != MANIFEST:
            version = next((info[k] for k in _VERSION_KEYS if info.get(k)), None)
            listing[rel] = (int(info.get("size") or 0), None if version is None else str(version))
    return listing


def list_tree(fs: Any, remote_root: str) -> dict[str, int]:
    """Relative path -> size of every file under the remote directory."""
    return {rel: size for rel, (size, _) in list_files(fs, remote_root).items()}


def _changed(local: Path, remote: dict[str, tuple[int, str | None]]) -> bool:
    """Whether the remote directory differs from what was copied: other paths, other sizes, or
    another version where both the copy and the listing know it (a branch of a Hub repository
    that moved on, weights of the same size rewritten on S3)."""
    recorded = read_manifest(local)
    if recorded.keys() != remote.keys():
        return True
    return any(
        recorded[rel]["size"] != size
        or (version is not None and recorded[rel].get("version") not in (None, version))
        for rel, (size, version) in remote.items()
    )


def _read_options(fs: Any) -> dict[str, Any]:
    """How to open a remote file for one pass from start to end: on the Hub, one streaming GET
    (`block_size=0`) rather than a ranged GET per block, each of which the Hub would redirect to
    its CDN; elsewhere the file system's own reads."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return {"block_size": 0} if "hf" in protocols else {}


def _fetch_tree(
    fs: Any, remote_root: str, listing: dict[str, tuple[int, str | None]], local: Path, uri: str
) -> None:
    """Copy every listed file to a temporary folder, hashing as it streams, then rename it."""
    tmp = local.parent / f".{local.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        manifest: dict[str, dict[str, Any]] = {}
        for rel in sorted(listing):
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            digest, size = hashlib.sha256(), 0
            source = f"{remote_root.rstrip('/')}/{rel}"
            with fs.open(source, "rb", **_read_options(fs)) as src, target.open("wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
            expected, version = listing[rel]
            if size != expected:
                raise ModelDirError(f"{uri}/{rel} changed while it was being copied")
            manifest[rel] = {"sha256": digest.hexdigest(), "size": size, "version": version}
        (tmp / MANIFEST).write_text(json.dumps({"uri": uri, "files": manifest}, indent=1))
        try:
            os.rename(tmp, local)
        except OSError:
            if not local.is_dir():  # not the "another process finished first" case
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("copied %s (%d files) to %s", uri, len(listing), local)


def _discard(local: Path) -> None:
    # Rename first: a crash while deleting must not leave a half-deleted folder at `local`.
    stale = local.parent / f".{local.name}.stale-{uuid.uuid4().hex[:8]}"
    os.rename(local, stale)
    shutil.rmtree(stale, ignore_errors=True)


def resolve_model_dir(
    uri: str,
    *,
    cache_dir: str | Path | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """The local folder to load from: a plain path as is, a URI through the node cache.

    Credentials and endpoints come from `storage_options` or the environment (e.g. AWS_* and
    FSSPEC_S3_ENDPOINT_URL for s3://; HF_ENDPOINT and HF_TOKEN or the saved login for hf://);
    the filesystem is `storage.filesystem`'s, with the retry settings of every other read.
    """
    if not is_remote(uri):
        local = Path(uri).expanduser()
        if not local.is_dir():
            raise ModelDirError(f"{local}: model directory not found")
        return local

    local = cache_path(uri, cache_dir)
    local.parent.mkdir(parents=True, exist_ok=True)
    with _node_lock(local.parent / f"{local.name}.lock"):
        fs, remote_root = filesystem(uri, storage_options or {})
        try:
            fs.invalidate_cache(remote_root)  # the remote as it is now, not as last listed here
            listing: dict[str, tuple[int, str | None]] | None = list_files(fs, remote_root)
        except Exception as error:
            if not local.is_dir():
                raise ModelDirError(
                    f"{uri}: cannot list the model directory: {describe(error)}"
                ) from error
            logger.warning("cannot list %s (%s); using the cached copy", uri, describe(error))
            listing = None
        if listing == {}:
            raise ModelDirError(f"{uri}: no files under this URI")

        if local.is_dir():
            problems = verify_cache(local)
            if not problems and listing is not None and _changed(local, listing):
                problems = ["the remote directory changed since it was copied"]
            if not problems:
                return local
            if listing is None:
                raise ModelDirError(f"{local}: cache unusable and remote unreachable: {problems}")
            logger.warning("cached %s is unusable (%s); copying it again", uri, "; ".join(problems))
            _discard(local)
        assert listing is not None
        # Under the lock, leftovers of this key belong to processes that died mid-copy.
        for leftover in local.parent.glob(f".{local.name}.*"):
            shutil.rmtree(leftover, ignore_errors=True)
        _fetch_tree(fs, remote_root, listing, local, uri)
    return local
