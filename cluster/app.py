"""Serve application builder: `import_path: cluster.app:build_app` in Serve YAML."""
from __future__ import annotations

from ray import serve

from cluster.config import ClusterConfig
from deployments.gateway import Gateway
from deployments.model_server import ModelServer
from deployments.verifier import Verifier


def deployment_name(candidate: str) -> str:
    return f"model-{candidate}"


def build_app(args: dict | ClusterConfig | None = None) -> serve.Application:
    cfg = args if isinstance(args, ClusterConfig) else ClusterConfig.model_validate(args or {})
    telemetry = cfg.telemetry.model_dump()
    verifiers = {}  # one full-depth verifier per distinct model, shared by its candidates
    for i, c in enumerate(cfg.candidates):
        if c.shadow_rate > 0 and c.engine.model not in verifiers:
            verifiers[c.engine.model] = Verifier.options(name=f"verifier-{i}").bind(
                c.engine.model_dump(mode="json"), telemetry)
    servers = {
        c.name: ModelServer.options(name=deployment_name(c.name), num_replicas=c.num_replicas,
                                    max_ongoing_requests=c.max_ongoing_requests).bind(
            c.model_dump(mode="json"), telemetry, verifiers.get(c.engine.model) if c.shadow_rate > 0 else None)
        for c in cfg.candidates
    }
    return Gateway.bind(servers, (cfg.controller.actor_name, cfg.controller.namespace), cfg.default_max_tokens)
