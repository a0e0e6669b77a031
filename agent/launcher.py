"""``python -m meridio_debug.agent.launcher``: a fork server for local agents.

Why: on this host the local runtime needs one agent per network namespace,
and starting a Python agent costs ~0.2 s of CPU (interpreter, grpc, protobuf,
psutil imports) before it serves. With 49 pods on 2 cores that alone is
seconds. The launcher pays the imports once, then forks one child per
pod; the child joins it the way the kubelet starts an ephemeral container
(agent/ephemeral.py): the pod's network namespace, the target container's
PID namespace when one is named, a mount namespace of its own with /proc,
/sys and the pod's /dev/shm; the host's files stay visible, so its unix
socket is reachable from the controller. Then it runs the ordinary agent
``main()``. The launcher creates no gRPC channel or server and runs no
thread, so forking it (and switching the PID namespace of its next child)
is safe.

Arguments: the controller's private directories, removed with the children's.
Protocol: JSON lines. The controller writes requests on stdin, the launcher
answers on stdout:

    {"id": "1", "netns": "/run/netns/x", "log": "/tmp/.../agent.log",
     "args": ["--listen", "unix:/tmp/.../agent.sock", ...],
     "target_pid": 1234, "shm": "/run/.../shm/pod", "container": "frontend",
     "pod_containers": ["stateless-lb", "frontend"]}     (the last four optional)
        -> {"id": "1", "pid": 1234} | {"id": "1", "error": "one line"}
    {"id": "2", "snapshot": ["links", ...], "out": "/tmp/.../7.snapshot",
     "netns": ..., "log": ..., (target fields as above)}
        -> {"id": "2", "pid": 1235}     a one-shot agent: it writes one Snapshot
                                        message to "out" and exits 0 (snapshot_child)
    {"id": "3", "signal": 15, "pid": 1234}
        -> {"id": "3", "ok": true} | {"id": "3", "error": "..."}
    (unsolicited, for every child that ends)
        -> {"exited": 1234, "code": 0}

Signals go through the launcher because only the parent knows whether the
pid is still its unreaped child (a pid the controller signals itself could
have been reused). When stdin closes -- the controller is done, or died --
every child gets SIGTERM, then SIGKILL after a grace period, the children's
working directories (``meridio-debug-agent-*``, where their socket and log
are) are removed, and the launcher exits: nothing outlives the controller,
not even after ``kill -9`` of it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meridio_debug.agent.collectors import SECTIONS
from meridio_debug.agent.ephemeral import (
    POD_CONTAINERS_ENV,
    TARGET_CONTAINER_ENV,
    become_ephemeral,
    fork_into,
)

WORKDIR_PREFIX = "meridio-debug-agent-"  # controller/runtime/local.py makes them
GRACE_S = 3.0


def preload() -> None:
    """Import everything an agent imports while serving, so children start warm."""
    from meridio_debug.agent import capture, main, probe, server, watch  # noqa: F401
    from meridio_debug.agent.collectors import (  # noqa: F401
        bird,
        netlink,
        nfqlb,
        nftables,
        procs,
        registry,
        sysctls,
    )
    from meridio_debug.agent.rtnl import precompile
    from meridio_debug.protos import agent_pb2_grpc, probe_pb2_grpc  # noqa: F401

    precompile()  # pyroute2's attribute tables, compiled once for every child
    nftables.libnftables()  # dlopen once, not per child

    # libpcap (the capture filter compiler) is found with ldconfig/gcc subprocesses:
    # once here rather than in every agent's first capture. Absent: that agent says so.
    capture.preload_libpcap()


@dataclass(frozen=True)
class Target:
    """Which container of the pod the agent joins like an ephemeral container (all optional)."""

    pid: int | None = None  # a pid (host) of the target container: its PID namespace
    shm: str | None = None  # the host directory that is the pod's /dev/shm
    container: str = ""  # the target container's name
    pod_containers: tuple[str, ...] = field(default=())

    @classmethod
    def from_request(cls, req: dict[str, Any]) -> Target:
        pid = req.get("target_pid")
        return cls(
            pid=int(pid) if pid is not None else None,
            shm=str(req["shm"]) if req.get("shm") else None,
            container=str(req.get("container") or ""),
            pod_containers=tuple(str(c) for c in req.get("pod_containers") or ()),
        )


_WAKE_FDS: list[int] = []  # the launcher's SIGCHLD pipe: closed in each forked child


def _detach(log_path: str) -> None:
    """In a forked child: own session, default signals, stdio to /dev/null and the log."""
    os.setsid()
    signal.set_wakeup_fd(-1)  # the launcher's SIGCHLD pipe is not ours
    for fd in _WAKE_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDWR)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own stdio
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def _join(netns_fd: int, target: Target) -> bool:
    """Join the pod like an ephemeral container (agent/ephemeral.py); False, said on stderr, if not."""
    try:
        become_ephemeral(netns_fd, shm=target.shm, remount=target.pid is not None)
    except OSError as exc:
        print(f"meridio-debug-agent: cannot join the pod: {exc}", file=sys.stderr)
        return False
    finally:
        os.close(netns_fd)
    if target.container:
        os.environ[TARGET_CONTAINER_ENV] = target.container
    if target.pod_containers:
        os.environ[POD_CONTAINERS_ENV] = ",".join(target.pod_containers)
    return True


def child(netns_fd: int, log_path: str, args: Sequence[str], target: Target = Target()) -> int:
    """In the forked child: detach, redirect, join the pod, run the agent."""
    _detach(log_path)
    if not _join(netns_fd, target):
        return 1
    from meridio_debug.agent.main import main

    return main(list(args))


def snapshot_child(
    netns_fd: int, log_path: str, out_path: str, sections: Sequence[str], target: Target
) -> int:
    """In the forked child: join the pod, write one Snapshot to ``out_path``, and end.

    A one-shot agent: the same collectors and the same answer as the Snapshot RPC
    (AgentService.take_snapshot), without a gRPC server, event loop, threads or
    argument parsing, which were ~3/4 of an agent's CPU when a command needed
    nothing but the snapshot (bench/analyze_bench.py). Nothing listens, so nobody
    else can use it; the file is created 0600 in the controller's private directory.
    """
    _detach(log_path)
    if not _join(netns_fd, target):
        return 1
    gc.disable()  # lives for one snapshot: its garbage goes with the process
    from meridio_debug.agent.collectors.registry import default_collectors, watcher_factory
    from meridio_debug.agent.server import AgentService

    data = AgentService(default_collectors, watcher_factory()).take_snapshot(sections)
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data.SerializeToString())
    return 0


class Launcher:
    """The fork server's state: live children, and where answers go."""

    def __init__(self, write: Callable[[dict[str, Any]], None]) -> None:
        self._write = write
        self.children: set[int] = set()
        self.workdirs: set[str] = set()  # removed when the launcher stops

    def handle(self, line: str) -> None:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            self._write({"id": "", "error": f"bad request line ({exc}): {line[:80]!r}"})
            return
        rid = str(req.get("id", ""))
        try:
            if "signal" in req:
                self._signal(int(req["pid"]), int(req["signal"]))
                self._write({"id": rid, "ok": True})
            else:
                self._write({"id": rid, "pid": self._start(req)})
        except (KeyError, TypeError, ValueError) as exc:
            self._write({"id": rid, "error": f"malformed request: {exc!r}"})
        except OSError as exc:
            self._write({"id": rid, "error": str(exc)})

    def _start(self, req: dict[str, Any]) -> int:
        """Fork the child a request asks for: a one-shot snapshot, or a serving agent."""
        target = Target.from_request(req)
        netns, log = str(req["netns"]), str(req["log"])
        if "snapshot" in req:
            sections = [str(x) for x in req["snapshot"]]
            unknown = sorted(set(sections) - set(SECTIONS))
            if unknown:
                raise ValueError(f"unknown section(s) {', '.join(unknown)}")
            out = str(req["out"])
            return self._fork(
                netns, log, lambda fd, lg: snapshot_child(fd, lg, out, sections, target), target
            )
        args = [str(a) for a in req["args"]]
        return self._fork(netns, log, lambda fd, lg: child(fd, lg, args, target), target)

    def _fork(
        self, netns: str, log_path: str, run: Callable[[int, str], int], target: Target
    ) -> int:
        """Fork a child into ``target``'s PID namespace that runs ``run(netns_fd, log)``."""
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = fork_into(target.pid)
            if pid == 0:  # pragma: no cover - the child never returns here
                code = 1
                try:
                    code = run(fd, log_path)
                except SystemExit as exc:  # argparse's usage errors
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException as exc:
                    with contextlib.suppress(Exception):
                        print(f"meridio-debug-agent: {exc!r}", file=sys.stderr)
                finally:
                    with contextlib.suppress(Exception):
                        sys.stderr.flush()
                    os._exit(code)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.children.add(pid)
        workdir = os.path.dirname(log_path)
        if os.path.basename(workdir).startswith(WORKDIR_PREFIX):
            self.workdirs.add(workdir)
        return pid

    def _signal(self, pid: int, sig: int) -> None:
        if pid not in self.children:
            raise ValueError(f"pid {pid} is not a live agent of this launcher")
        os.kill(pid, sig)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self._write({"exited": pid, "code": os.waitstatus_to_exitcode(status)})

    def stop_all(self, grace: float = GRACE_S) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.02)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.children:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.children.discard(pid)
        for workdir in self.workdirs:
            shutil.rmtree(workdir, ignore_errors=True)
        self.workdirs.clear()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve requests until stdin closes; ``argv``: the caller's private directories.

    Those directories (``meridio-debug-agent-*`` only) are removed at the end like the
    children's, so a controller killed before it forked anything leaves none behind.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller decides when we stop
    preload()
    gc.freeze()  # what the children inherit stays shared: the collector never touches it
    out = sys.stdout

    def write(msg: dict[str, Any]) -> None:
        try:
            out.write(json.dumps(msg) + "\n")
            out.flush()
        except BrokenPipeError:
            pass

    launcher = Launcher(write)
    for workdir in sys.argv[1:] if argv is None else argv:
        if os.path.basename(workdir).startswith(WORKDIR_PREFIX):
            launcher.workdirs.add(workdir)
    stdin = sys.stdin.fileno()
    # A child's end wakes the loop at once (its exit is what a one-shot snapshot waits
    # for), instead of at the next 50 ms poll: a pipe written by the SIGCHLD handler.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _WAKE_FDS[:] = [wake_r, wake_w]
    signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
    signal.set_wakeup_fd(wake_w)
    buf = b""
    write({"ready": os.getpid()})
    try:
        while True:
            readable, _, _ = select.select([stdin, wake_r], [], [], 1.0)
            if wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
            launcher.reap()
            if stdin not in readable:
                continue
            chunk = os.read(stdin, 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    launcher.handle(line.decode(errors="replace"))
    finally:
        launcher.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
