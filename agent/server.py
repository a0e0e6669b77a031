"""The agent's gRPC service: a thin servicer over collectors and the netlink watcher.

The servicer holds no network logic: it validates requests, runs the blocking
collectors and the watcher in worker threads (pyroute2/netlink/psutil are
synchronous) and maps every failure to a precise gRPC status. It never lets an
exception escape as a crash: an ephemeral container is never restarted, so a
dead agent means a pod nobody can debug any more.

Limits: every stream is bounded (duration and event count), and the event
queue between the watcher thread and the stream is bounded; when a slow client
lets it fill, events are dropped and the next delivered event carries
``overflow=true``. At most MAX_WATCHES watches and capture.MAX_CAPTURES
captures run at once; one more is RESOURCE_EXHAUSTED (what bounds the agent's
memory: see capture.py). Every request has passed agent/guard.py first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import socket
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import grpc

from meridio_debug.agent import version
from meridio_debug.agent.collectors import SECTIONS, Collector, run_collectors
from meridio_debug.agent.errors import few
from meridio_debug.protos import agent_pb2 as pb
from meridio_debug.protos import agent_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from meridio_debug.agent import capture

log = logging.getLogger(__name__)

WATCH_KINDS = ("link", "address", "route", "rule", "neighbour", "fdb")
MAX_WATCH_SECONDS = 24 * 3600.0
EVENT_QUEUE_SIZE = 10_000
MAX_WATCHES = 16  # each: a netlink socket, a thread, a queue of at most EVENT_QUEUE_SIZE events


class Watcher(Protocol):
    """What the server needs from a netlink watcher (agent/watch.py)."""

    def events(self, timeout: float) -> Iterable[pb.Event]:
        """Events that arrive within ``timeout`` seconds (possibly none)."""
        ...

    def close(self) -> None:
        """Stop watching; unblocks a pending ``events`` call."""
        ...


WatcherFactory = Callable[[set[str]], Watcher]


def netns_id() -> str:
    """The agent's network namespace as ``net:[inode]`` (what /proc/self/ns/net links to)."""
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return ""


def _close_made(future: asyncio.Future[Watcher]) -> None:
    """Close a watcher whose stream was cancelled while it was being made."""
    if not future.cancelled() and future.exception() is None:
        future.result().close()


class Activity:
    """Tracks when the agent was last used, for the idle timeout."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.active_streams = 0

    def touch(self) -> None:
        self.last = time.monotonic()

    def idle_for(self) -> float:
        if self.active_streams:
            return 0.0
        return time.monotonic() - self.last


class AgentService(pb_grpc.AgentServicer):
    """Implements the Agent service of protos/agent.proto."""

    def __init__(
        self,
        collectors: Sequence[Collector] | Callable[[], Sequence[Collector]],
        watcher_factory: WatcherFactory | None,
        activity: Activity | None = None,
    ) -> None:
        # A factory defers importing the collectors (psutil, ctypes, parsers) to the
        # first call, so the agent serves sooner after it starts.
        self._collector_factory = collectors if callable(collectors) else None
        self._collector_list = None if callable(collectors) else list(collectors)
        self._collector_lock = threading.Lock()
        self._watcher_factory = watcher_factory
        self.activity = activity or Activity()
        self._started_ns = time.time_ns()
        self._capture_registry: capture.Registry | None = None
        self._watches = 0

    @property
    def _captures(self) -> capture.Registry:
        """Made on the first capture: agent/capture.py (ctypes, mmap, uuid, the C block
        walker) is ~10 ms of CPU that an agent which never captures, most of them, skips."""
        if self._capture_registry is None:
            from meridio_debug.agent import capture

            self._capture_registry = capture.Registry()
        return self._capture_registry

    @property
    def _collectors(self) -> list[Collector]:
        with self._collector_lock:
            if self._collector_list is None:
                assert self._collector_factory is not None
                self._collector_list = list(self._collector_factory())
            return self._collector_list

    def _info(self, ran: Sequence[pb.SectionStatus] = ()) -> pb.Info:
        """The handshake; collectors in ``ran`` are described by how they just ran.

        A snapshot already knows which sections worked (OK) and why others did not,
        so it does not probe those collectors again (bird's and nfqlb's probes scan
        every process of the node).
        """
        info = pb.Info(
            agent_version=version.AGENT_VERSION,
            protocol_version=version.PROTOCOL_VERSION,
            kernel=platform.release(),
            hostname=socket.gethostname(),
            pid=os.getpid(),
            netns=netns_id(),
            started_unix_ns=self._started_ns,
        )
        info.capabilities.append("snapshot")
        info.capabilities.append("capture")
        if self._watcher_factory is not None:
            info.capabilities.append("watch")
        done = {status.name: status for status in ran}
        for collector in self._collectors:
            status = done.get(collector.name)
            if status is not None:
                ok = status.state == pb.SectionStatus.OK
                info.collectors.add(name=collector.name, available=ok, reason=status.message)
                continue
            try:
                ok, reason = collector.available()
            except Exception as exc:  # availability probing must not fail the handshake
                ok, reason = False, f"{type(exc).__name__}: {exc}"
            info.collectors.add(name=collector.name, available=ok, reason=reason)
        return info

    async def GetInfo(
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext[pb.InfoRequest, pb.Info]
    ) -> pb.Info:
        self.activity.touch()
        return await asyncio.to_thread(self._info)

    async def Snapshot(
        self,
        request: pb.SnapshotRequest,
        context: grpc.aio.ServicerContext[pb.SnapshotRequest, pb.Snapshot],
    ) -> pb.Snapshot:
        self.activity.touch()
        unknown = sorted(set(request.sections) - set(SECTIONS))
        if unknown:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown section(s) {few(unknown)}; known: {', '.join(SECTIONS)}",
            )
        snap = await asyncio.to_thread(self.take_snapshot, list(request.sections))
        self.activity.touch()
        return snap

    def take_snapshot(self, sections: Sequence[str]) -> pb.Snapshot:
        """The Snapshot answer for known ``sections`` (all when empty), blocking.

        Also what a one-shot agent of the local runtime writes (agent/launcher.py).
        """
        snap = pb.Snapshot(taken_unix_ns=time.time_ns())
        run_collectors(self._collectors, snap, list(sections))
        snap.info.CopyFrom(self._info(list(snap.sections)))
        return snap

    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext[pb.WatchRequest, pb.Event]
    ) -> AsyncIterator[pb.Event]:
        self.activity.touch()
        if self._watcher_factory is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "watch is not available here")
        kinds = set(request.kinds) or set(WATCH_KINDS)
        unknown = sorted(kinds - set(WATCH_KINDS))
        if unknown:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown event kind(s) {few(unknown)}; known: {', '.join(WATCH_KINDS)}",
            )
        if not 0 <= request.duration_s <= MAX_WATCH_SECONDS:  # also refuses NaN
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"duration_s must be between 0 and {MAX_WATCH_SECONDS:.0f} (0 = until cancelled)",
            )
        duration = request.duration_s or MAX_WATCH_SECONDS
        assert self._watcher_factory is not None
        if self._watches >= MAX_WATCHES:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{MAX_WATCHES} watches already run in this agent; end one, or try again later",
            )
        self._watches += 1
        self.activity.active_streams += 1
        try:
            async with contextlib.aclosing(
                self._watch(request, context, kinds, duration)
            ) as events:
                async for event in events:
                    yield event
        finally:
            self._watches -= 1
            self.activity.active_streams -= 1
            self.activity.touch()

    async def _watch(
        self,
        request: pb.WatchRequest,
        context: grpc.aio.ServicerContext[pb.WatchRequest, pb.Event],
        kinds: set[str],
        duration: float,
    ) -> AsyncGenerator[pb.Event, None]:
        assert self._watcher_factory is not None
        creating = asyncio.ensure_future(asyncio.to_thread(self._watcher_factory, kinds))
        try:
            watcher = await asyncio.shield(creating)
        except asyncio.CancelledError:
            # The client left while the thread subscribes: close what it makes.
            creating.add_done_callback(_close_made)
            raise
        except Exception as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot watch netlink: {exc}")
            raise  # unreachable: abort raises
        stop = threading.Event()
        thread: threading.Thread | None = None
        try:
            # Initial metadata tells the client the subscription is live, so a change it
            # makes after this point is guaranteed to be seen.
            await context.send_initial_metadata((("meridio-debug-watch", "subscribed"),))
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[pb.Event | None] = asyncio.Queue(EVENT_QUEUE_SIZE)
            dropped = 0

            def put(event: pb.Event | None) -> None:
                nonlocal dropped
                try:
                    queue.put_nowait(event)
                except asyncio.QueueFull:
                    dropped += 1

            def pump() -> None:
                try:
                    while not stop.is_set():
                        for event in watcher.events(0.2):
                            loop.call_soon_threadsafe(put, event)
                except Exception as exc:  # report and end the stream, never the agent
                    log.warning("watcher failed: %s", exc)
                finally:
                    with contextlib.suppress(RuntimeError):  # the loop may be gone
                        loop.call_soon_threadsafe(put, None)

            thread = threading.Thread(target=pump, name="netlink-watch", daemon=True)
            thread.start()
            deadline = time.monotonic() + duration
            sent = 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=min(left, 1.0))
                except TimeoutError:
                    continue
                if event is None:
                    break
                if dropped:
                    event.overflow = True
                    dropped = 0
                yield event
                sent += 1
                if request.max_events and sent >= request.max_events:
                    break
        finally:
            stop.set()
            watcher.close()
            if thread is not None:
                await asyncio.to_thread(thread.join, 2.0)
            # Again, now that the pump is out of events(): a close() that raced with the
            # reader leaving events() released nothing (a pipe pair leaked per watch).
            watcher.close()

    async def Capture(
        self,
        request: pb.CaptureRequest,
        context: grpc.aio.ServicerContext[pb.CaptureRequest, pb.CaptureChunk],
    ) -> AsyncIterator[pb.CaptureChunk]:
        """Thin: agent/capture.py does the work; here only errors become statuses."""
        from meridio_debug.agent import capture

        self.activity.touch()
        statuses = (
            (capture.InvalidCapture, grpc.StatusCode.INVALID_ARGUMENT),
            (capture.InterfaceNotFound, grpc.StatusCode.NOT_FOUND),
            (capture.CaptureUnavailable, grpc.StatusCode.UNAVAILABLE),
            (capture.TooManyCaptures, grpc.StatusCode.RESOURCE_EXHAUSTED),
        )
        stream = self._captures.run(request)
        self.activity.active_streams += 1
        try:
            try:
                first = await anext(stream)
            except capture.CaptureError as exc:
                code = next(
                    (c for t, c in statuses if isinstance(exc, t)), grpc.StatusCode.INTERNAL
                )
                await context.abort(code, str(exc))
                raise  # unreachable: abort raises
            except Exception as exc:  # never a crash: the stream ends, the agent serves on
                log.exception("capture failed to start")
                await context.abort(grpc.StatusCode.INTERNAL, f"capture failed: {exc}")
                raise
            yield first
            async for chunk in stream:
                yield chunk
                if chunk.HasField("stats") and chunk.stats.end_reason.startswith("error"):
                    await context.abort(grpc.StatusCode.INTERNAL, chunk.stats.end_reason)
        finally:
            await stream.aclose()
            self.activity.active_streams -= 1
            self.activity.touch()

    async def StopCapture(
        self,
        request: pb.StopCaptureRequest,
        context: grpc.aio.ServicerContext[pb.StopCaptureRequest, pb.StopCaptureReply],
    ) -> pb.StopCaptureReply:
        self.activity.touch()
        return pb.StopCaptureReply(found=self._captures.stop(request.capture_id))
