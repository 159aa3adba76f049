"""Kubernetes manifests, validated offline: KubeRay's real CRD schema, core kinds, our config schema."""
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster.config import ClusterConfig
from cluster.k8s import render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# the v1 openAPIV3Schema of KubeRay's published RayService CRD (ray-operator/config/crd/bases/
# ray.io_rayservices.yaml, tree v1.7.0-rc.0-5-gfeeaf72fa, Apache-2.0), kept here so a plain clone validates
CRD_SCHEMA = Path(__file__).parent / "data" / "rayservice-v1-schema.json"
K8S_VERSION = "1.30"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def rayservice_schema() -> dict:
    return json.loads(CRD_SCHEMA.read_text())


@pytest.mark.parametrize("path", ["base/rayservice.yaml", "overlays/gpu/rayservice.yaml"])
def test_rayservice_matches_kuberay_crd_and_carries_our_config(rayservice_schema, path):
    (doc,) = _docs(K8S / path)
    jsonschema.validate(doc, rayservice_schema)
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "cluster.app:build_app"
    cfg = ClusterConfig.model_validate(app["args"])
    assert {c.name for c in cfg.candidates} == {"smollm2", "gemma3"}
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    gpu = "gpu" in path
    assert ("nvidia.com/gpu" in workers["resources"]["limits"]) == gpu
    assert all(c.engine.device == ("cuda" if gpu else "cpu") for c in cfg.candidates)
    assert all(c["securityContext"]["runAsNonRoot"] for c in (head, workers))


def test_a_broken_rayservice_is_caught(rayservice_schema):
    (doc,) = _docs(K8S / "base/rayservice.yaml")
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, rayservice_schema)


def test_core_kinds_are_valid_kubernetes():
    docs = _docs(K8S / "base/redis.yaml")
    assert {d["kind"] for d in docs} == {"StatefulSet", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    broken = {**docs[0], "spec": {**docs[0]["spec"], "replicas": "one"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomizations_reference_files_that_exist():
    for kfile in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kfile.read_text())
        refs = list(k.get("resources", [])) + [p["path"] for p in k.get("patches", [])]
        refs += [f for g in k.get("configMapGenerator", []) for f in g.get("files", [])]
        for ref in refs:
            assert (kfile.parent / ref).exists(), f"{kfile}: {ref}"
    base = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    (gen,) = base["configMapGenerator"]
    assert gen["options"]["labels"] == {"grafana_dashboard": "1"}
    assert (K8S / "Dockerfile").read_text().count("USER ray") == 1


def test_generated_manifests_are_up_to_date(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("HELIOS_ADMIN_KEY", raising=False)
    monkeypatch.delenv("HELIOS_CONFIG", raising=False)
    for path in render(ClusterConfig.load(None), tmp_path):
        rel = path.relative_to(tmp_path)
        assert (K8S / rel).read_text() == path.read_text(), f"k8s/{rel} is stale: run `helios k8s render`"
