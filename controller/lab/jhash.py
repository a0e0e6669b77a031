"""Offline prediction of the lab's load-balancing.

Why: the lab marks packets with nft ``jhash ip saddr mod N seed S map {...}``
(the stand-in for nfqlb's Maglev). With the seed fixed, which target gets a
client source is a pure function, so tests, ``traffic`` and the analysis can
say which target *should* answer without sending anything, and a wrong
answer points at the LB, not at the client.

The kernel's jhash port lives in the pure trace core
(controller/trace/hashing.py), which computes the same mapping from a
snapshot's nft rule; here it is applied to the lab's spec.
"""

from __future__ import annotations

import ipaddress

from meridio_debug.controller.lab.spec import LabSpec
from meridio_debug.controller.trace.hashing import jhash, nft_jhash_mod

__all__ = ["jhash", "nft_jhash_mod", "predict_index", "predict_target"]


def predict_index(spec: LabSpec, src_ip: str) -> int:
    """The nft map index (0-based position in ``spec.targets``) for ``src_ip``."""
    packed = ipaddress.ip_address(src_ip).packed
    return nft_jhash_mod(packed, len(spec.targets), spec.hash_seed)


def predict_target(spec: LabSpec, src_ip: str) -> str:
    """The target pod that the lab's LBs send a flow from ``src_ip`` to.

    Any LB gives the same answer: all share the seed and the map, and the
    hash covers the source address only (ports and protocol do not matter).
    """
    return spec.targets[predict_index(spec, src_ip)].pod
