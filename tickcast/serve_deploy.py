"""Ray-native deployment: an application builder for ``serve deploy`` / ``serve run`` and the
Serve config file it goes with (``configs/serve_config.yaml``).

``tickcast serve`` is one process that starts everything. On a Ray cluster that Ray runs for
you (KubeRay's ``RayService``, or ``serve deploy`` to a head), Serve imports
:func:`app_builder` from the config instead::

    serve deploy configs/serve_config.yaml          # to the cluster of RAY_DASHBOARD_ADDRESS
    serve run configs/serve_config.yaml             # or in the foreground

The builder runs in the cluster (Serve's build task) with the cluster's environment:

* configuration as everywhere (``configs/default.yaml``, ``TICKCAST__*``, ``TICKCAST_DATA_DIR``
  on a filesystem every node mounts, ``args.overrides``); Redis must be external
  (``REDIS_URL``): an embedded one would die with the build task;
* ``args.feed = "streams"`` starts (get-or-create, detached) the market shards consuming the
  ingress streams ``ticks:<ASSET>`` that feed handlers write, ``"none"`` leaves features to
  something else; ``args.closed_loop`` runs drift and safety in the shards and starts the
  controller;
* it returns the same application :func:`serve_app.app.build_app` gives ``tickcast serve``.

HAProxy ingress (``serve.use_haproxy``) is switched on by the config's ``controller_options``
(the environment of Serve's controller, read when Serve starts on the cluster).

``python -m tickcast.serve_deploy [-o configs/serve_config.yaml]`` writes the config the way
``serve build`` does (``serve build`` itself wants an application object, which would need a
Redis URL at import time), with the deployment options the default configuration gives.
"""

from __future__ import annotations

import argparse
import enum
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from tickcast.config import Settings, load_settings
from tickcast.errors import ConfigError

APP_NAME = "tickcast"
IMPORT_PATH = "tickcast.serve_deploy:app_builder"
CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "serve_config.yaml"


class DeployFeed(str, enum.Enum):
    """What the builder starts to feed the online features (``serve.feed`` without the
    simulator: that needs a long-lived driver process, ``tickcast serve``)."""

    STREAMS = "streams"
    NONE = "none"


class DeployArgs(BaseModel):
    """The ``args`` of the application in the Serve config (validated by Serve)."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(None, description="config file (default: TICKCAST_CONFIG or configs/default.yaml)")
    overrides: list[str] = Field(default_factory=list, description="section.key=value, as --set")
    feed: DeployFeed = DeployFeed.STREAMS
    closed_loop: bool = True


def deploy_settings(args: DeployArgs) -> Settings:
    """The settings of a config deployment (Redis must be external)."""
    settings = load_settings(args.config, overrides=args.overrides)
    settings = settings.with_overrides(**{"serve.feed": args.feed.value, "serve.closed_loop": args.closed_loop})
    if not settings.redis.url:
        raise ConfigError("a Serve config deployment needs an external Redis: set REDIS_URL on the "
                          "cluster's nodes (or redis.url in args.overrides)", field="redis.url")
    return settings


def app_builder(args: dict[str, Any] | DeployArgs) -> Any:
    """Serve's application builder (``import_path`` of ``configs/serve_config.yaml``).

    Serve hands the config's ``args`` over as a dict here (it converts only when the
    annotation is a class object, and this module's annotations are strings), so they are
    validated first: an unknown or bad argument fails the deployment before anything starts.
    """
    from serve_app.app import build_app
    from serve_app.feed import FeatureFeed
    from tickcast.commands.serving import start_closed_loop

    parsed = args if isinstance(args, DeployArgs) else DeployArgs.model_validate(args)
    settings = deploy_settings(parsed)
    redis_url = str(settings.redis.url)
    FeatureFeed(settings, redis_url).start()  # detached actors: they outlive the build task
    if settings.serve.closed_loop:
        start_closed_loop(settings, redis_url)
    return build_app(settings, redis_url)


def controller_env(settings: Settings) -> dict[str, str]:
    """Serve controller environment: HAProxy ingress as ``tickcast serve`` starts it.

    ``tickcast serve`` gives HAProxy's stats and metrics ports free numbers because several
    Serve instances may share its host; a cluster node runs one, so Ray's defaults (8404, 9101)
    stay, and Prometheus finds HAProxy's metrics where Ray documents them.
    """
    from serve_app.app import haproxy_env

    return haproxy_env(settings.serve.drain_period_s, settings.serve.haproxy_threads,
                       isolated=False)


def serve_config(settings: Settings | None = None, args: DeployArgs | None = None) -> dict[str, Any]:
    """The Serve config (``ServeDeploySchema``) of the app, as ``serve build`` would write it."""
    from ray.serve._private.build_app import build_app as serve_build_app
    from ray.serve.deployment import deployment_to_schema
    from ray.serve.schema import LoggingConfig, ServeApplicationSchema, ServeDeploySchema

    from serve_app.app import build_app

    settings = settings or load_settings(env={})
    args = args or DeployArgs()
    # Only the deployment options are read; the Redis URL is the cluster's at build time.
    built = serve_build_app(build_app(settings, "redis://redis:6379/0"), name=APP_NAME)
    app = ServeApplicationSchema(
        name=APP_NAME, route_prefix="/", import_path=IMPORT_PATH, runtime_env={},
        args=args.model_dump(mode="json", exclude_defaults=False),
        deployments=[deployment_to_schema(d) for d in built.deployments],
    ).model_dump(exclude_unset=True)
    config: dict[str, Any] = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": settings.serve.port},
        "logging_config": LoggingConfig().model_dump(),
    }
    if settings.serve.use_haproxy:
        config["controller_options"] = {"runtime_env": {"env_vars": controller_env(settings)}}
    config["applications"] = [app]
    ServeDeploySchema.model_validate(config)
    return config


HEADER = """\
# Ray Serve config of the tickcast prediction API: `serve deploy` / `serve run` this file.
# Generated by `python -m tickcast.serve_deploy` (what `serve build` writes, for an application
# builder with args) from configs/default.yaml; deploy/rayservice.yaml embeds the same content.
# The builder reads REDIS_URL (required) and TICKCAST_DATA_DIR from the cluster's environment.
"""


def render(config: dict[str, Any]) -> str:
    """The config file's text."""
    return HEADER + "\n" + yaml.safe_dump(config, sort_keys=False, width=100)


def with_serve_config(manifest: str, config: dict[str, Any]) -> str:
    """``deploy/rayservice.yaml``'s text with its ``serveConfigV2`` block replaced by ``config``.

    The block is the ``serveConfigV2: |`` line and every following line indented deeper than
    it (or blank); the rest of the hand-written manifest, comments included, is kept.
    """
    lines = manifest.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("serveConfigV2:")), None)
    if start is None:
        raise ConfigError("the manifest has no serveConfigV2 block", field="serveConfigV2")
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (not lines[end].strip()
                                or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    body = yaml.safe_dump(config, sort_keys=False, width=100)
    block = [" " * indent + "serveConfigV2: |\n"] + [" " * (indent + 2) + ln + "\n"
                                                        for ln in body.splitlines()]
    return "".join(lines[:start] + block + lines[end:])


def monitoring_manifest(alerts: dict[str, Any]) -> str:
    """``deploy/monitoring.yaml``: a PodMonitor of every Ray pod's metrics port and the alert
    rules of ``configs/alerts.yml`` as a PrometheusRule (Prometheus Operator)."""
    pod_monitor = {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
        "metadata": {"name": "tickcast-ray", "labels": {"release": "prometheus"}},
        # KubeRay labels every Ray pod ray.io/is-ray-node=yes, and a RayService's pods with its name.
        "spec": {"selector": {"matchLabels": {"ray.io/is-ray-node": "yes",
                                              "ray.io/originated-from-cr-name": "tickcast"}},
                 "podMetricsEndpoints": [{"port": "metrics", "relabelings": [
                     {"targetLabel": "job", "replacement": "ray"}]}]},
    }
    rule = {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
        "metadata": {"name": "tickcast-sla", "labels": {"release": "prometheus"}},
        "spec": {"groups": alerts["groups"]},
    }
    head = ("# Prometheus Operator objects for tickcast on KubeRay (generated by\n"
            "# `python -m tickcast.serve_deploy --sync` from configs/alerts.yml; edit that file).\n"
            "# The PodMonitor scrapes the metrics export port (8080, `metrics`) of every Ray pod, as\n"
            "# `job=\"ray\"`; the PrometheusRule holds the SLA alerts.\n")
    return head + "---\n".join(yaml.safe_dump(doc, sort_keys=False, width=100) for doc in (pod_monitor, rule))


ROOT = CONFIG_PATH.parent.parent
RAYSERVICE_PATH = ROOT / "deploy" / "rayservice.yaml"
MONITORING_PATH = ROOT / "deploy" / "monitoring.yaml"
ALERTS_PATH = ROOT / "configs" / "alerts.yml"


def main(argv: list[str] | None = None) -> int:
    """Print the Serve config, write it (``-o``), or sync every generated deploy file."""
    ap = argparse.ArgumentParser(prog="python -m tickcast.serve_deploy", description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", help=f"file to write (default: print; the repo's is {CONFIG_PATH})")
    ap.add_argument("--sync", action="store_true",
                    help="rewrite configs/serve_config.yaml, the serveConfigV2 of deploy/rayservice.yaml "
                         "and deploy/monitoring.yaml")
    args = ap.parse_args(argv)
    config = serve_config()
    text = render(config)
    if args.sync:
        CONFIG_PATH.write_text(text)
        RAYSERVICE_PATH.write_text(with_serve_config(RAYSERVICE_PATH.read_text(), config))
        MONITORING_PATH.write_text(monitoring_manifest(yaml.safe_load(ALERTS_PATH.read_text())))
    elif args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
