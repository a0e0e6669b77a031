"""Capture in many pods at once into one pcapng (or lines): the job behind ``capture``.

Why it is built this way:

- Each selected pod's agent captures with a TPACKET_V3 ring and a kernel BPF
  filter (agent/capture.py) and streams batches; this module merges the pods'
  streams in timestamp order and writes one pcapng with one interface per pod
  and interface, named ``POD/IFACE`` so Wireshark shows where each packet was.
- Merging uses the agents' watermarks (every packet older than it was sent):
  a packet is written once every other live stream has promised nothing
  older can still come. A single stream is written as it arrives, and a
  stalled stream cannot hold memory hostage: past ``MERGE_BYTES`` pending,
  everything is released.
- A batch is never split into Python objects per packet: it stays the agent's
  two byte strings plus sorted records (a ``Run``), and the merge and the EPBs
  are made by controller/packets/merge.py (C). That keeps ``capture -w`` within
  a small multiple of tcpdump's CPU per packet (bench/capture_bench.py). Only
  ``--print`` decodes packets one by one, as it must.
- Stopping is cooperative: on Ctrl-C/SIGTERM, or when --count/--max-bytes is
  reached, each agent is asked to StopCapture, sends what its ring still holds
  and its final counters, and the file is closed with interface statistics
  (ISB). A second signal stops at once; the file is valid either way because
  only whole blocks are ever written.
- Every batch is flushed, so ``-w - | wireshark -k -i -`` is live.

Counters reported per pod: packets written, dropped by the kernel (ring
full), dropped by the agent (this side was too slow); sent packets =
captured + both drop counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from meridio_debug.controller.errors import AgentCallError, MeridioDebugError
from meridio_debug.controller.packets import merge
from meridio_debug.controller.packets.dissect import summarize
from meridio_debug.controller.packets.pcapng import PKTTYPE_FLAGS, Interface, Writer
from meridio_debug.controller.runtime import PodRef, Runtime
from meridio_debug.controller.wire.client import PROTOCOL_VERSION, AgentClient
from meridio_debug.protos import agent_pb2 as pb

MAX_SNAPLEN = 262144  # the agent's own bound
MERGE_BYTES = 64 << 20  # pending packets held for ordering, at most
# Pending packets are written at most this often (and at once past RELEASE_BYTES): a
# release scans every pod's pending batches, and with 48 pods a release per batch cost
# the controller ~0.3 ms per message, ~100 ms of CPU per second (capture_many_bench.py).
RELEASE_EVERY_S = 0.1
# Past this many pods, agents hand over partly filled ring blocks after
# MANY_PODS_BLOCK_TIMEOUT_MS instead of their 200 ms: each block is a message, and with
# 48 pods of light traffic the messages are most of the capture's CPU (each agent then
# sends 2 a second, not 5; a stop may wait up to that long for the last block).
MANY_PODS = 8
MANY_PODS_BLOCK_TIMEOUT_MS = 500
RELEASE_BYTES = 4 << 20
STOP_GRACE_S = 5.0  # after a stop request, wait this long for the agents' final stats
FLAGS = (*PKTTYPE_FLAGS, 0, 0, 0)  # sll_pkttype 5-7 (loopback, user, kernel): no direction


class Sink:
    """Where merged packets go: a pcapng Writer or a Printer (same calls)."""

    packets: int
    full: bool

    def add_interface(self, iface: Interface) -> int:
        raise NotImplementedError

    def write(self, runs: Sequence[merge.Run], mark: int, limit: int = 0) -> int:
        """Write the runs' packets up to ``mark`` in time order (advancing each run)."""
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def close(self, stats: Sequence[tuple[int, int, int, int, int]] = ()) -> None:
        raise NotImplementedError

    def set_stats_source(
        self, source: Callable[[], Sequence[tuple[int, int, int, int, int]]]
    ) -> None:
        """Where a sink that closes files before the end (rotation) gets interim statistics."""


class PcapngSink(Sink):
    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.packets = 0
        self.full = False

    def add_interface(self, iface: Interface) -> int:
        return self.writer.add_interface(iface)

    def write(self, runs: Sequence[merge.Run], mark: int, limit: int = 0) -> int:
        n = self.writer.write_runs(runs, mark, limit)
        self.packets, self.full = self.writer.packets, self.writer.full
        return n

    def flush(self) -> None:
        self.writer.flush()

    def close(self, stats: Sequence[tuple[int, int, int, int, int]] = ()) -> None:
        self.writer.close(stats)

    def set_stats_source(
        self, source: Callable[[], Sequence[tuple[int, int, int, int, int]]]
    ) -> None:
        self.writer.stats_source = source


class Printer(Sink):
    """``--print``: one tcpdump-like line per packet; only printed packets are decoded."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._ifaces: list[Interface] = []
        self.packets = 0
        self.full = False

    def add_interface(self, iface: Interface) -> int:
        self._ifaces.append(iface)
        return len(self._ifaces) - 1

    def write(self, runs: Sequence[merge.Run], mark: int, limit: int = 0) -> int:
        lines: list[str] = []
        packets = merge.packets_in_order(runs, mark)
        while not (limit and self.packets + len(lines) >= limit):
            packet = next(packets, None)
            if packet is None:
                break
            ts, ifid, flags, frame, _orig = packet
            iface = self._ifaces[ifid]
            direction = "In " if flags & 3 == 1 else "Out" if flags & 3 == 2 else "   "
            clock = time.strftime("%H:%M:%S", time.localtime(ts // 1_000_000_000))
            summary = summarize(frame, iface.linktype)
            lines.append(f"{clock}.{ts % 1_000_000_000:09d} {iface.name} {direction} {summary}\n")
        self._out.write("".join(lines))
        self.packets += len(lines)
        return len(lines)

    def flush(self) -> None:
        self._out.flush()

    def close(self, stats: Sequence[tuple[int, int, int, int, int]] = ()) -> None:
        self._out.flush()


@dataclass
class PodState:
    """One pod's stream as the merger sees it."""

    pod: PodRef
    snaplen: int = 0
    names: dict[int, tuple[str, int]] = field(default_factory=dict)  # ifindex -> (name, linktype)
    ifids: dict[int, int] = field(default_factory=dict)  # ifindex -> interface id in the file
    point_ifids: dict[str, int] = field(default_factory=dict)  # "any"/IFACE -> interface id
    capture_id: str = ""
    client: AgentClient | None = None
    stats: pb.CaptureStats | None = None
    final: bool = False
    error: str = ""
    live: bool = False
    pending: list[merge.Run] = field(default_factory=list)
    pending_bytes: int = 0
    watermark: int = 0
    received: int = 0


class Merger:
    """Orders packets of many pods by timestamp, writing what no stream can precede any more."""

    def __init__(self, sink: Sink, limit: int, on_full: Callable[[], None]) -> None:
        self.sink = sink
        self.limit = limit
        self._on_full = on_full
        self.states: list[PodState] = []
        self._timer: asyncio.TimerHandle | None = None

    def interface(self, st: PodState, ifindex: int) -> int:
        ifid = st.ifids.get(ifindex)
        if ifid is None:
            name, linktype = st.names.get(ifindex, (f"if{ifindex}", 1))
            ifid = self.sink.add_interface(
                Interface(linktype, st.snaplen, f"{st.pod.name}/{name}", _description(st.pod))
            )
            st.ifids[ifindex] = ifid
        return ifid

    def add_batch(self, st: PodState, batch: pb.PacketBatch) -> None:
        for iface in batch.new_interfaces:
            st.names[iface.index] = (iface.name, iface.linktype)
        meta = batch.meta  # each read of a bytes field copies it: read once
        if meta:
            data = batch.data
            for index in merge.ifindexes(meta):
                self.interface(st, index)
            run = merge.Run(data, merge.prepare(data, meta, st.ifids, FLAGS))
            st.pending.append(run)
            st.pending_bytes += len(data)
            st.received += run.count
        st.watermark = max(st.watermark, batch.watermark_ns)
        self.soon()

    def soon(self) -> None:
        """Release within RELEASE_EVERY_S (now when much is pending): writes in big pieces."""
        if sum(s.pending_bytes for s in self.states) >= RELEASE_BYTES:
            self.release()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(RELEASE_EVERY_S, self.release)

    def release(self, everything: bool = False) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        live = [s for s in self.states if s.live]
        if everything or len(live) <= 1 or sum(s.pending_bytes for s in self.states) > MERGE_BYTES:
            mark = merge.EVERYTHING
        else:
            mark = min(s.watermark for s in live)
        # Runs in (pod, arrival) order: ties in time keep that order in the file.
        runs = [r for s in self.states for r in s.pending]
        if runs and not self.sink.full:
            try:
                self.sink.write(runs, mark, self.limit)
                self.sink.flush()
            except BrokenPipeError:  # the reader (wireshark, head) is gone: stop
                self.sink.full = True
            if self.sink.full or (self.limit and self.sink.packets >= self.limit):
                self._on_full()
        over = self.sink.full or bool(self.limit and self.sink.packets >= self.limit)
        for s in self.states:
            if s.pending:
                # Nothing more is written once the sink is full or the count reached.
                s.pending = [] if over else [r for r in s.pending if not r.done]
                s.pending_bytes = sum(len(r.data) for r in s.pending)  # whole runs: a bound


def _description(pod: PodRef) -> str:
    return f"meridio-debug capture in {pod.runtime} pod {pod.name} ({pod.location})"


@dataclass(frozen=True)
class Options:
    interfaces: tuple[str, ...] = ("any",)
    filter: str = ""
    duration: float = 0.0
    count: int = 0
    max_bytes: int = 0
    snaplen: int = 0
    rotate: int = 0


class Capture:
    """One multi-pod capture run: start every pod, merge, stop cleanly, close the sink."""

    def __init__(
        self,
        runtime: Runtime,
        options: Options,
        sink: Sink,
        log: Callable[[str], None],
    ) -> None:
        self.runtime = runtime
        self.options = options
        self.sink = sink
        self.log = log
        self.merger = Merger(sink, options.count, self.request_stop)
        self._stop_requested = False
        self._started = 0
        self._pods = 0
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stoppers: set[asyncio.Future[None]] = set()
        self.start_ns = time.time_ns()

    def request(self) -> pb.CaptureRequest:
        o = self.options
        return pb.CaptureRequest(
            interfaces=list(o.interfaces),
            filter=o.filter,
            snaplen=o.snaplen,
            duration_s=o.duration,
            max_packets=o.count,
            max_bytes=o.max_bytes if not o.rotate else 0,
            block_timeout_ms=MANY_PODS_BLOCK_TIMEOUT_MS if self._pods > MANY_PODS else 0,
        )

    def request_stop(self) -> None:
        """Ask every agent to end its capture; their streams then finish with final stats."""
        if self._stop_requested:
            return
        self._stop_requested = True
        # Agents that do not answer in time are cut off: the file is closed anyway.
        asyncio.get_running_loop().call_later(STOP_GRACE_S, self.force_stop)
        for st in self.merger.states:
            if st.live and st.client is not None and st.capture_id:
                self._stoppers.add(asyncio.ensure_future(self._stop_one(st.client, st.capture_id)))

    def force_stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    @staticmethod
    async def _stop_one(client: AgentClient, capture_id: str) -> None:
        with contextlib.suppress(MeridioDebugError):
            await client.stop_capture(capture_id)

    async def _pod(self, st: PodState, total: int) -> None:
        try:
            async with self.runtime.open(st.pod) as client:
                st.client = client
                async for chunk in client.capture(self.request()):
                    kind = chunk.WhichOneof("kind")
                    if kind == "batch":
                        self._add_batch(st, chunk.batch)
                    elif kind == "stats":
                        st.stats = chunk.stats
                        st.watermark = max(st.watermark, chunk.stats.watermark_ns)
                        if chunk.stats.final:
                            st.final = True
                    elif kind == "start":
                        self._on_start(st, chunk.start)
                        self._started += 1
                        if self._started == total:
                            self._ready.set()
                        if self._stop_requested:
                            await self._stop_one(client, st.capture_id)
        except MeridioDebugError as exc:
            st.error = str(exc)
        except asyncio.CancelledError:
            if not st.final:
                st.error = "stopped before the agent sent its final counters"
        finally:
            st.live = False
            if not st.capture_id:  # never started: do not hold the others' "ready"
                self._started += 1
                if self._started >= total:
                    self._ready.set()
            self.merger.release()

    def _add_batch(self, st: PodState, batch: pb.PacketBatch) -> None:
        """A batch the merger refuses (it came over the network) ends this pod's capture, said."""
        try:
            self.merger.add_batch(st, batch)
        except (ValueError, KeyError, struct.error) as exc:
            raise AgentCallError(
                f"{st.pod.name}: the agent sent a malformed packet batch ({exc}); its capture "
                "stops here, the other pods' go on"
            ) from exc

    def _on_start(self, st: PodState, start: pb.CaptureStart) -> None:
        if start.protocol_version != PROTOCOL_VERSION:
            raise AgentCallError(
                f"{st.pod.name}: the agent speaks capture protocol {start.protocol_version}, "
                f"this controller {PROTOCOL_VERSION}; use the agent image of the controller's "
                "version (--image), or let the old agent's idle timeout end it"
            )
        st.capture_id = start.capture_id
        st.snaplen = start.snaplen
        st.live = True
        for iface in start.interfaces:
            st.names[iface.index] = (iface.name, iface.linktype)
        by_name = {name: index for index, (name, _) in st.names.items()}
        for point in start.points:
            if point == "any":
                st.point_ifids[point] = self.sink.add_interface(
                    Interface(1, st.snaplen, f"{st.pod.name}/any", _description(st.pod))
                )
            else:
                st.point_ifids[point] = self.merger.interface(st, by_name[point])

    async def run(self, on_ready: Callable[[list[PodState]], None]) -> list[PodState]:
        pods = self.runtime.pods()
        self._pods = len(pods)
        states = [PodState(p) for p in pods]
        self.merger.states = states
        self.sink.set_stats_source(lambda: self.isb_stats(states))
        tasks = [asyncio.create_task(self._pod(st, len(states))) for st in states]
        self._tasks = tasks
        if self.options.duration:  # the agents stop themselves; this is the safety net
            asyncio.get_running_loop().call_later(self.options.duration + 2.0, self.request_stop)

        async def announce() -> None:
            await self._ready.wait()
            on_ready(states)

        announcer = asyncio.ensure_future(announce())
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:  # second signal: no more waiting
            self.force_stop()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            announcer.cancel()
        self.merger.release(everything=True)
        self.sink.close(self.isb_stats(states))
        return states

    def isb_stats(self, states: Sequence[PodState]) -> list[tuple[int, int, int, int, int]]:
        """(ifid, now, start, received, dropped) per interface of each pod, from the last stats."""
        now = time.time_ns()
        out: list[tuple[int, int, int, int, int]] = []
        for st in states:
            stats = st.stats
            if stats is None:
                continue
            points = {p.point: p for p in stats.points}
            counts = {c.ifindex: c for c in stats.interfaces}
            for point, ifid in st.point_ifids.items():
                ps = points.get(point)
                kernel_recv = ps.kernel_packets if ps else 0
                kernel_drop = ps.kernel_drops if ps else 0
                agent_drop = stats.agent_drops if point == "any" else 0
                if point != "any":
                    index = next((i for i, (n, _) in st.names.items() if n == point), -1)
                    agent_drop = counts[index].agent_drops if index in counts else 0
                out.append((ifid, now, self.start_ns, kernel_recv, kernel_drop + agent_drop))
            named = set(st.point_ifids.values())
            for index, ifid in st.ifids.items():
                if ifid in named:
                    continue
                c = counts.get(index)
                if c is not None:
                    out.append((ifid, now, self.start_ns, c.packets + c.agent_drops, c.agent_drops))
        return out


def summary_lines(states: Sequence[PodState]) -> list[str]:
    lines = []
    for st in states:
        s = st.stats
        if s is None:
            lines.append(f"{st.pod.name}: no capture ({st.error or 'no answer'})")
            continue
        text = (
            f"{st.pod.name}: {st.received} packets captured; dropped: {s.kernel_drops} by the kernel "
            f"(ring full), {s.agent_drops} by the agent (consumer too slow)"
        )
        if s.final:
            text += f"; ended: {s.end_reason}"
        else:
            text += "; final counters not received (numbers as of the last update)"
        if st.error:
            text += f"; error: {st.error}"
        lines.append(text)
    return lines


async def run_capture(
    runtime: Runtime, options: Options, sink: Sink, log: Callable[[str], None]
) -> list[PodState]:
    """Run until the limits or SIGINT/SIGTERM (a second signal stops without waiting)."""
    merge.keep_freed_memory()
    cap = Capture(runtime, options, sink, log)
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(cap.run(lambda states: _ready(states, log)))
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            cap.request_stop()
        else:
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        return await task
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _ready(states: Sequence[PodState], log: Callable[[str], None]) -> None:
    live = [f"{st.pod.name} ({', '.join(st.point_ifids)})" for st in states if st.live]
    if live:
        log(f"capturing in {', '.join(live)} (Ctrl-C to stop)")
    for st in states:
        if st.error:
            log(
                st.error if st.error.startswith(f"{st.pod.name}:") else f"{st.pod.name}: {st.error}"
            )
