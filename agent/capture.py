"""Packet capture inside the pod: TPACKET_V3 rings read in batches, bounded end to end.

Why this shape (design.md, "Capture engine (measured on this machine)"):

- The hot path is an AF_PACKET socket with a TPACKET_V3 mmap ring. The kernel
  fills whole blocks and hands them over; the reader walks the retired blocks
  in place with a C extension (agent/blocks.py: a few ns per packet, a 4 MiB
  block in well under a millisecond) into two byte strings, frames and packed
  per-frame records, that become one PacketBatch as they are, and gives the
  blocks back to the kernel right after. No Python object is made per packet:
  the capture costs a small multiple of tcpdump -w's CPU (bench/capture_bench.py).
  A recv() loop costs twice the CPU and scapy's sniffer dissects every packet
  (100x slower); neither is used here.
- The filter runs in the kernel (SO_ATTACH_FILTER), compiled by libpcap through
  ctypes (no C extension, no scapy import: the agent starts in well under a
  second). The compiled program also returns the snap length, so truncation
  happens in the kernel too. libpcap's compile cost grows about quadratically
  with the expression (a 100 KB ``udp or udp or ...`` took 35 s and 5.5 GB), so
  a filter is at most MAX_FILTER_CHARS printable characters and is compiled
  once per link type, off the event loop, in a child process (``python -I -S``,
  ~20 ms) limited to COMPILE_MEMORY bytes of address space and COMPILE_SECONDS:
  a filter that would cost more is INVALID_ARGUMENT, and the agent never pays.
- The socket is created with protocol 0 (it receives nothing), gets its ring
  and filter, and only then is bound with ETH_P_ALL: no unfiltered packet can
  slip in before the filter is attached.
- Between the reader thread and the gRPC stream sits a queue bounded in
  *bytes*. When the client is slow the reader never blocks (that would
  overflow the ring silently): it drops whole batches and counts every packet
  it drops, per interface. Kernel drops (ring full) come from
  PACKET_STATISTICS. Both are reported, so ``sent == delivered + agent drops +
  kernel drops`` holds exactly.
- Every capture is bounded: duration, packets and bytes have agent defaults
  (1 h, unlimited, 1 GiB) and hard maximums; the request may only lower them.
- Memory is bounded per agent: at most MAX_CAPTURES captures at once (one more
  is RESOURCE_EXHAUSTED), each with RING_BYTES of rings in total however many
  interfaces it names (smaller blocks per ring when there are many) and
  QUEUE_BYTES of queue: MAX_CAPTURES x 48 MiB = 384 MiB above the agent's
  baseline at worst.

A failing capture ends its own stream with a status; it never takes the agent
down (an ephemeral container is never restarted).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import fcntl
import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from meridio_debug.agent import blocks
from meridio_debug.agent.errors import AgentError, few
from meridio_debug.agent.version import PROTOCOL_VERSION
from meridio_debug.protos import agent_pb2 as pb

# Limits: defaults when the request leaves a field 0, and hard maximums.
DEFAULT_DURATION_S = 3600.0
MAX_DURATION_S = 24 * 3600.0
DEFAULT_MAX_BYTES = 1 << 30
MAX_BYTES = 64 << 30
DEFAULT_SNAPLEN = 262144
MAX_POINTS = 64  # sockets per capture (one per named interface)

RING_BYTES = 32 << 20  # per capture, shared by its sockets
# Every block read is one gRPC message (~0.5 ms of CPU on the two sides whatever its
# size), so blocks are big: 4 MiB blocks cost 0.23-0.30 us per extra packet where 1 MiB
# blocks cost 0.36-0.40 (alternated runs, same load, ~60-110k pps).
BLOCK_SIZE = 4 << 20
MIN_BLOCK_SIZE = 128 << 10  # holds a 64 KiB GRO packet; used when many interfaces share
MAX_CAPTURES = 8  # at once, per agent
MAX_FILTER_CHARS = 4096
COMPILE_MEMORY = 256 << 20  # address space of the compiling child
COMPILE_SECONDS = 3.0
MIN_BLOCKS = 4
FRAME_SIZE = 2048  # only validated by the kernel for TPACKET_V3
# A partly filled block is handed over after this. Every block read becomes one gRPC
# message, and a message costs ~0.5 ms of CPU (agent + controller, whatever its size):
# with 20 ms a capture of ~1k pps cost 33 ms of CPU per second, with 100 ms 15, with
# 250 ms 10 (measured on this machine) -- and a capture in 48 pods pays it 48 times.
# Busy rings fill their 4 MiB blocks sooner (280k pps of 64-byte frames: every 0.1 s).
# A stop does not wait for the timer when the current block is empty (Ring.filling). A
# request may ask for less (the active trace waits for a few probe packets: 20 ms).
BLOCK_TIMEOUT_MS = 200
MAX_BLOCK_TIMEOUT_MS = 1000
STOP_GRACE_S = 0.03  # packets still in the kernel's receive path when a stop comes
QUEUE_BYTES = 16 << 20  # reader -> stream, in bytes of frames
BATCH_BYTES = 4 << 20  # at most this much frame data per message
# Idle, a heartbeat per HEARTBEAT_S carries the watermark (an idle capture cost 11.8 ms
# of CPU per second with one per 0.2 s and a poll per 0.1 s, 5 ms with these).
HEARTBEAT_S = 1.0
STATS_EVERY_S = 1.0
# Packets with a timestamp older than now - (block timeout + this) have surely been
# read: the kernel retires a block at most its timeout after its first packet; the
# rest is timer and scheduling slack.
WATERMARK_SLACK_NS = 80_000_000

SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
TPACKET_V3 = 2
SO_ATTACH_FILTER = 26
ETH_P_ALL = 0x0003
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
SIOCGIFHWADDR = 0x8927
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
ARPHRD_ETHER = 1

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
# ARPHRD_* (the device's header type) -> pcap LINKTYPE_* of a SOCK_RAW frame.
ARPHRD_TO_LINKTYPE = {
    1: LINKTYPE_ETHERNET,  # ether, veth, bridge, vlan, macvlan, vxlan
    772: LINKTYPE_ETHERNET,  # loopback (zeroed Ethernet header)
    768: LINKTYPE_RAW,  # ipip
    776: LINKTYPE_RAW,  # sit
    778: LINKTYPE_RAW,  # gre
    823: LINKTYPE_RAW,  # ip6gre
    519: LINKTYPE_RAW,  # rawip
    65534: LINKTYPE_RAW,  # none (tun, wireguard)
}

# tpacket_block_desc: block_status, num_pkts, offset_to_first_pkt, blk_len
_BLOCK = struct.Struct("<IIII")
_BLOCK_STATUS_OFF = 8
_STATUS = struct.Struct("<I")
_STATS = struct.Struct("<III")  # tpacket_stats_v3: packets, drops, freeze_q_cnt


class CaptureError(AgentError):
    """A capture cannot start or failed; subclasses say which gRPC status fits."""


class InvalidCapture(CaptureError):
    """The request is wrong (bad filter, limits out of range): INVALID_ARGUMENT."""


class InterfaceNotFound(CaptureError):
    """An interface named in the request is not in this pod: NOT_FOUND."""


class CaptureUnavailable(CaptureError):
    """The capture engine cannot run here (no libpcap, no CAP_NET_RAW): UNAVAILABLE."""


class TooManyCaptures(CaptureError):
    """MAX_CAPTURES captures already run in this agent: RESOURCE_EXHAUSTED."""


# --- libpcap (filter compiler only) -------------------------------------------------


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _SockaddrLL(ctypes.Structure):
    _fields_ = [
        ("sll_family", ctypes.c_ushort),
        ("sll_protocol", ctypes.c_ushort),
        ("sll_ifindex", ctypes.c_int),
        ("sll_hatype", ctypes.c_ushort),
        ("sll_pkttype", ctypes.c_ubyte),
        ("sll_halen", ctypes.c_ubyte),
        ("sll_addr", ctypes.c_ubyte * 8),
    ]


_pcap_lock = threading.Lock()
_pcap: ctypes.CDLL | None = None


def preload_libpcap() -> None:
    """Load libpcap now if it is there (a process that forks agents does it once for all)."""
    with contextlib.suppress(CaptureUnavailable):
        _libpcap()


def _libpcap() -> ctypes.CDLL:
    global _pcap
    if _pcap is not None:
        return _pcap
    name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise CaptureUnavailable(
            f"cannot load libpcap ({name}) to compile the filter: {exc}; install libpcap"
        ) from exc
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_compile.restype = ctypes.c_int
    lib.pcap_compile.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(_BpfProgram),
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_uint32,
    ]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_freecode.restype = None
    lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
    lib.pcap_close.restype = None
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    _pcap = lib
    return lib


# Run as ``python -I -S -c`` (no site, no project import: ~20 ms): limits itself,
# loads libpcap, compiles stdin, writes the program to stdout; exit 2 + message
# on stderr for a filter libpcap refuses.
_COMPILE_CHILD = """
import ctypes, resource, sys
lib_name, linktype, snaplen, mem, cpu = sys.argv[1], *map(int, sys.argv[2:])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
expr = sys.stdin.buffer.read()
class Prog(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p)]
lib = ctypes.CDLL(lib_name)
lib.pcap_open_dead.restype = ctypes.c_void_p
lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(Prog), ctypes.c_char_p,
                             ctypes.c_int, ctypes.c_uint32]
lib.pcap_geterr.restype = ctypes.c_char_p
lib.pcap_geterr.argtypes = [ctypes.c_void_p]
handle = lib.pcap_open_dead(linktype, snaplen)
prog = Prog()
if lib.pcap_compile(handle, ctypes.byref(prog), expr, 1, 0xFFFFFFFF):
    sys.stderr.buffer.write(lib.pcap_geterr(handle) or b"rejected")
    sys.exit(2)
sys.stdout.buffer.write(ctypes.string_at(prog.bf_insns, prog.bf_len * 8))
"""


def check_filter(expr: str) -> None:
    """Refuse a filter that is too long or has characters no pcap-filter has (before compiling)."""
    if len(expr) > MAX_FILTER_CHARS:
        raise InvalidCapture(
            f"the filter has {len(expr)} characters; at most {MAX_FILTER_CHARS} "
            "(a long filter costs the agent memory and time to compile)"
        )
    if not expr.isprintable() or not expr.isascii():
        raise InvalidCapture("the filter has control or non-ASCII characters (a NUL, a newline...)")


def compile_filter(
    expr: str, linktype: int = LINKTYPE_ETHERNET, snaplen: int = DEFAULT_SNAPLEN
) -> bytes:
    """Compile a pcap-filter expression to classic BPF (struct sock_filter[] bytes), bounded.

    Blocking (a child process): call it from a worker thread. The program
    returns ``snaplen`` for accepted packets, so the kernel also truncates.
    Raises InvalidCapture with libpcap's own message, or when compiling would
    cost more than COMPILE_MEMORY bytes or COMPILE_SECONDS.
    """
    check_filter(expr)
    if not expr.strip():
        return compile_in_process("", linktype, snaplen)  # the empty filter: accept all
    lib = _libpcap()
    argv = [
        sys.executable, "-I", "-S", "-c", _COMPILE_CHILD,
        str(lib._name), str(linktype), str(snaplen), str(COMPILE_MEMORY),
        str(int(COMPILE_SECONDS) + 1),
    ]  # fmt: skip
    try:
        done = subprocess.run(
            argv, input=expr.encode(), capture_output=True, timeout=COMPILE_SECONDS, check=False
        )
    except subprocess.TimeoutExpired:
        raise InvalidCapture(
            f"the filter takes more than {COMPILE_SECONDS:g} s to compile; simplify it"
        ) from None
    except OSError as exc:
        raise CaptureUnavailable(f"cannot run the filter compiler: {exc}") from exc
    if done.returncode == 2:
        message = done.stderr.decode(errors="replace")[:200]
        raise InvalidCapture(f"invalid filter: {message}")
    if done.returncode != 0 or not done.stdout or len(done.stdout) % 8:
        raise InvalidCapture(
            f"the filter costs more than {COMPILE_MEMORY >> 20} MiB or "
            f"{COMPILE_SECONDS:g} s to compile (compiler exit {done.returncode}); simplify it"
        )
    return done.stdout


def compile_in_process(
    expr: str, linktype: int = LINKTYPE_ETHERNET, snaplen: int = DEFAULT_SNAPLEN
) -> bytes:
    """Compile in this process: only for expressions whose cost is known to be tiny."""
    lib = _libpcap()
    with _pcap_lock:
        handle = lib.pcap_open_dead(linktype, snaplen)
        if not handle:
            raise CaptureUnavailable("libpcap: pcap_open_dead failed")
        try:
            prog = _BpfProgram()
            if lib.pcap_compile(handle, ctypes.byref(prog), expr.encode(), 1, PCAP_NETMASK_UNKNOWN):
                message = (lib.pcap_geterr(handle) or b"").decode(errors="replace")
                raise InvalidCapture(f"invalid filter: {message}")
            try:
                return ctypes.string_at(prog.bf_insns, prog.bf_len * 8)
            finally:
                lib.pcap_freecode(ctypes.byref(prog))
        finally:
            lib.pcap_close(handle)


# --- the pod's interfaces -----------------------------------------------------------


def interface_linktype(name: str) -> int:
    """The pcap linktype of SOCK_RAW frames of ``name`` (ioctl, so it is this netns's view)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        req = struct.pack("16s24x", name.encode()[:15])
        res = fcntl.ioctl(probe.fileno(), SIOCGIFHWADDR, req)
        (arphrd,) = struct.unpack_from("<H", res, 16)
    except OSError:
        return LINKTYPE_ETHERNET
    finally:
        probe.close()
    return ARPHRD_TO_LINKTYPE.get(arphrd, LINKTYPE_ETHERNET)


def list_interfaces() -> list[tuple[int, str]]:
    """(ifindex, name) of this network namespace (glibc asks netlink: netns-correct, unlike /sys)."""
    return sorted(socket.if_nameindex())


def interface_info(index: int, name: str) -> pb.CaptureInterface:
    return pb.CaptureInterface(index=index, name=name, linktype=interface_linktype(name))


# --- the plan: a validated request --------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One capture socket: bound to an interface, or to all (ifindex 0, "any")."""

    name: str
    ifindex: int
    linktype: int


@dataclass(frozen=True)
class Plan:
    points: tuple[Point, ...]
    filter: str
    programs: dict[int, bytes]  # linktype -> compiled filter, compiled once
    snaplen: int
    duration_s: float
    max_packets: int
    max_bytes: int
    interfaces: tuple[tuple[int, str], ...]
    block_timeout_ms: int = BLOCK_TIMEOUT_MS


def plan(request: pb.CaptureRequest) -> Plan:
    """Validate a request against the limits and this pod's interfaces."""
    if request.snaplen > DEFAULT_SNAPLEN:
        raise InvalidCapture(
            f"snaplen must be between 1 and {DEFAULT_SNAPLEN} (0: {DEFAULT_SNAPLEN})"
        )
    if not 0 <= request.duration_s <= MAX_DURATION_S or request.duration_s != request.duration_s:
        raise InvalidCapture(
            f"duration_s must be between 0 and {MAX_DURATION_S:.0f} (0: {DEFAULT_DURATION_S:.0f})"
        )
    check_filter(request.filter)
    if request.block_timeout_ms > MAX_BLOCK_TIMEOUT_MS:
        raise InvalidCapture(
            f"block_timeout_ms must be at most {MAX_BLOCK_TIMEOUT_MS} (0: {BLOCK_TIMEOUT_MS})"
        )
    if request.max_bytes > MAX_BYTES:
        raise InvalidCapture(f"max_bytes must be at most {MAX_BYTES} (0: {DEFAULT_MAX_BYTES})")
    names = list(dict.fromkeys(request.interfaces))
    if len(names) > MAX_POINTS:
        raise InvalidCapture(f"at most {MAX_POINTS} interfaces per capture (or 'any')")
    interfaces = tuple(list_interfaces())
    by_name = {n: i for i, n in interfaces}
    if not names or names == ["any"]:
        points: tuple[Point, ...] = (Point("any", 0, LINKTYPE_ETHERNET),)
    else:
        if "any" in names:
            raise InvalidCapture("'any' cannot be combined with named interfaces")
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise InterfaceNotFound(
                f"no interface {few(unknown)} in this pod; it has: "
                f"{', '.join(n for _, n in interfaces)}"
            )
        points = tuple(Point(n, by_name[n], interface_linktype(n)) for n in names)
    snaplen = request.snaplen or DEFAULT_SNAPLEN
    # Compile once per link type now, so a bad filter is INVALID_ARGUMENT before any socket.
    programs = {
        lt: compile_filter(request.filter, lt, snaplen) for lt in {p.linktype for p in points}
    }
    return Plan(
        points=points,
        filter=request.filter,
        programs=programs,
        snaplen=snaplen,
        duration_s=request.duration_s or DEFAULT_DURATION_S,
        max_packets=request.max_packets,
        max_bytes=request.max_bytes or DEFAULT_MAX_BYTES,
        interfaces=interfaces,
        block_timeout_ms=request.block_timeout_ms or BLOCK_TIMEOUT_MS,
    )


# --- one ring ---------------------------------------------------------------------


class Ring:
    """An AF_PACKET socket with a TPACKET_V3 receive ring and a kernel filter."""

    def __init__(
        self, point: Point, program: bytes, ring_bytes: int, timeout_ms: int = BLOCK_TIMEOUT_MS
    ) -> None:
        self.point = point
        # Blocks shrink (to MIN_BLOCK_SIZE) before the ring outgrows its share.
        self.block_size = max(MIN_BLOCK_SIZE, min(BLOCK_SIZE, ring_bytes // MIN_BLOCKS))
        self.block_nr = max(MIN_BLOCKS, ring_bytes // self.block_size)
        self.kernel_packets = 0
        self.kernel_drops = 0
        self._next = 0
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError as exc:
            raise CaptureUnavailable(
                f"cannot open a packet socket: {exc} (needs CAP_NET_RAW)"
            ) from exc
        try:
            self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            insns = ctypes.create_string_buffer(program, len(program))
            fprog = _SockFprog(len(program) // 8, ctypes.addressof(insns))
            self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))
            frames = self.block_size // FRAME_SIZE * self.block_nr
            req = struct.pack(
                "<7I", self.block_size, self.block_nr, FRAME_SIZE, frames, timeout_ms, 0, 0
            )
            self.sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
            self.mm = mmap.mmap(
                self.sock.fileno(),
                self.block_size * self.block_nr,
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
            )
            self._bind(point.ifindex)
        except OSError as exc:
            self.sock.close()
            raise CaptureUnavailable(
                f"cannot set up the capture ring on {point.name}: {exc}"
            ) from exc

    def _bind(self, ifindex: int) -> None:
        # Python's bind() needs an interface name; "any" is ifindex 0, so use libc.
        libc = ctypes.CDLL(None, use_errno=True)
        addr = _SockaddrLL()
        addr.sll_family = socket.AF_PACKET
        addr.sll_protocol = socket.htons(ETH_P_ALL)
        addr.sll_ifindex = ifindex
        if libc.bind(self.sock.fileno(), ctypes.byref(addr), ctypes.sizeof(addr)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"bind: {os.strerror(err)}")

    def read(self, limit_bytes: int, max_packets: int, max_bytes: int) -> blocks.Parsed | None:
        """Parse the retired blocks (up to ``limit_bytes`` of them) and give them back.

        ``max_packets``/``max_bytes``: what the capture may still send (-1: no limit).
        """
        offsets: list[int] = []
        total = 0
        mm = self.mm
        nxt = self._next
        while total < limit_bytes:
            off = nxt * self.block_size
            status, _, _, blk_len = _BLOCK.unpack_from(mm, off + _BLOCK_STATUS_OFF)
            if not status & TP_STATUS_USER:
                break
            offsets.append(off)
            total += blk_len
            nxt = (nxt + 1) % self.block_nr
            if nxt == self._next:  # the whole ring
                break
        if not offsets:
            return None
        try:
            return blocks.parse(mm, offsets, max_packets, max_bytes)
        finally:
            for off in offsets:
                _STATUS.pack_into(mm, off + _BLOCK_STATUS_OFF, TP_STATUS_KERNEL)
            self._next = nxt

    def filling(self) -> bool:
        """Whether the kernel is filling a block that holds packets (the timer retires it)."""
        off = self._next * self.block_size
        status, num_pkts = struct.unpack_from("<II", self.mm, off + _BLOCK_STATUS_OFF)
        return bool(num_pkts) and not status & TP_STATUS_USER

    def read_stats(self) -> None:
        """Add the kernel's counters since the last read (reading resets them)."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS.size)
        packets, drops, _ = _STATS.unpack(raw)
        self.kernel_packets += packets  # already includes the drops
        self.kernel_drops += drops

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.mm.close()
        self.sock.close()


# --- the session: rings + reader thread + bounded outbox ------------------------------


class Outbox:
    """Reader thread -> event loop, bounded in bytes; the reader drops rather than waits."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self._loop = loop
        self._limit = limit
        self._queue: asyncio.Queue[tuple[pb.CaptureChunk | None, int]] = asyncio.Queue()
        self._lock = threading.Lock()
        self._bytes = 0

    def offer(self, chunk: pb.CaptureChunk | None, size: int, force: bool = False) -> bool:
        """From the reader thread: queue ``chunk`` unless that would exceed the limit."""
        with self._lock:
            if not force and self._bytes and self._bytes + size > self._limit:
                return False
            self._bytes += size
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (chunk, size))
        except RuntimeError:  # the loop is gone: the stream is over
            return False
        return True

    async def get(self) -> tuple[pb.CaptureChunk | None, int]:
        return await self._queue.get()

    def done(self, size: int) -> None:
        """The consumer sent a chunk of ``size`` bytes: make room."""
        with self._lock:
            self._bytes -= size

    @property
    def queued_bytes(self) -> int:
        return self._bytes


class CaptureSession:
    """One running capture: its rings, its reader thread, its counters."""

    def __init__(self, p: Plan, outbox: Outbox, on_done: Callable[[], None]) -> None:
        self.plan = p
        self.id = uuid.uuid4().hex
        self._outbox = outbox
        self._on_done = on_done
        self._stop = threading.Event()
        # stop() wakes the capture thread's poll at once (a stop answers in ~the
        # kernel's block timeout, not after the next poll timeout)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.Lock()  # never write to the pipe once it is closed
        self._wake_open = True
        self.end_reason = ""
        self.packets = 0
        self.bytes = 0
        self.agent_drops = 0
        self.per_if_packets: Counter[int] = Counter()
        self.per_if_drops: Counter[int] = Counter()
        self.known = {i for i, _ in p.interfaces}
        self.watermark_ns = 0
        self._lag_ns = p.block_timeout_ms * 1_000_000 + WATERMARK_SLACK_NS
        ring_bytes = RING_BYTES // len(p.points)
        self.rings: list[Ring] = []
        try:
            for point in p.points:
                self.rings.append(
                    Ring(point, p.programs[point.linktype], ring_bytes, p.block_timeout_ms)
                )
        except BaseException:
            for ring in self.rings:
                ring.close()
            self.close_wakeup()
            raise
        self._thread = threading.Thread(
            target=self._run, name=f"capture-{self.id[:8]}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, reason: str) -> None:
        if not self.end_reason:
            self.end_reason = reason
        self._stop.set()
        with self._wake_lock:
            if self._wake_open:
                with contextlib.suppress(BlockingIOError):  # full: already woken
                    os.write(self._wake_w, b"x")

    def close_wakeup(self) -> None:
        """Close the stop pipe (the capture thread's end, or a session never started)."""
        with self._wake_lock:
            if self._wake_open:
                self._wake_open = False
                os.close(self._wake_r)
                os.close(self._wake_w)

    def start_chunk(self) -> pb.CaptureChunk:
        p = self.plan
        start = pb.CaptureStart(
            capture_id=self.id,
            points=[pt.name for pt in p.points],
            snaplen=p.snaplen,
            protocol_version=PROTOCOL_VERSION,
            duration_s=p.duration_s,
            max_packets=p.max_packets,
            max_bytes=p.max_bytes,
        )
        for index, name in p.interfaces:
            start.interfaces.append(interface_info(index, name))
        return pb.CaptureChunk(start=start)

    def stats_chunk(self, final: bool) -> pb.CaptureChunk:
        stats = pb.CaptureStats(
            final=final,
            packets=self.packets,
            bytes=self.bytes,
            agent_drops=self.agent_drops,
            end_reason=self.end_reason if final else "",
            watermark_ns=self.watermark_ns,
        )
        for ring in self.rings:
            stats.kernel_packets += ring.kernel_packets
            stats.kernel_drops += ring.kernel_drops
            stats.points.add(
                point=ring.point.name,
                kernel_packets=ring.kernel_packets,
                kernel_drops=ring.kernel_drops,
            )
        for index in sorted(set(self.per_if_packets) | set(self.per_if_drops)):
            stats.interfaces.add(
                ifindex=index,
                packets=self.per_if_packets[index],
                agent_drops=self.per_if_drops[index],
            )
        return pb.CaptureChunk(stats=stats)

    # reader thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # the stream ends with the error; the agent lives on
            self.stop(f"error: {type(exc).__name__}: {exc}")
        finally:
            for ring in self.rings:
                with contextlib.suppress(OSError):
                    ring.read_stats()
                ring.close()
            self.close_wakeup()
            self._outbox.offer(None, 0, force=True)
            self._on_done()

    def _loop(self) -> None:
        p = self.plan
        deadline = time.monotonic() + p.duration_s
        poller = select.poll()
        for ring in self.rings:
            poller.register(ring.sock.fileno(), select.POLLIN | select.POLLERR)
        poller.register(self._wake_r, select.POLLIN)
        last_sent = last_stats = time.monotonic()
        draining_until = settled = 0.0
        while True:
            now = time.monotonic()
            if not draining_until and (self._stop.is_set() or now >= deadline):
                if not self._stop.is_set():
                    self.stop("duration")
                # Blocks still being filled are retired by the kernel's timer: wait for them.
                draining_until = now + 2 * p.block_timeout_ms / 1000 + STOP_GRACE_S
                settled = now + STOP_GRACE_S
                poller.unregister(self._wake_r)  # woken once; now only the rings matter
            if draining_until and (
                now >= draining_until
                or (now >= settled and not any(r.filling() for r in self.rings))
            ):
                self._drain_once()
                return
            if now - last_stats >= STATS_EVERY_S:
                for ring in self.rings:
                    ring.read_stats()
                self._outbox.offer(self.stats_chunk(final=False), 64, force=False)
                last_stats = now
            if self._drain_once():
                last_sent = time.monotonic()
                if self.end_reason in ("packets", "bytes"):
                    return
                continue
            if now - last_sent >= HEARTBEAT_S:
                self.watermark_ns = max(self.watermark_ns, time.time_ns() - self._lag_ns)
                batch = pb.PacketBatch(watermark_ns=self.watermark_ns)
                self._outbox.offer(pb.CaptureChunk(batch=batch), 64)
                last_sent = now
            if draining_until:  # the grace, then until the kernel retires what it fills
                until = settled if now < settled else draining_until
                poller.poll(max(1, int((until - time.monotonic()) * 1000)))
            else:  # until a block is retired, a stop, or the next thing due
                due = min(deadline, last_stats + STATS_EVERY_S, last_sent + HEARTBEAT_S)
                poller.poll(max(1, int((due - time.monotonic()) * 1000)))

    def _drain_once(self) -> bool:
        """Read every retired block of every ring into one or more batches; True if any."""
        got = False
        p = self.plan
        for ring in self.rings:
            while True:
                max_packets = p.max_packets - self.packets if p.max_packets else -1
                parsed = ring.read(BATCH_BYTES, max_packets, p.max_bytes - self.bytes)
                if parsed is None:
                    break
                if parsed[1]:
                    got = True
                self._emit(parsed)
                if self.end_reason in ("packets", "bytes"):
                    return True
        return got

    def _emit(self, parsed: blocks.Parsed) -> None:
        data, meta, counts, last_ts, stop = parsed
        if stop == blocks.STOP_PACKETS:
            self.stop("packets")
        elif stop == blocks.STOP_BYTES:
            self.stop("bytes")
        n = len(meta) // blocks.FRAME_META.size
        if not n:
            return
        # ts of the last frame read: the ring is (nearly) in time order.
        self.watermark_ns = max(self.watermark_ns, min(last_ts, time.time_ns() - self._lag_ns))
        chunk = pb.CaptureChunk()  # filled in place: a PacketBatch passed in would be copied
        batch = chunk.batch
        batch.data, batch.meta, batch.watermark_ns = data, meta, self.watermark_ns
        for index in counts.keys() - self.known:
            self.known.add(index)
            try:
                name = socket.if_indextoname(index)
            except OSError:
                name = f"if{index}"
            batch.new_interfaces.append(interface_info(index, name))
        if self._outbox.offer(chunk, len(data) + len(meta)):
            self.packets += n
            self.bytes += len(data)
            self.per_if_packets.update(counts)
        else:
            self.agent_drops += n
            self.per_if_drops.update(counts)
            if batch.new_interfaces:  # the names must still reach the client
                self.known.difference_update(i.index for i in batch.new_interfaces)


class Registry:
    """Running captures by id, for StopCapture."""

    def __init__(self, limit: int = MAX_CAPTURES) -> None:
        self._sessions: dict[str, CaptureSession] = {}
        self._limit = limit
        self._running = 0  # also counts captures still compiling their filter

    def stop(self, capture_id: str) -> bool:
        session = self._sessions.get(capture_id)
        if session is None:
            return False
        session.stop("stopped")
        return True

    async def run(self, request: pb.CaptureRequest) -> AsyncGenerator[pb.CaptureChunk, None]:
        """Validate, start, and stream one capture; raises CaptureError before the first chunk.

        Whatever ends the stream (limits, StopCapture, the client going away),
        the thread is stopped and joined and the sockets closed before this returns.
        """
        if self._running >= self._limit:
            raise TooManyCaptures(
                f"{self._limit} captures already run in this agent; stop one, or try again later"
            )
        self._running += 1
        try:
            async with contextlib.aclosing(self._run(request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._running -= 1

    async def _run(self, request: pb.CaptureRequest) -> AsyncGenerator[pb.CaptureChunk, None]:
        p = await asyncio.to_thread(plan, request)
        blocks.keep_freed_memory()
        loop = asyncio.get_running_loop()
        outbox = Outbox(loop, QUEUE_BYTES)
        finished = loop.create_future()

        def finish() -> None:
            if not finished.done():
                finished.set_result(None)

        def on_done() -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(finish)

        session = CaptureSession(p, outbox, on_done)
        self._sessions[session.id] = session
        started = False
        try:
            yield session.start_chunk()
            session.start()
            started = True
            while True:
                chunk, size = await outbox.get()
                if chunk is None:
                    break
                yield chunk
                outbox.done(size)
            yield session.stats_chunk(final=True)
        finally:
            self._sessions.pop(session.id, None)
            if started:
                session.stop("cancelled")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(finished), 5.0)
            else:
                for ring in session.rings:
                    ring.close()
                session.close_wakeup()
