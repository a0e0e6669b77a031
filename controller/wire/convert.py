"""The controller's single conversion boundary: agent protobuf (or its JSON) <-> domain model.

Why one boundary: analysis, trace and reports work on plain frozen dataclasses
(controller/model) and must never see protobuf. Live RPC answers and saved bundles
(``MessageToDict(snap, preserving_proto_field_name=True)``) go through the same
code: a dict is parsed back into ``pb.Snapshot`` first, so a bundle replays
exactly like the live run (Hubble's ``--input-file`` idea).

Normalisation happens here, once: address families become 4/6, states get one
case, rule actions one spelling, prefixes a length, and ``nft -j list ruleset``
is reduced to the relations analysis needs (NftState). The agent side may
report AF_INET numbers or odd spellings; nothing downstream has to care.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Final

from google.protobuf import json_format

from meridio_debug.controller.model import (
    Address,
    BfdSession,
    BirdProtocol,
    FdbEntry,
    Link,
    Neighbour,
    NetEvent,
    Nexthop,
    NfqlbFlow,
    NfqlbShm,
    NftDefrag,
    NftMarkMap,
    NftQueueRule,
    NftState,
    NftTable,
    NftVipSet,
    PodResult,
    PodSnapshot,
    Process,
    Role,
    Route,
    Rule,
    SectionState,
    SectionStatus,
    SessionSample,
    infer_role,
    parse_role,
)
from meridio_debug.controller.trace import RouteAnswer, RouteQuery
from meridio_debug.protos import agent_pb2 as pb
from meridio_debug.protos import probe_pb2 as ppb

__all__ = [
    "event_from_proto",
    "nft_state_from_json",
    "pod_result_from_proto",
    "sample_from_proto",
    "snapshot_from_dict",
    "snapshot_from_proto",
]

_AF_INET: Final = 2
_AF_INET6: Final = 10

_SECTION_STATES: Final[Mapping[int, SectionState]] = {
    pb.SectionStatus.OK: "OK",
    pb.SectionStatus.ERROR: "ERROR",
    pb.SectionStatus.ABSENT: "ABSENT",
}

_RULE_ACTIONS: Final[Mapping[str, str]] = {
    "": "lookup",
    "unspec": "lookup",
    "to_tbl": "lookup",
    "fr_act_to_tbl": "lookup",
    "lookup": "lookup",
    "table": "lookup",
    "goto": "goto",
    "fr_act_goto": "goto",
    "nop": "nop",
    "fr_act_nop": "nop",
    "blackhole": "blackhole",
    "fr_act_blackhole": "blackhole",
    "unreachable": "unreachable",
    "fr_act_unreachable": "unreachable",
    "prohibit": "prohibit",
    "fr_act_prohibit": "prohibit",
}

# Well-known table names some tools print instead of numbers.
_TABLE_NAMES: Final[Mapping[str, int]] = {"local": 255, "main": 254, "default": 253}


# --------------------------------------------------------------------------- public API


def snapshot_from_proto(
    pod: str, role: str | None, snap: pb.Snapshot, *, namespace: str = ""
) -> PodSnapshot:
    """Convert one agent Snapshot into the domain model.

    ``role`` may be None/"unknown": it is then inferred from the state (model.infer_role).
    """
    nft_status = _section_state(snap, "nftables")
    nft = NftState()
    if nft_status == "OK" and snap.HasField("nftables"):
        nft = nft_state_from_json(json_format.MessageToDict(snap.nftables))
    result = PodSnapshot(
        pod=pod,
        role="unknown",
        namespace=namespace,
        netns=snap.info.netns,
        taken_unix_ns=snap.taken_unix_ns,
        sections=tuple(
            SectionStatus(
                name=s.name,
                state=_SECTION_STATES.get(s.state, "UNSPECIFIED"),
                message=s.message,
                container=s.container,
                source=s.source,
            )
            for s in snap.sections
        ),
        links=tuple(_link(link) for link in snap.links),
        addresses=tuple(_address(addr) for addr in snap.addresses),
        rules=tuple(_rule(rule) for rule in snap.rules),
        routes=tuple(_route(route) for route in snap.routes),
        neighbours=tuple(_neighbour(n) for n in snap.neighbours),
        fdb=tuple(_fdb(entry) for entry in snap.fdb),
        sysctls={s.key: _sysctl_value(s.value) for s in snap.sysctls},
        nft=nft,
        processes=tuple(
            Process(pid=p.pid, name=p.name, cmdline=tuple(p.cmdline)) for p in snap.processes
        ),
        bird_protocols=tuple(_bird_protocol(p) for p in snap.bird.protocols),
        bfd_sessions=tuple(_bfd(s) for s in snap.bird.bfd_sessions),
        nfqlb_flows=tuple(_nfqlb_flow(f) for f in snap.nfqlb.flows),
        nfqlb_shms=tuple(
            NfqlbShm(
                name=s.name,
                m=s.m,
                n=s.n,
                active=tuple(a.fwmark for a in s.active),
                indexes=tuple(a.index for a in s.active),
                lookup=tuple(s.lookup),
            )
            for s in snap.nfqlb.shms
        ),
    )
    wanted = parse_role(role)
    final_role: Role = wanted if wanted != "unknown" else infer_role(result)
    return _with_role(result, final_role)


def snapshot_from_dict(
    pod: str, role: str | None, data: Mapping[str, Any], *, namespace: str = ""
) -> PodSnapshot:
    """Convert a saved snapshot (``MessageToDict(..., preserving_proto_field_name=True)``).

    Unknown fields (a newer agent) are ignored; the dict goes through ``pb.Snapshot``
    so bundles and live answers share every line of conversion code.
    """
    snap = pb.Snapshot()
    json_format.ParseDict(dict(data), snap, ignore_unknown_fields=True)
    return snapshot_from_proto(pod, role, snap, namespace=namespace)


def pod_result_from_proto(
    pod: str,
    role: str | None,
    snap: pb.Snapshot | None,
    *,
    error: str = "",
    namespace: str = "",
) -> PodResult:
    """A PodResult for a pod that answered (snap) or could not be reached (error)."""
    if snap is None:
        return PodResult(
            pod=pod,
            role=parse_role(role),
            snapshot=None,
            error=error or "no snapshot",
            namespace=namespace,
        )
    model = snapshot_from_proto(pod, role, snap, namespace=namespace)
    return PodResult(pod=pod, role=model.role, snapshot=model, namespace=namespace)


# --------------------------------------------------------------------------- sections


def _section_state(snap: pb.Snapshot, name: str) -> SectionState | None:
    for status in snap.sections:
        if status.name == name:
            return _SECTION_STATES.get(status.state, "UNSPECIFIED")
    return None


def _with_role(snapshot: PodSnapshot, role: Role) -> PodSnapshot:
    return replace(snapshot, role=role)


def _family(value: int, *addresses: str) -> int:
    if value in (4, _AF_INET):
        return 4
    if value in (6, _AF_INET6):
        return 6
    for text in addresses:
        if text and text != "default":
            return 6 if ":" in text else 4
    return 4


def _strip_addr(text: str) -> str:
    """Drop a scope suffix (fe80::1%eth0) and whitespace."""
    return text.strip().split("%", 1)[0]


def _prefix(text: str, length: int | None, family: int) -> str:
    """A prefix with its length; "" stays "" (from all)."""
    text = _strip_addr(text)
    if not text:
        return ""
    if text in ("default", "0.0.0.0/0", "::/0", "all", "any"):
        return "default"
    if "/" not in text:
        bits = length if length is not None else (32 if family == 4 else 128)
        text = f"{text}/{bits}"
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        return text


def _sysctl_value(value: str) -> str:
    return " ".join(value.split())


def _link(link: pb.Link) -> Link:
    return Link(
        name=link.name,
        index=link.index,
        kind=link.kind.lower(),
        state=(link.state or "UNKNOWN").upper(),
        flags=tuple(f.upper() for f in link.flags),
        mtu=link.mtu,
        mac=link.mac.lower(),
        master=link.master,
        slave_kind=link.slave_kind,
        link_index=link.link_index,
        alias=link.alias,
    )


def _address(addr: pb.Address) -> Address:
    address = _strip_addr(addr.address)
    family = _family(addr.family, address)
    prefixlen = addr.prefixlen or (32 if family == 4 else 128)
    return Address(
        family=family,
        ifname=addr.ifname,
        address=address,
        prefixlen=prefixlen,
        scope=(addr.scope or "global").lower(),
        flags=tuple(f.lower() for f in addr.flags),
        index=addr.index,
    )


def rule_from_proto(rule: pb.Rule) -> Rule:
    """One rule, as the snapshot conversion makes it (for printing a rule on its own)."""
    return _rule(rule)


def _rule(rule: pb.Rule) -> Rule:
    family = _family(rule.family, rule.src, rule.dst)
    action = _RULE_ACTIONS.get(rule.action.strip().lower(), rule.action.strip().lower())
    src = _prefix(rule.src, rule.src_len or None, family) if rule.src else ""
    dst = _prefix(rule.dst, rule.dst_len or None, family) if rule.dst else ""
    return Rule(
        family=family,
        priority=rule.priority,
        table=rule.table,
        action=action,
        src="" if src == "default" else src,
        dst="" if dst == "default" else dst,
        fwmark=rule.fwmark,
        fwmask=rule.fwmask,
        has_fwmark=rule.has_fwmark or rule.fwmark != 0,
        iif=rule.iif,
        oif=rule.oif,
        invert=rule.invert,
        ipproto=rule.ipproto,
        sport=(rule.sport_start, rule.sport_end) if rule.sport_start or rule.sport_end else None,
        dport=(rule.dport_start, rule.dport_end) if rule.dport_start or rule.dport_end else None,
        uid_range=(rule.uid_start, rule.uid_end) if rule.has_uid_range else None,
        goto=rule.goto,
    )


def _route(route: pb.Route) -> Route:
    family = _family(route.family, route.dst, route.gateway)
    return Route(
        family=family,
        table=route.table,
        dst=_prefix(route.dst, None, family) or "default",
        type=(route.type or "unicast").lower(),
        gateway=_strip_addr(route.gateway),
        dev=route.dev,
        protocol=route.protocol,
        metric=route.metric,
        prefsrc=_strip_addr(route.prefsrc),
        scope=route.scope.lower(),
        nexthops=tuple(
            Nexthop(
                gateway=_strip_addr(hop.gateway),
                dev=hop.dev,
                weight=hop.weight or 1,
                flags=tuple(f.lower() for f in hop.flags),
            )
            for hop in route.nexthops
        ),
        flags=tuple(f.lower() for f in route.flags),
        src=_prefix(route.src, None, family) if route.src else "",
    )


def _neighbour(n: pb.Neighbour) -> Neighbour:
    dst = _strip_addr(n.dst)
    return Neighbour(
        family=_family(n.family, dst),
        ifname=n.ifname,
        dst=dst,
        lladdr=n.lladdr.lower(),
        state=(n.state or "NONE").upper(),
        flags=tuple(f.lower() for f in n.flags),
    )


def _fdb(entry: pb.FdbEntry) -> FdbEntry:
    return FdbEntry(
        mac=entry.mac.lower(),
        ifname=entry.ifname,
        master=entry.master,
        vlan=entry.vlan,
        state=entry.state.lower(),
        flags=tuple(f.lower() for f in entry.flags),
    )


def _bfd(s: pb.BfdSession) -> BfdSession:
    return BfdSession(
        address=_strip_addr(s.address),
        state=s.state.strip(),
        interface=s.interface,
        protocol=s.protocol,
    )


def _bird_protocol(p: pb.BirdProtocol) -> BirdProtocol:
    return BirdProtocol(
        name=p.name,
        proto=p.proto,
        state=p.state.strip().lower(),
        info=" ".join(p.info.split()),
        table=p.table,
        bgp_state=p.bgp_state.strip(),
        neighbor_address=_strip_addr(p.neighbor_address),
        neighbor_as=p.neighbor_as,
        local_as=p.local_as,
        last_error=p.last_error,
        bfd=p.bfd,
        channel=p.channel.lower(),
    )


def _nfqlb_flow(f: pb.NfqlbFlow) -> NfqlbFlow:
    return NfqlbFlow(
        name=f.name,
        priority=f.priority,
        protocols=tuple(f.protocols),
        dests=tuple(f.dests),
        dports=tuple(f.dports),
        srcs=tuple(f.srcs),
        sports=tuple(f.sports),
        matches_count=f.matches_count,
        user_ref=f.user_ref,
    )


# --------------------------------------------------------------------------- nftables

_DEFRAG_TABLE: Final = "meridio-defrag"
_SET_FAMILIES: Final[Mapping[str, int]] = {"ipv4_addr": 4, "ipv6_addr": 6}
_PAYLOAD_FAMILIES: Final[Mapping[str, int]] = {"ip": 4, "ip6": 6}


def nft_state_from_json(ruleset: Mapping[str, Any]) -> NftState:
    """Reduce ``nft -j list ruleset`` to what analysis needs.

    Accepts the JSON either as nft prints it or after a trip through
    ``google.protobuf.Struct`` (where every number became a float).
    VIP sets are the address sets that a marking/queueing rule matches with
    ``daddr @set``, plus sets named ``*-vips`` (Meridio's names) even when no
    rule uses them yet.
    """
    objects = ruleset.get("nftables", [])
    if not isinstance(objects, Sequence):
        return NftState()
    tables: list[NftTable] = []
    sets: dict[tuple[str, str], tuple[str, int, tuple[str, ...]]] = {}
    mark_maps: list[NftMarkMap] = []
    queues: list[NftQueueRule] = []
    defrag_tables: set[str] = set()
    defrag_prefixes: list[str] = []
    for obj in objects:
        if not isinstance(obj, Mapping):
            continue
        if "table" in obj and isinstance(obj["table"], Mapping):
            t = obj["table"]
            name = str(t.get("name", ""))
            tables.append(NftTable(family=str(t.get("family", "")), name=name))
            if name == _DEFRAG_TABLE:
                defrag_tables.add(name)
        elif "set" in obj and isinstance(obj["set"], Mapping):
            s = obj["set"]
            family = _SET_FAMILIES.get(str(s.get("type", "")), 0)
            if family:
                key = (str(s.get("table", "")), str(s.get("name", "")))
                sets[key] = (key[1], family, tuple(_set_elements(s.get("elem", []), family)))
        elif "rule" in obj and isinstance(obj["rule"], Mapping):
            rule = obj["rule"]
            table = str(rule.get("table", ""))
            chain = str(rule.get("chain", ""))
            exprs = rule.get("expr", [])
            if not isinstance(exprs, Sequence):
                continue
            if table == _DEFRAG_TABLE:
                defrag_prefixes.extend(_iifname_prefixes(exprs))
                continue
            vip_set, daddr_family = _daddr_set(exprs)
            for expr in exprs:
                if not isinstance(expr, Mapping):
                    continue
                marks = _mark_map(expr)
                if marks is not None:
                    family, values, modulus = marks
                    mark_maps.append(
                        NftMarkMap(
                            table=table,
                            chain=chain,
                            family=family or daddr_family,
                            vip_set=vip_set,
                            marks=values,
                            modulus=modulus,
                            **_hash_params(expr),
                        )
                    )
                elif "queue" in expr or _is_xt_nfqueue(expr):
                    queues.append(
                        NftQueueRule(
                            table=table,
                            chain=chain,
                            family=daddr_family,
                            vip_set=vip_set,
                            queue=_queue_num(expr.get("queue")),
                        )
                    )
    used_sets = {(m.table, m.vip_set) for m in mark_maps} | {(q.table, q.vip_set) for q in queues}
    vip_sets = tuple(
        NftVipSet(table=key[0], name=name, family=family, elements=elements)
        for key, (name, family, elements) in sets.items()
        if key in used_sets or name.endswith("-vips")
    )
    defrag = None
    if defrag_tables:
        defrag = NftDefrag(table=_DEFRAG_TABLE, iifname_prefixes=tuple(defrag_prefixes))
    return NftState(
        tables=tuple(tables),
        vip_sets=vip_sets,
        mark_maps=tuple(mark_maps),
        queue_rules=tuple(queues),
        defrag=defrag,
    )


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            return None
    return None


def _set_elements(elems: Any, family: int) -> Iterator[str]:
    if not isinstance(elems, Sequence) or isinstance(elems, str):
        elems = [elems] if elems else []
    for raw in elems:
        elem = raw
        if isinstance(raw, Mapping) and "elem" in raw:  # {"elem": {"val": ..., "timeout": ...}}
            inner = raw["elem"]
            elem = inner.get("val", inner) if isinstance(inner, Mapping) else inner
        if isinstance(elem, str):
            yield _prefix(elem, None, family)
        elif isinstance(elem, Mapping) and isinstance(elem.get("prefix"), Mapping):
            p = elem["prefix"]
            yield _prefix(str(p.get("addr", "")), _as_int(p.get("len")), family)
        elif isinstance(elem, Mapping) and isinstance(elem.get("range"), Sequence):
            low, high = (str(x) for x in list(elem["range"])[:2])
            yield f"{low}-{high}"


def _daddr_set(exprs: Iterable[Any]) -> tuple[str, int]:
    """The set matched by ``ip daddr @set`` / ``ip6 daddr @set`` in a rule, and its family."""
    for expr in exprs:
        if not isinstance(expr, Mapping) or not isinstance(expr.get("match"), Mapping):
            continue
        match = expr["match"]
        left, right = match.get("left"), match.get("right")
        if not (isinstance(right, str) and right.startswith("@") and isinstance(left, Mapping)):
            continue
        payload = left.get("payload")
        if isinstance(payload, Mapping) and payload.get("field") == "daddr":
            return right[1:], _PAYLOAD_FAMILIES.get(str(payload.get("protocol", "")), 0)
    return "", 0


def _mark_map(expr: Mapping[str, Any]) -> tuple[int, tuple[int, ...], int] | None:
    """``meta mark set jhash <payload> mod N map {k: mark}`` -> (family, marks, N)."""
    mangle = expr.get("mangle")
    if not isinstance(mangle, Mapping):
        return None
    key = mangle.get("key")
    if not (isinstance(key, Mapping) and isinstance(key.get("meta"), Mapping)):
        return None
    if key["meta"].get("key") != "mark":
        return None
    value = mangle.get("value")
    if not isinstance(value, Mapping) or not isinstance(value.get("map"), Mapping):
        # A constant mark (meta mark set 5001) is a one-entry "map". Setting 0 resets the
        # mark (Meridio's snat-local does it to reflected ICMP errors): no target.
        constant = _as_int(value)
        return (0, (constant,), 1) if constant else None
    nft_map = value["map"]
    family = 0
    modulus = 0
    hash_key = nft_map.get("key")
    if isinstance(hash_key, Mapping):
        for hash_kind in ("jhash", "symhash", "numgen"):
            spec = hash_key.get(hash_kind)
            if isinstance(spec, Mapping):
                modulus = _as_int(spec.get("mod")) or 0
                inner = spec.get("expr")
                if isinstance(inner, Mapping) and isinstance(inner.get("payload"), Mapping):
                    proto = str(inner["payload"].get("protocol", ""))
                    family = _PAYLOAD_FAMILIES.get(proto, 0)
    data = nft_map.get("data")
    pairs: Any = data.get("set", []) if isinstance(data, Mapping) else []
    marks: list[int] = []
    if isinstance(pairs, Sequence):
        for pair in pairs:
            if isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2:
                mark = _as_int(pair[1])
                if mark is not None:
                    marks.append(mark)
    return family, tuple(marks), modulus


def _hash_params(expr: Mapping[str, Any]) -> dict[str, Any]:
    """hash kind, seed, offset and (hash value, mark) pairs of a mark map (for the trace)."""
    value = expr["mangle"].get("value")
    if not isinstance(value, Mapping) or not isinstance(value.get("map"), Mapping):
        return {}
    nft_map = value["map"]
    out: dict[str, Any] = {}
    hash_key = nft_map.get("key")
    if isinstance(hash_key, Mapping):
        for hash_kind in ("jhash", "symhash", "numgen"):
            spec = hash_key.get(hash_kind)
            if isinstance(spec, Mapping):
                out["hash"] = hash_kind
                out["offset"] = _as_int(spec.get("offset")) or 0
                # The seed is kept only when the key is the bare source address
                # (what controller/trace/hashing.py computes); a concatenation
                # (saddr . dport) or another field leaves it unknown.
                inner = spec.get("expr")
                payload = inner.get("payload") if isinstance(inner, Mapping) else None
                if isinstance(payload, Mapping) and payload.get("field") == "saddr":
                    out["seed"] = _as_int(spec.get("seed"))
    data = nft_map.get("data")
    pairs: Any = data.get("set", []) if isinstance(data, Mapping) else []
    entries: list[tuple[int, int]] = []
    if isinstance(pairs, Sequence):
        for pair in pairs:
            if isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2:
                key, mark = _as_int(pair[0]), _as_int(pair[1])
                if key is not None and mark is not None:
                    entries.append((key, mark))
    out["entries"] = tuple(entries)
    return out


def _is_xt_nfqueue(expr: Mapping[str, Any]) -> bool:
    """The xtables NFQUEUE target through nft_compat (kernels without nft's queue expression)."""
    xt = expr.get("xt")
    return isinstance(xt, Mapping) and xt.get("type") == "target" and xt.get("name") == "NFQUEUE"


def _queue_num(spec: Any) -> str:
    if not isinstance(spec, Mapping):
        return ""
    num = spec.get("num")
    if isinstance(num, Mapping) and isinstance(num.get("range"), Sequence):
        low, high = (_as_int(x) for x in list(num["range"])[:2])
        return f"{low}-{high}"
    value = _as_int(num)
    return "" if value is None else str(value)


def _iifname_prefixes(exprs: Iterable[Any]) -> Iterator[str]:
    """Values of ``iifname "<prefix>*"`` matches (a set of them counts too)."""
    for expr in exprs:
        if not isinstance(expr, Mapping) or not isinstance(expr.get("match"), Mapping):
            continue
        match = expr["match"]
        left = match.get("left")
        if not (isinstance(left, Mapping) and isinstance(left.get("meta"), Mapping)):
            continue
        if left["meta"].get("key") != "iifname":
            continue
        right = match.get("right")
        values: list[Any]
        if isinstance(right, Mapping) and isinstance(right.get("set"), Sequence):
            values = list(right["set"])
        else:
            values = [right]
        for value in values:
            if isinstance(value, str):
                yield value[:-1] if value.endswith("*") else value


# --------------------------------------------------------------------------- over time


def event_from_proto(pod: str, event: pb.Event) -> NetEvent:
    """One watched netlink event as the model (same conversions as a snapshot's)."""
    which = event.WhichOneof("object")
    return NetEvent(
        pod=pod,
        unix_ns=event.unix_ns,
        kind=event.kind,
        action=event.action,
        summary=event.summary,
        link=_link(event.link) if which == "link" else None,
        address=_address(event.address) if which == "address" else None,
        route=_route(event.route) if which == "route" else None,
        rule=_rule(event.rule) if which == "rule" else None,
        neighbour=_neighbour(event.neighbour) if which == "neighbour" else None,
        overflow=event.overflow,
    )


def sample_from_proto(pod: str, unix_ns: int, snap: pb.Snapshot) -> SessionSample:
    """bird's protocols and BFD sessions of a (bird-only) snapshot at ``unix_ns``."""
    return SessionSample(
        pod=pod,
        unix_ns=unix_ns,
        protocols=tuple(_bird_protocol(p) for p in snap.bird.protocols),
        bfd_sessions=tuple(_bfd(s) for s in snap.bird.bfd_sessions),
    )


def route_query_to_proto(q: RouteQuery) -> ppb.RouteQuery:
    """A planned FIB question as the Probe.RouteGet request item."""
    return ppb.RouteQuery(
        id=q.id,
        dst=q.dst,
        src=q.src,
        iif=q.iif,
        oif=q.oif,
        mark=q.mark,
        ipproto=q.ipproto,
        sport=q.sport,
        dport=q.dport,
    )


def route_answer_from_proto(r: ppb.RouteResult) -> RouteAnswer:
    """The kernel's answer to one RouteGet item, for the trace core."""
    return RouteAnswer(
        ok=r.ok,
        errno=r.errno,
        error=r.error,
        table=r.table,
        type=r.type,
        gateway=r.gateway,
        dev=r.dev,
        prefsrc=r.prefsrc,
        route_dst=r.route_dst,
        protocol=r.protocol,
        metric=r.metric,
        nexthops=tuple(
            Nexthop(gateway=h.gateway, dev=h.dev, weight=h.weight, flags=tuple(h.flags))
            for h in r.nexthops
        ),
        flags=tuple(r.flags),
    )
