"""Grafana dashboards as code: a well-formed model, provisioning files, and the push client."""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import yaml

from cluster.cli import main
from telemetry.dashboards import PANELS, dashboard, render
from telemetry.metrics import EXPORTED

METRIC = re.compile(r"\bray_helios_[a-z_]+")


def panel_metrics(d: dict) -> set[str]:
    return {name for p in d["panels"] for t in p["targets"] for name in METRIC.findall(t["expr"])}


def test_dashboard_model_is_well_formed():
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    (var,) = d["templating"]["list"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    ids, cells = set(), set()
    for p in d["panels"]:
        assert p["id"] not in ids
        ids.add(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        cell = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cell & cells, f"panel {p['title']} overlaps another"
        cells |= cell
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
        assert [t["refId"] for t in p["targets"]] == [chr(65 + i) for i in range(len(p["targets"]))]
    assert len(d["panels"]) == len(PANELS)
    assert json.loads(json.dumps(d)) == d


def test_every_declared_metric_is_on_a_panel():
    on_panels = {re.sub(r"_(bucket|sum|count)$", "", n) for n in panel_metrics(dashboard())}
    assert on_panels == set(EXPORTED.values())


def test_render_writes_dashboard_and_provisioning(tmp_path):
    paths = render(tmp_path)
    assert json.loads((tmp_path / "dashboards/helios.json").read_text()) == dashboard()
    provider = yaml.safe_load((tmp_path / "provisioning/dashboards/helios.yaml").read_text())
    assert provider["providers"][0]["type"] == "file"
    ds = yaml.safe_load((tmp_path / "provisioning/datasources/prometheus.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    assert len(paths) == 3


def test_push_posts_the_dashboard_with_the_api_key(capsys):
    """grafana-client against a local HTTP endpoint that answers as Grafana's /api/dashboards/db does."""
    seen = []

    class Grafana(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            seen.append((self.path, self.headers["authorization"], body))
            reply = json.dumps({"status": "success", "uid": body["dashboard"]["uid"], "version": 1}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Grafana)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert main(["dashboards", "push", "--grafana-url", url, "--api-key", "glsa_test"]) == 0
    finally:
        server.shutdown()
    ((path, auth, body),) = seen
    assert path == "/api/dashboards/db" and auth == "Bearer glsa_test"
    assert body["overwrite"] and body["dashboard"] == dashboard()
    assert json.loads(capsys.readouterr().out)["status"] == "success"


def test_push_to_nothing_is_a_clear_error(capsys):
    assert main(["dashboards", "push", "--grafana-url", "http://127.0.0.1:1", "--api-key", "k"]) == 2
    assert "http://127.0.0.1:1" in capsys.readouterr().err
