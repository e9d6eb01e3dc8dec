"""`fedtune keys`: a CA that signs the server certificate, node keys in Flower's format, 0600, no overwrite."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key

from fedtune.core.errors import ConfigError
from fedtune.deploy.keys import make_keys


def test_keys_layout_chain_and_modes(tmp_path: Path) -> None:
    # Execute
    layout = make_keys(tmp_path / "keys", nodes=2, hosts=["server.example", "10.0.0.7"])

    # Assert: the server certificate is signed by the CA and names both hosts
    ca = x509.load_pem_x509_certificate(layout.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    server_key = load_pem_private_key(layout.server_key.read_bytes(), password=None)
    assert server_key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    # Node keys load the way Flower loads them, and each pair matches
    for k in (1, 2):
        private = load_ssh_private_key(layout.node_key(k).read_bytes(), password=None)
        public = load_ssh_public_key(layout.node_pub(k).read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
        assert layout.node_pub(k).read_text().startswith("ecdsa-sha2-nistp384 ")
    for path in (layout.server_key, layout.ca_key, layout.node_key(1), layout.node_key(2)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert [p.name for p in layout.node_pubs()] == ["node-1.pub", "node-2.pub"]
    # and git ignores the whole directory, private keys included
    assert "*" in (layout.root / ".gitignore").read_text().splitlines()


def test_git_ignores_every_key_file(tmp_path: Path) -> None:
    # Prepare: the key directory inside a git work tree
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    layout = make_keys(tmp_path / "keys", nodes=1, hosts=["localhost"])

    # Execute: what `git add -A` would stage
    staged = subprocess.run(
        ["git", "-C", str(tmp_path), "add", "-A", "--dry-run"], capture_output=True, text=True, check=True
    ).stdout

    # Assert: nothing of the key directory
    assert layout.ca_key.exists() and staged.strip() == "", staged


def test_keys_refuse_a_non_empty_directory(tmp_path: Path) -> None:
    make_keys(tmp_path / "keys", nodes=1, hosts=["localhost"])
    before = sorted(p.name for p in (tmp_path / "keys").rglob("*"))
    with pytest.raises(ConfigError, match="is not empty; refusing to overwrite"):
        make_keys(tmp_path / "keys", nodes=3, hosts=["localhost"])
    assert sorted(p.name for p in (tmp_path / "keys").rglob("*")) == before
    assert not list(tmp_path.glob(".keys.tmp-*"))
