"""``meg``: run the testbed or one of its services, send prompts, probe health, train and benchmark."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from telemetry.logs import configure_logging

REPO_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("meg")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default=os.environ.get("MEG_LOG_LEVEL", "INFO"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meg", description="Mobile Edge Generation testbed")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run edge, channel emulator and device (and Prometheus when installed)")
    _add_common(up)
    up.add_argument("--host", default="127.0.0.1", help="address every service binds (default loopback)")
    up.add_argument("--edge-port", type=int, default=50051)
    up.add_argument("--edge-metrics-port", type=int, default=9101)
    up.add_argument("--channel-port", type=int, default=50052)
    up.add_argument("--channel-metrics-port", type=int, default=9102)
    up.add_argument("--device-port", type=int, default=8000)
    up.add_argument("--prometheus-port", type=int, default=9090)
    up.add_argument("--prometheus-scrape-interval", type=float, default=None, metavar="SECONDS",
                    help="scrape interval (default: the 2 s of deploy/prometheus/prometheus.yml)")
    up.add_argument("--prometheus-data-dir", type=Path,
                    default=Path(os.environ.get("MEG_PROMETHEUS_DATA", "/tmp/meg-prometheus")))
    up.add_argument("--no-prometheus", action="store_true")
    up.add_argument("--model-dir", type=Path, default=None)
    up.add_argument("--max-batch", type=int, default=8)
    up.add_argument("--batch-window-ms", type=float, default=10.0)
    up.add_argument("--tls-dir", type=Path, default=None, help="mutual TLS between the services (see `meg certs`)")

    edge = sub.add_parser("edge", help="run the edge gRPC server")
    _add_common(edge)
    edge.add_argument("--host", default="127.0.0.1")
    edge.add_argument("--port", type=int, default=50051)
    edge.add_argument("--metrics-port", type=int, default=9101, help="0 disables")
    edge.add_argument("--model-dir", type=Path, default=None, help="diffusers folder (default: embedded shapes_v1)")
    edge.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    edge.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    edge.add_argument("--max-batch", type=int, default=8, help="1 disables batching")
    edge.add_argument("--batch-window-ms", type=float, default=10.0)
    edge.add_argument("--max-queue", type=int, default=64)
    edge.add_argument("--cpu-threads", type=int, default=0,
                      help="torch threads for CPU compute (default 0: one fewer than the cores, at least 1)")
    edge.add_argument("--tls-dir", type=Path, default=None, help="serve mutual TLS with certs from `meg certs`")

    channel = sub.add_parser("channel", help="run the channel emulator (gRPC proxy)")
    _add_common(channel)
    channel.add_argument("--host", default="127.0.0.1")
    channel.add_argument("--port", type=int, default=50052)
    channel.add_argument("--metrics-port", type=int, default=9102, help="0 disables")
    channel.add_argument("--edge", default="127.0.0.1:50051", help="edge address host:port")
    channel.add_argument("--tls-dir", type=Path, default=None, help="mutual TLS on both hops (see `meg certs`)")

    device = sub.add_parser("device", help="run the device REST client")
    _add_common(device)
    device.add_argument("--host", default="127.0.0.1")
    device.add_argument("--port", type=int, default=8000)
    device.add_argument("--channel", default="127.0.0.1:50052", help="channel emulator address host:port")
    device.add_argument("--model-dir", type=Path, default=None)
    device.add_argument("--request-timeout-s", type=float, default=120.0)
    device.add_argument("--max-in-flight", type=int, default=64)
    device.add_argument("--tls-dir", type=Path, default=None, help="mutual TLS towards the channel emulator")

    gen = sub.add_parser("generate", help="send one prompt to a running device and save the image")
    gen.add_argument("prompt")
    gen.add_argument("--url", default="http://127.0.0.1:8000")
    gen.add_argument("-o", "--output", type=Path, default=Path("out.png"))
    gen.add_argument("--codec", default=None)
    gen.add_argument("--channel", default="ideal", help="ideal | awgn | rayleigh | rician")
    gen.add_argument("--snr-db", type=float, default=None)
    gen.add_argument("--bandwidth-hz", type=float, default=None)
    gen.add_argument("--delay-ms", type=float, default=None)
    gen.add_argument("--k-factor", type=float, default=None)
    gen.add_argument("--modulation", default=None)
    gen.add_argument("--fec", default=None, choices=["none", "ldpc"],
                     help="digital payloads: uncoded QAM or CRC + 5G LDPC + QAM")
    gen.add_argument("--code-rate", type=float, default=None, help="LDPC code rate, e.g. 0.5 (with --fec ldpc)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--guidance-scale", type=float, default=None)
    gen.add_argument("--split-step", type=int, default=0)
    gen.add_argument("--decoder", default="auto")
    gen.add_argument("--reference", action="store_true", help="measure quality against the clean decode")
    gen.add_argument("--api-key", default=os.environ.get("MEG_API_KEY", "").split(",")[0] or None)
    gen.add_argument("--timeout", type=float, default=300.0)
    gen.add_argument("--json", action="store_true", help="print the whole response as JSON")

    probe = sub.add_parser("probe", help="exit 0 when a service is healthy (for container health checks)")
    group = probe.add_mutually_exclusive_group(required=True)
    group.add_argument("--grpc", help="host:port of a gRPC service (grpc.health.v1)")
    group.add_argument("--http", help="URL answering 200 when healthy")
    probe.add_argument("--timeout", type=float, default=3.0)
    probe.add_argument("--tls-dir", type=Path, default=None, help="probe a mutual-TLS gRPC service")

    certs = sub.add_parser("certs", help="write a testbed CA and per-service certificates for mutual TLS")
    certs.add_argument("out_dir", type=Path)
    certs.add_argument("--days", type=int, default=365)
    certs.add_argument("--host", action="append", default=[], help="extra DNS name for every certificate")

    train = sub.add_parser("train", help="train the embedded model family (see `meg train --help`)", add_help=False)
    train.add_argument("args", nargs=argparse.REMAINDER)

    bench = sub.add_parser("bench", help="benchmarks: snr | rate | serve | overhead")
    bench.add_argument("which", choices=["snr", "rate", "serve", "overhead"])
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _model_dir(path: Path | None) -> Path:
    return path if path is not None else REPO_ROOT / "models" / "shapes_v1"


def cmd_edge(args: argparse.Namespace) -> int:
    from edge_server.backends import ModelFolderError
    from edge_server.engine import EngineConfig
    from edge_server.service import EdgeConfig, serve

    configure_logging("edge", args.log_level)
    config = EdgeConfig(host=args.host, port=args.port, metrics_port=args.metrics_port,
                        model_dir=_model_dir(args.model_dir), device=args.device, dtype=args.dtype,
                        engine=EngineConfig(max_batch=args.max_batch, window_ms=args.batch_window_ms,
                                            max_queue=args.max_queue, cpu_threads=args.cpu_threads))
    try:
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
    from channel_sim.service import ChannelServiceConfig, serve

    configure_logging("channel", args.log_level)
    try:
        server_creds = upstream_creds = None
        if args.tls_dir is not None:
            from security.tls import channel_credentials, server_credentials

            server_creds = server_credentials(args.tls_dir, "channel")
            upstream_creds = channel_credentials(args.tls_dir, "channel")
        asyncio.run(serve(ChannelServiceConfig(host=args.host, port=args.port, metrics_port=args.metrics_port,
                                               edge=args.edge), credentials=server_creds,
                          upstream_credentials=upstream_creds))
    except OSError as exc:
        log.error("%s", exc)
        return 2
    return 0


def cmd_device(args: argparse.Namespace) -> int:
    from device_client.app import DeviceConfig, create_app
    from device_client.server import run_device_server

    configure_logging("device", args.log_level)
    config = DeviceConfig(host=args.host, port=args.port, channel=args.channel, model_dir=_model_dir(args.model_dir),
                          request_timeout_s=args.request_timeout_s, max_in_flight=args.max_in_flight,
                          api_keys=DeviceConfig.keys_from_env(), tls_dir=args.tls_dir)
    if not config.api_keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.error("refusing to listen on %s without an API key: set MEG_API_KEY or bind 127.0.0.1", args.host)
        return 2
    if not config.api_keys:
        log.info("no MEG_API_KEY set: the REST API is open, listening on loopback only")
    run_device_server(create_app(config), args.host, args.port, max_connections=config.max_connections,
                      header_timeout_s=config.header_timeout_s, log_level=args.log_level)
    return 0


def _wait_healthy(url: str, procs: list[subprocess.Popen], timeout: float) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    configure_logging("up", args.log_level)
    meg = [sys.executable, "-m", "meg_cli.main"]
    model = ["--model-dir", str(_model_dir(args.model_dir))]
    common = ["--log-level", args.log_level]
    tls = ["--tls-dir", str(args.tls_dir)] if args.tls_dir else []
    specs = [
        ("edge", [*meg, "edge", "--host", args.host, "--port", str(args.edge_port),
                  "--metrics-port", str(args.edge_metrics_port), "--max-batch", str(args.max_batch),
                  "--batch-window-ms", str(args.batch_window_ms), *model, *common, *tls]),
        ("channel", [*meg, "channel", "--host", args.host, "--port", str(args.channel_port),
                     "--metrics-port", str(args.channel_metrics_port), "--edge", f"{args.host}:{args.edge_port}",
                     *common, *tls]),
        ("device", [*meg, "device", "--host", args.host, "--port", str(args.device_port),
                    "--channel", f"{args.host}:{args.channel_port}", *model, *common, *tls]),
    ]
    prometheus = None if args.no_prometheus else shutil.which("prometheus")
    config_dir = tempfile.TemporaryDirectory(prefix="meg-up-prometheus-")
    if prometheus:
        from meg_cli.prometheus_config import ScrapeTargets, render_prometheus_config

        # The committed config names the default ports: scrape the ports these services really use.
        prometheus_yml = Path(config_dir.name) / "prometheus.yml"
        prometheus_yml.write_text(render_prometheus_config(
            ScrapeTargets(args.host, args.edge_metrics_port, args.channel_metrics_port, args.device_port),
            args.prometheus_scrape_interval))
        specs.append(("prometheus", [prometheus, f"--config.file={prometheus_yml}",
                                     f"--web.listen-address={args.host}:{args.prometheus_port}",
                                     f"--storage.tsdb.path={args.prometheus_data_dir}", "--log.level=warn"]))
    # `kill <pid>` (SIGTERM) stops the testbed as Ctrl-C does, rather than orphaning the services.
    signal.signal(signal.SIGTERM, _interrupt)
    procs: list[subprocess.Popen] = []
    for name, cmd in specs:
        log.info("starting %s: %s", name, " ".join(cmd))
        procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT))
    url = f"http://{args.host}:{args.device_port}"
    try:
        if _wait_healthy(f"{url}/healthz", procs, timeout=180):
            log.info("testbed up: dashboard %s/  API docs %s/docs  health %s/healthz", url, url, url)
            if prometheus:
                log.info("Prometheus on http://%s:%d scraping all services", args.host, args.prometheus_port)
            else:
                log.info("Prometheus not found: `apt-get install prometheus` (Debian) and rerun to get metrics "
                         "history; /metrics endpoints are live on :%d, :%d and %s/metrics",
                         args.edge_metrics_port, args.channel_metrics_port, url)
            log.info("try: meg generate \"a red circle on a white background\" --channel awgn --snr-db 5 -o out.png")
        else:
            log.error("testbed did not become healthy; see the logs above")
            return 1
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        log.error("a service exited; stopping the testbed")
        return 1
    except KeyboardInterrupt:
        log.info("stopping the testbed")
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        config_dir.cleanup()


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
                print(f"error {resp.status_code}: {resp.json().get('detail', resp.text)}", file=sys.stderr)
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
    print(f"saved {args.output} ({out['width']}x{out['height']}) codec={out['codec']} channel={out['channel']['model']}")
    print(f"bits sent {out['bits_sent']}  symbols {out['symbols_sent']}  airtime {out['airtime_ms']:.3f} ms  "
          f"bit errors {out['bit_errors']}")
    print(f"timings ms: edge {t['edge']:.1f}  encode {t['encode']:.1f}  channel {t['channel']:.1f}  "
          f"decode {t['decode']:.1f}  total {t['total']:.1f}")
    if out["quality"]:
        print("quality: " + "  ".join(f"{k} {v:.4g}" for k, v in out["quality"].items()))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    if args.http:
        import httpx

        try:
            return 0 if httpx.get(args.http, timeout=args.timeout).status_code == 200 else 1
        except httpx.HTTPError:
            return 1
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if args.tls_dir is not None:
        from security.tls import channel_credentials

        channel = grpc.secure_channel(args.grpc, channel_credentials(args.tls_dir, "device"))
    else:
        channel = grpc.insecure_channel(args.grpc)
    with channel as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except grpc.RpcError:
            return 1
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_certs(args: argparse.Namespace) -> int:
    from security.tls import generate_testbed_certs

    for path in generate_testbed_certs(args.out_dir, args.days, tuple(args.host)):
        print(path)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from models.train import main as train_main

    return train_main(list(args.args))


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"bench.{args.which}")
    return int(module.main(list(args.args)) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        # Hand everything to the training CLI as is: argparse's REMAINDER rejects a leading option
        # such as `meg train --help`.
        return cmd_train(argparse.Namespace(args=argv[1:]))
    args = _parser().parse_args(argv)
    handlers = {"up": cmd_up, "edge": cmd_edge, "channel": cmd_channel, "device": cmd_device,
                "generate": cmd_generate, "probe": cmd_probe, "certs": cmd_certs, "train": cmd_train, "bench": cmd_bench}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
