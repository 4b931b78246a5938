"""Storage access through fsspec: one way to name and reach local folders, S3, GCS, MinIO, the
Hugging Face Hub (model folders).

Enters: URIs (`s3://bucket/key`, `gs://…`, `hf://org/repo@rev/path`, `file:///…`,
`/local/path`, `relative/path`) and fsspec storage options (endpoint, credentials; not for the
Hub, which has its own settings).
Leaves: filesystem objects, resolved URIs, bytes read, files written atomically, and storage
errors said in one line (`StorageError`, `describe`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import re
import time
import uuid
from typing import Any

import fsspec
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

# S3: botocore's "standard" retry mode (exponential backoff with jitter on throttling, 5xx and
# connection errors), with more attempts than its default 3 for overnight runs.
S3_RETRIES = {"retries": {"max_attempts": 10, "mode": "standard"}}


class StorageError(Exception):
    """A storage operation that failed for a whole run: one line naming the URI and the cause."""


_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a file is where a folder should be",
    errno.EEXIST: "a file is where a folder should be",
    errno.EISDIR: "a folder is where a file should be",
    errno.ENOENT: "not found",
}


def describe(exc: BaseException) -> str:
    """The cause of a storage error in a few words, with the store's own message when it has
    one that says more (S3: "The specified bucket does not exist", "Access Denied", ...)."""
    if isinstance(exc, OSError) and exc.errno in _CAUSES:
        cause = _CAUSES[exc.errno]
    elif isinstance(exc, PermissionError):
        cause = "permission denied"
    elif isinstance(exc, FileNotFoundError):
        cause = "not found"
    elif isinstance(exc, (NotADirectoryError, FileExistsError)):
        cause = "a file is where a folder should be"
    else:
        cause = type(exc).__name__
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    detail = detail.strip().splitlines()[0] if detail.strip() else ""
    if detail and detail.lower() != cause.lower() and not detail.startswith("[Errno"):
        cause = f"{cause} ({detail})"
    return cause


def filesystem(uri: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it (fsspec caches instances).

    `hf://` is the Hugging Face Hub (huggingface_hub's `HfFileSystem`), which takes its endpoint
    and token from huggingface_hub's own settings (`HF_ENDPOINT`, `HF_TOKEN` or the token
    `hf auth login` saved): the run's storage options describe the object store, and its
    credentials are not handed to the Hub.
    """
    options = {} if is_hub(uri) else dict(storage_options)
    if uri.startswith(("s3://", "s3a://")) and "config_kwargs" not in options:
        options["config_kwargs"] = S3_RETRIES
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def to_pyarrow(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """A pyarrow filesystem for Ray Data's read and write (native for local folders)."""
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def parquet_dataset(
    uri: str, storage_options: dict[str, Any], name_prefix: str = ""
) -> pads.Dataset | None:
    """Every Parquet file under `uri` (whose name starts with `name_prefix`) as one dataset
    over the union of their schemas, or None.

    Every file's footer is read, not only the first's: runs written by different versions of
    the pipeline hold different columns, and a column missing from a file reads as null.
    """
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        return None
    files = sorted(
        f
        for f in fs.find(path)
        if f.endswith(".parquet") and posixpath.basename(f).startswith(name_prefix)
    )
    if not files:
        return None
    factory = pads.FileSystemDatasetFactory(to_pyarrow(fs), files, pads.ParquetFileFormat())
    return factory.finish(factory.inspect(promote_options="permissive", fragments=None))


def is_hub(uri: str) -> bool:
    """A Hugging Face Hub URI: `hf://[datasets/|spaces/]ORG/REPO[@REVISION]/path`."""
    return uri.startswith("hf://")


def has_protocol(uri: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", uri) is not None


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URI or path, keeping its protocol."""
    return posixpath.join(base.rstrip("/"), *parts)


def resolve(base_dir: str, uri: str) -> str:
    """An absolute URI for `uri` as written in a manifest stored in `base_dir`."""
    if has_protocol(uri) or uri.startswith("/"):
        return uri
    if has_protocol(base_dir):
        protocol, rest = base_dir.split("://", 1)
        return f"{protocol}://{posixpath.normpath(posixpath.join(rest, uri))}"
    return posixpath.normpath(posixpath.join(os.path.abspath(base_dir), uri))


def absolute(uri: str) -> str:
    """Local relative paths become absolute, so that Ray workers in other folders find them."""
    if has_protocol(uri):
        return uri.rstrip("/")
    return os.path.abspath(uri)


def read_bytes(uri: str, storage_options: dict[str, Any], attempts: int = 4) -> bytes:
    """Read a whole object; transient errors are retried with exponential backoff.

    A missing object is not transient: FileNotFoundError is raised at once.
    """
    fs, path = filesystem(uri, storage_options)
    for attempt in range(attempts):
        try:
            return fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def write_atomic(uri: str, data: bytes, storage_options: dict[str, Any]) -> None:
    """Write `data` so that readers see the whole file or nothing.

    On local disks: a temporary name in the same folder, then a rename. On object stores a
    single PUT (or a multipart commit, for large objects) is already all-or-nothing.
    """
    fs, path = filesystem(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return
    fs.pipe_file(path, data)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+|\.{2,}")


def safe_key(sample_id: str, max_length: int = 120) -> str:
    """A file name for `sample_id` that stays inside the output folder on any store.

    Characters other than letters, digits, '.', '_' and '-', and runs of dots, become '_';
    leading dots go; when anything changed, a hash of the original id is appended so that two
    ids never collide.
    """
    key = _UNSAFE.sub("_", sample_id).lstrip(".")[:max_length]
    if key != sample_id or not key:
        digest = hashlib.sha1(sample_id.encode()).hexdigest()[:10]
        key = f"{key}-{digest}" if key else digest
    return key
