"""Grafana dashboards as code: JSON models, file provisioning, and a push through `grafana-client`.

Every query is built from `telemetry.metrics.EXPORTED`, so a dashboard can only name metrics the
service declares; a test scrapes a running cluster to check it exports each of them.
The Prometheus datasource is a template variable (`$datasource`), so one JSON works in any Grafana.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from telemetry.metrics import EXPORTED

DS = {"type": "prometheus", "uid": "${datasource}"}
UID = "helios-serve"


def m(name: str, suffix: str = "") -> str:
    return EXPORTED[name] + suffix


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    exprs: tuple[tuple[str, str], ...]  # (PromQL, legend)
    kind: str = "timeseries"
    unit: str = "short"
    width: int = 12


def _quantiles(name: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"histogram_quantile({q}, sum by (le, candidate) (rate({m(name, '_bucket')}[$__rate_interval])))",
                  f"p{int(q * 100)} {{{{candidate}}}}") for q in (0.5, 0.99))


PANELS = [
    Panel("Output tokens/s", ((f"sum by (candidate) (rate({m('helios_tokens')}[$__rate_interval]))",
                               "{{candidate}}"),), unit="short"),
    Panel("Routing share", ((f"sum by (candidate) (rate({m('helios_requests')}[$__rate_interval])) / ignoring "
                             f"(candidate) group_left sum(rate({m('helios_requests')}[$__rate_interval]))",
                             "{{candidate}}"),), unit="percentunit"),
    Panel("Exit-depth distribution (tokens per layer bucket)",
          ((f"sum by (le) (increase({m('helios_exit_layer', '_bucket')}[$__range]))", "{{le}}"),),
          kind="bargauge", width=24),
    Panel("Mean exit layer", ((f"sum by (candidate) (rate({m('helios_exit_layer', '_sum')}[$__rate_interval])) / "
                               f"sum by (candidate) (rate({m('helios_exit_layer', '_count')}[$__rate_interval]))",
                               "{{candidate}}"),)),
    Panel("Loaded depth", ((f"max by (candidate) ({m('helios_loaded_depth_layers')})", "{{candidate}}"),)),
    Panel("Greedy and involuntary exits /s",
          ((f"sum by (candidate) (rate({m('helios_greedy_exits')}[$__rate_interval]))", "greedy {{candidate}}"),
           (f"sum by (candidate) (rate({m('helios_involuntary_exits')}[$__rate_interval]))",
            "involuntary {{candidate}}"))),
    Panel("Confidence breaches /s", ((f"sum by (candidate) (rate({m('helios_confidence_breaches')}"
                                      "[$__rate_interval]))", "{{candidate}}"),)),
    Panel("TTFT", _quantiles("helios_ttft_seconds"), unit="s"),
    Panel("TPOT", _quantiles("helios_tpot_seconds"), unit="s"),
    Panel("Queue depth", ((f"sum by (candidate) ({m('helios_queue_depth_requests')})", "waiting {{candidate}}"),
                          (f"sum by (candidate) ({m('helios_running_requests')})", "running {{candidate}}"),
                          (f"sum by (candidate) ({m('helios_capacity_requests')})", "capacity {{candidate}}"))),
    Panel("Controller decisions", ((f"sum by (action, candidate) (increase({m('helios_controller_decisions')}"
                                    "[$__range]))", "{{action}} {{candidate}}"),), kind="table"),
]


def dashboard(title: str = "helios-serve") -> dict:
    """The dashboard JSON model (schemaVersion 39)."""
    panels, x, y, row_h = [], 0, 0, 8
    for i, p in enumerate(PANELS, start=1):
        if x + p.width > 24:
            x, y = 0, y + row_h
        panels.append({
            "id": i, "type": p.kind, "title": p.title, "datasource": DS,
            "gridPos": {"h": row_h, "w": p.width, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
            "options": {},
            "targets": [{"refId": chr(ord("A") + j), "datasource": DS, "expr": expr, "legendFormat": legend}
                        for j, (expr, legend) in enumerate(p.exprs)],
        })
        x += p.width
    return {
        "uid": UID, "title": title, "tags": ["helios", "early-exit"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0}]},
        "annotations": {"list": []},
        "panels": panels,
    }


DASHBOARD_PROVIDER = """apiVersion: 1
providers:
  - name: helios
    folder: helios-serve
    type: file
    allowUiUpdates: false
    options:
      path: /var/lib/grafana/dashboards/helios
"""

DATASOURCE = """apiVersion: 1
datasources:
  - name: Prometheus
    type: prometheus
    access: proxy
    url: ${PROMETHEUS_URL}
    isDefault: true
"""


def dashboard_json() -> str:
    """The dashboard as the file Grafana provisions (and the k8s ConfigMap carries)."""
    return json.dumps(dashboard(), indent=2) + "\n"


def render(out: Path) -> list[Path]:
    """Write the dashboard JSON and Grafana's file-provisioning YAML under `out`."""
    files = {out / "dashboards" / "helios.json": dashboard_json(),
             out / "provisioning" / "dashboards" / "helios.yaml": DASHBOARD_PROVIDER,
             out / "provisioning" / "datasources" / "prometheus.yaml": DATASOURCE}
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)


def push(grafana_url: str, api_key: str, folder_uid: str | None = None) -> dict:
    """Create or replace the dashboard in a running Grafana; returns Grafana's reply."""
    from grafana_client import GrafanaApi

    api = GrafanaApi.from_url(grafana_url, credential=api_key)
    payload = {"dashboard": dashboard(), "overwrite": True, "message": "helios dashboards push"}
    if folder_uid:
        payload["folderUid"] = folder_uid
    return api.dashboard.update_dashboard(payload)
