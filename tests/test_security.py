"""Credentials never reach logs, results or messages; output keys never leave the prefix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.datasets.demo import build_demo
from pipeline.storage import filesystem

REPO = Path(__file__).resolve().parent.parent


def test_config_repr_hides_storage_options() -> None:
    config = RunConfig("m", "o", storage_options={"secret": "hunter2-planted"})
    assert "hunter2-planted" not in repr(config) and "hunter2-planted" not in str(config)


def test_planted_secret_appears_nowhere(s3_server: dict[str, Any], s3_bucket: str) -> None:
    secret = f"PLANTED-{uuid.uuid4().hex}"
    env_secret = f"PLANTED-ENV-{uuid.uuid4().hex}"
    manifest = build_demo(f"s3://{s3_bucket}/demo", s3_server)
    fs, _ = filesystem(manifest, s3_server)
    with fs.open(manifest.removeprefix("s3://"), "rb") as handle:
        table = pq.read_table(handle)
    missing = table.slice(0, 1).set_column(0, "sample_id", pa.array(["missing"]))
    missing = missing.set_column(1, "composite_uri", pa.array(["composites/nothing.png"]))
    with fs.open(manifest.removeprefix("s3://"), "wb") as handle:
        pq.write_table(pa.concat_tables([table, missing]), handle)

    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": env_secret, "AWS_ACCESS_KEY_ID": "testing"}
    ray_tmp = Path(f"/tmp/ray-sec-{uuid.uuid4().hex[:8]}")
    env["RAY_TMPDIR"] = str(ray_tmp)
    run = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "harmonize.py"), "--manifest", manifest,
         "--output", f"s3://{s3_bucket}/out", "--endpoint-url", s3_server["endpoint_url"],
         "--storage-option", "key=testing-access-key", "--storage-option", f"secret={secret}",
         "--resolution", "64", "--ray-address", "local", "--num-cpus", "4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    printed = run.stdout + run.stderr
    assert run.returncode == 0, printed[-3000:]
    assert "8 ok, 1 error" in printed  # the error path ran too

    written = [fs.cat_file(path) for path in fs.find(f"{s3_bucket}/out")]
    assert len(written) >= 9  # 8 images and the results
    logs = [p.read_bytes() for p in ray_tmp.rglob("*") if p.is_file() and p.stat().st_size]
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert logs, "Ray wrote no logs where expected"
    for planted in (secret, env_secret):
        assert planted not in printed
        for blob in written + logs:
            assert planted.encode() not in blob
