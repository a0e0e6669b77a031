"""BIRD's protocols and BFD sessions, read over its control socket.

Why the socket and not birdc: the agent image must not depend on the FE
image's tools, and the FE's bird lives in another container (another mount
namespace). We find the bird process in our network namespace, take its
control socket path from its command line (``-s PATH``; else the compiled-in
defaults), and reach the socket through ``/proc/PID/root/PATH``, which
resolves the path in *bird's* mount namespace. Then we speak BIRD's CLI
protocol ourselves and send only ``show`` commands (the agent is read-only).

The protocol (BIRD's ``client/client.c`` and ``nest/cli.c``): the server
greets with ``0001 BIRD x.y.z ready.``; each reply line starts with a 4-digit
code followed by ``-`` (more lines follow) or a space (last line of the
reply); a line that starts with a space continues the previous code. Codes
8000-9999 are errors. Meridio's frontend reads the same two commands
(``show protocols all 'NBR-*'``, ``show bfd sessions``) to decide whether a
gateway is up: BGP "up" with Info containing "Established", BFD "Up".

Everything is a pure function of the reply lines except ``BirdClient`` and
``BirdCollector``; real replies recorded from bird 2.0.12 are the unit
tests' fixtures.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psutil

from meridio_debug.agent.collectors import attribute, target_container, where_processes
from meridio_debug.agent.collectors.procs import (
    PROC,
    find_program,
    process_argv,
)
from meridio_debug.agent.errors import CollectorError, SectionAbsent
from meridio_debug.protos import agent_pb2 as pb

DEFAULT_SOCKETS = ("/var/run/bird/bird.ctl", "/run/bird/bird.ctl")
NO_BIRD = "no bird process"
MAX_REPLY_BYTES = 16 * 1024 * 1024
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107

# Reply codes (BIRD doc/reply_codes).
CODE_WELCOME = 1
CODE_PROTOCOL = 1002
CODE_PROTOCOL_DETAILS = 1006
CODE_BFD_SESSIONS = 1020
CODE_PROTOCOL_HEADING = 2002

_CODE_LINE = re.compile(r"^(\d{4})([ -])(.*)$")
# "since" is one token in the default formats (hh:mm:ss.fff, or a date for
# older events) but two with "timeformat ... iso long" (date and time).
_SINCE = r"\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}:\d{2}(?:\.\d+)?)?|\d{2}:\d{2}:\d{2}(?:\.\d+)?"
_PROTOCOL_ROW = re.compile(
    rf"^(?P<name>\S+)\s+(?P<proto>\S+)\s+(?P<table>\S+)\s+(?P<state>\S+)\s+"
    rf"(?P<since>{_SINCE}|\S+)(?:\s+(?P<info>.*?))?\s*$"
)
_BFD_ROW = re.compile(
    rf"^(?P<address>\S+)\s+(?P<interface>\S+)\s+(?P<state>\S+)\s+"
    rf"(?P<since>{_SINCE}|\S+)\s+(?P<interval>\S+)\s+(?P<timeout>\S+)\s*$"
)
_VERSION = re.compile(r"BIRD\s+(\S+)\s+ready", re.IGNORECASE)


class BirdProtocolError(CollectorError):
    """bird answered with an error code, or something that is not its protocol."""


@dataclass(frozen=True)
class ReplyLine:
    code: int
    text: str


# --------------------------------------------------------------------------
# wire format


def is_final(line: str) -> bool:
    """True for the line that ends a reply: 4 digits and a space."""
    return len(line) >= 5 and line[:4].isdigit() and line[4] == " "


def parse_reply(lines: Iterable[str]) -> list[ReplyLine]:
    """Assign a code to every line of one reply (continuation lines inherit it).

    Raises BirdProtocolError for an error reply (codes 8000-9999) or a line
    that belongs to no code.
    """
    out: list[ReplyLine] = []
    code: int | None = None
    for raw in lines:
        line = raw.rstrip("\r\n")
        m = _CODE_LINE.match(line)
        if m:
            code = int(m.group(1))
            text = m.group(3)
        elif line.startswith(" ") and code is not None:
            text = line[1:]
        elif not line:
            continue
        else:
            raise BirdProtocolError(f"unexpected line from bird: {line[:80]!r}")
        if code >= 8000:
            raise BirdProtocolError(f"bird error {code}: {text.strip()}")
        out.append(ReplyLine(code, text))
    return out


def parse_version(greeting: str) -> str:
    """'0001 BIRD 2.0.12 ready.' → '2.0.12' ('' when not a greeting)."""
    m = _VERSION.search(greeting)
    return m.group(1) if m else ""


# --------------------------------------------------------------------------
# show protocols [all]


def _strip_scope(address: str) -> str:
    """'169.254.100.150%ext-vlan0' → '169.254.100.150'."""
    return address.split("%", 1)[0]


def _apply_detail(proto: pb.BirdProtocol, channels: list[str], text: str) -> None:
    stripped = text.strip()
    if stripped.startswith("Channel "):
        channels.append(stripped.split(None, 1)[1])
        return
    key, sep, value = stripped.partition(":")
    if not sep:
        return
    key = key.strip()
    value = value.strip()
    if key == "BGP state":
        proto.bgp_state = value
    elif key == "Neighbor address":
        proto.neighbor_address = _strip_scope(value)
    elif key == "Neighbor AS":
        proto.neighbor_as = value
    elif key == "Local AS":
        proto.local_as = value
    elif key == "Last error":
        proto.last_error = value
    elif key.startswith("BFD"):
        # Newer BIRD prints the BGP's BFD session state in the details.
        proto.bfd = True


def parse_protocols(reply: Sequence[ReplyLine]) -> list[pb.BirdProtocol]:
    """Protocols from a ``show protocols`` or ``show protocols all`` reply."""
    protocols: list[pb.BirdProtocol] = []
    channels: list[list[str]] = []
    for line in reply:
        if line.code == CODE_PROTOCOL:
            m = _PROTOCOL_ROW.match(line.text.strip())
            if not m:
                raise BirdProtocolError(f"unparsable protocol line: {line.text[:80]!r}")
            protocols.append(
                pb.BirdProtocol(
                    name=m.group("name"),
                    proto=m.group("proto"),
                    table=m.group("table"),
                    state=m.group("state"),
                    since=m.group("since"),
                    info=(m.group("info") or "").strip(),
                )
            )
            channels.append([])
        elif line.code == CODE_PROTOCOL_DETAILS and protocols:
            _apply_detail(protocols[-1], channels[-1], line.text)
    for proto, chans in zip(protocols, channels, strict=True):
        proto.channel = ",".join(dict.fromkeys(chans))
    return protocols


# --------------------------------------------------------------------------
# show bfd sessions


def parse_bfd_sessions(reply: Sequence[ReplyLine]) -> list[pb.BfdSession]:
    """Sessions from a ``show bfd sessions`` reply, each with its owning bfd protocol."""
    sessions: list[pb.BfdSession] = []
    owner = ""
    for line in reply:
        if line.code != CODE_BFD_SESSIONS:
            continue
        text = line.text.strip()
        if not text or text.startswith("IP address"):
            continue
        if text.endswith(":") and " " not in text:
            owner = text[:-1]
            continue
        m = _BFD_ROW.match(text)
        if not m:
            raise BirdProtocolError(f"unparsable BFD session line: {text[:80]!r}")
        sessions.append(
            pb.BfdSession(
                address=m.group("address"),
                interface=m.group("interface"),
                state=m.group("state"),
                since=m.group("since"),
                interval=m.group("interval"),
                timeout=m.group("timeout"),
                protocol=owner,
            )
        )
    return sessions


def link_bfd(protocols: Iterable[pb.BirdProtocol], sessions: Iterable[pb.BfdSession]) -> None:
    """Mark BGP protocols that have a BFD session to their neighbor as ``bfd``.

    BIRD 2.0 does not say in ``show protocols all`` whether a BGP protocol uses
    BFD, but a BFD session exists only when some protocol requested one, and
    BGP requests it for its neighbor address.
    """
    addresses = {_strip_scope(s.address) for s in sessions}
    for proto in protocols:
        if proto.proto == "BGP" and proto.neighbor_address in addresses:
            proto.bfd = True


# --------------------------------------------------------------------------
# finding bird and its socket


def option_value(argv: Sequence[str], flag: str) -> str | None:
    """Value of a short option in ``argv`` ('-s PATH' or '-sPATH'), None when absent."""
    for i, arg in enumerate(argv[1:], start=1):
        if arg == flag:
            return argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith(flag) and len(arg) > len(flag) and not arg.startswith("--"):
            return arg[len(flag) :]
    return None


def socket_candidates(pid: int, argv: Sequence[str], proc: str = PROC) -> list[str]:
    """Where to look for bird's control socket, best guess first.

    Through ``/proc/PID/root`` the path is resolved in bird's own mount
    namespace (another container); a relative ``-s`` path is relative to
    bird's working directory. The plain path comes last, for when /proc/PID/root
    is not accessible but bird shares our filesystem (local runtime).
    """
    paths: list[str] = []
    explicit = option_value(argv, "-s")
    wanted = [explicit] if explicit else list(DEFAULT_SOCKETS)
    for path in wanted:
        if os.path.isabs(path):
            paths.append(f"{proc}/{pid}/root{path}")
        else:
            paths.append(f"{proc}/{pid}/cwd/{path}")
    if explicit and os.path.isabs(explicit):
        paths.append(explicit)
    elif not explicit:
        paths.extend(DEFAULT_SOCKETS)
    return list(dict.fromkeys(paths))


def find_bird_processes(proc: str = PROC) -> list[psutil.Process]:
    """bird daemons in our network namespace (not birdc), lowest pid first."""
    return find_program("bird", proc)


def _connect_unix(sock: socket.socket, path: str) -> None:
    """connect() to a unix socket whose path may exceed sun_path.

    /proc/PID/root/... paths get long; connecting through an O_PATH descriptor
    of the directory (/proc/self/fd/N/NAME) keeps the address short.
    """
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        sock.connect(path)
        return
    dirfd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        sock.connect(f"/proc/self/fd/{dirfd}/{os.path.basename(path)}")
    finally:
        os.close(dirfd)


class BirdClient:
    """A read-only client of BIRD's control socket; every operation has a deadline."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self.greeting = ""

    def __enter__(self) -> BirdClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._timeout)
        try:
            _connect_unix(sock, self.path)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        try:
            lines = self._read_reply(time.monotonic() + self._timeout)
        except BaseException:
            self.close()
            raise
        self.greeting = lines[-1] if lines else ""
        if not parse_version(self.greeting):
            self.close()
            raise BirdProtocolError(f"{self.path}: not a bird control socket ({self.greeting!r})")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def command(self, command: str) -> list[ReplyLine]:
        """Send one ``show`` command and return its parsed reply."""
        return parse_reply(self.raw(command))

    def raw(self, command: str) -> list[str]:
        """Send one ``show`` command and return the reply lines as received."""
        if not command.startswith("show ") or "\n" in command:
            raise ValueError(f"the agent is read-only; refusing bird command {command!r}")
        if self._sock is None:
            raise BirdProtocolError("not connected")
        deadline = time.monotonic() + self._timeout
        self._sock.sendall(command.encode() + b"\n")
        return self._read_reply(deadline)

    def _read_reply(self, deadline: float) -> list[str]:
        assert self._sock is not None
        lines: list[str] = []
        total = 0
        while True:
            while b"\n" not in self._buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CollectorError(f"bird at {self.path}: no complete reply in time")
                self._sock.settimeout(remaining)
                try:
                    chunk = self._sock.recv(65536)
                except TimeoutError as exc:
                    raise CollectorError(f"bird at {self.path}: no complete reply in time") from exc
                if not chunk:
                    raise BirdProtocolError(f"bird at {self.path} closed the connection")
                total += len(chunk)
                if total > MAX_REPLY_BYTES:
                    raise CollectorError(f"bird at {self.path}: reply over {MAX_REPLY_BYTES} bytes")
                self._buf += chunk
            raw, _, self._buf = self._buf.partition(b"\n")
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            if is_final(line):
                return lines


def _describe_connect_error(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such socket"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (the agent needs SYS_PTRACE to enter /proc/PID/root)"
    if exc.errno == errno.ECONNREFUSED:
        return "connection refused (bird not listening)"
    return exc.strerror or str(exc)


@dataclass(frozen=True)
class BirdState:
    version: str
    protocols: list[pb.BirdProtocol]
    sessions: list[pb.BfdSession]


def read_bird(client: BirdClient) -> BirdState:
    """The two show commands Meridio's frontend itself relies on, parsed."""
    protocols = parse_protocols(client.command("show protocols all"))
    sessions = parse_bfd_sessions(client.command("show bfd sessions"))
    link_bfd(protocols, sessions)
    return BirdState(parse_version(client.greeting), protocols, sessions)


class BirdCollector:
    """Section ``bird``: the pod's bird daemon, its protocols and BFD sessions."""

    name = "bird"

    def __init__(self, timeout: float = 5.0, proc: str = PROC) -> None:
        self._timeout = timeout
        self._proc = proc

    def available(self) -> tuple[bool, str]:
        try:
            birds = find_bird_processes(self._proc)
        except CollectorError as exc:
            return False, str(exc)
        if not birds:
            return False, f"{NO_BIRD} in {where_processes()}"
        return True, f"bird pid {birds[0].pid}"

    def collect(self, snap: pb.Snapshot) -> None:
        birds = find_bird_processes(self._proc)
        if not birds:
            raise SectionAbsent(
                f"{NO_BIRD} in {where_processes()} (looked for a process named bird "
                f"in {self._proc} sharing this pod's network namespace)"
            )
        bird = birds[0]
        argv = process_argv(bird)
        tried: list[str] = []
        for path in socket_candidates(bird.pid, argv, self._proc):
            try:
                with BirdClient(path, self._timeout) as client:
                    state = read_bird(client)
            except OSError as exc:
                tried.append(f"{path}: {_describe_connect_error(exc)}")
                continue
            out = snap.bird
            out.pid = bird.pid
            out.socket = path
            out.version = state.version
            out.config_file = option_value(argv, "-c") or ""
            out.protocols.extend(state.protocols)
            out.bfd_sessions.extend(state.sessions)
            attribute(
                snap,
                self.name,
                target_container(),
                f"bird pid {bird.pid} in {where_processes()}, control socket {path}",
            )
            return
        raise CollectorError(
            f"bird pid {bird.pid} runs but its control socket is unreachable; tried "
            + "; ".join(tried)
        )
