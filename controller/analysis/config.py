"""Configuration vs data plane (MDB6xx): what the trench's Meridio objects ask for, against
what nfqlb, nft, the routing rules, bird and the interfaces do.

Why: a trench can be healthy by every relation between its pods and still not
do what the operator asked (a Flow's port edited while the LB kept the old
nfqlb flow, a Vip removed but still in the LB's nft set, a Gateway's ASN
changed and bird left on the old one). istioctl's ``proxy-status`` does this
for Envoy; here the intent is ``TrenchConfig.meridio`` (Meridio CRs, the
ConfigMap ``meridio-configuration-<trench>``, or the lab's CRs) and every
finding shows both sides: ``{"config": ..., "<data plane>": ...}``.

Every check here needs the configuration: without it the check is skipped
(nothing is invented), and each also ``needs`` the sections it compares.
Naming conventions followed (meridio-reference.md §1, §2.4): nfqlb flows are
``tshm-<stream>-<flow>`` with ``user_ref`` ``tshm-<stream>``; NSM names a
conduit interface from the first 10 characters of its service name
(``<conduit>.<trench>.<ns>``, proxy side ``proxy.<conduit>...``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator

from meridio_debug.controller.analysis._base import pod_check
from meridio_debug.controller.analysis._view import PodView, TrenchView, ip, net
from meridio_debug.controller.analysis.findings import Issue, Severity
from meridio_debug.controller.model import (
    CfgFlow,
    CfgGateway,
    IpNetwork,
    MeridioConfig,
    NfqlbFlow,
    Role,
    normalize_prefix,
)

_LB: tuple[Role, ...] = ("lb-fe",)
_ANY_PORTS = ((0, 65535),)
_ALL_SRC = frozenset({"0.0.0.0/0", "::/0"})
_NSM_NAME_LEN = 10


def _config(trench: TrenchView) -> MeridioConfig | None:
    cfg = trench.state.config
    return cfg.meridio if cfg is not None else None


# --------------------------------------------------------------------------- flows


def port_ranges(items: Iterable[str]) -> tuple[tuple[int, int], ...]:
    """``["4000", "4001-4003", "any"]`` -> merged ranges; empty/any -> ``((0, 65535),)``.

    Meridio leaves "any" out of ``nfqlb flow-set``, so an nfqlb flow without
    ports and a Flow with ``any`` mean the same thing.
    """
    ranges: list[tuple[int, int]] = []
    for item in items:
        for part in str(item).split(","):
            text = part.strip().lower()
            if not text:
                continue
            if text == "any":
                return _ANY_PORTS
            lo, _sep, hi = text.partition("-")
            try:
                start, end = int(lo), int(hi or lo)
            except ValueError:
                ranges.append((-1, -1))  # unparseable: never equal to anything valid
                continue
            ranges.append((min(start, end), max(start, end)))
    if not ranges:
        return _ANY_PORTS
    ranges.sort()
    merged: list[tuple[int, int]] = [ranges[0]]
    for start, end in ranges[1:]:
        last = merged[-1]
        if start <= last[1] + 1 and last[0] >= 0:
            merged[-1] = (last[0], max(last[1], end))
        else:
            merged.append((start, end))
    return tuple(merged)


def _ranges_text(ranges: tuple[tuple[int, int], ...]) -> list[str]:
    if ranges == _ANY_PORTS:
        return ["any"]
    return [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges]


def _prefixes(items: Iterable[str]) -> set[str]:
    return {normalize_prefix(i) for i in items} - _ALL_SRC


def _flow_vips(cfg: MeridioConfig, flow: CfgFlow) -> tuple[set[str], list[str]]:
    """The Flow's VIP prefixes, and the Vip names it references that do not exist."""
    out: set[str] = set()
    unknown: list[str] = []
    for name in flow.vips:
        vip = cfg.vip(name)
        if vip is None:
            unknown.append(name)
        else:
            out.add(normalize_prefix(vip.address))
    return out, unknown


def nfqlb_name(flow: CfgFlow) -> str:
    """The nfqlb flow name Meridio's stateless-lb gives a Flow."""
    return f"tshm-{flow.stream}-{flow.name}"


def _find_nfqlb(flow: CfgFlow, flows: Iterable[NfqlbFlow]) -> NfqlbFlow | None:
    candidates = list(flows)
    for f in candidates:
        if f.name == nfqlb_name(flow):
            return f
    for f in candidates:
        if f.name == flow.name or f.name.endswith(f"-{flow.name}"):
            return f
    return None


def flow_differences(
    cfg: MeridioConfig, flow: CfgFlow, nf: NfqlbFlow
) -> dict[str, dict[str, object]]:
    """Field -> {"config": ..., "nfqlb": ...} for every field of ``flow`` nfqlb does otherwise."""
    diff: dict[str, dict[str, object]] = {}
    want_protos = sorted({p.lower() for p in flow.protocols})
    have_protos = sorted({p.lower() for p in nf.protocols})
    if want_protos != have_protos:
        diff["protocols"] = {"config": want_protos, "nfqlb": have_protos}
    for field, want, have in (
        ("dports", flow.destination_ports, nf.dports),
        ("sports", flow.source_ports, nf.sports),
    ):
        w, h = port_ranges(want), port_ranges(have)
        if w != h:
            diff[field] = {"config": _ranges_text(w), "nfqlb": _ranges_text(h)}
    vips, _unknown = _flow_vips(cfg, flow)
    dests = _prefixes(nf.dests)
    if vips != dests:
        diff["vips"] = {"config": sorted(vips), "nfqlb": sorted(dests)}
    srcs_want, srcs_have = _prefixes(flow.source_subnets), _prefixes(nf.srcs)
    if srcs_want != srcs_have:
        diff["source_subnets"] = {"config": sorted(srcs_want), "nfqlb": sorted(srcs_have)}
    if flow.priority != nf.priority:
        diff["priority"] = {"config": flow.priority, "nfqlb": nf.priority}
    shm = f"tshm-{flow.stream}"
    if nf.user_ref and nf.user_ref != shm:
        diff["stream"] = {"config": shm, "nfqlb": nf.user_ref}
    return diff


def _conduit_prefix(name: str) -> str:
    return name[:_NSM_NAME_LEN]


def _lb_flows(cfg: MeridioConfig, pod: PodView) -> list[CfgFlow]:
    """The Flows this LB should carry: those of streams whose conduit it is attached to.

    With one conduit every LB carries every Flow; otherwise the conduit shows as an
    interface (NSM naming) or the stream's shm exists in the LB.
    """
    if len(cfg.conduits) <= 1:
        return list(cfg.flows)
    shms = {s.name for s in pod.snap.nfqlb_shms}
    out: list[CfgFlow] = []
    for flow in cfg.flows:
        stream = cfg.stream(flow.stream)
        conduit = stream.conduit if stream is not None else ""
        attached = conduit and any(name.startswith(_conduit_prefix(conduit)) for name in pod.links)
        if attached or f"tshm-{flow.stream}" in shms:
            out.append(flow)
    return out


def _nfqlb_evidence(nf: NfqlbFlow) -> dict[str, object]:
    return {
        "name": nf.name,
        "priority": nf.priority,
        "protocols": list(nf.protocols),
        "dests": list(nf.dests),
        "dports": list(nf.dports),
        "srcs": list(nf.srcs),
        "sports": list(nf.sports),
        "user_ref": nf.user_ref,
        "matches_count": nf.matches_count,
    }


def _flow_evidence(cfg: MeridioConfig, flow: CfgFlow) -> dict[str, object]:
    vips, unknown = _flow_vips(cfg, flow)
    out: dict[str, object] = {
        "name": flow.name,
        "stream": flow.stream,
        "priority": flow.priority,
        "protocols": list(flow.protocols),
        "vips": sorted(vips),
        "destination_ports": list(flow.destination_ports),
        "source_ports": list(flow.source_ports),
        "source_subnets": list(flow.source_subnets),
    }
    if unknown:
        out["unknown_vips"] = unknown
    return out


def _nfqlb_pod_flows(pod: PodView, trench: TrenchView) -> tuple[MeridioConfig, list[CfgFlow]]:
    cfg = _config(trench)
    if cfg is None:
        return MeridioConfig(trench=""), []
    return cfg, _lb_flows(cfg, pod)


@pod_check("MDB601", Severity.ERROR, "Flow without its nfqlb flow", roles=_LB, needs=("nfqlb",))
def check_flow_present(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """Every Flow of the LB's streams has an nfqlb flow (no flow: its packets are dropped)."""
    cfg, flows = _nfqlb_pod_flows(pod, trench)
    for flow in flows:
        if _find_nfqlb(flow, pod.snap.nfqlb_flows) is not None:
            continue
        yield Issue(
            summary=f"Flow {flow.name} (stream {flow.stream}) has no nfqlb flow {nfqlb_name(flow)}",
            evidence={
                "config": _flow_evidence(cfg, flow),
                "nfqlb": sorted(f.name for f in pod.snap.nfqlb_flows),
                "config_source": cfg.source,
            },
            hint="nfqlb drops what no flow matches: check the stateless-lb log for the flow-set "
            f"error (nfqlb flow-list in the LB; Flow CR {flow.name})",
        )


@pod_check(
    "MDB602", Severity.ERROR, "nfqlb flow differs from its Flow", roles=_LB, needs=("nfqlb",)
)
def check_flow_fields(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """Protocols, ports, VIPs, source subnets and priority of the nfqlb flow are the Flow's."""
    cfg, flows = _nfqlb_pod_flows(pod, trench)
    for flow in flows:
        nf = _find_nfqlb(flow, pod.snap.nfqlb_flows)
        if nf is None:
            continue
        diff = flow_differences(cfg, flow, nf)
        if not diff:
            continue
        parts = [f"{k} {_short(v['nfqlb'])} (Flow: {_short(v['config'])})" for k, v in diff.items()]
        yield Issue(
            summary=f"nfqlb flow {nf.name} differs from Flow {flow.name}: " + "; ".join(parts),
            evidence={
                "differs": diff,
                "config": _flow_evidence(cfg, flow),
                "nfqlb": _nfqlb_evidence(nf),
                "config_source": cfg.source,
            },
            hint="the LB did not apply the Flow as configured (an edit not picked up, or a "
            "stale LB): compare `kubectl get flow " + flow.name + " -o yaml` with nfqlb "
            "flow-list in the stateless-lb container; restarting the LB re-applies its flows",
        )


def _short(value: object) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


@pod_check("MDB603", Severity.WARNING, "nfqlb flow no Flow declares", roles=_LB, needs=("nfqlb",))
def check_flow_extra(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """An nfqlb flow that matches no Flow of the trench (a deleted Flow still load-balanced)."""
    cfg = _config(trench)
    if cfg is None:
        return
    for nf in pod.snap.nfqlb_flows:
        if any(_find_nfqlb(flow, (nf,)) is not None for flow in cfg.flows):
            continue
        yield Issue(
            summary=f"nfqlb flow {nf.name} matches no Flow of trench {cfg.trench}",
            evidence={
                "nfqlb": _nfqlb_evidence(nf),
                "config": sorted(f.name for f in cfg.flows),
                "config_source": cfg.source,
            },
            hint="a Flow deleted or renamed while the LB kept its nfqlb flow: traffic still "
            "goes to that stream; check the stateless-lb log and the Flow CRs",
        )


# --------------------------------------------------------------------------- VIPs


def _cfg_vips(cfg: MeridioConfig) -> dict[IpNetwork, str]:
    out: dict[IpNetwork, str] = {}
    for vip in cfg.vips:
        prefix = net(vip.address)
        if prefix is not None:
            out[prefix] = vip.name
    return out


def _vip_issue(cfg: MeridioConfig, where: str, seen: set[IpNetwork]) -> Iterator[Issue]:
    declared = _cfg_vips(cfg)
    for prefix in sorted((v for v in seen if v not in declared), key=str):
        yield Issue(
            summary=f"VIP {prefix} is in the {where} but no Vip of trench {cfg.trench} declares it",
            evidence={
                "vip": str(prefix),
                where.replace(" ", "_"): sorted(str(v) for v in seen),
                "config": {name: str(p) for p, name in sorted(declared.items(), key=str)},
                "config_source": cfg.source,
            },
            hint="a Vip deleted or changed while this pod kept the old one (stale state): "
            "traffic to it is still attracted or routed; check the pod's logs and restart it",
        )


@pod_check(
    "MDB611",
    Severity.ERROR,
    "VIP in rules or on a target that no Vip declares",
    roles=("lb-fe", "proxy", "target"),
    needs=("addresses",),
)
def check_stale_vips(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """``from VIP`` rules (LB, proxy) and target VIP addresses are for declared Vips only.

    The other direction -- a Vip missing from nft sets, rules or targets -- is what
    MDB114 / MDB104 / MDB203 / MDB301 report, judged against the configured Vips.
    """
    cfg = _config(trench)
    if cfg is None:
        return
    declared = _cfg_vips(cfg)
    if pod.role == "target":
        yield from _vip_issue(
            cfg, "target VIP addresses", {a.network for a in pod.target_vip_addrs()}
        )
    elif pod.ok("rules"):
        seen = {p for p in pod.source_rule_vips if p.prefixlen == p.max_prefixlen or p in declared}
        yield from _vip_issue(cfg, "from VIP rules", seen)


# --------------------------------------------------------------------------- gateways


def _lb_gateways(cfg: MeridioConfig, pod: PodView) -> list[CfgGateway]:
    """The Gateways of the LB's attractor: those whose address is on one of its subnets."""
    out: list[CfgGateway] = []
    for gw in cfg.gateways:
        addr = ip(gw.address)
        if addr is None:
            continue
        if len(cfg.attractors) <= 1 or pod.ifaces_for(addr):
            out.append(gw)
    return out


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


@pod_check("MDB621", Severity.ERROR, "bird differs from a Gateway", roles=_LB, needs=("bird",))
def check_gateways(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """Each Gateway has a bird protocol to its address with its ASNs and BFD switch.

    Hold time and ports are not compared: the bird collector does not read them.
    """
    cfg = _config(trench)
    if cfg is None or not pod.snap.bird_protocols:
        return
    for gw in _lb_gateways(cfg, pod):
        if gw.protocol != "bgp":
            continue
        addr = ip(gw.address)
        protos = [p for p in pod.snap.bird_protocols if p.is_bgp and ip(p.neighbor_address) == addr]
        want = {
            "address": gw.address,
            "remote_asn": gw.remote_asn,
            "local_asn": gw.local_asn,
            "bfd": gw.bfd,
            "hold_time_s": gw.hold_time_s,
        }
        if not protos:
            yield Issue(
                summary=f"Gateway {gw.name} ({gw.address}) has no bird BGP protocol",
                evidence={
                    "config": want,
                    "bird": sorted(
                        f"{p.name} {p.neighbor_address}"
                        for p in pod.snap.bird_protocols
                        if p.is_bgp
                    ),
                    "config_source": cfg.source,
                },
                hint="the frontend did not configure this gateway: check the frontend log and "
                "the Attractor's gateways list",
            )
            continue
        for proto in protos:
            if not proto.is_established:
                continue  # a session that is down is MDB101; bird shows less of it (BFD)
            diff: dict[str, dict[str, object]] = {}
            if proto.neighbor_as and _as_int(proto.neighbor_as) != gw.remote_asn:
                diff["remote_asn"] = {"config": gw.remote_asn, "bird": proto.neighbor_as}
            if proto.local_as and _as_int(proto.local_as) != gw.local_asn:
                diff["local_asn"] = {"config": gw.local_asn, "bird": proto.local_as}
            if proto.bfd != gw.bfd:
                diff["bfd"] = {"config": gw.bfd, "bird": proto.bfd}
            if not diff:
                continue
            parts = [f"{k} {v['bird']} (Gateway: {v['config']})" for k, v in diff.items()]
            yield Issue(
                summary=f"bird protocol {proto.name} differs from Gateway {gw.name}: "
                + "; ".join(parts),
                evidence={
                    "differs": diff,
                    "config": want,
                    "bird": {
                        "protocol": proto.name,
                        "neighbor": proto.neighbor_address,
                        "neighbor_as": proto.neighbor_as,
                        "local_as": proto.local_as,
                        "bfd": proto.bfd,
                        "state": proto.state,
                        "info": proto.info,
                    },
                },
                hint="the frontend runs an older gateway config: compare the Gateway CR with "
                "`birdc show protocols all` in the frontend container",
            )


@pod_check(
    "MDB622",
    Severity.WARNING,
    "bird gateway protocol no Gateway declares",
    roles=_LB,
    needs=("bird",),
)
def check_gateway_extra(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """A Meridio (NBR-*) BGP protocol whose neighbour is no Gateway's address."""
    cfg = _config(trench)
    if cfg is None:
        return
    declared = {ip(g.address) for g in cfg.gateways}
    for proto in pod.snap.bird_protocols:
        if not proto.is_bgp or not proto.name.startswith("NBR-") or not proto.neighbor_address:
            continue
        if ip(proto.neighbor_address) in declared:
            continue
        yield Issue(
            summary=f"bird protocol {proto.name} peers with {proto.neighbor_address}, "
            f"which no Gateway of trench {cfg.trench} declares",
            evidence={
                "bird": {"protocol": proto.name, "neighbor": proto.neighbor_address},
                "config": {g.name: g.address for g in cfg.gateways},
                "config_source": cfg.source,
            },
            hint="a Gateway deleted or readdressed while the frontend kept the old session",
        )


# --------------------------------------------------------------------------- attractor, stream, conduit


@pod_check(
    "MDB631",
    Severity.WARNING,
    "FE external interface differs from the Attractor",
    roles=_LB,
    needs=("links", "addresses"),
)
def check_attractor(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """The Attractor's interface exists in the FE, carrying addresses in its prefixes."""
    cfg = _config(trench)
    if cfg is None:
        return
    for att in cfg.attractors:
        if not att.interface:
            continue
        if len(cfg.attractors) > 1 and not _attractor_is_pods(cfg, att.name, pod):
            continue
        link = pod.links.get(att.interface)
        actual = [n for n in pod.external_interfaces() if n != att.interface]
        if link is None and actual:  # no external interface at all: MDB105
            yield Issue(
                summary=f"Attractor {att.name}'s interface is {att.interface}, the FE's "
                f"external interface is {', '.join(actual)}",
                evidence={
                    "config": {"attractor": att.name, "interface": att.interface},
                    "external_interfaces": actual,
                    "links": sorted(pod.links),
                    "config_source": cfg.source,
                },
                hint="the external network attachment (Multus NAD or NSE VLAN) did not give the "
                "pod this interface: check the pod's network-status annotation and the NSE",
            )
            continue
        for family, prefix_text in ((4, att.ipv4_prefix), (6, att.ipv6_prefix)):
            prefix = net(prefix_text) if prefix_text else None
            if prefix is None:
                continue
            addrs = pod.global_addrs(att.interface, family)
            inside = [a for a in addrs if ipaddress.ip_address(a.address) in prefix]
            if inside or not addrs:  # no address at all: MDB105
                continue
            yield Issue(
                summary=f"{att.interface} has no IPv{family} address in Attractor {att.name}'s "
                f"prefix {prefix}",
                evidence={
                    "config": {"attractor": att.name, f"ipv{family}_prefix": str(prefix)},
                    "addresses": [str(a) for a in addrs],
                    "config_source": cfg.source,
                },
                hint="the gateway peers on the attractor prefix: an address outside it "
                "cannot reach the gateway",
            )


def _attractor_is_pods(cfg: MeridioConfig, attractor: str, pod: PodView) -> bool:
    gateways = {g.name: g for g in cfg.gateways}
    att = next(a for a in cfg.attractors if a.name == attractor)
    for name in att.gateways:
        gw = gateways.get(name)
        addr = ip(gw.address) if gw is not None else None
        if addr is not None and pod.ifaces_for(addr):
            return True
    return False


@pod_check(
    "MDB632",
    Severity.WARNING,
    "Stream max-targets differs from the shm's N",
    roles=_LB,
    needs=("nfqlb",),
)
def check_max_targets(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """``tshm-<stream>``'s maglev N equals the Stream's max-targets (M is N x 100, prime)."""
    cfg = _config(trench)
    if cfg is None:
        return
    shms = {s.name: s for s in pod.snap.nfqlb_shms}
    for stream in cfg.streams:
        shm = shms.get(f"tshm-{stream.name}")
        if shm is None or not shm.n or shm.n == stream.max_targets:
            continue
        yield Issue(
            summary=f"{shm.name} has N={shm.n}, Stream {stream.name} has max-targets "
            f"{stream.max_targets}",
            evidence={
                "config": {"stream": stream.name, "max_targets": stream.max_targets},
                "nfqlb": {"shm": shm.name, "n": shm.n, "m": shm.m},
                "config_source": cfg.source,
            },
            hint="targets beyond N are never activated (stream 'unavailable' in the TAPA); "
            "max-targets is immutable: the stream was recreated without restarting the LB?",
        )


@pod_check(
    "MDB633",
    Severity.WARNING,
    "no interface for a Conduit",
    roles=("lb-fe", "proxy"),
    needs=("links",),
)
def check_conduit(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """LBs and proxies have NSM interfaces named after each Conduit (first 10 characters)."""
    cfg = _config(trench)
    if cfg is None:
        return
    names = sorted(pod.links)
    wanted = []
    for conduit in cfg.conduits:
        if pod.role == "lb-fe":
            prefixes = [_conduit_prefix(conduit.name)]
        else:  # proxy: LB side "conduit-a--xxxx" and target side "proxy.cond-xxxx"
            prefixes = [_conduit_prefix(conduit.name), _conduit_prefix(f"proxy.{conduit.name}")]
        wanted.append((conduit.name, prefixes))
    if pod.role == "lb-fe" and len(cfg.conduits) > 1:
        return  # which conduits an LB serves depends on its attractor: not judged
    for conduit_name, prefixes in wanted:
        if any(n.startswith(p) for n in names for p in prefixes):
            continue
        yield Issue(
            summary=f"no interface for Conduit {conduit_name} (expected a name starting "
            f"{' or '.join(prefixes)})",
            evidence={
                "config": {"conduit": conduit_name, "prefixes": prefixes},
                "links": names,
                "config_source": cfg.source,
            },
            hint="NSM did not connect this pod to the conduit: check the NSM forwarder and "
            "nsmgr on the node, and the pod's nsc/proxy logs",
        )


CHECKS = (
    check_flow_present,
    check_flow_fields,
    check_flow_extra,
    check_stale_vips,
    check_gateways,
    check_gateway_extra,
    check_attractor,
    check_max_targets,
    check_conduit,
)
