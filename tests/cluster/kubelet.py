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
- **the containers' lives** (one supervisor thread): each container of a pod
  made from the lab is tied to the lab container behind it (its PID 1). When
  that process dies the container is reported terminated with its real exit
  code (the kernel's proc connector, ``Exits``: PID 1 is not our child, as it
  is containerd's shim's), ``CrashLoopBackOff`` for the kubelet's back-off
  (10 s doubling, ``backoff``), then started again the same way the lab started
  it (``restartCount`` + 1, ``lastState``). Each instance's log is kept apart,
  and ``containerLogs`` picks current or ``previous`` as the kubelet's
  validateContainerLogStatus does. Readiness: an FE container (``frontend``,
  Helm's ``fe``) is ready while its bird has an Established BGP session to a
  gateway (``NBR-*``), probed every second; the others while they run. A
  container whose image is in ``bad_images`` cycles ErrImagePull <->
  ImagePullBackOff, and a pod with a container that never ran stays Pending
  (the kubelet's getPhase);
- **the scheduler's one job here**: a pod without ``nodeName`` is bound
  (``pods/binding``) to one of our Nodes its ``nodeSelector`` fits, or gets
  ``PodScheduled=False``/``Unschedulable`` with kube-scheduler's message;
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
import concurrent.futures
import contextlib
import ctypes
import datetime
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from kubernetes import client as k8s_client
from kubernetes import watch as k8s_watch

from meridio_debug.controller.lab.containers import (
    MARKER_ENV,
    ContainerSpec,
    alive_and_ours,
    find_container,
    shm_dir,
)
from meridio_debug.controller.lab.containers import log_path as lab_log_path
from meridio_debug.controller.lab.containers import start as start_containers
from meridio_debug.controller.lab.state import bird_paths
from tests.cluster.kube import ControlPlane, free_port

# Helm (legacy) container names of the pods made from the lab -> the lab's containers.
LAB_CONTAINER = {"fe": "frontend", "load-balancer": "stateless-lb"}

CLONE_NEWNET = 0x40000000
MERGE = "application/merge-patch+json"
# The kubelet's crash back-off (10 s doubling to 5 min); tests may shorten it (Kubelet.backoff).
BACKOFF_S = (10.0, 20.0, 40.0, 80.0, 160.0, 300.0)
PULL_RETRY_S = 0.3
PROBE_PERIOD_S = 1.0


@dataclass
class Ctr:
    """One container of a pod as this kubelet runs it (and the lab container behind it)."""

    name: str
    image: str
    cid: str  # containerID of the current (or last) instance
    state: dict[str, Any] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)  # lastState
    ready: bool = False
    ever_ran: bool = False
    started: str = ""
    restarts: int = 0
    crashes: int = 0
    due: float = 0.0  # monotonic time of the next restart or pull attempt
    gone_since: float = 0.0
    lab: ContainerSpec | None = None  # how to start it again; None: no process behind it
    directory: Path | None = None  # the lab's state directory
    pid: int = 0
    log: Path | None = None  # the lab container's log file (appended by every instance)
    offset: int = 0  # where the current instance's lines start in it
    instances: dict[str, Path] = field(default_factory=dict)  # containerID -> finished log
    probe: Path | None = None  # readiness: bird's control socket (the FE)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": f"{self.image}@sha256:{'0' * 64}" if self.ever_ran else "",
            "ready": self.ready,
            "started": "running" in self.state,
            "restartCount": self.restarts,
            "state": self.state,
        }
        if self.ever_ran:
            out["containerID"] = self.cid
        if self.last:
            out["lastState"] = self.last
        return out


@dataclass
class PodRecord:
    uid: str
    started: str
    ctrs: list[Ctr]
    inits: list[dict[str, Any]]
    published: str = ""
    adopted: bool = False  # the lab's containers behind ours found (once the netns is known)


def _pull_error(ctr: Ctr) -> str:
    return (
        f'failed to pull and unpack image "{ctr.image}": failed to resolve reference '
        f'"{ctr.image}": not found'
    )


def bird_established(ctl: Path) -> bool:
    """The FE's readiness: bird has an Established BGP session to a gateway (``NBR-*``)."""
    try:
        out = subprocess.run(
            ["birdc", "-s", str(ctl), "show", "protocols"],
            capture_output=True,
            text=True,
            timeout=3,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(line.startswith("NBR-") and "Established" in line for line in out.splitlines())


class Exits:
    """Exit statuses of processes that are not our children (the kernel's proc connector).

    A container's PID 1 here is a child of init, not of the kubelet (lab/containers.py);
    containerd's shim is a subreaper for that. The netlink proc connector reports every
    exit with its wait status, so the exit code a kubelet reports is the real one.
    """

    def __init__(self) -> None:
        self._watched: set[int] = set()
        self._codes: dict[int, int] = {}
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 11)  # CONNECTOR
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        self._sock.bind((0, 1))  # CN_IDX_PROC
        _only_exits(self._sock)
        op = struct.pack("=I", 1)  # PROC_CN_MCAST_LISTEN
        cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(op), 0) + op
        self._sock.send(struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn)  # NLMSG_DONE
        self._sock.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="kubelet-exits", daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> None:
        with self._lock:
            self._watched.add(pid)
            self._codes.pop(pid, None)

    def code(self, pid: int) -> int | None:
        with self._lock:
            return self._codes.get(pid)

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # ENOBUFS: events were lost; the supervisor waits, then says 255
                continue
            off = 0
            while off + 16 <= len(data):
                length = struct.unpack_from("=I", data, off)[0]
                what = struct.unpack_from("=I", data, off + 36)[0] if length >= 52 else 0
                if what == 0x80000000 and length >= 68:  # PROC_EVENT_EXIT
                    pid, tgid, status = struct.unpack_from("=iiI", data, off + 52)
                    if pid == tgid:
                        with self._lock:
                            if tgid in self._watched:
                                self._codes[tgid] = status
                off += max((length + 3) & ~3, 16)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


def _only_exits(sock: socket.socket) -> None:
    """A socket filter that keeps only PROC_EVENT_EXIT: the kernel drops the rest.

    The connector reports every fork, exec, uid change and exit on the host; with
    other labs starting processes by the thousand, reading them all cost the node
    side more than the pods it runs (a containerd shim only waits for its child).
    BPF loads are big-endian: ``what`` (offset 36: nlmsghdr 16 + cn_msg 20) equal to
    0x80000000 in host order reads as 0x80 on little-endian machines.
    """
    what = 0x80 if sys.byteorder == "little" else 0x80000000
    code = [(0x20, 0, 0, 36), (0x15, 0, 1, what), (0x06, 0, 0, 0xFFFFFFFF), (0x06, 0, 0, 0)]
    insns = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in code))
    prog = struct.pack("HL", len(code), ctypes.addressof(insns))  # struct sock_fprog
    with contextlib.suppress(OSError):  # without it every event is read, as before
        sock.setsockopt(socket.SOL_SOCKET, 26, prog)  # SO_ATTACH_FILTER (copied by the kernel)


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
        self.backoff: tuple[float, ...] = BACKOFF_S
        self.exits = Exits()
        self._ctrs: dict[tuple[str, str], PodRecord] = {}
        self._scheduled: set[str] = set()  # uids the scheduler has seen
        self._supervisor: threading.Thread | None = None
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
        # Blocking work (status PATCHes, setns connects) off the event loop, many at once as
        # a kubelet's goroutines: the default pool (cores + 4 threads) queued 48 pods' PATCHes.
        self._pool = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="kubelet")

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
        self._supervisor = threading.Thread(target=self._supervise, name="kubelet-supervisor")
        self._supervisor.start()

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
                await asyncio.sleep(0.1)  # let the transports close

            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        if self._watch_thread is not None:
            self._watch_thread.join(15)
        if self._supervisor is not None:
            self._supervisor.join(15)
        self.exits.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
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
        meta = pod.get("metadata", {})
        if (
            not pod.get("spec", {}).get("nodeName")
            and not meta.get("deletionTimestamp")
            and meta.get("uid") not in self._scheduled
            and self._loop is not None
        ):
            self._scheduled.add(meta.get("uid"))
            self._loop.call_soon_threadsafe(
                lambda: self._spawn(
                    asyncio.get_running_loop(), self._to_thread(self._schedule, pod)
                )
            )
            return
        if pod.get("spec", {}).get("nodeName") not in self.nodes or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._sync, pod)

    def _gone(self, pod: dict[str, Any]) -> None:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        with self._lock:
            self._pods.pop(key, None)
            self._ctrs.pop(key, None)
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
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _patch_status(self, key: tuple[str, str], status: dict[str, Any]) -> None:
        with contextlib.suppress(k8s_client.ApiException):
            self._core.patch_namespaced_pod_status(
                key[1], key[0], {"status": status}, _content_type=MERGE
            )

    def _start_pod(self, pod: dict[str, Any]) -> None:
        """The pod's containers as records the supervisor keeps in line with what runs."""
        meta, spec = pod["metadata"], pod["spec"]
        key = (meta["namespace"], meta["name"])
        t = meta.get("creationTimestamp") or now()
        ctrs = []
        for c in spec["containers"]:
            ctr = Ctr(c["name"], c["image"], f"containerd://{meta['uid'][:8]}-{c['name']}")
            if c["image"] in self.bad_images:
                ctr.state = {"waiting": {"reason": "ErrImagePull", "message": _pull_error(ctr)}}
                ctr.due = time.monotonic() + PULL_RETRY_S
            else:
                ctr.state = {"running": {"startedAt": t}}
                ctr.started, ctr.ever_ran, ctr.ready = t, True, True
            ctrs.append(ctr)
        inits = [
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
            for c in spec.get("initContainers") or []
        ]
        with self._lock:
            if key not in self._pods:
                return
            self._ctrs[key] = PodRecord(meta["uid"], t, ctrs, inits)
        self._publish(key)

    def _adopt(self, ctr: Ctr, netns: str) -> None:
        """Tie a container to the lab container behind it: its PID 1, how to start it again."""
        found = find_container(netns, LAB_CONTAINER.get(ctr.name, ctr.name))
        if found is None:
            return
        pid, shm = found
        directory, lab_pod = shm.parent.parent, shm.name
        lab_name = LAB_CONTAINER.get(ctr.name, ctr.name)
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
            env_raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return
        env = dict(item.decode(errors="replace").split("=", 1) for item in env_raw if b"=" in item)
        env.pop(MARKER_ENV, None)
        args = tuple(a.decode(errors="replace") for a in argv)
        ctr.lab = ContainerSpec(lab_pod, lab_name, netns, "idle", args[0], args, env)
        ctr.directory = directory
        ctr.pid = pid
        ctr.log = lab_log_path(directory, lab_pod, lab_name)
        self.exits.watch(pid)
        if ctr.name in ("frontend", "fe"):
            ctr.probe = bird_paths(directory, lab_pod)["ctl"]

    def _publish(self, key: tuple[str, str]) -> None:
        """PATCH pods/status when what the records say differs from what was last written."""
        with self._lock:
            rec = self._ctrs.get(key)
            if rec is None:
                return
            statuses = [c.status() for c in rec.ctrs]
            unready = [c.name for c in rec.ctrs if not c.ready]
            # the kubelet's getPhase: a container that never ran keeps the pod Pending
            phase = "Running" if all(c.ever_ran for c in rec.ctrs) else "Pending"
            ip = self._ips[key]
        t = rec.started
        ready = "False" if unready else "True"
        conds: list[dict[str, Any]] = [
            {"type": c, "status": "True", "lastTransitionTime": t}
            for c in ("PodReadyToStartContainers", "Initialized")
        ]
        for c in ("Ready", "ContainersReady"):
            cond: dict[str, Any] = {"type": c, "status": ready, "lastTransitionTime": t}
            if unready:
                cond["reason"] = "ContainersNotReady"
                cond["message"] = f"containers with unready status: [{' '.join(unready)}]"
            conds.append(cond)
        conds.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": t})
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": t,
            "qosClass": "BestEffort",
            "conditions": conds,
            "containerStatuses": statuses,
        }
        if rec.inits:
            status["initContainerStatuses"] = rec.inits
        body = json.dumps(status, sort_keys=True)
        if body == rec.published:
            return
        rec.published = body
        self._patch_status(key, status)

    # --- the containers' lives (one supervisor thread) -----------------------------------------

    def _supervise(self) -> None:
        """Crashes, restarts with back-off, image pulls and readiness probes, every 0.2 s."""
        last_probe = 0.0
        while not self._stopping.wait(0.2):
            probes: dict[Path, bool] = {}
            probe_now = time.monotonic() - last_probe >= PROBE_PERIOD_S
            if probe_now:
                last_probe = time.monotonic()
            with self._lock:
                keys = list(self._ctrs)
            for key in keys:
                with self._lock:
                    rec = self._ctrs.get(key)
                if rec is None:
                    continue
                netns = self.netns.get(key)
                if not rec.adopted and netns is not None:
                    rec.adopted = True
                    for ctr in rec.ctrs:
                        self._adopt(ctr, netns)
                for ctr in rec.ctrs:
                    try:
                        self._step(key, rec, ctr, probes if probe_now else None)
                    except Exception:  # one container's trouble must not stop the others
                        if self._stopping.is_set():
                            return
                        with open(self.work / "kubelet.log", "a") as log:
                            log.write(f"{key} {ctr.name}: {traceback.format_exc()}\n")
                self._publish(key)

    def _step(
        self, key: tuple[str, str], rec: PodRecord, ctr: Ctr, probes: dict[Path, bool] | None
    ) -> None:
        mono = time.monotonic()
        waiting = ctr.state.get("waiting", {}).get("reason", "")
        if "running" in ctr.state:
            if ctr.lab is not None and not self._alive(ctr):
                code = self.exits.code(ctr.pid)
                ctr.gone_since = ctr.gone_since or mono
                if code is None and mono - ctr.gone_since < 2:
                    return  # the exit event is on its way
                self._crashed(key, rec, ctr, 255 if code is None else code)
                return
            if ctr.probe is not None and probes is not None:
                if ctr.probe not in probes:
                    probes[ctr.probe] = bird_established(ctr.probe)
                ctr.ready = probes[ctr.probe]
            elif ctr.probe is None:
                ctr.ready = True
        elif waiting == "CrashLoopBackOff" and mono >= ctr.due:
            self._restart(key, ctr)
        elif waiting in ("ErrImagePull", "ImagePullBackOff") and mono >= ctr.due:
            if ctr.image not in self.bad_images:
                ctr.state = {"running": {"startedAt": now()}}
                ctr.started, ctr.ever_ran, ctr.ready = now(), True, ctr.probe is None
            elif waiting == "ErrImagePull":
                msg = f'Back-off pulling image "{ctr.image}"'
                ctr.state = {"waiting": {"reason": "ImagePullBackOff", "message": msg}}
                ctr.due = mono + 2 * PULL_RETRY_S
            else:
                ctr.state = {"waiting": {"reason": "ErrImagePull", "message": _pull_error(ctr)}}
                ctr.due = mono + PULL_RETRY_S

    def _alive(self, ctr: Ctr) -> bool:
        assert ctr.lab is not None and ctr.directory is not None
        key = f"{ctr.directory}/{ctr.lab.pod}/{ctr.lab.name}"
        return alive_and_ours(ctr.pid, ctr.directory, key)

    def _crashed(self, key: tuple[str, str], rec: PodRecord, ctr: Ctr, status: int) -> None:
        """PID 1 is gone: keep this instance's log, report it terminated, back off."""
        signo = status & 0x7F
        code = 128 + signo if signo else status >> 8
        saved = self.work / f"{key[0]}_{key[1]}_{ctr.name}.{ctr.restarts}.log"
        data = b""
        if ctr.log is not None and ctr.log.exists():
            data = ctr.log.read_bytes()[ctr.offset :]
        saved.write_bytes(data)
        ctr.instances[ctr.cid] = saved
        ctr.last = {
            "terminated": {
                "exitCode": code,
                "reason": "Completed" if code == 0 else "Error",
                "startedAt": ctr.started,
                "finishedAt": now(),
                "containerID": ctr.cid,
            }
        }
        delay = self.backoff[min(ctr.crashes, len(self.backoff) - 1)]
        ctr.crashes += 1
        ctr.ready, ctr.gone_since = False, 0.0
        ctr.due = time.monotonic() + delay
        ctr.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {delay:g}s restarting failed container={ctr.name} "
                f"pod={key[1]}_{key[0]}({rec.uid})",
            }
        }

    def _restart(self, key: tuple[str, str], ctr: Ctr) -> None:
        """The back-off is over: start the container again (only while its pod is there)."""
        assert ctr.lab is not None and ctr.directory is not None
        try:
            pod = self._core.read_namespaced_pod(key[1], key[0])
        except k8s_client.ApiException:
            return
        if pod.metadata.deletion_timestamp or not Path(f"/run/netns/{ctr.lab.netns}").exists():
            return
        # The lab's pod may stand behind several of our pods (one per namespace): the first
        # to restart it starts it, the others find it running.
        ctr.offset = ctr.log.stat().st_size if ctr.log is not None and ctr.log.exists() else 0
        found = find_container(ctr.lab.netns, ctr.lab.name)
        if found is not None and found[0] != ctr.pid:
            pid = found[0]
        else:
            (pid,) = start_containers([ctr.lab], ctr.directory, self.python)
        self.exits.watch(pid)
        ctr.pid = pid
        ctr.restarts += 1
        ctr.cid = f"containerd://{pod.metadata.uid[:8]}-{ctr.name}-{ctr.restarts}"
        ctr.started = now()
        ctr.state = {"running": {"startedAt": ctr.started}}
        ctr.ready = ctr.probe is None

    def expire_backoffs(self) -> None:
        """Every container waiting in CrashLoopBackOff restarts now (the test's hand on time)."""
        with self._lock:
            for rec in self._ctrs.values():
                for ctr in rec.ctrs:
                    ctr.due = 0.0

    def _container_log(self, key: tuple[str, str], name: str, previous: bool) -> bytes | str | None:
        """The log the kubelet's validateContainerLogStatus picks (bytes), an error, or None."""
        with self._lock:
            rec = self._ctrs.get(key)
            ctr = next((c for c in rec.ctrs if c.name == name), None) if rec else None
        if ctr is None:
            return None
        last = ctr.last.get("terminated")
        if previous:
            if not last:
                return f'previous terminated container "{name}" in pod "{key[1]}" not found'
            return ctr.instances[last["containerID"]].read_bytes()
        if "running" in ctr.state:
            if ctr.log is None or not ctr.log.exists():
                return b""
            return ctr.log.read_bytes()[ctr.offset :]
        if last:
            return ctr.instances[last["containerID"]].read_bytes()
        reason = ctr.state.get("waiting", {}).get("reason", "")
        why = {
            "ErrImagePull": "image can't be pulled",
            "ImagePullBackOff": "trying and failing to pull image",
        }.get(reason, reason)
        return f'container "{name}" in pod "{key[1]}" is waiting to start: {why}'

    # --- the scheduler's one job here ------------------------------------------------------------

    def _schedule(self, pod: dict[str, Any]) -> None:
        """Bind a pod without a node to a Node its nodeSelector matches, or say why none fits."""
        meta = pod["metadata"]
        want = pod["spec"].get("nodeSelector") or {}
        nodes = self._core.list_node().items
        fits = [
            n.metadata.name
            for n in nodes
            if n.metadata.name in self.nodes
            and all((n.metadata.labels or {}).get(k) == v for k, v in want.items())
        ]
        if fits:
            body = {"metadata": {"name": meta["name"]}, "target": {"kind": "Node", "name": fits[0]}}
            with contextlib.suppress(k8s_client.ApiException):
                self._core.create_namespaced_binding(
                    meta["namespace"], body, _preload_content=False
                )
            return
        n = len(nodes)
        msg = (
            f"0/{n} nodes are available: {n} node(s) didn't match Pod's node affinity/selector. "
            f"preemption: 0/{n} nodes are available: {n} Preemption is not helpful for scheduling."
        )
        cond = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": msg,
            "lastProbeTime": None,
            "lastTransitionTime": now(),
        }
        self._patch_status((meta["namespace"], meta["name"]), {"conditions": [cond]})

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
        if image in self.stuck_images or image in self.bad_images:
            # A kubelet's status manager writes what it sees when it syncs: ContainerCreating
            # only while the start takes time (an image to pull); a container that starts at
            # once is first written running (48 agents: 48 PATCHes and their events fewer).
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
        found = await self._to_thread(self._target_of, key, netns, target) if target else None
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
        await _exited(proc)
        code = proc.wait()
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

    def _target_of(self, key: tuple[str, str], netns: str, target: str) -> tuple[int, Path] | None:
        """(PID 1, shm directory) of the target container, as a container runtime knows it.

        The adopted record's; a scan of /proc (every process's namespace: slow with a
        few labs on the host) only before the supervisor adopted the pod's containers.
        """
        with self._lock:
            rec = self._ctrs.get(key)
            ctr = next((c for c in rec.ctrs if c.name == target), None) if rec else None
        if ctr and ctr.lab is not None and ctr.directory is not None and self._alive(ctr):
            return ctr.pid, shm_dir(ctr.directory, ctr.lab.pod)
        return find_container(netns, LAB_CONTAINER.get(target, target))

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
        previous = request.query.get("previous") in ("true", "1")
        found = await self._to_thread(self._container_log, key, container, previous)
        if isinstance(found, str):
            return web.Response(status=400, text=found)
        if isinstance(found, bytes):
            return web.Response(body=self._cut(found, request), content_type="text/plain")
        path = self.log_path(key, container)
        if not path.exists():
            return web.Response(
                status=404, text=f'container "{container}" in pod "{key[1]}" has no log'
            )
        raw = path.read_bytes()
        data = self._cut(raw, request)
        follow = request.query.get("follow") in ("true", "1")
        if not follow:
            return web.Response(body=data, content_type="text/plain")
        # Follow from the end of what was read, not from the file's size after the awaits
        # below: lines written meanwhile (an agent's certificate) would be skipped for good.
        pos = len(raw)
        limit = int(request.query.get("limitBytes", "0") or 0)
        left = limit - len(data) if limit else -1  # bytes still allowed; -1: no limit
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        await resp.write(data)
        proc = self.procs.get((key[0], key[1], container))
        while proc is not None and proc.poll() is None and left != 0:
            await asyncio.sleep(0.2)
            if request.transport is None or request.transport.is_closing():
                break  # the reader went away (a kubelet notices; this loop would poll on)
            with open(path, "rb") as f:
                f.seek(pos)
                more = f.read()
            if more:
                pos += len(more)
                if left > 0:
                    more, left = more[:left], max(left - len(more), 0)
                await resp.write(more)
        return resp

    @staticmethod
    def _cut(data: bytes, request: web.Request) -> bytes:
        tail = request.query.get("tailLines")
        if tail:
            data = b"".join(data.splitlines(keepends=True)[-int(tail) :])
        limit = int(request.query.get("limitBytes", "0") or 0)
        return data[:limit] if limit else data

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


async def _exited(proc: subprocess.Popen[bytes]) -> None:
    """Until ``proc`` exits, woken by its pidfd (no polling: 48 agents made 480 wakeups/s)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:  # already reaped
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


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
