"""`harmonize compose`: objects pasted into backgrounds, as a Ray Data job of CPU tasks.

Enters: a `ComposeConfig`: an objects manifest (Parquet, or a COCO instances JSON), a
backgrounds manifest (Parquet), the placement rules (`layout.LayoutRules`), a run seed, an
output prefix.
Leaves, under the output:
  `composites/{id}.png`   the composite (RGB)
  `masks/{id}.png`        every pasted pixel, 0/255: the mask harmonization changes
  `instances/{id}.png`    instance labels, 0 background, i = the instance labelled i, visible
                          pixels only (after occlusion)
  `manifest/{run_id}/part-{attempt}-{task}.parquet`  one row per composite made, in
                          `schemas/compose.py`'s COMPOSITE_SCHEMA: `harmonize run --manifest
                          {output}/manifest` reads it as it is
  `errors/{run_id}/part-{attempt}-{task}.parquet`    one row per composite that failed
  `logs/{run_id}.log`     Ray's own logs of the job (the command line's console)
and a `ComposeSummary`.

    from_arrow(backgrounds: id, uri)              driver-read, checked
    → map_batches(expand)            (fused)      K composite rows each, minus those done
    → repartition(batch_size rows)   streaming    parallel tasks, steady flow
    → map_batches(compose_batch)     CPU tasks    images written; rows (ok or error)
    → write_datasink(ComposeSink)                 manifest/ and errors/ Parquet

Each composite's choices (how many objects, which, scale, flip, position) come from one
generator seeded by (run seed, composite id), and the object pool is sorted by `object_id`:
a composite never depends on how Ray splits the work, on batch sizes or on other composites.
A rerun into the same output skips the composites already in its manifest and retries the
errors; an output holding composites made with other rules or another seed is refused.
A bad input (unreadable image, missing or empty mask, an object that fits the background at
no scale) makes that composite an error row naming the object or background and the cause.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from PIL import Image
from ray.data import DataContext

from pipeline.coco import decode_segmentation
from pipeline.compose.inputs import (
    ComposeConfig,
    errors_dir,
    manifest_dir,
    preflight,
)
from pipeline.compose.layout import (
    Cutout,
    LayoutError,
    cut_out,
    draw_objects,
    layout,
    paste,
)
from pipeline.console import Console
from pipeline.decode import SampleError, open_image, to_mask, to_rgb, upright
from pipeline.models.base import sample_seed
from pipeline.preflight import PreflightError
from pipeline.storage import (
    absolute,
    describe,
    join,
    parquet_dataset,
    read_bytes,
    safe_key,
    write_atomic,
)
from pipeline.write import PartFilesSink, encode
from schemas.compose import (
    COMPOSE_ERROR_SCHEMA,
    COMPOSITE_SCHEMA,
)

log = logging.getLogger(__name__)


# --- Ray tasks ---------------------------------------------------------------------------------

# What compose_batch emits: the composite manifest's columns (nullable, for error rows) and
# what the sink needs to route and record errors.
_ROW_SCHEMA = pa.schema(
    [f.with_nullable(True) for f in COMPOSITE_SCHEMA]
    + [
        pa.field("object_ids", pa.list_(pa.string())),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
    ]
)


def expand(batch: pa.Table, per_background: int, done: Any) -> pa.Table:
    """Ray `map_batches` function: K composite rows per background, minus those done."""
    done_ids = ray.get(done) if isinstance(done, ray.ObjectRef) else done
    background_ids = batch["background_id"].to_pylist()
    uris = batch["image_uri"].to_pylist()
    rows: dict[str, list[str]] = {"sample_id": [], "background_id": [], "background_uri": []}
    for background_id, uri in zip(background_ids, uris):
        for k in range(per_background):
            rows["sample_id"].append(f"{background_id}-{k}")
            rows["background_id"].append(background_id)
            rows["background_uri"].append(uri)
    table = pa.table(rows, schema=pa.schema([(n, pa.string()) for n in rows]))
    if len(done_ids):
        table = table.filter(pc.invert(pc.is_in(table["sample_id"], value_set=done_ids)))
    return table


def _read(uri: str, what: str, options: dict[str, Any]) -> bytes:
    try:
        return read_bytes(uri, options)
    except FileNotFoundError:
        raise SampleError(f"{what} not found: {uri}") from None
    except Exception as exc:
        raise SampleError(f"{what} could not be read from {uri} ({describe(exc)})") from None


def load_object(row: dict[str, Any], max_pixels: int, options: dict[str, Any]) -> Cutout:
    """An object of the pool -> its cut-out (raises `SampleError`/`LayoutError`)."""
    name = f"object {row['object_id']!r}"
    image = upright(open_image(_read(row["image_uri"], f"{name} image", options),
                               f"{name} image", max_pixels))  # fmt: skip
    rgb = to_rgb(image, f"{name} image")
    height, width = rgb.shape[:2]
    if row["mask_uri"]:
        mask_image = upright(open_image(_read(row["mask_uri"], f"{name} mask", options),
                                        f"{name} mask", max_pixels))  # fmt: skip
        w, h = mask_image.size
        if abs((w / h) / (width / height) - 1.0) > 0.01:
            raise SampleError(f"{name}: mask is {w}x{h} but its image is {width}x{height}")
        mask = to_mask(mask_image)
        if mask.shape != (height, width):
            mask = np.asarray(
                Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST)
            )
        mask = mask.astype(bool)
    else:
        try:
            mask = decode_segmentation(row["segmentation"], height, width)
        except SampleError as exc:
            raise SampleError(f"{name}: {exc}") from None
    return cut_out(rgb, mask, name)


def _png(pixels: np.ndarray) -> bytes:
    return encode(pixels, "png", 0)


def compose_batch(batch: pa.Table, config: ComposeConfig, objects: Any) -> pa.Table:
    """Ray `map_batches` function: make, write and describe each composite of the batch."""
    pool = ray.get(objects) if isinstance(objects, ray.ObjectRef) else objects
    object_rows = pool.to_pylist()
    rules, options = config.rules, config.storage_options
    ids = batch["sample_id"].to_pylist()
    background_ids = batch["background_id"].to_pylist()
    background_uris = batch["background_uri"].to_pylist()
    # Draw each composite's objects first (the draws need no pixels), so that every object
    # the batch needs is fetched once.
    seeds = [sample_seed(config.seed, sid) for sid in ids]
    generators = [np.random.default_rng(seed) for seed in seeds]
    cut_from: dict[str, set[int]] = {}  # an object is never pasted into its own image
    for index, row in enumerate(object_rows):
        cut_from.setdefault(row["image_uri"], set()).add(index)
    picks: list[list[int] | LayoutError] = []
    for rng, uri in zip(generators, background_uris):
        try:
            excluded = frozenset(cut_from.get(uri, ()))
            picks.append(draw_objects(rng, rules, len(object_rows), excluded))
        except LayoutError as exc:
            picks.append(exc)

    def load(index: int) -> Cutout | Exception:
        try:
            return load_object(object_rows[index], config.max_pixels, options)
        except (SampleError, LayoutError) as exc:
            return exc
        except Exception as exc:
            return SampleError(f"object {object_rows[index]['object_id']!r}: "
                               f"{type(exc).__name__}: {exc}")  # fmt: skip

    def make(i: int) -> dict[str, Any]:
        sid = ids[i]
        drawn = picks[i]
        row: dict[str, Any] = {
            "sample_id": sid, "background_id": background_ids[i],
            "background_uri": background_uris[i], "compose_seed": seeds[i],
            "object_ids": [] if isinstance(drawn, Exception) else
                          [object_rows[j]["object_id"] for j in drawn],
        }  # fmt: skip
        try:
            if isinstance(drawn, Exception):
                raise drawn
            name = f"background {background_ids[i]!r}"
            data = _read(background_uris[i], name, options)
            background = to_rgb(upright(open_image(data, name, config.max_pixels)), name)
            failed = [cutouts[j] for j in drawn if isinstance(cutouts[j], Exception)]
            if failed:
                raise failed[0]
            chosen = [cutouts[j] for j in drawn]
            placed, dropped = layout(generators[i], rules, chosen, background.shape[:2])  # type: ignore[arg-type]
            composite, labels, instances = paste(background, placed)
            key = safe_key(sid)
            uris = {
                "composite_uri": join(config.output, "composites", f"{key}.png"),
                "mask_uri": join(config.output, "masks", f"{key}.png"),
                "instances_uri": join(config.output, "instances", f"{key}.png"),
            }
            images = {"composite_uri": composite, "mask_uri": (labels > 0).astype(np.uint8) * 255,
                      "instances_uri": labels}  # fmt: skip
            for column, pixels in images.items():
                write_atomic(uris[column], _png(pixels), options)
        except (SampleError, LayoutError) as exc:
            return {**row, "status": "error", "error": f"composite {sid!r}: {exc}"}
        except Exception as exc:  # one bad composite never stops the batch
            return {**row, "status": "error",
                    "error": f"composite {sid!r}: {type(exc).__name__}: {exc}"}  # fmt: skip
        object_ids = row["object_ids"]
        row["instances"] = [
            {
                "label": inst.label, "object_id": object_ids[inst.index],
                "category": object_rows[drawn[inst.index]]["category"],
                "bbox": list(inst.bbox), "area": inst.area, "visible": inst.visible,
                "x": p.placement.x, "y": p.placement.y, "width": p.placement.width,
                "height": p.placement.height, "scale": p.placement.scale,
                "flip": p.placement.flip,
            }
            for inst, p in zip(instances, placed)
        ]  # fmt: skip
        row["dropped"] = [object_ids[j] for j in dropped]
        return {**row, **uris, "status": "ok", "error": None}

    with ThreadPoolExecutor(max_workers=min(16, max(len(ids), 1))) as threads:
        needed = sorted({j for drawn in picks if isinstance(drawn, list) for j in drawn})
        cutouts = dict(zip(needed, threads.map(load, needed)))
        rows = list(threads.map(make, range(len(ids))))

    now = datetime.now(timezone.utc)
    params = json.dumps(config.params(), sort_keys=True)
    for row in rows:
        row.update(compose_params=params, compose_params_hash=config.params_hash(),
                   compose_run_id=config.run_id, composed_at=now)  # fmt: skip
    return pa.Table.from_pylist(rows, schema=_ROW_SCHEMA)


class ComposeSink(PartFilesSink):
    """Per write task, atomically: the ok rows as `manifest/{run_id}/part-{attempt}-{task}`
    and the error rows as `errors/{run_id}/part-…` (named as `write.PartFilesSink` names its
    files: a fresh attempt per execution, a retried task replaces only its own files)."""

    def __init__(self, config: ComposeConfig) -> None:
        super().__init__(config.storage_options, config.rows_per_file)
        self.manifest_dir = join(manifest_dir(config), config.run_id)
        self.errors_dir = join(errors_dir(config), config.run_id)

    def route(self, table: pa.Table) -> list[tuple[str, pa.Table]]:
        ok = pc.equal(table["status"], "ok")
        return [
            (directory, rows.select(schema.names).cast(schema))
            for directory, rows, schema in (
                (self.manifest_dir, table.filter(ok), COMPOSITE_SCHEMA),
                (self.errors_dir, table.filter(pc.invert(ok)), COMPOSE_ERROR_SCHEMA),
            )
        ]

    def get_name(self) -> str:
        return "Composites"


# --- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComposeSummary:
    run_id: str
    skipped: int  # composites already made by earlier runs into this output
    composites: int  # tried by this run
    ok: int
    error: int
    instances: int  # objects pasted (visible in the composites)
    dropped: int  # objects drawn but left out by --max-overlap
    seconds: float
    output: str
    errors: list[str]

    def text(self) -> str:
        lines = [
            f"compose {self.run_id}: {self.composites} composites, {self.ok} ok, {self.error} "
            f"error in {self.seconds:.1f} s"
            + (f"; {self.skipped} already made, skipped" if self.skipped else ""),
            f"objects pasted: {self.instances}"
            + (
                f" ({self.dropped} more drawn but left out by --max-overlap)"
                if self.dropped
                else ""
            ),
            f"composites: {join(self.output, 'composites')}",
            f"manifest:   {join(self.output, 'manifest')}  (harmonize run --manifest reads it)",
        ]
        lines += [f"error: {message}" for message in self.errors[:10]]
        if len(self.errors) > 10:
            lines.append(f"… and {len(self.errors) - 10} more in {join(self.output, 'errors')}")
        return "\n".join(lines)


def summarize(
    config: ComposeConfig, sink: ComposeSink, seconds: float, skipped: int
) -> ComposeSummary:
    """Read back what this execution wrote (its files only) and count it."""
    options = config.storage_options
    made = parquet_dataset(sink.manifest_dir, options, sink.file_prefix)
    failed = parquet_dataset(sink.errors_dir, options, sink.file_prefix)
    ok = made.to_table(columns=["instances", "dropped"]) if made else None
    errors = failed.to_table(columns=["error"])["error"].to_pylist() if failed else []
    instances = dropped = 0
    if ok is not None:
        instances = sum(len(v or []) for v in ok["instances"].to_pylist())
        dropped = sum(len(v or []) for v in ok["dropped"].to_pylist())
    count = ok.num_rows if ok is not None else 0
    return ComposeSummary(
        config.run_id, skipped, count + len(errors), count, len(errors), instances, dropped,
        seconds, config.output, errors,
    )  # fmt: skip


def compose(config: ComposeConfig, console: Console | None = None) -> ComposeSummary:
    """Check everything, then run the Ray Data job and summarize it.

    `console` (the command line's): a header once the inputs are read, and one progress bar
    (composites made of those to make) instead of Ray Data's while the job runs."""
    from pipeline.placement import check_paths_reachable, init_ray

    problems = config.rules.problems()
    if problems:
        raise PreflightError("; ".join(problems))
    config = dataclasses.replace(config, output=absolute(config.output))
    objects, backgrounds, done = preflight(config)
    log.info(
        "compose: %d objects, %d backgrounds x %d, %d composites already made",
        objects.num_rows, backgrounds.num_rows, config.rules.per_background, len(done),
    )  # fmt: skip
    to_make = max(backgrounds.num_rows * config.rules.per_background - len(done), 0)
    if console is not None:
        console.header(
            f"harmonize compose {config.run_id}: {to_make} composites to make "
            f"({backgrounds.num_rows} backgrounds x {config.rules.per_background}, "
            f"{objects.num_rows} objects) -> {config.output}"
        )
        config = dataclasses.replace(config, show_progress=False)  # the console draws the bar
    init_ray(config)
    check_paths_reachable(
        {"--objects": config.objects, "--backgrounds": config.backgrounds}, config.output
    )
    start = time.perf_counter()
    context = DataContext.get_current()
    context.enable_progress_bars = config.show_progress
    context.max_errored_blocks = 0  # per-composite errors are rows; a failing block is a fault
    # The callback that counts progress is read from the DataContext when the plan is built.
    with console.executing(to_make) if console else contextlib.nullcontext():
        dataset = ray.data.from_arrow(backgrounds)
        dataset = dataset.map_batches(
            expand,
            fn_kwargs={"per_background": config.rules.per_background, "done": ray.put(done)},
            batch_format="pyarrow",
            num_cpus=0.5,
        )
        dataset = dataset.repartition(target_num_rows_per_block=config.batch_size)
        dataset = dataset.map_batches(
            compose_batch,
            fn_kwargs={"config": config, "objects": ray.put(objects)},
            batch_format="pyarrow",
            batch_size=config.batch_size,
            num_cpus=1,
        )
        sink = ComposeSink(config)
        dataset.write_datasink(sink)
    return summarize(config, sink, time.perf_counter() - start, len(done))
