"""The agents' batches -> EPBs in time order, without a Python object per packet.

Why this module: ``capture -w`` must cost at most 3x tcpdump -w per packet (issue
16; tcpdump: 0.13 us). Turning every packet into a tuple, sorting the tuples and
packing an EPB for each cost the controller 0.9 us per packet. Here a batch stays
two byte strings as the agent sent them (PacketBatch.data and .meta); the loops
over packets run in a small C extension (controller/packets/_epb.c, built with
the package) and Python only handles batches. ``*_python`` are the same
functions in Python, used where the extension was not built; the unit test
tests/unit/test_capture_native.py runs both on the same input and compares the
bytes, so they cannot drift apart.

The steps:

- ``ifindexes(meta)``: which interfaces a batch has, so the caller declares them
  (an IDB before the first EPB that names it).
- ``prepare(data, meta, ifids, flags)`` -> a Run: one 32-byte RECORD per frame
  (ts, interface id in the file, EPB flags, caplen, origlen, offset in data),
  sorted by timestamp, stable (a ring is nearly in time order, so this is one
  pass when it already is).
- ``merge(runs, mark, ...)``: the records of all runs with ts <= ``mark`` (an
  agent watermark; the maximum for "everything"), k-way merged by (ts, run
  index) and encoded as EPBs, stopping at a packet count or a byte budget (file
  size, rotation). Ties go to the earlier run, so the result is what a stable
  sort of all pending packets in (pod, arrival) order would give.

FRAME_META is the agent's per-frame record (protos/agent.proto, PacketBatch.meta);
agent/blocks.py writes it, a unit test checks the two layouts agree.
"""

from __future__ import annotations

import ctypes
import heapq
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

FRAME_META = struct.Struct("<qIIIB3x")  # ts_ns, ifindex, caplen, origlen, sll_pkttype
RECORD = struct.Struct("<qIIIIQ")  # ts_ns, ifid, epb flags, caplen, origlen, data offset
EPB_HEAD = struct.Struct("<IIIIIII")
EPB_TAIL = struct.Struct("<HHIHHI")
EPB_TYPE = 6
EPB_FIXED = 44
PADS = (b"", b"\0\0\0", b"\0\0", b"\0")
EVERYTHING = (1 << 63) - 1  # the mark that releases every pending packet
STOP_NONE, STOP_PACKETS, STOP_BUDGET = 0, 1, 2

# (epbs, positions, written, first_ts or -1, STOP_*)
Merged = tuple[bytes, list[int], int, int, int]
RunTuple = tuple[bytes, bytes, int]


@dataclass
class Run:
    """One batch on its way into a file: frames, their sorted records, how far it is written."""

    data: bytes
    records: bytes
    pos: int = 0

    @property
    def count(self) -> int:
        return len(self.records) // RECORD.size

    @property
    def done(self) -> bool:
        return self.pos >= self.count


def ifindexes_python(meta: bytes) -> list[int]:
    if len(meta) % FRAME_META.size:
        raise ValueError("batch meta is not a whole number of frame records")
    seen: dict[int, None] = {}
    for _ts, index, _cap, _orig, _ptype in FRAME_META.iter_unpack(meta):
        seen.setdefault(index)
    return list(seen)


def prepare_python(data: bytes, meta: bytes, ifids: dict[int, int], flags: Sequence[int]) -> bytes:
    if len(meta) % FRAME_META.size:
        raise ValueError("batch meta is not a whole number of frame records")
    if len(flags) != 8:
        raise ValueError("flags must have 8 entries (sll_pkttype 0-7)")
    recs: list[tuple[int, int, int, int, int, int]] = []
    offset = 0
    for ts, index, cap, orig, ptype in FRAME_META.iter_unpack(meta):
        if index not in ifids:
            raise KeyError(f"ifindex {index} has no interface id")
        if offset + cap > len(data):
            raise ValueError("batch meta names more bytes than its data holds")
        recs.append((ts, ifids[index], flags[ptype & 7], cap, orig, offset))
        offset += cap
    recs.sort(key=lambda r: r[0])
    return b"".join(RECORD.pack(*r) for r in recs)


def _order(runs: Sequence[RunTuple], mark: int) -> Iterator[tuple[int, tuple[int, ...]]]:
    """(run index, record) in merge order; the caller advances its own positions."""
    recs = [list(RECORD.iter_unpack(r[1])) for r in runs]
    pos = [max(r[2], 0) for r in runs]
    heap = [
        (recs[i][p][0], i) for i, p in enumerate(pos) if p < len(recs[i]) and recs[i][p][0] <= mark
    ]
    heapq.heapify(heap)
    while heap:
        _ts, i = heap[0]
        rec = recs[i][pos[i]]
        yield i, rec
        pos[i] += 1
        if pos[i] < len(recs[i]) and recs[i][pos[i]][0] <= mark:
            heapq.heapreplace(heap, (recs[i][pos[i]][0], i))
        else:
            heapq.heappop(heap)


def merge_python(
    runs: Sequence[RunTuple],
    mark: int,
    max_packets: int,
    budget: int,
    force_first: bool,
    counts: list[int],
) -> Merged:
    for data, records, p in runs:
        if len(records) % RECORD.size:
            raise ValueError("records are not a whole number of 32-byte records")
        for ts, ifid, _f, cap, _o, off in RECORD.iter_unpack(records[max(p, 0) * RECORD.size :]):
            if ts > mark:
                break
            if off + cap > len(data) or ifid >= len(counts):
                raise ValueError("a record points outside its data or interfaces")
    parts: list[bytes] = []
    positions = [max(r[2], 0) for r in runs]
    written, first_ts, stop = 0, -1, STOP_NONE
    for i, (ts, ifid, flags, cap, orig, off) in _order(runs, mark):
        length = EPB_FIXED + cap + ((-cap) & 3)
        if 0 <= max_packets <= written:
            stop = STOP_PACKETS
            break
        if 0 <= budget < length and not (force_first and written == 0):
            stop = STOP_BUDGET
            break
        parts.append(
            EPB_HEAD.pack(EPB_TYPE, length, ifid, ts >> 32 & 0xFFFFFFFF, ts & 0xFFFFFFFF, cap, orig)
        )
        parts.append(runs[i][0][off : off + cap])
        parts.append(PADS[cap & 3])
        parts.append(EPB_TAIL.pack(2, 4, flags, 0, 0, length))
        if budget >= 0:
            budget -= length
        if not written:
            first_ts = ts
        written += 1
        counts[ifid] += 1
        positions[i] += 1
    return b"".join(parts), positions, written, first_ts, stop


def packets_in_order(runs: Sequence[Run], mark: int) -> Iterator[tuple[int, int, int, bytes, int]]:
    """(ts, ifid, flags, frame, origlen) in merge order, each advancing its run (``--print``)."""
    tuples = [(r.data, r.records, r.pos) for r in runs]
    for i, (ts, ifid, flags, cap, orig, off) in _order(tuples, mark):
        runs[i].pos += 1
        yield ts, ifid, flags, runs[i].data[off : off + cap], orig


def iter_frames(data: bytes, meta: bytes) -> Iterator[tuple[int, int, int, bytes, int]]:
    """(ts, ifindex, sll_pkttype, frame, origlen) of one batch, in the agent's order."""
    off = 0
    for ts, index, cap, orig, ptype in FRAME_META.iter_unpack(meta):
        yield ts, index, ptype, data[off : off + cap], orig
        off += cap


def frame_count(meta: bytes) -> int:
    return len(meta) // FRAME_META.size


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


_ext: Any
try:
    from meridio_debug.controller.packets import _epb as _ext
except ImportError:  # built without a C compiler: the Python twins above
    _ext = None

ENGINE = "c" if _ext is not None else "python"
ifindexes: Callable[[bytes], list[int]] = _ext.ifindexes if _ext else ifindexes_python
prepare: Callable[[bytes, bytes, dict[int, int], Sequence[int]], bytes] = (
    _ext.prepare if _ext else prepare_python
)
merge: Callable[[Sequence[RunTuple], int, int, int, bool, list[int]], Merged] = (
    _ext.merge if _ext else merge_python
)
