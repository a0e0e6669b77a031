"""Mutual TLS for an agent reached directly at the pod IP (no port-forward).

Why the agent makes its own key: a private key must never travel in the pod
spec (anyone who may read pods could read it). The controller's CA
*certificate* arrives in an env var and decides which clients may connect
(``require_client_auth``); the agent generates a fresh key and a self-signed
certificate at start and prints the certificate (public) to its log, where
the controller reads it through the API server (``pods/log``) and pins it.
A network attacker can then neither call the agent nor impersonate it.
"""

from __future__ import annotations

import datetime
import ipaddress

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meridio_debug.agent.errors import ListenError

AGENT_TLS_NAME = "meridio-debug-agent"
CERT_BANNER = "meridio-debug-agent server certificate (pin this):"


def self_signed(days: int = 30) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a self-signed server certificate for it: (cert PEM, key PEM).

    The certificate is its own trust anchor for the controller (a CA with
    path length 0), named ``meridio-debug-agent``: the controller connects to
    a pod IP but verifies this name, as every agent has the same one and is
    told apart by the pinned certificate.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, AGENT_TLS_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(AGENT_TLS_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def check_ca(pem: bytes, where: str) -> None:
    """Refuse something that is not a PEM CA certificate (a clear error beats a TLS failure later)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ListenError(f"{where}: not a PEM certificate: {exc}") from exc
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise ListenError(f"{where}: the client CA certificate is not a CA (basicConstraints)")


def server_credentials(
    cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes
) -> grpc.ServerCredentials:
    """gRPC credentials that require a client certificate signed by ``client_ca_pem``."""
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=client_ca_pem, require_client_auth=True
    )
