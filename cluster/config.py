"""The cluster's one config schema: composes each layer's own config model.

Used by the CLI (`helios serve --config x.yaml`, or HELIOS_CONFIG) and by Serve YAML through
`import_path: cluster.app:build_app` (the same fields under `args`).
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from controller.config import ControllerConfig
from deployments.http_limits import GatewayConfig
from deployments.model_server import CandidateConfig
from engine import EngineConfig
from engine.config import problems
from telemetry.schema import TelemetryConfig


def _default_candidates() -> list[CandidateConfig]:
    return [CandidateConfig(name="smollm2", engine=EngineConfig(model="smollm2")),
            CandidateConfig(name="gemma3", engine=EngineConfig(model="gemma3"))]


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a cluster YAML is an error, not a silent default

    candidates: list[CandidateConfig] = Field(default_factory=_default_candidates, min_length=1)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="Admission limits, timeouts and "
                                   "API keys of the HTTP gateway.")
    host: str = Field("127.0.0.1", description="Address the HTTP gateway binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port of the HTTP gateway.")
    app_name: str = "helios"
    default_max_tokens: int = Field(64, ge=1)
    metrics_port: int = Field(8080, ge=0, le=65535, description="Where Ray's metrics agent serves Prometheus "
                                                                 "text (local start).")
    admin_api_key: str | None = Field(None, description="Enables the admin API (operator actions); "
                                                        "HELIOS_ADMIN_KEY overrides it.")

    @model_validator(mode="after")
    def _unique_names(self):
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names) or "auto" in names:
            raise ValueError(f"candidate names must be unique and not 'auto': {names}")
        return self

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ClusterConfig":
        """From a YAML file (or HELIOS_CONFIG), with REDIS_URL overriding the telemetry URL."""
        path = path or os.environ.get("HELIOS_CONFIG")
        data = yaml.safe_load(Path(path).read_text()) if path else {}
        try:
            return cls.model_validate(data or {}).with_env()
        except ValidationError as e:  # each problem as "file: where.in.it: what", the way an editor finds it
            raise ValueError("\n".join(f"{path or 'embedded defaults'}: {p}" for p in problems(e))) from None

    def with_env(self) -> "ClusterConfig":
        """REDIS_URL, HELIOS_ADMIN_KEY and HELIOS_API_KEYS override the file: secrets stay out of config (Kubernetes)."""
        if os.environ.get("REDIS_URL"):
            self.telemetry.redis_url = os.environ["REDIS_URL"]
        if os.environ.get("HELIOS_ADMIN_KEY"):
            self.admin_api_key = os.environ["HELIOS_ADMIN_KEY"]
        self.gateway.with_env()
        return self
