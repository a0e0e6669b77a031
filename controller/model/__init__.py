"""The controller's domain model: what one pod's network namespace looks like, as plain data.

Why a separate model instead of the protobuf messages: the analysis (and later
the trace) must be pure and testable without gRPC, and must not care how a
snapshot travelled (live RPC, saved JSON bundle, hand-built test fixture).
``wire/convert.py`` is the only place that turns a ``pb.Snapshot`` into these
classes; everything downstream sees frozen dataclasses with tuples, so results
are hashable, comparable and safe to share.

The model is already *normalised*: families are 4/6 (never AF_INET numbers),
states are upper-case (links, neighbours) or lower-case (address flags, route
types), rule actions are canonical ("lookup", "goto", ...), prefixes always
carry a length and default routes are spelled "default". The nftables ruleset
is reduced at conversion time to the few relations analysis needs (VIP sets,
mark maps, queue rules, the defrag exclusion) so no check walks nft JSON.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

Role = Literal["lb-fe", "proxy", "target", "gateway", "unknown"]
ROLES: Final[tuple[Role, ...]] = ("lb-fe", "proxy", "target", "gateway", "unknown")

SectionState = Literal["OK", "ERROR", "ABSENT", "UNSPECIFIED"]

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# operstates in which a link cannot carry traffic (IF_OPER_*).
_DEAD_OPERSTATES: Final = frozenset({"DOWN", "LOWERLAYERDOWN", "NOTPRESENT", "DORMANT"})


@dataclass(frozen=True, slots=True)
class SectionStatus:
    """How one collector fared: OK, ERROR (could not read) or ABSENT (component not there)."""

    name: str
    state: SectionState
    message: str = ""
    container: str = ""  # the pod's container it came from ("" pod-wide or unknown)
    source: str = ""  # how and where the agent read it


@dataclass(frozen=True, slots=True)
class Link:
    name: str
    index: int = 0
    kind: str = ""  # veth, bridge, vlan, vxlan, macvlan, "" for plain devices
    state: str = "UNKNOWN"  # operstate, upper-case
    flags: tuple[str, ...] = ()  # UP, LOWER_UP, ... upper-case
    mtu: int = 1500
    mac: str = ""  # lower-case
    master: str = ""  # bridge this link is enslaved to, "" if none
    slave_kind: str = ""
    link_index: int = 0
    alias: str = ""

    @property
    def is_up(self) -> bool:
        """Administratively up and not in an operstate that cannot pass traffic.

        Without flags (a collector that did not report them) the operstate
        alone decides; UNKNOWN counts as up, as for ``lo`` and some tunnels.
        """
        if self.state in _DEAD_OPERSTATES:
            return False
        if self.flags:
            return "UP" in self.flags
        return self.state in ("UP", "UNKNOWN")


@dataclass(frozen=True, slots=True)
class Address:
    family: int  # 4 or 6
    ifname: str
    address: str
    prefixlen: int
    scope: str = "global"  # global, link, host
    flags: tuple[str, ...] = ()  # permanent, tentative, dadfailed, nodad, ... lower-case
    index: int = 0

    @property
    def interface(self) -> IpInterface:
        return ipaddress.ip_interface(f"{self.address}/{self.prefixlen}")

    @property
    def network(self) -> IpNetwork:
        return self.interface.network

    @property
    def is_global(self) -> bool:
        return self.scope in ("global", "universe", "")

    def __str__(self) -> str:
        return f"{self.address}/{self.prefixlen} dev {self.ifname}"


@dataclass(frozen=True, slots=True)
class Rule:
    family: int
    priority: int
    table: int
    action: str = "lookup"  # lookup, goto, nop, blackhole, unreachable, prohibit
    src: str = ""  # "" means from all; otherwise a prefix with length
    dst: str = ""
    fwmark: int = 0
    fwmask: int = 0
    has_fwmark: bool = False
    iif: str = ""
    oif: str = ""
    invert: bool = False
    ipproto: str = ""  # "" when the rule matches every protocol
    sport: tuple[int, int] | None = None  # (start, end) port range
    dport: tuple[int, int] | None = None
    uid_range: tuple[int, int] | None = None
    goto: int = 0  # the target priority of a goto rule

    @property
    def selects_transport(self) -> bool:
        """True when the rule applies to part of the traffic only (ipproto, ports, uids)."""
        return (
            bool(self.ipproto)
            or self.sport is not None
            or self.dport is not None
            or (self.uid_range is not None)
        )

    @property
    def is_fwmark_lookup(self) -> bool:
        return self.has_fwmark and self.action == "lookup" and not self.invert

    @property
    def is_source_lookup(self) -> bool:
        """A plain ``from PREFIX lookup T`` rule: how VIP egress is steered in every pod."""
        return (
            bool(self.src)
            and not self.has_fwmark
            and not self.dst
            and not self.iif
            and not self.oif
            and not self.invert
            and not self.selects_transport
            and self.action == "lookup"
        )

    def __str__(self) -> str:
        prefix = "" if self.family == 4 else "-6 "
        return f"{prefix}{self.priority}: {self.body()}"

    def body(self) -> str:
        """The selectors and the action, as ``ip rule`` prints them after the priority."""
        parts: list[str] = []
        if self.invert:
            parts.append("not")
        parts.append(f"from {_short_prefix(self.src) if self.src else 'all'}")
        if self.dst:
            parts.append(f"to {_short_prefix(self.dst)}")
        if self.has_fwmark:
            mark = f"fwmark {self.fwmark:#x}"
            if self.fwmask not in (0, 0xFFFFFFFF):
                mark += f"/{self.fwmask:#x}"
            parts.append(mark)
        if self.iif:
            parts.append(f"iif {self.iif}")
        if self.oif:
            parts.append(f"oif {self.oif}")
        if self.uid_range is not None:
            parts.append(f"uidrange {self.uid_range[0]}-{self.uid_range[1]}")
        if self.ipproto:
            parts.append(f"ipproto {self.ipproto}")
        for name, ports in (("sport", self.sport), ("dport", self.dport)):
            if ports is not None:
                lo, hi = ports
                parts.append(f"{name} {lo}" if lo == hi else f"{name} {lo}-{hi}")
        if self.action == "lookup":
            parts.append(f"lookup {self.table}")
        elif self.action == "goto":
            parts.append(f"goto {self.goto}")
        else:
            parts.append(self.action)
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Nexthop:
    gateway: str = ""
    dev: str = ""
    weight: int = 1
    flags: tuple[str, ...] = ()  # onlink, dead, linkdown


@dataclass(frozen=True, slots=True)
class Route:
    family: int
    table: int
    dst: str  # "default" or a prefix with length
    type: str = "unicast"  # unicast, blackhole, unreachable, prohibit, local, broadcast, ...
    gateway: str = ""
    dev: str = ""
    protocol: str = ""
    metric: int = 0
    prefsrc: str = ""
    scope: str = ""
    nexthops: tuple[Nexthop, ...] = ()  # multipath only
    flags: tuple[str, ...] = ()
    src: str = ""

    @property
    def is_default(self) -> bool:
        return self.dst == "default"

    @property
    def is_unicast(self) -> bool:
        return self.type in ("unicast", "")

    def paths(self) -> tuple[Nexthop, ...]:
        """The next hops of this route, whether written single-path or multipath."""
        if self.nexthops:
            return self.nexthops
        if self.gateway or self.dev:
            return (Nexthop(gateway=self.gateway, dev=self.dev, flags=self.flags),)
        return ()

    def __str__(self) -> str:
        parts: list[str] = []
        if not self.is_unicast:
            parts.append(self.type)
        parts.append(self.dst)
        if self.nexthops:
            for hop in self.nexthops:
                text = "nexthop"
                if hop.gateway:
                    text += f" via {hop.gateway}"
                if hop.dev:
                    text += f" dev {hop.dev}"
                parts.append(text)
        else:
            if self.gateway:
                parts.append(f"via {self.gateway}")
            if self.dev:
                parts.append(f"dev {self.dev}")
        if self.protocol:
            parts.append(f"proto {self.protocol}")
        if self.metric:
            parts.append(f"metric {self.metric}")
        parts.extend(flag for flag in self.flags if flag in ("onlink", "linkdown", "dead"))
        parts.append(f"table {self.table}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Neighbour:
    family: int
    ifname: str
    dst: str
    lladdr: str = ""  # lower-case
    state: str = "NONE"  # REACHABLE, STALE, DELAY, PROBE, FAILED, INCOMPLETE, NOARP, PERMANENT
    flags: tuple[str, ...] = ()

    @property
    def is_failed(self) -> bool:
        """FAILED or INCOMPLETE (the agent joins several NUD bits with commas)."""
        return any(part in ("FAILED", "INCOMPLETE") for part in self.state.split(","))

    def __str__(self) -> str:
        mac = f" lladdr {self.lladdr}" if self.lladdr else ""
        return f"{self.dst} dev {self.ifname}{mac} {self.state}"


@dataclass(frozen=True, slots=True)
class FdbEntry:
    mac: str
    ifname: str
    master: str = ""
    vlan: int = -1
    state: str = ""
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Process:
    pid: int
    name: str
    cmdline: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BirdProtocol:
    name: str
    proto: str  # BGP, BFD, Static, Kernel, Device, Direct
    state: str  # up, down, start, stop (lower-case)
    info: str = ""  # Established, Active, ...
    table: str = ""
    bgp_state: str = ""
    neighbor_address: str = ""
    neighbor_as: str = ""
    local_as: str = ""
    last_error: str = ""
    bfd: bool = False  # a BFD session is configured for this protocol
    channel: str = ""  # ipv4 / ipv6

    @property
    def is_bgp(self) -> bool:
        return self.proto.lower() == "bgp"

    @property
    def is_established(self) -> bool:
        """Meridio's own test (frontend bird/proto.go): state up and Info says Established."""
        return self.state == "up" and (
            "established" in self.info.lower() or self.bgp_state.lower() == "established"
        )


@dataclass(frozen=True, slots=True)
class BfdSession:
    address: str
    state: str  # Up, Down, Init, AdminDown
    interface: str = ""
    protocol: str = ""

    @property
    def is_up(self) -> bool:
        return self.state.lower() == "up"


@dataclass(frozen=True, slots=True)
class NfqlbFlow:
    name: str
    priority: int = 0
    protocols: tuple[str, ...] = ()
    dests: tuple[str, ...] = ()
    dports: tuple[str, ...] = ()
    srcs: tuple[str, ...] = ()
    sports: tuple[str, ...] = ()
    matches_count: int = 0
    user_ref: str = ""


@dataclass(frozen=True, slots=True)
class NfqlbShm:
    """One stream's shared-memory load balancer (``nfqlb show --shm=tshm-<stream>``)."""

    name: str
    m: int = 0
    n: int = 0
    active: tuple[int, ...] = ()  # fwmarks of the active targets (Active: 5044(43) -> 5044)
    indexes: tuple[int, ...] = ()  # their Maglev indexes, parallel to active (43)
    lookup: tuple[int, ...] = ()  # the whole lookup table (index per slot) when the shm was read


@dataclass(frozen=True, slots=True)
class NftTable:
    family: str
    name: str


@dataclass(frozen=True, slots=True)
class NftVipSet:
    """An nft set of destination addresses that the load balancer steers (``ipv4-vips``)."""

    table: str
    name: str
    family: int  # 4 or 6, from the set's element type
    elements: tuple[str, ...]  # prefixes with length ("20.0.0.1/32") or ranges ("a-b")


@dataclass(frozen=True, slots=True)
class NftMarkMap:
    """``meta mark set jhash <ip saddr> mod N map { k : mark }``: the lab's stand-in for nfqlb."""

    table: str
    chain: str
    family: int  # 4 (ip) or 6 (ip6) from the hashed payload, 0 when unknown
    vip_set: str  # name of the set matched by ``daddr @set`` in the same rule, "" if none
    marks: tuple[int, ...]
    modulus: int = 0
    # What a trace needs to compute the mark offline (controller/trace/hashing.py):
    hash: str = ""  # jhash, symhash, numgen; "" for a constant mark
    seed: int | None = None  # jhash seed; None when nft picked a random one (not computable)
    offset: int = 0
    entries: tuple[tuple[int, int], ...] = ()  # (hash value, mark) pairs of the map


@dataclass(frozen=True, slots=True)
class NftQueueRule:
    """A rule that hands VIP traffic to a userspace queue (real nfqlb)."""

    table: str
    chain: str
    family: int
    vip_set: str
    queue: str  # "0-3", "0"; "" for the xtables NFQUEUE target (nft does not print its queues)


@dataclass(frozen=True, slots=True)
class NftDefrag:
    """Meridio's ``meridio-defrag`` table; prefixes of ``iifname "<prefix>*" notrack``."""

    table: str
    iifname_prefixes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NftState:
    tables: tuple[NftTable, ...] = ()
    vip_sets: tuple[NftVipSet, ...] = ()
    mark_maps: tuple[NftMarkMap, ...] = ()
    queue_rules: tuple[NftQueueRule, ...] = ()
    defrag: NftDefrag | None = None

    def has_table(self, name: str) -> bool:
        return any(table.name == name for table in self.tables)


@dataclass(frozen=True, slots=True)
class PodSnapshot:
    """Everything the agent saw in one pod's network namespace, normalised."""

    pod: str
    role: Role = "unknown"
    namespace: str = ""  # Kubernetes namespace ("" for the lab / local)
    netns: str = ""  # "net:[inode]" as the agent reported it
    taken_unix_ns: int = 0
    sections: tuple[SectionStatus, ...] = ()
    links: tuple[Link, ...] = ()
    addresses: tuple[Address, ...] = ()
    rules: tuple[Rule, ...] = ()
    routes: tuple[Route, ...] = ()
    neighbours: tuple[Neighbour, ...] = ()
    fdb: tuple[FdbEntry, ...] = ()
    # Read-only by convention; left out of the hash so snapshots stay hashable.
    sysctls: Mapping[str, str] = field(default_factory=dict, hash=False)
    nft: NftState = NftState()
    processes: tuple[Process, ...] = ()
    bird_protocols: tuple[BirdProtocol, ...] = ()
    bfd_sessions: tuple[BfdSession, ...] = ()
    nfqlb_flows: tuple[NfqlbFlow, ...] = ()
    nfqlb_shms: tuple[NfqlbShm, ...] = ()

    def section(self, name: str) -> SectionStatus | None:
        for status in self.sections:
            if status.name == name:
                return status
        return None

    def ok(self, *names: str) -> bool:
        """True when every named section was read successfully (analysis may trust it)."""
        for name in names:
            status = self.section(name)
            if status is None or status.state != "OK":
                return False
        return True


@dataclass(frozen=True, slots=True)
class PodResult:
    """One pod of the trench: its snapshot, or why the agent could not be reached."""

    pod: str
    role: Role = "unknown"
    snapshot: PodSnapshot | None = None
    error: str = ""  # set when snapshot is None: why the pod was unreachable
    namespace: str = ""

    @property
    def reachable(self) -> bool:
        return self.snapshot is not None

    @property
    def effective_role(self) -> Role:
        """The runtime's role, else the one the snapshot carries (possibly inferred)."""
        if self.role != "unknown" or self.snapshot is None:
            return self.role
        return self.snapshot.role


# --------------------------------------------------------------------------- intent

# What the operator asked for, as Meridio's CRs (api/v1/*_types.go) say it. Read from the CRs
# or the ConfigMap ``meridio-configuration-<trench>`` (controller/model/meridio_config.py), or written
# from the lab's spec (controller/lab/trench_crs.py). Only the fields some check compares.


@dataclass(frozen=True, slots=True)
class CfgVip:
    name: str
    address: str  # a prefix with length ("20.0.0.1/32")


@dataclass(frozen=True, slots=True)
class CfgGateway:
    name: str
    address: str
    protocol: str = "bgp"  # bgp or static
    local_asn: int = 8103
    remote_asn: int = 4248829953
    local_port: int = 10179
    remote_port: int = 10179
    hold_time_s: int = 3
    bfd: bool = False
    bfd_min_tx_ms: int = 0
    bfd_min_rx_ms: int = 0
    bfd_multiplier: int = 0


@dataclass(frozen=True, slots=True)
class CfgFlow:
    name: str
    stream: str
    priority: int = 0
    vips: tuple[str, ...] = ()  # Vip names
    source_subnets: tuple[str, ...] = ()
    source_ports: tuple[str, ...] = ()  # "any", "4000", "4000-4003"
    destination_ports: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ()  # lower-case


@dataclass(frozen=True, slots=True)
class CfgStream:
    name: str
    conduit: str
    max_targets: int = 100  # Meridio's default (pkg/controllers/trench/configmap.go)


@dataclass(frozen=True, slots=True)
class CfgConduit:
    name: str
    type: str = "stateless-lb"


@dataclass(frozen=True, slots=True)
class CfgAttractor:
    name: str
    composites: tuple[str, ...] = ()  # conduit names
    gateways: tuple[str, ...] = ()
    vips: tuple[str, ...] = ()
    interface: str = ""  # the FE's external interface name (ext-vlan0)
    ipv4_prefix: str = ""
    ipv6_prefix: str = ""


@dataclass(frozen=True, slots=True)
class MeridioConfig:
    """One trench's Meridio configuration: what every MDB6xx check compares the pods against."""

    trench: str
    source: str = ""  # where it was read ("CRs in namespace red", "lab mdl-", "file x.yaml")
    ip_family: str = "dualstack"
    conduits: tuple[CfgConduit, ...] = ()
    streams: tuple[CfgStream, ...] = ()
    flows: tuple[CfgFlow, ...] = ()
    vips: tuple[CfgVip, ...] = ()
    attractors: tuple[CfgAttractor, ...] = ()
    gateways: tuple[CfgGateway, ...] = ()

    def vip(self, name: str) -> CfgVip | None:
        return next((v for v in self.vips if v.name == name), None)

    def stream(self, name: str) -> CfgStream | None:
        return next((s for s in self.streams if s.name == name), None)


@dataclass(frozen=True, slots=True)
class TrenchConfig:
    """What the trench is supposed to look like, when known (ConfigMap, lab contract, flags).

    Every field is optional; analysis derives what is missing from the pods' state.
    """

    name: str = ""
    vips: tuple[str, ...] = ()  # prefixes, e.g. ("20.0.0.1/32", "2000::1/128")
    external_interface: str = ""  # the attractor's interface name in the FEs (ext-vlan0)
    # Targets known to have their stream open (TAPA Watch says OPEN); None: unknown.
    open_targets: tuple[str, ...] | None = None
    # The trench's Meridio objects (CRs / ConfigMap / the lab's), None when not read.
    meridio: MeridioConfig | None = None


# --------------------------------------------------------------------------- Kubernetes

# The pods' Kubernetes state (the kubelet's view), read by the Kubernetes runtime
# (runtime/k8s_health.py parses pod objects into these) and judged by analysis/health.py.


@dataclass(frozen=True, slots=True)
class ContainerHealth:
    """One container's status as the kubelet reports it, plus the tail of its logs."""

    name: str
    ready: bool = True
    state: str = "running"  # running, waiting, terminated
    reason: str = ""  # waiting/terminated reason: CrashLoopBackOff, ImagePullBackOff, Error ...
    message: str = ""
    exit_code: int | None = None  # terminated state's exit code
    restart_count: int = 0
    last_reason: str = ""  # lastState.terminated: OOMKilled, Error, Completed
    last_exit_code: int | None = None
    last_finished_unix: float = 0.0
    init: bool = False  # an init container
    log: tuple[str, ...] = ()  # last lines of the current instance's log
    previous_log: tuple[str, ...] = ()  # last lines of the previous instance (after a restart)


PodKind = Literal["lb-fe", "proxy", "target", "nsp", "ipam", "nse", "nsm", "spire", "other"]


@dataclass(frozen=True, slots=True)
class PodHealth:
    """One pod's Kubernetes status: phase, scheduling, deletion, containers."""

    name: str
    namespace: str = ""
    kind: PodKind = "other"
    phase: str = "Running"  # Pending, Running, Succeeded, Failed, Unknown
    node: str = ""
    reason: str = ""  # status.reason (Evicted, NodeLost, ...)
    message: str = ""
    unschedulable: str = ""  # PodScheduled=False: "<reason>: <message>"
    deleting_since_unix: float = 0.0  # metadata.deletionTimestamp, 0 when not deleting
    containers: tuple[ContainerHealth, ...] = ()


@dataclass(frozen=True, slots=True)
class ReadProblem:
    """Something the runtime could not read (RBAC), said with the verb that is missing."""

    what: str  # "NSM and Spire pods in all namespaces", "logs of red/lb-fe-a"
    verb: str  # list, get
    resource: str  # pods, pods/log
    message: str = ""


@dataclass(frozen=True, slots=True)
class KubeState:
    """The trench's pods (Meridio, NSP/IPAM/NSE, NSM/Spire) as Kubernetes sees them."""

    read_unix: float  # when it was read: the analysis' "now" (analysis reads no clock)
    since_unix: float = 0.0  # count restarts after this (e2e spec start); 0 = any time
    pods: tuple[PodHealth, ...] = ()
    problems: tuple[ReadProblem, ...] = ()
    trench: str = ""
    # (group, seconds it took to read) for the summary lines ("✔ LB/FE pods ready (took 0.4 s)")
    timings: tuple[tuple[str, float], ...] = ()


# --------------------------------------------------------------------------- over time


@dataclass(frozen=True, slots=True)
class NetEvent:
    """One netlink event a pod's agent saw during a watched window (``analyze --watch``)."""

    pod: str
    unix_ns: int
    kind: str  # link, address, route, rule, neighbour
    action: str  # new, del
    summary: str = ""
    link: Link | None = None
    address: Address | None = None
    route: Route | None = None
    rule: Rule | None = None
    neighbour: Neighbour | None = None
    overflow: bool = False  # the kernel dropped events before this one (ENOBUFS)


@dataclass(frozen=True, slots=True)
class SessionSample:
    """bird's BGP protocols and BFD sessions in one pod at one moment of the window."""

    pod: str
    unix_ns: int
    protocols: tuple[BirdProtocol, ...] = ()
    bfd_sessions: tuple[BfdSession, ...] = ()


@dataclass(frozen=True, slots=True)
class Timeline:
    """What happened during a watched window: netlink events and periodic bird samples."""

    start_unix_ns: int
    end_unix_ns: int
    events: tuple[NetEvent, ...] = ()
    samples: tuple[SessionSample, ...] = ()
    errors: tuple[str, ...] = ()  # pods that could not be watched, and why


@dataclass(frozen=True, slots=True)
class TrenchState:
    """Input of ``analyze``: every pod result of one trench plus optional expectations."""

    pods: tuple[PodResult, ...]
    config: TrenchConfig | None = None
    kube: KubeState | None = None  # Kubernetes' view of the pods, when read from a cluster
    timeline: Timeline | None = None  # events of a watched window (analyze --watch S)

    def pod(self, name: str) -> PodResult | None:
        for result in self.pods:
            if result.pod == name:
                return result
        return None


# --------------------------------------------------------------------------- helpers


def normalize_prefix(text: str) -> str:
    """Canonical prefix text ("20.0.0.1" -> "20.0.0.1/32"), unchanged when not an address."""
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        return text.strip()


def _short_prefix(prefix: str) -> str:
    """ip-rule style: host prefixes are printed without their length."""
    if prefix.endswith("/32") and ":" not in prefix:
        return prefix[:-3]
    if prefix.endswith("/128"):
        return prefix[:-4]
    return prefix


_NSM_TARGET_PREFIXES: Final = ("nsm-", "nsm")


def infer_role(snapshot: PodSnapshot) -> Role:
    """Guess a pod's role from its state alone (for ``--netns`` pods and bundles without labels).

    LB/FE: bird with NBR-* protocols, nfqlb, or the ``meridio-nfqlb`` nft table.
    Proxy: a bridge whose ports include NSM interfaces (conduit-* / proxy.*).
    Target: an ``nsm-*`` interface carrying a host-length (VIP) address.
    Gateway: bird without Meridio's NBR-* protocols and none of the above.
    """
    if snapshot.nft.has_table("meridio-nfqlb") or snapshot.nfqlb_shms or snapshot.nfqlb_flows:
        return "lb-fe"
    if any(proto.name.startswith("NBR-") for proto in snapshot.bird_protocols):
        return "lb-fe"
    bridges = {link.name for link in snapshot.links if link.kind == "bridge"}
    for link in snapshot.links:
        if link.master in bridges and (
            link.name.startswith("proxy.") or link.name.startswith("conduit")
        ):
            return "proxy"
    for addr in snapshot.addresses:
        if addr.ifname.startswith(_NSM_TARGET_PREFIXES) and addr.prefixlen == (
            32 if addr.family == 4 else 128
        ):
            return "target"
    if snapshot.bird_protocols or any(p.name == "bird" for p in snapshot.processes):
        return "gateway"
    return "unknown"


_ROLE_ALIASES: Final[Mapping[str, Role]] = {
    "lb-fe": "lb-fe",
    "lbfe": "lb-fe",
    "lb": "lb-fe",
    "fe": "lb-fe",
    "frontend": "lb-fe",
    "load-balancer": "lb-fe",
    "stateless-lb": "lb-fe",
    "stateless-lb-frontend": "lb-fe",
    "proxy": "proxy",
    "target": "target",
    "tapa": "target",
    "gateway": "gateway",
    "gw": "gateway",
    "unknown": "unknown",
    "": "unknown",
}


def parse_role(text: str | None) -> Role:
    """A Role from user or runtime text; anything unrecognised is "unknown"."""
    return _ROLE_ALIASES.get((text or "").strip().lower(), "unknown")
