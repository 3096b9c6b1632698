"""A throwaway certificate authority (tests, `agentcg bench access`): a CA, a server certificate
for loopback and a client certificate, made with the openssl command line. Not for production:
the keys are unencrypted and valid for two days."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Pki", "make_client_cert", "make_pki"]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: a client trusting it cannot verify

    @property
    def directory(self) -> Path:
        return self.ca.parent


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip


def _signed(d: Path, name: str, ca: str, ext: str) -> None:
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca")
    _ca(d, "other-ca")
    _signed(
        d,
        "server",
        "ca",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    _signed(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    return Pki(
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        other_ca=d / "other-ca.pem",
    )


def make_client_cert(pki: Pki, name: str, alt_names: list[str]) -> tuple[Path, Path]:
    """A client certificate (PEM certificate, key) signed by ``pki``'s CA, with the common name
    ``name`` and the subject alternative names ``alt_names`` ("DNS:host-17.example",
    "URI:spiffe://example.org/node/host-17")."""
    san = f"subjectAltName={','.join(alt_names)}\n" if alt_names else ""
    _signed(pki.directory, name, "ca", f"{san}extendedKeyUsage=clientAuth\n")
    return pki.directory / f"{name}.pem", pki.directory / f"{name}.key"
