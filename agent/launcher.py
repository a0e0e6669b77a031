"""``python -m meridio_debug.agent.launcher``: a fork server for local agents.

Why: on this host the local runtime needs one agent per network namespace,
and starting a Python agent costs ~0.2 s of CPU (interpreter, grpc, protobuf,
psutil imports) before it serves. With 49 pods on 2 cores that alone is
seconds. The launcher pays the imports once, then forks one child per
namespace; the child joins the namespace (``setns``: only the network
namespace changes, so the child still sees this host's files and its unix
socket is reachable from the controller) and runs the ordinary agent
``main()``. The launcher creates no gRPC channel or server and runs no
thread, so forking it is safe.

Protocol: JSON lines. The controller writes requests on stdin, the launcher
answers on stdout:

    {"id": "1", "netns": "/run/netns/x", "log": "/tmp/.../agent.log",
     "args": ["--listen", "unix:/tmp/.../agent.sock", ...]}
        -> {"id": "1", "pid": 1234} | {"id": "1", "error": "one line"}
    {"id": "2", "signal": 15, "pid": 1234}
        -> {"id": "2", "ok": true} | {"id": "2", "error": "..."}
    (unsolicited, for every child that ends)
        -> {"exited": 1234, "code": 0}

Signals go through the launcher because only the parent knows whether the
pid is still its unreaped child (a pid the controller signals itself could
have been reused). When stdin closes -- the controller is done, or died --
every child gets SIGTERM, then SIGKILL after a grace period, and the
launcher exits: nothing outlives the controller.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

CLONE_NEWNET = 0x40000000
GRACE_S = 3.0

_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Join the namespace behind ``fd`` (Python 3.11 has no os.setns)."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


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
    from meridio_debug.protos import agent_pb2_grpc, probe_pb2_grpc  # noqa: F401

    # libpcap (the capture filter compiler) is found with ldconfig/gcc subprocesses:
    # once here rather than in every agent's first capture. Absent: that agent says so.
    capture.preload_libpcap()


def child(netns_fd: int, log_path: str, args: Sequence[str]) -> int:
    """In the forked child: detach, redirect, join the namespace, run the agent."""
    os.setsid()
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
    try:
        setns(netns_fd)
    except OSError as exc:
        print(f"meridio-debug-agent: cannot join the network namespace: {exc}", file=sys.stderr)
        return 1
    finally:
        os.close(netns_fd)
    from meridio_debug.agent.main import main

    return main(list(args))


class Launcher:
    """The fork server's state: live children, and where answers go."""

    def __init__(self, write: Callable[[dict[str, Any]], None]) -> None:
        self._write = write
        self.children: set[int] = set()

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
                pid = self._spawn(str(req["netns"]), str(req["log"]), [str(a) for a in req["args"]])
                self._write({"id": rid, "pid": pid})
        except (KeyError, TypeError, ValueError) as exc:
            self._write({"id": rid, "error": f"malformed request: {exc!r}"})
        except OSError as exc:
            self._write({"id": rid, "error": str(exc)})

    def _spawn(self, netns: str, log_path: str, args: list[str]) -> int:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child never returns here
                code = 1
                try:
                    code = child(fd, log_path, args)
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


def main() -> int:
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
    stdin = sys.stdin.fileno()
    buf = b""
    write({"ready": os.getpid()})
    try:
        while True:
            readable, _, _ = select.select([stdin], [], [], 0.05)
            launcher.reap()
            if not readable:
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
