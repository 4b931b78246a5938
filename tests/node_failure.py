"""Kill a worker node in the middle of a run, on Ray's multi-node test cluster (one machine).

Test infrastructure, run as a script by `test_node_failure.py` (a process of its own: a driver
can be connected to one cluster only, and the test session already has one):

    python tests/node_failure.py WORK MANIFEST MODEL_URI

Starts a head node without CPUs (the driver only) and two worker nodes, each with its own
HOME and so its own model cache (as separate machines would have). Runs the pipeline in a
thread; once images appear, kills (SIGKILL, no grace) the worker node hosting a harmonizer
actor. If the run fails, it is run again with the same run id, as an operator would. Prints
one JSON line: what happened and where each node's HOME is, for the test to check.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

from pipeline.config import ModelConfig, RunConfig
from pipeline.preflight import storage_failure
from pipeline.run import RunSummary, run

RUN_ID = "node-death"


def main(work: Path, manifest: str, model_uri: str) -> dict[str, Any]:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": 100 * 1024**2,
            "include_dashboard": False,
        },
    )
    homes = {}
    for name in ("a", "b"):
        home = work / f"home-{name}"
        home.mkdir(parents=True)
        node = cluster.add_node(num_cpus=3, object_store_memory=100 * 1024**2,
                                env_vars={"HOME": str(home)})  # fmt: skip
        homes[node.node_id] = home
    ray.init(address=cluster.address, log_to_driver=False)

    model = ModelConfig(name="diffharmony", model_dir=model_uri, resolution=64, steps=1,
                        refine=False)  # fmt: skip
    config = RunConfig(manifest, str(work / "out"), model=model, run_id=RUN_ID, concurrency=2,
                       batch_size=2, results_rows_per_file=4, show_progress=False)  # fmt: skip
    outcome: dict[str, Any] = {}

    def first_run() -> None:
        try:
            outcome["summary"] = run(config)
        except Exception as exc:  # reported, then resumed below
            outcome["error"] = storage_failure(exc) or f"{type(exc).__name__}: {exc}"[:500]

    thread = threading.Thread(target=first_run)
    thread.start()
    images = work / "out" / "images"
    deadline = time.monotonic() + 300
    while not (images.is_dir() and len(list(images.glob("*.png"))) >= 4):
        if not thread.is_alive() or time.monotonic() > deadline:
            return {"problem": "no images before the run ended or timed out", **outcome}
        time.sleep(0.05)
    # The actor table from the GCS (the state API would need the dashboard, left out here).
    actors = ray._private.state.actors(actor_state_name="ALIVE").values()
    harmonizer_nodes = {
        a["Address"]["NodeID"] for a in actors if "HarmonizeActor" in a["ActorClassName"]
    }
    victim = next(n for n in cluster.worker_nodes if n.node_id in harmonizer_nodes)
    images_at_kill = len(list(images.glob("*.png")))
    cluster.remove_node(victim, allow_graceful=False)
    thread.join(timeout=600)

    report: dict[str, Any] = {
        "killed_home": str(homes[victim.node_id]),
        "surviving_home": str(next(h for n, h in homes.items() if n != victim.node_id)),
        "images_at_kill": images_at_kill,
        "first": _summary(outcome.get("summary")),
        "first_error": outcome.get("error"),
    }
    if "summary" not in outcome:  # failed: the operator reruns the same command
        report["resumed"] = _summary(run(config))
    ray.shutdown()
    cluster.shutdown()
    return report


def _summary(summary: RunSummary | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    return {"samples": summary.samples, "ok": summary.ok, "skipped": summary.skipped}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])))
