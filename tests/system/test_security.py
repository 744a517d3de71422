"""Mutual TLS between the services and the safety rules of the device."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import Testbed
from security.tls import channel_credentials, generate_testbed_certs


def _check(target: str, credentials: grpc.ChannelCredentials | None) -> int:
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_mutual_tls_testbed(fresh_testbed: Testbed, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    generate_testbed_certs(certs)
    tls = ["--tls-dir", str(certs)]
    fresh_testbed.edge_args += tls
    fresh_testbed.channel_args += tls
    fresh_testbed.device_args += tls
    fresh_testbed.up()
    resp = httpx.post(f"{fresh_testbed.url}/v1/generate", timeout=120,
                      json={"prompt": "a blue square on a black background", "seed": 1, "steps": 2})
    assert resp.status_code == 200, resp.text
    edge = f"127.0.0.1:{fresh_testbed.edge_port}"
    assert _check(edge, channel_credentials(certs, "device")) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError):  # plaintext is refused
        _check(edge, None)
    rogue = tmp_path / "rogue"
    generate_testbed_certs(rogue)
    rogue_creds = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes(),
                                               private_key=(rogue / "device-key.pem").read_bytes(),
                                               certificate_chain=(rogue / "device.pem").read_bytes())
    with pytest.raises(grpc.RpcError):  # a client certificate from another CA is refused
        _check(edge, rogue_creds)


def test_missing_tls_files_say_how_to_make_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="meg certs"):
        channel_credentials(tmp_path, "edge")
