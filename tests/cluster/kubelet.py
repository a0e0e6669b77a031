"""The node side of the cluster tier: a kubelet that speaks the real protocol to the real API server.

There is no container runtime here, and the lab's "pods" are network
namespaces (controller/lab.py). So the node side stays ours, but everything it
says goes through the API server the way a kubelet's does:

- it **watches** the pods bound to its Nodes and writes their status through
  ``pods/status`` (phase, podIP, conditions, ready containers, restarts),
  including ``ephemeralContainerStatuses``: an added ephemeral container is
  started as the real agent the way a kubelet does (agent/ephemeral.py: the
  pod's network namespace, only the target container's PID namespace, a mount
  namespace of its own), running -> terminated with its exit code, or for an image listed
  in ``bad_images`` the kubelet's ErrImagePull <-> ImagePullBackOff cycle
  until the image is removed from that set (it recovers, as a real pull that
  succeeds later does); images in ``stuck_images`` stay ContainerCreating;
- **graceful deletion**: a pod with a deletionTimestamp has its containers
  stopped and is then deleted with grace period 0 (the object stays while a
  finaliser holds it, as on a real cluster);
- it **serves the kubelet API** the API server proxies to, over TLS with a
  certificate of the test CA and requiring the API server's
  --kubelet-client-certificate: ``/portForward/{ns}/{pod}`` (websocket,
  ``v4.channel.k8s.io``: a data and an error channel per port, each opened by
  a frame carrying the port, little endian; the connection is made *inside
  the pod's network namespace*) and ``/containerLogs/{ns}/{pod}/{container}``
  (limitBytes, tailLines, follow).

Pod IPs are loopback addresses (127.77.x.y) relayed into the pod's namespace,
standing in for the pod network in ``--direct`` tests.

Why not sigs.k8s.io/kwok: kwok fakes node and pod status from rules (stages)
and answers port-forward/logs only from static configuration (it forwards to
a fixed target address, or serves a log file); it cannot start a process in a
network namespace when an ephemeral container is added, nor forward into the
namespace of the pod that was asked for, which is what these tests exercise.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from kubernetes import client as k8s_client
from kubernetes import watch as k8s_watch

from meridio_debug.controller.lab.containers import find_container
from tests.cluster.kube import ControlPlane, free_port

# Helm (legacy) container names of the pods made from the lab -> the lab's containers.
LAB_CONTAINER = {"fe": "frontend", "load-balancer": "stateless-lb"}

CLONE_NEWNET = 0x40000000
MERGE = "application/merge-patch+json"


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


class Kubelet:
    """One kubelet process-in-a-thread serving any number of Nodes (one TLS port)."""

    def __init__(self, plane: ControlPlane, work: Path, python: str = sys.executable) -> None:
        self.plane = plane
        self.work = work
        self.python = python
        self.nodes: set[str] = set()
        self.netns: dict[tuple[str, str], str] = {}
        self.bad_images: set[str] = set()
        self.stuck_images: set[str] = set()
        self.procs: dict[tuple[str, str, str], subprocess.Popen[bytes]] = {}
        self.port = free_port()
        self._core = k8s_client.CoreV1Api(plane.admin)
        self._lock = threading.RLock()
        self._pods: dict[tuple[str, str], dict[str, Any]] = {}  # last seen
        self._eph: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}  # statuses we report
        self._started: set[tuple[str, str, str]] = set()
        self._deleting: set[tuple[str, str]] = set()
        self._running: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ips: dict[tuple[str, str], str] = {}
        self._ip_counter = 0
        self._relays: list[asyncio.AbstractServer] = []
        self._runner: web.AppRunner | None = None
        self._writers: set[asyncio.StreamWriter] = set()  # streams to agents, closed at stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._watch_thread: threading.Thread | None = None
        self._watch: k8s_watch.Watch | None = None
        self._stopping = threading.Event()
        self._dead: list[socket.socket] = []

    # --- setup --------------------------------------------------------------------------------

    def add_node(self, name: str) -> None:
        self.plane.node(name, self.port)
        self.nodes.add(name)

    def add_dead_node(self, name: str) -> None:
        """A Node whose kubelet port accepts TCP (the kernel's backlog) but never answers."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        self._dead.append(s)
        self.plane.node(name, s.getsockname()[1])
        self.nodes.add(name)

    def make_unresponsive(self, node: str) -> socket.socket:
        """Point the Node at a port that accepts TCP but never answers (a hung kubelet)."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        self._set_port(node, s.getsockname()[1])
        return s

    def make_responsive(self, node: str, dead: socket.socket) -> None:
        self._set_port(node, self.port)
        dead.close()

    def _set_port(self, node: str, port: int) -> None:
        self._core.patch_node_status(
            node, {"status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}}
        )

    def pod_ip(self, namespace: str, name: str) -> str:
        with self._lock:
            return self._ips[(namespace, name)]

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()
        ctx = self.plane.pki.server_context(self.plane.kubelet_server)

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            app = web.Application()
            app.router.add_get("/portForward/{ns}/{name}", self._portforward)
            app.router.add_get("/containerLogs/{ns}/{name}/{container}", self._logs)
            app.router.add_get("/healthz", self._healthz)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
            self._runner = runner
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=ctx)
            loop.run_until_complete(site.start())
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="kubelet", daemon=True)
        self._thread.start()
        ready.wait(10)
        self._watch_thread = threading.Thread(target=self._watch_pods, name="kubelet-watch")
        self._watch_thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()
        with self._lock:
            procs = list(self.procs.values())
        for proc in procs:
            _stop(proc)
        if self._loop is not None:

            async def close_all() -> None:
                for r in self._relays:
                    r.close()
                for task in list(self._tasks):
                    task.cancel()
                if self._runner is not None:
                    await self._runner.cleanup()  # closes the API server's connections too
                me = asyncio.current_task()
                rest = [t for t in asyncio.all_tasks() if t is not me]
                for task in rest:
                    task.cancel()
                await asyncio.gather(*rest, return_exceptions=True)
                for w in self._writers:
                    w.transport.abort()
                await asyncio.sleep(0)  # let the transports close

            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        if self._watch_thread is not None:
            self._watch_thread.join(15)
        for s in self._dead:
            s.close()

    # --- the pod watch --------------------------------------------------------------------------

    def _watch_pods(self) -> None:
        rv = ""
        while not self._stopping.is_set():
            self._watch = k8s_watch.Watch()
            try:
                if not rv:
                    listed = self._core.list_pod_for_all_namespaces(_preload_content=False)
                    doc = json.loads(listed.data)
                    rv = doc["metadata"]["resourceVersion"]
                    for pod in doc["items"]:
                        self._seen(pod)
                for ev in self._watch.stream(
                    self._core.list_pod_for_all_namespaces,
                    resource_version=rv,
                    timeout_seconds=5,
                    allow_watch_bookmarks=True,
                    _preload_content=False,
                ):
                    obj = ev["raw_object"]
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if ev["type"] in ("ADDED", "MODIFIED"):
                        self._seen(obj)
                    elif ev["type"] == "DELETED":
                        self._gone(obj)
                    elif ev["type"] == "ERROR":
                        rv = ""
                        break
                    if self._stopping.is_set():
                        break
            except Exception:
                if self._stopping.is_set():
                    return
                rv = ""
                self._stopping.wait(0.2)

    def _seen(self, pod: dict[str, Any]) -> None:
        if pod.get("spec", {}).get("nodeName") not in self.nodes or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._sync, pod)

    def _gone(self, pod: dict[str, Any]) -> None:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        with self._lock:
            self._pods.pop(key, None)
            procs = [(k, p) for k, p in self.procs.items() if k[:2] == key]
        for k, proc in procs:
            _stop(proc)
            with self._lock:
                self.procs.pop(k, None)

    def _sync(self, pod: dict[str, Any]) -> None:
        """Bring the pod's status in line with what runs (called on the loop for every event)."""
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._lock:
            self._pods[key] = pod
            if key not in self._ips:
                self._ip_counter += 1
                n = self._ip_counter
                self._ips[key] = f"127.77.{n // 250}.{n % 250 + 1}"
        loop = asyncio.get_running_loop()
        if meta.get("deletionTimestamp"):
            if key not in self._deleting:
                self._deleting.add(key)
                self._spawn(loop, self._terminate(pod))
            return
        if pod.get("status", {}).get("phase") != "Running" and key not in self._running:
            self._running.add(key)
            self._spawn(loop, self._to_thread(self._start_pod, pod))
        for c in pod["spec"].get("ephemeralContainers") or []:
            ck = (key[0], key[1], c["name"])
            if ck not in self._started:
                self._started.add(ck)
                self._spawn(loop, self._run_ephemeral(key, c))

    def _spawn(self, loop: asyncio.AbstractEventLoop, coro: Any) -> None:
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _to_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def _patch_status(self, key: tuple[str, str], status: dict[str, Any]) -> None:
        with contextlib.suppress(k8s_client.ApiException):
            self._core.patch_namespaced_pod_status(
                key[1], key[0], {"status": status}, _content_type=MERGE
            )

    def _start_pod(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        key = (meta["namespace"], meta["name"])
        ip = self._ips[key]
        t = meta.get("creationTimestamp") or now()
        conds = [
            {"type": c, "status": "True", "lastTransitionTime": t}
            for c in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady")
        ]
        conds.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": t})
        status: dict[str, Any] = {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": t,
            "qosClass": "BestEffort",
            "conditions": conds,
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c["image"],
                    "imageID": f"{c['image']}@sha256:{'0' * 64}",
                    "containerID": f"containerd://{meta['uid'][:8]}-{c['name']}",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": t}},
                }
                for c in spec["containers"]
            ],
        }
        if spec.get("initContainers"):
            status["initContainerStatuses"] = [
                {
                    "name": c["name"],
                    "image": c["image"],
                    "imageID": f"{c['image']}@sha256:{'0' * 64}",
                    "containerID": f"containerd://{meta['uid'][:8]}-{c['name']}",
                    "ready": True,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": 0,
                            "reason": "Completed",
                            "startedAt": t,
                            "finishedAt": t,
                        }
                    },
                }
                for c in spec["initContainers"]
            ]
        self._patch_status(key, status)

    def _set_ephemeral(self, key: tuple[str, str], name: str, image: str, state: Any) -> None:
        with self._lock:
            statuses = self._eph.setdefault(key, {})
            statuses[name] = {
                "name": name,
                "image": image,
                "imageID": "" if "waiting" in state else f"{image}@sha256:{'0' * 64}",
                "ready": False,
                "restartCount": 0,
                "state": state,
            }
            if "waiting" not in state:
                statuses[name]["containerID"] = f"containerd://{key[1][:20]}-{name}"
            body = list(statuses.values())
        self._patch_status(key, {"ephemeralContainerStatuses": body})

    async def _run_ephemeral(self, key: tuple[str, str], c: dict[str, Any]) -> None:
        name, image = c["name"], c["image"]
        await self._to_thread(
            self._set_ephemeral, key, name, image, {"waiting": {"reason": "ContainerCreating"}}
        )
        if image in self.stuck_images:
            return
        while image in self.bad_images:
            msg = (
                f'failed to pull and unpack image "{image}": failed to resolve reference '
                f'"{image}": not found'
            )
            await self._to_thread(
                self._set_ephemeral,
                key,
                name,
                image,
                {"waiting": {"reason": "ErrImagePull", "message": msg}},
            )
            await asyncio.sleep(0.3)
            if image not in self.bad_images:
                break
            await self._to_thread(
                self._set_ephemeral,
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
            await asyncio.sleep(0.6)
            with self._lock:
                if key not in self._pods:
                    return
        netns = self.netns.get(key)
        if netns is None:
            await self._to_thread(
                self._set_ephemeral,
                key,
                name,
                image,
                {"waiting": {"reason": "RunContainerError", "message": "no network namespace"}},
            )
            return
        env = dict(os.environ)
        for e in c.get("env") or []:
            env[e["name"]] = str(e.get("value", ""))
        args = [
            re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a)
            for a in c.get("args") or []
        ]
        # As the kubelet starts an ephemeral container with targetContainerName: the pod's
        # netns, only the target container's PID namespace, a mount namespace of its own.
        argv = [self.python, "-m", "meridio_debug.agent.ephemeral", f"--netns=/run/netns/{netns}"]
        target = c.get("targetContainerName") or ""
        found = find_container(netns, LAB_CONTAINER.get(target, target)) if target else None
        if found is not None:
            argv += [f"--target-pid={found[0]}", f"--shm={found[1]}", f"--container={target}"]
        argv += ["--", *args]
        with open(self.log_path(key, name), "wb") as log_file:
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
        await self._to_thread(
            self._set_ephemeral, key, name, image, {"running": {"startedAt": started}}
        )
        listen = next((a for a in args if a.startswith("tcp:")), "")
        if listen and not listen.startswith("tcp:127.0.0.1"):
            await self._pod_ip_relay(self._ips[key], int(listen.rsplit(":", 1)[1]), netns)
        while (code := proc.poll()) is None:
            await asyncio.sleep(0.1)
        tail = self.log_path(key, name).read_bytes()[-2048:].decode(errors="replace").strip()
        terminated: dict[str, Any] = {
            "exitCode": code if code >= 0 else 128 - code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": started,
            "finishedAt": now(),
            "containerID": f"containerd://{key[1][:20]}-{name}",
        }
        if code != 0 and tail and c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            terminated["message"] = tail
        with self._lock:
            gone = key not in self._pods
        if not gone:
            await self._to_thread(self._set_ephemeral, key, name, image, {"terminated": terminated})

    async def _terminate(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._lock:
            procs = [p for k, p in self.procs.items() if k[:2] == key]
        for p in procs:
            await self._to_thread(_stop, p)
        with contextlib.suppress(k8s_client.ApiException):
            await self._to_thread(
                lambda: self._core.delete_namespaced_pod(
                    key[1],
                    key[0],
                    grace_period_seconds=0,
                    body={"preconditions": {"uid": meta["uid"]}},
                )
            )

    def log_path(self, key: tuple[str, str], container: str) -> Path:
        return self.work / f"{key[0]}_{key[1]}_{container}.log"

    # --- the kubelet API ------------------------------------------------------------------------

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        key = (request.match_info["ns"], request.match_info["name"])
        container = request.match_info["container"]
        path = self.log_path(key, container)
        if not path.exists():
            return web.Response(
                status=404, text=f'container "{container}" in pod "{key[1]}" has no log'
            )
        data = path.read_bytes()
        tail = request.query.get("tailLines")
        if tail:
            data = b"".join(data.splitlines(keepends=True)[-int(tail) :])
        limit = int(request.query.get("limitBytes", "0") or 0)
        if limit:
            data = data[:limit]
        follow = request.query.get("follow") in ("true", "1")
        if not follow:
            return web.Response(body=data, content_type="text/plain")
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        await resp.write(data)
        pos = path.stat().st_size
        proc = self.procs.get((key[0], key[1], container))
        while proc is not None and proc.poll() is None:
            await asyncio.sleep(0.2)
            with open(path, "rb") as f:
                f.seek(pos)
                more = f.read()
            if more:
                pos += len(more)
                await resp.write(more)
        return resp

    async def _portforward(self, request: web.Request) -> web.StreamResponse:
        key = (request.match_info["ns"], request.match_info["name"])
        ports = [int(p) for p in request.query.getall("port", []) if p]
        if not ports:
            return web.Response(status=400, text="query parameter port is required")
        ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io",))
        await ws.prepare(request)
        for i, port in enumerate(ports):
            await ws.send_bytes(bytes([2 * i]) + port.to_bytes(2, "little"))
            await ws.send_bytes(bytes([2 * i + 1]) + port.to_bytes(2, "little"))
        netns = self.netns.get(key)
        port = ports[0]
        uid = (self._pods.get(key) or {}).get("metadata", {}).get("uid", "")
        try:
            if netns is None:
                raise OSError("no network namespace for this pod")
            sock = await self._to_thread(connect_in_netns, netns, port)
        except OSError as exc:
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
        self._writers.add(writer)

        async def from_pod() -> None:
            try:
                while data := await reader.read(256 * 1024):
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
            self._writers.discard(writer)
            writer.transport.abort()
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        return ws

    async def _pod_ip_relay(self, pod_ip: str, port: int, netns: str) -> None:
        """Stand-in pod network: pod_ip:port on the host relays into the pod's namespace."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                sock = await self._to_thread(connect_in_netns, netns, port)
            except OSError:
                writer.close()
                return
            r2, w2 = await asyncio.open_connection(sock=sock)
            self._writers.update((w2, writer))

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


def wait_for(pred: Any, timeout: float = 20, what: str = "") -> Any:
    """Poll ``pred`` until it returns something truthy (test helper)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or pred}")


def names(items: Iterable[dict[str, Any]]) -> list[str]:
    return [i["metadata"]["name"] for i in items]
