"""nfqlb's flows and per-stream Maglev tables, where nfqlb runs.

In a Meridio LB container ``nfqlb flowlb`` receives the VIP traffic from
nfqueue, matches it against *flows* and picks a target from the stream's
shared-memory Maglev table (``/dev/shm/tshm-<stream>``). Which fwmarks are
active there must equal the LB's ``fwmark N lookup N`` rules; this collector
reports both halves of nfqlb's view so the analysis can compare them.

How it reads, without changing anything:

* flows: ``nfqlb flow-list`` (JSON). The binary is taken from the running
  process (``/proc/PID/exe``, or the image's ``/bin/nfqlb`` through
  ``/proc/PID/root``), since the agent image has no nfqlb. If it cannot be
  executed, the agent speaks the same one-shot text protocol itself
  (``action:list`` / ``eoc:`` on the abstract unix socket ``@nfqlb``,
  nfqlb ``src/nfqlb/nfqlb.h``); abstract sockets are per network
  namespace, so the agent reaches the LB's from inside the pod's netns.
* Maglev tables: every ``tshm-*`` in the LB's ``/dev/shm`` (through
  ``/proc/PID/root``) and every ``user_ref`` of a flow. The shm file is decoded
  directly (layout of nfqlb 1.2.0: ``SharedData{int ownFwmark;}`` followed by
  maglevdyn's ``{unsigned M, N, len; int lookup[M]; unsigned perm[N][M];
  int active[N];}``), after checking that the sizes agree: it gives the whole
  lookup table, which the static trace needs to predict the target
  (``nfqlb show`` prints 25 entries). When the file cannot be read,
  ``nfqlb show --shm=NAME`` is parsed instead.

nfqlb prints IPv4 CIDRs as IPv4-mapped IPv6 (``::ffff:20.0.0.1/128``, from
``flow.c``); they are normalised to ``20.0.0.1/32`` here, once.

Where nfqlb is, seen from an ephemeral container: in Meridio's LB/FE pod nfqlb
runs in ``stateless-lb`` and the agent targets ``frontend`` (for bird), so
the nfqlb *process* is in another PID namespace and invisible. What the pod
shares is enough: the abstract socket ``@nfqlb`` is scoped to the network
namespace (flows and their counters, ``action:list``), and /dev/shm is the
pod's (the Maglev tables, decoded). So without a visible process the section
is read from those two, and says so (``SectionStatus.source``); the container
is named after Meridio's pod template (``stateless-lb``, legacy
``load-balancer``) when the runtime told the agent the pod's containers.
Lost that way: nfqlb's pid and command line, and an ``NFQLB_FLOW_ADDRESS``
override in its environment (Meridio sets none). A second agent injected
into ``stateless-lb`` would see the process, at the price of a second
ephemeral container per pod, which can never be removed: not worth it for
two fields.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

import psutil

from meridio_debug.agent.collectors import (
    attribute,
    pod_containers,
    target_container,
    where_processes,
)
from meridio_debug.agent.collectors.procs import (
    PROC,
    CommandResult,
    find_program,
    process_argv,
    run_readonly,
)
from meridio_debug.agent.errors import CollectorError, SectionAbsent
from meridio_debug.protos import agent_pb2 as pb

NO_NFQLB = "nfqlb not running"
NFQLB_CONTAINERS = ("stateless-lb", "load-balancer")  # Meridio's, and the legacy Helm chart's
DEFAULT_FLOW_SOCKET = "nfqlb"  # abstract: "@nfqlb"
SHM_PREFIX = "tshm-"
MAX_OUTPUT_BYTES = 8 * 1024 * 1024
SHM_HEADER = 16  # ownFwmark, then maglevdyn's M, N, len
MAX_SHMS = 256

_ACTIVE_TOKEN = re.compile(r"^(-?\d+)(?:\((\d+)\))?$")
_MAGLEV = re.compile(r"Maglev:\s*M=(\d+),\s*N=(\d+)")


# --------------------------------------------------------------------------
# pure parsers


def normalise_cidr(cidr: str) -> str:
    """'::ffff:20.0.0.1/128' → '20.0.0.1/32'; anything else is returned unchanged.

    nfqlb stores every address as IPv6 and adds 96 to IPv4 prefix lengths.
    """
    addr, sep, plen = cidr.partition("/")
    try:
        ip = ipaddress.IPv6Address(addr)
    except ValueError:
        return cidr
    mapped = ip.ipv4_mapped
    if mapped is None:
        return cidr
    if not sep:
        return str(mapped)
    try:
        length = int(plen)
    except ValueError:
        return cidr
    if length < 96:
        return cidr  # wider than the mapped range: not an IPv4 prefix
    return f"{mapped}/{length - 96}"


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]


def flow_from_json(item: dict[str, Any]) -> pb.NfqlbFlow:
    """One element of ``nfqlb flow-list`` as the proto."""
    flow = pb.NfqlbFlow(
        name=str(item.get("name", "")),
        priority=int(item.get("priority") or 0),
        matches_count=int(item.get("matches_count") or 0),
        user_ref=str(item.get("user_ref") or ""),
        udpencap=bool(item.get("udpencap")),
    )
    flow.protocols.extend(_strings(item.get("protocols")))
    flow.dests.extend(normalise_cidr(c) for c in _strings(item.get("dests")))
    flow.srcs.extend(normalise_cidr(c) for c in _strings(item.get("srcs")))
    flow.dports.extend(_strings(item.get("dports")))
    flow.sports.extend(_strings(item.get("sports")))
    # nfqlb >= 1.1 prints byte matches as an array of expressions.
    flow.match = ", ".join(_strings(item.get("match")))
    return flow


def parse_flow_list(text: str) -> list[pb.NfqlbFlow]:
    """Parse ``nfqlb flow-list`` output (a JSON array; a single object for --name)."""
    stripped = text.strip().rstrip("\x00").strip()
    if not stripped:
        return []
    if stripped.startswith("FAIL"):
        raise CollectorError(f"nfqlb flow-list: {stripped.splitlines()[0]}")
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise CollectorError(f"nfqlb flow-list printed invalid JSON: {exc}") from exc
    items = data if isinstance(data, list) else [data]
    if not all(isinstance(i, dict) for i in items):
        raise CollectorError("nfqlb flow-list: expected a list of flow objects")
    return [flow_from_json(i) for i in items]


def parse_active(text: str) -> list[pb.NfqlbActive]:
    """'5044(43) 5062(61)' → fwmark/index pairs.

    nfqlb 0.x printed bare values for every slot (no index, unused ones
    negative or 4294967295); there the index is the position and unused
    slots are skipped.
    """
    out: list[pb.NfqlbActive] = []
    for position, token in enumerate(text.replace("...", " ").split()):
        m = _ACTIVE_TOKEN.match(token)
        if not m:
            raise CollectorError(f"nfqlb show: unparsable Active entry {token!r}")
        fwmark = int(m.group(1))
        if fwmark < 0 or fwmark >= 0xFFFFFFFF:
            continue
        index = int(m.group(2)) if m.group(2) is not None else position
        out.append(pb.NfqlbActive(fwmark=fwmark, index=index))
    return out


def parse_show(text: str, name: str = "") -> pb.NfqlbShm:
    """Parse ``nfqlb show --shm=NAME`` into the proto (``raw`` keeps the text)."""
    shm = pb.NfqlbShm(name=name, raw=text)
    seen_maglev = False
    for line in text.splitlines():
        stripped = line.strip()
        key, _, value = stripped.partition(":")
        if key in ("Shm", "m") and not shm.name:
            # ("m:" is how a Meridio doc shows it, the "Sh" cut off.)
            shm.name = value.strip()
        elif key == "Maglev":
            m = _MAGLEV.search(stripped)
            if m:
                shm.m, shm.n = int(m.group(1)), int(m.group(2))
                seen_maglev = True
        elif key == "Active":
            shm.active.extend(parse_active(value))
    if not seen_maglev:
        raise CollectorError(f"nfqlb show {name}: no 'Maglev: M=, N=' line in output")
    return shm


def _layout(header: bytes, name: str) -> tuple[int, int, int, int]:
    """(ownFwmark, M, N, offset of ``active``) from a shm's first 16 bytes; CollectorError."""
    if len(header) < SHM_HEADER:
        raise CollectorError(f"{name}: not an nfqlb shared-memory layout ({len(header)} bytes)")
    own = struct.unpack_from("=i", header, 0)[0]
    m, n, length = struct.unpack_from("=III", header, 4)
    if not (3 <= m <= 994009 and 0 < n <= m and length == 12 + 4 * (3 + m * n) + 4 * (m + n)):
        raise CollectorError(
            f"{name}: not an nfqlb shared-memory layout this agent knows (M={m}, N={n}, len={length})"
        )
    return own, m, n, SHM_HEADER + 4 * m + 4 * m * n


def _shm_message(
    name: str, own: int, m: int, n: int, lookup_bytes: bytes, active_bytes: bytes
) -> pb.NfqlbShm:
    lookup = struct.unpack_from(f"={m}i", lookup_bytes)
    if any(not -1 <= v < n for v in lookup):
        raise CollectorError(f"{name}: lookup table holds indexes outside 0..{n - 1}")
    active = struct.unpack_from(f"={n}i", active_bytes)
    shm = pb.NfqlbShm(name=name, m=m, n=n, own_fwmark=own)
    shm.active.extend(pb.NfqlbActive(fwmark=fw, index=i) for i, fw in enumerate(active) if fw >= 0)
    shm.lookup.extend(lookup)
    shm.raw = format_show(name, own, (m, n), list(lookup[:25]), shm.active)
    return shm


def decode_shm(data: bytes, name: str) -> pb.NfqlbShm:
    """Decode an nfqlb 1.x ``/dev/shm/tshm-*`` file (see the module docstring).

    Layout (nfqlb 1.2.0 ``lib/nfqueue.h``, ``lib/maglevdyn.c``, native byte order):
    ``int ownFwmark``, then maglevdyn's ``unsigned M, N, len`` and its memory: ``int
    lookup[M]``, ``unsigned permutation[N][M]``, ``int active[N]``, where ``len`` (the size
    ``init`` allotted) is ``12 + 4*(3 + M*N) + 4*(M + N)``. A layout is accepted only when
    the stored length agrees with M and N and the tables fit in the file; every lookup entry
    must be -1 or an index below N.
    """
    own, m, n, active_at = _layout(data[:SHM_HEADER], name)
    if active_at + 4 * n > len(data):
        raise CollectorError(f"{name}: truncated ({len(data)} bytes for M={m}, N={n})")
    lookup_at = SHM_HEADER
    return _shm_message(
        name, own, m, n, data[lookup_at : lookup_at + 4 * m], data[active_at : active_at + 4 * n]
    )


def read_shm(path: str, name: str) -> pb.NfqlbShm:
    """:func:`decode_shm` of the file at ``path``, reading only the lookup and active tables.

    The permutation table between them is M x N x 4 bytes: 4 MB for Meridio's default
    stream (N=100), 400 MB for N=1,000 (a 1,000-target lab), 40 GB for nfqlb's 10,000;
    the agent never reads it (at most ~4 MB: M <= 994009).
    """
    with open(path, "rb") as f:
        fd = f.fileno()
        own, m, n, active_at = _layout(os.pread(fd, SHM_HEADER, 0), name)
        size = os.fstat(fd).st_size
        if active_at + 4 * n > size:
            raise CollectorError(f"{name}: truncated ({size} bytes for M={m}, N={n})")
        lookup = os.pread(fd, 4 * m, SHM_HEADER)
        active = os.pread(fd, 4 * n, active_at)
    if len(lookup) != 4 * m or len(active) != 4 * n:
        raise CollectorError(f"{name}: truncated while read (M={m}, N={n})")
    return _shm_message(name, own, m, n, lookup, active)


def format_show(
    name: str,
    own: int,
    maglev: tuple[int, int],
    lookup: Sequence[int],
    active: Sequence[pb.NfqlbActive],
) -> str:
    """Text as ``nfqlb show`` prints it, for a decoded shm (so ``raw`` looks the same)."""
    return (
        f"Shm: {name}\n"
        f"  Fw: own={own}\n"
        f"  Maglev: M={maglev[0]}, N={maglev[1]}\n"
        f"   Lookup: {' '.join(str(v) for v in lookup)}...\n"
        f"   Active:{''.join(f' {a.fwmark}({a.index})' for a in active)}\n"
    )


# --------------------------------------------------------------------------
# talking to nfqlb


def find_nfqlb_processes(proc: str = PROC) -> list[psutil.Process]:
    """nfqlb processes in our netns, the long-running load-balancer first.

    Meridio's LB also runs short-lived ``nfqlb activate``/``flow-set``;
    ``flowlb`` (or the older ``lb``) is the one that owns flows and shm.
    """
    found = find_program("nfqlb", proc)

    def rank(p: psutil.Process) -> tuple[int, int]:
        argv = process_argv(p)
        sub = argv[1] if len(argv) > 1 else ""
        return (0 if sub in ("flowlb", "lb") else 1, p.pid)

    return sorted(found, key=rank)


def binary_candidates(pid: int, proc: str = PROC) -> list[str]:
    """Where an nfqlb binary of the running LB can be executed from.

    ``/proc/PID/exe`` only when it really is nfqlb (not an interpreter or a
    wrapper that happens to be called nfqlb): running anything else with
    ``flow-list`` as argument would be a guess.
    """
    exe = f"{proc}/{pid}/exe"
    try:
        use_exe = os.path.basename(os.readlink(exe)).split(" ")[0] == "nfqlb"
    except OSError:
        use_exe = True  # unreadable link: let the exec attempt tell
    return [
        *([exe] if use_exe else []),
        f"{proc}/{pid}/root/bin/nfqlb",
        f"{proc}/{pid}/root/usr/bin/nfqlb",
        f"{proc}/{pid}/root/usr/local/bin/nfqlb",
    ]


def flow_socket_name(environ: dict[str, str]) -> str | None:
    """The abstract socket nfqlb listens on: NFQLB_FLOW_ADDRESS or '@nfqlb'.

    Returns None for a non-unix address (tcp:...), which the agent does not dial.
    """
    addr = environ.get("NFQLB_FLOW_ADDRESS", f"unix:{DEFAULT_FLOW_SOCKET}")
    if addr.startswith("unix:"):
        return addr[len("unix:") :]
    return None


def abstract_listening(name: str, proc: str = PROC) -> bool:
    """Whether a unix socket ``@name`` listens in this network namespace (``/proc/net/unix``).

    Abstract sockets live in the network namespace, so this sees nfqlb's
    flow socket from any container of the pod. Listening: flag __SO_ACCEPTCON.
    """
    try:
        with open(f"{proc}/net/unix") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == f"@{name}" and int(fields[3], 16) & 0x10000:
                    return True
    except OSError:
        return False
    return False


def pod_shm_names(flows: Sequence[pb.NfqlbFlow], shm_dir: str = "/dev/shm") -> list[str]:
    """``tshm-*`` in the pod's /dev/shm (the agent's own, in an ephemeral container) plus user_refs."""
    names = {f.user_ref for f in flows if f.user_ref and f.user_ref != "NULL"}
    with contextlib.suppress(OSError):
        names.update(e for e in os.listdir(shm_dir) if e.startswith(SHM_PREFIX))
    return sorted(names)[:MAX_SHMS]


# Meridio's LB/FE pod: nfqlb's container beside the one an agent targets for bird.
_NFQLB_BESIDE = {"frontend": "stateless-lb", "fe": "load-balancer"}


def nfqlb_container() -> str:
    """The pod's container that runs nfqlb by Meridio's pod layout ('' when not known).

    From the pod's container names when the runtime passed them, else from the
    target's name (operator pods: frontend + stateless-lb; Helm: fe + load-balancer).
    """
    names = pod_containers()
    if names:
        return next((c for c in NFQLB_CONTAINERS if c in names), "")
    return _NFQLB_BESIDE.get(target_container(), "")


def request_flow_list(name: str = DEFAULT_FLOW_SOCKET, timeout: float = 3.0) -> str:
    """``nfqlb flow-list`` without the binary: one request on the abstract socket."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect("\0" + name)
        sock.sendall(b"action:list\neoc:\n")
        chunks: list[bytes] = []
        total = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CollectorError(f"nfqlb @{name}: no complete flow list in {timeout:g} s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError as exc:
                raise CollectorError(
                    f"nfqlb @{name}: no complete flow list in {timeout:g} s"
                ) from exc
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_OUTPUT_BYTES:
                raise CollectorError(f"nfqlb @{name}: flow list over {MAX_OUTPUT_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")
    finally:
        with contextlib.suppress(OSError):
            sock.close()


def shm_names(pid: int, flows: Sequence[pb.NfqlbFlow], proc: str = PROC) -> list[str]:
    """``tshm-*`` files in the LB's /dev/shm plus the flows' user_refs, sorted."""
    names = {f.user_ref for f in flows if f.user_ref and f.user_ref != "NULL"}
    for shm_dir in (f"{proc}/{pid}/root/dev/shm", "/dev/shm"):
        try:
            entries = os.listdir(shm_dir)
        except OSError:
            continue
        names.update(e for e in entries if e.startswith(SHM_PREFIX))
        break
    return sorted(names)[:MAX_SHMS]


class _Runner:
    """Runs the LB's nfqlb binary during one collect().

    It remembers which binary executes, gives up on the binary after the first
    time none does (then the fallbacks are used), and keeps to a deadline.
    """

    def __init__(
        self, pid: int, env: dict[str, str], *, timeout: float, budget: float, proc: str
    ) -> None:
        self.pid = pid
        self.env = env
        self.timeout = timeout
        self.deadline = time.monotonic() + budget
        self.candidates = binary_candidates(pid, proc)
        self.binary: str | None = None
        self.unusable: str | None = None

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, args: Sequence[str]) -> CommandResult:
        if self.unusable is not None:
            raise CollectorError(self.unusable)
        candidates = [self.binary] if self.binary else self.candidates
        errors: list[str] = []
        for binary in candidates:
            timeout = min(self.timeout, self.remaining())
            if timeout <= 0:
                raise CollectorError("nfqlb: collection time budget used up")
            try:
                result = run_readonly([binary, *args], timeout=timeout, env=self.env)
            except OSError as exc:
                errors.append(f"{binary}: {exc.strerror or exc}")
                continue
            if result.returncode in (126, 127):  # exec/loader failure, e.g. missing libraries
                errors.append(f"{binary}: exit {result.returncode} {result.stderr.strip()[:120]}")
                continue
            self.binary = binary
            return result
        self.unusable = "cannot execute nfqlb: " + "; ".join(errors)
        raise CollectorError(self.unusable)


class NfqlbCollector:
    """Section ``nfqlb``: flows and Maglev tables of the pod's ``nfqlb flowlb``."""

    name = "nfqlb"

    def __init__(self, timeout: float = 5.0, budget: float = 20.0, proc: str = PROC) -> None:
        self._timeout = timeout
        self._budget = budget
        self._proc = proc

    def available(self) -> tuple[bool, str]:
        try:
            found = find_nfqlb_processes(self._proc)
        except CollectorError as exc:
            return False, str(exc)
        if found:
            return True, f"nfqlb pid {found[0].pid}"
        if abstract_listening(DEFAULT_FLOW_SOCKET, self._proc):
            return True, f"@{DEFAULT_FLOW_SOCKET} listens (nfqlb in another container)"
        return False, f"{NO_NFQLB}: {self._not_found()}"

    def _not_found(self) -> str:
        return (
            f"no nfqlb process in {where_processes()}, nothing listening on "
            f"@{DEFAULT_FLOW_SOCKET} in the pod's network namespace"
        )

    @staticmethod
    def _env(p: psutil.Process) -> dict[str, str]:
        """Our environment plus the LB's NFQLB_FLOW_ADDRESS (nothing else of its env)."""
        env = dict(os.environ)
        env.pop("NFQLB_FLOW_ADDRESS", None)
        with contextlib.suppress(psutil.Error):
            addr = p.environ().get("NFQLB_FLOW_ADDRESS")
            if addr:
                env["NFQLB_FLOW_ADDRESS"] = addr
        return env

    def _flows(self, runner: _Runner) -> list[pb.NfqlbFlow]:
        problems: list[str] = []
        try:
            result = runner.run(["flow-list"])
            if result.returncode == 0:
                return parse_flow_list(result.stdout)
            problems.append(f"nfqlb flow-list: {result.stderr.strip() or result.returncode}")
        except CollectorError as exc:
            problems.append(str(exc))
        name = flow_socket_name(runner.env)
        if name is None:
            raise CollectorError("; ".join([*problems, "flow socket is not a unix address"]))
        try:
            text = request_flow_list(name, timeout=max(0.1, min(self._timeout, runner.remaining())))
        except OSError as exc:
            problems.append(f"@{name}: {exc.strerror or exc}")
            raise CollectorError("cannot list nfqlb flows: " + "; ".join(problems)) from exc
        return parse_flow_list(text)

    def _shm(self, runner: _Runner, name: str) -> pb.NfqlbShm:
        """The shm decoded from its file (the whole lookup table), else ``nfqlb show``.

        The file is read through the LB's root (/proc/PID/root/dev/shm: the pod's /dev/shm
        whatever mount namespace the agent is in); ``nfqlb show`` run by the agent sees its
        own /dev/shm, which is the LB's only when they share it.
        """
        problems: list[str] = []
        for path in (f"{self._proc}/{runner.pid}/root/dev/shm/{name}", f"/dev/shm/{name}"):
            try:
                return read_shm(path, name)
            except OSError as exc:
                problems.append(f"{path}: {exc.strerror or exc}")
                continue
            except CollectorError as exc:
                problems.append(str(exc))
                break
        try:
            result = runner.run(["show", f"--shm={name}"])
            if result.returncode == 0:
                return parse_show(result.stdout, name)
            problems.append(f"nfqlb show: {result.stderr.strip() or result.returncode}")
        except CollectorError as exc:
            problems.append(str(exc))
        raise CollectorError(f"cannot read nfqlb shm {name}: " + "; ".join(problems))

    def _collect_pod_wide(self, snap: pb.Snapshot) -> None:
        """nfqlb in another container: its flow socket and the pod's /dev/shm (module docstring).

        /dev/shm is the pod's only when the agent runs as a container of the pod (the
        runtime named its target container); an agent that only entered a network
        namespace sees the host's /dev/shm, which says nothing about this namespace.
        """
        in_pod = bool(target_container())
        listening = abstract_listening(DEFAULT_FLOW_SOCKET, self._proc)
        shms = pod_shm_names([]) if in_pod else []
        if not listening and not shms:
            shm_note = f", no {SHM_PREFIX}* in /dev/shm" if in_pod else ""
            raise SectionAbsent(f"{NO_NFQLB}: {self._not_found()}{shm_note}")
        tables = (
            "/dev/shm (tshm-* decoded)" if in_pod else "no Maglev tables (/dev/shm is the host's)"
        )
        attribute(
            snap,
            self.name,
            nfqlb_container(),
            f"the pod's @{DEFAULT_FLOW_SOCKET} socket (flow-list) and {tables}; "
            f"the nfqlb process is in another container, not in {where_processes()}",
        )
        out = snap.nfqlb
        problems: list[str] = []
        flows: list[pb.NfqlbFlow] = []
        if listening:
            try:
                flows = parse_flow_list(request_flow_list(DEFAULT_FLOW_SOCKET, self._timeout))
            except OSError as exc:
                problems.append(f"@{DEFAULT_FLOW_SOCKET}: {exc.strerror or exc}")
        else:
            # A stopped nfqlb leaves its shms in the pod's /dev/shm: not running is absent.
            raise SectionAbsent(
                f"{NO_NFQLB}: {self._not_found()}; /dev/shm still has {', '.join(shms)} "
                "(left by an nfqlb that stopped)"
            )
        out.flows.extend(flows)
        for name in pod_shm_names(flows) if in_pod else []:
            try:
                out.shms.append(read_shm(f"/dev/shm/{name}", name))
            except (OSError, CollectorError) as exc:
                problems.append(f"/dev/shm/{name}: {getattr(exc, 'strerror', None) or exc}")
        if problems:
            raise CollectorError("; ".join(problems))

    def collect(self, snap: pb.Snapshot) -> None:
        found = find_nfqlb_processes(self._proc)
        if not found:
            self._collect_pod_wide(snap)
            return
        lb = found[0]
        attribute(
            snap,
            self.name,
            target_container(),
            f"nfqlb pid {lb.pid} in {where_processes()} (its binary, flow socket and /dev/shm)",
        )
        runner = _Runner(
            lb.pid, self._env(lb), timeout=self._timeout, budget=self._budget, proc=self._proc
        )
        out = snap.nfqlb
        out.pid = lb.pid
        out.cmdline.extend(process_argv(lb))
        flows = self._flows(runner)
        out.flows.extend(flows)
        failed: list[str] = []
        for name in shm_names(lb.pid, flows, self._proc):
            try:
                out.shms.append(self._shm(runner, name))
            except CollectorError as exc:
                failed.append(str(exc))
        if failed:
            # The flows and the readable shms stay in the snapshot.
            raise CollectorError("; ".join(failed))
