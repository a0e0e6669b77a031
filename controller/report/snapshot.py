"""Rendering snapshots and events for people (table) and for tools (json, yaml).

The JSON form is a contract for other tools: per pod, every section under its
own key (``links``, ``addresses``, ``rules``, ``routes``, ``neighbours``,
``fdb``, ``sysctls``, ``nftables``, ``sockets``, ``processes``, ``bird``,
``nfqlb``), snake_case field names exactly as in protos/agent.proto, every
field present (also zero values), 64-bit counters as JSON numbers (protobuf's
own JSON mapping would turn them into strings), and the nftables ruleset in
nft's own JSON schema (integers stay integers).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from meridio_debug.controller.runtime import PodRef
from meridio_debug.controller.wire.convert import rule_from_proto
from meridio_debug.protos import agent_pb2 as pb

# The sections are the Snapshot message's fields after `sections`, in proto order:
# protos/agent.proto is their one definition.
SECTION_KEYS: tuple[str, ...] = tuple(
    f.name for f in pb.Snapshot.DESCRIPTOR.fields if f.number > pb.Snapshot.SECTIONS_FIELD_NUMBER
)


def _ints(value: Any) -> Any:
    """Struct stores every number as a double: give integral numbers back as int."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    return value


def message_to_dict(msg: Message) -> dict[str, Any]:
    """A message as a JSON-able dict: all fields, proto field names, 64-bit ints as numbers."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if (
            field.message_type is not None
            and field.message_type.full_name == "google.protobuf.Struct"
        ):
            out[field.name] = _ints(json_format.MessageToDict(value))
        elif field.message_type is not None and field.is_repeated:
            out[field.name] = [message_to_dict(v) for v in value]
        elif field.message_type is not None:
            out[field.name] = message_to_dict(value) if msg.HasField(field.name) else None
        elif field.enum_type is not None:
            names = field.enum_type.values_by_number
            if field.is_repeated:
                out[field.name] = [names[v].name for v in value]
            else:
                out[field.name] = names[value].name
        elif field.is_repeated:
            out[field.name] = list(value)
        else:
            out[field.name] = value
    return out


@dataclass(frozen=True)
class PodSnapshot:
    """One pod's snapshot, or why there is none."""

    pod: PodRef
    snapshot: pb.Snapshot | None
    error: str = ""


def snapshot_to_dict(item: PodSnapshot) -> dict[str, Any]:
    """The per-pod JSON object of ``snapshot -o json``."""
    out: dict[str, Any] = {
        "pod": item.pod.name,
        "role": item.pod.role,
        "location": item.pod.location,
        "runtime": item.pod.runtime,
        "error": item.error or None,
    }
    if item.snapshot is None:
        return out
    snap = message_to_dict(item.snapshot)
    out["taken_unix_ns"] = snap["taken_unix_ns"]
    out["agent"] = snap["info"]
    out["section_status"] = snap["sections"]
    for key in SECTION_KEYS:
        out[key] = snap[key]
    out["sysctls"] = {s["key"]: s["value"] for s in snap["sysctls"]}
    return out


def snapshots_document(items: Sequence[PodSnapshot]) -> dict[str, Any]:
    return {
        "kind": "meridio-debug/snapshot",
        "version": 1,
        "pods": [snapshot_to_dict(i) for i in items],
    }


def to_json(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=False)


def to_yaml(doc: Any) -> str:
    return str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))


# --- table (for people) -------------------------------------------------------------


def _columns(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]


def rule_text(r: pb.Rule) -> str:
    """``PRIORITY: selectors action``, the model's rendering (one way to print a rule)."""
    return f"{r.priority}: {rule_from_proto(r).body()}"


def route_text(r: pb.Route) -> str:
    parts = []
    if r.type and r.type != "unicast":
        parts.append(r.type)
    parts.append(r.dst)
    if r.src:
        parts.append(f"from {r.src}")
    if r.gateway:
        parts.append(f"via {r.gateway}")
    if r.dev:
        parts.append(f"dev {r.dev}")
    if r.protocol and r.protocol not in ("boot", "unspec"):
        parts.append(f"proto {r.protocol}")
    if r.scope and r.scope not in ("universe", "global"):
        parts.append(f"scope {r.scope}")
    if r.prefsrc:
        parts.append(f"src {r.prefsrc}")
    if r.metric:
        parts.append(f"metric {r.metric}")
    parts.extend(r.flags)
    text = " ".join(parts)
    for nh in r.nexthops:
        nh_flags = (" " + " ".join(nh.flags)) if nh.flags else ""
        via = f"via {nh.gateway} " if nh.gateway else ""
        text += f"\n      nexthop {via}dev {nh.dev} weight {nh.weight}{nh_flags}"
    return text


def render_snapshot_table(item: PodSnapshot, sections: Iterable[str] = SECTION_KEYS) -> str:
    """A readable per-section view of one pod's snapshot."""
    pod = item.pod
    lines = [f"== {pod.name} ({pod.role}, {pod.location})"]
    if item.snapshot is None:
        lines.append(f"  UNREACHABLE: {item.error}")
        return "\n".join(lines)
    snap = item.snapshot
    status = {s.name: s for s in snap.sections}
    for section in sections:
        st = status.get(section)
        if st is None:
            continue
        state = pb.SectionStatus.State.Name(st.state)
        header = f"-- {section}"
        if st.container:
            header += f" [container {st.container}]"
        if st.state != pb.SectionStatus.OK:
            lines.append(f"{header}: {state}: {st.message}")
            continue
        body = _section_lines(snap, section)
        lines.append(f"{header} ({len(body)})" if body else f"{header}: (empty)")
        if section in ("bird", "nfqlb", "processes") and st.source:
            lines.append(f"  from {st.source}")
        lines.extend(body)
    return "\n".join(lines)


def _section_lines(snap: pb.Snapshot, section: str) -> list[str]:
    if section == "links":
        return _columns(
            [["NAME", "KIND", "STATE", "MTU", "MAC", "MASTER"]]
            + [
                [lk.name, lk.kind or "-", lk.state, str(lk.mtu), lk.mac or "-", lk.master or "-"]
                for lk in snap.links
            ]
        )
    if section == "addresses":
        return _columns(
            [["IFACE", "ADDRESS", "SCOPE", "FLAGS"]]
            + [
                [a.ifname, f"{a.address}/{a.prefixlen}", a.scope, ",".join(a.flags)]
                for a in snap.addresses
            ]
        )
    if section == "rules":
        return [f"  v{r.family} {rule_text(r)}" for r in snap.rules]
    if section == "routes":
        out: list[str] = []
        tables: dict[tuple[int, int], list[pb.Route]] = {}
        for r in snap.routes:
            tables.setdefault((r.table, r.family), []).append(r)
        for (table, family), routes in sorted(tables.items()):
            if table == 255:
                out.append(f"  table local v{family}: {len(routes)} routes (not shown)")
                continue
            out.append(f"  table {table} v{family}:")
            out.extend(f"    {route_text(r)}" for r in routes)
        return out
    if section == "neighbours":
        return _columns(
            [["IFACE", "ADDRESS", "LLADDR", "STATE"]]
            + [[n.ifname, n.dst, n.lladdr or "-", n.state] for n in snap.neighbours]
        )
    if section == "fdb":
        return _columns(
            [["MAC", "IFACE", "MASTER", "STATE", "FLAGS"]]
            + [[f.mac, f.ifname, f.master or "-", f.state, ",".join(f.flags)] for f in snap.fdb]
        )
    if section == "sysctls":
        return [f"  {s.key} = {s.value}" for s in snap.sysctls]
    if section == "nftables":
        return _nft_lines(json_format.MessageToDict(snap.nftables))
    if section == "sockets":
        return _columns(
            [["PROTO", "LOCAL", "REMOTE", "STATE", "PROCESS"]]
            + [
                [
                    s.type,
                    f"{s.laddr}:{s.lport}",
                    f"{s.raddr}:{s.rport}" if s.raddr else "-",
                    s.status,
                    f"{s.process}[{s.pid}]" if s.pid else "-",
                ]
                for s in snap.sockets
            ]
        )
    if section == "processes":
        return _columns(
            [["PID", "NAME", "COMMAND"]]
            + [[str(p.pid), p.name, " ".join(p.cmdline)[:100]] for p in snap.processes]
        )
    if section == "bird":
        b = snap.bird
        out = [f"  bird {b.version} pid {b.pid} socket {b.socket}"]
        out += _columns(
            [["NAME", "PROTO", "TABLE", "STATE", "SINCE", "INFO"]]
            + [[p.name, p.proto, p.table or "-", p.state, p.since, p.info] for p in b.protocols],
            indent="    ",
        )
        if b.bfd_sessions:
            out.append("  BFD sessions:")
            out += _columns(
                [["ADDRESS", "INTERFACE", "STATE", "SINCE"]]
                + [[s.address, s.interface, s.state, s.since] for s in b.bfd_sessions],
                indent="    ",
            )
        return out
    if section == "nfqlb":
        n = snap.nfqlb
        out = [f"  nfqlb pid {n.pid}: {' '.join(n.cmdline)}"] if n.pid else []
        for f in n.flows:
            out.append(
                f"  flow {f.name} prio {f.priority} {','.join(f.protocols)} dsts {','.join(f.dests)} "
                f"dports {','.join(f.dports) or 'any'} matches {f.matches_count}"
            )
        for s in n.shms:
            active = " ".join(f"{a.fwmark}({a.index})" for a in s.active)
            out.append(f"  shm {s.name} M={s.m} N={s.n} Active: {active}")
        return out
    return []


def _nft_lines(doc: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for item in doc.get("nftables", []):
        if "table" in item:
            t = item["table"]
            out.append(f"  table {t.get('family')} {t.get('name')}")
        elif "chain" in item:
            c = item["chain"]
            hook = f" hook {c['hook']} prio {c.get('prio')}" if "hook" in c else ""
            out.append(f"    chain {c.get('name')}{hook}")
        elif "set" in item:
            s = item["set"]
            elems = s.get("elem", [])
            out.append(f"    set {s.get('name')}: {', '.join(str(e) for e in elems)}")
        elif "rule" in item:
            out.append(
                f"      rule in {item['rule'].get('chain')} ({len(item['rule'].get('expr', []))} exprs)"
            )
    return out


def event_to_line(pod: str, event: pb.Event) -> str:
    """One line per watch event: wall time, pod, kind, action, ip-monitor-style summary."""
    ts = datetime.datetime.fromtimestamp(event.unix_ns / 1e9, tz=datetime.UTC)
    overflow = " [events were lost before this one]" if event.overflow else ""
    return f"{ts:%H:%M:%S.%f} {pod:<14} {event.kind:<9} {event.action:<3} {event.summary}{overflow}"


def event_to_dict(pod: str, event: pb.Event) -> dict[str, Any]:
    d = message_to_dict(event)
    obj = event.WhichOneof("object")
    d = {k: v for k, v in d.items() if k not in ("link", "address", "route", "rule", "neighbour")}
    d["object"] = message_to_dict(getattr(event, obj)) if obj else None
    return {"pod": pod, **d}
