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

Sockets need no filter: ``/proc/net/*`` (what psutil reads) is already
scoped to the reader's network namespace. Only the pid of a socket's owner
is looked up machine-wide, which is harmless.

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
from typing import Any, Protocol

import psutil

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


class ConnLike(Protocol):
    """The fields of psutil's ``sconn`` that the conversion reads."""

    @property
    def family(self) -> int: ...
    @property
    def type(self) -> int: ...
    @property
    def laddr(self) -> Any: ...
    @property
    def raddr(self) -> Any: ...
    @property
    def status(self) -> str: ...
    @property
    def pid(self) -> int | None: ...


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


def _split_addr(addr: Any) -> tuple[str, int]:
    if not addr:
        return "", 0
    if isinstance(addr, str):
        return addr, 0
    ip = getattr(addr, "ip", None)
    port = getattr(addr, "port", None)
    if ip is None:
        ip, port = addr[0], addr[1]
    return str(ip), int(port or 0)


class _Owned:
    """A per-process connection (which has no pid) with its owner's pid."""

    def __init__(self, conn: Any, pid: int) -> None:
        self.family = conn.family
        self.type = conn.type
        self.laddr = conn.laddr
        self.raddr = conn.raddr
        self.status = conn.status
        self.pid = pid


def socket_to_pb(conn: ConnLike, names: Mapping[int, str]) -> pb.Socket:
    """Convert one psutil connection to the proto; ``names`` maps pid → process name."""
    family = int(conn.family)
    fam = _FAMILIES.get(family, str(family))
    types = _UNIX_TYPES if fam == "unix" else _INET_TYPES
    laddr, lport = _split_addr(conn.laddr)
    raddr, rport = _split_addr(conn.raddr)
    pid = int(conn.pid or 0)
    return pb.Socket(
        family=fam,
        type=types.get(int(conn.type), str(int(conn.type))),
        laddr=laddr,
        lport=lport,
        raddr=raddr,
        rport=rport,
        status=str(conn.status or "NONE"),
        pid=pid,
        process=names.get(pid, ""),
    )


class SocketsCollector:
    """Section ``sockets``: TCP, UDP and unix sockets of the namespace, with owners.

    Sockets are read per process, for the processes of this network namespace only
    (plus the agent). ``psutil.net_connections()`` would map socket inodes to owners
    by walking the fd table of every process on the node: with one agent per pod on
    a busy node that is the slowest part of a snapshot (276 ms per pod measured on a
    48-pod lab) and grows with the node, not the pod. A socket no process of this
    namespace holds (rare: a descriptor passed to another namespace) is not listed.
    """

    name = "sockets"

    def __init__(self, kind: str = "all") -> None:
        self._kind = kind

    def available(self) -> tuple[bool, str]:
        if not os.path.exists(f"{PROC}/net/tcp"):
            return False, f"{PROC}/net/tcp missing"
        return True, f"psutil Process.net_connections(kind={self._kind!r}) per process"

    def collect(self, snap: pb.Snapshot) -> None:
        names: dict[int, str] = {}
        seen: set[tuple[object, ...]] = set()
        for pid in [os.getpid(), *pids_in_own_netns()]:
            try:
                proc = psutil.Process(pid)
                conns = proc.net_connections(kind=self._kind)
                names[pid] = proc.name()
            except psutil.NoSuchProcess:
                continue  # exited in between
            except psutil.AccessDenied as exc:
                raise CollectorError(f"sockets of pid {pid}: access denied ({exc})") from exc
            for c in conns:
                key = (c.family, c.type, c.laddr, c.raddr, c.status)
                if key in seen:
                    continue  # the same socket inherited by a child process
                seen.add(key)
                snap.sockets.append(socket_to_pb(_Owned(c, pid), names))
