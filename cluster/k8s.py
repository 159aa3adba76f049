"""Kubernetes manifests generated from the cluster config: `helios k8s render`.

The RayService's `serveConfigV2` is `ClusterConfig` itself, as the `args` of
`cluster.app:build_app`, so the schema that validates `helios serve` validates the cluster too.
Secrets stay out of it: REDIS_URL and HELIOS_ADMIN_KEY reach the pods as environment variables
from Secrets, and `build_app` applies them. Kustomize layers the rest (k8s/base, k8s/overlays).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from cluster.config import ClusterConfig
from telemetry.dashboards import dashboard_json

IMAGE = "ghcr.io/helios-serve/helios-serve:0.1.0"
RAY_VERSION = "2.60.0"
POD_LABELS = {"app.kubernetes.io/name": "helios-serve"}  # what the PodMonitor selects

ENV = [
    {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "helios-redis", "key": "password"}}},
    # Kubernetes expands $(VAR) from variables defined earlier in the list
    {"name": "REDIS_URL", "value": "redis://:$(REDIS_PASSWORD)@helios-redis:6379/0"},
    {"name": "HELIOS_ADMIN_KEY", "valueFrom": {"secretKeyRef": {"name": "helios-admin", "key": "api-key",
                                                                 "optional": True}}},
    {"name": "HELIOS_API_KEYS", "valueFrom": {"secretKeyRef": {"name": "helios-api-keys", "key": "keys",
                                                                "optional": True}}},
    {"name": "HELIOS_HOME", "value": "/home/ray/helios"},
]


class _Dumper(yaml.SafeDumper):
    """Block scalars for multi-line strings (serveConfigV2 stays readable); no anchors."""

    def ignore_aliases(self, data):
        return True


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                             style="|" if "\n" in s else None))


def dump(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False)


def serve_config(cfg: ClusterConfig) -> dict:
    """Serve's multi-application config with our schema under `args`."""
    # secrets come from the environment (Secrets), never from the committed config
    args = cfg.model_dump(mode="json", exclude={"host": True, "port": True, "metrics_port": True,
                                                "admin_api_key": True, "gateway": {"api_keys"}})
    args["telemetry"].pop("redis_url")  # from REDIS_URL
    return {"http_options": {"host": "0.0.0.0", "port": cfg.port},
            "applications": [{"name": cfg.app_name, "import_path": "cluster.app:build_app", "route_prefix": "/",
                              "args": args}]}


# the only places a read-only root leaves writable: Ray's session files (/tmp/ray), the token Ray
# keeps under ~/.ray, library caches under ~/.cache. The converted models under HELIOS_HOME are
# baked into the image and only read
WRITABLE = {"tmp": "/tmp", "ray-home": "/home/ray/.ray", "cache": "/home/ray/.cache"}


def _container(name: str, resources: dict, ports: list[dict]) -> dict:
    return {"name": name, "image": IMAGE, "env": ENV, "resources": resources, "ports": ports,
            "volumeMounts": [{"name": v, "mountPath": path} for v, path in WRITABLE.items()],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                                "seccompProfile": {"type": "RuntimeDefault"}}}


def _pod(container: dict) -> dict:
    return {"containers": [container], "volumes": [{"name": v, "emptyDir": {}} for v in WRITABLE]}


def one_replica_each(cfg: ClusterConfig) -> ClusterConfig:
    """`num_replicas: auto` counts the CPUs where the app is built: under KubeRay that is the head,
    not the workers the replicas run on, so each candidate starts as one replica there (set
    `autoscaling_config` for more)."""
    return cfg.model_copy(update={"candidates": [
        c.model_copy(update={"num_replicas": 1}) if c.num_replicas == "auto" else c for c in cfg.candidates]},
        deep=True)


def rayservice(cfg: ClusterConfig, gpu: bool) -> dict:
    """Head without GPUs (gateway, controller, Serve), workers holding the candidates."""
    cfg = one_replica_each(cfg)
    head_ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}, {"containerPort": cfg.port, "name": "serve"},
                  {"containerPort": cfg.metrics_port, "name": "metrics"}]
    worker_res = {"limits": {"cpu": "8", "memory": "32Gi", **({"nvidia.com/gpu": "1"} if gpu else {})},
                  "requests": {"cpu": "4", "memory": "16Gi", **({"nvidia.com/gpu": "1"} if gpu else {})}}
    worker_spec = _pod(_container("ray-worker", worker_res, [{"containerPort": cfg.metrics_port, "name": "metrics"}]))
    if gpu:
        worker_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": "helios", "labels": POD_LABELS},
        "spec": {
            "serveConfigV2": dump(serve_config(cfg)),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {
                    # num-cpus 0: no replica is placed on the head; it runs Serve's proxy and controller
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                                       "metrics-export-port": str(cfg.metrics_port)},
                    "template": {"metadata": {"labels": POD_LABELS}, "spec": _pod(_container(
                        "ray-head", {"limits": {"cpu": "2", "memory": "8Gi"},
                                     "requests": {"cpu": "1", "memory": "4Gi"}}, head_ports))},
                },
                "workerGroupSpecs": [{
                    "groupName": "gpu" if gpu else "cpu", "replicas": 1, "minReplicas": 1, "maxReplicas": 4,
                    "rayStartParams": {"metrics-export-port": str(cfg.metrics_port)},
                    "template": {"metadata": {"labels": POD_LABELS}, "spec": worker_spec},
                }],
            },
        },
    }


def gpu_config(cfg: ClusterConfig) -> ClusterConfig:
    """The same candidates on CUDA, sharing one GPU per worker."""
    share = 1 / len(cfg.candidates)
    return cfg.model_copy(update={"candidates": [
        c.model_copy(update={"num_gpus": share, "engine": c.engine.model_copy(update={"device": "cuda"})})
        for c in cfg.candidates]}, deep=True)


def render(cfg: ClusterConfig, root: Path) -> list[Path]:
    """Write the generated parts of k8s/: the two RayServices and the dashboard ConfigMap's source."""
    files = {
        root / "base" / "rayservice.yaml": dump(rayservice(cfg, gpu=False)),
        root / "overlays" / "gpu" / "rayservice.yaml": dump(rayservice(gpu_config(cfg), gpu=True)),
        root / "base" / "dashboards" / "helios.json": dashboard_json(),
    }
    header = "# generated by `helios k8s render` from cluster/config.py; do not edit\n"
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if path.suffix == ".json" else header + text)
    return list(files)
