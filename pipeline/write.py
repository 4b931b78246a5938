"""Encode and write: harmonized pixels in, images and results Parquet out.

Enters: pyarrow batches from `harmonize.py` (the manifest's columns, `schemas.stages.DECODED`
less its pixels, `schemas.stages.HARMONIZED`).
Leaves: `write_images` (Ray CPU tasks) writes each ok row's image to `output_uri`
(`{output}/images/{safe sample_id}.{format}`) and only then emits the row, in the results
schema (`schemas/results.py`) followed by the passthrough columns. `ResultsSink` (a
`PartFilesSink`, which compose's sink shares) writes those rows as Parquet files under
`{output}/results/{run_id}/`, named so that no execution of the plan ever replaces another's
file. Both write atomically, so a crash leaves whole files or none, and no result row points
at a missing image.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from ray.data import Datasink
from ray.data._internal.execution.interfaces import TaskContext
from ray.data.block import Block, BlockAccessor

from pipeline.config import RunConfig
from pipeline.storage import StorageError, describe, join, safe_key, write_atomic
from schemas.results import RESULTS_SCHEMA


def encode(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    """(H, W, 3) uint8 -> encoded bytes. WebP is lossless so that metrics match the file."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    elif image_format == "webp":
        image.save(buffer, format="WEBP", lossless=True)
    else:
        image.save(buffer, format="PNG", compress_level=1)  # speed over a few % of size
    return buffer.getvalue()


def output_uri(config: RunConfig, sample_id: str) -> str:
    return join(config.output, "images", f"{safe_key(sample_id)}.{config.image_format}")


def write_images(batch: pa.Table, config: RunConfig, schema: pa.Schema) -> pa.Table:
    """Ray `map_batches` function (batch_format="pyarrow"); `schema` is the results schema."""
    n = batch.num_rows
    ids = batch.column("sample_id").to_pylist()
    status = batch.column("status").to_pylist()
    errors = batch.column("error").to_pylist()
    widths = batch.column("output_width").to_pylist()
    heights = batch.column("output_height").to_pylist()
    uris: list[str | None] = [None] * n
    write_s: list[float | None] = [None] * n
    for i in range(n):
        if status[i] != "ok":
            continue
        start = time.perf_counter()
        uri = output_uri(config, ids[i])
        try:
            data = batch["harmonized_pixels"][i].as_buffer()  # no copy
            pixels = np.frombuffer(data, np.uint8).reshape(heights[i], widths[i], 3)
            write_atomic(uri, encode(pixels, config.image_format, config.jpeg_quality),
                         config.storage_options)  # fmt: skip
            uris[i] = uri
        except Exception as exc:
            status[i] = "error"
            errors[i] = f"sample {ids[i]!r}: write {uri}: {type(exc).__name__}: {exc}"
        write_s[i] = time.perf_counter() - start

    now = datetime.now(timezone.utc)
    computed = {
        "output_uri": pa.array(uris, pa.string()),
        "status": pa.array(status, pa.string()),
        "error": pa.array(errors, pa.string()),
        "write_s": pa.array(write_s, pa.float64()),
        "image_format": pa.array([config.image_format] * n, pa.string()),
        "run_id": pa.array([config.run_id] * n, pa.string()),
        "created_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
    }
    columns = []
    for field in schema:
        if field.name in computed:
            columns.append(computed[field.name])
        elif field.name in batch.column_names:
            columns.append(batch.column(field.name).cast(field.type))
        elif field.name in RESULTS_SCHEMA.names:
            columns.append(pa.nulls(n, field.type))
        else:
            raise KeyError(f"passthrough column {field.name!r} missing from the batch")
    return pa.Table.from_arrays(columns, schema=schema)


class PartFilesSink(Datasink[int]):
    """Parquet files, one per write task and folder, written atomically (Ray's own Parquet
    writer is not); subclasses say which rows go to which folder (`route`).

    Files are named `part-{attempt}-{task:06d}.parquet`. `attempt` is drawn afresh for each
    execution of the plan, so running again with a used run id (a retried schedule, a resume
    after Ctrl-C) adds files beside the earlier ones and never replaces them. Within one
    execution a task that Ray retries (its node died) writes the same rows again under its
    own name, replacing its own file instead of adding a second copy of its rows.
    """

    what = "file"  # how the one-line error names a file it cannot write

    def __init__(self, storage_options: dict[str, Any], rows_per_file: int) -> None:
        self.storage_options = storage_options
        self.rows_per_file = rows_per_file
        self.attempt = uuid.uuid4().hex[:12]

    @property
    def file_prefix(self) -> str:
        """The name prefix of every file this execution writes (and no other's)."""
        return f"part-{self.attempt}-"

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def route(self, table: pa.Table) -> list[tuple[str, pa.Table]]:
        """(folder, rows as they are to be written) pairs for one task's rows."""
        raise NotImplementedError

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> int:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [table for table in tables if table.num_rows]
        if not tables:
            return 0
        table = pa.concat_tables(tables)
        for directory, rows in self.route(table):
            if not rows.num_rows:
                continue
            buffer = io.BytesIO()
            pq.write_table(rows, buffer, compression="zstd")
            uri = join(directory, f"{self.file_prefix}{ctx.task_idx:06d}.parquet")
            try:
                write_atomic(uri, buffer.getvalue(), self.storage_options)
            except OSError as exc:  # dooms the run: say which file and why, in one line
                raise StorageError(f"cannot write {self.what} {uri}: {describe(exc)}") from None
        return table.num_rows


class ResultsSink(PartFilesSink):
    """Every results row of a task into `{output}/results/{run_id}/`."""

    what = "results file"

    def __init__(self, directory: str, config: RunConfig) -> None:
        super().__init__(config.storage_options, config.results_rows_per_file)
        self.directory = directory

    def route(self, table: pa.Table) -> list[tuple[str, pa.Table]]:
        return [(self.directory, table)]

    def get_name(self) -> str:
        return "Results"
