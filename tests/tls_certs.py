"""Certificates for TLS tests, made with the openssl command: a CA, a server certificate for
127.0.0.1 and localhost, and a client certificate (its common name is the PostgreSQL user, so a
server asking for ``clientcert=verify-full`` accepts it). EC P-256 keys: quick to make."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


def _signed(folder: Path, name: str, subject: str, extensions: str) -> None:
    _openssl(folder, "req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(
        folder,
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        f"{name}.pem",
        "-extfile",
        f"{name}.ext",
    )


def make(folder: Path, client_name: str = "postgres") -> Certs:
    folder.mkdir(parents=True, exist_ok=True)
    ca = ["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=runherd test CA"]
    _openssl(folder, "req", "-x509", *_EC, *ca)
    server = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    _signed(folder, "server", "/CN=localhost", server)
    _signed(folder, "client", f"/CN={client_name}", "extendedKeyUsage=clientAuth\n")
    for path in folder.iterdir():
        path.chmod(0o644)  # the private servers run as other users; test keys, thrown away after
    return Certs(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )
