"""Start the whole cluster on this machine: Redis (embedded unless REDIS_URL), Ray, Serve, controller."""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

import ray
import redis
from ray import serve

from cluster.app import build_app, deployment_name
from cluster.config import ClusterConfig
from controller.actor import ensure_controller


class RedisUnreachable(RuntimeError):
    pass


def check_redis(url: str) -> None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
    except redis.RedisError as e:
        raise RedisUnreachable(f"Redis at {url} is unreachable: {e}") from e


def start_embedded_redis() -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnreachable("REDIS_URL is unset and no redis-server binary is installed "
                               "(apt-get install redis-server, or set REDIS_URL)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", tempfile.mkdtemp(prefix="helios-redis-")], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            check_redis(url)
            return proc, url
        except RedisUnreachable:
            time.sleep(0.05)
    proc.kill()
    raise RedisUnreachable(f"embedded redis-server did not start on {url}")


@dataclass
class LocalCluster:
    config: ClusterConfig
    url: str
    controller: object
    redis_proc: subprocess.Popen | None

    def shutdown(self) -> None:
        serve.shutdown()
        ray.shutdown()
        if self.redis_proc is not None:
            self.redis_proc.terminate()
            self.redis_proc.wait(10)


def start(config: ClusterConfig, embedded_redis: bool) -> LocalCluster:
    """Bring everything up; Redis is checked first so a bad URL fails before any model loads."""
    proc = None
    if embedded_redis:
        proc, config.telemetry.redis_url = start_embedded_redis()
    else:
        check_redis(config.telemetry.redis_url)
    ray.init(namespace=config.controller.namespace, ignore_reinit_error=True, include_dashboard=False,
             _metrics_export_port=config.metrics_port)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=config.app_name, route_prefix="/")
    return LocalCluster(config, f"http://{config.host}:{config.port}", start_controller(config), proc)


def start_controller(config: ClusterConfig):
    """The named, detached controller actor (the existing one if it runs), started."""
    deployments = {c.name: deployment_name(c.name) for c in config.candidates}
    controller = ensure_controller(config.controller.model_dump(mode="json"), config.telemetry.model_dump(),
                                   deployments, config.app_name)
    ray.get(controller.start.remote())
    return controller
