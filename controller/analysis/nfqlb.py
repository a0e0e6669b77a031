"""MDB119-121: failure modes only real nfqlb shows (findings catalog, "nfqlb").

Why a module of its own: with nfqlb the LB's data plane is split between the kernel and a
userspace program. nftables hands every VIP packet to nfqlb's queues; nfqlb matches it
against its flows, hashes it into the flow's shm and answers with a fwmark, or with a drop
verdict when nothing matches (nfqlb ``src/nfqlb/cmdFlowLb.c``: no flow -> ``nolb_fw``, no
Active target -> ``notargets_fw``, both -1 in Meridio). None of those drops shows in a route or
a rule, so the other LB checks see a healthy pod. These checks read the three places a VIP
packet can die between nft and the fwmark rules:

- MDB119: the nft table queues VIP traffic but no nfqlb runs in the pod (nothing listens on
  the queues: the kernel drops every queued packet);
- MDB120: a VIP that nft queues matches no nfqlb flow (no ``flow-set`` covers it);
- MDB121: an nfqlb flow whose shm has no Active target.

They need no trench configuration (MDB601/602 compare flows with the Flow CRs when those are
available).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from meridio_debug.controller.analysis._base import pod_check
from meridio_debug.controller.analysis._view import PodView, TrenchView, ip, net
from meridio_debug.controller.analysis.findings import Check, Issue, Severity
from meridio_debug.controller.model import IpAddress, NfqlbFlow, NftQueueRule, Role

_LB: tuple[Role, ...] = ("lb-fe",)


def _queue_text(rule: NftQueueRule) -> str:
    where = f"{rule.table}/{rule.chain}"
    what = f"@{rule.vip_set}" if rule.vip_set else "all"
    queue = rule.queue or "NFQUEUE"
    return f"{where}: {what} -> queue {queue}"


def _nfqlb_state(pod: PodView) -> tuple[str, str]:
    for status in pod.snap.sections:
        if status.name == "nfqlb":
            return status.state, status.message
    return "", ""


@pod_check(
    "MDB119",
    Severity.ERROR,
    "nft queues VIP traffic to nfqlb but nfqlb is not running",
    roles=_LB,
    needs=("nftables",),
)
def check_queue_without_nfqlb(pod: PodView, _trench: TrenchView) -> Iterator[Issue]:
    """Queue rules in the LB's nftables while the nfqlb section is ABSENT (not running)."""
    rules = pod.snap.nft.queue_rules
    state, message = _nfqlb_state(pod)
    if not rules or state != "ABSENT":
        return
    yield Issue(
        summary="nftables queues the VIP traffic to nfqlb, but nfqlb is not running: the kernel "
        "drops every queued packet",
        evidence={
            "queue_rules": [_queue_text(r) for r in rules],
            "nfqlb": message,
        },
        hint="nfqlb flowlb runs in the stateless-lb container: check its restarts and logs "
        "(kubectl logs -c stateless-lb --previous); the stateless-lb queues to 0-3 without "
        "bypass, so nothing reaches the targets until nfqlb is back",
    )


def _vip_addresses(pod: PodView) -> list[tuple[str, IpAddress]]:
    """(set, VIP) of every single-address element of the sets a queue rule matches."""
    queued = {(r.table, r.vip_set) for r in pod.snap.nft.queue_rules}
    out: list[tuple[str, IpAddress]] = []
    for vip_set in pod.snap.nft.vip_sets:
        if (vip_set.table, vip_set.name) not in queued:
            continue
        for element in vip_set.elements:
            prefix = net(element)
            if prefix is not None and prefix.num_addresses == 1:
                out.append((f"{vip_set.table}/{vip_set.name}", prefix.network_address))
            elif prefix is None and (addr := ip(element)) is not None:
                out.append((f"{vip_set.table}/{vip_set.name}", addr))
    return out


def _covers(flow: NfqlbFlow, vip: IpAddress) -> bool:
    if not flow.dests:
        return True
    for text in flow.dests:
        prefix = net(text)
        if prefix is not None and prefix.version == vip.version and vip in prefix:
            return True
    return False


@pod_check(
    "MDB120",
    Severity.ERROR,
    "VIP queued to nfqlb matches no nfqlb flow",
    roles=_LB,
    needs=("nftables", "nfqlb"),
)
def check_vip_without_flow(pod: PodView, _trench: TrenchView) -> Iterator[Issue]:
    """Every VIP nft queues must be a destination of some nfqlb flow, or nfqlb drops it."""
    flows: Sequence[NfqlbFlow] = pod.snap.nfqlb_flows
    for where, vip in _vip_addresses(pod):
        if any(_covers(f, vip) for f in flows):
            continue
        yield Issue(
            summary=f"VIP {vip} is queued to nfqlb ({where}) but no nfqlb flow matches it: "
            "nfqlb drops its packets",
            evidence={
                "vip": str(vip),
                "set": where,
                "flows": [f"{f.name}: {', '.join(f.dests) or 'any'}" for f in flows],
            },
            hint="the stateless-lb runs 'nfqlb flow-set' for each Flow of the trench: check "
            "'nfqlb flow-list' in the stateless-lb container, the Flow CRs (VIPs) and the "
            "stateless-lb logs",
        )


@pod_check(
    "MDB121",
    Severity.ERROR,
    "nfqlb flow whose stream has no Active target",
    roles=_LB,
    needs=("nfqlb",),
)
def check_flow_without_targets(pod: PodView, _trench: TrenchView) -> Iterator[Issue]:
    """Each flow's shm (user_ref) has at least one Active target, or nfqlb drops its packets."""
    shms = {s.name: s for s in pod.snap.nfqlb_shms}
    for flow in pod.snap.nfqlb_flows:
        shm = shms.get(flow.user_ref)
        if shm is None or shm.active:
            continue
        yield Issue(
            summary=f"nfqlb flow {flow.name} load-balances over {shm.name}, which has no Active "
            "target: nfqlb drops the flow's packets",
            evidence={"flow": flow.name, "shm": shm.name, "m": shm.m, "n": shm.n},
            hint="no target of the stream is registered (TAPA stream not open, NSP down) while "
            "the VIPs still attract traffic: check 'target-client watch' in the targets, NSP, "
            "and 'nfqlb show --shm=" + shm.name + "'",
        )


CHECKS: tuple[Check, ...] = (
    check_queue_without_nfqlb,
    check_vip_without_flow,
    check_flow_without_targets,
)
