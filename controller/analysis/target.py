"""MDB3xx: the target pod as the TAPA and the NSM forwarder leave it.

Why: a target answers from the VIP, so it needs the VIP on its NSM interface
and, per VIP, a source rule whose table sends replies to the proxy bridge
(``default via <bridge IP> dev nsm-0 onlink``). After an NSC reconnect these
policy routes have been seen empty or without ``via`` (#376): the target
then receives traffic and silently drops every reply. The bridge IP is
checked against the proxy's real bridge when the proxy was snapshotted too.
"""

from __future__ import annotations

from collections.abc import Iterator

from meridio_debug.controller.analysis._base import pod_check
from meridio_debug.controller.analysis._view import PodView, TrenchView, ip
from meridio_debug.controller.analysis.findings import Check, Issue, Severity
from meridio_debug.controller.model import IpAddress, IpNetwork, Nexthop, Role, Route, Rule

_TARGET: tuple[Role, ...] = ("target",)


def _fam(family: int) -> str:
    return f"IPv{family}"


@pod_check(
    "MDB305", Severity.ERROR, "NSM interface missing or down", roles=_TARGET, needs=("links",)
)
def check_nsm_interface(pod: PodView, _trench: TrenchView) -> Iterator[Issue]:
    """The target needs its NSM interface (nsm-N) to the proxy, UP."""
    hint = (
        "the TAPA requests the NSM connection when a stream is opened; check the tapa "
        "sidecar logs (stream status), the NSM forwarder and the proxy on this node"
    )
    names = pod.nsm_interfaces
    if not names:
        yield Issue(
            summary="no NSM interface (nsm-N): the target is not connected to the conduit",
            evidence={"links": sorted(pod.links)},
            hint=hint,
        )
        return
    for name in names:
        link = pod.links.get(name)
        if link is None:
            yield Issue(
                summary=f"NSM interface {name} (used by policy routes) does not exist",
                evidence={"interface": name},
                hint=hint,
            )
        elif not link.is_up:
            yield Issue(
                summary=f"NSM interface {name} is {link.state}",
                evidence={"interface": name, "state": link.state, "flags": list(link.flags)},
                hint=hint,
            )


def _present_nsm(pod: PodView) -> list[str]:
    return [n for n in pod.nsm_interfaces if n in pod.links]


@pod_check(
    "MDB301",
    Severity.ERROR,
    "trench VIP missing on the NSM interface",
    roles=_TARGET,
    needs=("links", "addresses"),
)
def check_target_vips(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """Every trench VIP must be an address on the NSM interface (the TAPA adds them)."""
    nsm = _present_nsm(pod)
    if not nsm:
        return  # MDB305
    on_nsm = {a.network for name in nsm for a in pod.global_addrs(name)}
    for vip in sorted(trench.vips, key=lambda v: (v.version, str(v))):
        if vip in on_nsm:
            continue
        yield Issue(
            summary=f"VIP {vip} is not on {', '.join(nsm)}: traffic to it is dropped here",
            evidence={
                "vip": str(vip),
                "interfaces": nsm,
                "addresses": [str(a) for n in nsm for a in pod.addrs_by_if.get(n, ())],
            },
            hint="the TAPA adds the trench's VIPs to the connection (SrcIpAddrs) and the NSM "
            "forwarder configures them; check the tapa logs ('ips not set') and NSM (#376)",
        )


@pod_check(
    "MDB302", Severity.ERROR, "VIP without its source-policy rule", roles=_TARGET, needs=("rules",)
)
def check_target_rules(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """Every trench VIP needs ``from VIP lookup T`` (T: whatever table NSM picked)."""
    for vip, _rules, _missing in pod.vip_rule_gaps(trench.vips, shared_tables=False):
        yield Issue(
            summary=f"VIP {vip} has no {_fam(vip.version)} 'from {vip}' rule: replies leave "
            "through the main table instead of the proxy",
            evidence={
                "vip": str(vip),
                "family": vip.version,
                "source_rules": [str(r) for r in pod.source_rules],
            },
            hint="the TAPA adds a PolicyRoute per VIP and the NSM forwarder creates the rule; "
            "check the tapa logs and the NSM forwarder (#376)",
        )


def _policy_hops(
    pod: PodView, trench: TrenchView, vip: IpNetwork
) -> tuple[list[Rule], list[Route], list[tuple[Nexthop, IpAddress]], str]:
    """A VIP's rules, their tables' defaults, the good next hops, and what is wrong ("" ok)."""
    rules = [r for r in pod.source_rule_vips.get(vip, ()) if r.family == vip.version]
    nsm = set(pod.nsm_interfaces)
    routes: list[Route] = []
    good: list[tuple[Nexthop, IpAddress]] = []
    problem = ""
    bridge_ips = {a for a in trench.bridge_ips if a.version == vip.version}
    for rule in rules:
        defaults = pod.default_routes(rule.table, vip.version)
        routes.extend(defaults)
        if not defaults:
            problem = f"table {rule.table} has no {_fam(vip.version)} default route"
            continue
        for route in defaults:
            for hop in route.paths():
                addr = ip(hop.gateway) if hop.gateway else None
                if addr is None:
                    problem = f"'{route}' has no 'via <bridge IP>'"
                elif hop.dev not in nsm:
                    problem = f"'{route}' does not leave through the NSM interface"
                elif not (
                    nets := [
                        c.network
                        for c in pod.connected
                        if c.ifname == hop.dev and addr in c.network
                    ]
                ):
                    problem = f"'{route}': {addr} is not in {hop.dev}'s subnet"
                # Only a proxy seen on this subnet can say what the bridge IP is.
                elif (known := {b for b in bridge_ips if any(b in n for n in nets)}) and (
                    addr not in known
                ):
                    problem = f"'{route}': {addr} is not the proxy bridge's address"
                else:
                    good.append((hop, addr))
    if good:
        problem = ""
    return rules, routes, good, problem


@pod_check(
    "MDB303",
    Severity.ERROR,
    "VIP policy table lacks default via the bridge IP",
    roles=_TARGET,
    needs=("rules", "routes", "addresses"),
)
def check_target_policy_routes(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """Each VIP rule's table: ``default via <proxy bridge IP> dev <nsm>`` (onlink)."""
    if not pod.nsm_interfaces:
        return  # MDB305
    for vip in sorted(trench.vips, key=lambda v: (v.version, str(v))):
        rules, routes, _good, problem = _policy_hops(pod, trench, vip)
        if not rules or not problem:
            continue  # no rule: MDB302
        expected = sorted(
            str(a)
            for a in trench.bridge_ips
            if a.version == vip.version and any(a in c.network for c in pod.connected)
        )
        yield Issue(
            summary=f"VIP {vip}: {problem}: replies from the VIP are dropped",
            evidence={
                "vip": str(vip),
                "rules": [str(r) for r in rules],
                "tables": sorted({r.table for r in rules}),
                "routes": [str(r) for r in routes]
                or [str(r) for t in sorted({r.table for r in rules}) for r in pod.table_routes(t)],
                "expected_gateway": expected,
            },
            hint="the TAPA's PolicyRoute takes the bridge IP from the connection's "
            "ExtraPrefixes; an NSC reconnect has left these tables empty or without 'via' "
            "(#376) -- close and re-open the stream, check the NSM forwarder",
        )


@pod_check(
    "MDB304",
    Severity.ERROR,
    "bridge gateway unreachable from the target",
    roles=_TARGET,
    needs=("rules", "routes", "addresses", "neighbours"),
)
def check_target_gateway(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """The bridge IP's neighbour must not be FAILED/INCOMPLETE (nor carry a MAC not bridge0's)."""
    seen: set[IpAddress] = set()
    for vip in sorted(trench.vips, key=lambda v: (v.version, str(v))):
        _rules, _routes, good, _problem = _policy_hops(pod, trench, vip)
        for hop, addr in good:
            if addr in seen:
                continue
            seen.add(addr)
            neighbour = pod.neighbour(addr, hop.dev)
            if neighbour is None:
                continue
            evidence: dict[str, object] = {
                "gateway": str(addr),
                "interface": hop.dev,
                "neighbour": str(neighbour),
            }
            owner = trench.bridge_ips.get(addr)
            if neighbour.is_failed:
                yield Issue(
                    summary=f"bridge gateway {addr} on {hop.dev} is {neighbour.state}: replies "
                    "from the VIPs cannot leave",
                    evidence=evidence,
                    hint="check the proxy's bridge0 (MDB201/MDB202) and the NSM connection of "
                    "this target's interface",
                    pods=(pod.name, owner.pod) if owner else (),
                )
            elif owner and owner.mac and neighbour.lladdr and neighbour.lladdr != owner.mac:
                evidence.update({"proxy": owner.pod, "bridge_mac": owner.mac})
                yield Issue(
                    summary=f"bridge gateway {addr} resolves to {neighbour.lladdr}, not "
                    f"{owner.pod}'s {owner.ifname} MAC {owner.mac}",
                    evidence=evidence,
                    hint="a stale neighbour entry (the proxy's bridge was re-created); "
                    "'ip neigh flush dev' in the target or wait for it to expire",
                    pods=(pod.name, owner.pod),
                )


CHECKS: tuple[Check, ...] = (
    check_target_vips,
    check_target_rules,
    check_target_policy_routes,
    check_target_gateway,
    check_nsm_interface,
)
