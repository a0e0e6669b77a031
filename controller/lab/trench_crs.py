"""The lab's trench as Meridio objects (Trench, Conduit, Stream, Flow, Vip, Attractor, Gateway).

Why: the configuration checks (analysis/config.py, MDB6xx) compare intent
with the data plane; in the lab the intent is the spec (lab.md), so the lab
states it the way a cluster does -- as the CRs an operator would apply. The
same objects print as YAML (``meridio-debug lab crs``), which doubles as a
readable description of what the lab builds.
"""

from __future__ import annotations

from typing import Any

import yaml

from meridio_debug.controller.lab.spec import LabSpec
from meridio_debug.controller.model import (
    CfgAttractor,
    CfgConduit,
    CfgFlow,
    CfgGateway,
    CfgStream,
    CfgVip,
    MeridioConfig,
)
from meridio_debug.controller.model.meridio_config import to_crs

# Meridio's default (pkg/controllers/trench/configmap.go); the lab's nfqlb init uses it too.
DEFAULT_MAX_TARGETS = 100


def _port_range(ports: tuple[int, ...]) -> tuple[str, ...]:
    """(4000, 4001, 4002, 4003) -> ("4000-4003",); gaps give several ranges."""
    out: list[str] = []
    values = sorted(set(ports))
    start = prev = values[0] if values else 0
    for value in [*values[1:], -1]:
        if value == prev + 1:
            prev = value
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = value
    return tuple(out) if values else ()


def lab_config(spec: LabSpec, source: str = "") -> MeridioConfig:
    """What the lab's trench is configured as, in Meridio's terms."""
    vip4, vip6 = "vip-a-v4", "vip-a-v6"
    bgp = spec.bgp
    gateways = tuple(
        CfgGateway(
            name=name,
            address=address,
            local_asn=bgp.local_asn,
            remote_asn=bgp.remote_asn,
            local_port=bgp.port,
            remote_port=bgp.port,
            hold_time_s=bgp.hold_time,
            bfd=True,
            bfd_min_tx_ms=bgp.bfd_min_tx_ms,
            bfd_min_rx_ms=bgp.bfd_min_rx_ms,
            bfd_multiplier=bgp.bfd_multiplier,
        )
        for name, address in zip(
            spec.gateways, (spec.gateway.ipv4, spec.gateway.ipv6), strict=False
        )
    )
    ext = spec.frontends[0].ext_ifname if spec.frontends else "ext-vlan0"
    max_targets = int(getattr(spec, "max_targets", DEFAULT_MAX_TARGETS))
    return MeridioConfig(
        trench=spec.trench,
        source=source or f"lab {spec.prefix}",
        ip_family="dualstack",
        conduits=(CfgConduit(spec.conduit),),
        streams=(CfgStream(spec.stream, spec.conduit, max_targets),),
        flows=(
            CfgFlow(
                name=spec.flow,
                stream=spec.stream,
                priority=int(getattr(spec, "flow_priority", 1)),
                vips=(vip4, vip6),
                source_subnets=("0.0.0.0/0", "::/0"),
                source_ports=("any",),
                destination_ports=_port_range(spec.ports),
                protocols=spec.protocols,
            ),
        ),
        vips=(CfgVip(vip4, spec.vips[0]), CfgVip(vip6, spec.vips[1])),
        attractors=(
            CfgAttractor(
                name=spec.attractor,
                composites=(spec.conduit,),
                gateways=tuple(g.name for g in gateways),
                vips=(vip4, vip6),
                interface=ext,
                ipv4_prefix=spec.gateway.prefix4,
                ipv6_prefix=spec.gateway.prefix6,
            ),
        ),
        gateways=gateways,
    )


def lab_crs_yaml(spec: LabSpec, namespace: str = "") -> str:
    """The lab's trench as a YAML stream of Meridio CRs."""
    docs: list[dict[str, Any]] = to_crs(lab_config(spec), namespace or spec.trench)
    return yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True)
