"""A typed async client for one agent, with every gRPC failure wrapped.

Runtimes hand out an ``AgentClient`` per pod; the rest of the controller never
touches grpc directly. Failures become ``AgentCallError`` whose message names
the pod, what was asked, and gRPC's own status text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

import grpc
from google.protobuf.message import DecodeError

from meridio_debug.controller.errors import AgentCallError
from meridio_debug.protos import agent_pb2 as pb
from meridio_debug.protos import agent_pb2_grpc as pb_grpc
from meridio_debug.protos import probe_pb2 as ppb
from meridio_debug.protos import probe_pb2_grpc as ppb_grpc

# The agent protocol this controller speaks (agent/version.py has the agent's; they
# ship together). The capture checks it in CaptureStart: protocol 2 packed the
# frames' metadata into PacketBatch.meta, which a protocol-1 agent does not send.
PROTOCOL_VERSION = 2

Snapshot = pb.Snapshot  # what snapshot() returns, for runtimes that read one another way


def decode_snapshot(data: bytes, pod: str) -> pb.Snapshot:
    """A Snapshot message an agent wrote (a one-shot local agent); AgentCallError if corrupt."""
    try:
        return pb.Snapshot.FromString(data)
    except DecodeError as exc:
        raise AgentCallError(
            f"{pod}: the agent's snapshot is not a Snapshot message: {exc}"
        ) from exc


CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    # Capture batches are 0.1-4 MiB: big HTTP/2 frames and reads, not 16 KiB / 8 KiB ones
    # (the agent sets the same, agent/main.py TRANSPORT_OPTIONS, which says why).
    ("grpc.http2.max_frame_size", 1 << 20),
    ("grpc.experimental.tcp_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 16),
    ("grpc.experimental.tcp_max_read_chunk_size", 4 << 20),
]


class AgentClient:
    """Calls one agent. ``pod`` is only used in error messages."""

    def __init__(self, channel: grpc.aio.Channel, pod: str) -> None:
        self._channel = channel
        self._stub = pb_grpc.AgentStub(channel)
        self._probe = ppb_grpc.ProbeStub(channel)
        self.pod = pod

    def _error(self, what: str, exc: grpc.RpcError) -> AgentCallError:
        code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        name = code.name if code else "ERROR"
        return AgentCallError(f"{self.pod}: {what} failed: {name}: {detail}")

    async def get_info(self, timeout: float = 10.0, wait_for_ready: bool = False) -> pb.Info:
        try:
            info: pb.Info = await self._stub.GetInfo(
                pb.InfoRequest(), timeout=timeout, wait_for_ready=wait_for_ready
            )
        except grpc.RpcError as exc:
            raise self._error("GetInfo", exc) from exc
        return info

    async def snapshot(self, sections: Sequence[str] = (), timeout: float = 60.0) -> pb.Snapshot:
        try:
            snap: pb.Snapshot = await self._stub.Snapshot(
                pb.SnapshotRequest(sections=list(sections)), timeout=timeout
            )
        except grpc.RpcError as exc:
            raise self._error("Snapshot", exc) from exc
        return snap

    async def watch(
        self,
        kinds: Sequence[str] = (),
        duration: float = 0.0,
        max_events: int = 0,
        on_subscribed: Callable[[], None] | None = None,
    ) -> AsyncIterator[pb.Event]:
        """Stream events; ``on_subscribed`` runs once the agent listens to netlink."""
        request = pb.WatchRequest(kinds=list(kinds), duration_s=duration, max_events=max_events)
        call = self._stub.Watch(request)
        try:
            await call.initial_metadata()
            if on_subscribed is not None:
                on_subscribed()
            async for event in call:
                yield event
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise self._error("Watch", exc) from exc
        finally:
            call.cancel()

    async def capture(self, request: pb.CaptureRequest) -> AsyncIterator[pb.CaptureChunk]:
        """Stream a capture's chunks (start, batches, stats); ends after the final stats."""
        call = self._stub.Capture(request)
        try:
            async for chunk in call:
                yield chunk
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise self._error("Capture", exc) from exc
        finally:
            call.cancel()

    async def stop_capture(self, capture_id: str, timeout: float = 5.0) -> bool:
        """Ask the agent to end a capture cleanly (its stream then sends the final stats)."""
        try:
            reply: pb.StopCaptureReply = await self._stub.StopCapture(
                pb.StopCaptureRequest(capture_id=capture_id), timeout=timeout
            )
        except grpc.RpcError as exc:
            raise self._error("StopCapture", exc) from exc
        return reply.found

    async def route_get(
        self, queries: Sequence[ppb.RouteQuery], timeout: float = 10.0
    ) -> list[ppb.RouteResult]:
        """The kernel's FIB lookups for ``queries`` (Probe.RouteGet), one result per query."""
        try:
            reply: ppb.RouteGetReply = await self._probe.RouteGet(
                ppb.RouteGetRequest(queries=list(queries)), timeout=timeout
            )
        except grpc.RpcError as exc:
            raise self._error("RouteGet", exc) from exc
        return list(reply.results)

    async def send_probes(
        self, request: ppb.SendProbesRequest, timeout: float = 130.0
    ) -> ppb.SendProbesReply:
        """Send crafted probe packets of one flow from this pod (Probe.SendProbes; not read-only)."""
        try:
            reply: ppb.SendProbesReply = await self._probe.SendProbes(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise self._error("SendProbes", exc) from exc
        return reply
