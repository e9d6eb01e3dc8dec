"""``fedtune keys``: a CA, the server's TLS certificate, and one SuperNode auth key pair per site.

Everything comes from ``cryptography``. TLS files are plain PEM. SuperNode keys are EC SECP384R1:
the private key in OpenSSH format (``flower-supernode --auth-supernode-private-key`` reads it with
``load_ssh_private_key``) and the public key as one OpenSSH line (``flwr supernode register`` reads
it with ``load_ssh_public_key``). Private keys are written with mode 0600, all into a temp dir that
is renamed into place, so a failure never leaves half a key set. A ``.gitignore`` holding ``*`` keeps
the whole directory out of git.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.core.errors import ConfigError

VALID_DAYS = 365


@dataclass(frozen=True)
class KeyLayout:
    """The fixed file layout other commands and the docs rely on."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_key(self, k: int) -> Path:
        return self.root / "nodes" / f"node-{k}.key"

    def node_pub(self, k: int) -> Path:
        return self.root / "nodes" / f"node-{k}.pub"

    def node_pubs(self) -> list[Path]:
        """Every ``nodes/node-K.pub``, in K order."""
        return sorted((self.root / "nodes").glob("node-*.pub"), key=lambda p: int(p.stem.split("-")[1]))


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_keys(out: Path, nodes: int, hosts: list[str]) -> KeyLayout:
    """Create the CA, server certificate and ``nodes`` SuperNode key pairs under ``out``."""
    if nodes < 1:
        raise ConfigError(f"`--nodes` must be >= 1, got {nodes}.")
    if not hosts or not all(h.strip() for h in hosts):
        raise ConfigError(f"`--hosts` must name at least one host, got {','.join(hosts)!r}.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} is not empty; refusing to overwrite keys (choose another --out).")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedtune CA"))
        .issuer_name(_name("fedtune CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h.strip()) for h in hosts]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        layout = KeyLayout(tmp)
        _write(layout.ca, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
        _write(layout.ca_key, _pem_key(ca_key, serialization.PrivateFormat.PKCS8), private=True)
        _write(layout.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
        _write(layout.server_key, _pem_key(server_key, serialization.PrivateFormat.PKCS8), private=True)
        for k in range(1, nodes + 1):
            key = ec.generate_private_key(ec.SECP384R1())
            _write(layout.node_key(k), _pem_key(key, serialization.PrivateFormat.OpenSSH), private=True)
            public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            _write(layout.node_pub(k), public + b"\n", private=False)
        _write(
            tmp / ".gitignore",
            b"# Written by `fedtune keys`: private keys must never be committed.\n*\n",
            private=False,
        )
        os.chmod(tmp, 0o700)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return KeyLayout(out)
