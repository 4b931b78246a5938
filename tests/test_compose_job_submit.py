"""The copy-paste recipe through `ray job submit` against a `ray start --head` on loopback:
jobs/compose.py, then jobs/harmonize.py on its manifest, then jobs/export.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from pycocotools.coco import COCO
from test_compose import write_inputs
from test_job_submit import REPO, free_ports, wait_for_dashboard


def test_compose_run_export_as_ray_jobs(tmp_path: Path) -> None:
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
    objects, backgrounds = write_inputs(str(tmp_path / "inputs"), {}, backgrounds=2)
    composed, harmonized = tmp_path / "composed", tmp_path / "harmonized"
    coco = tmp_path / "train" / "instances.json"
    jobs = [
        ("compose", ["--objects", objects, "--backgrounds", backgrounds, "-o", str(composed),
                     "--per-background", "2", "--max-objects", "2", "--no-progress"],
         "4 composites, 4 ok, 0 error"),
        ("harmonize", ["--manifest", str(composed / "manifest"), "--output", str(harmonized),
                       "--resolution", "64", "--no-progress"], "4 samples, 4 ok, 0 error"),
        ("export", ["--results", str(harmonized), "--where", "bg_psnr > 35", "--out", str(coco)],
         "selected 4 of 4 samples where bg_psnr > 35; exported 4 images"),
    ]  # fmt: skip
    try:
        wait_for_dashboard(url, head, log_path)
        for name, arguments, expected in jobs:
            job = subprocess.run(
                [str(bin_dir / "ray"), "job", "submit", "--address", url, "--working-dir",
                 str(REPO), "--", "python", f"jobs/{name}.py", *arguments],
                env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            printed = job.stdout + job.stderr
            assert job.returncode == 0, printed[-4000:]
            assert "succeeded" in printed and expected in printed, printed[-4000:]
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    dataset = COCO(str(coco))
    assert len(dataset.getImgIds()) == 4 and dataset.getAnnIds()
    for image in dataset.loadImgs(dataset.getImgIds()):
        assert image["file_name"].startswith(str(harmonized / "images"))
        assert Path(image["file_name"]).is_file()
