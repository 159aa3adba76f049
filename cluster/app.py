"""Serve application builder: `import_path: cluster.app:build_app` in Serve YAML."""
from __future__ import annotations

from ray import serve

from cluster.config import ClusterConfig
from controller.actor import ControllerSpec
from deployments.gateway import Gateway
from deployments.model_server import ModelServer
from deployments.verifier import Verifier


def deployment_name(candidate: str) -> str:
    return f"model-{candidate}"


def _actor_options(c) -> dict:
    options = {"num_cpus": 0, "num_gpus": c.num_gpus}
    if c.worker_niceness is not None:  # Ray starts workers at nice 15; a replica that decodes is the work
        options["runtime_env"] = {"env_vars": {"RAY_worker_niceness": str(c.worker_niceness)}}
    if c.node_labels:  # preferred nodes, then any node: a candidate outlives the loss of its nodes
        options.update(label_selector=c.node_labels, fallback_strategy=[{"label_selector": {}}])
    return options


def build_app(args: dict | ClusterConfig | None = None) -> serve.Application:
    cfg = args if isinstance(args, ClusterConfig) else ClusterConfig.model_validate(args or {}).with_env()
    telemetry = cfg.telemetry
    verifiers = {}  # one full-depth verifier per distinct model, shared by its candidates
    for i, c in enumerate(cfg.candidates):
        if c.shadow_rate > 0 and c.engine.model not in verifiers:
            verifiers[c.engine.model] = Verifier.options(name=f"verifier-{i}").bind(c.engine, telemetry)
    servers = {
        c.name: ModelServer.options(name=deployment_name(c.name), max_ongoing_requests=c.ongoing_limit,
                                    max_queued_requests=c.max_queued_requests,
                                    ray_actor_options=_actor_options(c),
                                    **({"autoscaling_config": c.autoscaling_config} if c.autoscaling_config
                                       else {"num_replicas": c.replicas()})).bind(
            c, telemetry, verifiers.get(c.engine.model) if c.shadow_rate > 0 else None)
        for c in cfg.candidates
    }
    # the gateway starts the controller when none runs: under KubeRay nothing else would
    controller = ControllerSpec(cfg.controller, telemetry, {c.name: deployment_name(c.name) for c in cfg.candidates},
                                cfg.app_name)
    gw = cfg.gateway
    return Gateway.options(max_ongoing_requests=gw.max_ongoing_requests, max_queued_requests=gw.max_queued_requests
                           ).bind(servers, controller, cfg.default_max_tokens, cfg.admin_api_key,
                                  gw)
