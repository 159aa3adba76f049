"""The one cluster schema refuses what it does not know, at every level, naming where."""
import pytest
from pydantic import ValidationError

from cluster.config import ClusterConfig


@pytest.mark.parametrize("doc, where", [
    ({"controler": {}}, "controler"),
    ({"controller": {"breach_windw": 10}}, "controller.breach_windw"),
    ({"controller": {"thresholds": {"flor": 0.9}}}, "controller.thresholds.flor"),
    ({"telemetry": {"flush_every": 1}}, "telemetry.flush_every"),
    ({"gateway": {"api_key": ["k"]}}, "gateway.api_key"),
    ({"candidates": [{"name": "a", "replicas": 2}]}, "candidates.0.replicas"),
    ({"candidates": [{"name": "a", "engine": {"max_batch": 4}}]}, "candidates.0.engine.max_batch"),
])
def test_a_typo_anywhere_in_the_config_is_an_error_naming_it(doc, where):
    with pytest.raises(ValidationError) as e:
        ClusterConfig.model_validate(doc)
    assert where in {".".join(map(str, err["loc"])) for err in e.value.errors()}


def test_a_typo_in_a_config_file_is_reported_with_the_file_and_the_key(tmp_path, capsys):
    from cluster.cli import main

    path = tmp_path / "cluster.yaml"
    path.write_text("controller:\n  breach_windw: 10\ncandidates:\n  - name: a\n    replicas: 2\n")
    assert main(["k8s", "render", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: controller.breach_windw: Extra inputs are not permitted" in err
    assert f"{path}: candidates.0.replicas: Extra inputs are not permitted" in err
    assert not (tmp_path / "out").exists()


def test_the_defaults_and_the_generated_serve_config_still_validate():
    from cluster.k8s import serve_config

    cfg = ClusterConfig()
    args = serve_config(cfg)["applications"][0]["args"]
    assert ClusterConfig.model_validate(args).candidates == cfg.candidates


def test_the_exit_policy_once_called_greedy_is_read_under_its_name():
    from engine import EngineConfig

    assert EngineConfig(exit_policy="greedy").exit_policy == "ride_along"
    with pytest.raises(ValidationError):
        EngineConfig(exit_policy="greedyy")


@pytest.mark.parametrize("cpus, candidate, replicas, threads", [
    (2, {}, 2, 1),  # one core left to the rest, so the engine gets one thread: two such replicas
    (16, {}, 1, 15),
    (16, {"engine": {"threads": 4}}, 4, 4),
    (2, {"num_replicas": 1}, 1, 1),
    (2, {"num_gpus": 0.5}, 1, 1),
])
def test_auto_replicas_give_the_cpus_to_the_engines_threads(monkeypatch, cpus, candidate, replicas, threads):
    import deployments.model_server as ms
    from cluster.k8s import one_replica_each

    monkeypatch.setattr(ms, "usable_cpus", lambda: cpus)
    c = ms.CandidateConfig.model_validate({"name": "a", **candidate})
    assert (c.replicas(), c.engine_config().threads) == (replicas, threads)
    # under KubeRay the app is built on the head, whose CPUs are not the workers'
    assert one_replica_each(ClusterConfig(candidates=[c])).candidates[0].replicas() == candidate.get("num_replicas", 1)


def test_a_memory_share_is_split_among_auto_replicas(monkeypatch):
    import deployments.model_server as ms

    monkeypatch.setattr(ms, "usable_cpus", lambda: 2)
    share = ms.CandidateConfig.model_validate({"name": "a", "engine": {"memory_budget": 0.5}})
    fixed = ms.CandidateConfig.model_validate({"name": "a", "engine": {"memory_budget": 2e9}})
    assert share.engine_config().memory_budget == 0.25 and fixed.engine_config().memory_budget == 2e9
