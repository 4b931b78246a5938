"""Fetch and decode: manifest rows in, decoded pixels out (Ray CPU tasks).

Enters: a pyarrow batch of manifest rows (`sample_id`, `composite_uri`, `mask_uri`,
`real_uri`?, passthrough columns).
Leaves: the same rows with URIs made absolute (`real_uri` added, null, when the manifest has
none) and the columns of `schemas.stages.DECODED` added: the decoded pixels, `width`,
`height`, `status`, `error`, `fetch_s`, `decode_s`. `composite_pixels` holds the model's
input: in inverse runs that is the real image (read from `real_uri`; `real_pixels` then null:
the ground truth is the input), and `composite_uri` is null (the composite is what the run
makes).
A row that cannot be fetched or decoded gets `status = "error"`, empty pixels and an error
message naming the sample, the stage and the cause; the other rows go on.

Decoding follows the rules of `decode.py` (orientation, value scales, mask semantics, sizes).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from pipeline.config import RunConfig
from pipeline.decode import SampleError, decode_sample
from pipeline.storage import read_bytes, resolve
from schemas.stages import DECODED, arrays


def _fetch(uri: str | None, what: str, storage_options: dict[str, Any]) -> bytes | None:
    if uri is None:
        return None
    try:
        return read_bytes(uri, storage_options)
    except FileNotFoundError:
        raise SampleError(f"{what} not found: {uri}") from None
    except Exception as exc:
        raise SampleError(f"{what} could not be read from {uri} ({type(exc).__name__})") from None


def fetch_and_decode(batch: pa.Table, config: RunConfig, base_dir: str) -> pa.Table:
    """Ray `map_batches` function (batch_format="pyarrow")."""
    rows = batch.num_rows
    ids = batch.column("sample_id").to_pylist()
    inverse = config.model.direction == "inverse"
    uris: dict[str, list[str | None]] = {}
    for name in ("composite_uri", "mask_uri", "real_uri"):
        values = batch.column(name).to_pylist() if name in batch.column_names else [None] * rows
        if inverse and name == "composite_uri":
            values = [None] * rows  # not read: inverse runs make the composite
        uris[name] = [resolve(base_dir, v) if v else None for v in values]
    # (input, mask, ground truth) columns: the real image is the input of an inverse run.
    roles = ("real_uri", "mask_uri", None) if inverse else ("composite_uri", "mask_uri", "real_uri")

    def fetch_row(i: int) -> tuple[Any, float]:
        start = time.perf_counter()
        try:
            fetched = tuple(
                _fetch(uris[name][i], name.removesuffix("_uri"), config.storage_options)
                if name
                else None
                for name in roles
            )
        except SampleError as exc:
            fetched = exc
        return fetched, time.perf_counter() - start

    # Object-store latency dominates: fetch the batch's objects concurrently.
    with ThreadPoolExecutor(max_workers=min(16, max(rows, 1))) as pool:
        fetched_rows = list(pool.map(fetch_row, range(rows)))

    out: dict[str, list[Any]] = {name: [] for name in DECODED.names}
    for i, (fetched, fetch_s) in enumerate(fetched_rows):
        start = time.perf_counter()
        try:
            if isinstance(fetched, SampleError):
                raise fetched
            composite_rgb, mask_binary, real_rgb = decode_sample(
                *fetched, config.max_pixels, input_name="real" if inverse else "composite"
            )
            out["composite_pixels"].append(composite_rgb.tobytes())
            out["mask_pixels"].append(mask_binary.tobytes())
            out["real_pixels"].append(None if real_rgb is None else real_rgb.tobytes())
            out["width"].append(composite_rgb.shape[1])
            out["height"].append(composite_rgb.shape[0])
            out["status"].append("ok")
            out["error"].append(None)
        except Exception as exc:  # one bad sample never stops the batch
            cause = str(exc) if isinstance(exc, SampleError) else f"{type(exc).__name__}: {exc}"
            out["composite_pixels"].append(b"")
            out["mask_pixels"].append(b"")
            out["real_pixels"].append(None)
            out["width"].append(None)
            out["height"].append(None)
            out["status"].append("error")
            out["error"].append(f"sample {ids[i]!r}: fetch/decode: {cause}")
        out["fetch_s"].append(fetch_s)
        out["decode_s"].append(time.perf_counter() - start)

    for name in ("composite_uri", "mask_uri", "real_uri"):
        column = pa.array(uris[name], pa.string())
        if name in batch.column_names:
            batch = batch.set_column(batch.column_names.index(name), name, column)
        else:
            batch = batch.append_column(name, column)
    for name, column in arrays(DECODED, out).items():
        batch = batch.append_column(name, column)
    return batch
