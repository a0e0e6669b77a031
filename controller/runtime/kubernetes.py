"""Kubernetes runtime: agents as ephemeral containers in Meridio pods, reached by port-forward or mTLS.

The only module that imports the ``kubernetes`` client (an import-linter
contract says so): everything else sees ``PodRef``/``AgentClient`` and our own
errors. Decisions that are not about the client live in runtime/k8s_spec.py.

For each pod, ``open``:

1. reads the pod and **reuses** a running (or starting) agent of the same
   flavour (image, profile, transport, CA): ephemeral containers can be
   neither removed nor restarted, so one is added only when none is usable,
   with the next generation's name (k8s_spec.plan);
2. otherwise **injects** one: a strategic-merge PATCH of
   ``pods/{name}/ephemeralcontainers`` with ``{"spec": {"ephemeralContainers":
   [agent]}}``, which also works for a pod's first ephemeral container (a JSON
   patch appending to ``/spec/ephemeralContainers/-`` fails while the list does
   not exist); then records it in the pod annotation
   ``meridio-debug.nordix.org/agents`` (a second PATCH on the pod's metadata,
   RBAC ``patch pods``; best effort: the deterministic names in the pod spec
   are the source of truth, the annotation is for humans and ``agents``);
   pod labels are never touched;
3. **waits** until the container runs, watching the pod as kubectl does
   (polling when RBAC refuses ``watch``; failing at once on permanent
   waiting reasons), then connects and waits until GetInfo
   answers. A reused agent that exits at that very moment (its idle timeout)
   is replaced once;
4. **connects** through the API server's port-forward (default; the agent
   listens on 127.0.0.1 in the pod, RBAC ``pods/portforward`` is the gate): a
   private unix socket is relayed to ``kubernetes.stream.portforward``, one
   websocket per connection, as ``kubectl port-forward`` does; or **directly**
   to the pod IP. Both use mutual TLS (controller/runtime/tls.py): the pod's other
   containers share its loopback, so the agent accepts only our client
   certificate, and we pin the certificate it printed to its log.

Every ``ApiException`` becomes one of our errors (``from`` it) saying what
failed for which pod and what to do: PSA refusals, RBAC denials with the
missing verb and resource, deleted pods, 422s, timeouts.

The client is synchronous; calls run in a thread pool so pods proceed
concurrently under asyncio.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import json
import logging
import os
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import certifi
import grpc
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client import rest as k8s_rest
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from meridio_debug.controller.errors import (
    AccessDenied,
    AgentCallError,
    ConfigError,
    InjectionError,
    MeridioDebugError,
    PodNotFound,
    RuntimeUnavailable,
    UsageError,
)
from meridio_debug.controller.model import ContainerHealth, KubeState, PodKind, ReadProblem
from meridio_debug.controller.model.meridio_config import config_from_configmap, config_from_crs
from meridio_debug.controller.runtime import PodRef, k8s_health
from meridio_debug.controller.runtime import k8s_spec as spec
from meridio_debug.controller.runtime.portforward import PortForward, ProtocolError, UpgradeRefused
from meridio_debug.controller.runtime.throttle import Throttle
from meridio_debug.controller.runtime.tls import (
    AGENT_TLS_NAME,
    DEFAULT_TLS_DIR,
    ClientTls,
    Pins,
    agent_certificate,
    load_or_create,
)
from meridio_debug.controller.runtime.workdirs import sweep
from meridio_debug.controller.wire.client import CHANNEL_OPTIONS, AgentClient

log = logging.getLogger(__name__)

T = TypeVar("T")
Progress = Callable[[str, str, str], None]  # (pod, state, detail)

REQUEST_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds per API request
# Requests in flight at once (the thread pool and the client's connection pool: a smaller
# pool than threads closes a TLS connection after each surplus request and opens a new one).
MAX_PARALLEL = 16
FRESH_S = 10.0  # how long discovery's list stands in for reading each pod
NODE_UNREACHABLE = "the API server cannot reach the pod's node (its kubelet)"
# How the API server words a proxied request (logs, port-forward) its node's kubelet did not answer.
_KUBELET_UNREACHABLE = re.compile(
    r"error dialing backend|TLS handshake timeout|/containerLogs/|/portForward/|dial tcp"
)
THROTTLE_RETRIES = 5
# The API server answers a port-forward upgrade only once the node's kubelet has: a node that
# does not answer would block the websocket handshake for good (no timeout in the client).
PORTFORWARD_CONNECT_TIMEOUT = 15.0  # 429s retried (after Retry-After) before the request fails
# An agent that does not listen yet is retried soon (initial/max backoff), but each attempt
# keeps gRPC's 20 s minimum connect timeout: ``grpc.min_reconnect_backoff_ms`` *is* that
# timeout (subchannel.cc), and at 100 ms an attempt through a loaded port-forward (TLS to
# the API server, its upgrade to the kubelet, then mTLS to the agent) was torn down and
# redone in a loop: 100 port-forwards per pod for 48 pods on a busy machine.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
IN_CLUSTER_NS = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass
class KubeOptions:
    """What the cluster flags of the CLI say (``-n``, ``--context``, ``--image``, ...)."""

    namespace: str | None = None
    context: str | None = None
    kubeconfig: str | None = None
    trench: str | None = None
    selector: str | None = None
    names: Sequence[str] = ()
    image: str = spec.DEFAULT_IMAGE
    profile: str = "netadmin"
    direct: bool = False
    tls_dir: str | None = None
    start_timeout: float = 60.0
    idle_timeout: float = 900.0
    annotate: bool = True


@dataclass(frozen=True)
class AgentHandle:
    """A running agent: its pod, container name, port, and whether this run injected it."""

    pod: str
    name: str
    port: int
    injected: bool
    pod_ip: str | None = None
    uid: str = ""  # the pod's: with the name, what the agent's certificate is pinned under


@dataclass
class _Cluster:
    """The loaded client configuration."""

    api: Any  # kubernetes.client.ApiClient, its requests throttled
    conf: Any  # its Configuration (the port-forwards' URL, credentials and TLS settings)
    namespace: str
    host: str
    throttle: Throttle


def load_cluster(opts: KubeOptions) -> _Cluster:
    """Client configuration from the kubeconfig (or in-cluster); UsageError saying what is missing."""
    namespace = opts.namespace
    try:
        # KUBECONFIG=a:b is merged as kubectl does (first file wins per name and for
        # current-context): the client's loader merges a path list given as one string.
        kubeconfig = opts.kubeconfig or os.pathsep.join(
            p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p
        )
        default_file = Path.home() / ".kube" / "config"
        if (
            not kubeconfig
            and not default_file.exists()
            and os.environ.get("KUBERNETES_SERVICE_HOST")
        ):
            conf = k8s_client.Configuration()
            k8s_config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call]
            if namespace is None and IN_CLUSTER_NS.exists():
                namespace = IN_CLUSTER_NS.read_text().strip()
        else:
            path = kubeconfig or str(default_file)
            conf = k8s_client.Configuration()
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=path, context=opts.context, client_configuration=conf
            )
            if namespace is None:
                _all, active = k8s_config.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
                if opts.context:
                    active = next((c for c in _all if c.get("name") == opts.context), active)
                namespace = (active or {}).get("context", {}).get("namespace")
    except (ConfigException, OSError, ValueError, TypeError) as exc:
        raise UsageError(
            f"cannot load the Kubernetes configuration: {exc} "
            "(--kubeconfig FILE, --context NAME, or run inside a cluster)"
        ) from exc
    # One retry of a failed connection; a 429 (API Priority and Fairness, max-inflight) is
    # retried after its Retry-After, as client-go does: the server did not process it.
    conf.connection_pool_maxsize = MAX_PARALLEL
    _quiet_full_pool()
    conf.retries = urllib3.Retry(
        total=THROTTLE_RETRIES,
        connect=1,
        read=0,
        status=THROTTLE_RETRIES,
        status_forcelist=(429,),
        allowed_methods=None,
        respect_retry_after_header=True,
        backoff_factor=0.2,
        raise_on_status=False,
    )
    api: Any = k8s_client.ApiClient(conf)
    throttle = Throttle()
    request = api.rest_client.request

    def throttled(*args: Any, **kwargs: Any) -> Any:  # every request of the client, once
        throttle.wait()
        return request(*args, **kwargs)

    api.rest_client.request = throttled
    return _Cluster(
        api=api, conf=conf, namespace=namespace or "default", host=str(conf.host), throttle=throttle
    )


class _Api:
    """The few requests the runtime makes, raw JSON through the configured ApiClient.

    Why not ``kubernetes.client.CoreV1Api``: importing it builds some 250
    pydantic validators, 0.4 s of CPU at the start of every command, before any
    pod is looked at; and we only ever asked it for raw responses. The ApiClient
    still does what matters: authentication (tokens refreshed by exec plugins),
    TLS, proxies, the connection pool, the 429 retries and our throttle.
    """

    def __init__(self, api: Any) -> None:
        self._api = api

    def request(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str | None = None,
        timeout: Any = REQUEST_TIMEOUT,
        accept: str = "application/json",
    ) -> Any:
        """The urllib3 response of ``method path?query`` (not read yet); ApiException if not 2xx."""
        headers = {"Accept": accept}
        if content_type:
            headers["Content-Type"] = content_type
        params = [
            (k, str(v).lower() if isinstance(v, bool) else v)
            for k, v in (query or {}).items()
            if v is not None
        ]
        request = self._api.param_serialize(
            method,
            path,
            query_params=params,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self._api.call_api(*request, _request_timeout=timeout)
        if not 200 <= resp.status <= 299:
            resp.read()
            raise ApiException.from_response(http_resp=resp, body=None, data=None)
        return resp.response

    def pods(self, namespace: str | None) -> str:
        return f"/api/v1/namespaces/{namespace}/pods" if namespace else "/api/v1/pods"


class _NotFullPool(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Connection pool is full")


def _quiet_full_pool() -> None:
    """No "Connection pool is full" warning on stderr: the surplus connections are meant.

    The pool keeps MAX_PARALLEL connections for the requests of the thread pool;
    each pod's streams (the watch for a new agent, its log followed for the
    certificate) also borrow one and hand it back closed, and urllib3 warns once
    for every one it cannot keep: 96 lines for 48 new agents.
    """
    pool_log = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _NotFullPool) for f in pool_log.filters):
        pool_log.addFilter(_NotFullPool())


class KubernetesRuntime:
    """Finds a trench's Meridio pods, injects or reuses agents, and connects to them."""

    def __init__(
        self,
        opts: KubeOptions,
        progress: Progress | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        if opts.profile not in spec.PROFILES:
            raise UsageError(f"--profile must be one of {', '.join(spec.PROFILES)}")
        if tls is None:  # every agent requires mutual TLS, port-forwarded or direct
            tls = load_or_create(Path(opts.tls_dir) if opts.tls_dir else DEFAULT_TLS_DIR)
        self.opts = opts
        self._cluster = load_cluster(opts)
        self.namespace = self._cluster.namespace
        self._core = _Api(self._cluster.api)
        self._progress = progress
        self._tls: ClientTls = tls
        self.transport = "direct" if opts.direct else "port-forward"
        self.key = spec.agent_key(
            opts.image,
            opts.profile,
            self.transport,
            tls.ca_fingerprint,
        )
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=MAX_PARALLEL, thread_name_prefix="meridio-debug-k8s"
        )
        self._pods: list[spec.MeridioPod] | None = None
        self._listed: list[dict[str, Any]] | None = None  # discovery's list (no --selector)
        # Each pod as discovery listed it, used once by the first ensure_agent instead of a
        # GET per pod (a retry reads the pod again), while the list is FRESH_S old at most.
        self._fresh: dict[str, dict[str, Any]] = {}
        self._listed_at = 0.0
        self._watch_refused = False  # a 403 on a pod watch: wait for agents by polling
        self._throttle = self._cluster.throttle
        self._pf_ssl: ssl.SSLContext | None = None  # one TLS context for all port-forwards
        self.swept = False  # relay directories of killed runs: looked for once per run
        # the kubeconfig's token refresh (an exec credential plugin may run a process): off
        # the event loop, one at a time
        self._refresh_lock = threading.Lock()
        self._pins = Pins()

    # --- plumbing -------------------------------------------------------------------------

    def _report(self, pod: str, state: str, detail: str = "") -> None:
        if self._progress is not None:
            self._progress(pod, state, detail)
        log.debug("%s/%s: %s %s", self.namespace, pod, state, detail)

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _error(
        self,
        exc: Exception,
        what: str,
        pod: str | None = None,
        request: tuple[str, str] | None = None,
    ) -> MeridioDebugError:
        """Our error for a failed API request (see the module docstring).

        ``request`` is the (verb, resource) the request needs, for a 403 whose
        message does not say (a refused port-forward upgrade).
        """
        where = f"{self.namespace}/{pod}" if pod else f"namespace {self.namespace}"
        if not isinstance(exc, ApiException):
            return RuntimeUnavailable(
                f"{where}: cannot reach the API server at {self._cluster.host} ({what}): {exc}"
            )
        status = exc.status or 0
        msg = spec.status_message(exc.body) or str(exc.reason or "")
        if status == 0:
            return RuntimeUnavailable(
                f"{where}: cannot reach the API server at {self._cluster.host} ({what}): {msg}"
            )
        if status == 401:
            return AccessDenied(
                f"{where}: the API server did not accept our credentials ({what}): {msg}; "
                "refresh the kubeconfig (or the service account token)"
            )
        if status == 403:
            if "violates PodSecurity" in msg:
                return InjectionError(
                    f"{where}: Pod Security Admission refuses the agent ({self.opts.profile} "
                    f"profile): {msg}. Admission evaluates the whole pod on every "
                    "ephemeral-container update, and no level but privileged allows "
                    f"{', '.join(spec.NETADMIN_CAPS)} or privileged containers: ask an admin to "
                    "label the namespace pod-security.kubernetes.io/enforce=privileged or to "
                    "exempt meridio-debug's user in the PodSecurity admission configuration"
                )
            denial = spec.rbac_denial(msg, request)
            if denial:
                verb, resource = denial
                return AccessDenied(
                    f"{where}: RBAC: not allowed to {verb} {resource} in namespace "
                    f"{self.namespace} ({what}); grant verb {verb!r} on {resource!r} "
                    "(deploy/rbac.yaml, README section RBAC)"
                )
            return AccessDenied(f"{where}: forbidden ({what}): {msg}")
        if status == 404:
            return PodNotFound(
                f"{where}: pod not found while {what} (deleted or replaced meanwhile?)"
            )
        if status == 422:
            return InjectionError(
                f"{where}: the API server rejected the agent container ({what}): {msg}"
            )
        if status in (500, 502, 503) and _KUBELET_UNREACHABLE.search(msg):
            return RuntimeUnavailable(
                f"{where}: {NODE_UNREACHABLE} ({what}): {msg}; check the node "
                "(kubectl get node) or try the other pods"
            )
        if status == 429:
            return RuntimeUnavailable(
                f"{where}: the API server is throttling us ({what}), still after "
                f"{THROTTLE_RETRIES} retries: {msg}; try again later"
            )
        return RuntimeUnavailable(f"{where}: {what} failed: HTTP {status}: {msg}")

    def _json(self, resp: Any) -> Any:
        return json.loads(resp.data)

    def _get_pod_sync(self, name: str) -> dict[str, Any]:
        try:
            resp = self._core.request("GET", f"{self._core.pods(self.namespace)}/{name}")
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(exc, "reading the pod", name) from exc
        pod: dict[str, Any] = self._json(resp)
        return pod

    async def get_pod(self, name: str) -> dict[str, Any]:
        return await self._call(lambda: self._get_pod_sync(name))

    def list_raw(self) -> list[dict[str, Any]]:
        """Every pod of the namespace matching ``--selector``, as JSON."""
        try:
            resp = self._core.request(
                "GET",
                self._core.pods(self.namespace),
                {"labelSelector": self.opts.selector or None},
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(exc, "listing pods") from exc
        items: list[dict[str, Any]] = self._json(resp).get("items", [])
        return items

    # --- pod health and logs (analysis/health.py) -------------------------------------------

    def _problem(
        self, exc: Exception, what: str, verb: str, resource: str, optional: bool = True
    ) -> Any:
        """A 403 as a ReadProblem (the finding MDB542 says which verb is missing); else raise."""
        if isinstance(exc, ApiException) and exc.status == 403:
            msg = spec.status_message(exc.body) or str(exc.reason or "")
            denial = spec.rbac_denial(msg)
            if denial:
                verb, resource = denial
            return ReadProblem(what=what, verb=verb, resource=resource, message=msg)
        error = self._error(exc, f"reading {what}")
        if optional:  # partial failure is data: the finding says what is missing
            return ReadProblem(what=what, verb=verb, resource=resource, message=str(error))
        raise error

    def _list_sync(self, what: str, all_namespaces: bool, selector: str | None) -> Any:
        try:
            resp = self._core.request(
                "GET",
                self._core.pods(None if all_namespaces else self.namespace),
                {"labelSelector": selector},
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            return self._problem(exc, what, "list", "pods", optional=all_namespaces)
        items: list[dict[str, Any]] = self._json(resp).get("items", [])
        return items

    def _log_sync(
        self, pod: str, container: str, previous: bool, lines: int, max_bytes: int
    ) -> Any:
        try:
            resp = self._core.request(
                "GET",
                f"{self._core.pods(self.namespace)}/{pod}/log",
                {
                    "container": container,
                    "previous": previous,
                    "tailLines": lines,
                    "limitBytes": max_bytes,
                },
                accept="*/*",
            )
            text = resp.data.decode(errors="replace")
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            if isinstance(exc, ApiException) and exc.status in (400, 404):
                return ""  # no previous instance, or the container never started
            return self._problem(exc, f"logs of {self.namespace}/{pod}", "get", "pods/log")
        return str(text or "")

    def _with_logs(
        self, health: Any, log_lines: int, log_bytes: int, denied: threading.Event
    ) -> tuple[Any, ReadProblem | None]:
        """``health`` with its containers' log tails, or as it is once logs are refused."""
        containers: list[ContainerHealth] = []
        for c in health.containers:
            tails: list[tuple[str, ...]] = []
            for previous in (False, True)[: 2 if c.restart_count else 1]:
                if denied.is_set():
                    return health, None
                text = self._log_sync(health.name, c.name, previous, log_lines, log_bytes)
                if isinstance(text, ReadProblem):
                    denied.set()  # the other pods' reads stop too: one finding names the verb
                    return health, text
                tails.append(k8s_health.bounded_lines(text, log_lines, log_bytes))
            tails += [(), ()]
            containers.append(replace(c, log=tails[0], previous_log=tails[1]))
        return replace(health, containers=tuple(containers)), None

    def read_health(
        self, log_lines: int = 100, log_bytes: int = 32 * 1024, since_unix: float = 0.0
    ) -> Any:
        """The trench's pods as Kubernetes sees them (KubeState), logs tails included.

        Meridio pods and the trench's NSP/IPAM/NSE from the namespace (discovery's list
        when it read the whole namespace); NSM and Spire pods cluster-wide when RBAC allows
        (else a ReadProblem naming the verb). The log tails (one request per container, the
        bulk of it) are read concurrently, at most MAX_PARALLEL requests at once.
        """
        started = time.monotonic()
        meridio = self.meridio_pods()
        roles = {p.name: p.role for p in meridio}
        trench = self.opts.trench or next((p.trench for p in meridio if p.trench), "") or ""
        problems: list[ReadProblem] = []
        listed: list[tuple[Any, Any]] = []
        timings: dict[str, float] = {}
        cluster_wide = {
            what: self._executor.submit(self._list_sync, what, True, selector)
            for what, selector in (
                ("NSM pods in all namespaces", k8s_health.NSM_SELECTOR),
                ("Spire pods in all namespaces", k8s_health.SPIRE_SELECTOR),
            )
        }
        items = self._listed
        if items is None:
            items = self._list_sync(f"pods of namespace {self.namespace}", False, None)
        if isinstance(items, ReadProblem):
            problems.append(items)
            items = []
        for raw in items:  # discovery leaves deleting pods out; their health still counts
            name = str((raw.get("metadata") or {}).get("name", ""))
            role = spec.classify(raw)
            mine = not trench or (role and spec.trench_of(raw, role) in (None, trench))
            if name not in roles and role and mine and not self.opts.names:
                roles[name] = role
        listed += k8s_health.select(items, roles, trench)
        t_ns = time.monotonic() - started
        for what, future in cluster_wide.items():
            found = future.result()
            if isinstance(found, ReadProblem):
                problems.append(found)
                continue
            listed += [
                (p, k) for p, k in k8s_health.select(found, {}, trench) if k in ("nsm", "spire")
            ]
            timings[k8s_health.GROUPS["nsm" if "NSM" in what else "spire"]] = (
                time.monotonic() - started
            )
        denied = threading.Event()
        t0 = time.monotonic()

        def one(obj: Any, kind: PodKind) -> tuple[Any, ReadProblem | None, float]:
            health = k8s_health.pod_health(obj, kind)
            problem = None
            if kind not in ("nsm", "spire") and log_lines > 0:
                health, problem = self._with_logs(health, log_lines, log_bytes, denied)
            return health, problem, time.monotonic() - t0

        pods = []
        futures = [(kind, self._executor.submit(one, obj, kind)) for obj, kind in listed]
        for kind, future in futures:
            health, problem, done = future.result()
            if problem is not None and not any(p.resource == problem.resource for p in problems):
                problems.append(problem)
            pods.append(health)
            group = k8s_health.GROUPS.get(kind, "other pods")
            timings[group] = max(timings.get(group, 0.0), t_ns + done)
        return KubeState(
            read_unix=time.time(),
            since_unix=since_unix,
            pods=tuple(pods),
            problems=tuple(problems),
            trench=trench,
            timings=tuple(sorted(timings.items())),
        )

    # --- the trench's configuration (analysis/config.py) -------------------------------------

    _MERIDIO_PLURALS = (
        ("Trench", "trenches"),
        ("Conduit", "conduits"),
        ("Stream", "streams"),
        ("Flow", "flows"),
        ("Vip", "vips"),
        ("Attractor", "attractors"),
        ("Gateway", "gateways"),
    )

    def read_config(self, trench: str) -> tuple[Any, str]:
        """The trench's Meridio configuration and where it came from, or (None, why not).

        The CRs (group meridio.nordix.org/v1) first; without them (CRDs not installed: the
        Helm deployment, or no right to list them) the operator's ConfigMap
        ``meridio-configuration-<trench>``. Never raises for a missing or forbidden source:
        the configuration checks then simply do not run, and the reason is returned.
        """
        docs: list[dict[str, Any]] = []
        why = ""
        try:
            for kind, plural in self._MERIDIO_PLURALS:
                resp = self._core.request(
                    "GET", f"/apis/meridio.nordix.org/v1/namespaces/{self.namespace}/{plural}"
                )
                for item in self._json(resp).get("items", []):
                    docs.append({**item, "kind": kind})
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            why = f"Meridio CRs: {self._error(exc, 'listing Meridio CRs')}"
            docs = []
        try:
            if docs:
                return config_from_crs(
                    docs, trench, source=f"CRs in namespace {self.namespace}"
                ), ""
            name = f"meridio-configuration-{trench}"
            try:
                resp = self._core.request(
                    "GET", f"/api/v1/namespaces/{self.namespace}/configmaps/{name}"
                )
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
                return None, f"{why}; ConfigMap {name}: {self._error(exc, 'reading it')}".strip(
                    "; "
                )
            data = self._json(resp).get("data") or {}
            return config_from_configmap(
                {str(k): str(v) for k, v in data.items()},
                source=f"ConfigMap {self.namespace}/{name}",
            ), ""
        except ConfigError as exc:
            return None, str(exc)

    # --- discovery --------------------------------------------------------------------------

    def meridio_pods(self) -> list[spec.MeridioPod]:
        """The trench's Meridio pods (LB/FE, proxies, targets), once per runtime."""
        if self._pods is None:
            raw = self.list_raw()
            if not self.opts.selector:
                self._listed = raw  # every pod of the namespace: read_health's list too
            found = spec.discover(raw, self.opts.trench, self.opts.names)
            names = {p.name for p in found}
            self._fresh = {
                str(r["metadata"]["name"]): r for r in raw if r["metadata"]["name"] in names
            }
            self._listed_at = time.monotonic()
            if self.opts.names:
                missing = sorted(set(self.opts.names) - {p.name for p in found})
                if missing:
                    raise UsageError(
                        f"namespace {self.namespace}: no Meridio pod named {', '.join(missing)}"
                        + (f" in trench {self.opts.trench}" if self.opts.trench else "")
                        + " (meridio-debug agents -n NS lists them)"
                    )
            self._pods = found
        return list(self._pods)

    def pods(self) -> list[PodRef]:
        return [
            PodRef(
                name=p.name, role=p.role, location=f"{p.namespace}/{p.name}", runtime="kubernetes"
            )
            for p in self.meridio_pods()
        ]

    def agents(self) -> list[tuple[spec.MeridioPod, list[spec.AgentState], dict[str, Any]]]:
        """Every Meridio pod with its meridio-debug agents and annotation records."""
        raw = {p["metadata"]["name"]: p for p in self.list_raw()}
        out = []
        for mp in self.meridio_pods():
            pod = raw.get(mp.name, {})
            out.append((mp, spec.agents_of(pod), spec.annotation_records(pod)))
        return out

    # --- injection ----------------------------------------------------------------------------

    def _patch_ephemeral_sync(self, pod: str, container: Mapping[str, Any]) -> dict[str, Any]:
        body = {"spec": {"ephemeralContainers": [dict(container)]}}
        try:
            resp = self._core.request(
                "PATCH",
                f"{self._core.pods(self.namespace)}/{pod}/ephemeralcontainers",
                body=body,
                content_type="application/strategic-merge-patch+json",
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(
                exc, f"adding ephemeral container {container.get('name')}", pod
            ) from exc
        patched: dict[str, Any] = self._json(resp)
        return patched

    async def patch_ephemeral(self, pod: str, container: Mapping[str, Any]) -> dict[str, Any]:
        """Add one ephemeral container (strategic merge by name; the API appends or refuses).

        Returns the pod as the API server stored it (the wait starts from it).
        """
        return await self._call(lambda: self._patch_ephemeral_sync(pod, container))

    def _annotate_sync(self, pod: dict[str, Any], record: Mapping[str, Any]) -> None:
        name = pod["metadata"]["name"]
        try:
            self._core.request(
                "PATCH",
                f"{self._core.pods(self.namespace)}/{name}",
                body=spec.annotation_patch(pod, record),
                content_type="application/merge-patch+json",
            ).drain_conn()
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            err = self._error(exc, f"annotating the pod with {spec.ANNOTATION}", name)
            # Best effort: the agent runs; only the record for humans is missing.
            log.warning("%s (the agent was injected; the annotation is informational)", err)
            self._report(name, "warning", str(err))

    def _container_for(self, name: str, target: str | None) -> dict[str, Any]:
        return spec.agent_container(
            name,
            image=self.opts.image,
            profile=self.opts.profile,
            target=target,
            idle_timeout=self.opts.idle_timeout,
            direct=self.opts.direct,
            client_ca_pem=self._tls.ca_pem.decode(),
        )

    async def ensure_agent(self, name: str, avoid: str | None = None) -> AgentHandle:
        """A running agent in pod ``name``: reused, or injected and waited for.

        ``avoid`` is an agent that just proved unusable (e.g. it exited at its
        idle timeout while we connected): never reuse it, inject a new one.
        """
        pod = self._fresh.pop(name, None) if avoid is None else None
        if pod is None or time.monotonic() - self._listed_at > FRESH_S:
            pod = await self.get_pod(name)
        phase = pod.get("status", {}).get("phase")
        if pod.get("metadata", {}).get("deletionTimestamp"):
            raise RuntimeUnavailable(
                f"{self.namespace}/{name}: pod is terminating (deleted at "
                f"{pod['metadata']['deletionTimestamp']}): an agent added now would never start"
            )
        if phase != "Running":
            raise RuntimeUnavailable(
                f"{self.namespace}/{name}: pod is {phase}: agents run only in running pods"
            )
        mp = spec.meridio_pod(pod)
        target = mp.target_container if mp else None
        plan = spec.plan(pod, self.key)
        if not plan.inject and plan.name == avoid:
            plan = spec.Plan(spec.next_name(pod, self.key), True, None)
        if plan.inject:
            count = len(spec.agents_of(pod))
            if count >= spec.MAX_AGENTS_PER_POD:
                raise InjectionError(
                    f"{self.namespace}/{name}: the pod already has {count} meridio-debug "
                    "agents (ephemeral containers cannot be removed); not adding more: "
                    "restart the pod to clear them, or reuse one with the same --image/--profile"
                )
            container = self._container_for(plan.name, target)
            self._report(name, "injecting", f"{plan.name} ({self.opts.image})")
            patched = await self.patch_ephemeral(name, container)
            annotating = None
            if self.opts.annotate:
                record = {
                    "name": plan.name,
                    "image": self.opts.image,
                    "profile": self.opts.profile,
                    "transport": self.transport,
                    "injectedAt": datetime.datetime.now(datetime.UTC).strftime(
                        "%Y-%m-%dT%H:%M:%SZ"
                    ),
                }
                # while the kubelet starts the agent: the record is for humans
                annotating = asyncio.ensure_future(
                    self._call(lambda: self._annotate_sync(pod, record))
                )
            try:
                running = await self._wait_running(name, plan.name, patched)
            finally:
                if annotating is not None:
                    await annotating
        else:
            self._report(name, "reusing", plan.name)
            running = await self._wait_running(name, plan.name, pod)
        port = spec.port_of(running) or spec.agent_port(plan.name)
        return AgentHandle(
            name,
            plan.name,
            port,
            plan.inject,
            pod.get("status", {}).get("podIP"),
            str(pod.get("metadata", {}).get("uid", "")),
        )

    async def _wait_running(self, pod: str, agent: str, raw: dict[str, Any]) -> dict[str, Any]:
        """Wait until the agent container runs; InjectionError when it never will.

        Watches the pod as kubectl does, from ``raw`` (the pod as discovery listed
        it or as the PATCH returned it: no GET of its own) and its resourceVersion,
        bounded by what is left of ``--start-timeout``; a watch that is refused (a
        Role without ``watch pods``) or fails falls back to polling, silently: the
        wait is the same, only slower to notice.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.start_timeout
        last = [""]
        watching = not self._watch_refused
        delay = 0.05
        while True:
            found = self._agent_running(pod, agent, raw, last)
            if found is not None:
                return found
            if loop.time() > deadline:
                raise InjectionError(self._start_timeout(pod, agent, raw))
            if watching:
                try:
                    seen = await self._watch_pod(pod, agent, raw, last, deadline)
                except _WatchFailed as exc:
                    log.debug("%s/%s: watch failed, polling instead: %s", self.namespace, pod, exc)
                    watching = False
                else:
                    if seen is not None:
                        raw = seen
                        continue
                    # deleted, expired resourceVersion or the stream ended: read the pod again
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            raw = await self.get_pod(pod)

    def _agent_running(
        self, pod: str, agent: str, raw: dict[str, Any], last: list[str]
    ) -> dict[str, Any] | None:
        """The agent's container spec once it runs; None while it starts (progress reported)."""
        st = {a.name: a for a in spec.agents_of(raw)}.get(agent)
        if st is None:
            raise InjectionError(
                f"{self.namespace}/{pod}: agent {agent} is not in the pod spec after the "
                "PATCH (an admission webhook may have removed it)"
            )
        if st.state == "running":
            self._report(pod, "running", agent)
            containers = raw.get("spec", {}).get("ephemeralContainers") or []
            found: dict[str, Any] = next(c for c in containers if c.get("name") == agent)
            return found
        if st.state in ("terminated", "zombie"):
            raise InjectionError(self._never_runs(pod, st))
        if st.reason != last[0]:
            self._report(pod, "starting", f"{agent}: {st.reason}")
            last[0] = st.reason
        return None

    def _start_timeout(self, pod: str, agent: str, raw: dict[str, Any]) -> str:
        st = {a.name: a for a in spec.agents_of(raw)}[agent]
        if st.reason.split(":", 1)[0] in spec.PULL_WAITING:
            return (
                f"{self.namespace}/{pod}: agent {agent} did not start within "
                f"{self.opts.start_timeout:g} s: the image cannot be pulled yet "
                f"({st.reason}); check --image {st.image!r} and the pod's "
                "imagePullSecrets (ephemeral containers use the pod's); the kubelet "
                "keeps retrying, and the next run reuses this agent once it starts"
            )
        return (
            f"{self.namespace}/{pod}: agent {agent} did not start within "
            f"{self.opts.start_timeout:g} s (last state: {st.reason}); "
            "--start-timeout waits longer (a first image pull can be slow)"
        )

    async def _watch_pod(
        self, pod: str, agent: str, raw: dict[str, Any], last: list[str], deadline: float
    ) -> dict[str, Any] | None:
        """Follow the pod's changes from ``raw`` until the agent runs, stops or time is up.

        Returns the pod as last seen when the deadline passes, None when the
        stream ends early (the caller reads the pod again). The reading thread is
        the watch's own (never one of ``_call``'s), and the response is shut down
        from here when done, so that thread ends at once and never holds up exit.
        """
        loop = asyncio.get_running_loop()
        left = deadline - loop.time()
        watch = _Stream(
            loop,
            lambda: self._core.request(
                "GET",
                self._core.pods(self.namespace),
                {
                    "fieldSelector": f"metadata.name={pod}",
                    "watch": True,
                    "resourceVersion": raw.get("metadata", {}).get("resourceVersion"),
                    "allowWatchBookmarks": False,
                    "timeoutSeconds": max(1, int(left + 0.999)),
                },
                timeout=(REQUEST_TIMEOUT[0], left + REQUEST_TIMEOUT[1]),
            ),
        )
        try:
            seen = raw
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    return seen
                try:
                    event = await asyncio.wait_for(watch.events.get(), left)
                except TimeoutError:
                    return seen
                if isinstance(event, BaseException):
                    if isinstance(event, ApiException) and event.status == 403:
                        self._watch_refused = True  # the Role lacks watch: every pod polls
                    raise _WatchFailed(str(event)) from event
                if event is None:
                    return None
                kind = event.get("type")
                obj = event.get("object")
                if kind in ("ADDED", "MODIFIED") and isinstance(obj, dict):
                    seen = obj
                    if self._agent_running(pod, agent, seen, last) is not None:
                        return seen
                elif kind == "ERROR":
                    if isinstance(obj, dict) and obj.get("code") == 410:
                        return None  # resourceVersion too old: read again, watch again
                    raise _WatchFailed(spec.status_message(json.dumps(obj)) or str(obj))
                elif kind == "DELETED":
                    return None  # the GET says the pod is gone, as when polling
        finally:
            watch.close()

    def _never_runs(self, pod: str, st: spec.AgentState) -> str:
        head = f"{self.namespace}/{pod}: agent {st.name}"
        reason = st.reason.split(":", 1)[0]
        if reason in ("ErrImageNeverPull", "InvalidImageName"):
            return (
                f"{head}: {spec.FATAL_WAITING[reason]} ({st.reason}); check --image {st.image!r} "
                "and the pod's imagePullSecrets (ephemeral containers use the pod's)"
            )
        return f"{head} stopped and cannot be restarted ({st.reason})"

    async def inject(self, name: str) -> AgentHandle:
        """``ensure_agent`` with progress, for the ``inject`` command."""
        self._report(name, "checking", "")
        try:
            handle = await self.ensure_agent(name)
        except MeridioDebugError as exc:
            self._report(name, "failed", str(exc))
            raise
        self._report(name, "ready", handle.name)
        return handle

    # --- connecting ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def open(self, pod: PodRef) -> AsyncIterator[AgentClient]:
        self._report(pod.name, "checking", "")
        try:
            handle = await self.ensure_agent(pod.name)
            try:
                async with self._connect(handle) as agent:
                    self._report(pod.name, "connected", handle.name)
                    yield agent
                    return
            except AgentCallError:
                if handle.injected:
                    raise
                # A reused agent may have reached its idle timeout just now.
                raw = await self.get_pod(pod.name)
                st = {a.name: a for a in spec.agents_of(raw)}.get(handle.name)
                if st is None or st.state == "running":
                    raise
                self._report(pod.name, "replacing", f"{handle.name} {st.state}")
            handle = await self.ensure_agent(pod.name, avoid=handle.name)
            async with self._connect(handle) as agent:
                self._report(pod.name, "connected", handle.name)
                yield agent
        except MeridioDebugError as exc:
            self._report(pod.name, "failed", str(exc))
            raise
        finally:
            self._report(pod.name, "done", "")

    @contextlib.asynccontextmanager
    async def _connect(self, handle: AgentHandle) -> AsyncIterator[AgentClient]:
        if self.opts.direct:
            async with self._connect_direct(handle) as agent:
                yield agent
        else:
            async with self._connect_forwarded(handle) as agent:
                yield agent

    async def _ready(
        self,
        agent: AgentClient,
        handle: AgentHandle,
        fatal: Callable[[], MeridioDebugError | None] = lambda: None,
        pinned: bytes | None = None,
    ) -> None:
        """Wait until the agent answers GetInfo (a running container may not listen yet).

        ``fatal`` reports an error that retrying cannot fix (port-forward refused
        by RBAC, pod gone): it ends the wait at once. ``pinned``: the certificate
        in use came from the pins, not the log; at the first failure the log is
        read, and a different certificate there ends the wait (_StalePin).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.start_timeout
        while True:
            try:
                await agent.get_info(timeout=1.0, wait_for_ready=True)
                return
            except AgentCallError as exc:
                if (err := fatal()) is not None:
                    raise err from exc
                if pinned is not None:
                    logged = await self._agent_certificate(handle)
                    if logged != pinned:
                        self._pins.put(handle.uid, handle.name, logged)
                        raise _StalePin(logged) from exc
                    pinned = None
                if loop.time() > deadline:
                    raise AgentCallError(
                        f"{self.namespace}/{handle.pod}: agent {handle.name} runs but does not "
                        f"answer within {self.opts.start_timeout:g} s: {exc}"
                    ) from exc
                raw = await self.get_pod(handle.pod)
                st = {a.name: a for a in spec.agents_of(raw)}.get(handle.name)
                if st is not None and st.state != "running":
                    raise AgentCallError(
                        f"{self.namespace}/{handle.pod}: agent {handle.name} {st.state} "
                        f"({st.reason})"
                    ) from exc

    async def _server_certificate(self, handle: AgentHandle) -> tuple[bytes, bool]:
        """The agent's certificate to pin, and whether it came from the pins (not its log)."""
        if not handle.injected:
            pem = self._pins.get(handle.uid, handle.name)
            if pem is not None:
                return pem, True
        pem = await self._agent_certificate(handle)
        self._pins.put(handle.uid, handle.name, pem)
        return pem, False

    @contextlib.asynccontextmanager
    async def _connect_forwarded(self, handle: AgentHandle) -> AsyncIterator[AgentClient]:
        async with self._connect_pinned(handle, lambda: self._relay_route(handle)) as agent:
            yield agent

    @contextlib.asynccontextmanager
    async def _relay_route(self, handle: AgentHandle) -> AsyncIterator[_Route]:
        relay = PortForwardRelay(self, handle.pod, handle.port)
        await relay.start()
        try:
            yield _Route(f"unix:{relay.path}", relay.failure, lambda: relay.last_error)
        finally:
            await relay.close()

    @contextlib.asynccontextmanager
    async def _connect_pinned(
        self, handle: AgentHandle, route: Callable[[], AbstractAsyncContextManager[_Route]]
    ) -> AsyncIterator[AgentClient]:
        """A ready agent over mutual TLS, its certificate pinned; the one loop of both
        transports: a stale pin (a certificate the agent no longer has) is read again from
        the agent's log and the connection made again, over a fresh ``route``."""
        server_cert, pinned = await self._server_certificate(handle)
        while True:
            async with route() as r:
                channel = grpc.aio.secure_channel(
                    r.target,
                    self._channel_credentials(server_cert),
                    options=[
                        *CHANNEL_OPTIONS,
                        *FAST_RECONNECT,
                        ("grpc.ssl_target_name_override", AGENT_TLS_NAME),
                    ],
                )
                try:
                    agent = AgentClient(channel, f"{self.namespace}/{handle.pod}")
                    try:
                        await self._ready(agent, handle, r.fatal, server_cert if pinned else None)
                    except _StalePin as stale:
                        server_cert, pinned = stale.certificate, False
                        continue
                    except AgentCallError as exc:
                        if detail := r.last_error():
                            raise AgentCallError(f"{exc} (port-forward: {detail})") from exc
                        raise
                    yield agent
                    return
                finally:
                    await channel.close(grace=None)

    def _portforward_ssl(self) -> ssl.SSLContext | None:
        """One TLS context for every port-forward of this run, as the API client's settings say."""
        conf = self._cluster.conf
        if not str(conf.host).startswith("https"):
            return None
        if conf.verify_ssl:
            ctx = ssl.create_default_context(cafile=conf.ssl_ca_cert or certifi.where())
            if conf.assert_hostname is not None:
                ctx.check_hostname = bool(conf.assert_hostname)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if conf.cert_file:
            ctx.load_cert_chain(conf.cert_file, conf.key_file)
        return ctx

    def _refresh_token(self, conf: Any) -> None:
        with self._refresh_lock:
            conf.refresh_api_key_hook(conf)

    async def _upgrade(self, pod: str, port: int) -> PortForward:
        """The websocket upgrade of ``pods/{pod}/portforward``, its 429s retried after Retry-After."""
        conf = self._cluster.conf
        if self._pf_ssl is None and str(conf.host).startswith("https"):
            self._pf_ssl = self._portforward_ssl()
        url = f"{conf.host}/api/v1/namespaces/{self.namespace}/pods/{pod}/portforward?ports={port}"
        # the proxy the client's REST calls use, by the same no_proxy rules
        bypass = k8s_rest.should_bypass_proxies(str(conf.host), str(conf.no_proxy or ""))
        proxy = None if bypass else conf.proxy or None
        for attempt in range(THROTTLE_RETRIES + 1):
            if conf.refresh_api_key_hook is not None:
                await asyncio.to_thread(self._refresh_token, conf)
            token = conf.auth_settings().get("BearerToken", {}).get("value")
            await self._throttle.acquire()
            try:
                return await asyncio.wait_for(
                    PortForward.open(
                        url,
                        {"Authorization": token} if token else {},
                        self._pf_ssl,
                        conf.tls_server_name or None,
                        proxy,
                        dict(conf.proxy_headers or {}),
                        conf.proxy_ssl_context,
                    ),
                    PORTFORWARD_CONNECT_TIMEOUT,
                )
            except UpgradeRefused as exc:
                if exc.status != 429 or attempt == THROTTLE_RETRIES:
                    raise
                await asyncio.sleep(min(exc.retry_after or 0.2 * 2**attempt, 10.0))
        raise AssertionError("unreachable")

    async def open_portforward(self, pod: str, port: int) -> PortForward:
        """A port-forward stream to ``port`` of ``pod``; our error saying why not."""
        what = f"port-forward to port {port}"
        request = ("create", "pods/portforward")
        try:
            return await self._upgrade(pod, port)
        except TimeoutError as exc:
            raise RuntimeUnavailable(
                f"{self.namespace}/{pod}: {NODE_UNREACHABLE} (no answer to the port-forward "
                f"within {PORTFORWARD_CONNECT_TIMEOUT:g} s); check the node (kubectl get "
                "node) or try the other pods"
            ) from exc
        except UpgradeRefused as exc:
            api = ApiException(status=exc.status, reason=exc.reason)
            api.body = exc.body
            raise self._error(api, what, pod, request) from exc
        except (OSError, ProtocolError, ValueError) as exc:
            raise self._error(exc, what, pod, request) from exc

    async def _agent_certificate(self, handle: AgentHandle) -> bytes:
        """The certificate the agent printed when it started, read from its log.

        One request following the log (``kubectl logs -f``) until the certificate is
        there, read by a thread of its own and shut down then; a stream that ends early
        (the container stopped, a proxy cut it) is asked again after a pause. Polling
        every 0.1 s made 48 starting agents cost ~500 log requests a second, taken from
        the very CPUs the agents were starting on.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.start_timeout
        pause = 0.1
        while True:
            stream = _Stream(
                loop,
                lambda: self._core.request(
                    "GET",
                    f"{self._core.pods(self.namespace)}/{handle.pod}/log",
                    {"container": handle.name, "follow": True, "limitBytes": 65536},
                    timeout=(REQUEST_TIMEOUT[0], self.opts.start_timeout),
                    accept="*/*",
                ),
                lines=False,
            )
            seen = b""
            try:
                while True:
                    left = deadline - loop.time()
                    try:
                        chunk = await asyncio.wait_for(stream.events.get(), max(left, 0.001))
                    except TimeoutError:
                        break
                    if isinstance(chunk, BaseException):
                        if isinstance(chunk, ApiException | urllib3.exceptions.HTTPError | OSError):
                            raise self._error(
                                chunk,
                                f"reading agent {handle.name}'s log for its certificate",
                                handle.pod,
                            ) from chunk
                        raise chunk
                    if chunk is None:
                        break  # the stream ended: the container stopped, or was cut
                    seen += chunk
                    cert = agent_certificate(seen)
                    if cert is not None:
                        return cert
            finally:
                stream.close()
            if loop.time() > deadline:
                raise InjectionError(
                    f"{self.namespace}/{handle.pod}: agent {handle.name} printed no certificate "
                    f"within {self.opts.start_timeout:g} s (is it an agent image with mTLS?)"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _channel_credentials(self, server_cert: bytes) -> grpc.ChannelCredentials:
        """Our client certificate, and the agent's own certificate pinned as the only root."""
        return grpc.ssl_channel_credentials(
            root_certificates=server_cert,
            private_key=self._tls.key_pem,
            certificate_chain=self._tls.cert_pem,
        )

    @contextlib.asynccontextmanager
    async def _connect_direct(self, handle: AgentHandle) -> AsyncIterator[AgentClient]:
        if not handle.pod_ip:
            raise RuntimeUnavailable(f"{self.namespace}/{handle.pod}: the pod has no IP yet")
        host = f"[{handle.pod_ip}]" if ":" in handle.pod_ip else handle.pod_ip

        @contextlib.asynccontextmanager
        async def direct() -> AsyncIterator[_Route]:
            yield _Route(f"{host}:{handle.port}")

        async with self._connect_pinned(handle, direct) as agent:
            yield agent


@dataclass(frozen=True)
class _Route:
    """How a connection reaches an agent: the gRPC target, and (through port-forward) the
    error that retrying cannot fix and the last port-forward error, for the message."""

    target: str
    fatal: Callable[[], MeridioDebugError | None] = lambda: None
    last_error: Callable[[], str] = lambda: ""


class PortForwardRelay:
    """A private unix socket whose connections are relayed to an agent through port-forward.

    Like ``kubectl port-forward``: each accepted connection gets its own
    port-forward stream to the pod's port. The socket lives in a 0700
    directory: unlike a TCP port on 127.0.0.1, other local users cannot use it.
    """

    def __init__(self, runtime: KubernetesRuntime, pod: str, port: int) -> None:
        self._runtime = runtime
        self._pod = pod
        self._port = port
        self._dir = tempfile.mkdtemp(prefix="meridio-debug-pf-")
        self.path = os.path.join(self._dir, "agent.sock")
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.last_error = ""
        self.fatal: MeridioDebugError | None = None

    def failure(self) -> MeridioDebugError | None:
        """The error that retrying cannot fix, once a connection met one."""
        return self.fatal

    async def start(self) -> None:
        if not self._runtime.swept:  # relay directories of killed runs (runtime/workdirs.py)
            self._runtime.swept = True
            sweep()
        self._server = await asyncio.start_unix_server(self._accept, path=self.path)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        pf = None
        try:
            try:
                pf = await self._runtime.open_portforward(self._pod, self._port)
            except MeridioDebugError as exc:
                self.last_error = str(exc)
                if isinstance(exc, AccessDenied | PodNotFound) or NODE_UNREACHABLE in str(exc):
                    self.fatal = exc
                return
            await _relay(reader, writer, pf)
            if pf.error:
                self.last_error = pf.error.strip()
        except (OSError, RuntimeError, ValueError, ProtocolError) as exc:
            self.last_error = f"relay: {exc}"
        except asyncio.CancelledError:
            # close() ends the connection; a cancelled accept callback would be logged
            # by asyncio as an error, so the handler ends normally instead.
            pass
        finally:
            writer.close()
            if pf is not None:
                pf.close()
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        shutil.rmtree(self._dir, ignore_errors=True)


class _StalePin(Exception):
    """The pinned certificate is not the one the agent's log shows: connect again with that."""

    def __init__(self, certificate: bytes) -> None:
        super().__init__("pinned agent certificate is stale")
        self.certificate = certificate


class _WatchFailed(Exception):
    """A pod watch that cannot go on (refused, broken): the wait polls instead."""


class _Stream:
    """One streamed response (a watch, a followed log) read by its own daemon thread.

    ``events`` gets each decoded watch event (``lines``) or each chunk of bytes,
    then None at the end of the stream, or the exception that ended it. ``close``
    (event loop side) shuts the response down, which wakes the thread blocked in
    a read, so it ends at once. Its own thread, never one of the runtime's pool:
    a stream may last as long as ``--start-timeout``.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, open_: Callable[[], Any], lines: bool = True
    ) -> None:
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self._loop = loop
        self._open = open_
        self._lines = lines
        self._lock = threading.Lock()
        self._resp: Any = None
        self._closed = False
        name = "meridio-debug-watch" if lines else "meridio-debug-follow"
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)

    def _run(self) -> None:
        try:
            resp = self._open()
            with self._lock:
                self._resp = resp
                closed = self._closed
            if closed:
                _shutdown(resp)
                return
            buf = b""
            for chunk in resp.stream(None, decode_content=False):
                if not self._lines:
                    self._put(bytes(chunk))
                    continue
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._put(json.loads(line))
            self._put(None)
        except Exception as exc:  # handed to the waiter, which falls back to polling
            if not self._closed:
                self._put(exc)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            resp = self._resp
        if resp is not None:
            _shutdown(resp)


def _shutdown(resp: Any) -> None:
    """End a streamed response now, also for a thread blocked reading it."""
    with contextlib.suppress(Exception):
        shutdown = getattr(resp, "shutdown", None)  # urllib3 >= 2.3
        if shutdown is not None:
            shutdown()
        else:
            sock = getattr(getattr(resp, "connection", None), "sock", None)
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        resp.close()  # closes the connection, so the pool never reuses it mid-stream
    with contextlib.suppress(Exception):
        resp.release_conn()


async def _relay(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pf: PortForward
) -> None:
    """Bytes both ways between a local connection and a port-forward stream, until one ends."""

    async def up() -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(256 * 1024):
                await pf.write(data)

    async def down() -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await pf.read():
                writer.write(data)
                await writer.drain()

    tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # a ProtocolError of the stream reaches the caller
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
