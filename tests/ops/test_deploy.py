"""The deployment files agree with each other and with the code (no server needed).

``configs/serve_config.yaml`` is what :func:`tickcast.serve_deploy.serve_config` makes of the
default configuration; the KubeRay RayService embeds exactly that config and runs the image the
Dockerfile builds; the Prometheus Operator rules are ``configs/alerts.yml``. Serving from the
config on a real cluster is tested in ``test_ray_cluster.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from tickcast import serve_deploy
from tickcast.config import load_settings
from tickcast.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kind(path: Path, kind: str) -> dict[str, Any]:
    return next(d for d in _docs(path) if d["kind"] == kind)


def _containers(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_serve_config_file_is_the_generated_one() -> None:
    text = (ROOT / "configs" / "serve_config.yaml").read_text()
    assert text == serve_deploy.render(serve_deploy.serve_config()), \
        "stale: run `python -m tickcast.serve_deploy --sync`"
    config = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    assert app["import_path"] == serve_deploy.IMPORT_PATH
    serve_deploy.DeployArgs.model_validate(app["args"])
    settings = load_settings(env={})
    assert config["http_options"]["port"] == settings.serve.port
    dep = app["deployments"][0]
    assert dep["autoscaling_config"]["max_replicas"] == settings.serve.autoscaling.max_replicas
    assert config["controller_options"]["runtime_env"]["env_vars"]["RAY_SERVE_ENABLE_HA_PROXY"] == "1"


def test_builder_import_path_resolves_to_the_builder() -> None:
    from ray._common.utils import import_attr

    assert import_attr(serve_deploy.IMPORT_PATH) is serve_deploy.app_builder


def test_serve_calls_the_builder_with_validated_args(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through Serve's own call path: bad args fail before anything starts."""
    from pydantic import ValidationError
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    monkeypatch.setenv("REDIS_URL", "redis://redis.example:6379/0")
    with pytest.raises(ValidationError):
        call_user_app_builder_with_args_if_necessary(serve_deploy.app_builder, {"feed": "simulator"})
    with pytest.raises(ValidationError):
        call_user_app_builder_with_args_if_necessary(serve_deploy.app_builder, {"replicas": 3})


def test_rayservice_embeds_the_serve_config() -> None:
    rs = _kind(ROOT / "deploy" / "rayservice.yaml", "RayService")
    embedded = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((ROOT / "configs" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(embedded)


def test_rayservice_runs_the_image_with_the_configs_environment() -> None:
    path = ROOT / "deploy" / "rayservice.yaml"
    rs = _kind(path, "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"
    serve_port = yaml.safe_load(rs["spec"]["serveConfigV2"])["http_options"]["port"]
    claim = _kind(path, "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        spec = group["template"]["spec"]
        assert spec["securityContext"]["runAsUser"] == 10001  # the image's non-root user
        metrics_port = int(group["rayStartParams"]["metrics-export-port"])
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        for c in spec["containers"]:
            assert c["image"].split("/")[-1].split(":")[0] == "tickcast"
            env = {e["name"]: e for e in c["env"]}
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            assert env["TICKCAST_DATA_DIR"]["value"] == mounts["data"] == "/data"
            assert "secretKeyRef" in env["REDIS_URL"]["valueFrom"]  # the builder needs it
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports["serve"] == serve_port and ports["metrics"] == metrics_port
    assert len({c["image"] for c in _containers(rs)}) == 1


def test_monitoring_manifest_holds_the_alert_rules() -> None:
    path = ROOT / "deploy" / "monitoring.yaml"
    alerts = yaml.safe_load((ROOT / "configs" / "alerts.yml").read_text())
    assert path.read_text() == serve_deploy.monitoring_manifest(alerts), \
        "stale: run `python -m tickcast.serve_deploy --sync`"
    assert _kind(path, "PrometheusRule")["spec"]["groups"] == alerts["groups"]
    endpoint = _kind(path, "PodMonitor")["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics"


def test_with_serve_config_replaces_only_the_block() -> None:
    manifest = ("# keep\nspec:\n  serveConfigV2: |\n    old: 1\n\n    older: 2\n"
                "  rayClusterConfig:\n    rayVersion: x  # keep\n")
    out = serve_deploy.with_serve_config(manifest, {"new": {"a": 1}})
    assert out == ("# keep\nspec:\n  serveConfigV2: |\n    new:\n      a: 1\n"
                   "  rayClusterConfig:\n    rayVersion: x  # keep\n")
    with pytest.raises(ConfigError):
        serve_deploy.with_serve_config("spec: {}\n", {})


def test_builder_needs_an_external_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("TICKCAST__REDIS__URL", raising=False)
    with pytest.raises(ConfigError) as err:
        serve_deploy.deploy_settings(serve_deploy.DeployArgs())
    assert err.value.field == "redis.url"
    monkeypatch.setenv("REDIS_URL", "redis://redis.example:6379/0")
    s = serve_deploy.deploy_settings(serve_deploy.DeployArgs(feed=serve_deploy.DeployFeed.NONE,
                                                             overrides=["serve.port=9000"]))
    assert s.redis.url == "redis://redis.example:6379/0" and s.serve.feed == "none"
    assert s.serve.port == 9000
    with pytest.raises(ValueError):  # Serve validates args with the model: unknown keys fail
        serve_deploy.DeployArgs.model_validate({"feed": "simulator"})


def test_dockerfile_is_multistage_debian_non_root_with_a_liveness_check() -> None:
    text = (ROOT / "Dockerfile").read_text()
    froms = [ln.split() for ln in text.splitlines() if ln.startswith("FROM ")]
    stages: list[str] = []
    for line in froms:  # every stage starts from debian:bookworm-slim or an earlier stage
        assert line[1] == "debian:bookworm-slim" or line[1] in stages, line
        if len(line) == 4:
            stages.append(line[3])
    assert len(froms) >= 2 and froms[-1][1] == "debian:bookworm-slim"  # the runtime stage
    assert "USER tickcast" in text and "useradd --system --uid 10001" in text
    health = text[text.index("HEALTHCHECK"):]
    assert "/v1/health?probe=live" in health.split("ENTRYPOINT")[0]
    assert 'CMD ["python", "-m", "tickcast.container"]' in text
