"""HTTPS on the gateway: its certificate and key, where they come from, and how podllama's own clients trust it.

- `[gateway] tls = "self-signed"`: a certificate made once for the stack and kept with its secrets
  (`secrets/tls.crt`, `secrets/tls.key`), naming localhost, 127.0.0.1, ::1, this machine's name, the bound
  address and `allowed_hosts`; made again only when it nears its end or a name it must carry is missing.
  Clients trust it by its SHA-256 fingerprint, which `start` and `status` print.
- `[gateway] tls_cert` + `tls_key`: files of the user's (a certificate from their own CA or a public one).

The CLI trusts the system's CAs and the gateway's certificate itself, and checks the host name as any client does.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import atomic_write
from .credentials import Credentials

if TYPE_CHECKING:
    from ..config import Config

CERT, KEY = "tls.crt", "tls.key"  # the self-signed pair, in the stack's secrets
DAYS = 825  # what browsers accept for a server certificate
RENEW_DAYS = 30  # made again when it ends within this many days


class TlsError(Exception):
    """A certificate or key that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Tls:
    cert: Path
    key: Path
    self_signed: bool

    def fingerprint(self) -> str:
        """The certificate's SHA-256 fingerprint, as browsers and `openssl x509 -fingerprint` show it."""
        return fingerprint(self.cert)

    def client_context(self) -> ssl.SSLContext:
        """What podllama's own clients (the CLI, start's checks) verify the gateway with: the system's CAs and
        this certificate."""
        ctx = ssl.create_default_context()
        ctx.load_verify_locations(cafile=str(self.cert))
        return ctx

    def check(self) -> None:
        """The pair loads (the key matches the certificate), else TlsError naming them."""
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as e:
            raise TlsError(f"[gateway] TLS: {self.cert} and {self.key} cannot be used ({e}); give a PEM "
                           "certificate (its chain after it) and its private key") from None


def of(cfg: Config) -> Tls | None:
    """The gateway's TLS material for CFG (None: plain HTTP)."""
    gw = cfg.gateway
    if gw.tls_cert and gw.tls_key:
        return Tls(cfg.named_file(gw.tls_cert), cfg.named_file(gw.tls_key), False)
    if gw.tls == "self-signed":
        creds = Credentials(cfg.state_path)
        return Tls(creds.path(CERT), creds.path(KEY), True)
    return None


def names(cfg: Config) -> list[str]:
    """What a self-signed certificate names: every way this machine's clients reach the gateway."""
    gw = cfg.gateway
    out = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    if gw.host not in ("0.0.0.0", "::", ""):
        out.append(gw.host)
    out += [h.strip("[]") for h in gw.allowed_hosts if h != "*"]
    return list(dict.fromkeys(n.lower() for n in out if n))


def ensure(cfg: Config) -> tuple[Tls | None, str | None]:
    """CFG's TLS material ready: a self-signed pair made where missing, ending soon, or not naming every name;
    files of the user's checked. Returns it and what was done, for the user (None: nothing)."""
    tls = of(cfg)
    if tls is None:
        return None, None
    if not tls.self_signed:
        for path in (tls.cert, tls.key):
            if not path.is_file():
                raise TlsError(f"[gateway] tls_cert/tls_key: {path} does not exist; give the files, or use "
                               "tls = \"self-signed\"")
        tls.check()
        return tls, None
    wanted = names(cfg)
    if tls.cert.is_file() and tls.key.is_file() and _still_good(tls.cert, wanted):
        return tls, None
    _make(tls, wanted)
    return tls, f"self-signed certificate made for {', '.join(wanted)}: {tls.cert} (SHA-256 {tls.fingerprint()})"


def _still_good(cert: Path, wanted: list[str]) -> bool:
    from cryptography import x509

    c = x509.load_pem_x509_certificate(cert.read_bytes())
    left = c.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(n).lower() for n in san.get_values_for_type(x509.DNSName)} | \
        {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    return left > datetime.timedelta(days=RENEW_DAYS) and set(wanted) <= have


def _make(tls: Tls, wanted: list[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"podllama gateway ({socket.gethostname()})")])
    alt: list[x509.GeneralName] = []
    for n in wanted:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    tls.cert.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(tls.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()).decode(), mode=0o600)
    atomic_write(tls.cert, cert.public_bytes(serialization.Encoding.PEM).decode(), mode=0o644)


def fingerprint(cert: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def remote_context(cfg: Config, name: str) -> ssl.SSLContext | None:
    """How remote server NAME is verified: the system's CAs and its ca_file where given (None: plain HTTP)."""
    remote = cfg.remotes[name]
    if not remote.secure:
        return None
    ctx = ssl.create_default_context()
    if remote.ca_file:
        path = cfg.named_file(remote.ca_file)
        try:
            ctx.load_verify_locations(cafile=str(path))
        except (OSError, ssl.SSLError) as e:
            raise TlsError(f"servers.{name}.ca_file: {path} cannot be read as a PEM CA ({e})") from None
    return ctx


def remote_verification(cfg: Config, name: str) -> tuple[ssl.SSLContext | None, str | None]:
    """How the gateway verifies remote server NAME while it runs, and why that is by the system's CAs alone
    where its ca_file cannot be read (never no verification; `start` refuses such a file before it runs)."""
    try:
        return remote_context(cfg, name), None
    except TlsError as e:
        return ssl.create_default_context(), f"{e}; it is verified by the system's CAs alone"


__all__ = ["CERT", "KEY", "Tls", "TlsError", "ensure", "fingerprint", "names", "of", "remote_context",
           "remote_verification"]
