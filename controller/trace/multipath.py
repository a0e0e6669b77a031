"""Which ECMP choices a trace may state as certain: the rule, from the kernel's own source.

Why this module: ``ip route get`` with the flow's addresses, protocol and ports
(RTM_GETROUTE, agent/probe.py) makes the kernel hash a *flowi* built from the
query. A forwarded packet is hashed from the *skb*. The two agree only when
the forwarding kernel hashes nothing the query does not carry. Where the skb
brings its own hash (a socket's random ``sk_txhash``, or a hash keyed with a
per-boot random) the query's answer is one boot's coincidence, so a trace
that printed it as "this flow hashes to X" was contradicted by the packets on
the next boot (issue 10: three of six lab flows). Read from Linux 6.x
(identical from 5.x to 6.18 for what matters here):

net/ipv4/route.c ``fib_multipath_hash(net, fl4, skb, flkeys)``
  * policy 0 (L3, the kernel default): ``ip_multipath_l3_keys(skb)`` -- source
    and destination address only (the inner header of an ICMP error) --
    hashed by ``fib_multipath_hash_from_keys`` with the netns multipath seed
    (``net.ipv4.fib_multipath_hash_seed``, random at boot when 0). RTM_GETROUTE
    hashes the same two addresses with the same seed: **exact**, any protocol.
  * policy 1 (L4, what Meridio sets on LB and proxy): "short-circuit if we
    already have L4 hash present": ``if (skb->l4_hash) return
    skb_get_hash_raw(skb) >> 1``. A TCP segment carries its socket's hash
    (``tcp_transmit_skb`` -> ``skb_set_hash_from_sk``: ``sk_txhash``, a random
    number per socket, ``sk_set_txhash``), and veth keeps ``skb->hash`` across
    namespaces (``skb_scrub_packet`` does not clear it): TCP -> **candidates**.
    An IPv4 UDP datagram or ICMP echo reply is built by ``__ip_make_skb``,
    which sets no hash, so the forwarder dissects the 5-tuple (ICMP: ports 0)
    and hashes it with the multipath seed, as RTM_GETROUTE does: **exact** --
    as long as nothing on the way computed an skb hash first (RPS,
    ``get_rps_cpu``; multi-queue TX, ``skb_tx_hash``: both call
    ``skb_get_hash``; not the case on Meridio's single-queue veths).
  * policies 2 and 3 (inner L3, custom fields): not studied -> candidates.

net/ipv6/route.c ``rt6_multipath_hash(net, fl6, skb, flkeys)``
  * policy 0: ``ip6_multipath_l3_keys`` hashes addresses, next header *and the
    flow label*. The sender chose the flow label in ``ip6_make_flowlabel``
    (include/net/ipv6.h; auto flow labels are on by default) from
    ``skb_get_hash_flowi6``: the socket's ``sk_txhash``, or the flow dissector
    hash keyed with ``hashrnd`` (net/core/flow_dissector.c,
    ``net_get_random_once``: per boot). RTM_GETROUTE carries no flow label:
    **candidates**, every protocol.
  * policy 1: the same ``skb->l4_hash`` short-circuit as IPv4, and an IPv6
    packet built by a socket got its hash in ``ip6_make_flowlabel`` ->
    ``skb_get_hash_flowi6`` -> ``__skb_set_sw_hash(..., l4)``: the per-boot
    ``hashrnd`` (UDP, ICMPv6 echo replies) or ``sk_txhash`` (TCP):
    **candidates**, every protocol.

Output lookups (a packet sent from the pod that asks: the lab's gateway, the
client's host) hash the flowi (``skb == NULL``): addresses, ports and the
socket's own flow label (0 unless the application sets one) -- the same
flowi RTM_GETROUTE builds: **exact**.

So, for a hop that forwards the flow's packets over an ECMP route: exact for
IPv4 UDP/ICMP (policy 0 or 1) and IPv4 TCP with policy 0; a candidate set for
IPv4 TCP with policy 1, for IPv6, for other policies and when the policy is
unknown (sysctls not read) unless IPv4 UDP/ICMP (exact under both 0 and 1).
nft ``jhash ... seed S`` marks are computed offline (hashing.py), exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from meridio_debug.controller.trace.flow import Flow

SEED_WHY = "the kernel hashes this reply with a per-boot seed"
_TCP = "the kernel hashes this reply with its TCP socket's random hash"


@dataclass(frozen=True, slots=True)
class EcmpRule:
    """Whether the kernel's answer for the flow at one forwarding hop is the packets' choice."""

    exact: bool
    why: str  # one clause for the candidates text ("" when exact)


def policy_of(sysctls_value: str | None) -> int | None:
    """``fib_multipath_hash_policy`` as an int; None when not read or not a number."""
    if sysctls_value is None:
        return None
    try:
        return int(sysctls_value.strip())
    except ValueError:
        return None


def forwarded(flow: Flow, policy: int | None, *, reply: bool) -> EcmpRule:
    """The rule for a packet of ``flow`` that this hop forwards (its sender is another host).

    ``reply``: the packet is the target's reply (VIP -> client), built by the
    target's Linux stack; otherwise the client's request (its stack, its NIC's
    receive hash: unknown).
    """
    if policy not in (0, 1, None):
        return EcmpRule(False, f"fib_multipath_hash_policy {policy} is not modelled here")
    if flow.family == 4:
        if policy == 0:
            return EcmpRule(True, "")
        if flow.proto == "tcp":
            return EcmpRule(False, _TCP if reply else "the kernel hashes its sender's hash")
        if reply:
            return EcmpRule(True, "")
        return EcmpRule(False, "the kernel may hash a hash its sender's NIC set")
    if flow.proto == "tcp":
        return EcmpRule(False, _TCP if reply else "the kernel hashes the client's flow label")
    if reply:
        return EcmpRule(False, SEED_WHY)
    return EcmpRule(False, "the kernel hashes the client's flow label")


def originated() -> EcmpRule:
    """A packet the asking pod sends itself: the output lookup hashes the same flowi."""
    return EcmpRule(True, "")
