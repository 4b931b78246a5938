"""A Ray head of the test's own on loopback, for `ray job submit` tests.

The head runs as `ray start --block` in a process the test owns; stopping that process stops
its cluster only (`ray stop` would kill every Ray process on the machine, the test session's
own cluster included).
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the job's `python` and `ray` must be this environment's


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


@dataclass(frozen=True)
class Head:
    url: str
    env: dict[str, str]

    def submit(self, script: str, arguments: list[str], timeout: float) -> str:
        """`ray job submit --working-dir REPO -- python {script} …`: what it printed (asserts
        that it succeeded)."""
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", self.url, "--working-dir",
             str(REPO), "--", "python", script, *arguments],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        printed = job.stdout + job.stderr
        assert job.returncode == 0, printed[-4000:]
        assert "succeeded" in printed, printed[-4000:]
        return printed


@contextlib.contextmanager
def local_head(tmp_path: Path) -> Iterator[Head]:
    """`ray start --head` with token auth on free loopback ports, stopped on exit."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["RAY_AUTH_MODE"] = "token"
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, agent_listen, agent_grpc, metrics, runtime_env, client = free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # unix socket paths must stay short
    log_path = tmp_path / "head.log"
    log = log_path.open("w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         f"--dashboard-agent-listen-port={agent_listen}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", f"--ray-client-server-port={client}",
         "--num-cpus=4", "--include-dashboard=true", f"--temp-dir={temp_dir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(url, head, log_path)
        yield Head(url, env)
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
