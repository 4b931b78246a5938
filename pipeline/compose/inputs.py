"""The compose job's configuration and inputs, read and checked on the driver.

Enters: a `ComposeConfig` (objects manifest as Parquet or a COCO instances JSON, backgrounds
manifest as Parquet, placement rules, seed, output prefix, storage options).
Leaves: the object pool (`object_id`, `image_uri`, `mask_uri`, `segmentation`, `category`,
absolute URIs, sorted by `object_id`) and the backgrounds (`background_id`, `image_uri`), both
checked against `schemas/compose.py`; the composites already in the output's manifest; or,
before any work, a `ManifestError` / `PreflightError` naming the input and the cause.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.coco import objects_from_coco
from pipeline.compose.layout import LayoutRules
from pipeline.config import DEFAULT_MAX_PIXELS, new_run_id
from pipeline.manifest import unify_schemas
from pipeline.preflight import PreflightError, check_output
from pipeline.storage import (
    absolute,
    describe,
    filesystem,
    join,
    parquet_dataset,
    read_bytes,
    resolve,
    to_pyarrow,
)
from schemas.compose import BACKGROUND_FIELDS, OBJECT_FIELDS, validate_inputs
from schemas.manifest import ManifestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComposeConfig:
    objects: str  # objects manifest (Parquet file or folder) or a COCO instances JSON
    backgrounds: str  # backgrounds manifest (Parquet file or folder)
    output: str
    rules: LayoutRules = field(default_factory=LayoutRules)
    seed: int = 0  # run seed; each composite's from (seed, composite id)
    # The folder a COCO JSON's file_names are relative to (default: the JSON's folder).
    coco_images: str | None = None
    batch_size: int = 16  # composites per task
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger input images are refused per composite
    rows_per_file: int = 1000  # manifest rows per Parquet file
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    run_id: str = field(default_factory=new_run_id)
    # Ray cluster, as `RunConfig`: None attaches or starts one, "local" starts one.
    ray_address: str | None = None
    num_cpus: int | None = None
    object_store_memory: int | None = None
    show_progress: bool = True
    # Ray's `ray.init(log_to_driver=…)`, as `RunConfig`'s (off on the command line unless
    # --verbose).
    log_to_driver: bool = True

    def params(self) -> dict[str, Any]:
        """Everything that decides a composite's pixels (the inputs aside)."""
        return {"seed": self.seed, **dataclasses.asdict(self.rules)}

    def params_hash(self) -> str:
        text = json.dumps(self.params(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _parquet_table(
    what: str, uri: str, columns: list[str], options: dict[str, Any]
) -> tuple[pa.Table, str]:
    """The given columns (those present) of a Parquet file or folder, and the folder relative
    URIs resolve against."""
    fs, path = filesystem(uri, options)
    if not fs.exists(path):
        raise ManifestError(f"{what}: not found: {uri}")
    if fs.isdir(path):
        files, base_dir = sorted(f for f in fs.find(path) if f.endswith(".parquet")), uri
    else:
        files, base_dir = [path], posixpath.dirname(uri)
    if not files:
        raise ManifestError(f"{what}: {uri} holds no .parquet file")
    arrow_fs = to_pyarrow(fs)
    try:
        schemas = [pq.read_schema(f, filesystem=arrow_fs) for f in files]
        schema = unify_schemas([posixpath.basename(f) for f in files], schemas)
        present = [c for c in columns if c in schema.names]
        tables = [
            pq.read_table(f, columns=[c for c in present if c in s.names], filesystem=arrow_fs)
            for f, s in zip(files, schemas)
        ]
    except pa.ArrowInvalid as exc:
        raise ManifestError(f"{what}: {uri} is not readable Parquet: {exc}") from None
    wanted = pa.schema([schema.field(c) for c in present])
    table = pa.concat_tables(
        [pa.table([t[c].cast(wanted.field(c).type) if c in t.column_names
                   else pa.nulls(len(t), wanted.field(c).type) for c in present], schema=wanted)
         for t in tables]
    )  # fmt: skip
    return table, base_dir


def _absolute_uris(table: pa.Table, base_dir: str, columns: tuple[str, ...]) -> pa.Table:
    for name in columns:
        if name in table.column_names:
            values = [resolve(base_dir, v) if v else None for v in table[name].to_pylist()]
            table = table.set_column(
                table.column_names.index(name), name, pa.array(values, pa.string())
            )
    return table


def open_objects(config: ComposeConfig) -> pa.Table:
    """The object pool: `object_id`, `image_uri`, `mask_uri`, `segmentation`, `category`
    (absolute URIs), sorted by `object_id`; checked (raises `ManifestError`)."""
    uri, options = absolute(config.objects), config.storage_options
    names = [f.name for f in OBJECT_FIELDS]
    if uri.endswith(".json"):
        try:
            data = read_bytes(uri, options)
        except FileNotFoundError:
            raise ManifestError(f"objects: not found: {uri}") from None
        images = absolute(config.coco_images) if config.coco_images else posixpath.dirname(uri)
        table, crowd = objects_from_coco(data, images)
        if crowd:
            log.info("objects: %d crowd annotations of %s left out", crowd, uri)
    else:
        table, base_dir = _parquet_table("objects", uri, names, options)
        table = _absolute_uris(table, base_dir, ("image_uri", "mask_uri"))
    validate_inputs(
        table, f"objects {uri}", "object_id", ("image_uri",), ("mask_uri", "segmentation")
    )
    for name in names:  # every column present, for the tasks
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    table = table.select(names).cast(pa.schema([(n, pa.string()) for n in names]))
    return table.sort_by("object_id")


def open_backgrounds(config: ComposeConfig) -> pa.Table:
    """`background_id`, `image_uri` (absolute), checked (raises `ManifestError`)."""
    uri = absolute(config.backgrounds)
    names = [f.name for f in BACKGROUND_FIELDS]
    table, base_dir = _parquet_table("backgrounds", uri, names, config.storage_options)
    validate_inputs(table, f"backgrounds {uri}", "background_id", ("image_uri",), ())
    table = _absolute_uris(table, base_dir, ("image_uri",))
    return table.select(names).cast(pa.schema([(n, pa.string()) for n in names]))


def manifest_dir(config: ComposeConfig) -> str:
    return join(config.output, "manifest")


def errors_dir(config: ComposeConfig) -> str:
    return join(config.output, "errors")


def done_composites(config: ComposeConfig) -> pa.Array:
    """Composites already in the output's manifest; raises `PreflightError` when it holds
    composites made with other parameters (they would not be the composites asked for)."""
    dataset = parquet_dataset(manifest_dir(config), config.storage_options)
    if dataset is None:
        return pa.array([], pa.string())
    table = dataset.to_table(columns=["sample_id", "compose_params_hash"])
    other = sorted(set(table["compose_params_hash"].to_pylist()) - {config.params_hash()})
    if other:
        raise PreflightError(
            f"output {config.output} holds composites made with other rules or another seed "
            f"(compose_params_hash {', '.join(map(str, other))}; this run's is "
            f"{config.params_hash()}): compose into a new --output"
        )
    return pc.unique(table["sample_id"])


def preflight(config: ComposeConfig) -> tuple[pa.Table, pa.Table, pa.Array]:
    """Everything that would doom the run, before Ray starts: inputs readable and valid, the
    first background reachable with these credentials, the output writable and not made with
    other parameters. Returns the objects, the backgrounds and the composites already done."""
    try:
        objects = open_objects(config)
        backgrounds = open_backgrounds(config)
    except OSError as exc:
        raise PreflightError(f"inputs cannot be read: {describe(exc)}") from None
    if objects.num_rows == 0:
        raise PreflightError(f"objects {config.objects}: no object to paste")
    if backgrounds.num_rows:
        first = backgrounds["image_uri"][0].as_py()
        try:
            fs, path = filesystem(first, config.storage_options)
            fs.info(path)
        except (FileNotFoundError, IsADirectoryError):
            pass  # that composite's own error row says so
        except PermissionError as exc:
            raise PreflightError(f"backgrounds cannot be read ({first}): {describe(exc)}") from None
    check_output(config.output, config.storage_options)
    return objects, backgrounds, done_composites(config)
