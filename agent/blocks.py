"""Retired TPACKET_V3 blocks -> one batch: frames concatenated + one record per frame.

Why this module: the agent's only per-packet loop. In Python it cost 0.35 us per
packet and filling PacketBatch's former five repeated fields another 0.35 us,
against 0.13 us for the whole of tcpdump -w (bench/capture_bench.py, issue 16).
So the loop is a small C extension (agent/_blocks.c, built by setuptools with the
package) whose result is two flat byte strings that go into PacketBatch.data and
PacketBatch.meta as they are: no per-packet Python object is ever made.

``parse_python`` is the same walk in Python, used where the extension was not
built (``pip install`` without a C compiler); tests/unit/test_capture_native.py
runs both on the same blocks and compares the bytes, so the fallback cannot drift.

FRAME_META is the wire layout of one record (protos/agent.proto, PacketBatch.meta):
little-endian int64 ts_ns, uint32 ifindex, uint32 caplen, uint32 origlen,
uint8 sll_pkttype, 3 bytes of padding.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Sequence
from typing import Any

FRAME_META = struct.Struct("<qIIIB3x")

TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
ARPHRD_ETHER = 1
STOP_NONE, STOP_PACKETS, STOP_BYTES = 0, 1, 2

# tpacket3_hdr (48 bytes) followed by sockaddr_ll (at TPACKET_ALIGN(48) = 48)
_PKT = struct.Struct("<IIIIIIHHIIHH8xHHiHBB")

# (data, meta, packets per ifindex, ts of the last frame, STOP_*)
Parsed = tuple[bytes, bytes, dict[int, int], int, int]


PKT_HDR = 60  # tpacket3_hdr (48) + sockaddr_ll up to sll_halen, as agent/_blocks.c


def parse_python(buf: Any, offsets: Sequence[int], max_packets: int, max_bytes: int) -> Parsed:
    """The frames of the blocks at ``offsets`` of ``buf``, at most ``max_packets`` frames and
    ``max_bytes`` captured bytes (-1: no limit); VLAN tags put back in as libpcap does."""
    data: list[bytes] = []
    meta: list[bytes] = []
    counts: dict[int, int] = {}
    packets = size = last_ts = 0
    stop = STOP_NONE
    unpack, pack = _PKT.unpack_from, FRAME_META.pack
    for off in offsets:
        num, first, blen = struct.unpack_from("<III", buf, off + 12)
        if num > blen // PKT_HDR + 1:
            raise ValueError("block claims more packets than it can hold")
        pos = off + first
        for _ in range(num):
            f = unpack(buf, pos)
            nxt, sec, nsec, snap, length, status, mac = f[:7]
            tci, tpid, index, hatype, pkttype = f[9], f[10], f[14], f[15], f[16]
            frame = bytes(buf[pos + mac : pos + mac + snap])
            if status & TP_STATUS_VLAN_VALID and hatype == ARPHRD_ETHER and snap >= 12:
                tpid = tpid if status & TP_STATUS_VLAN_TPID_VALID else 0x8100
                frame = frame[:12] + struct.pack("!HH", tpid, tci & 0xFFFF) + frame[12:]
                length += 4
            if 0 <= max_packets <= packets:
                stop = STOP_PACKETS
                break
            if 0 <= max_bytes < size + len(frame):
                stop = STOP_BYTES
                break
            ts = sec * 1_000_000_000 + nsec
            data.append(frame)
            meta.append(pack(ts, index, len(frame), length & 0xFFFFFFFF, pkttype))
            counts[index] = counts.get(index, 0) + 1
            packets += 1
            size += len(frame)
            last_ts = ts
            pos += nxt
        if stop:
            break
    if not stop and 0 <= max_packets <= packets:
        stop = STOP_PACKETS
    if not stop and 0 <= max_bytes <= size:
        stop = STOP_BYTES
    return b"".join(data), b"".join(meta), counts, last_ts, stop


# glibc mallopt parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> None:
    """Let this process reuse the memory of freed batches instead of faulting in new pages.

    Batches are 0.1-4 MiB: glibc gives such blocks back to the kernel on free (mmap
    threshold, heap trimming), and every next batch page-faults fresh zeroed pages.
    That was 42k faults in the agent and 21k in the controller per 840k captured packets,
    about a third of their CPU (bench/capture_bench.py under perf). Keeping up to 32 MiB
    of freed heap removes them. Process-wide and idempotent; nothing outside glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    mallopt(M_MMAP_THRESHOLD, 16 << 20)
    mallopt(M_TRIM_THRESHOLD, 32 << 20)


def _native() -> Callable[[Any, Sequence[int], int, int], Parsed] | None:
    try:
        from meridio_debug.agent import _blocks
    except ImportError:
        return None
    return _blocks.parse


parse_native = _native()
parse = parse_native or parse_python
ENGINE = "c" if parse_native is not None else "python"
