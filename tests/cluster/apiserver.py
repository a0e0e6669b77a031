"""A stand-in Kubernetes API server (and kubelet) over real HTTP, for the cluster test tier.

Why not mocks: kopf's kmock lesson (style.md) -- the official client must
talk real HTTP and websockets to something that behaves like the API server,
so the tests exercise its serialisation, content types, error bodies and the
port-forward protocol exactly as a cluster would. This is a test fixture,
not product code: it implements only what meridio-debug uses, the way the
real server does it:

- pods: GET, LIST with label selectors (``=``, ``!=``, ``in``, ``notin``,
  existence), PATCH (merge / strategic merge of metadata), pods/log;
- ``pods/{name}/ephemeralcontainers`` PATCH: strategic merge by name,
  append-only (changing or removing one is 422), a JSON patch appending to a
  missing list fails, fields forbidden for ephemeral containers (ports,
  probes, resources, lifecycle) are 422, Pod Security Admission of the
  namespace (``baseline``/``restricted``) refuses privileged containers and
  added capabilities with the real message (403, "violates PodSecurity");
- RBAC: a set of denied (verb, resource) pairs gives the real 403 message;
  every authorised request is recorded as (verb, resource) so a test can
  compare the verbs the code uses with deploy/rbac.yaml. The port-forward
  websocket upgrade needs ``get`` and, as since Kubernetes 1.35, ``create``;
- port-forward: the ``v4.channel.k8s.io`` framing (a data and an error
  channel per port, each opened by a frame carrying the port, little endian);
  the connection is made *inside the pod's network namespace* (setns in a
  short-lived thread), so the client reaches the agent on 127.0.0.1 there;
- a kubelet: adding an ephemeral container starts the real agent in the
  pod's lab pod as the kubelet would (``python -m meridio_debug.agent.ephemeral``:
  the netns, only the ``targetContainerName`` container's PID namespace, a
  mount namespace of its own) with the container's args and env,
  and reports ``ephemeralContainerStatuses`` (waiting/running/terminated);
  images in ``bad_images`` fail with ErrImagePull then ImagePullBackOff,
  images in ``stuck_images`` stay ContainerCreating. Pod IPs are loopback
  addresses (127.77.x.y) relayed into the pod's namespace, standing in for
  the pod network in ``--direct`` tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ctypes
import datetime
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from meridio_debug.controller.lab.containers import find_container

# Legacy (Helm) container names of the pods made from the lab -> the lab's containers.
LAB_CONTAINER = {"fe": "frontend", "load-balancer": "stateless-lb"}

CLONE_NEWNET = 0x40000000
TOKEN = "stand-in-token"
USER = "system:serviceaccount:red:meridio-debug"
BASELINE_CAPS = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
FORBIDDEN_EPHEMERAL = (
    "ports",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "resources",
    "lifecycle",
)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def connect_in_netns(netns: str, port: int, timeout: float = 2.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:port inside a network namespace (setns in a fresh thread)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            out["sock"] = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        except OSError as exc:
            out["error"] = exc

    t = threading.Thread(target=run, name=f"setns-{netns}")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    sock: socket.socket = out["sock"]
    sock.settimeout(None)
    return sock


def status(
    code: int, reason: str, message: str, details: Mapping[str, Any] | None = None
) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = dict(details)
    return web.json_response(body, status=code)


def match_selector(labels: Mapping[str, str], selector: str) -> bool:
    """Kubernetes label selector semantics (equality, set-based, existence)."""
    if not selector:
        return True
    for raw in re.findall(r"[^,(]+(?:\([^)]*\))?", selector):
        term = raw.strip()
        if not term:
            continue
        m = re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term)
        if m:
            values = {v.strip() for v in m.group(3).split(",")}
            present = m.group(1) in labels and labels[m.group(1)] in values
            if (m.group(2) == "in") != present:
                return False
            continue
        m = re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)", term)
        if m:
            equal = labels.get(m.group(1)) == m.group(3)
            if (m.group(2) == "!=") == equal:
                return False
            continue
        if term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def pod_from_lab(
    namespace: str, lab_name: str, role: str, trench: str = "trench-a", legacy: bool = False
) -> dict[str, Any]:
    """A Pod object as the Meridio operator (or the legacy Helm chart) would make it."""
    h = hashlib.sha256(f"{namespace}/{lab_name}".encode()).hexdigest()
    rs, suffix = h[:9], h[9:14]
    conduit = "conduit-a"
    node = "node-" + lab_name.rsplit("-", maxsplit=1)[-1][:1]
    if role == "lb-fe":
        if legacy:
            name = f"load-balancer-{trench}-{rs}-{suffix}"
            labels = {"app": f"load-balancer-{trench}"}
            containers = [
                {
                    "name": "load-balancer",
                    "image": "registry.nordix.org/cloud-native/meridio/load-balancer:1.0",
                },
                {"name": "fe", "image": "registry.nordix.org/cloud-native/meridio/frontend:1.0"},
                {"name": "nsc", "image": "registry.nordix.org/cloud-native/nsm/cmd-nsc:v1.6"},
            ]
        else:
            name = f"stateless-lb-frontend-attractor-a-{rs}-{suffix}"
            labels = {
                "app": "stateless-lb-frontend-attractor-a",
                "app-type": "stateless-lb-frontend",
            }
            containers = [
                {
                    "name": "stateless-lb",
                    "image": "registry.nordix.org/cloud-native/meridio/stateless-lb:v1.2.8",
                    "env": [
                        {"name": "NSM_SERVICE_NAME", "value": f"{conduit}.{trench}.{namespace}"},
                        {"name": "NSM_TRENCH_NAME", "value": trench},
                    ],
                },
                {
                    "name": "frontend",
                    "image": "registry.nordix.org/cloud-native/meridio/frontend:v1.2.8",
                    "env": [{"name": "NFE_ATTRACTOR_NAME", "value": "attractor-a"}],
                },
            ]
    elif role == "proxy":
        name = f"proxy-{conduit}-{suffix}"
        labels = {"app": f"proxy-{conduit}", "app-type": "proxy"}
        containers = [
            {
                "name": "proxy",
                "image": "registry.nordix.org/cloud-native/meridio/proxy:v1.2.8",
                "env": [
                    {"name": "NSM_SERVICE_NAME", "value": f"proxy.{conduit}.{trench}.{namespace}"}
                ],
            }
        ]
    elif role == "target":
        app = "target-" + lab_name.rsplit("-", maxsplit=1)[-1][:1]
        name = f"{app}-{rs}-{suffix}"
        labels = {"app": app}
        containers = [
            {
                "name": "example-target",
                "image": "registry.nordix.org/cloud-native/meridio/example-target:latest",
            },
            {
                "name": "tapa",
                "image": "registry.nordix.org/cloud-native/meridio/tapa:v1.2.8",
                "env": [{"name": "MERIDIO_SOCKET", "value": "/var/lib/meridio/ambassador.sock"}],
            },
        ]
    else:
        name = lab_name
        labels = {"app": lab_name.rsplit("-", 1)[0]}
        containers = [{"name": lab_name.split("-", maxsplit=1)[0], "image": "example/other:1"}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": str(hashlib.md5(name.encode()).hexdigest()),
            "labels": labels,
            "annotations": {},
            "creationTimestamp": now(),
            "resourceVersion": "1",
        },
        "spec": {"containers": containers, "nodeName": node, "serviceAccountName": "default"},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": c["name"],
                    "ready": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now()}},
                }
                for c in containers
            ],
        },
    }


class StandInApiServer:
    """The stand-in API server and kubelet; ``start()`` runs it in a background thread."""

    def __init__(self, workdir: Path, python: str = sys.executable) -> None:
        self.workdir = workdir
        self.python = python
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.netns: dict[tuple[str, str], str] = {}
        self.lab_name: dict[tuple[str, str], str] = {}
        self.psa: dict[str, str] = {}
        self.denied: set[tuple[str, str]] = set()
        self.bad_images: set[str] = set()
        self.stuck_images: set[str] = set()
        self.requests: list[tuple[str, str, str]] = []  # (verb, resource, namespace), authorised
        self.patches: list[tuple[str, str, str, Any]] = []  # (pod, resource, content type, body)
        self.hooks: dict[str, Callable[[str, str], None]] = {}  # "before-ephemeral-patch"
        self.procs: dict[tuple[str, str, str], subprocess.Popen[bytes]] = {}
        self._relays: list[asyncio.AbstractServer] = []
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ip_counter = 0
        self.url = ""

    # --- setup --------------------------------------------------------------------------------

    def add_pod(
        self, pod: dict[str, Any], netns: str | None = None, lab_name: str = ""
    ) -> dict[str, Any]:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        with self._lock:
            self._ip_counter += 1
            pod["status"]["podIP"] = (
                f"127.77.{self._ip_counter // 250}.{self._ip_counter % 250 + 1}"
            )
            self.pods[key] = pod
            if netns:
                self.netns[key] = netns
            self.lab_name[key] = lab_name
        return pod

    def add_lab(
        self, lab_pods: Iterable[tuple[str, str, str]], namespace: str, legacy: bool = False
    ) -> None:
        """Pods for the lab's (name, role, netns) triples, plus NSP and IPAM pods without a netns."""
        for name, role, netns in lab_pods:
            if role == "gateway":
                continue
            self.add_pod(pod_from_lab(namespace, name, role, legacy=legacy), netns, name)
        for other in ("nsp-trench-a-0", "ipam-trench-a-0"):
            self.add_pod(pod_from_lab(namespace, other, "other"))

    def pod_by_lab(self, namespace: str, lab_name: str) -> str:
        with self._lock:
            return next(
                k[1] for k, v in self.lab_name.items() if k[0] == namespace and v == lab_name
            )

    def delete_pod(self, namespace: str, name: str) -> None:
        with self._lock:
            self.pods.pop((namespace, name), None)
            procs = [p for k, p in self.procs.items() if k[:2] == (namespace, name)]
        for proc in procs:
            _stop(proc)

    def kubeconfig(self, path: Path, namespace: str = "red") -> Path:
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "meridio-debug", "user": {"token": TOKEN}}],
            "contexts": [
                {
                    "name": "stand-in",
                    "context": {
                        "cluster": "stand-in",
                        "user": "meridio-debug",
                        "namespace": namespace,
                    },
                }
            ],
            "current-context": "stand-in",
        }
        path.write_text(json.dumps(doc))
        return path

    def used_verbs(self) -> set[tuple[str, str]]:
        with self._lock:
            return {(v, r) for v, r, _ns in self.requests}

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> str:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            app = web.Application()
            base = "/api/v1/namespaces/{ns}/pods"
            app.router.add_get(base, self._list)
            app.router.add_get(base + "/{name}", self._get)
            app.router.add_patch(base + "/{name}", self._patch_pod)
            app.router.add_patch(base + "/{name}/ephemeralcontainers", self._patch_ephemeral)
            app.router.add_get(base + "/{name}/log", self._log)
            app.router.add_get(base + "/{name}/portforward", self._portforward)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="stand-in-apiserver", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self.url

    def stop(self) -> None:
        with self._lock:
            procs = list(self.procs.values())
        for proc in procs:
            _stop(proc)
        if self._loop is not None:

            async def close_relays() -> None:
                for r in self._relays:
                    r.close()
                me = asyncio.current_task()
                for task in asyncio.all_tasks():
                    if task is not me:
                        task.cancel()

            asyncio.run_coroutine_threadsafe(close_relays(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    # --- auth ----------------------------------------------------------------------------------

    def _authorize(
        self, request: web.Request, verbs: Iterable[str], resource: str
    ) -> web.Response | None:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return status(401, "Unauthorized", "Unauthorized")
        ns = request.match_info["ns"]
        name = request.match_info.get("name")
        for verb in verbs:
            if (verb, resource) in self.denied:
                who = f'pods "{name}"' if name else "pods"
                return status(
                    403,
                    "Forbidden",
                    f'{who} is forbidden: User "{USER}" cannot {verb} resource "{resource}" '
                    f'in API group "" in the namespace "{ns}"',
                    {"name": name or "", "kind": resource.split("/", maxsplit=1)[0]},
                )
        with self._lock:
            for verb in verbs:
                self.requests.append((verb, resource, ns))
        return None

    def _pod(self, request: web.Request) -> tuple[tuple[str, str], dict[str, Any] | None]:
        key = (request.match_info["ns"], request.match_info["name"])
        with self._lock:
            return key, self.pods.get(key)

    @staticmethod
    def _not_found(name: str) -> web.Response:
        return status(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"})

    # --- handlers ------------------------------------------------------------------------------

    async def _list(self, request: web.Request) -> web.Response:
        denied = self._authorize(request, ["list"], "pods")
        if denied:
            return denied
        ns = request.match_info["ns"]
        selector = request.query.get("labelSelector", "")
        with self._lock:
            items = [
                copy.deepcopy(p)
                for (pns, _n), p in sorted(self.pods.items())
                if pns == ns and match_selector(p["metadata"].get("labels") or {}, selector)
            ]
        return web.json_response(
            {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": "1"},
                "items": items,
            }
        )

    async def _get(self, request: web.Request) -> web.Response:
        denied = self._authorize(request, ["get"], "pods")
        if denied:
            return denied
        key, pod = self._pod(request)
        if pod is None:
            return self._not_found(key[1])
        with self._lock:
            return web.json_response(copy.deepcopy(pod))

    async def _patch_pod(self, request: web.Request) -> web.Response:
        denied = self._authorize(request, ["patch"], "pods")
        if denied:
            return denied
        key, pod = self._pod(request)
        if pod is None:
            return self._not_found(key[1])
        body = await request.json()
        self.patches.append((key[1], "pods", request.content_type, body))
        if set(body) - {"metadata"} or set(body.get("metadata", {})) - {"annotations", "labels"}:
            return status(422, "Invalid", "the stand-in only patches metadata.annotations/labels")
        with self._lock:
            meta = pod["metadata"]
            for field in ("annotations", "labels"):
                for k, v in (body.get("metadata", {}).get(field) or {}).items():
                    meta.setdefault(field, {})
                    if v is None:
                        meta[field].pop(k, None)
                    else:
                        meta[field][k] = v
            meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)
            return web.json_response(copy.deepcopy(pod))

    def _psa_violations(self, ns: str, containers: list[dict[str, Any]]) -> str | None:
        level = self.psa.get(ns, "privileged")
        if level == "privileged":
            return None
        problems: list[str] = []
        priv = [c["name"] for c in containers if (c.get("securityContext") or {}).get("privileged")]
        if priv:
            names = ", ".join(f'"{n}"' for n in priv)
            problems.append(
                f"privileged (container{'s' if len(priv) > 1 else ''} {names} must not set "
                "securityContext.privileged=true)"
            )
        for c in containers:
            add = ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
            bad = [a for a in add if a not in BASELINE_CAPS]
            if bad:
                caps = ", ".join(f'"{a}"' for a in bad)
                problems.append(
                    f'non-default capabilities (container "{c["name"]}" must not include {caps} '
                    "in securityContext.capabilities.add)"
                )
        if level == "restricted":
            for c in containers:
                sc = c.get("securityContext") or {}
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append(
                        f'allowPrivilegeEscalation != false (container "{c["name"]}" must set '
                        "securityContext.allowPrivilegeEscalation=false)"
                    )
                if sc.get("runAsNonRoot") is not True:
                    problems.append(
                        f'runAsNonRoot != true (container "{c["name"]}" must not set '
                        "securityContext.runAsNonRoot=false)"
                    )
        if not problems:
            return None
        return f'violates PodSecurity "{level}:latest": ' + ", ".join(problems)

    def _validate(self, pod: dict[str, Any], index: int, c: dict[str, Any]) -> str | None:
        where = f"spec.ephemeralContainers[{index}]"
        for field in FORBIDDEN_EPHEMERAL:
            if c.get(field):
                return f"{where}.{field}: Forbidden: cannot be set for an Ephemeral Container"
        if not c.get("name"):
            return f"{where}.name: Required value"
        if not c.get("image"):
            return f"{where}.image: Required value"
        regular = {x["name"] for x in pod["spec"].get("containers", [])}
        if c["name"] in regular:
            return f'{where}.name: Duplicate value: "{c["name"]}"'
        target = c.get("targetContainerName")
        if target and target not in regular:
            return f'{where}.targetContainerName: Not found: "{target}"'
        return None

    async def _patch_ephemeral(self, request: web.Request) -> web.Response:
        denied = self._authorize(request, ["patch"], "pods/ephemeralcontainers")
        if denied:
            return denied
        key, pod = self._pod(request)
        hook = self.hooks.get("before-ephemeral-patch")
        if hook is not None and pod is not None:
            hook(*key)
            key, pod = self._pod(request)
        if pod is None:
            return self._not_found(key[1])
        name = key[1]
        body = await request.json()
        ctype = request.content_type
        self.patches.append((name, "pods/ephemeralcontainers", ctype, body))
        with self._lock:
            current: list[dict[str, Any]] = copy.deepcopy(
                pod["spec"].get("ephemeralContainers") or []
            )
        if ctype == "application/strategic-merge-patch+json":
            wanted = copy.deepcopy(current)
            for patch_c in (body.get("spec") or {}).get("ephemeralContainers") or []:
                existing = next((c for c in wanted if c["name"] == patch_c.get("name")), None)
                if existing is None:
                    wanted.append(patch_c)
                else:
                    existing.update(patch_c)
        elif ctype == "application/merge-patch+json":
            wanted = (body.get("spec") or {}).get("ephemeralContainers")
            if wanted is None:
                wanted = current
        elif ctype == "application/json-patch+json":
            wanted = copy.deepcopy(current)
            for op in body:
                if op.get("op") == "add" and op.get("path") == "/spec/ephemeralContainers/-":
                    if "ephemeralContainers" not in pod["spec"]:
                        return status(
                            422,
                            "Invalid",
                            "the server rejected our request due to an error in our request: "
                            "doc is missing path: /spec/ephemeralContainers/-: missing value",
                        )
                    wanted.append(op["value"])
                else:
                    return status(422, "Invalid", f"unsupported json patch {op}")
        else:
            return status(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json; got {ctype}",
            )
        old = {c["name"]: c for c in current}
        new_names = [c.get("name") for c in wanted]
        for c_name, c in old.items():
            if c_name not in new_names:
                return status(
                    422,
                    "Invalid",
                    f'Pod "{name}" is invalid: spec.ephemeralContainers: Forbidden: existing ephemeral containers "{c_name}" may not be removed',
                )
            if next(w for w in wanted if w.get("name") == c_name) != c:
                return status(
                    422,
                    "Invalid",
                    f'Pod "{name}" is invalid: spec.ephemeralContainers: Forbidden: existing ephemeral containers "{c_name}" may not be changed',
                )
        added = [(i, c) for i, c in enumerate(wanted) if c.get("name") not in old]
        for i, c in added:
            problem = self._validate(pod, i, c)
            if problem:
                return status(422, "Invalid", f'Pod "{name}" is invalid: {problem}')
        violation = self._psa_violations(key[0], [c for _i, c in added])
        if violation:
            return status(403, "Forbidden", f'pods "{name}" is forbidden: {violation}')
        with self._lock:
            pod["spec"]["ephemeralContainers"] = wanted
            pod["metadata"]["resourceVersion"] = str(int(pod["metadata"]["resourceVersion"]) + 1)
            result = copy.deepcopy(pod)
        for _i, c in added:
            self._set_status(
                key, c["name"], c["image"], {"waiting": {"reason": "ContainerCreating"}}
            )
            asyncio.get_running_loop().create_task(self._kubelet_start(key, c))
        return web.json_response(result)

    async def _log(self, request: web.Request) -> web.Response:
        denied = self._authorize(request, ["get"], "pods/log")
        if denied:
            return denied
        key, pod = self._pod(request)
        if pod is None:
            return self._not_found(key[1])
        container = request.query.get("container", "")
        path = self._log_path(key, container)
        data = path.read_bytes() if path.exists() else b""
        limit = int(request.query.get("limitBytes", "0") or 0)
        if limit:
            data = data[:limit]
        return web.Response(body=data, content_type="text/plain")

    async def _portforward(self, request: web.Request) -> web.StreamResponse:
        # Kubernetes >= 1.35 authorises the websocket upgrade (a GET) as get *and* create.
        denied = self._authorize(request, ["get", "create"], "pods/portforward")
        if denied:
            return denied
        key, pod = self._pod(request)
        if pod is None:
            return self._not_found(key[1])
        ports = [int(p) for p in request.query.get("ports", "").split(",") if p]
        if not ports:
            return status(400, "BadRequest", "query parameter ports is required")
        ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io",))
        await ws.prepare(request)
        for i, port in enumerate(ports):
            await ws.send_bytes(bytes([2 * i]) + port.to_bytes(2, "little"))
            await ws.send_bytes(bytes([2 * i + 1]) + port.to_bytes(2, "little"))
        netns = self.netns.get(key)
        port = ports[0]
        try:
            if netns is None:
                raise OSError("no network namespace for this pod")
            sock = await asyncio.get_running_loop().run_in_executor(
                None, connect_in_netns, netns, port
            )
        except OSError as exc:
            uid = pod["metadata"]["uid"]
            with contextlib.suppress(ConnectionError, OSError):
                await ws.send_bytes(
                    bytes([1])
                    + (
                        f"error forwarding port {port} to pod {uid}, uid : failed to connect to "
                        f"localhost:{port} inside namespace {uid}: {exc}"
                    ).encode()
                )
            with contextlib.suppress(ConnectionError, OSError):
                await ws.close()
            return ws
        reader, writer = await asyncio.open_connection(sock=sock)

        async def from_pod() -> None:
            try:
                while True:
                    data = await reader.read(256 * 1024)
                    if not data:
                        break
                    await ws.send_bytes(b"\x00" + data)
            except (ConnectionError, OSError):
                pass
            finally:
                await ws.close()

        pump = asyncio.create_task(from_pod())
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY and msg.data[:1] == b"\x00" and len(msg.data) > 1:
                    writer.write(msg.data[1:])
                    await writer.drain()
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                writer.close()
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        return ws

    # --- kubelet -------------------------------------------------------------------------------

    def _log_path(self, key: tuple[str, str], container: str) -> Path:
        return self.workdir / f"{key[0]}_{key[1]}_{container}.log"

    def _set_status(
        self, key: tuple[str, str], name: str, image: str, state: dict[str, Any]
    ) -> None:
        with self._lock:
            pod = self.pods.get(key)
            if pod is None:
                return
            statuses = pod["status"].setdefault("ephemeralContainerStatuses", [])
            entry = {
                "name": name,
                "image": image,
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": state,
            }
            for i, s in enumerate(statuses):
                if s["name"] == name:
                    statuses[i] = entry
                    break
            else:
                statuses.append(entry)

    async def _kubelet_start(self, key: tuple[str, str], c: dict[str, Any]) -> None:
        name, image = c["name"], c["image"]
        await asyncio.sleep(0.05)
        if image in self.stuck_images:
            return
        if image in self.bad_images:
            msg = f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": not found'
            self._set_status(
                key, name, image, {"waiting": {"reason": "ErrImagePull", "message": msg}}
            )
            await asyncio.sleep(0.3)
            self._set_status(
                key,
                name,
                image,
                {
                    "waiting": {
                        "reason": "ImagePullBackOff",
                        "message": f'Back-off pulling image "{image}"',
                    }
                },
            )
            return
        netns = self.netns.get(key)
        with self._lock:
            pod = self.pods.get(key)
            pod_ip = pod["status"]["podIP"] if pod else ""
        env = dict(os.environ)
        for e in c.get("env") or []:
            env[e["name"]] = str(e.get("value", ""))
        env["POD_IP"] = pod_ip
        args = [
            re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a)
            for a in c.get("args") or []
        ]
        # As the kubelet starts an ephemeral container with targetContainerName: the pod's
        # netns, only the target container's PID namespace, a mount namespace of its own.
        argv = [self.python, "-m", "meridio_debug.agent.ephemeral", f"--netns=/run/netns/{netns}"]
        target = c.get("targetContainerName") or ""
        found = find_container(str(netns), LAB_CONTAINER.get(target, target)) if target else None
        if found is not None:
            argv += [f"--target-pid={found[0]}", f"--shm={found[1]}", f"--container={target}"]
        argv += ["--", *args]
        with open(self._log_path(key, name), "wb") as log_file:  # the child keeps its own fd
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env=env,
                start_new_session=True,
            )
        with self._lock:
            self.procs[(key[0], key[1], name)] = proc
        started = now()
        self._set_status(key, name, image, {"running": {"startedAt": started}})
        port = next((int(a.rsplit(":", 1)[1]) for a in args if a.startswith("tcp:")), None)
        listen = next((a for a in args if a.startswith("tcp:")), "")
        if port and netns and not listen.startswith("tcp:127.0.0.1"):
            await self._pod_ip_relay(pod_ip, port, netns)
        # Polled, not proc.wait in the executor: one blocked worker per agent would starve it.
        while (code := proc.poll()) is None:
            await asyncio.sleep(0.1)
        tail = self._log_path(key, name).read_bytes()[-2048:].decode(errors="replace").strip()
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": started,
            "finishedAt": now(),
            "containerID": f"containerd://{name}",
        }
        if code != 0 and tail:
            terminated["message"] = tail
        self._set_status(key, name, image, {"terminated": terminated})

    async def _pod_ip_relay(self, pod_ip: str, port: int, netns: str) -> None:
        """Stand-in pod network: pod_ip:port on the host relays into the pod's namespace."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                sock = await asyncio.get_running_loop().run_in_executor(
                    None, connect_in_netns, netns, port
                )
            except OSError:
                writer.close()
                return
            r2, w2 = await asyncio.open_connection(sock=sock)

            async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                try:
                    while data := await r.read(256 * 1024):
                        w.write(data)
                        await w.drain()
                except (ConnectionError, OSError):
                    pass
                finally:
                    with contextlib.suppress(OSError, RuntimeError):
                        w.close()

            await asyncio.gather(pipe(reader, w2), pipe(r2, writer))

        with contextlib.suppress(OSError):
            self._relays.append(await asyncio.start_server(handle, pod_ip, port))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(3)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
