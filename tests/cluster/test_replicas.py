"""A candidate served by several replicas (what `num_replicas: auto` gives on a small CPU box): the
depth and exit thresholds the controller sets reach every replica, not only the one its call reached."""
import time

import pytest
import ray
import redis

pytestmark = pytest.mark.slow


def test_every_replica_serves_the_depth_and_thresholds_the_controller_set(cluster, smollm2_calibrated, redis_url):
    from ray import serve

    from cluster.app import build_app, deployment_name
    from cluster.config import ClusterConfig
    from cluster.local import start_controller

    db = redis_url.rsplit("/", 1)[0] + "/6"  # its own controller state: the package's cluster keeps /0
    redis.Redis.from_url(db).flushdb()
    ref, _ = smollm2_calibrated
    cfg = ClusterConfig.model_validate({
        "app_name": "pair",
        "candidates": [{"name": "pair", "engine": {"model": "smollm2", "home": str(ref.home), "max_batch_size": 2},
                        "shadow_rate": 0, "num_replicas": 2}],
        "controller": {"actor_name": "pair-controller", "thresholds": {"enabled": False}},
        "telemetry": {"redis_url": db, "flush_every_s": 0.5}})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/pair")
    controller = start_controller(cfg)
    try:
        pair = serve.get_deployment_handle(deployment_name("pair"), cfg.app_name)
        layers = sorted(pair.stats.remote().result().thresholds)
        want = {l: 0.97 - 0.01 * i for i, l in enumerate(layers)}
        ray.get(controller.set_depth.remote("pair", 20))
        ray.get(controller.set_thresholds.remote("pair", want))
        seen, deadline = {}, time.time() + 60
        while time.time() < deadline:
            s = pair.stats.remote().result()
            seen[s.replica] = (s.depth, s.thresholds)
            if len(seen) == 2 and all(v == (20, want) for v in seen.values()):
                break
            time.sleep(0.1)
        assert len(seen) == 2 and all(v == (20, want) for v in seen.values()), seen
    finally:
        ray.kill(controller, no_restart=True)
        serve.delete(cfg.app_name)
