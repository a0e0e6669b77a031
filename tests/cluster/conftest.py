"""The cluster tier's test bed: a real kube-apiserver + etcd per run, a lab per module.

Fixture API (other test files of this tier build on it):

- ``control_plane`` (session): tests/cluster/kube.py ``ControlPlane``, etcd and
  kube-apiserver (built by scripts/build-kube, cached by version) on
  127.0.0.1 with TLS, ``--authorization-mode=Node,RBAC``, ServiceAccount and
  PodSecurity admission; ``.admin`` is a system:masters ApiClient for the test
  bed's own setup, ``.version`` the server's gitVersion (also in the header).
- ``kubelet`` (session): tests/cluster/kubelet.py ``Kubelet``, the node side
  that watches pods of its Nodes, writes their status, runs agents added as
  ephemeral containers in the lab's namespaces, and serves portForward /
  containerLogs to the API server. ``bad_images`` / ``stuck_images`` steer
  image pulls; ``add_dead_node`` makes a Node whose kubelet never answers. It
  restarts a lab container whose PID 1 dies (exit code, CrashLoopBackOff with
  ``backoff``, previous logs; ``expire_backoffs``), probes the FE's readiness
  from bird, and schedules pods without a node by their ``nodeSelector``.
- ``cluster`` (module): one lab (controller/lab.py) and three namespaces
  named for the module: ``red`` (operator-named Meridio pods, Pod Security
  privileged), ``blue`` (Helm-named pods, enforce level baseline set after the
  pods exist, as when an admin tightens a namespace) and ``green`` (for
  destructive tests). ``Cluster.ns["red"]`` is the real namespace name; the
  kubeconfig holds a TokenRequest token of deploy/rbac.yaml's service account,
  bound by deploy/rbac.yaml's Role in each namespace. ``Cluster.runtime``,
  ``cli`` and ``popen`` run the product as that user; ``pod_by_lab``,
  ``read_pod``, ``set_role`` (drop verbs) and ``delete_pod`` are the admin's hand.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s_client

from meridio_debug.controller import lab
from meridio_debug.controller.runtime.kubernetes import KubeOptions, KubernetesRuntime
from tests.cluster.kube import REPO, ControlPlane, find_binaries
from tests.cluster.kubelet import Kubelet
from tests.cluster.pods import meridio_pod

CLI = [sys.executable, "-m", "meridio_debug.controller.cli"]
RBAC = [d for d in yaml.safe_load_all((REPO / "deploy/rbac.yaml").read_text()) if d]
SA = "meridio-debug"


def pytest_report_header() -> str:
    bins = find_binaries()
    if bins is None:
        return "kube-apiserver: not built (scripts/build-kube)"
    out = subprocess.run(
        [str(bins / "kube-apiserver"), "--version"], capture_output=True, text=True, check=False
    )
    return f"kube-apiserver: {out.stdout.strip()} ({bins})"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The server version again at the end: pytest hides the header under ``-q`` (CI's run)."""
    terminalreporter.write_line(pytest_report_header())


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tier's own XDG_CACHE_HOME: the agents' certificate pins of one test never reach
    another run through the user's ~/.cache (the CLI and in-process runtimes read it)."""
    old = os.environ.get("XDG_CACHE_HOME")
    cache = tmp_path_factory.mktemp("xdg-cache")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    try:
        yield cache
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    bins = find_binaries()
    if bins is None:
        pytest.fail("no kube-apiserver/etcd: run scripts/build-kube (scripts/setup does)")
    plane = ControlPlane(bins, tmp_path_factory.mktemp("kube"))
    try:
        plane.start()
        plane.crds()
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kubelet(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Kubelet]:
    k = Kubelet(control_plane, tmp_path_factory.mktemp("kubelet"))
    try:
        k.start()
        yield k
    finally:
        k.stop()


@dataclass
class Cluster:
    plane: ControlPlane
    kubelet: Kubelet
    kubeconfig: Path
    spec: Any
    work: Path
    ns: dict[str, str]
    lab_pods: dict[tuple[str, str], str] = field(default_factory=dict)  # (ns, lab) -> pod

    @property
    def core(self) -> Any:
        return k8s_client.CoreV1Api(self.plane.admin)

    def runtime(self, namespace: str = "red", **kw: Any) -> KubernetesRuntime:
        progress: list[tuple[str, str, str]] = kw.pop("events", [])
        tls = kw.pop("tls", None)
        kubeconfig = kw.pop("kubeconfig", str(self.kubeconfig))
        opts = KubeOptions(namespace=self.ns.get(namespace, namespace), kubeconfig=kubeconfig, **kw)
        return KubernetesRuntime(opts, progress=lambda *e: progress.append(e), tls=tls)

    def cli(
        self, *args: str, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        extra = [] if env and "KUBECONFIG" in env else ["--kubeconfig", str(self.kubeconfig)]
        return subprocess.run(
            [*CLI, *args, *extra],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*CLI, *args, "--kubeconfig", str(self.kubeconfig)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def pod_by_lab(self, namespace: str, lab_name: str) -> str:
        return self.lab_pods[(self.ns.get(namespace, namespace), lab_name)]

    def lab_of(self, namespace: str, pod: str) -> str:
        """The lab pod name behind a Kubernetes pod."""
        real = self.ns.get(namespace, namespace)
        return next(lab for (ns, lab), name in self.lab_pods.items() if ns == real and name == pod)

    def read_pod(self, namespace: str, name: str) -> dict[str, Any]:
        import json

        resp = self.core.read_namespaced_pod(
            name, self.ns.get(namespace, namespace), _preload_content=False
        )
        pod: dict[str, Any] = json.loads(resp.data)
        return pod

    def set_role(self, namespace: str, drop: set[tuple[str, str]] = frozenset()) -> None:  # type: ignore[assignment]
        """deploy/rbac.yaml's Role in the namespace, less the (verb, resource) pairs in ``drop``."""
        role = copy.deepcopy(next(d for d in RBAC if d["kind"] == "Role"))
        for rule in role["rules"]:
            rule["verbs"] = [
                v for v in rule["verbs"] if not any((v, r) in drop for r in rule["resources"])
            ]
        role["rules"] = [r for r in role["rules"] if r["verbs"]]
        real = self.ns.get(namespace, namespace)
        k8s_client.RbacAuthorizationV1Api(self.plane.admin).replace_namespaced_role(SA, real, role)
        # until the authorizer (its RBAC informer) sees the new Role: a SubjectAccessReview
        # of each granted and each dropped pair answers as the product's requests will
        want = {
            (v, r): (v, r) not in drop
            for rule in next(d for d in RBAC if d["kind"] == "Role")["rules"]
            for r in rule["resources"]
            for v in rule["verbs"]
        }
        authz = k8s_client.AuthorizationV1Api(self.plane.admin)
        user = f"system:serviceaccount:{self.ns['red']}:{SA}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            seen = {}
            for verb, res in want:
                resource, _, sub = res.partition("/")
                review = authz.create_subject_access_review(
                    {
                        "spec": {
                            "user": user,
                            "groups": ["system:serviceaccounts", "system:authenticated"],
                            "resourceAttributes": {
                                "namespace": real,
                                "verb": verb,
                                "resource": resource,
                                "subresource": sub,
                            },
                        }
                    }
                )
                seen[(verb, res)] = bool(review.status.allowed)
            if seen == want:
                return
            time.sleep(0.1)
        raise AssertionError(f"RBAC did not converge: {seen} != {want}")

    def delete_pod(self, namespace: str, name: str, grace: int | None = 0) -> None:
        self.core.delete_namespaced_pod(
            name, self.ns.get(namespace, namespace), grace_period_seconds=grace
        )

    def wait_running(self, namespace: str, names: list[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending and time.monotonic() < deadline:
            for n in list(pending):
                if self.read_pod(namespace, n).get("status", {}).get("phase") == "Running":
                    pending.discard(n)
            time.sleep(0.1)
        assert not pending, f"pods not Running after {timeout:g} s: {sorted(pending)}"


def create_namespace_with_access(plane: ControlPlane, ns: str, sa_ns: str) -> None:
    """deploy/rbac.yaml's Role and RoleBinding in ``ns``, for the service account in ``sa_ns``."""
    docs = []
    for d in RBAC:
        if d["kind"] == "ServiceAccount":
            continue
        doc = copy.deepcopy(d)
        if doc["kind"] == "RoleBinding":
            doc["subjects"] = [{"kind": "ServiceAccount", "name": SA, "namespace": sa_ns}]
        docs.append(doc)
    plane.apply(docs, namespace=ns)


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    control_plane: ControlPlane,
    kubelet: Kubelet,
) -> Iterator[Cluster]:
    # pid- and module-unique: each module of the tier has its own lab, namespaces and nodes
    tag = sum(map(ord, request.module.__name__)) % 10
    prefix = f"mdk{os.getpid() % 1000}{tag}-"
    spec = lab.build_spec(prefix)
    work = tmp_path_factory.mktemp("cluster")
    ns = {n: f"{prefix}{n}" for n in ("red", "blue", "green")}
    created: list[tuple[str, str]] = []
    try:
        lab.up(spec)
        for node in ("a", "b"):
            kubelet.add_node(f"{prefix}node-{node}")
        for real in ns.values():
            control_plane.namespace(real, "privileged")
        sa_doc = next(d for d in RBAC if d["kind"] == "ServiceAccount")
        control_plane.apply([sa_doc], namespace=ns["red"])
        for real in ns.values():
            create_namespace_with_access(control_plane, real, ns["red"])
        core = k8s_client.CoreV1Api(control_plane.admin)
        c = Cluster(control_plane, kubelet, Path(), spec, work, ns)
        for logical, real in ns.items():
            for p in spec.pods:
                if p.role == "gateway":
                    continue
                node = f"{prefix}node-" + p.name.rsplit("-", maxsplit=1)[-1][:1]
                node = node if node[-1] in "ab" else f"{prefix}node-a"
                manifest = meridio_pod(real, p.name, p.role, node, legacy=logical == "blue")
                core.create_namespaced_pod(real, manifest)
                name = manifest["metadata"]["name"]
                kubelet.netns[(real, name)] = p.netns
                c.lab_pods[(real, p.name)] = name
                created.append((real, name))
            for other in ("nsp-trench-a-0", "ipam-trench-a-0"):
                manifest = meridio_pod(real, other, "other", f"{prefix}node-a")
                core.create_namespaced_pod(real, manifest)
                created.append((real, other))
        for real in ns.values():
            c.wait_running(real, [n for pns, n in created if pns == real])
        control_plane.set_psa(ns["blue"], "baseline")
        token = control_plane.token(ns["red"], SA)
        c.kubeconfig = control_plane.kubeconfig_for(work / "kubeconfig", token, None)
        yield c
    finally:
        core = k8s_client.CoreV1Api(control_plane.admin)
        for pns, name in created:
            with contextlib.suppress(k8s_client.ApiException):
                core.delete_namespaced_pod(name, pns, grace_period_seconds=0)
        lab.down(prefix)
