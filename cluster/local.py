"""Start the whole cluster on this machine: Redis (embedded unless REDIS_URL), Ray, Serve, controller."""
from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import redis
from ray import serve

from cluster.app import build_app, deployment_name
from cluster.config import ClusterConfig
from controller.actor import ControllerSpec, ensure_controller
from engine.config import helios_home
from telemetry.schema import redact_url


class RedisUnreachable(RuntimeError):
    pass


def check_redis(url: str) -> None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
    except redis.RedisError as e:
        raise RedisUnreachable(f"Redis at {redact_url(url)} is unreachable: {e}") from e


class EmbeddedRedis:
    """A redis-server for `helios serve` when REDIS_URL is unset: loopback only, its append-only file
    under HELIOS_HOME/redis (routing, profiles and the decision log survive a restart), and restarted
    on the same port by a watcher thread if the process dies."""

    def __init__(self, data_dir: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisUnreachable("REDIS_URL is unset and no redis-server binary is installed "
                                   "(apt-get install redis-server, or set REDIS_URL)")
        data_dir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                     "--dir", str(data_dir)]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.restarts = 0
        self._stopping = threading.Event()
        self.proc = self._launch()
        threading.Thread(target=self._watch, name="embedded-redis", daemon=True).start()

    def _launch(self) -> subprocess.Popen:
        proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL)
        for _ in range(200):
            try:
                check_redis(self.url)
                return proc
            except RedisUnreachable:
                if proc.poll() is not None:
                    break
                time.sleep(0.05)
        proc.kill()
        raise RedisUnreachable(f"embedded redis-server did not start on {self.url}")

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            if self.proc.poll() is not None and not self._stopping.is_set():
                try:
                    self.proc = self._launch()
                    self.restarts += 1
                except RedisUnreachable:
                    pass  # tried again on the next round

    def stop(self) -> None:
        self._stopping.set()
        self.proc.terminate()
        self.proc.wait(10)


@dataclass
class LocalCluster:
    config: ClusterConfig
    url: str
    controller: object
    redis: EmbeddedRedis | None

    def shutdown(self) -> None:
        serve.shutdown()
        ray.shutdown()
        if self.redis is not None:
            self.redis.stop()


def start(config: ClusterConfig, embedded_redis: bool) -> LocalCluster:
    """Bring everything up; Redis is checked first so a bad URL fails before any model loads."""
    embedded = None
    if embedded_redis:
        embedded = EmbeddedRedis(helios_home() / "redis")
        config.telemetry.redis_url = embedded.url
    else:
        check_redis(config.telemetry.redis_url)
    ray.init(namespace=config.controller.namespace, ignore_reinit_error=True, include_dashboard=False,
             _metrics_export_port=config.metrics_port)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=config.app_name, route_prefix="/")
    return LocalCluster(config, f"http://{config.host}:{config.port}", start_controller(config), embedded)


def start_controller(config: ClusterConfig):
    """The named, detached controller actor (the existing one if it runs), started."""
    deployments = {c.name: deployment_name(c.name) for c in config.candidates}
    controller = ensure_controller(ControllerSpec(config.controller, config.telemetry, deployments, config.app_name))
    ray.get(controller.start.remote())
    return controller
