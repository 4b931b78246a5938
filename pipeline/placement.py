"""Where a job runs: the Ray cluster it attaches to, and where the harmonizer actors run,
decided from the cluster, never from the driver's machine.

Enters: for `init_ray`, a job config's cluster options (address, CPUs, object store, whether
the workers' output reaches the driver's console); what
the user asked (`--device auto|cuda|cpu`, `--concurrency`, `--gpus-per-actor`) and what the
cluster offers (`ClusterGPUs`: GPU resources of the alive nodes, and the most its autoscaler
can add where it reports its node types); for `check_paths_reachable`, the local paths a run
reads or writes.
Leaves: Ray connected (`init_ray`); a `Placement` (the model's device, Ray resources per
actor, the actor pool's size), or a `PlacementError` with one line, before any model loads.

The driver (the head node under `ray job submit`) needs no GPU, no CUDA and no CUDA build of
torch: nothing here asks torch. An actor placed on a GPU gets the device `cuda`; if torch cannot
use the GPU Ray gave it, the actor fails loudly (`pipeline.harmonize.check_device`) instead of
running on the node's CPU.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import ray

from pipeline.config import Device


class ClusterOptions(Protocol):
    """What a job's config says about the Ray cluster (`RunConfig`, `ComposeConfig`)."""

    ray_address: str | None  # None: attach to a running cluster, else start one; "local": start
    num_cpus: int | None
    object_store_memory: int | None
    log_to_driver: bool  # Ray's switch: the workers' output on the driver's console too


class PlacementError(ValueError):
    """The request cannot be placed on this cluster; the message is one line for the user."""


@dataclass(frozen=True)
class ClusterGPUs:
    now: float  # GPU resources of the alive nodes
    most: float  # the most the cluster can have: `now`, or more where an autoscaler can add nodes

    @classmethod
    def of_cluster(cls) -> ClusterGPUs:
        """Read from the connected Ray cluster (`ray.init` done)."""
        now = float(ray.cluster_resources().get("GPU", 0))
        return cls(now=now, most=max(now, _autoscaler_max_gpus()))


def _autoscaler_max_gpus() -> float:
    """GPUs the autoscaler's node types can reach, where it reports them (autoscaler v2, KubeRay);
    0 when it does not. The same private call Ray Train uses to size its worker groups."""
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # not reported, or an API that moved: fall back to what is up now
        return 0.0
    return float(most.get("GPU", 0) or 0)


@dataclass(frozen=True)
class Placement:
    device: Literal["cuda", "cpu"]
    gpus_per_actor: float  # 0 on CPU
    min_actors: int
    max_actors: int  # > min_actors: the pool grows as the autoscaler adds GPU nodes

    def actor_options(self) -> dict[str, float]:
        """Ray resources of one harmonizer actor (and of the model probe task)."""
        return {"num_gpus": self.gpus_per_actor, "num_cpus": 1}

    def pool_size(self) -> dict[str, int]:
        """`ActorPoolStrategy` arguments."""
        if self.min_actors == self.max_actors:
            return {"size": self.min_actors}
        return {"min_size": self.min_actors, "max_size": self.max_actors}

    def describe(self) -> str:
        actors = (
            str(self.min_actors)
            if self.min_actors == self.max_actors
            else f"{self.min_actors} to {self.max_actors}"
        )
        if self.device == "cpu":
            return f"{actors} CPU actor(s)"
        return f"{actors} GPU actor(s), {self.gpus_per_actor:g} GPU each"


def plan_placement(
    device: Device, concurrency: int | None, gpus_per_actor: float | None, gpus: ClusterGPUs
) -> Placement:
    """The placement for a request on a cluster with `gpus` (pure; tested on its own).

    auto: GPUs when the cluster has or can add any, else CPU. cuda: GPUs, or an error when the
    cluster has none. cpu: never a GPU. GPU actors: `concurrency` of them, or one per
    `gpus_per_actor` of the GPUs the cluster has or can add; the pool starts with those that
    fit on the GPUs up now (at least one) and grows as GPU nodes join. CPU: `concurrency` or 1.
    """
    if concurrency is not None and concurrency < 1:
        raise PlacementError(f"--concurrency must be at least 1, got {concurrency}")
    use_gpu = device == "cuda" or (device == "auto" and gpus.most > 0)
    if not use_gpu:
        if gpus_per_actor is not None:
            raise PlacementError(
                f"--gpus-per-actor {gpus_per_actor:g} needs GPUs, but the model runs on CPU "
                + ("(--device cpu)" if device == "cpu" else "(this Ray cluster has no GPU)")
            )
        n = concurrency or 1
        return Placement("cpu", 0.0, n, n)
    if gpus.most <= 0:
        raise PlacementError(
            "--device cuda, but this Ray cluster has no GPU resources and reports no autoscaler "
            "node type with one: start GPU nodes (ray start --num-gpus, cluster.yaml workers) "
            "or use --device cpu"
        )
    share = 1.0 if gpus_per_actor is None else gpus_per_actor
    # Ray's rule: a fraction of one GPU, or whole GPUs.
    if not (share > 0 and (share <= 1 or float(share).is_integer())):
        raise PlacementError(
            f"--gpus-per-actor must be a fraction of one GPU (0.5, 0.25) or a whole number, "
            f"got {share:g}"
        )
    capacity = math.floor(gpus.most / share + 1e-9)
    if capacity < 1:
        raise PlacementError(
            f"--gpus-per-actor {share:g}: this Ray cluster has {gpus.most:g} GPU(s) in all"
        )
    up_now = math.floor(gpus.now / share + 1e-9)  # actors that fit on the GPUs up now
    # A pool that can start now (at least one actor: its GPU demand is what makes an autoscaler
    # add a node) and grows, as GPU nodes join, to what was asked or what the cluster can reach.
    wanted = concurrency if concurrency is not None else capacity
    return Placement("cuda", share, max(1, min(up_now, wanted)), wanted)


# --- paths that every node must see -------------------------------------------------------------


def is_local(uri: str) -> bool:
    """A plain path (or file://): only the machines that mount it can see it."""
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> str:
    return os.path.abspath(uri.removeprefix("file://"))


@ray.remote(num_cpus=0)
def _visible(paths: dict[str, str]) -> tuple[str, dict[str, bool]]:
    import socket

    where = f"{socket.gethostname()} ({ray.get_runtime_context().get_node_id()[:12]})"
    return where, {name: os.path.exists(path) for name, path in paths.items()}


def check_paths_reachable(paths: dict[str, str], output: str) -> None:
    """On a cluster of several nodes, every local path of the run must be the same on each node
    (a shared mount): fetch and write tasks and the actors run on any of them. The driver writes
    a marker under `output`, and one task per alive node looks for it and for the other paths.
    Raises `PlacementError` naming the option, the path and a node that cannot see it."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0)]
    local = {name: _local_path(uri) for name, uri in paths.items() if is_local(uri)}
    if len(nodes) < 2 or not (local or is_local(output)):
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = None
    if is_local(output):
        marker = os.path.join(_local_path(output), f".placement-check-{uuid.uuid4().hex}")
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        open(marker, "w").close()
        local["--output"] = marker
    try:
        checks: list[Any] = [
            _visible.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(local)
            for n in nodes
        ]
        for where, seen in ray.get(checks, timeout=120):
            missing = [name for name, ok in seen.items() if not ok]
            if missing:
                name = missing[0]
                shown = paths.get(name, output)
                raise PlacementError(
                    f"{name} {shown} is a local path that node {where} cannot see: on a "
                    "cluster of several nodes use object storage (s3://, gs://, …) or a "
                    "filesystem mounted at the same path on every node"
                )
    finally:
        if marker:
            os.remove(marker)


def init_ray(config: ClusterOptions) -> None:
    """Attach to a running cluster (`ray job submit`, RAY_ADDRESS, `ray start`), else start one.

    Sizing is passed only when starting a local cluster: `ray.init(num_cpus=…)` raises when it
    connects to an existing one. Local clusters get more logical CPUs than cores, so that the
    I/O stages and the actor pool cannot deadlock waiting for each other on small machines.
    `log_to_driver` (Ray's own switch): the workers' output on this console, or only in Ray's
    session folder.
    """
    if ray.is_initialized():
        return
    options = {"log_to_driver": config.log_to_driver}
    if config.ray_address not in (None, "local"):
        ray.init(address=config.ray_address, **options)
        return
    if config.ray_address is None:
        try:
            ray.init(address="auto", **options)
            return
        except ConnectionError:
            pass
    ray.init(
        address="local",
        num_cpus=config.num_cpus or max(4, 2 * (os.cpu_count() or 1)),
        object_store_memory=config.object_store_memory,
        **options,
    )
