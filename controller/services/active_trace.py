"""The active trace's I/O: capture in every pod at once, send probes, hand packets to the core.

Why a layer of its own: the correlation (controller/trace/active.py) is pure
and works on decoded sightings; this module does what it cannot -- agents,
captures, probes, clocks -- in one fixed order, so nothing is left running:

1. the static trace (snapshots + FIB answers), over one agent per pod that
   every later step reuses (a lab agent costs a process start; a cluster
   agent a port-forward);
2. a capture in *every* pod of the trench at once (gateway, LBs, proxies,
   targets), with a kernel BPF filter for the flow in both directions and a
   short snap length (headers and the probe marker are all that is needed);
3. once every capture runs: probes (``--probe``: Probe.SendProbes from the
   gateway, or marked from the entry LB when there is no gateway pod), or
   ``--duration`` seconds of the user's own traffic;
4. stop as soon as every probe's reply reached the client side (or after the
   settle time), StopCapture everywhere, and correlate.

Every capture is stopped and every agent released in a ``finally``, also on
errors and Ctrl-C. Packets are decoded as batches arrive, so the early stop
needs no second pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from meridio_debug.controller.errors import AgentCallError, MeridioDebugError
from meridio_debug.controller.model import TrenchConfig, TrenchState
from meridio_debug.controller.packets.dissect import decode, load_in_background
from meridio_debug.controller.packets.merge import iter_frames
from meridio_debug.controller.packets.pcapng import Interface, Writer, flags_for
from meridio_debug.controller.runtime import PodRef, Runtime
from meridio_debug.controller.runtime.reuse import ReusingRuntime
from meridio_debug.controller.services.trace import trace_async
from meridio_debug.controller.trace import Flow, TraceResult
from meridio_debug.controller.trace.active import (
    ActiveResult,
    ProbeMark,
    ProbeOrder,
    ProbeRun,
    Sighting,
    answered,
    capture_filter,
    correlate,
    probe_orders,
)
from meridio_debug.controller.wire.client import PROTOCOL_VERSION
from meridio_debug.protos import agent_pb2 as pb
from meridio_debug.protos import probe_pb2 as ppb

SNAPLEN = 256  # Ethernet + IP + L4 headers + the probe marker
MAX_PACKETS = 20000  # per pod and run: a busy flow cannot flood the controller
START_TIMEOUT_S = 15.0  # every capture must have started by then
STOP_TIMEOUT_S = 5.0  # after StopCapture, wait this long for final counters
BLOCK_TIMEOUT_MS = 20  # the agents' ring blocks: latency over CPU for a handful of packets
REPLY_GRACE_S = 0.05  # after the last reply: stragglers still on their way (other pods)


class ActiveTraceError(MeridioDebugError):
    """The active trace could not run (no pod can send probes, captures did not start)."""


@dataclass(frozen=True)
class ActiveOptions:
    probes: int = 0  # 0: watch the user's traffic for ``duration``
    duration: float = 5.0
    interval: float = 0.02
    settle: float = 1.0  # probes: wait at most this long for replies after the last one
    write: str = ""  # pcapng file of everything captured ("" none)


@dataclass
class PodCapture:
    """One pod's capture as this run sees it."""

    pod: PodRef
    capture_id: str = ""
    names: dict[int, tuple[str, int]] = field(default_factory=dict)  # ifindex -> (name, linktype)
    sightings: list[Sighting] = field(default_factory=list)
    frames: list[tuple[int, int, int, bytes, int]] = field(default_factory=list)
    stats: pb.CaptureStats | None = None
    error: str = ""
    started: bool = False

    def summary(self) -> dict[str, object]:
        s = self.stats
        return {
            "pod": self.pod.name,
            "packets": len(self.frames) if self.frames else len(self.sightings),
            "kernel_drops": s.kernel_drops if s is not None else None,
            "agent_drops": s.agent_drops if s is not None else None,
            "error": self.error or None,
        }


@dataclass(frozen=True)
class ActiveRun:
    static: TraceResult
    active: ActiveResult | None  # None: nothing to capture (e.g. not a trench VIP)
    state: TrenchState
    errors: tuple[str, ...]
    captures: tuple[dict[str, object], ...]
    timings_ms: dict[str, float]


async def _capture(
    runtime: Runtime,
    st: PodCapture,
    request: pb.CaptureRequest,
    *,
    on_start: Callable[[], None],
    on_packets: Callable[[], None],
    keep_frames: bool,
) -> None:
    try:
        async with runtime.open(st.pod) as client:
            async for chunk in client.capture(request):
                kind = chunk.WhichOneof("kind")
                if kind == "start":
                    if chunk.start.protocol_version != PROTOCOL_VERSION:
                        raise AgentCallError(
                            f"{st.pod.name}: the agent speaks capture protocol "
                            f"{chunk.start.protocol_version}, this controller {PROTOCOL_VERSION}; "
                            "use the agent image of the controller's version (--image)"
                        )
                    st.capture_id = chunk.start.capture_id
                    for iface in chunk.start.interfaces:
                        st.names[iface.index] = (iface.name, iface.linktype)
                    st.started = True
                    on_start()
                elif kind == "batch":
                    _add_batch(st, chunk.batch, keep_frames)
                    if chunk.batch.meta:
                        on_packets()
                elif kind == "stats":
                    st.stats = chunk.stats
    except MeridioDebugError as exc:
        st.error = str(exc)
    finally:
        if not st.started:
            on_start()  # never started: do not hold the others back


def _add_batch(st: PodCapture, batch: pb.PacketBatch, keep_frames: bool) -> None:
    for iface in batch.new_interfaces:
        st.names[iface.index] = (iface.name, iface.linktype)
    for ts, ifx, ptype, frame, orig in iter_frames(batch.data, batch.meta):
        name, linktype = st.names.get(ifx, (f"if{ifx}", 1))
        packet = decode(frame, linktype)
        if packet is not None:
            st.sightings.append(Sighting(st.pod.name, name, ts, ptype, packet))
        if keep_frames:
            st.frames.append((ts, ifx, ptype, frame, orig))


async def _send(
    runtime: Runtime,
    pods: dict[str, PodRef],
    flow: Flow,
    orders: list[ProbeOrder],
    o: ActiveOptions,
) -> ProbeRun:
    marks: list[ProbeMark] = []
    hows: list[str] = []
    errors: list[str] = []
    for n, order in enumerate(orders):
        request = ppb.SendProbesRequest(
            proto=flow.proto,
            src=flow.src,
            dst=flow.dst,
            sport=flow.sport,
            dport=flow.dport,
            count=o.probes,
            interval_s=o.interval,
            iif=order.iif,
            mark=order.mark,
        )
        async with runtime.open(pods[order.pod]) as client:
            reply = await client.send_probes(request)
        if not reply.ok:
            errors.append(reply.error)
            continue
        hows.append(
            f"{order.why}: {reply.dev} to {reply.next_hop} ({reply.next_hop_mac or 'no MAC'})"
        )
        for p in reply.probes:
            marks.append(
                ProbeMark(
                    index=n * o.probes + p.seq,
                    sent_ns=p.sent_unix_ns,
                    ip_id=p.ip_id,
                    tcp_seq=p.tcp_seq,
                    icmp_id=p.icmp_id,
                    icmp_seq=p.icmp_seq,
                    marker=p.marker,
                    ok=p.ok,
                )
            )
    first = orders[0]
    return ProbeRun(
        pod=first.pod,
        role=first.role,
        proto=flow.proto,
        probes=tuple(marks),
        how="; ".join(hows),
        error="" if marks else "; ".join(errors) or "nothing sent",
    )


async def active_trace_async(
    runtime: Runtime,
    flow: Flow,
    config: TrenchConfig | None,
    options: ActiveOptions,
    log: Callable[[str], None] = lambda _text: None,
) -> ActiveRun:
    """Static trace, captures everywhere, probes or traffic, stop, correlate."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round((time.perf_counter() - t_start) * 1000.0, 1)

    load_in_background()  # scapy, for decoding the captures, while the static trace runs
    shared = ReusingRuntime(runtime)
    states: list[PodCapture] = []
    tasks: list[asyncio.Task[None]] = []
    handlers: list[signal.Signals] = []
    try:
        run = await trace_async(shared, [flow], config)
        static = run.results[0]
        lap("static")
        errors = list(run.errors)
        if not static.paths and static.first_broken is not None:
            return ActiveRun(static, None, run.state, tuple(errors), (), timings)
        pods = {p.name: p for p in shared.pods()}
        orders: list[ProbeOrder] = []
        if options.probes:
            orders = probe_orders(run.state, flow)
            if not orders:
                raise ActiveTraceError(
                    "no pod can send probes for this flow: no gateway pod, and no LB with an "
                    "external interface and a fwmark rule for the flow's mark"
                )
        reachable = [p for p in shared.pods() if not any(p.name in e for e in run.errors)]
        states = [PodCapture(p) for p in reachable]
        request = pb.CaptureRequest(
            interfaces=["any"],
            filter=capture_filter(flow),
            snaplen=SNAPLEN,
            duration_s=(options.duration if not options.probes else 0)
            + options.settle
            + options.probes * options.interval
            + 30.0,
            max_packets=MAX_PACKETS,
            # The verdict waits for a few probe packets: blocks handed over after 20 ms,
            # not the agent's 200 (which saves CPU on busy captures, not here).
            block_timeout_ms=BLOCK_TIMEOUT_MS,
        )
        loop = asyncio.get_running_loop()
        all_started = asyncio.Event()
        news = asyncio.Event()
        # Ctrl-C or SIGTERM once: stop waiting, give the verdict and -w for what was captured
        # (like capture); twice: cancel. Also when a shell started us with SIGINT ignored.
        interrupted = asyncio.Event()
        main_task = asyncio.current_task()

        def on_signal() -> None:
            if interrupted.is_set() and main_task is not None:
                main_task.cancel()
            interrupted.set()
            news.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal)
            except (RuntimeError, ValueError):  # not the main thread (a library caller's loop)
                break
            handlers.append(sig)
        started = 0

        def on_start() -> None:
            nonlocal started
            started += 1
            if started >= len(states):
                all_started.set()

        tasks = [
            loop.create_task(
                _capture(
                    shared,
                    st,
                    request,
                    on_start=on_start,
                    on_packets=news.set,
                    keep_frames=bool(options.write),
                )
            )
            for st in states
        ]
        try:
            await asyncio.wait_for(all_started.wait(), START_TIMEOUT_S)
        except TimeoutError:
            slow = ", ".join(st.pod.name for st in states if not st.started)
            raise ActiveTraceError(
                f"captures did not start in {START_TIMEOUT_S:.0f} s: {slow}"
            ) from None
        for st in states:
            if st.error:
                errors.append(st.error)
        live = [st for st in states if st.capture_id]
        if not live:
            raise ActiveTraceError("no pod could capture: " + "; ".join(errors))
        lap("captures_started")
        roles = {p.name: p.role for p in shared.pods()}
        probe_run: ProbeRun | None = None
        if options.probes:
            log(f"capturing in {len(live)} pods; sending {options.probes} probe(s)")
            probe_run = await _send(shared, pods, flow, orders, options)
            lap("probes_sent")
            wanted = {p.index for p in probe_run.probes if p.ok}
            deadline = loop.time() + options.settle
            while wanted and not probe_run.error and not interrupted.is_set():
                seen = [s for st in states for s in st.sightings]
                if wanted <= answered(flow, seen, roles, probe_run.probes):
                    await asyncio.sleep(REPLY_GRACE_S)
                    break
                news.clear()
                left = deadline - loop.time()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(news.wait(), left)
        else:
            log(f"capturing the flow's traffic in {len(live)} pods for {options.duration:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(interrupted.wait(), options.duration)
        lap("settled")
        await _stop(shared, states, tasks)
        lap("captures_stopped")
        sightings = [s for st in states for s in st.sightings]
        active = correlate(flow, sightings, roles, static, probe_run)
        if probe_run is not None and probe_run.how:
            active = _with_note(active, f"probes: {probe_run.how}")
        if interrupted.is_set():
            active = _with_note(active, "stopped early by a signal: this is what was captured")
        lap("verdict")
        if options.write:
            _write_pcapng(options.write, states)
        return ActiveRun(
            static,
            active,
            run.state,
            tuple(errors),
            tuple(st.summary() for st in states),
            timings,
        )
    finally:
        if tasks:
            await _stop(shared, states, tasks)
        await shared.aclose()
        for sig in handlers:
            asyncio.get_running_loop().remove_signal_handler(sig)


def _with_note(result: ActiveResult, note: str) -> ActiveResult:
    return replace(result, notes=(*result.notes, note))


async def _stop(
    shared: ReusingRuntime, states: list[PodCapture], tasks: list[asyncio.Task[None]]
) -> None:
    """StopCapture in every pod that runs one; wait for the final counters, then cut off."""
    pending = [t for t in tasks if not t.done()]
    if not pending:
        return

    async def stop_one(st: PodCapture) -> None:
        if not st.capture_id:
            return
        with contextlib.suppress(MeridioDebugError):
            async with shared.open(st.pod) as client:
                await client.stop_capture(st.capture_id)

    await asyncio.gather(*(stop_one(st) for st in states))
    _done, still = await asyncio.wait(pending, timeout=STOP_TIMEOUT_S)
    for task in still:
        task.cancel()
    if still:
        await asyncio.gather(*still, return_exceptions=True)


def _write_pcapng(path: str, states: list[PodCapture]) -> None:
    try:
        writer = Writer(path)
    except OSError as exc:
        raise ActiveTraceError(f"cannot write {path}: {exc}") from exc
    packets: list[tuple[int, int, int, bytes, int]] = []
    for st in states:
        ids: dict[int, int] = {}
        for ts, ifx, ptype, frame, orig in st.frames:
            if ifx not in ids:
                name, linktype = st.names.get(ifx, (f"if{ifx}", 1))
                ids[ifx] = writer.add_interface(
                    Interface(
                        linktype, SNAPLEN, f"{st.pod.name}/{name}", "meridio-debug trace --active"
                    )
                )
            packets.append((ts, ids[ifx], flags_for(ptype), frame, orig))
    packets.sort(key=lambda p: p[0])
    writer.write(packets)
    writer.close()


def active_trace(
    runtime: Runtime,
    flow: Flow,
    config: TrenchConfig | None,
    options: ActiveOptions,
    log: Callable[[str], None] = lambda _text: None,
) -> ActiveRun:
    return asyncio.run(active_trace_async(runtime, flow, config, options, log))
