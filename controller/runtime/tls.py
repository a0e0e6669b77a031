"""The controller's side of mutual TLS with agents reached directly (``--direct``).

Why a persistent CA: an agent trusts the CA *certificate* it was started
with (an env var of its ephemeral container, which can never change). A new
CA per run would make every run inject a new agent; so the CA lives in a
directory (default ``~/.config/meridio-debug/tls``, 0700; in a cluster a
mounted Secret) and each run issues itself a short-lived client certificate
from it. The CA key never leaves that directory; agents make their own keys
(agent/tls.py) and print their certificate, which the controller reads from
the container log through the API server and pins.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meridio_debug.controller.errors import MeridioDebugError, UsageError

AGENT_TLS_NAME = "meridio-debug-agent"  # the name every agent certificate carries
DEFAULT_TLS_DIR = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / (
    "meridio-debug/tls"
)
_PEM_RE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----"
)


@dataclass(frozen=True)
class ClientTls:
    """What a controller run presents to agents: its CA (for the agents' env) and a client pair."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @property
    def ca_fingerprint(self) -> str:
        return fingerprint(self.ca_pem)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the DER certificate, hex."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def create_ca(days: int = 3650) -> tuple[bytes, bytes]:
    """A new CA: (certificate PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("meridio-debug controller CA"))
        .issuer_name(_name("meridio-debug controller CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def issue_client(ca_pem: bytes, ca_key_pem: bytes, hours: int = 24) -> tuple[bytes, bytes]:
    """A short-lived client certificate signed by the CA: (certificate PEM, key PEM)."""
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise UsageError("the meridio-debug CA key must be an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("meridio-debug controller"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=hours))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def load_or_create(directory: Path = DEFAULT_TLS_DIR) -> ClientTls:
    """The CA in ``directory`` (created on first use, key 0600) and a fresh client pair."""
    ca_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    try:
        if ca_path.exists() and key_path.exists():
            ca_pem, ca_key_pem = ca_path.read_bytes(), key_path.read_bytes()
        else:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            ca_pem, ca_key_pem = create_ca()
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(ca_key_pem)
            ca_path.write_bytes(ca_pem)
    except OSError as exc:
        raise MeridioDebugError(
            f"cannot read or create the TLS CA in {directory}: {exc.strerror} "
            "(--tls-dir chooses another directory)"
        ) from exc
    try:
        cert_pem, key_pem = issue_client(ca_pem, ca_key_pem)
    except ValueError as exc:
        raise UsageError(f"{directory}: unreadable CA certificate or key: {exc}") from exc
    return ClientTls(ca_pem, cert_pem, key_pem)


def agent_certificate(log: bytes) -> bytes | None:
    """The certificate an agent printed at start (the first PEM block of its log), or None."""
    m = _PEM_RE.search(log)
    if m is None:
        return None
    pem = m.group(0).replace(b"\r\n", b"\n") + b"\n"
    try:
        x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    return pem


def pin_dir() -> Path:
    """Where pins live: $XDG_CACHE_HOME (read when a runtime starts), else ~/.cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meridio-debug/agents"


PIN_MAX_AGE_S = 7 * 86400.0
_PIN_PART = re.compile(r"[a-z0-9][a-z0-9.-]{0,252}")


def _private(st: os.stat_result) -> bool:
    """Owned by this user, writable by nobody else (a pin or its directory)."""
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


class Pins:
    """Agents' certificates already read from their logs, by pod UID and container name.

    Why: a warm run would otherwise read every agent's log again, one request per
    pod through the API server and the kubelet, for a certificate that cannot have
    changed: an ephemeral container never restarts and its name is never reused
    in a pod, and a pod made again has a new UID. Best effort, in a private
    directory (0700): a read-only or missing one only costs the log reads. A pin
    that no longer matches (a handshake that fails) is read from the log again.
    A pin decides which agent is trusted, so a directory or file that is not this
    user's own, is group- or world-writable, or is a symlink, is ignored.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else pin_dir()
        self._swept = False

    def _path(self, uid: str, name: str) -> Path | None:
        if not (_PIN_PART.fullmatch(uid) and _PIN_PART.fullmatch(name)):
            return None
        return self.directory / f"{uid}_{name}.pem"

    def _trusted_directory(self) -> bool:
        """A pin is a root of trust: only from a directory nobody else can write to."""
        try:
            return _private(os.stat(self.directory, follow_symlinks=False))
        except OSError:
            return False

    def get(self, uid: str, name: str) -> bytes | None:
        path = self._path(uid, name)
        if path is None or not self._trusted_directory():
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            if not _private(os.fstat(fd)):
                return None
            return f.read(64 << 10)

    def put(self, uid: str, name: str, pem: bytes) -> None:
        path = self._path(uid, name)
        if path is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self._trusted_directory():
                return
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            tmp.replace(path)
            self._sweep()
        except OSError:
            return

    def _sweep(self) -> None:
        """Pins of agents long gone (an agent exits after --idle-timeout, 15 min by default).

        Once per run: a stat of every pin for every new agent was 22,000 stats for 48.
        """
        if self._swept:
            return
        self._swept = True
        limit = time.time() - PIN_MAX_AGE_S
        for entry in os.scandir(self.directory):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < limit:
                    os.unlink(entry.path)
