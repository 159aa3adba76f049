"""The operator surface of the gateway: the /dashboard page and the admin API behind it.

Reading the state is open (it is what the page polls); actions need the admin API key as
`Authorization: Bearer <key>`. With no key configured the actions are refused outright.
"""
from __future__ import annotations

import hmac
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

PAGE = Path(__file__).parent / "static" / "dashboard.html"


class PinBody(BaseModel):
    candidate: str | None = Field(description="Candidate to route every request to; null releases the pin.")


class DepthBody(BaseModel):
    candidate: str
    depth: int = Field(ge=1)


class ThresholdsBody(BaseModel):
    candidate: str
    thresholds: dict[int, float] = Field(description="Exit layer -> threshold; above 1 switches the layer off.")

    @field_validator("thresholds")
    @classmethod
    def _in_range(cls, v: dict[int, float]) -> dict[int, float]:
        bad = {l: t for l, t in v.items() if not 0.0 <= t <= 1.1}
        if bad:
            raise ValueError(f"thresholds must lie in 0..1.1 (above 1: off); got {bad}")
        return v


def check_admin(configured: str | None, authorization: str | None) -> tuple[int, str] | None:
    """None when allowed, else (HTTP status, why)."""
    if not configured:
        return 403, "the admin API is disabled: set admin_api_key (or HELIOS_ADMIN_KEY) to enable it"
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), configured.encode()):
        return 401, "missing or wrong admin API key (Authorization: Bearer <key>)"
    return None
