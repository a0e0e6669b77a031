"""Join a pod the way the kubelet starts an ephemeral container with ``targetContainerName``.

Why: a real agent runs as an ephemeral container. It shares the pod's network
namespace and *only the target container's* PID namespace (the pod does not
share processes between containers), and it has a mount namespace of its own
in which /proc shows that PID namespace, /sys that network namespace and
/dev/shm is the pod's. If the local runtime and the tests let the agent see
more (the host's processes, the other containers' nfqlb), whatever the agent
concludes here could be wrong in a cluster and no test would notice
(issue 11: "nfqlb: ABSENT" in a real LB/FE pod although nfqlb runs).

How, with system calls (Linux, root):

1. In the parent: ``setns(/proc/TARGET/ns/pid, CLONE_NEWPID)`` changes the
   PID namespace of the parent's *next child* only; fork; then the parent
   returns to its own PID namespace (entering one's own active namespace is
   always allowed). The child is a member of the target's PID namespace and
   still the parent's child (it can be waited for and signalled by its pid).
2. In the child: ``setns`` into the pod's network namespace, ``unshare
   (CLONE_NEWNS)``, make every mount private (nothing propagates back), mount
   a fresh procfs on /proc (it shows the PID namespace of the process that
   mounts it: the target's), a sysfs on /sys (it shows the network namespace
   of the mounter: the pod's) and, when given, bind the pod's shm directory
   on /dev/shm. The rest of the host's file tree stays as it was, so a unix
   socket in a private directory still reaches the controller; in a cluster
   the agent image's root is there instead.

Use it from Python (the launcher forks every local agent this way)::

    pid = fork_into(target_pid)
    if pid == 0:
        become_ephemeral(netns_fd, shm="/run/.../shm/lb-fe-a")
        ...run the agent...

or as a program, for anything that starts one agent as a process (the stand-in
kubelet of tests/cluster does)::

    python -m meridio_debug.agent.ephemeral --netns /run/netns/NS \\
        --target-pid PID [--shm DIR] [--container NAME] -- AGENT ARGS...

which forks the agent into the target's PID namespace, relays SIGTERM/SIGINT
to it and exits with its exit code, like ``unshare --fork``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from collections.abc import Sequence

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

# The container the agent targets (its PID namespace), and the pod's containers
# when the runtime knows them: the collectors say where each section came from.
# (controller/runtime/k8s_spec.py sets the first in the ephemeral container's env.)
TARGET_CONTAINER_ENV = "MERIDIO_DEBUG_TARGET_CONTAINER"
POD_CONTAINERS_ENV = "MERIDIO_DEBUG_POD_CONTAINERS"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(fd: int, nstype: int) -> None:
    """Join the namespace behind ``fd`` (Python 3.11 has no os.setns)."""
    _check(_libc.setns(fd, nstype), "setns")


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            None,
        ),
        f"mount {fstype or source} on {target}",
    )


def fork_into(target_pid: int | None) -> int:
    """``os.fork()``, the child a member of ``target_pid``'s PID namespace (None: ours).

    Only the caller's *child* changes namespace: the parent switches back to
    its own before it returns (in the child that would fail: a process cannot
    go up to an ancestor namespace). Single-threaded callers only.
    """
    if target_pid is None:
        return os.fork()
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(f"/proc/{target_pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"target container pid {target_pid}: {exc.strerror}") from None
        try:
            setns(target, CLONE_NEWPID)
        finally:
            os.close(target)
        try:
            pid = os.fork()
        except BaseException:
            setns(own, CLONE_NEWPID)
            raise
        if pid != 0:
            setns(own, CLONE_NEWPID)
        return pid
    finally:
        os.close(own)


def become_ephemeral(netns_fd: int, *, shm: str | None = None, remount: bool = True) -> None:
    """In the forked child: join the pod's netns and take a mount namespace of our own.

    ``remount`` (when the child was forked into a target's PID namespace)
    mounts /proc and /sys for the namespaces the child is in now; ``shm`` is
    the host directory that is the pod's /dev/shm.
    """
    setns(netns_fd, CLONE_NEWNET)
    if not remount and not shm:
        return
    _check(_libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if remount:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        _mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if shm:
        _mount(shm, "/dev/shm", None, MS_BIND)


def main(argv: Sequence[str] | None = None) -> int:
    """One agent as an ephemeral container (see the module docstring); its exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m meridio_debug.agent.ephemeral",
        description="Run the agent in a pod like an ephemeral container with targetContainerName.",
    )
    parser.add_argument("--netns", required=True, help="the pod's network namespace file")
    parser.add_argument("--target-pid", type=int, help="a pid of the target container")
    parser.add_argument("--shm", help="the host directory that is the pod's /dev/shm")
    parser.add_argument("--container", default="", help="the target container's name")
    parser.add_argument("agent_args", nargs=argparse.REMAINDER, help="-- then the agent's args")
    args = parser.parse_args(argv)
    agent_args = args.agent_args[1:] if args.agent_args[:1] == ["--"] else args.agent_args
    netns_fd = os.open(args.netns, os.O_RDONLY | os.O_CLOEXEC)
    child = fork_into(args.target_pid)
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            become_ephemeral(netns_fd, shm=args.shm, remount=args.target_pid is not None)
            if args.container:
                os.environ[TARGET_CONTAINER_ENV] = args.container
            from meridio_debug.agent.main import main as agent_main

            code = agent_main(agent_args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:
            print(f"meridio-debug-agent: cannot join the pod: {exc}", file=sys.stderr)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(netns_fd)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: os.kill(child, s))
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
