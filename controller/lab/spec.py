"""The lab's layout as plain data: every pod, link, address, mark and name.

Why a pure module: the builder, ``status``, ``traffic``, the analysis of a
running lab and the tests all need one answer to "what should be there".
Computing it from three numbers without any I/O makes that answer testable
without root, lets ``lab.json`` carry it to other processes (``load_spec``),
and keeps the contract in /work/shared/lab.md in one place: with the default
arguments ``build_spec()`` *is* that contract.

Address scheme (node ``n``, 0-based, letter ``a`` + n; LB ``j``; target ``k``):

- node subnet ``172.16.(n+1).0/24`` and ``fd00:0:0:(n+1)::/64``; bridge0 ``.1``;
- LB ``j``'s conduit end ``.(2+2j)``, the proxy's port for it ``.(3+2j)``;
- target ``k``'s ``nsm-0`` ``.(2+2*lbs+2k)``, its proxy port one more;
- FE ``j``'s ``ext-vlan0`` ``169.254.100.(2+j)`` / ``100:100::(2+j)``.

IPv6 host parts reuse the IPv4 decimal digits as text (``.30`` -> ``::30``):
readable side by side and still unique, as distinct digit strings are
distinct hex numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from meridio_debug.controller.errors import LabError

Role = Literal["gateway", "lb-fe", "proxy", "target"]
# How the LBs pick a target: real nfqlb (Meridio, the default), or the older nft jhash map,
# kept for kernels without NFQUEUE (nfnetlink_queue) or hosts without nfqlb.
Marking = Literal["nfqlb", "nft-jhash"]
MARKINGS: tuple[Marking, ...] = ("nfqlb", "nft-jhash")
LinkKind = Literal["external", "conduit", "target"]

ROLES: tuple[Role, ...] = ("gateway", "lb-fe", "proxy", "target")
DEFAULT_PREFIX = "mdl-"
MAX_LETTERS = 26
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# nft's jhash picks a random seed when none is given, which would make the
# source -> target mapping differ between LBs and runs (lab.md, gotchas).
# This one spreads the 64 v4 and 64 v6 client sources over the 4 default
# targets within 15-17 / 13-18 each, and reaches all 40 targets of the
# 4x4x10 benchmark lab (checked with jhash.predict_target).
DEFAULT_HASH_SEED = 0x6D647289
SPEC_VERSION = 2
# nfqlb's Maglev sizes, as Meridio's stateless-lb sets them (M = 100 x max-targets).
NFQLB_M_PER_TARGET = 100
DEFAULT_MAX_TARGETS = 100  # a Stream's max-targets when the CR does not say
NFQLB_QUEUES = "0:3"
NFQLB_QLENGTH = 1024

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]{0,11}$")


@dataclass(frozen=True)
class Pod:
    """One Meridio pod (or the gateway), one network namespace."""

    name: str
    role: Role
    netns: str
    node: str | None = None  # node letter for proxies and targets


@dataclass(frozen=True)
class LinkEnd:
    """One end of a veth pair: where it lives, its name and addresses (CIDR)."""

    pod: str
    netns: str
    ifname: str
    addresses: tuple[str, ...] = ()
    master: str | None = None  # bridge the end is enslaved to
    mac: str | None = None  # None: the kernel picks one


@dataclass(frozen=True)
class Link:
    """A veth pair. ``a`` is the gateway/LB/target side, ``b`` the gw/proxy side."""

    kind: LinkKind
    a: LinkEnd
    b: LinkEnd


@dataclass(frozen=True)
class Bridge:
    """A Linux bridge: ``ext-br`` in the gateway, ``bridge0`` in each proxy."""

    pod: str
    netns: str
    name: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class Node:
    """A "Kubernetes node": one proxy and its targets share the node subnet."""

    letter: str
    index: int
    proxy: str
    subnet4: str
    subnet6: str
    bridge_ipv4: str
    bridge_ipv6: str


@dataclass(frozen=True)
class Conduit:
    """One LB <-> proxy link as the LB sees it."""

    node: str
    ifname: str
    ipv4: str
    ipv6: str
    proxy_ifname: str
    proxy_ipv4: str
    proxy_ipv6: str


@dataclass(frozen=True)
class FrontEnd:
    """An LB/FE pod: external interface, BGP identity, one conduit per node."""

    pod: str
    index: int
    ext_ifname: str
    ipv4: str
    ipv6: str
    router_id: str
    conduits: tuple[Conduit, ...]


@dataclass(frozen=True)
class Target:
    """A target pod with its TAPA identity: identifier, fwmark and LB table."""

    pod: str
    node: str
    identifier: int
    fwmark: int
    table: int
    ifname: str
    ipv4: str
    ipv6: str
    proxy_ifname: str
    proxy_ipv4: str
    proxy_ipv6: str


@dataclass(frozen=True)
class Gateway:
    """The external gateway and traffic generator (not a Meridio pod)."""

    pod: str
    bridge: str
    ipv4: str
    ipv6: str
    prefix4: str  # the external segment, for bird's ``neighbor range``
    prefix6: str
    client_sources4: tuple[str, ...]
    client_sources6: tuple[str, ...]


@dataclass(frozen=True)
class Bgp:
    """BGP/BFD parameters (Meridio defaults: AS 8103 / 4248829953, port 10179)."""

    local_asn: int = 8103
    remote_asn: int = 4248829953
    port: int = 10179
    hold_time: int = 24
    bfd_min_rx_ms: int = 300
    bfd_min_tx_ms: int = 300
    bfd_multiplier: int = 5
    protocol4: str = "NBR-gateway-v4-a"
    protocol6: str = "NBR-gateway-v6-a"
    bfd_protocol: str = "NBR-BFD"


@dataclass(frozen=True)
class LabSpec:
    """The whole lab. Build it with :func:`build_spec`; never edit one by hand."""

    prefix: str
    lbs: int
    proxies: int
    targets_per_proxy: int
    trench: str
    conduit: str
    stream: str
    flow: str
    attractor: str
    gateways: tuple[str, ...]
    vip4: str
    vip6: str
    protocols: tuple[str, ...]
    ports: tuple[int, ...]
    pods: tuple[Pod, ...]
    links: tuple[Link, ...]
    bridges: tuple[Bridge, ...]
    nodes: tuple[Node, ...]
    frontends: tuple[FrontEnd, ...]
    targets: tuple[Target, ...]
    gateway: Gateway
    bgp: Bgp
    vip_table: int = 4096
    drop_table: int = 4097
    drop_metric: int = 4294967295
    proxy_table: int = 1
    target_table4: int = 1
    target_table6: int = 2
    fwmark_offset: int = 5000
    hash_seed: int = DEFAULT_HASH_SEED
    marking: Marking = "nfqlb"
    flow_priority: int = 1

    @property
    def shm(self) -> str:
        """The stream's nfqlb shared memory (``/dev/shm/tshm-<stream>`` in each LB)."""
        return f"tshm-{self.stream}"

    @property
    def max_targets(self) -> int:
        """The stream's max-targets, nfqlb's N: Meridio's default 100 (more in a bigger lab)."""
        return max(DEFAULT_MAX_TARGETS, len(self.targets))

    @property
    def vips(self) -> tuple[str, str]:
        """The VIPs as prefixes (``20.0.0.1/32``, ``2000::1/128``)."""
        return (f"{self.vip4}/32", f"{self.vip6}/128")

    def pod(self, name: str) -> Pod:
        """The pod called ``name``; KeyError when there is none."""
        for p in self.pods:
            if p.name == name:
                return p
        raise KeyError(name)

    def netns(self, name: str) -> str:
        """The namespace of pod ``name``."""
        return self.pod(name).netns

    def pods_of(self, role: Role) -> tuple[Pod, ...]:
        """The pods with ``role``, in spec order."""
        return tuple(p for p in self.pods if p.role == role)

    def target(self, name: str) -> Target:
        """The target pod called ``name``; KeyError when there is none."""
        for t in self.targets:
            if t.pod == name:
                return t
        raise KeyError(name)

    def frontend(self, name: str) -> FrontEnd:
        """The LB/FE pod called ``name``; KeyError when there is none."""
        for f in self.frontends:
            if f.pod == name:
                return f
        raise KeyError(name)

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace of the lab, in pod order."""
        return tuple(p.netns for p in self.pods)


def _hex4(seed: str, taken: set[str]) -> str:
    """Four hex characters from a hash of ``seed``, unique within ``taken``.

    NSM names interfaces ``<10 chars of the service>-<4 chars of the
    connection id>``; a hash keeps names stable across runs, the salt loop
    keeps them unique when two seeds collide.
    """
    salt = 0
    while True:
        digest = hashlib.sha256(f"{seed}#{salt}".encode()).hexdigest()[:4]
        if digest not in taken:
            taken.add(digest)
            return digest
        salt += 1


def check_prefix(prefix: str) -> str:
    """``prefix`` when it can name namespaces and a state directory; LabError otherwise."""
    if not _PREFIX_RE.match(prefix):
        raise LabError(
            f"lab prefix {prefix!r} is invalid: use 1-12 characters a-z, 0-9 or '-', "
            "starting with a letter (e.g. mdl-)"
        )
    return prefix


def build_spec(
    prefix: str = DEFAULT_PREFIX,
    lbs: int = 2,
    proxies: int = 2,
    targets_per_proxy: int = 2,
    hash_seed: int = DEFAULT_HASH_SEED,
    *,
    marking: Marking = "nfqlb",
) -> LabSpec:
    """The lab for these sizes; the defaults are exactly lab.md.

    Raises LabError (one line) for sizes the address scheme cannot hold.
    """
    check_prefix(prefix)
    if not 1 <= lbs <= MAX_LETTERS or not 1 <= proxies <= MAX_LETTERS:
        raise LabError(f"lab sizes: --lbs and --proxies must be 1..{MAX_LETTERS}")
    if targets_per_proxy < 1 or 2 + 2 * lbs + 2 * targets_per_proxy > 254:
        raise LabError(
            "lab sizes: need --targets-per-proxy >= 1 and lbs + targets-per-proxy <= 126 "
            "(they share one /24 per node)"
        )
    if not 0 <= hash_seed <= 0xFFFFFFFF:
        raise LabError("lab hash seed must fit in 32 bits")
    if marking not in MARKINGS:
        raise LabError(f"lab marking must be one of {', '.join(MARKINGS)}, not {marking!r}")

    def ns(name: str) -> str:
        return prefix + name

    conduit = "conduit-a"
    vip4, vip6 = "20.0.0.1", "2000::1"
    ext4_net, ext6_net = "169.254.100", "100:100:"
    gw = Gateway(
        pod="gw",
        bridge="ext-br",
        ipv4=f"{ext4_net}.150",
        ipv6=f"{ext6_net}:150",
        prefix4=f"{ext4_net}.0/24",
        prefix6="100:100::/64",
        client_sources4=tuple(f"200.100.0.{i}" for i in range(1, 65)),
        client_sources6=tuple(f"200:100::{i:x}" for i in range(1, 65)),
    )

    nodes = tuple(
        Node(
            letter=LETTERS[n],
            index=n,
            proxy=f"proxy-{LETTERS[n]}",
            subnet4=f"172.16.{n + 1}.0/24",
            subnet6=f"fd00:0:0:{n + 1}::/64",
            bridge_ipv4=f"172.16.{n + 1}.1",
            bridge_ipv6=f"fd00:0:0:{n + 1}::1",
        )
        for n in range(proxies)
    )

    def v4(node: Node, host: int) -> str:
        return f"172.16.{node.index + 1}.{host}"

    def v6(node: Node, host: int) -> str:
        return f"fd00:0:0:{node.index + 1}::{host}"

    taken: set[str] = set()
    frontends: list[FrontEnd] = []
    for j in range(lbs):
        name = f"lb-fe-{LETTERS[j]}"
        conduits = tuple(
            Conduit(
                node=node.letter,
                ifname=f"{conduit}--{_hex4(f'{name}|{node.proxy}|lb', taken)}",
                ipv4=v4(node, 2 + 2 * j),
                ipv6=v6(node, 2 + 2 * j),
                proxy_ifname=f"{conduit}--{_hex4(f'{name}|{node.proxy}|proxy', taken)}",
                proxy_ipv4=v4(node, 3 + 2 * j),
                proxy_ipv6=v6(node, 3 + 2 * j),
            )
            for node in nodes
        )
        frontends.append(
            FrontEnd(
                pod=name,
                index=j,
                ext_ifname="ext-vlan0",
                ipv4=f"{ext4_net}.{2 + j}",
                ipv6=f"{ext6_net}:{2 + j}",
                router_id=f"{ext4_net}.{2 + j}",
                conduits=conduits,
            )
        )

    targets: list[Target] = []
    for node in nodes:
        for k in range(targets_per_proxy):
            identifier = len(targets) + 1
            host = 2 + 2 * lbs + 2 * k
            name = f"target-{node.letter}{k + 1}"
            targets.append(
                Target(
                    pod=name,
                    node=node.letter,
                    identifier=identifier,
                    fwmark=5000 + identifier,
                    table=5000 + identifier,
                    ifname="nsm-0",
                    ipv4=v4(node, host),
                    ipv6=v6(node, host),
                    proxy_ifname=f"proxy.cond-{_hex4(f'{name}|proxy', taken)}",
                    proxy_ipv4=v4(node, host + 1),
                    proxy_ipv6=v6(node, host + 1),
                )
            )

    pods: list[Pod] = [Pod("gw", "gateway", ns("gw"))]
    pods += [Pod(f.pod, "lb-fe", ns(f.pod)) for f in frontends]
    pods += [Pod(n.proxy, "proxy", ns(n.proxy), n.letter) for n in nodes]
    pods += [Pod(t.pod, "target", ns(t.pod), t.node) for t in targets]

    links: list[Link] = []
    for f in frontends:
        links.append(
            Link(
                "external",
                LinkEnd(f.pod, ns(f.pod), f.ext_ifname, (f"{f.ipv4}/24", f"{f.ipv6}/64")),
                LinkEnd("gw", ns("gw"), f"ext-{f.pod}", (), master=gw.bridge),
            )
        )
    for f in frontends:
        for c, node in zip(f.conduits, nodes, strict=True):
            links.append(
                Link(
                    "conduit",
                    LinkEnd(f.pod, ns(f.pod), c.ifname, (f"{c.ipv4}/24", f"{c.ipv6}/64")),
                    LinkEnd(
                        node.proxy,
                        ns(node.proxy),
                        c.proxy_ifname,
                        (f"{c.proxy_ipv4}/24", f"{c.proxy_ipv6}/64"),
                        master="bridge0",
                    ),
                )
            )
    node_by_letter = {n.letter: n for n in nodes}
    for t in targets:
        proxy = node_by_letter[t.node].proxy
        links.append(
            Link(
                "target",
                LinkEnd(
                    t.pod,
                    ns(t.pod),
                    t.ifname,
                    (f"{t.ipv4}/24", f"{t.ipv6}/64", f"{vip4}/32", f"{vip6}/128"),
                ),
                LinkEnd(
                    proxy,
                    ns(proxy),
                    t.proxy_ifname,
                    (f"{t.proxy_ipv4}/24", f"{t.proxy_ipv6}/64"),
                    master="bridge0",
                ),
            )
        )

    bridges = [Bridge("gw", ns("gw"), gw.bridge, (f"{gw.ipv4}/24", f"{gw.ipv6}/64"))]
    bridges += [
        Bridge(n.proxy, ns(n.proxy), "bridge0", (f"{n.bridge_ipv4}/24", f"{n.bridge_ipv6}/64"))
        for n in nodes
    ]

    return LabSpec(
        prefix=prefix,
        lbs=lbs,
        proxies=proxies,
        targets_per_proxy=targets_per_proxy,
        trench="red",
        conduit=conduit,
        stream="stream-a",
        flow="flow-a",
        attractor="attractor-a",
        gateways=("gateway-v4-a", "gateway-v6-a"),
        vip4=vip4,
        vip6=vip6,
        protocols=("tcp", "udp"),
        ports=(4000, 4001, 4002, 4003),
        pods=tuple(pods),
        links=tuple(links),
        bridges=tuple(bridges),
        nodes=nodes,
        frontends=tuple(frontends),
        targets=tuple(targets),
        gateway=gw,
        bgp=Bgp(),
        hash_seed=hash_seed,
        marking=marking,
    )


# --- JSON --------------------------------------------------------------------------------------


def spec_to_dict(spec: LabSpec) -> dict[str, Any]:
    """The spec as JSON-ready data (tuples become lists)."""
    return {"version": SPEC_VERSION, **dataclasses.asdict(spec)}


def spec_to_json(spec: LabSpec) -> str:
    """The spec as a JSON document (what ``lab.json`` stores under ``spec``)."""
    return json.dumps(spec_to_dict(spec), indent=1, sort_keys=True)


@functools.cache
def _fields(tp: type) -> tuple[tuple[str, Any], ...]:
    """A dataclass's fields with their resolved types, once per class.

    get_type_hints evaluates every string annotation on each call, once per decoded
    object: reading a 49-pod lab's spec cost ~20 ms of CPU instead of ~4, and an
    ``analyze --lab`` reads it three times.
    """
    hints = typing.get_type_hints(tp)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(tp))


def _decode(tp: Any, value: Any) -> Any:
    """Rebuild ``value`` (parsed JSON) as type ``tp``; ValueError on a mismatch."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ValueError(f"{tp.__name__}: expected an object, got {type(value).__name__}")
        kwargs = {name: _decode(hint, value[name]) for name, hint in _fields(tp) if name in value}
        return tp(**kwargs)
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {type(value).__name__}")
        return tuple(_decode(args[0], v) for v in value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        others = [a for a in get_args(tp) if a is not type(None)]
        return _decode(others[0], value)
    if origin is Literal:
        if value not in get_args(tp):
            raise ValueError(f"{value!r} is not one of {get_args(tp)}")
        return value
    if tp in (int, str):
        if not isinstance(value, tp) or isinstance(value, bool):
            raise ValueError(f"expected {tp.__name__}, got {value!r}")
        return value
    raise ValueError(f"cannot decode type {tp!r}")


def spec_from_dict(data: dict[str, Any]) -> LabSpec:
    """Inverse of :func:`spec_to_dict`; ValueError when the data is not a spec of this version."""
    if data.get("version") != SPEC_VERSION:
        raise ValueError(f"lab spec version {data.get('version')!r}, expected {SPEC_VERSION}")
    body = {k: v for k, v in data.items() if k != "version"}
    spec = _decode(LabSpec, body)
    assert isinstance(spec, LabSpec)
    return spec


def spec_from_json(text: str) -> LabSpec:
    """Inverse of :func:`spec_to_json`."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("lab spec: expected a JSON object")
    return spec_from_dict(data)
