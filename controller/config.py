"""Controller settings: the SLO objective, quality floor and HELIOS loop constants."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from controller.policies import Objective
from controller.thresholds import TunerConfig


class ControllerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a cluster YAML is an error, not a silent default

    actor_name: str = Field("helios-controller", description="Name of the detached controller actor.")
    namespace: str = Field("helios", description="Ray namespace the actor lives in.")
    objective: Objective = Field(Objective.MAX_THROUGHPUT, description="What the SLO optimises.")
    quality_floor: float = Field(0.9, ge=0, le=1, description="Minimum agreement with the full model.")
    profile_every: int = Field(150, ge=1, description="Re-profile all candidates every N requests.")
    profile_sample: int = Field(5, ge=1, description="Requests per candidate in one profiling round.")
    breach_window: int = Field(100, ge=1, description="Tokens in the sliding breach window.")
    breach_max: int = Field(50, ge=0, description="Breaches tolerated inside the window.")
    greedy_share: float = Field(0.9, gt=0, le=1, description="Share of exits the loaded depth must cover.")
    tick_s: float = Field(1.0, gt=0, description="How often the controller reads telemetry.")
    windows: int = Field(6, ge=1, description="Telemetry windows each tick reads (windows x telemetry.window_s "
                                              "seconds of history): the span of measured speed and exits.")
    min_shadow_checks: int = Field(20, ge=1, description="Shadow checks needed before live agreement "
                                                         "replaces the calibrated one.")
    thresholds: TunerConfig = Field(default_factory=TunerConfig, description="Live per-layer threshold tuning.")
