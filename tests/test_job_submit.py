"""The real thing: `ray start --head` on loopback, `ray job submit` of jobs/harmonize.py.

The head runs as `ray start --block` in a process this test owns; stopping that process stops
its cluster only (`ray stop` would kill every Ray process on the machine, the test session's
own cluster included).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.dataset as pads
from tiny_checkpoint import write_harmony_classifier, write_tiny_model_dir

REPO = Path(__file__).resolve().parent.parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def wait_for_dashboard(url: str, head: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited:\n" + log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
                json.load(response)
                return
        except urllib.error.HTTPError:
            return  # answering (401 without the token): the job API is up
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no Ray dashboard at {url} after {timeout} s")


def test_ray_job_submit_against_local_head(demo_manifest: str, tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent  # the job's `python` must be this environment's
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env["RAY_AUTH_MODE"] = "token"
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, agent_listen, agent_grpc, metrics, runtime_env, client = free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # unix socket paths must stay short
    log_path = tmp_path / "head.log"
    log = log_path.open("w")
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         f"--dashboard-agent-listen-port={agent_listen}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", f"--ray-client-server-port={client}",
         "--num-cpus=4", "--include-dashboard=true", f"--temp-dir={temp_dir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{dashboard}"
    output = tmp_path / "out"
    generated = tmp_path / "generated"
    try:
        wait_for_dashboard(url, head, log_path)
        job = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO),
             "--", "python", "jobs/harmonize.py", "--manifest", demo_manifest,
             "--output", str(output), "--resolution", "128", "--no-progress",
             "--run-id", "submitted"],
            env=env, capture_output=True, text=True, timeout=420,
        )  # fmt: skip
        printed = job.stdout + job.stderr
        assert job.returncode == 0, printed[-4000:]
        assert "succeeded" in printed and "8 samples, 8 ok, 0 error" in printed

        # DiffHarmony++ through the same entry point: inverse harmonization (two variants per
        # real image) with the harmony classifier, both in the release's formats.
        inverse_dir = write_tiny_model_dir(
            tmp_path / "inverse", harmony_vae=True, direction="inverse"
        )
        classifier = write_harmony_classifier(tmp_path / "harmony_classifier")
        job = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO),
             "--", "python", "jobs/harmonize.py", "--manifest", demo_manifest,
             "--output", str(generated), "--model", "diffharmony", "--model-dir",
             str(inverse_dir), "--direction", "inverse", "--variants", "2", "--classifier",
             str(classifier), "--allow-unsafe-pickle", "--resolution", "64", "--steps", "2",
             "--no-progress", "--run-id", "inverse"],
            env=env, capture_output=True, text=True, timeout=420,
        )  # fmt: skip
        printed = job.stdout + job.stderr
        assert job.returncode == 0, printed[-4000:]
        assert "succeeded" in printed and "16 samples, 16 ok, 0 error" in printed
        assert "harmony classifier: mean unharmony_prob" in printed
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    results = pads.dataset(str(output / "results" / "submitted")).to_table()
    assert results.num_rows == 8 and set(results["status"].to_pylist()) == {"ok"}
    for uri in results["output_uri"].to_pylist():
        assert Path(uri).is_file()
    rows = pads.dataset(str(generated / "results" / "inverse")).to_table().to_pylist()
    assert sorted(r["sample_id"] for r in rows) == sorted(
        f"{r['source_sample_id']}__v{k}" for r in rows if r["variant"] == 0 for k in (0, 1)
    )
    assert all(Path(r["output_uri"]).name == f"{r['sample_id']}.png" for r in rows)
    assert all(r["unharmony_prob"] is not None and r["direction"] == "inverse" for r in rows)
