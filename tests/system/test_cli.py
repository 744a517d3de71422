"""The `meg` command line: options derived from the services' config dataclasses, `meg up`'s routing of them,
help that loads nothing heavy, probe messages, the host check, where benchmarks and training write."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO, free_port
from meg_cli import main as cli
from meg_cli.options import NO_DEFAULT, add_options, build, fields_from_class, fields_from_source, given, to_argv
from meg_cli.supervisor import Service, Supervisor

CONFIGS = [("edge", "edge_server.service", "EdgeConfig"), ("channel", "channel_sim.service", "ChannelServiceConfig"),
           ("device", "device_client.app", "DeviceConfig")]


def config_class(module: str, name: str) -> type:
    import importlib

    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("service", "module", "name"), CONFIGS)
def test_fields_read_from_source_match_the_imported_dataclass(service: str, module: str, name: str) -> None:
    from_source = fields_from_source(module, name)
    assert from_source == fields_from_class(config_class(module, name))
    # Every field is settable: nothing is dropped for an unsupported type.
    import dataclasses

    cls = config_class(module, name)
    flat = {f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(f.type)} - {"engine"}
    assert flat <= {f.path[0] for f in from_source}
    assert all(f.help for f in from_source), [f.key for f in from_source if not f.help]


@pytest.mark.parametrize(("service", "module", "name"), CONFIGS)
def test_a_service_command_with_no_options_builds_the_dataclass_defaults(service: str, module: str, name: str) -> None:
    parser = cli._parser()
    args = parser.parse_args([service])
    cls = config_class(module, name)
    assert given(args, cli.SERVICES[service].fields()) == {}
    assert build(cls, given(args, cli.SERVICES[service].fields())) == cls()


def test_options_round_trip_through_argv() -> None:
    from edge_server.service import EdgeConfig

    fields = cli.SERVICES["edge"].fields()
    parser = argparse.ArgumentParser()
    add_options(parser, fields, flags=cli.SERVICES["edge"].flags)
    values = {"device": "cuda", "engine.max_queue": 5, "engine.window_ms": 2.5, "grace_s": 1.0,
              "model_dir": Path("/models/x")}
    argv = to_argv(fields, values, cli.SERVICES["edge"].flags)
    assert "--batch-window-ms" in argv  # the historical flag name of engine.window_ms
    config = build(EdgeConfig, given(parser.parse_args(argv), fields))
    assert (config.device, config.engine.max_queue, config.engine.window_ms, config.grace_s, config.model_dir) == \
        ("cuda", 5, 2.5, 1.0, Path("/models/x"))
    assert config.engine.max_batch == EdgeConfig().engine.max_batch  # untouched: the dataclass default


def _child_configs(argv: list[str]) -> dict[str, object]:
    """Parse `meg up ARGV`, then each child's command line with the child's own parser, into its config."""
    args = cli._parser().parse_args(["up", *argv])
    configs: dict[str, object] = {}
    for name, command in cli._up_commands(args):
        assert command[:4] == [sys.executable, "-m", "meg_cli.main", name]
        child = cli._parser().parse_args(command[3:])
        module, cls_name = next((m, c) for s, m, c in CONFIGS if s == name)
        configs[name] = build(config_class(module, cls_name), given(child, cli.SERVICES[name].fields()))
    return configs


def test_meg_up_passes_every_service_option_to_its_service() -> None:
    configs = _child_configs([
        "--edge-port", "6001", "--channel-port", "6002", "--device-port", "6003",
        "--device", "cuda", "--device-device", "cpu", "--max-queue", "5", "--cpu-threads", "2",
        "--batch-window-ms", "3", "--dtype", "float16", "--grace-s", "4", "--channel-grace-s", "6",
        "--model-dir", "/m", "--max-images", "7", "--default-codec", "uint8", "--request-timeout-s", "9"])
    edge, channel, device = configs["edge"], configs["channel"], configs["device"]
    assert (edge.port, edge.device, edge.dtype, edge.grace_s, edge.model_dir) == \
        (6001, "cuda", "float16", 4.0, Path("/m"))
    assert (edge.engine.max_queue, edge.engine.cpu_threads, edge.engine.window_ms) == (5, 2, 3.0)
    assert (channel.port, channel.edge, channel.grace_s) == (6002, "127.0.0.1:6001", 6.0)
    assert (device.port, device.channel, device.device, device.model_dir) == (6003, "127.0.0.1:6002", "cpu", Path("/m"))
    assert (device.max_images, device.default_codec, device.request_timeout_s) == (7, "uint8", 9.0)


def test_meg_up_covers_every_field_of_every_service() -> None:
    """Every field is reachable from `meg up`: a plain or shared option, or one `meg up` sets itself."""
    subcommands = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    dests = {a.dest for a in subcommands.choices["up"]._actions}
    for name, spec in cli.SERVICES.items():
        for field in spec.fields():
            if field.key in cli.UP_WIRED[name]:
                continue
            assert f"up.{field.key}" in dests, (name, field.key)


def _no_torch_after(argv: list[str]) -> subprocess.CompletedProcess[str]:
    code = ("import sys\nfrom meg_cli.main import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')" % (argv,))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", [["--help"], ["up", "--help"], ["edge", "--help"], ["channel", "--help"],
                                  ["device", "--help"], ["chat", "--help"], ["train", "--help"], ["bench", "--help"],
                                  ["bench", "snr", "--help"], ["bench", "rate", "--help"],
                                  ["bench", "serve", "--help"], ["bench", "overhead", "--help"]])
def test_help_loads_no_heavy_module_and_names_meg(argv: list[str]) -> None:
    proc = _no_torch_after(argv)
    assert proc.stdout.strip().endswith("NO-TORCH"), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: meg"), proc.stdout[:200]


def test_bench_help_describes_each_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.cli import BENCHMARKS

    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    for name, text in BENCHMARKS.items():
        assert name in out and text.split(":")[0] in " ".join(out.split())


def test_probe_says_what_failed(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    assert cli.main(["probe", "--grpc", f"127.0.0.1:{port}", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"unhealthy: 127.0.0.1:{port}: UNAVAILABLE"), err
    assert cli.main(["probe", "--http", f"http://127.0.0.1:{port}/healthz", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert "unhealthy" in err and "ConnectError" in err, err


@pytest.fixture()
def root_logging() -> Iterator[None]:
    """`meg up` configures the root logger of its process: put this test process's back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_up_refuses_an_open_api_off_loopback_before_starting_anything(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str],
                                                                    root_logging: None) -> None:
    monkeypatch.delenv("MEG_API_KEY", raising=False)
    started: list[object] = []
    monkeypatch.setattr("meg_cli.supervisor.Supervisor.start_all", lambda self: started.append(self))
    assert cli.main(["up", "--host", "0.0.0.0", "--no-prometheus"]) == 2
    assert started == []
    assert "refusing to listen on 0.0.0.0 without an API key" in capsys.readouterr().err
    assert cli.refuse_open_api("127.0.0.1") is None and cli.refuse_open_api("localhost") is None
    monkeypatch.setenv("MEG_API_KEY", "k1")
    assert cli.refuse_open_api("0.0.0.0") is None


def test_device_serves_an_open_api_off_loopback_only_when_told(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str],
                                                              root_logging: None) -> None:
    """Compose's device binds 0.0.0.0 in its container and publishes the port on loopback: without a key it must
    start with --open-api (loudly), and still refuse without it."""
    import device_client.app
    import device_client.server

    monkeypatch.delenv("MEG_API_KEY", raising=False)
    served: list[tuple[str, int]] = []
    monkeypatch.setattr(device_client.app, "create_app", lambda config: config)
    monkeypatch.setattr(device_client.server, "run_device_server",
                        lambda app, host, port, **kwargs: served.append((host, port)))
    parse = cli._parser().parse_args
    assert cli.cmd_device(parse(["device", "--host", "0.0.0.0", "--port", "8123"])) == 2
    assert served == []
    assert cli.cmd_device(parse(["device", "--host", "0.0.0.0", "--port", "8123", "--open-api"])) == 0
    assert served == [("0.0.0.0", 8123)]
    assert "WITHOUT AN API KEY" in capsys.readouterr().err


@pytest.mark.parametrize("raw", ["", "a", " a , b ,", ",,"])
def test_api_keys_are_read_as_the_device_reads_them(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    from device_client.app import DeviceConfig

    monkeypatch.setenv("MEG_API_KEY", raw)
    assert cli.api_keys_from_env() == DeviceConfig.keys_from_env()


def test_quick_benchmarks_write_only_under_the_ignored_folder() -> None:
    from bench.cli import QUICK_DIR, RESULTS_DIR, parse

    for which in ("snr", "rate", "serve", "overhead"):
        assert parse(which, ["--quick"]).out == QUICK_DIR
        assert parse(which, []).out == RESULTS_DIR
        assert parse(which, ["--quick", "--out", "/tmp/x"]).out == Path("/tmp/x")
    assert parse("snr", ["--smoke"]).out == QUICK_DIR
    ignored = subprocess.run(["git", "check-ignore", "-q", str(QUICK_DIR / "snr.csv")], cwd=REPO)
    assert ignored.returncode == 0, "bench/results/_tmp/ must be git-ignored"


def test_train_refuses_to_overwrite_the_shipped_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from models import DEFAULT_MODEL_DIR
    from models.train import DEFAULT_OUT, is_shipped, main as train_main

    assert not is_shipped(DEFAULT_OUT) and is_shipped(DEFAULT_MODEL_DIR) and is_shipped(DEFAULT_MODEL_DIR / "unet")
    before = (DEFAULT_MODEL_DIR / "training_log.json").read_bytes()
    with pytest.raises(SystemExit) as exc:
        train_main(["data", "--smoke", "--out", str(DEFAULT_MODEL_DIR)])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (DEFAULT_MODEL_DIR / "training_log.json").read_bytes() == before
    # A stage whose inputs are missing says which stage makes them, before loading anything.
    with pytest.raises(SystemExit):
        train_main(["unet", "--smoke", "--out", str(tmp_path / "new")])
    assert "meg train vae" in capsys.readouterr().err


def test_a_bench_testbed_removes_its_temporary_log_folder(tmp_path: Path) -> None:
    from bench.testbed import LocalTestbed

    class Sleeper(LocalTestbed):
        def command(self, name: str) -> list[str]:
            return [sys.executable, "-c", "import time; time.sleep(60)"]

    bed = Sleeper()
    bed.start_service("edge")
    log_dir = bed.log_dir
    assert log_dir is not None and log_dir.is_dir()
    bed.down()
    assert not log_dir.exists()
    kept = Sleeper(log_dir=tmp_path)  # a folder the caller gave is the caller's
    kept.start_service("edge")
    kept.down()
    assert (tmp_path / "edge.log").is_file()


def test_a_bench_testbed_interrupted_while_starting_leaves_nothing_behind() -> None:
    from bench.testbed import LocalTestbed

    started: list[subprocess.Popen] = []
    folders: list[Path] = []

    class Interrupted(LocalTestbed):
        def command(self, name: str) -> list[str]:
            return [sys.executable, "-c", "import time; time.sleep(60)"]

        def start_service(self, name: str) -> None:
            super().start_service(name)
            started.append(self.procs[name])
            folders.append(self.log_dir)

        def wait_healthy(self, timeout: float | None = None) -> None:
            raise KeyboardInterrupt  # Ctrl-C while the services start

    with pytest.raises(KeyboardInterrupt):
        Interrupted().up()
    assert len(started) == 3 and all(p.poll() is not None for p in started)
    assert folders and not any(f.exists() for f in folders)


def test_supervisor_backoff_doubles_to_its_cap_and_resets_after_a_healthy_run() -> None:
    now = [0.0]
    crash = Service("crash", [sys.executable, "-c", "raise SystemExit(3)"])
    sup = Supervisor([crash], backoff_start_s=0.5, backoff_max_s=10.0, reset_after_s=60.0, clock=lambda: now[0])
    sup.start_all()
    for _ in range(7):
        assert crash.proc is not None
        crash.proc.wait(timeout=60)
        sup.tick()                      # notices the crash, schedules the restart
        assert sup.tick() == []         # not before its backoff is over
        now[0] = crash.restart_due or now[0]
        assert sup.tick() == [crash]    # restarted
    assert crash.history == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert crash.restarts == 7
    sup.stop()

    steady = Service("steady", [sys.executable, "-c", "import time; time.sleep(60)"])
    sup = Supervisor([steady], clock=lambda: now[0])
    sup.start_all()
    steady.backoff_s = 8.0              # as after a few crashes
    now[0] += 59.0
    sup.tick()
    assert steady.backoff_s == 8.0
    now[0] += 1.0
    sup.tick()
    assert steady.backoff_s == 0.5
    sup.stop()
    assert steady.proc is not None and steady.proc.returncode == -15  # SIGTERM ends it


def test_no_default_is_shown_for_a_computed_default() -> None:
    model_dir = next(f for f in cli.SERVICES["edge"].fields() if f.key == "model_dir")
    assert model_dir.default is NO_DEFAULT and model_dir.default_text() is None
