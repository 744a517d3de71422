"""The Prometheus config that ``meg up`` runs: deploy/prometheus/prometheus.yml, pointed at the ports in use.

The committed file names the default ports (9101, 9102, 8000). ``meg up`` accepts other ports, so it renders a
copy whose scrape targets are the ports it actually started the services on, and whose scrape interval may be
shortened (tests scrape every few hundred milliseconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "prometheus.yml"


@dataclass(frozen=True)
class ScrapeTargets:
    """Where the three services expose /metrics."""

    host: str
    edge_metrics_port: int
    channel_metrics_port: int
    device_port: int

    def scrape_host(self) -> str:
        # A wildcard bind address is not somewhere to connect to: scrape over loopback instead.
        if self.host in ("", "0.0.0.0"):
            return "127.0.0.1"
        if self.host == "::":
            return "[::1]"
        return f"[{self.host}]" if ":" in self.host else self.host

    def by_job(self) -> dict[str, str]:
        host = self.scrape_host()
        return {"meg-edge": f"{host}:{self.edge_metrics_port}",
                "meg-channel": f"{host}:{self.channel_metrics_port}",
                "meg-device": f"{host}:{self.device_port}"}


def prometheus_duration(seconds: float) -> str:
    """Seconds as a Prometheus duration string (whole milliseconds, e.g. ``"500ms"``)."""
    ms = round(seconds * 1000)
    if ms < 1:
        raise ValueError(f"scrape interval must be at least 1 ms, got {seconds} s")
    return f"{ms}ms"


def render_prometheus_config(targets: ScrapeTargets, scrape_interval_s: float | None = None,
                             template: Path = TEMPLATE) -> str:
    """The template with every MEG job's target replaced, and the intervals set when ``scrape_interval_s`` is given."""
    config = yaml.safe_load(template.read_text())
    wanted = targets.by_job()
    found = set()
    for job in config["scrape_configs"]:
        name = job["job_name"]
        if name in wanted:
            job["static_configs"] = [{**sc, "targets": [wanted[name]]} for sc in job["static_configs"]]
            found.add(name)
    missing = set(wanted) - found
    if missing:
        raise ValueError(f"{template} has no scrape job named {', '.join(sorted(missing))}")
    if scrape_interval_s is not None:
        interval = prometheus_duration(scrape_interval_s)
        # A scrape must finish within its interval; Prometheus rejects a timeout above it.
        config["global"].update(scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
    return "# Rendered by `meg up` from deploy/prometheus/prometheus.yml with the ports in use.\n" + \
        yaml.safe_dump(config, sort_keys=False)
