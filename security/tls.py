"""Mutual TLS for the gRPC hops (device → channel emulator → edge).

``meg certs DIR`` writes a private testbed CA and one certificate per service (``edge``, ``channel``,
``device``), each valid for its service name, ``localhost`` and ``127.0.0.1``. With ``--tls-dir DIR`` every
gRPC server demands a client certificate signed by that CA (mutual TLS) and every gRPC client presents its
own. The REST API stays HTTP behind the API key; put a TLS-terminating proxy in front for public exposure.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

SERVICES = ("edge", "channel", "device")


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, tls_dir: Path, service: str) -> "TlsFiles":
        files = cls(tls_dir / "ca.pem", tls_dir / f"{service}.pem", tls_dir / f"{service}-key.pem")
        missing = [str(p) for p in (files.ca, files.cert, files.key) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"TLS files missing: {', '.join(missing)}; create them with `meg certs {tls_dir}`")
        return files


def server_credentials(tls_dir: Path, service: str) -> grpc.ServerCredentials:
    f = TlsFiles.of(tls_dir, service)
    return grpc.ssl_server_credentials([(f.key.read_bytes(), f.cert.read_bytes())],
                                       root_certificates=f.ca.read_bytes(), require_client_auth=True)


def channel_credentials(tls_dir: Path, service: str) -> grpc.ChannelCredentials:
    f = TlsFiles.of(tls_dir, service)
    return grpc.ssl_channel_credentials(root_certificates=f.ca.read_bytes(), private_key=f.key.read_bytes(),
                                        certificate_chain=f.cert.read_bytes())


def generate_testbed_certs(out_dir: Path, days: int = 365, extra_hosts: tuple[str, ...] = ()) -> list[Path]:
    """A CA and one key pair per service, signed by it (EC P-256). Returns the files written."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MEG testbed CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA256()))
    written = [out_dir / "ca.pem"]
    written[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for service in SERVICES:
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(service), x509.DNSName("localhost"),
                                         *(x509.DNSName(h) for h in extra_hosts),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_path, key_path = out_dir / f"{service}.pem", out_dir / f"{service}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        written += [cert_path, key_path]
    return written
