"""GPU placement from the cluster, not the driver: the rules, and real multi-node Ray clusters.

The clusters are Ray's own multi-node test clusters on this machine (`ray.cluster_utils`): a
CPU-only head (where a `ray job submit` driver runs) and a worker node that *declares* one GPU.
The driver has no CUDA here, so the old rule (ask torch in the driver) gave every actor zero
GPUs. A node in a private mount namespace stands for a machine that does not share the
driver's disk.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.placement import ClusterGPUs, Placement, PlacementError, plan_placement

REPO = Path(__file__).resolve().parent.parent

# --- the rules (pure) ---------------------------------------------------------------------------


def gpus(now: float, most: float | None = None) -> ClusterGPUs:
    return ClusterGPUs(now=now, most=now if most is None else most)


def test_auto_uses_the_clusters_gpus_one_actor_each() -> None:
    placement = plan_placement("auto", None, None, gpus(4))
    assert placement == Placement("cuda", 1.0, 4, 4)
    assert placement.actor_options() == {"num_gpus": 1.0, "num_cpus": 1}
    assert placement.pool_size() == {"size": 4}


def test_auto_without_gpus_runs_one_cpu_actor_and_asks_for_no_gpu() -> None:
    placement = plan_placement("auto", None, None, gpus(0))
    assert placement == Placement("cpu", 0.0, 1, 1)
    assert placement.actor_options()["num_gpus"] == 0


def test_cpu_never_asks_for_a_gpu() -> None:
    assert plan_placement("cpu", 3, None, gpus(8)) == Placement("cpu", 0.0, 3, 3)
    with pytest.raises(PlacementError, match=r"--gpus-per-actor 0\.5 needs GPUs"):
        plan_placement("cpu", None, 0.5, gpus(8))


def test_cuda_on_a_cluster_without_gpus_is_one_line() -> None:
    with pytest.raises(PlacementError, match="--device cuda, but this Ray cluster has no GPU"):
        plan_placement("cuda", None, None, gpus(0))


def test_fractional_gpus_put_two_actors_on_a_card() -> None:
    placement = plan_placement("cuda", None, 0.5, gpus(2))
    assert placement == Placement("cuda", 0.5, 4, 4)
    assert placement.describe() == "4 GPU actor(s), 0.5 GPU each"


def test_concurrency_beyond_the_gpus_up_now_starts_what_fits_and_grows() -> None:
    """A static cluster never grows, so the pool runs with what fits; an autoscaler adds nodes
    for the pending actors. Either way the run starts, and never waits on an impossible pool."""
    assert plan_placement("auto", 2, None, gpus(4)).pool_size() == {"size": 2}
    assert plan_placement("auto", 3, None, gpus(2)).pool_size() == {"min_size": 2, "max_size": 3}
    for bad in (1.5, 0.0, -1.0):
        with pytest.raises(PlacementError, match="--gpus-per-actor must be"):
            plan_placement("cuda", None, bad, gpus(4))
    with pytest.raises(PlacementError, match="--gpus-per-actor 2: this Ray cluster has 1 GPU"):
        plan_placement("cuda", None, 2.0, gpus(1))


def test_an_autoscaling_cluster_starts_small_and_grows_to_its_gpu_nodes() -> None:
    """GPU workers scaled to zero: an autoscaler that reports its node types says what they
    can reach, the pool starts with one actor (whose GPU demand makes the
    autoscaler start a node) and grows to one per GPU it can add."""
    placement = plan_placement("auto", None, None, gpus(0, most=4))
    assert placement == Placement("cuda", 1.0, 1, 4)
    assert placement.pool_size() == {"min_size": 1, "max_size": 4}


# --- on Ray clusters ----------------------------------------------------------------------------


def harmonize(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI in its own process, as a job driver on the head: no CUDA, whatever torch says."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", *args, "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def results(output: Path) -> list[dict]:
    files = [str(p) for p in (output / "results").rglob("*.parquet")]
    return pads.dataset(files).to_table().to_pylist() if files else []


@pytest.fixture(scope="module")
def gpu_node_cluster() -> Iterator[tuple[str, str]]:
    """A CPU-only head and a worker node that declares one GPU; yields (address, its node id)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, connect=False, head_node_args={"num_cpus": 2, "num_gpus": 0}
    )
    node = cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    yield cluster.address, node.node_id
    cluster.shutdown()


def test_actors_go_to_the_gpu_node_even_though_the_driver_has_no_cuda(
    gpu_node_cluster: tuple[str, str], demo_manifest: str, tmp_path: Path
) -> None:
    """`--device auto` on a cluster with a GPU node: the model probe (placed exactly as the
    actors are) lands on the GPU node with a GPU id assigned. This machine's torch cannot use a
    declared-only GPU, so the run stops there, before any sample, with one line that says where
    it was placed, rather than falling back to the node's CPU in silence."""
    address, gpu_node = gpu_node_cluster
    out = tmp_path / "out"
    done = harmonize("-m", demo_manifest, "-o", str(out), "--ray-address", address)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert gpu_node[:12] in errors[0] and "Ray gave this worker GPU [" in errors[0], errors
    assert "sees no CUDA device" in errors[0]
    assert results(out) == [] and not (out / "images").exists()


def test_device_cpu_on_a_gpu_cluster_runs_on_cpu_and_says_so(
    gpu_node_cluster: tuple[str, str], demo_manifest: str, tmp_path: Path
) -> None:
    address, _ = gpu_node_cluster
    out = tmp_path / "out"
    done = harmonize("-m", demo_manifest, "-o", str(out), "--ray-address", address,
                     "--device", "cpu", "--concurrency", "2")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8 ok, 0 error" in done.stdout and "ran on:  cpu (8)" in done.stdout
    rows = results(out)
    assert len(rows) == 8 and {r["device"] for r in rows} == {"cpu"}


def test_device_cuda_without_gpus_fails_before_any_model_loads(
    ray_cluster: None, demo_manifest: str, tmp_path: Path
) -> None:
    """The session's local cluster has no GPU. The model dir does not exist: had anything
    tried to load the model, the error would be about that folder."""
    result = CliRunner().invoke(
        app,
        ["run", "-m", demo_manifest, "-o", str(tmp_path / "o"), "--model", "diffharmony",
         "--model-dir", str(tmp_path / "no-such-model"), "--device", "cuda", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--device cuda, but this Ray cluster has no GPU resources" in result.output
    assert "no-such-model" not in result.output
    assert not (tmp_path / "o" / "images").exists()


def _free_ports(count: int) -> list[int]:
    from ray_head import free_ports

    return free_ports(count)


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs unshare and root for a private mount namespace")  # fmt: skip
def test_a_local_output_that_another_node_cannot_see_is_refused_before_any_work(
    demo_manifest: str, tmp_path: Path
) -> None:
    """A second node started in its own mount namespace with an empty tmpfs over the output's
    parent folder: it cannot see what the driver writes there, as a machine without a shared
    mount. The run must say so before any work; an s3:// or shared output would be fine."""
    from ray.cluster_utils import Cluster

    hidden = tmp_path / "local-disk"
    hidden.mkdir()
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2})
    ports = _free_ports(6)
    ray_bin = str(Path(sys.executable).parent / "ray")
    start = (
        f"mount -t tmpfs tmpfs {hidden} && exec {ray_bin} start --block "
        f"--address={cluster.address} --num-cpus=1 --node-ip-address=127.0.0.1 "
        f"--node-manager-port={ports[0]} --object-manager-port={ports[1]} "
        f"--metrics-export-port={ports[2]} --dashboard-agent-listen-port={ports[3]} "
        f"--dashboard-agent-grpc-port={ports[4]} --runtime-env-agent-port={ports[5]}"
    )
    node = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", start],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(60):  # the cluster's own GCS view; this process stays unconnected
            if len(cluster.global_state._live_node_ids()) == 2:
                break
            time.sleep(1)
        else:
            raise AssertionError("the node in its own mount namespace did not join")
        out = hidden / "out"
        done = harmonize("-m", demo_manifest, "-o", str(out), "--ray-address", cluster.address)
        assert done.returncode == 2, done.stdout + done.stderr
        assert f"--output {out} is a local path that node" in done.stderr, done.stderr
        assert "cannot see" in done.stderr and not (out / "images").exists()
        assert list(out.iterdir()) == []  # the marker is gone too
    finally:
        os.killpg(node.pid, 15)
        node.wait(timeout=30)
        cluster.shutdown()
