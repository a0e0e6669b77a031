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

``SendProbes`` is the one thing the agent does that is not read-only, and
only when a client asks for it (``trace --active --probe``): it sends a few
crafted packets of one flow (TCP SYN, UDP datagram, ICMP/ICMPv6 echo), each
carrying markers that survive every hop -- IPv4 id, TCP sequence number,
ICMP id+seq, a UDP payload text -- so captures in every pod can recognise
the same packet. The packets are crafted with scapy, imported on the first
probe only (a few hundred ms, once; bench/snapshot_bench.py measures it), so
the agent still serves fast after it starts; pyroute2 likewise is imported on
the first RouteGet. The packets are placed by the kernel's
own decision: the RouteGet lookup of the flow (with iif and mark when the
pod is to act as a forwarder, e.g. an LB with the flow's fwmark) picks the
egress interface and next hop, the neighbour table gives its MAC (when the
next hop has none yet, the kernel is asked to resolve it, as the first packet
of real traffic would), and the frame is handed to that interface with an
AF_PACKET socket. So the probe
takes exactly the path the flow's packets would take from this pod on,
including the multipath choice (the lookup carries protocol and ports).
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import ipaddress
import math
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from meridio_debug.agent.errors import CollectorError
from meridio_debug.agent.server import Activity
from meridio_debug.protos import agent_pb2 as pb
from meridio_debug.protos import probe_pb2 as ppb
from meridio_debug.protos import probe_pb2_grpc as ppb_grpc

MAX_QUERIES = 4096
LOOKUP_TIMEOUT = 2.0

if TYPE_CHECKING:
    from meridio_debug.agent.rtnl import RtnlSocket

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


def _request(query: ppb.RouteQuery, flags: int) -> Any:
    """One RTM_GETROUTE request as pyroute2's rtmsg (with the RouteGet attributes)."""
    from meridio_debug.agent.rtnl import RouteGetMessage

    dst = ipaddress.ip_address(query.dst)
    msg = RouteGetMessage()
    msg["family"] = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    msg["dst_len"] = dst.max_prefixlen
    msg["flags"] = flags
    attrs: list[tuple[str, Any]] = [("RTA_DST", str(dst))]
    if query.src:
        src = ipaddress.ip_address(query.src)
        attrs.append(("RTA_SRC", str(src)))
        msg["src_len"] = src.max_prefixlen
    for name, attr in ((query.iif, "RTA_IIF"), (query.oif, "RTA_OIF")):
        if name:
            try:
                attrs.append((attr, socket.if_nametoindex(name)))
            except OSError:
                raise QueryError(f"no interface {name!r} here", errno_mod.ENODEV) from None
    if query.mark:
        attrs.append(("RTA_MARK", query.mark))
    proto = _PROTOS[query.ipproto]
    if proto == 1 and dst.version == 6:
        proto = 58
    if proto:
        attrs.append(("RTA_IP_PROTO", proto))
        if proto in (6, 17):
            if query.sport:
                attrs.append(("RTA_SPORT", query.sport))
            if query.dport:
                attrs.append(("RTA_DPORT", query.dport))
    msg["attrs"] = attrs
    return msg


class RouteGetter:
    """Asks the kernel of this network namespace; one netlink socket, not thread-safe."""

    def __init__(self) -> None:
        from meridio_debug.agent.collectors.netlink import IfNames
        from meridio_debug.agent.rtnl import RtnlSocket

        self._rt: RtnlSocket = RtnlSocket()
        self._names = IfNames()

    def close(self) -> None:
        self._rt.close()

    def _ask(self, flags: int, query: ppb.RouteQuery) -> pb.Route:
        from pyroute2.netlink import NLM_F_REQUEST
        from pyroute2.netlink.rtnl import RTM_GETROUTE, RTM_NEWROUTE

        from meridio_debug.agent.collectors.netlink import fill_route
        from meridio_debug.agent.rtnl import NetlinkError

        try:
            answers = self._rt.request(
                _request(query, flags),
                RTM_GETROUTE,
                NLM_F_REQUEST,
                timeout=LOOKUP_TIMEOUT,
                what="route get",
            )
        except NetlinkError as exc:
            raise QueryError(str(exc).removeprefix("route get: "), exc.errno) from exc
        for answer in answers:
            if answer["header"]["type"] == RTM_NEWROUTE:
                route = pb.Route()
                fill_route(route, answer, self._names)
                return route
        raise QueryError("the kernel answered no route", errno_mod.EIO)

    def lookup(self, query: ppb.RouteQuery) -> ppb.RouteResult:
        """Both lookups of one query, as one result (errors become ok=false)."""
        from meridio_debug.agent.rtnl import RTM_F_FIB_MATCH, RTM_F_LOOKUP_TABLE

        result = ppb.RouteResult(id=query.id)
        try:
            resolved = self._ask(RTM_F_LOOKUP_TABLE, query)
            try:
                matched: pb.Route | None = self._ask(RTM_F_LOOKUP_TABLE | RTM_F_FIB_MATCH, query)
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
    """Answer every query in this namespace (blocking; run it in a worker thread).

    Raises CollectorError (a NetlinkError) when no rtnetlink socket can be opened.
    """
    getter = RouteGetter()
    try:
        return [getter.lookup(q) for q in queries]
    finally:
        getter.close()


# --------------------------------------------------------------------------- probes

MAX_PROBES = 100
MAX_INTERVAL_S = 1.0
PROBE_TTL = 64
MARKER = b"meridio-debug probe"
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
_HAS_MAC = {"REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT", "NOARP"}


def validate_probes(request: ppb.SendProbesRequest) -> str:
    """Why ``request`` is malformed, in one line ("" when it is fine)."""
    form = "expected proto tcp|udp|icmp, src and dst of one family, ports 1-65535 for tcp/udp"
    if request.proto not in ("tcp", "udp", "icmp"):
        return f"proto {request.proto!r}: {form}"
    try:
        src = ipaddress.ip_address(request.src)
        dst = ipaddress.ip_address(request.dst)
    except ValueError:
        return f"src {request.src!r} / dst {request.dst!r}: not IP addresses; {form}"
    if src.version != dst.version:
        return f"src {src} and dst {dst} are of different families; {form}"
    if request.proto != "icmp" and not (
        0 < request.sport <= 0xFFFF and 0 < request.dport <= 0xFFFF
    ):
        return f"{request.proto} needs sport and dport in 1-65535; {form}"
    if request.count > MAX_PROBES:
        return f"count {request.count}: at most {MAX_PROBES} probes per call"
    interval = request.interval_s
    if math.isnan(interval) or not 0 <= interval <= MAX_INTERVAL_S:
        return f"interval_s {interval}: between 0 and {MAX_INTERVAL_S:.0f} s"
    if request.iif:
        try:
            socket.if_nametoindex(request.iif)
        except OSError:
            return f"iif {request.iif!r}: no such interface in this pod"
    return ""


@dataclass(frozen=True, slots=True)
class Marks:
    """What makes probe ``index`` recognisable (see ProbeSent in protos/probe.proto)."""

    ip_id: int
    tcp_seq: int
    icmp_id: int
    icmp_seq: int
    payload: bytes


def marks_for(proto: str, version: int, nonce: int, index: int) -> Marks:
    """Distinct markers per probe: the nonce keeps runs apart, the index probes of one run."""
    ip_id = ((nonce >> 16) + index) & 0xFFFF if version == 4 else 0
    tcp_seq = (nonce + (index << 16)) & 0xFFFFFFFF if proto == "tcp" else 0
    icmp_id = nonce & 0xFFFF if proto == "icmp" else 0
    icmp_seq = (index + 1) & 0xFFFF if proto == "icmp" else 0
    payload = b"" if proto == "tcp" else MARKER + f" {nonce:08x} {index}".encode()
    return Marks(ip_id, tcp_seq, icmp_id, icmp_seq, payload)


def build_packet(
    proto: str,
    *,
    src: str,
    dst: str,
    sport: int,
    dport: int,
    marks: Marks,
) -> bytes:
    """One IPv4/IPv6 packet (no link header) carrying ``marks``, crafted by scapy.

    TCP is a SYN with an MSS option (what a real client sends first); IPv4 sets
    DF and the probe's IP id. scapy fills in lengths and checksums.
    """
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

    v6 = ipaddress.ip_address(src).version == 6
    l3: Any = (
        IPv6(src=src, dst=dst, hlim=PROBE_TTL)
        if v6
        else IP(src=src, dst=dst, id=marks.ip_id, flags="DF", ttl=PROBE_TTL)
    )
    if proto == "tcp":
        l4: Any = TCP(
            sport=sport, dport=dport, seq=marks.tcp_seq, flags="S", window=64240,
            options=[("MSS", 1460)],
        )  # fmt: skip
    elif proto == "udp":
        l4 = UDP(sport=sport, dport=dport) / marks.payload
    elif v6:
        l4 = ICMPv6EchoRequest(id=marks.icmp_id, seq=marks.icmp_seq, data=marks.payload)
    else:
        l4 = ICMP(type=8, id=marks.icmp_id, seq=marks.icmp_seq) / marks.payload
    return bytes(l3 / l4)


def neighbour_mac(address: str, dev: str) -> tuple[str, str]:
    """(MAC, state) of ``address`` on ``dev`` from the kernel's neighbour table ("" if none)."""
    from pyroute2.netlink.rtnl import RTM_GETNEIGH
    from pyroute2.netlink.rtnl.ndmsg import ndmsg

    from meridio_debug.agent.collectors.netlink import IfNames, fill_neighbour
    from meridio_debug.agent.rtnl import RtnlSocket

    names = IfNames()
    with RtnlSocket() as sock:
        answers = sock.dump(ndmsg(), RTM_GETNEIGH)
    want = ipaddress.ip_address(address)
    state = ""
    for msg in answers:
        if msg["family"] not in (socket.AF_INET, socket.AF_INET6):
            continue
        entry = pb.Neighbour()
        fill_neighbour(entry, msg, names)
        if entry.ifname != dev or not entry.dst:
            continue
        try:
            if ipaddress.ip_address(entry.dst) != want:
                continue
        except ValueError:
            continue
        state = entry.state
        if entry.lladdr and set(entry.state.split(",")) & _HAS_MAC:
            return entry.lladdr, entry.state
    return "", state


RESOLVE_TIMEOUT = 1.5


def resolve_neighbour(address: str, dev: str) -> tuple[str, str]:
    """Have the kernel resolve ``address`` on ``dev`` (ARP/ND), wait for its MAC.

    ``ip neigh replace ADDR dev DEV use``: RTM_NEWNEIGH with NTF_USE makes the
    kernel treat the entry as used by traffic -- it sends the ARP request or
    neighbour solicitation it would send for the first packet, and nothing
    else about the entry changes. Only done while sending probes the user
    asked for, and only when the next hop has no MAC yet (e.g. an LB that has
    not sent this target anything since it started).
    """
    from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST
    from pyroute2.netlink.rtnl import RTM_NEWNEIGH
    from pyroute2.netlink.rtnl.ndmsg import NTF_USE, ndmsg

    from meridio_debug.agent.rtnl import RtnlSocket

    ip = ipaddress.ip_address(address)
    msg = ndmsg()
    msg["family"] = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    msg["ifindex"] = socket.if_nametoindex(dev)
    msg["flags"] = NTF_USE
    msg["attrs"] = [("NDA_DST", str(ip))]
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    with RtnlSocket() as sock:
        sock.request(msg, RTM_NEWNEIGH, flags, timeout=LOOKUP_TIMEOUT, what="neighbour use")
    deadline = time.monotonic() + RESOLVE_TIMEOUT
    while True:
        mac, state = neighbour_mac(address, dev)
        if mac or time.monotonic() > deadline:
            return mac, state
        time.sleep(0.02)


def send_probes(request: ppb.SendProbesRequest) -> ppb.SendProbesReply:
    """Route, address and send the probes (blocking; run it in a worker thread)."""
    reply = ppb.SendProbesReply()
    proto = request.proto
    ipproto = proto if proto != "icmp" else "icmp"
    query = ppb.RouteQuery(
        id="probe",
        dst=request.dst,
        src=request.src,
        iif=request.iif,
        mark=request.mark,
        ipproto=ipproto,
        sport=request.sport if proto != "icmp" else 0,
        dport=request.dport if proto != "icmp" else 0,
    )
    getter = RouteGetter()
    try:
        route = getter.lookup(query)
    finally:
        getter.close()
    reply.route.CopyFrom(route)
    how = (
        f"route get {request.dst} from {request.src}"
        + (f" iif {request.iif}" if request.iif else "")
        + (f" mark {request.mark}" if request.mark else "")
    )
    if not route.ok:
        reply.error = f"{how}: {route.error}"
        return reply
    if route.type not in ("unicast", ""):
        reply.error = (
            f"{how}: the kernel answers {route.type} (table {route.table}), nothing to send"
        )
        return reply
    next_hop = route.gateway or request.dst
    try:
        mac, state = neighbour_mac(next_hop, route.dev)
    except (OSError, CollectorError) as exc:
        reply.error = f"cannot read the neighbour table: {exc}"
        return reply
    reply.dev, reply.next_hop, reply.next_hop_mac = route.dev, next_hop, mac
    version = ipaddress.ip_address(request.dst).version
    has_link_header = True
    try:
        with open(f"/sys/class/net/{route.dev}/type") as f:  # ARPHRD_*: 1 is Ethernet
            has_link_header = f.read().strip() in ("1", "772")
    except OSError:
        pass
    if has_link_header and not mac:
        try:
            mac, state = resolve_neighbour(next_hop, route.dev)
        except (OSError, CollectorError) as exc:
            state = f"{state or 'no entry'}; asking the kernel to resolve it failed: {exc}"
        reply.next_hop_mac = mac
    if has_link_header and not mac:
        reply.error = (
            f"{how}: next hop {next_hop} on {route.dev} does not answer ARP/ND "
            f"(neighbour {state or 'no entry'} after {RESOLVE_TIMEOUT:g} s)"
        )
        return reply
    ethertype = ETH_P_IP if version == 4 else ETH_P_IPV6
    addr = bytes.fromhex(mac.replace(":", "")) if has_link_header else b""
    nonce = request.nonce or random.getrandbits(32)
    count = request.count or 1
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)  # receives nothing
    except OSError as exc:
        reply.error = f"cannot open a packet socket: {exc} (needs CAP_NET_RAW)"
        return reply
    try:
        for index in range(count):
            if index and request.interval_s:
                time.sleep(request.interval_s)
            marks = marks_for(proto, version, nonce, index)
            packet = build_packet(
                proto,
                src=request.src,
                dst=request.dst,
                sport=request.sport,
                dport=request.dport,
                marks=marks,
            )
            sent = reply.probes.add(
                seq=index,
                ip_id=marks.ip_id,
                tcp_seq=marks.tcp_seq,
                icmp_id=marks.icmp_id,
                icmp_seq=marks.icmp_seq,
                marker=marks.payload,
            )
            sent.sent_unix_ns = time.time_ns()
            try:
                sock.sendto(packet, (route.dev, ethertype, 0, 0, addr))
                sent.ok = True
            except OSError as exc:
                sent.error = f"send on {route.dev}: {exc.strerror or exc}"
    finally:
        sock.close()
    reply.ok = any(p.ok for p in reply.probes)
    if not reply.ok:
        reply.error = reply.probes[0].error if reply.probes else "nothing sent"
    return reply


class ProbeService(ppb_grpc.ProbeServicer):
    """Implements the Probe service of protos/probe.proto (read-only)."""

    def __init__(self, activity: Activity | None = None) -> None:
        self._activity = activity
        self._sending = asyncio.Semaphore(4)  # concurrent SendProbes calls, at most

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
        except CollectorError as exc:  # no rtnetlink socket (rtnl.NetlinkError)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"rtnetlink: {exc}")
        reply = ppb.RouteGetReply(duration_ms=(time.perf_counter() - started) * 1000.0)
        reply.results.extend(results)
        self._active()
        return reply

    async def SendProbes(
        self,
        request: ppb.SendProbesRequest,
        context: grpc.aio.ServicerContext[ppb.SendProbesRequest, ppb.SendProbesReply],
    ) -> ppb.SendProbesReply:
        self._active()
        problem = validate_probes(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        async with self._sending:
            reply = await asyncio.to_thread(send_probes, request)
        self._active()
        return reply


def add_probe_service(server: grpc.aio.Server, activity: Activity | None = None) -> None:
    """Serve Probe beside Agent on the same server (agent/main.py)."""
    ppb_grpc.add_ProbeServicer_to_server(ProbeService(activity), server)
