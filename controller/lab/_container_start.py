"""Start the lab's containers: one forking helper, the standard library only.

Why a separate script: ``lab up`` starts every container of the lab at once
(92 of them for a 4x4x10 lab). A container here is what a Kubernetes runtime
makes of one: the pod's network namespace, its own PID namespace whose PID 1
is the container's program, its own mount namespace with /proc (and /sys)
remounted for those namespaces and the pod's /dev/shm (one host directory per
pod, as containerd's sandbox shm) bound on /dev/shm. ``unshare(1)`` cannot
bind a directory between entering the namespaces and exec'ing the program,
and a shell would be the only way to chain it; this helper does it with the
system calls, single-threaded (so ``fork`` is safe), and is started with
``python -I -S`` (no site, no package imports: ~20 ms) once per ``lab up``
instead of once per container.

Per container: fork; the child joins the pod's netns and unshares PID and
mount namespaces, makes its mounts private and forks PID 1; PID 1 mounts
/proc, /sys and /dev/shm, starts a session, points stdout/stderr at the
container's log and execs the program. An exec failure comes back through a
close-on-exec pipe, so the caller gets "cannot run ...: No such file" instead
of a container that died silently. The intermediate child exits at once:
PID 1 is then a child of the host's init, and outlives ``lab up``.

Input (stdin): a JSON list of ``{"netns", "exe", "argv", "env", "log",
"shm"}``. Output (stdout): a JSON list, per container ``{"pid": HOST_PID}``
or ``{"error": "one line"}``.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from typing import Any

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

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            None,
        ),
        f"mount {target}",
    )


def _pid1(c: dict[str, Any], err_w: int) -> None:
    """PID 1 of the new container: mounts, stdio, exec. Never returns."""
    try:
        os.setsid()
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        _mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        if c.get("shm"):
            _mount(c["shm"], "/dev/shm", None, MS_BIND)
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(c["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.chdir("/")
        os.execve(c["exe"], c["argv"], c["env"])
    except BaseException as exc:  # the parent reads this line instead of an exit status
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
        os.write(err_w, f"cannot run {c.get('exe')}: {reason}".encode()[:1000])
    os._exit(127)


def _intermediate(c: dict[str, Any], out_w: int) -> None:
    """Join the pod, unshare, fork PID 1, report its host pid. Never returns."""
    try:
        fd = os.open(c["netns"], os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.setns(fd, CLONE_NEWNET), f"setns {c['netns']}")
        finally:
            os.close(fd)
        _check(_libc.unshare(CLONE_NEWPID | CLONE_NEWNS), "unshare pid+mount")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing leaks back to the host
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(err_r)
            _pid1(c, err_w)
        os.close(err_w)
        chunks = []
        while chunk := os.read(err_r, 1024):
            chunks.append(chunk)
        error = b"".join(chunks).decode(errors="replace")
        reply: dict[str, Any] = {"error": error} if error else {"pid": pid}
    except OSError as exc:
        reply = {"error": str(exc)}
    os.write(out_w, json.dumps(reply).encode())
    os._exit(0)


def launch(c: dict[str, Any]) -> tuple[int, int]:
    """Fork the intermediate child of one container; (its pid, the pipe its answer comes on)."""
    out_r, out_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(out_r)
        _intermediate(c, out_w)
    os.close(out_w)
    return child, out_r


def answer(child: int, out_r: int) -> dict[str, Any]:
    """The container's PID 1 host pid, or an error, once its intermediate child is done."""
    chunks = []
    while chunk := os.read(out_r, 4096):
        chunks.append(chunk)
    os.close(out_r)
    os.waitpid(child, 0)
    try:
        reply: dict[str, Any] = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        reply = {}
    return reply if reply else {"error": "container start helper died"}


def main() -> int:
    containers = json.load(sys.stdin)
    sys.stdout.flush()
    # All intermediates first, then the answers: the containers start concurrently
    # (93 of a 4x4x10 lab: 1.3 s one after the other).
    started = [launch(c) for c in containers]
    replies = [answer(child, out_r) for child, out_r in started]
    sys.stdout.write(json.dumps(replies) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
