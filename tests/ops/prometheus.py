"""A real Prometheus server for the ops tests (Debian's ``prometheus`` package, or any on PATH)."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tickcast.net import free_port


@dataclass
class Prometheus:
    """A running server: its URL and process."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector (``[]`` on an empty answer)."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5.0)
        r.raise_for_status()
        return list(r.json()["data"]["result"])

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule with its health and last error."""
        r = httpx.get(f"{self.url}/api/v1/rules", timeout=5.0)
        r.raise_for_status()
        return [rule for group in r.json()["data"]["groups"] for rule in group["rules"]]

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets with their health."""
        r = httpx.get(f"{self.url}/api/v1/targets", timeout=5.0)
        r.raise_for_status()
        return list(r.json()["data"]["activeTargets"])

    def wait_for(self, promql: str, timeout_s: float) -> list[dict[str, Any]]:
        """Poll ``promql`` until it returns series; returns them (``[]`` after the timeout)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self.query(promql)
            if result:
                return result
            time.sleep(1.0)
        return []

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def prometheus_binary() -> str | None:
    """The ``prometheus`` server binary, if installed."""
    return shutil.which("prometheus")


def start_prometheus(workdir: Path, scrape_configs: list[dict[str, Any]], rule_files: list[Path],
                     interval_s: float = 1.0, timeout_s: float = 60.0) -> Prometheus:
    """Start Prometheus on a free localhost port with these scrape configs and rule files.

    Raises
    ------
    RuntimeError
        No binary, or it did not become ready (with its log's tail).
    """
    binary = prometheus_binary()
    if binary is None:
        raise RuntimeError("prometheus is not installed (Debian: apt-get install prometheus)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = {"global": {"scrape_interval": f"{interval_s:g}s",
                         "evaluation_interval": f"{interval_s:g}s"},
              "rule_files": [str(p) for p in rule_files],
              "scrape_configs": scrape_configs}
    cfg_path = workdir / "prometheus.yml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = workdir / "prometheus.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([binary, f"--config.file={cfg_path}",
                                 f"--storage.tsdb.path={workdir / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    prom = Prometheus(url=f"http://127.0.0.1:{port}", proc=proc, log=log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{prom.url}/-/ready", timeout=2.0).status_code == 200:
                return prom
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    prom.stop()
    raise RuntimeError(f"prometheus did not become ready:\n{log.read_text(errors='replace')[-2000:]}")
