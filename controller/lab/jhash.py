"""Offline prediction of the lab's load-balancing.

Why: which target gets a flow is a pure function of the lab's spec, so tests, ``traffic`` and
the analysis can say which target *should* answer without sending anything, and a wrong
answer points at the LB, not at the client.

- nfqlb (the default): nfqlb's djb2 hash of the 5-tuple picks a slot of the stream's Maglev
  table, which ``nfqlb init`` fills deterministically (controller/trace/nfqlb_hash.py); the
  spec gives M (100 x targets, lowered to a prime), N and the active indices.
- nft-jhash: ``jhash ip saddr mod N seed S map {...}``, the kernel's jhash port in
  controller/trace/hashing.py; only the source address matters.
"""

from __future__ import annotations

import ipaddress

from meridio_debug.controller.lab.spec import NFQLB_M_PER_TARGET, LabSpec
from meridio_debug.controller.trace import nfqlb_hash
from meridio_debug.controller.trace.hashing import jhash, nft_jhash_mod

__all__ = ["jhash", "lab_lookup", "nft_jhash_mod", "predict_index", "predict_target"]


def lab_lookup(spec: LabSpec) -> tuple[int, ...]:
    """The Maglev lookup table of ``tshm-<stream>`` in every LB of a fresh lab."""
    n = spec.max_targets
    m = nfqlb_hash.prime_below(NFQLB_M_PER_TARGET * n)
    return nfqlb_hash.maglev_lookup(m, n, [t.identifier - 1 for t in spec.targets])


def predict_index(
    spec: LabSpec,
    src_ip: str,
    *,
    dst_ip: str | None = None,
    proto: str = "tcp",
    sport: int | None = None,
    dport: int | None = None,
) -> int:
    """The 0-based position in ``spec.targets`` of the target that gets the flow.

    With nfqlb the whole 5-tuple matters: ValueError when the ports are not given.
    """
    if spec.marking == "nft-jhash":
        packed = ipaddress.ip_address(src_ip).packed
        return nft_jhash_mod(packed, len(spec.targets), spec.hash_seed)
    if sport is None or dport is None:
        raise ValueError("nfqlb hashes the 5-tuple: give the flow's ports to predict its target")
    if dst_ip is None:
        dst_ip = spec.vip4 if ipaddress.ip_address(src_ip).version == 4 else spec.vip6
    choice = nfqlb_hash.choose(
        lab_lookup(spec),
        {t.identifier - 1: t.fwmark for t in spec.targets},
        src_ip,
        dst_ip,
        proto,
        sport=sport,
        dport=dport,
    )
    by_mark = {t.fwmark: i for i, t in enumerate(spec.targets)}
    if choice.fwmark is None:
        raise ValueError("no active target in the lab's nfqlb table")
    return by_mark[choice.fwmark]


def predict_target(
    spec: LabSpec,
    src_ip: str,
    *,
    dst_ip: str | None = None,
    proto: str = "tcp",
    sport: int | None = None,
    dport: int | None = None,
) -> str:
    """The target pod that the lab's LBs send the flow to.

    Any LB gives the same answer: all hold the same table (nfqlb) or share the seed and the
    map (nft-jhash, where only the source address matters).
    """
    index = predict_index(spec, src_ip, dst_ip=dst_ip, proto=proto, sport=sport, dport=dport)
    return spec.targets[index].pod
