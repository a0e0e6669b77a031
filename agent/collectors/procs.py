"""Processes and sockets of the pod, as psutil sees them from inside its netns.

Why a netns filter: the agent shares the pod's network namespace, but not
always a PID namespace that limits what /proc shows. As an ephemeral
container (a cluster, ``--lab``: agent/ephemeral.py) it shares only its
target container's PID namespace, and /proc shows that container's
processes; a bare ``--netns`` agent sits in the host's PID namespace, where
psutil lists every process on the machine, including the bird and nfqlb of
*other* pods. A process belongs to "this pod" when its ``/proc/PID/ns/net``
is the agent's own network namespace; the agent itself is left out (it is
not part of the pod being debugged). Processes of the pod's *other*
containers are not visible at all: the nfqlb collector reads those through
what the pod shares instead.

Sockets need no filter: sock_diag and ``/proc/net/unix`` answer only the
reader's network namespace (collectors/sockdiag.py says why not psutil's
``/proc/net/tcp``); owners are the processes above.

The bird and nfqlb collectors find their daemons through
``processes_in_own_netns`` as well, and run their read-only helper commands
through ``run_readonly`` (argv list, no shell, always a timeout).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from meridio_debug.agent.collectors import sockdiag
from meridio_debug.agent.errors import CollectorError
from meridio_debug.protos import agent_pb2 as pb

PROC = "/proc"
DEFAULT_TIMEOUT_S = 5.0


# --------------------------------------------------------------------------
# network-namespace membership


def netns_inode(pid: int | str = "self", proc: str = PROC) -> int | None:
    """Inode of a process's network namespace, None when it cannot be read.

    Reading another process's ``ns/net`` needs ptrace read access (same user
    or CAP_SYS_PTRACE); an unreadable one is reported as unknown, not guessed.
    """
    try:
        return os.stat(f"{proc}/{pid}/ns/net").st_ino
    except OSError:
        return None


def netns_denied(pid: int, proc: str = PROC) -> bool:
    """True only when reading ``pid``'s ns/net is refused (EACCES/EPERM), not when it is gone."""
    try:
        os.stat(f"{proc}/{pid}/ns/net")
    except PermissionError:
        return True
    except OSError:
        return False
    return False


def select_same_netns(
    candidates: Iterable[tuple[int, int | None]], own_inode: int | None, own_pid: int
) -> list[int]:
    """Pids (in input order) whose netns inode equals ``own_inode``, minus ``own_pid``.

    Unknown inodes (None) are excluded: on a host, including them would pull in
    processes of unrelated namespaces.
    """
    if own_inode is None:
        return []
    return [pid for pid, ino in candidates if ino == own_inode and pid != own_pid]


_scan = threading.local()


@contextlib.contextmanager
def one_scan() -> Iterator[None]:
    """Within this block (one snapshot), the namespace's pids are read from /proc once.

    Four collectors (processes, sockets, bird, nfqlb) each need "the processes of
    this netns"; on a node that is a stat of every pid's ns/net, ~500 per scan
    here and thousands on a real node, for an answer that does not change within
    one snapshot. Thread-local, so concurrent snapshots never share a scan.
    """
    outer = getattr(_scan, "cache", None)
    _scan.cache = {} if outer is None else outer
    try:
        yield
    finally:
        _scan.cache = outer


def pids_in_own_netns(proc: str = PROC) -> list[int]:
    """Pids of the processes that share the agent's network namespace (agent excluded)."""
    cache: dict[str, list[int]] | None = getattr(_scan, "cache", None)
    if cache is not None and proc in cache:
        return list(cache[proc])
    own = netns_inode("self", proc)
    if own is None:
        raise CollectorError(f"cannot read {proc}/self/ns/net: is /proc mounted?")
    pids = sorted(psutil.pids())
    found = select_same_netns(((pid, netns_inode(pid, proc)) for pid in pids), own, os.getpid())
    if cache is not None:
        cache[proc] = list(found)
    return found


def processes_in_own_netns(proc: str = PROC) -> list[psutil.Process]:
    """psutil handles for the processes of this pod's network namespace (agent excluded)."""
    out: list[psutil.Process] = []
    for pid in pids_in_own_netns(proc):
        try:
            out.append(psutil.Process(pid))
        except psutil.Error:
            continue  # exited in between
    return out


def process_argv(p: psutil.Process) -> list[str]:
    """A process's command line, [] when it cannot be read (kernel thread, gone, denied)."""
    try:
        return list(p.cmdline())
    except psutil.Error:
        return []


def process_name(p: psutil.Process) -> str:
    try:
        return str(p.name())
    except psutil.Error:
        return ""


def is_program(p: psutil.Process, program: str) -> bool:
    """True when ``p`` runs ``program`` (by comm name or by argv[0] basename)."""
    if process_name(p) == program:
        return True
    argv = process_argv(p)
    return bool(argv) and os.path.basename(argv[0]) == program


def find_program(program: str, proc: str = PROC) -> list[psutil.Process]:
    """Processes running ``program`` in our network namespace, lowest pid first.

    When none is found but some process running ``program`` has a network
    namespace the agent cannot read, that is an error, not an absence: saying
    "no bird here" when the agent merely lacks SYS_PTRACE would send the user
    looking in the wrong place.
    """
    found = [p for p in processes_in_own_netns(proc) if is_program(p, program)]
    if found:
        return found
    hidden = []
    for pid in sorted(psutil.pids()):
        # Only a namespace we may not read hides a process; one that vanished or is a
        # zombie (its ns links are gone: ENOENT) while we looked hides nothing.
        if pid == os.getpid() or not netns_denied(pid, proc):
            continue
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE and is_program(p, program):
                hidden.append(pid)
    if hidden:
        raise CollectorError(
            f"{program} runs (pid {', '.join(map(str, hidden))}) but the agent cannot read "
            f"{proc}/PID/ns/net to tell whether it is in this pod's network namespace: "
            "give the agent SYS_PTRACE (profile netadmin) or run it privileged"
        )
    return []


# --------------------------------------------------------------------------
# read-only subprocesses


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def run_readonly(
    argv: Sequence[str],
    timeout: float = DEFAULT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
) -> CommandResult:
    """Run a read-only helper command: argv list, no shell, bounded by ``timeout``.

    Raises FileNotFoundError/PermissionError (from exec) unchanged so callers
    can say which tool is missing; a timeout becomes a CollectorError.
    """
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
        )
    except subprocess.TimeoutExpired as exc:
        raise CollectorError(f"{' '.join(argv)}: no answer within {timeout:g} s") from exc
    return CommandResult(
        argv=tuple(argv),
        returncode=done.returncode,
        stdout=done.stdout.decode("utf-8", "replace"),
        stderr=done.stderr.decode("utf-8", "replace"),
    )


# --------------------------------------------------------------------------
# processes section


def process_to_pb(info: Mapping[str, Any]) -> pb.Process:
    """Convert one psutil ``Process.info``-style dict to the proto (missing values: defaults)."""
    msg = pb.Process(pid=int(info.get("pid") or 0))
    msg.ppid = int(info.get("ppid") or 0)
    msg.name = str(info.get("name") or "")
    msg.cmdline.extend(str(a) for a in (info.get("cmdline") or ()))
    msg.exe = str(info.get("exe") or "")
    msg.user = str(info.get("username") or "")
    mem = info.get("memory_info")
    rss = getattr(mem, "rss", None)
    if rss is not None:
        msg.rss_mb = float(rss) / (1024.0 * 1024.0)
    msg.create_time = float(info.get("create_time") or 0.0)
    return msg


_PROCESS_ATTRS = ["pid", "ppid", "name", "cmdline", "exe", "username", "memory_info", "create_time"]


class ProcessesCollector:
    """Section ``processes``: every process in the pod's network namespace but the agent."""

    name = "processes"

    def __init__(self, proc: str = PROC) -> None:
        self._proc = proc

    def available(self) -> tuple[bool, str]:
        if netns_inode("self", self._proc) is None:
            return False, f"cannot read {self._proc}/self/ns/net"
        return True, "psutil, filtered to this network namespace"

    def collect(self, snap: pb.Snapshot) -> None:
        for p in processes_in_own_netns(self._proc):
            try:
                info = p.as_dict(attrs=_PROCESS_ATTRS, ad_value=None)
            except psutil.NoSuchProcess:
                continue
            snap.processes.append(process_to_pb(info))


# --------------------------------------------------------------------------
# sockets section


_FAMILIES: dict[int, str] = {
    socket.AF_INET: "inet",
    socket.AF_INET6: "inet6",
    socket.AF_UNIX: "unix",
}
_INET_TYPES: dict[int, str] = {
    socket.SOCK_STREAM: "tcp",
    socket.SOCK_DGRAM: "udp",
    socket.SOCK_RAW: "raw",
}
_UNIX_TYPES: dict[int, str] = {
    socket.SOCK_STREAM: "stream",
    socket.SOCK_DGRAM: "dgram",
    socket.SOCK_SEQPACKET: "seqpacket",
}


class SocketsCollector:
    """Section ``sockets``: TCP, UDP and unix sockets of the namespace, with owners.

    The namespace's sockets are read once per snapshot (collectors/sockdiag.py:
    sock_diag for TCP/UDP, ``/proc/net/unix``) and tied to their owners by the
    socket inodes in the fds of this namespace's processes (plus the agent).
    ``psutil.net_connections()`` would map inodes to owners by walking the fd
    table of every process on the node (276 ms per pod measured on a 48-pod
    lab), and psutil's per-process ``Process.net_connections`` re-reads the
    node-wide ``/proc/net/tcp`` for each process (~11 ms of CPU each here): both
    grow with the node, not the pod. A socket no process of this namespace holds
    (a descriptor passed to another namespace, TIME_WAIT) is not listed, as before.
    """

    name = "sockets"

    def available(self) -> tuple[bool, str]:
        if not os.path.exists(f"{PROC}/net/unix"):
            return False, f"{PROC}/net/unix missing"
        return True, "sock_diag netlink (TCP, UDP), /proc/net/unix; owners from /proc/PID/fd"

    def collect(self, snap: pb.Snapshot) -> None:
        owners: dict[int, int] = {}
        names: dict[int, str] = {}
        for pid in [os.getpid(), *pids_in_own_netns()]:
            try:
                inodes = sockdiag.socket_inodes(pid, PROC)
                names[pid] = psutil.Process(pid).name() if inodes else ""
            except psutil.NoSuchProcess:
                continue  # exited in between
            except (PermissionError, psutil.AccessDenied) as exc:
                raise CollectorError(f"sockets of pid {pid}: access denied ({exc})") from exc
            for inode in inodes:
                owners.setdefault(inode, pid)
        for raw in [*sockdiag.inet_sockets(), *sockdiag.unix_sockets(PROC)]:
            owner = owners.get(raw.inode)
            if owner is None:
                continue
            snap.sockets.append(
                pb.Socket(
                    family=_FAMILIES.get(raw.family, str(raw.family)),
                    type=(_UNIX_TYPES if raw.family == socket.AF_UNIX else _INET_TYPES).get(
                        raw.type, str(raw.type)
                    ),
                    laddr=raw.laddr,
                    lport=raw.lport,
                    raddr=raw.raddr,
                    rport=raw.rport,
                    status=raw.status,
                    pid=owner,
                    process=names.get(owner, ""),
                )
            )
