"""Certificates for TLS registries on loopback, made with `cryptography`: a test CA and the certificates it
issues, or a self-signed one (a lab registry). ECDSA P-256 keys: quick to make, and Go and OpenSSL both take them.

    ca = TestCA(tmp_path)                                  # ca.cert: the PEM a REGISTRY_CA_BUNDLE names
    pair = ca.issue(["localhost", "127.0.0.1"], tmp_path)  # pair.cert, pair.key: for distribution's http.tls
    lab = self_signed(["127.0.0.1"], tmp_path)
    context = pair.server_context()                        # for a ThreadedServer(tls=...)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> CertPair:
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertPair(directory / f"{stem}.pem", directory / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return pair


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2)))


def _leaf(builder: x509.CertificateBuilder, names: list[str]) -> x509.CertificateBuilder:
    return (builder.add_extension(_alt_names(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))


class TestCA:
    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "docker-http-passthrough test CA"):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.subject = _name(name)
        self.certificate = (_builder(self.subject, self.subject, self.key)
                            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                         content_commitment=False, key_encipherment=False,
                                                         data_encipherment=False, key_agreement=False,
                                                         encipher_only=False, decipher_only=False), critical=True)
                            .sign(self.key, hashes.SHA256()))
        self.cert = _write(Path(directory), "ca", self.certificate, self.key).cert

    def issue(self, names: list[str], directory: Path, stem: str | None = None) -> CertPair:
        """A server certificate for ``names`` (host names and IP addresses) signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf(_builder(_name(names[0]), self.subject, key), names).sign(self.key, hashes.SHA256())
        return _write(Path(directory), stem or f"server-{secrets.token_hex(3)}", cert, key)


def self_signed(names: list[str], directory: Path, stem: str = "self-signed") -> CertPair:
    """A certificate that signs itself, as a lab registry has: nothing can verify it."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(_builder(_name(names[0]), _name(names[0]), key), names).sign(key, hashes.SHA256())
    return _write(Path(directory), stem, cert, key)
