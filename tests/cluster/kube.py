"""A real control plane for the cluster tier: etcd and kube-apiserver on loopback, with TLS.

Why a real API server: a stand-in encodes our own reading of Kubernetes, and it
was wrong where users hit it (Pod Security evaluates the whole pod, RBAC texts
change between releases, watch semantics, defaulting and validation). This is
what controller-runtime's envtest does: the two binaries built by
scripts/build-kube (cached outside the checkout), started once per test run,
with what no controller creates here made by hand: namespaces with their Pod
Security labels, the ``default`` service accounts, Nodes whose InternalIP and
kubelet port point at tests/cluster/kubelet.py, the Meridio CRDs.

Everything listens on 127.0.0.1 only; processes are stopped by their pid and
the temporary directory is removed in ``stop()``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client as k8s_client

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
KUBE_CACHE = Path(os.environ.get("KUBE_CACHE", "/var/cache/meridio-debug"))


def find_binaries() -> Path | None:
    """The directory with kube-apiserver and etcd (scripts/build-kube), or None."""
    explicit = os.environ.get("KUBE_BIN_DIR")
    candidates = [Path(explicit)] if explicit else sorted(KUBE_CACHE.glob("kube-v*"), reverse=True)
    for d in candidates:
        if (d / "kube-apiserver").is_file() and (d / "etcd").exists():
            return d
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- certificates ------------------------------------------------------------------------------


@dataclass
class Pem:
    cert: Path
    key: Path


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


class Pki:
    """A CA and the certificates the control plane and the kubelet need, in one directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._ca = (
            x509.CertificateBuilder()
            .subject_name(_name("meridio-debug-test-ca"))
            .issuer_name(_name("meridio-debug-test-ca"))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
            .sign(self._key, hashes.SHA256())
        )
        self.ca = self.dir / "ca.crt"
        self.ca.write_bytes(self._ca.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str,
        cn: str,
        org: str | None = None,
        *,
        server: bool = False,
        ips: Iterable[str] = (),
        dns: Iterable[str] = (),
    ) -> Pem:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn, org))
            .issuer_name(self._ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        pem = Pem(self.dir / f"{name}.crt", self.dir / f"{name}.key")
        pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        pem.key.chmod(0o600)
        return pem

    def server_context(self, pem: Pem) -> ssl.SSLContext:
        """A TLS server context that requires a client certificate signed by the CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pem.cert, pem.key)
        ctx.load_verify_locations(self.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def service_account_keys(self) -> tuple[Path, Path]:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        priv, pub = self.dir / "sa.key", self.dir / "sa.pub"
        priv.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        priv.chmod(0o600)
        pub.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return priv, pub


# --- the control plane -------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


class ControlPlane:
    """etcd + kube-apiserver on 127.0.0.1 with TLS, RBAC, ServiceAccount and PodSecurity admission.

    ``start()`` returns when /readyz answers; ``admin`` is an ApiClient with a
    system:masters client certificate (the test bed's own hand, never the
    product's), ``kubeconfig_for`` writes a kubeconfig for a service account
    token (TokenRequest), the way a user would get one.
    """

    def __init__(self, bin_dir: Path, work: Path | None = None) -> None:
        self.bin_dir = bin_dir
        self.work = work or Path(tempfile.mkdtemp(prefix="meridio-debug-kube-"))
        self._own_work = work is None
        self.pki = Pki(self.work / "pki")
        self.etcd: subprocess.Popen[bytes] | None = None
        self.apiserver: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.url = ""
        self.version = ""
        self.admin: Any = None
        self.kubelet_server = self.pki.issue("kubelet", "kubelet", server=True, ips=["127.0.0.1"])
        self.kubelet_client = self.pki.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"
        )

    def start(self, timeout: float = 120) -> None:
        etcd_port, peer_port = free_port(), free_port()
        data = self.work / "etcd"
        self.etcd = self._spawn(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                "--name=test",
                f"--data-dir={data}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=test=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync=true",
                "--quota-backend-bytes=1073741824",
                "--log-level=warn",
            ],
        )
        serving = self.pki.issue(
            "apiserver",
            "kube-apiserver",
            server=True,
            ips=["127.0.0.1", "10.0.0.1"],
            dns=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"],
        )
        admin = self.pki.issue("admin", "test-admin", "system:masters")
        sa_key, sa_pub = self.pki.service_account_keys()
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        policy = self.work / "audit-policy.yaml"
        policy.write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\n"
            "rules:\n- level: Metadata\n  userGroups: [system:serviceaccounts]\n"
            "- level: None\n"
        )
        self.apiserver = self._spawn(
            "apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={self.pki.ca}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,PodSecurity",
                "--allow-privileged=true",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                f"--kubelet-client-certificate={self.kubelet_client.cert}",
                f"--kubelet-client-key={self.kubelet_client.key}",
                f"--kubelet-certificate-authority={self.pki.ca}",
                "--kubelet-preferred-address-types=InternalIP",
                "--kubelet-timeout=5s",
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.work / 'audit.log'}",
                "--audit-log-mode=blocking",
                "--v=1",
            ],
        )
        conf = k8s_client.Configuration()
        conf.host = self.url
        conf.ssl_ca_cert = str(self.pki.ca)
        conf.cert_file = str(admin.cert)
        conf.key_file = str(admin.key)
        self.admin = k8s_client.ApiClient(conf)
        self._wait_ready(timeout)
        ver = k8s_client.VersionApi(self.admin).get_code()
        self.version = str(ver.git_version)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.work / f"{name}.log", "wb") as log:  # the child keeps its own fd
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def _wait_ready(self, timeout: float) -> None:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        ctx.load_cert_chain(str(self.work / "pki/admin.crt"), str(self.work / "pki/admin.key"))
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in (("etcd", self.etcd), ("kube-apiserver", self.apiserver)):
                if proc is not None and proc.poll() is not None:
                    log = (self.work / f"{name.removeprefix('kube-')}.log").read_text()[-3000:]
                    raise RuntimeError(f"{name} exited ({proc.returncode}):\n{log}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(f"kube-apiserver not ready after {timeout:g} s: {last}")

    def allowed_requests(self, user: str) -> set[tuple[str, str]]:
        """(verb, resource[/subresource]) of every request RBAC allowed ``user`` (audit log)."""
        out = set()
        for line in (self.work / "audit.log").read_text().splitlines():
            ev = json.loads(line)
            if ev.get("stage") not in ("ResponseStarted", "ResponseComplete"):
                continue
            if ev["user"]["username"] != user:
                continue
            if ev.get("annotations", {}).get("authorization.k8s.io/decision") != "allow":
                continue
            ref = ev.get("objectRef") or {}
            res = ref.get("resource", "")
            if ref.get("subresource"):
                res += "/" + ref["subresource"]
            out.add((ev["verb"], res))
        return out

    def stop(self) -> None:
        _stop(self.apiserver)
        _stop(self.etcd)
        if self.admin is not None:
            with contextlib.suppress(Exception):
                self.admin.close()
        if self._own_work:
            shutil.rmtree(self.work, ignore_errors=True)

    # --- what no controller creates here ----------------------------------------------------

    def core(self) -> Any:
        return k8s_client.CoreV1Api(self.admin)

    def namespace(self, name: str, psa: str = "privileged") -> None:
        """A namespace with its Pod Security enforce level and its ``default`` ServiceAccount."""
        labels = {
            "pod-security.kubernetes.io/enforce": psa,
            "pod-security.kubernetes.io/enforce-version": "latest",
        }
        self.core().create_namespace({"metadata": {"name": name, "labels": labels}})
        self.core().create_namespaced_service_account(name, {"metadata": {"name": "default"}})

    def set_psa(self, namespace: str, level: str) -> None:
        self.core().patch_namespace(
            namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": level}}}
        )

    def node(self, name: str, kubelet_port: int, address: str = "127.0.0.1") -> None:
        """A Node whose status points the API server at a kubelet on address:kubelet_port."""
        self.core().create_node(
            {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}}
        )
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = {
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": address},
                    {"type": "Hostname", "address": name},
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "kubelet is posting ready status",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
            }
        }
        self.core().patch_node_status(name, status)

    def apply(self, docs: Iterable[Mapping[str, Any]], namespace: str | None = None) -> None:
        """Create objects (admin) by kind: CRDs, RBAC, ServiceAccounts, Meridio CRs."""
        dyn_api = self.admin
        for doc in docs:
            if not doc:
                continue
            kind = doc["kind"]
            body = dict(doc)
            ns = namespace or body.get("metadata", {}).get("namespace")
            if kind == "CustomResourceDefinition":
                k8s_client.ApiextensionsV1Api(dyn_api).create_custom_resource_definition(body)
            elif kind == "Role":
                k8s_client.RbacAuthorizationV1Api(dyn_api).create_namespaced_role(ns, body)
            elif kind == "RoleBinding":
                for s in body.get("subjects") or []:
                    if s.get("kind") == "ServiceAccount":
                        s.setdefault("namespace", ns)
                k8s_client.RbacAuthorizationV1Api(dyn_api).create_namespaced_role_binding(ns, body)
            elif kind == "ClusterRole":
                k8s_client.RbacAuthorizationV1Api(dyn_api).create_cluster_role(body)
            elif kind == "ClusterRoleBinding":
                k8s_client.RbacAuthorizationV1Api(dyn_api).create_cluster_role_binding(body)
            elif kind == "ServiceAccount":
                self.core().create_namespaced_service_account(ns, body)
            elif kind == "Namespace":
                self.core().create_namespace(body)
            else:
                group, _, version = doc["apiVersion"].rpartition("/")
                plural = {"Trench": "trenches"}.get(kind, kind.lower() + "s")
                k8s_client.CustomObjectsApi(dyn_api).create_namespaced_custom_object(
                    group, version, ns, plural, body
                )

    def crds(self) -> None:
        """Meridio v1.2.8's CRDs (../shared/meridio/crds), established before returning."""
        docs = [
            yaml.safe_load(p.read_text()) for p in sorted((SHARED / "meridio/crds").glob("*.yaml"))
        ]
        self.apply(docs)
        ext = k8s_client.ApiextensionsV1Api(self.admin)
        deadline = time.monotonic() + 30
        for d in docs:
            while time.monotonic() < deadline:
                crd = ext.read_custom_resource_definition(d["metadata"]["name"])
                conds = {c.type: c.status for c in (crd.status.conditions or [])}
                if conds.get("Established") == "True":
                    break
                time.sleep(0.1)

    def token(self, namespace: str, service_account: str, seconds: int = 3600) -> str:
        req = {"spec": {"audiences": [], "expirationSeconds": seconds}}
        resp = self.core().create_namespaced_service_account_token(
            service_account, namespace, req, _preload_content=False
        )
        return str(json.loads(resp.data)["status"]["token"])

    def kubeconfig_for(
        self, path: Path, token: str, namespace: str | None, cluster: str = "test"
    ) -> Path:
        ctx: dict[str, Any] = {"cluster": cluster, "user": f"{cluster}-user"}
        if namespace:
            ctx["namespace"] = namespace
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": cluster,
                    "cluster": {"server": self.url, "certificate-authority": str(self.pki.ca)},
                }
            ],
            "users": [{"name": f"{cluster}-user", "user": {"token": token}}],
            "contexts": [{"name": cluster, "context": ctx}],
            "current-context": cluster,
        }
        path.write_text(yaml.safe_dump(doc))
        path.chmod(0o600)
        return path
