"""A two-node Ray cluster on this machine, run in its own process by test_two_nodes.py (Ray is one per
process): two candidates placed on different nodes by node labels; the worker node is killed; the
candidate it held comes back on the head node. Prints what it saw as one JSON line."""
import json
import sys
import time

import ray
from ray import serve
from ray.cluster_utils import Cluster

from cluster.app import build_app, deployment_name
from cluster.config import ClusterConfig


def where(cfg: ClusterConfig) -> dict[str, str]:
    return {c.name: serve.get_deployment_handle(deployment_name(c.name), cfg.app_name).stats.remote()
            .result(timeout_s=120).node_id for c in cfg.candidates}


def main(home: str, redis_url: str, port: int) -> dict:
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "labels": {"helios-pool": "head"}})
    worker = nodes.add_node(num_cpus=2, labels={"helios-pool": "worker"})
    ray.init(address=nodes.address, namespace="helios-two-nodes")
    engine = {"model": "smollm2", "depth": 2, "exits": False, "max_batch_size": 2, "home": home}
    cfg = ClusterConfig.model_validate({
        "app_name": "two-nodes", "port": port,
        "candidates": [{"name": "a", "engine": engine, "shadow_rate": 0, "num_replicas": 1,
                        "node_labels": {"helios-pool": "head"}},
                       {"name": "b", "engine": engine, "shadow_rate": 0, "num_replicas": 1,
                        "node_labels": {"helios-pool": "worker"}}],
        "controller": {"actor_name": "two-nodes-controller", "namespace": "helios-two-nodes"},
        "telemetry": {"redis_url": redis_url}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
    ids = {n["Labels"].get("helios-pool"): n["NodeID"] for n in ray.nodes()}
    before = where(cfg)
    nodes.remove_node(worker)
    deadline, after = time.time() + 240, None
    while time.time() < deadline and after is None:
        try:
            after = where(cfg)
        except Exception:  # noqa: BLE001 - the replacement replica is still starting
            time.sleep(2)
    result = {"head": ids["head"], "worker": ids["worker"], "before": before, "after": after}
    serve.shutdown()
    ray.shutdown()
    nodes.shutdown()
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
