"""Inverse harmonization's variants: several generated composites per manifest row.

Enters: manifest rows (a pyarrow batch with `sample_id`), the run's variant count N.
Leaves: N rows per input row, the row's columns unchanged except `sample_id`, which becomes the
variant's own id `{sample_id}__v{k}`, plus `source_sample_id` (the manifest's id) and `variant`
(k, int32). From here on a variant is a sample like any other: its own seed
(`models.base.variant_seed`, from the run seed, the source id and k), its own image
(`images/{sample_id}__v{k}.png`), its own results row, error and resume (a variant done with
the same parameters is skipped, so raising N later makes only the new variants).

Each variant row fetches its inputs again: simpler than sharing decoded pixels between rows,
and the model's N passes dominate the cost anyway.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

VARIANT_SEPARATOR = "__v"


def variant_id(sample_id: str, variant: int) -> str:
    """`{sample_id}__v{k}`: unique, since k (digits) follows the last separator."""
    return f"{sample_id}{VARIANT_SEPARATOR}{variant}"


def expand_variants(batch: pa.Table, variants: int) -> pa.Table:
    """Ray `map_batches` function (batch_format="pyarrow"): each row once per variant, in order
    (row 0 v0..v{N-1}, row 1 v0..)."""
    n = batch.num_rows
    rows = pa.array([i for i in range(n) for _ in range(variants)], pa.int64())
    expanded = batch.take(rows)
    ks = pa.array([k for _ in range(n) for k in range(variants)], pa.int32())
    sources = expanded.column("sample_id").cast(pa.string())
    ids = pc.binary_join_element_wise(
        sources, pa.array([VARIANT_SEPARATOR] * len(ks), pa.string()), ks.cast(pa.string()), ""
    )
    index = expanded.column_names.index("sample_id")
    expanded = expanded.set_column(index, "sample_id", ids)
    expanded = expanded.append_column("source_sample_id", sources)
    return expanded.append_column("variant", ks)
