"""The Probe service: ask the pod's kernel where a packet would go (``ip route get``).

Why the kernel and not our own rule/route evaluation: policy routing has too
many corners to re-implement faithfully (fwmark masks, iif rules, suppress
prefix length, multipath hashing with ``fib_multipath_hash_policy``, link-down
next hops, rp_filter). The kernel's FIB lookup answers exactly what a packet
with this 5-tuple and mark would do, and is read-only: RTM_GETROUTE sends no
packet and changes nothing, so the agent stays read-only.

Each query is asked twice over one rtnetlink socket:

- resolved (``RTM_F_LOOKUP_TABLE``): the next hop the kernel *selects*
  (for multipath: the one the flow hashes to; the kernel builds a fake skb with
  the given protocol and ports, so the L4 hash policy applies) and the table
  that matched. IPv4 reports table 254 for every lookup without
  RTM_F_LOOKUP_TABLE (0x1000), which would hide which fwmark/VIP rule matched.
- FIB match (``RTM_F_FIB_MATCH``): the route entry that matched, with its
  prefix, protocol, metric and *all* next hops.

A lookup the kernel refuses (no route: ENETUNREACH; IPv4 blackhole: EINVAL;
unknown source for an output lookup) is a result with ``ok=false``, its errno
and the extended-ack text; the RPC fails only on a malformed request.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Sequence

import grpc

from meridio_debug.agent import rtnl
from meridio_debug.agent.collectors.netlink import IfNames, fill_route
from meridio_debug.agent.server import Activity
from meridio_debug.protos import agent_pb2 as pb
from meridio_debug.protos import probe_pb2 as ppb
from meridio_debug.protos import probe_pb2_grpc as ppb_grpc

MAX_QUERIES = 4096
LOOKUP_TIMEOUT = 2.0

# include/uapi/linux/rtnetlink.h
RTA_MARK = 16
RTA_IP_PROTO = 27
RTA_SPORT = 28
RTA_DPORT = 29
RTM_F_LOOKUP_TABLE = 0x1000
RTM_F_FIB_MATCH = 0x2000

_PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "": 0}


class QueryError(ValueError):
    """A query that cannot be asked (bad address, unknown interface): answered as not ok."""

    def __init__(self, message: str, err: int = errno_mod.EINVAL) -> None:
        super().__init__(message)
        self.errno = err


def validate(query: ppb.RouteQuery) -> str:
    """Why ``query`` is malformed ("" when it is fine): this fails the whole RPC."""
    try:
        dst = ipaddress.ip_address(query.dst)
    except ValueError:
        return f"query {query.id!r}: dst {query.dst!r} is not an IP address"
    if query.src:
        try:
            src = ipaddress.ip_address(query.src)
        except ValueError:
            return f"query {query.id!r}: src {query.src!r} is not an IP address"
        if src.version != dst.version:
            return f"query {query.id!r}: src and dst are of different families"
    if query.ipproto not in _PROTOS:
        return f"query {query.id!r}: ipproto {query.ipproto!r}; known: tcp, udp, icmp, icmpv6"
    if query.sport > 0xFFFF or query.dport > 0xFFFF:
        return f"query {query.id!r}: ports are 0-65535"
    return ""


def _request(query: ppb.RouteQuery, flags: int) -> tuple[int, bytes, bytes]:
    """(address family, rtmsg, attributes) of one RTM_GETROUTE."""
    dst = ipaddress.ip_address(query.dst)
    af = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    attrs = rtnl.pack_attr(rtnl.RTA_DST, dst.packed)
    src_len = 0
    if query.src:
        src = ipaddress.ip_address(query.src)
        attrs += rtnl.pack_attr(rtnl.RTA_SRC, src.packed)
        src_len = src.max_prefixlen
    for name, atype in ((query.iif, rtnl.RTA_IIF), (query.oif, rtnl.RTA_OIF)):
        if name:
            try:
                index = socket.if_nametoindex(name)
            except OSError:
                raise QueryError(f"no interface {name!r} here", errno_mod.ENODEV) from None
            attrs += rtnl.pack_attr(atype, struct.pack("=I", index))
    if query.mark:
        attrs += rtnl.pack_attr(RTA_MARK, struct.pack("=I", query.mark))
    proto = _PROTOS[query.ipproto]
    if proto == 1 and af == socket.AF_INET6:
        proto = 58
    if proto:
        attrs += rtnl.pack_attr(RTA_IP_PROTO, bytes([proto]))
        if proto in (6, 17):
            if query.sport:
                attrs += rtnl.pack_attr(RTA_SPORT, struct.pack("!H", query.sport))
            if query.dport:
                attrs += rtnl.pack_attr(RTA_DPORT, struct.pack("!H", query.dport))
    header = rtnl.RTMSG.pack(af, dst.max_prefixlen, src_len, 0, 0, 0, 0, 0, flags)
    return af, header, attrs


class RouteGetter:
    """Asks the kernel of this network namespace; one netlink socket, not thread-safe."""

    def __init__(self) -> None:
        self._rt = rtnl.RtnlSocket()
        self._seq = 1
        self._names = IfNames()

    def close(self) -> None:
        self._rt.close()

    def _ask(self, header: bytes, attrs: bytes) -> pb.Route:
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        seq = self._seq
        sock = self._rt.sock
        sock.sendall(rtnl.build_request(rtnl.RTM_GETROUTE, rtnl.NLM_F_REQUEST, seq, header, attrs))
        deadline = time.monotonic() + LOOKUP_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QueryError("the kernel did not answer in time", errno_mod.ETIMEDOUT)
            for mtype, mflags, mseq, body in self._rt.recv_datagram(remaining):
                if mseq != seq:
                    continue
                if mtype == rtnl.NLMSG_ERROR:
                    err, text = rtnl.error_of(body, mflags)
                    detail = f" ({text})" if text else ""
                    raise QueryError(f"{os.strerror(err)}{detail}", err)
                if mtype == rtnl.RTM_NEWROUTE:
                    route = pb.Route()
                    fill_route(route, body, self._names)
                    return route

    def lookup(self, query: ppb.RouteQuery) -> ppb.RouteResult:
        """Both lookups of one query, as one result (errors become ok=false)."""
        result = ppb.RouteResult(id=query.id)
        try:
            _af, header, attrs = _request(query, RTM_F_LOOKUP_TABLE)
            resolved = self._ask(header, attrs)
            _af, header, attrs = _request(query, RTM_F_LOOKUP_TABLE | RTM_F_FIB_MATCH)
            try:
                matched: pb.Route | None = self._ask(header, attrs)
            except QueryError:
                matched = None  # old kernels without FIB match: the resolved answer stands
        except QueryError as exc:
            result.ok = False
            result.errno = exc.errno
            result.error = str(exc)
            return result
        except OSError as exc:
            result.ok = False
            result.errno = exc.errno or errno_mod.EIO
            result.error = f"netlink: {exc.strerror or exc}"
            return result
        result.ok = True
        result.table = resolved.table
        result.type = resolved.type
        result.gateway = resolved.gateway
        result.dev = resolved.dev
        result.prefsrc = resolved.prefsrc
        # "cloned" and the raw RTM_F_* bits describe the answer, not the route.
        result.flags.extend(f for f in resolved.flags if f.isalpha() and f != "cloned")
        if matched is not None:
            result.route_dst = matched.dst
            result.protocol = matched.protocol
            result.metric = matched.metric
            if matched.table:
                result.table = matched.table
            for hop in matched.nexthops:
                result.nexthops.add(
                    gateway=hop.gateway, dev=hop.dev, weight=hop.weight, flags=list(hop.flags)
                )
        return result


def route_get(queries: Sequence[ppb.RouteQuery]) -> list[ppb.RouteResult]:
    """Answer every query in this namespace (blocking; run it in a worker thread)."""
    getter = RouteGetter()
    try:
        return [getter.lookup(q) for q in queries]
    finally:
        getter.close()


class ProbeService(ppb_grpc.ProbeServicer):
    """Implements the Probe service of protos/probe.proto (read-only)."""

    def __init__(self, activity: Activity | None = None) -> None:
        self._activity = activity

    def _active(self) -> None:
        if self._activity is not None:
            self._activity.touch()  # a probe is a use: it defers the idle exit

    async def RouteGet(
        self,
        request: ppb.RouteGetRequest,
        context: grpc.aio.ServicerContext[ppb.RouteGetRequest, ppb.RouteGetReply],
    ) -> ppb.RouteGetReply:
        self._active()
        if len(request.queries) > MAX_QUERIES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.queries)} queries; at most {MAX_QUERIES} per call",
            )
        for query in request.queries:
            problem = validate(query)
            if problem:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        started = time.perf_counter()
        try:
            results = await asyncio.to_thread(route_get, list(request.queries))
        except rtnl.NetlinkError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"rtnetlink: {exc}")
        reply = ppb.RouteGetReply(duration_ms=(time.perf_counter() - started) * 1000.0)
        reply.results.extend(results)
        self._active()
        return reply


def add_probe_service(server: grpc.aio.Server, activity: Activity | None = None) -> None:
    """Serve Probe beside Agent on the same server (agent/main.py)."""
    ppb_grpc.add_ProbeServicer_to_server(ProbeService(activity), server)
