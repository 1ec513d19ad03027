"""A throw-away PKI for the test control plane: one CA, the apiserver's serving certificate,
client certificates for the admin and each component, and the service-account signing key.

Everything is ECDSA P-256 (fast to generate, accepted by every Kubernetes component) and lives
in the control plane's temporary directory. Made with the ``cryptography`` package when it is
installed, else with the ``openssl`` command (``TINV_PKI=openssl`` forces that).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

try:
    if os.environ.get("TINV_PKI") == "openssl":
        raise ImportError("TINV_PKI=openssl")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError:  # pragma: no cover - exercised with TINV_PKI=openssl
    x509 = None


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()

    @property
    def key_pem(self) -> bytes:
        return self.key.read_bytes()


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _name(cn: str, orgs: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def PKI(directory: Path):  # noqa: N802 - a factory that picks the backend
    """Creates keys and certificates under ``directory``: ``.ca``, ``.issue(...)``, ``.signing_key(...)``."""
    return CryptographyPKI(directory) if x509 is not None else OpenSSLPKI(directory)


class CryptographyPKI:
    """Creates keys and certificates under ``directory`` with the ``cryptography`` package."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        now = _dt.datetime.now(_dt.timezone.utc)
        self._not_before = now - _dt.timedelta(hours=1)
        self._not_after = now + _dt.timedelta(days=7)
        self._ca_key = _key()
        ca_name = _name("tinv-test-ca")
        self._ca_name = ca_name
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._ca_key.public_key()), critical=False)
            .sign(self._ca_key, hashes.SHA256())
        )
        self._ca_cert = ca_cert
        self.ca = KeyPair(self._write("ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM)),
                          self._write("ca.key", _key_pem(self._ca_key)))

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def issue(self, name: str, cn: str, orgs: tuple[str, ...] = (), *, server: bool = False,
              client: bool = False, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> KeyPair:
        key = _key()
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn, orgs))
            .issuer_name(self._ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()), critical=False
            )
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        return KeyPair(self._write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
                       self._write(f"{name}.key", _key_pem(key)))

    def signing_key(self, name: str) -> KeyPair:
        """A bare key pair (public key PEM in ``cert``) for service-account token signing."""
        key = _key()
        pub = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return KeyPair(self._write(f"{name}.pub", pub), self._write(f"{name}.key", _key_pem(key)))


class OpenSSLPKI:
    """The same PKI made with the ``openssl`` command line tool."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        key = self._genkey("ca")
        cert = self.dir / "ca.crt"
        self._run("req", "-x509", "-new", "-key", key, "-subj", "/CN=tinv-test-ca", "-days", "7", "-sha256",
                  "-out", cert, "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,digitalSignature,keyCertSign,cRLSign")
        self.ca = KeyPair(cert, key)

    def _run(self, *args) -> None:
        proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, cwd=self.dir)
        if proc.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(map(str, args))} failed: {proc.stderr.strip()}")

    def _genkey(self, name: str) -> Path:
        key = self.dir / f"{name}.key"
        self._run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
        key.chmod(0o600)
        return key

    def issue(self, name: str, cn: str, orgs: tuple[str, ...] = (), *, server: bool = False,
              client: bool = False, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> KeyPair:
        key = self._genkey(name)
        csr, cert, ext = self.dir / f"{name}.csr", self.dir / f"{name}.crt", self.dir / f"{name}.ext"
        subject = "".join(f"/O={o}" for o in orgs) + f"/CN={cn}"
        self._run("req", "-new", "-key", key, "-subj", subject, "-out", csr)
        usages = [u for u, on in (("serverAuth", server), ("clientAuth", client)) if on]
        lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature",
                 "authorityKeyIdentifier=keyid"]
        if usages:
            lines.append("extendedKeyUsage=" + ",".join(usages))
        sans = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        self._run("x509", "-req", "-in", csr, "-CA", self.ca.cert, "-CAkey", self.ca.key, "-CAcreateserial",
                  "-days", "7", "-sha256", "-extfile", ext, "-out", cert)
        return KeyPair(cert, key)

    def signing_key(self, name: str) -> KeyPair:
        key = self._genkey(name)
        pub = self.dir / f"{name}.pub"
        self._run("ec", "-in", key, "-pubout", "-out", pub)
        return KeyPair(pub, key)
