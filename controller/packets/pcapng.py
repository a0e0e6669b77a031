"""A small pcapng writer: what a multi-pod capture needs, and nothing else.

Why our own: the file must carry one interface per pod and interface
(``POD/IFACE``), the direction of each packet (EPB flags from the agent's
sll_pkttype) and the capture's drop counters (ISB), in nanoseconds, written in
batches and flushed per batch so a pipe into ``wireshark -k -i -`` is live and a
killed capture still leaves a readable file. No pcapng library in the standard
library does this, and the controller must not import scapy (import-linter).

Blocks written (pcapng spec, draft-ietf-opsawg-pcapng): SHB (once per file),
IDB (if_name, if_description, if_tsresol=9), EPB (epb_flags), ISB (isb_ifrecv,
isb_ifdrop, isb_starttime, isb_endtime). Little-endian, 32-bit aligned.

EPBs are made by controller/packets/merge.py (C, with a Python twin) straight
from the agents' batches, merged in time order; ``write`` of Packet tuples goes
through the same code (one run, written in the given order).

Rotation (``rotate`` files of at most ``max_bytes`` each, like tcpdump -C/-W):
every file is a complete section that repeats the IDBs in the same order, so
interface ids mean the same thing in every file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from meridio_debug.controller.packets import merge as _merge

SHB_TYPE = 0x0A0D0D0A
IDB_TYPE = 0x00000001
EPB_TYPE = 0x00000006
ISB_TYPE = 0x00000005
BYTE_ORDER_MAGIC = 0x1A2B3C4D

# EPB flags: bits 0-1 direction (1 inbound, 2 outbound), bits 2-4 reception type
# (1 unicast, 2 multicast, 3 broadcast, 4 promiscuous), indexed by sll_pkttype
# (PACKET_HOST, _BROADCAST, _MULTICAST, _OTHERHOST, _OUTGOING).
PKTTYPE_FLAGS = (1 | 1 << 2, 1 | 3 << 2, 1 | 2 << 2, 1 | 4 << 2, 2)
INBOUND, OUTBOUND = 1, 2

_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")

# One packet on its way to a file: (ts_ns, interface id, epb flags, frame, original length)
Packet = tuple[int, int, int, bytes, int]
# (ifid, ts_ns, start_ns, received, dropped): one interface's ISB
Stats = tuple[int, int, int, int, int]


def flags_for(pkttype: int) -> int:
    return PKTTYPE_FLAGS[pkttype] if pkttype < len(PKTTYPE_FLAGS) else 0


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + _PADS[len(value) & 3]


def _block(block_type: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", block_type, length) + body + struct.pack("<I", length)


def shb(application: str) -> bytes:
    body = struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1)
    body += _option(4, application.encode()) + _option(0, b"")
    return _block(SHB_TYPE, body)


def idb(linktype: int, snaplen: int, name: str, description: str) -> bytes:
    body = struct.pack("<HHI", linktype, 0, snaplen)
    body += _option(2, name.encode()) + _option(3, description.encode())
    body += _option(9, b"\x09") + _option(0, b"")
    return _block(IDB_TYPE, body)


def isb(ifid: int, ts_ns: int, start_ns: int, recv: int, drop: int | None) -> bytes:
    """Interface statistics; ``drop`` None when not known yet (the option is left out)."""
    body = struct.pack("<III", ifid, ts_ns >> 32, ts_ns & 0xFFFFFFFF)
    body += _option(2, struct.pack("<II", start_ns >> 32, start_ns & 0xFFFFFFFF))
    body += _option(3, struct.pack("<II", ts_ns >> 32, ts_ns & 0xFFFFFFFF))
    body += _option(4, struct.pack("<Q", recv))
    if drop is not None:
        body += _option(5, struct.pack("<Q", drop))
    body += _option(0, b"")
    return _block(ISB_TYPE, body)


@dataclass(frozen=True)
class Interface:
    linktype: int
    snaplen: int
    name: str
    description: str


class Writer:
    """Writes a pcapng stream to a path (with optional rotation) or to an open binary stream."""

    def __init__(
        self,
        path: str | None,
        stream: BinaryIO | None = None,
        max_bytes: int = 0,
        rotate: int = 0,
        application: str = "meridio-debug",
    ) -> None:
        if (path is None) == (stream is None):
            raise ValueError("give a path or a stream")
        self._path = path
        self._stream = stream
        self._max_bytes = max_bytes
        self._rotate = rotate
        self._application = application
        self.interfaces: list[Interface] = []
        self.packets = 0
        self.files: list[str] = []
        self._file_index = -1
        self._size = 0
        self.full = False  # max_bytes reached without rotation: nothing more fits
        # Interface statistics for a rotated file as it is closed (the last file gets
        # the final ones from close()); a file then stays within max_bytes with them.
        self.stats_source: Callable[[], Sequence[Stats]] | None = None
        self._seen: list[int] = []  # packets written per interface id, for interim ISBs
        self._first_ns = 0
        self._out: BinaryIO
        self._open_next()

    def file_name(self, index: int) -> str:
        assert self._path is not None
        if not self._rotate:
            return self._path
        stem, ext = os.path.splitext(self._path)
        return f"{stem}{index:0{len(str(self._rotate - 1))}d}{ext or '.pcapng'}"

    def _open_next(self) -> None:
        if self._stream is not None:
            self._out = self._stream
        else:
            self._file_index += 1
            name = self.file_name(self._file_index % max(self._rotate, 1))
            self._out = open(name, "wb")  # noqa: SIM115 - closed in close()/rotation
            if name not in self.files:
                self.files.append(name)
        head = [shb(self._application)]
        head += [idb(i.linktype, i.snaplen, i.name, i.description) for i in self.interfaces]
        data = b"".join(head)
        self._out.write(data)
        self._size = len(data)

    def add_interface(self, iface: Interface) -> int:
        """Declare an interface; returns its id (IDB written now, repeated in later files)."""
        self.interfaces.append(iface)
        self._seen.append(0)
        block = idb(iface.linktype, iface.snaplen, iface.name, iface.description)
        self._out.write(block)
        self._size += len(block)
        return len(self.interfaces) - 1

    def write(self, packets: Iterable[Packet], limit: int = 0) -> int:
        """Write packets in the given order (at most ``limit`` in total, 0: no limit)."""
        data: list[bytes] = []
        recs: list[bytes] = []
        off = 0
        for ts, ifid, flags, frame, origlen in packets:
            recs.append(_merge.RECORD.pack(ts, ifid, flags, len(frame), origlen, off))
            data.append(frame)
            off += len(frame)
        run = _merge.Run(b"".join(data), b"".join(recs))
        return self.write_runs([run], _merge.EVERYTHING, limit)

    def write_runs(self, runs: Sequence[_merge.Run], mark: int, limit: int = 0) -> int:
        """Write the packets of ``runs`` up to ``mark`` in time order; returns how many.

        Stops at ``limit`` packets in total (0: none) or when ``max_bytes`` is reached
        without rotation (``full``); with rotation a file that would outgrow ``max_bytes``
        is closed with statistics and the next one opened.
        """
        written = 0
        force_first = False
        while not self.full:
            left = limit - self.packets - written if limit else -1
            if left == 0:
                break
            budget = self._max_bytes - self._size - self._isb_room() if self._max_bytes else -1
            tuples = [(r.data, r.records, r.pos) for r in runs]
            epbs, positions, n, first_ts, stop = _merge.merge(
                tuples, mark, left, max(budget, 0) if budget >= 0 else -1, force_first, self._seen
            )
            for run, pos in zip(runs, positions, strict=True):
                run.pos = pos
            if epbs:
                self._out.write(epbs)
                self._size += len(epbs)
            written += n
            if n and not self._first_ns:
                self._first_ns = first_ts
            if stop != _merge.STOP_BUDGET:
                break
            if not self._rotate or self._stream is not None:
                self.full = True
                break
            next_ts = min(
                (
                    _merge.RECORD.unpack_from(r.records, r.pos * _merge.RECORD.size)[0]
                    for r in runs
                    if not r.done
                ),
                default=0,
            )
            self._out.write(self._interim_stats(next_ts))
            self._out.close()
            self._open_next()
            force_first = True  # a packet bigger than a file still goes into one
        self.packets += written
        return written

    def _isb_room(self) -> int:
        """Bytes kept free for the statistics a rotated file ends with."""
        if not self._rotate:
            return 0
        return len(isb(0, 0, 0, 0, 0)) * len(self.interfaces)

    def _interim_stats(self, now_ns: int) -> bytes:
        """ISBs for a rotated file: the agents' latest counters, else what was written so far.

        Agents report their counters every second; a file that fills sooner still
        says how many packets each interface had delivered (drops left out: not known).
        """
        stats = list(self.stats_source()) if self.stats_source is not None else []
        have = {st[0] for st in stats}
        blocks = [isb(*st) for st in stats]
        blocks += [
            isb(ifid, now_ns, self._first_ns, self._seen[ifid], None)
            for ifid in range(len(self.interfaces))
            if ifid not in have
        ]
        return b"".join(blocks)

    def flush(self) -> None:
        self._out.flush()

    def close(self, stats: Sequence[Stats] = ()) -> None:
        """Write ISBs ``(ifid, ts_ns, start_ns, recv, drop)`` and close (a stream is only flushed)."""
        self._out.write(b"".join(isb(*s) for s in stats))
        self._out.flush()
        if self._stream is None:
            self._out.close()
