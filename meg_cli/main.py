"""``meg``: run the testbed or one of its services, send prompts, chat, probe health, train and benchmark.

Heavy modules (torch, the services, the benchmarks) are imported inside the command that runs them, so
``meg ... --help`` answers at once. The services' options come from their config dataclasses
(:mod:`meg_cli.options`), so a default is written once, in the service.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meg_cli.options import ConfigField, add_option, add_options, build, fields_from_source, given, to_argv
from telemetry.logs import configure_logging, quiet_known_warnings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = "http://127.0.0.1:8000"
log = logging.getLogger("meg")


@dataclass(frozen=True)
class ServiceSpec:
    """Where a service's config dataclass lives and how its fields map to options."""

    module: str
    config: str
    flags: dict[str, str]             # field key -> option name, where it differs from --kebab-case
    exclude: frozenset[str]           # fields that are not command-line options

    def fields(self) -> list[ConfigField]:
        return [f for f in fields_from_source(self.module, self.config) if f.key not in self.exclude]


SERVICES: dict[str, ServiceSpec] = {
    # --batch-window-ms: the name scripts and the serve benchmark's report already use.
    "edge": ServiceSpec("edge_server.service", "EdgeConfig", {"engine.window_ms": "--batch-window-ms"},
                        frozenset()),
    "channel": ServiceSpec("channel_sim.service", "ChannelServiceConfig", {}, frozenset()),
    # API keys come from MEG_API_KEY only: a key on a command line is visible to every user in `ps`.
    "device": ServiceSpec("device_client.app", "DeviceConfig", {}, frozenset({"api_keys"})),
}
#: Fields `meg up` sets itself: one --host for all, its own port options, and the wiring between services.
UP_WIRED: dict[str, frozenset[str]] = {
    "edge": frozenset({"host", "port", "metrics_port"}),
    "channel": frozenset({"host", "port", "metrics_port", "edge"}),
    "device": frozenset({"host", "port", "channel", "tls_dir"}),
}
UP_PORTS = (("edge_port", "edge", "port"), ("edge_metrics_port", "edge", "metrics_port"),
            ("channel_port", "channel", "port"), ("channel_metrics_port", "channel", "metrics_port"),
            ("device_port", "device", "port"))
LOOPBACK_NAMES = ("localhost",)


def api_keys_from_env() -> tuple[str, ...]:
    """The REST API keys of MEG_API_KEY (comma-separated); the same rule as ``DeviceConfig.keys_from_env``,
    which `meg up` cannot import before it starts anything (it loads torch)."""
    raw = os.environ.get("MEG_API_KEY", "")
    return tuple(k.strip() for k in raw.split(",") if k.strip())


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect_host(bind_host: str) -> str:
    """Where the services reach each other: a wildcard bind address is reachable on loopback."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "") else bind_host


def refuse_open_api(host: str) -> str | None:
    """Why serving the REST API on ``host`` is refused (no API key and not loopback), or None."""
    if api_keys_from_env() or is_loopback(host):
        return None
    return (f"refusing to listen on {host} without an API key: set MEG_API_KEY=<key>[,<key>...] "
            f"(clients then send `Authorization: Bearer <key>`) or bind 127.0.0.1")


def field_default(service: str, key: str) -> Any:
    """The default of one field of a service's config, as its dataclass declares it."""
    return next(f.default for f in SERVICES[service].fields() if f.key == key)


# ------------------------------------------------------------------------------------------------ parser


def _add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default=os.environ.get("MEG_LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING or ERROR (default: $MEG_LOG_LEVEL or INFO)")


def _add_service(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    spec = SERVICES[name]
    p = sub.add_parser(name, help=help_text, description=help_text)
    _add_log_level(p)
    fields = spec.fields()
    add_options(p, fields, flags=spec.flags)
    if not any(f.key == "tls_dir" for f in fields):
        p.add_argument("--tls-dir", type=Path, default=None,
                       help="mutual TLS with the certificates of `meg certs DIR`")
    return p


def _add_up(sub: Any) -> argparse.ArgumentParser:
    up = sub.add_parser("up", help="run edge, channel emulator and device (and Prometheus when installed)",
                        description="Run the whole testbed on this machine, restarting a service that crashes. "
                                    "Every option of `meg edge`, `meg channel` and `meg device` is accepted and "
                                    "passed to the service it belongs to.")
    _add_log_level(up)
    fields = {name: {f.key: f for f in spec.fields()} for name, spec in SERVICES.items()}
    up.add_argument("--host", default=fields["device"]["host"].default,
                    help="address every service binds (default: %(default)s; another address needs MEG_API_KEY)")
    ports = up.add_argument_group("ports")
    for dest, service, key in UP_PORTS:
        field = fields[service][key]
        ports.add_argument("--" + dest.replace("_", "-"), dest=dest, type=int, default=field.default,
                           help=f"{service}: {field.help} (default: %(default)s)")
    up.add_argument("--tls-dir", type=Path, default=None, help="mutual TLS between the services (see `meg certs`)")
    up.add_argument("--startup-timeout-s", type=float, default=300.0,
                    help="give up when the testbed is not healthy after this long (default: %(default)s)")

    # Every other service option: plain when one service has it; shared by name when several have it
    # (--model-dir, --device, --grace-s go to each of them), with --<service>-<name> to set one alone.
    shared = up.add_argument_group("options of several services (--<service>-<option> sets one alone)")
    groups = {name: up.add_argument_group(f"{name} options (see `meg {name} --help`)") for name in SERVICES}
    seen: set[str] = set()
    for name, spec in SERVICES.items():
        for key, field in fields[name].items():
            if key in UP_WIRED[name] or key in seen:
                continue
            seen.add(key)
            owners = [o for o in SERVICES if key in fields[o] and key not in UP_WIRED[o]]
            flag = spec.flags.get(key, field.flag)
            if len(owners) == 1:
                add_option(groups[name], field, flag=flag, dest=f"up.{key}")
                continue
            defaults = {fields[o][key].default_text() for o in owners}
            text = f"{field.help}; given to {' and '.join(owners)}"
            if len(defaults) == 1 and None not in defaults:
                text += f" (default: {defaults.pop()})"
            add_option(shared, field, flag=flag, dest=f"up.{key}", help_text=text)
            for owner in owners:
                add_option(groups[owner], fields[owner][key], flag=f"--{owner}-{flag.removeprefix('--')}",
                           dest=f"{owner}.{key}", help_text=f"{fields[owner][key].help} ({owner} only)")

    prom = up.add_argument_group("Prometheus")
    prom.add_argument("--prometheus-port", type=int, default=9090)
    prom.add_argument("--prometheus-scrape-interval", type=float, default=None, metavar="SECONDS",
                      help="scrape interval (default: the 2 s of deploy/prometheus/prometheus.yml)")
    prom.add_argument("--prometheus-data-dir", type=Path,
                      default=Path(os.environ.get("MEG_PROMETHEUS_DATA", "/tmp/meg-prometheus")))
    prom.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus even when installed")
    return up


def _parser() -> argparse.ArgumentParser:
    from bench.cli import BENCHMARKS

    parser = argparse.ArgumentParser(prog="meg", description="Mobile Edge Generation testbed")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_up(sub)
    _add_service(sub, "edge", "run the edge gRPC server (text encoder, denoiser, codec)")
    _add_service(sub, "channel", "run the channel emulator (gRPC proxy applying the wireless link)")
    _add_service(sub, "device", "run the device REST client (decoder, dashboard)")

    gen = sub.add_parser("generate", help="send one prompt to a running device and save the image",
                         description="Send one prompt to a running device and save the image.")
    gen.add_argument("prompt")
    gen.add_argument("--url", default=os.environ.get("MEG_URL", DEFAULT_URL),
                     help="the device's REST base URL (default: $MEG_URL or %s)" % DEFAULT_URL)
    gen.add_argument("-o", "--output", type=Path, default=Path("out.png"))
    gen.add_argument("--codec", default=None, help="a codec of GET /v1/codecs (default: the device's)")
    gen.add_argument("--channel", default="ideal", help="ideal | awgn | rayleigh | rician")
    gen.add_argument("--snr-db", type=float, default=None)
    gen.add_argument("--bandwidth-hz", type=float, default=None)
    gen.add_argument("--delay-ms", type=float, default=None)
    gen.add_argument("--k-factor", type=float, default=None)
    gen.add_argument("--modulation", default=None, help="digital payloads: bpsk | qpsk | 16qam | 64qam")
    gen.add_argument("--fec", default=None, choices=["none", "ldpc"],
                     help="digital payloads: uncoded QAM or CRC + 5G LDPC + QAM")
    gen.add_argument("--code-rate", type=float, default=None, help="LDPC code rate, e.g. 0.5 (with --fec ldpc)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--guidance-scale", type=float, default=None)
    gen.add_argument("--split-step", type=int, default=0)
    gen.add_argument("--decoder", default="auto")
    gen.add_argument("--reference", action="store_true", help="measure quality against the clean decode")
    gen.add_argument("--api-key", default=(api_keys_from_env() or (None,))[0],
                     help="REST API key (default: the first of $MEG_API_KEY)")
    gen.add_argument("--timeout", type=float, default=300.0)
    gen.add_argument("--json", action="store_true", help="print the whole response as JSON")

    from meg_cli.chat import add_chat_parser

    add_chat_parser(sub, os.environ.get("MEG_URL", DEFAULT_URL), (api_keys_from_env() or (None,))[0])

    probe = sub.add_parser("probe", help="exit 0 when a service is healthy, else say why (container checks)",
                           description="Exit 0 when a service is healthy; otherwise exit 1 and say what failed.")
    group = probe.add_mutually_exclusive_group(required=True)
    group.add_argument("--grpc", help="host:port of a gRPC service (grpc.health.v1)")
    group.add_argument("--http", help="URL answering 200 when healthy")
    probe.add_argument("--timeout", type=float, default=3.0)
    probe.add_argument("--tls-dir", type=Path, default=None, help="probe a mutual-TLS gRPC service")

    certs = sub.add_parser("certs", help="write a testbed CA and per-service certificates for mutual TLS",
                           description="Write a testbed CA and per-service certificates for mutual TLS.")
    certs.add_argument("out_dir", type=Path)
    certs.add_argument("--days", type=int, default=365)
    certs.add_argument("--host", action="append", default=[], help="extra DNS name for every certificate")

    # train and bench hand their arguments to their own parsers (see main()); these entries are for --help.
    sub.add_parser("train", help="train the embedded model family (see `meg train --help`)", add_help=False)
    bench = sub.add_parser("bench", help="benchmarks: " + " | ".join(BENCHMARKS),
                           description="Benchmarks. A full run writes the committed bench/results/; --quick "
                                       "writes under bench/results/_tmp/ (git-ignored).")
    which = bench.add_subparsers(dest="which", required=True, metavar="BENCHMARK")
    for name, text in BENCHMARKS.items():
        which.add_parser(name, help=text, add_help=False)
    return parser


# ------------------------------------------------------------------------------------------ services


def cmd_edge(args: argparse.Namespace) -> int:
    configure_logging("edge", args.log_level)  # first: it silences warnings the imports below would print
    import asyncio

    from models.backends import ModelFolderError
    from edge_server.service import EdgeConfig, serve

    try:
        config = build(EdgeConfig, given(args, SERVICES["edge"].fields()))
        credentials = None
        if args.tls_dir is not None:
            from security.tls import server_credentials

            credentials = server_credentials(args.tls_dir, "edge")
        asyncio.run(serve(config, credentials=credentials))
    except (ModelFolderError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    return 0


def cmd_channel(args: argparse.Namespace) -> int:
    configure_logging("channel", args.log_level)
    import asyncio

    from channel_sim.service import ChannelServiceConfig, serve

    try:
        config = build(ChannelServiceConfig, given(args, SERVICES["channel"].fields()))
        server_creds = upstream_creds = None
        if args.tls_dir is not None:
            from security.tls import channel_credentials, server_credentials

            server_creds = server_credentials(args.tls_dir, "channel")
            upstream_creds = channel_credentials(args.tls_dir, "channel")
        asyncio.run(serve(config, credentials=server_creds, upstream_credentials=upstream_creds))
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    return 0


def cmd_device(args: argparse.Namespace) -> int:
    configure_logging("device", args.log_level)
    host = getattr(args, "host", field_default("device", "host"))
    open_api = bool(getattr(args, "open_api", False))
    reason = refuse_open_api(host)
    if reason and not open_api:
        log.error("%s", reason)
        return 2
    if reason:
        log.warning("SERVING THE REST API WITHOUT AN API KEY ON %s (--open-api): anyone who reaches this port can "
                    "use it; publish it on loopback only, as deploy/docker-compose.yml does", host)
    from device_client.app import DeviceConfig, create_app
    from device_client.server import run_device_server

    try:
        config = build(DeviceConfig, {**given(args, SERVICES["device"].fields()),
                                      "api_keys": DeviceConfig.keys_from_env()})
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if not config.api_keys and not open_api:
        log.info("no MEG_API_KEY set: the REST API is open, listening on loopback only")
    run_device_server(create_app(config), config.host, config.port, max_connections=config.max_connections,
                      header_timeout_s=config.header_timeout_s, log_level=args.log_level)
    return 0


# ------------------------------------------------------------------------------------------------ up


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _up_commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The `meg edge|channel|device` command line of each service, with the options given to `meg up`."""
    meg = [sys.executable, "-m", "meg_cli.main"]
    common = ["--log-level", args.log_level]
    tls = ["--tls-dir", str(args.tls_dir)] if args.tls_dir else []
    peer = connect_host(args.host)
    wiring = {
        "edge": ["--host", args.host, "--port", str(args.edge_port), "--metrics-port", str(args.edge_metrics_port)],
        "channel": ["--host", args.host, "--port", str(args.channel_port), "--metrics-port",
                    str(args.channel_metrics_port), "--edge", f"{peer}:{args.edge_port}"],
        "device": ["--host", args.host, "--port", str(args.device_port), "--channel", f"{peer}:{args.channel_port}"],
    }
    commands = []
    for name, spec in SERVICES.items():
        fields = [f for f in spec.fields() if f.key not in UP_WIRED[name]]
        values: dict[str, Any] = {}
        for f in fields:
            for dest in (f"{name}.{f.key}", f"up.{f.key}"):  # --<service>-<option> wins over the shared one
                if hasattr(args, dest):
                    values[f.key] = getattr(args, dest)
                    break
        commands.append((name, [*meg, name, *wiring[name], *to_argv(fields, values, spec.flags), *common, *tls]))
    return commands


def _health(url: str) -> tuple[bool, str]:
    import httpx

    try:
        resp = httpx.get(url, timeout=3.0)
    except httpx.HTTPError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    if resp.status_code == 200:
        return True, "ok"
    try:
        return False, f"{resp.status_code} {resp.json().get('reason', '')}"
    except ValueError:
        return False, str(resp.status_code)


def cmd_up(args: argparse.Namespace) -> int:
    configure_logging("up", args.log_level)
    # Before anything starts: an open REST API on a non-loopback address is refused (the device would refuse
    # too, but only after edge and channel had started listening on that address).
    reason = refuse_open_api(args.host)
    if reason and not getattr(args, "open_api", False):
        log.error("%s", reason)
        return 2
    from meg_cli.supervisor import Service, Supervisor

    services = [Service(name, cmd) for name, cmd in _up_commands(args)]
    prometheus = None if args.no_prometheus else shutil.which("prometheus")
    config_dir = tempfile.TemporaryDirectory(prefix="meg-up-prometheus-")
    if prometheus:
        from meg_cli.prometheus_config import ScrapeTargets, render_prometheus_config

        # The committed config names the default ports: scrape the ports these services really use.
        prometheus_yml = Path(config_dir.name) / "prometheus.yml"
        prometheus_yml.write_text(render_prometheus_config(
            ScrapeTargets(args.host, args.edge_metrics_port, args.channel_metrics_port, args.device_port),
            args.prometheus_scrape_interval))
        services.append(Service("prometheus", [
            prometheus, f"--config.file={prometheus_yml}", f"--web.listen-address={args.host}:{args.prometheus_port}",
            f"--storage.tsdb.path={args.prometheus_data_dir}", "--log.level=warn"]))
    supervisor = Supervisor(services, cwd=REPO_ROOT)
    url = f"http://{connect_host(args.host)}:{args.device_port}"
    # `kill <pid>` (SIGTERM) stops the testbed as Ctrl-C does, rather than orphaning the services.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        supervisor.start_all()
        deadline = time.monotonic() + args.startup_timeout_s
        while True:
            dead = supervisor.exited()
            if dead:
                from meg_cli.supervisor import describe_exit

                log.error("%s exited with %s while starting; stopping the testbed (its log is above)",
                          dead[0].name, describe_exit(dead[0].proc.returncode if dead[0].proc else None))
                return 1
            ok, why = _health(f"{url}/healthz")
            if ok:
                break
            log.debug("waiting for the testbed: %s/healthz: %s", url, why)
            if time.monotonic() > deadline:
                log.error("testbed not healthy after %.0f s (%s); see the logs above", args.startup_timeout_s, why)
                return 1
            time.sleep(0.5)
        log.info("testbed up: dashboard %s/  API docs %s/docs  health %s/healthz", url, url, url)
        if prometheus:
            log.info("Prometheus on http://%s:%d scraping all services", connect_host(args.host), args.prometheus_port)
        else:
            log.info("Prometheus not %s: /metrics endpoints are live on :%d, :%d and %s/metrics",
                     "started (--no-prometheus)" if args.no_prometheus else
                     "found (`apt-get install prometheus` and rerun for metrics history)",
                     args.edge_metrics_port, args.channel_metrics_port, url)
        log.info("try: meg generate \"a red circle on a white background\" --codec hyperprior --channel awgn "
                 "--snr-db 5 --fec ldpc -o out.png%s", "" if url == DEFAULT_URL else f" --url {url}")
        degraded = False
        while True:
            if supervisor.tick():
                degraded = True
            if degraded and not any(s.restart_due for s in services):
                ok, why = _health(f"{url}/healthz")
                if ok:
                    log.info("testbed healthy again")
                    degraded = False
                else:
                    log.debug("after a restart: %s/healthz: %s", url, why)
            time.sleep(0.5)
    except KeyboardInterrupt:
        log.info("stopping the testbed (Ctrl-C again to kill it at once)")
        return 0
    finally:
        supervisor.stop()
        config_dir.cleanup()


# ------------------------------------------------------------------------------------------------ clients


def cmd_generate(args: argparse.Namespace) -> int:
    import httpx

    channel: dict[str, object] = {"model": args.channel}
    for key in ("snr_db", "bandwidth_hz", "delay_ms", "k_factor", "modulation", "fec", "code_rate"):
        value = getattr(args, key)
        if value is not None:
            channel[key] = value
    body: dict[str, object] = {"prompt": args.prompt, "channel": channel, "reference": args.reference,
                               "split_step": args.split_step, "decoder": args.decoder}
    for key in ("codec", "seed", "steps", "guidance_scale"):
        value = getattr(args, key)
        if value is not None:
            body[key] = value
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        with httpx.Client(base_url=args.url, timeout=args.timeout, headers=headers) as client:
            resp = client.post("/v1/generate", json=body)
            if resp.status_code != 200:
                try:
                    detail = resp.json().get("detail", resp.text)
                except ValueError:
                    detail = resp.text
                print(f"error {resp.status_code}: {detail}", file=sys.stderr)
                return 1
            out = resp.json()
            png = client.get(out["image_url"])
            png.raise_for_status()
    except httpx.HTTPError as exc:
        print(f"cannot reach the device at {args.url}: {exc}", file=sys.stderr)
        return 1
    args.output.write_bytes(png.content)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    t = out["timings_ms"]
    print(f"saved {args.output} ({out['width']}x{out['height']}) codec={out['codec']} "
          f"channel={out['channel']['model']}")
    print(f"bits sent {out['bits_sent']}  symbols {out['symbols_sent']}  airtime {out['airtime_ms']:.3f} ms  "
          f"bit errors {out['bit_errors']}" + ("  (payload lost: concealed)" if out.get("concealed") else ""))
    print(f"timings ms: edge {t['edge']:.1f}  encode {t['encode']:.1f}  channel {t['channel']:.1f}  "
          f"decode {t['decode']:.1f}  total {t['total']:.1f}")
    if out["quality"]:
        print("quality: " + "  ".join(f"{k} {v:.4g}" for k, v in out["quality"].items()))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from meg_cli.chat import cmd_chat as chat

    return chat(args)


def _unhealthy(target: str, why: str) -> int:
    print(f"unhealthy: {target}: {why}", file=sys.stderr)
    return 1


def cmd_probe(args: argparse.Namespace) -> int:
    if args.http:
        import httpx

        try:
            resp = httpx.get(args.http, timeout=args.timeout)
        except httpx.HTTPError as exc:
            return _unhealthy(args.http, f"{type(exc).__name__}: {exc or 'no answer'}")
        if resp.status_code != 200:
            return _unhealthy(args.http, f"HTTP {resp.status_code}: {resp.text.strip()[:300]}")
        return 0
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        if args.tls_dir is not None:
            from security.tls import channel_credentials

            channel = grpc.secure_channel(args.grpc, channel_credentials(args.tls_dir, "device"))
        else:
            channel = grpc.insecure_channel(args.grpc)
    except (OSError, ValueError) as exc:
        return _unhealthy(args.grpc, str(exc))
    with channel as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "ERROR"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            return _unhealthy(args.grpc, f"{code}: {details}")
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        return _unhealthy(args.grpc, health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from security.tls import generate_testbed_certs

    for path in generate_testbed_certs(args.out_dir, args.days, tuple(args.host)):
        print(path)
    return 0


def cmd_train(argv: list[str]) -> int:
    from models.train import main as train_main

    quiet_known_warnings()
    return train_main(argv)


def cmd_bench(which: str, argv: list[str]) -> int:
    import importlib

    from bench.cli import build_parser

    build_parser(which).parse_args(argv)  # --help and bad arguments are answered before torch loads
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up (testbed, temporary folders) as Ctrl-C does
    quiet_known_warnings()
    try:
        module = importlib.import_module(f"bench.{which}")
        return int(module.main(argv) or 0)
    except KeyboardInterrupt:
        print(f"meg bench {which}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    from bench.cli import BENCHMARKS

    argv = list(sys.argv[1:] if argv is None else argv)
    # train and bench <name> hand everything to their own parsers as is: argparse's REMAINDER would reject a
    # leading option such as `meg train --help`.
    if argv[:1] == ["train"]:
        return cmd_train(argv[1:])
    if argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in BENCHMARKS:
        return cmd_bench(argv[1], argv[2:])
    args = _parser().parse_args(argv)
    if args.command in SERVICES:
        return run_service({"edge": cmd_edge, "channel": cmd_channel, "device": cmd_device}[args.command], args)
    handlers = {"up": cmd_up, "generate": cmd_generate, "chat": cmd_chat, "probe": cmd_probe, "certs": cmd_certs}
    return handlers[args.command](args)


def run_service(handler: Any, args: argparse.Namespace) -> int:
    """Run a service command so that Ctrl-C and SIGTERM end it with status 0 at any moment, quietly.

    Once a service serves, its own signal handlers drain it; before that (seconds of imports and model
    loading) SIGTERM raises KeyboardInterrupt like Ctrl-C, and either ends the process at once. The process
    then leaves through os._exit: a normal interpreter exit runs C++ static destructors, and one of a
    native thread still joinable (torch, gRPC, half-initialised by an interrupted import) aborts with
    "terminate called without an active exception"; torch's atexit hooks also log cache statistics.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = handler(args)
    except KeyboardInterrupt:
        log.info("interrupted")
        code = 0
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
