"""Manifest validation, URI resolution, safe output keys, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.manifest import open_manifest, promote
from pipeline.results import read_results
from pipeline.storage import resolve, safe_key, write_atomic
from schemas.manifest import ManifestError


def write(path: Path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


GOOD = {"sample_id": ["a", "b"], "composite_uri": ["c/a.jpg", "c/b.jpg"], "mask_uri": ["m", "m"]}


def test_valid_manifest_file_and_folder(tmp_path: Path) -> None:
    manifest = open_manifest(write(tmp_path / "m.parquet", {**GOOD, "subset": ["x", "y"]}), {})
    assert manifest.num_rows == 2 and manifest.base_dir == str(tmp_path)
    assert [f.name for f in manifest.passthrough] == ["subset"]
    folder = tmp_path / "parts"
    folder.mkdir()
    write(folder / "0.parquet", GOOD)
    write(folder / "1.parquet", {k: [v[0] + "2" for v in [vals]] for k, vals in GOOD.items()})
    assert open_manifest(str(folder), {}).num_rows == 3


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"sample_id": ["a"], "composite_uri": ["x"]}, "missing required column 'mask_uri'"),
        ({**GOOD, "sample_id": [1, 2]}, "column 'sample_id' must be a string"),
        ({**GOOD, "sample_id": ["a", "a"]}, "duplicated value(s) 'a' in rows 0, 1"),
        ({**GOOD, "sample_id": ["a", ""]}, "column 'sample_id' is null or empty in rows 1"),
        ({**GOOD, "mask_uri": ["m", None]}, "column 'mask_uri' is null or empty in rows 1"),
        ({**GOOD, "status": ["x", "y"]}, "column 'status' is reserved"),
    ],
)
def test_structural_problems_fail_fast(tmp_path: Path, columns: dict, message: str) -> None:
    with pytest.raises(ManifestError) as error:
        open_manifest(write(tmp_path / "m.parquet", columns), {})
    assert message in str(error.value)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        open_manifest(str(tmp_path / "nope.parquet"), {})


def test_resolve() -> None:
    assert resolve("s3://b/sets/day1", "img/a.png") == "s3://b/sets/day1/img/a.png"
    assert resolve("s3://b/sets/day1", "../x.png") == "s3://b/sets/x.png"
    assert resolve("/data/set", "gs://other/a.png") == "gs://other/a.png"
    assert resolve("/data/set", "/abs/a.png") == "/abs/a.png"
    assert resolve("/data/set", "a.png") == "/data/set/a.png"


@pytest.mark.parametrize("sample_id", ["../../etc/passwd", "a/b", "with space", "été", ".", ""])
def test_safe_key_stays_inside_and_is_unique(sample_id: str) -> None:
    key = safe_key(sample_id)
    assert key and "/" not in key and not key.startswith(".") and key.isascii()
    assert key != safe_key(sample_id + "x")


def test_safe_key_keeps_plain_ids() -> None:
    assert safe_key("c1234_1_2") == "c1234_1_2"


def test_write_atomic_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "a.bin"
    write_atomic(str(target), b"x" * 10, {})
    write_atomic(str(target), b"y", {})
    assert target.read_bytes() == b"y"
    assert [p.name for p in target.parent.iterdir()] == ["a.bin"]


def test_results_of_runs_with_different_columns_read_as_one_table(tmp_path: Path) -> None:
    # An older run without a metric column sorts first; its column must not hide the newer one.
    results = tmp_path / "results"
    (results / "run=a").mkdir(parents=True)
    (results / "run=b").mkdir(parents=True)
    write(results / "run=a" / "part-0.parquet", {"sample_id": ["x"], "status": ["ok"]})
    write(
        results / "run=b" / "part-0.parquet",
        {"sample_id": ["y"], "status": ["ok"], "ssim": [0.5]},
    )
    (results / "run=b" / ".part-1.parquet.0f.tmp").write_bytes(b"half-written")
    table = read_results(str(results), {}).sort_by("sample_id")
    assert table.column("ssim").to_pylist() == [None, 0.5]
    assert read_results(str(results), {}, ["sample_id", "absent"]).column_names == ["sample_id"]
    assert read_results(str(tmp_path / "nothing"), {}) is None


# --- folder manifests whose files differ -------------------------------------------------------


def folder_of(tmp_path: Path, *tables: pa.Table) -> str:
    folder = tmp_path / "parts"
    folder.mkdir()
    for index, table in enumerate(tables):
        pq.write_table(table, folder / f"{index}.parquet")
    return str(folder)


def part(ids: list[str], **columns: pa.Array) -> pa.Table:
    n = len(ids)
    return pa.table({"sample_id": ids, "composite_uri": ["c"] * n, "mask_uri": ["m"] * n,
                     **columns})  # fmt: skip


def test_folder_schemas_are_unified_before_the_run(tmp_path: Path) -> None:
    """A wider integer in one file, a column only the second file has: both kept."""
    folder = folder_of(
        tmp_path,
        part(["a", "b"], score=pa.array([1, 2], pa.int32()), subset=pa.array(["x", "y"])),
        part(["c"], score=pa.array([2**40], pa.int64()), subset=pa.array(["z"], pa.large_string()),
             note=pa.array(["new"])),
    )  # fmt: skip
    manifest = open_manifest(folder, {})
    assert manifest.num_rows == 3
    assert {f.name: f.type for f in manifest.passthrough} == {
        "score": pa.int64(), "subset": pa.large_string(), "note": pa.string(),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        (pa.array(["1"]), pa.array([1]), "column 'score' is string in 0.parquet but int64 in "
         "1.parquet; no type holds both without changing values"),
        (pa.array([0.5]), pa.array([2**60]), "column 'score' is double in 0.parquet but int64 "
         "in 1.parquet"),
        (pa.array(["a"]), pa.array([1], pa.int32()), "is string in 0.parquet but int32"),
    ],
)  # fmt: skip
def test_folder_column_types_that_cannot_be_unified_are_refused(
    tmp_path: Path, first: pa.Array, second: pa.Array, message: str
) -> None:
    folder = folder_of(tmp_path, part(["a"], score=first), part(["b"], score=second))
    with pytest.raises(ManifestError) as error:
        open_manifest(folder, {})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_duplicate_ids_across_files_name_the_files(tmp_path: Path) -> None:
    folder = folder_of(tmp_path, part(["a", "b", "c"]), part(["d", "b"]), part(["e", ""]))
    with pytest.raises(ManifestError) as error:
        open_manifest(folder, {})
    assert str(error.value) == (
        "manifest: column 'sample_id' is null or empty in 2.parquet rows 1; column "
        "'sample_id' has 1 duplicated value(s) 'b' in 0.parquet rows 1; 1.parquet rows 1"
    )


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (pa.int32(), pa.int64(), pa.int64()),
        (pa.uint8(), pa.int8(), pa.int16()),
        (pa.uint32(), pa.int64(), pa.int64()),
        (pa.uint64(), pa.int64(), None),
        (pa.int32(), pa.float32(), pa.float64()),
        (pa.int64(), pa.float64(), None),  # float64 cannot hold every int64
        (pa.float32(), pa.float64(), pa.float64()),
        (pa.string(), pa.large_string(), pa.large_string()),
        (pa.dictionary(pa.int32(), pa.string()), pa.string(), pa.string()),
        (pa.null(), pa.timestamp("us"), pa.timestamp("us")),
        (pa.timestamp("ms"), pa.timestamp("us"), None),
        (pa.string(), pa.int64(), None),
    ],
)
def test_promote_only_where_no_value_changes(
    a: pa.DataType, b: pa.DataType, expected: pa.DataType | None
) -> None:
    assert promote(a, b) == expected and promote(b, a) == expected
