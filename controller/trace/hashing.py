"""Which mark an LB gives a flow, computed offline from the LB's own nft rule.

Why: a stand-in for nfqlb (the lab, or any nft-marking setup) marks with
``jhash ip saddr mod N seed S map {...}``. With the seed in the snapshot's nft
JSON, the mark is a pure function of the source address, so a trace names the
*one* target a flow goes to, from snapshot data alone (no lab spec: it works
on any cluster that marks this way). nfqlb's Maglev state is not in a
snapshot, so with real nfqlb every Active target stays a candidate.

The port follows include/linux/jhash.h (Bob Jenkins' lookup3, ``jhash()``
over a byte string) and net/netfilter/nft_hash.c: the source address
register (4 or 16 bytes, network order) is hashed with the seed, then
``reciprocal_scale(hash, N)`` = ``(hash * N) >> 32`` picks the map index.
Words are read little-endian (``__get_unaligned_cpu32`` on x86/arm64).
controller/lab/jhash.py predicts the lab with the same functions.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from meridio_debug.controller.model import NftMarkMap

_MASK: Final = 0xFFFFFFFF
JHASH_INITVAL: Final = 0xDEADBEEF


def _rol32(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _MASK
    a ^= _rol32(c, 4)
    c = (c + b) & _MASK
    b = (b - a) & _MASK
    b ^= _rol32(a, 6)
    a = (a + c) & _MASK
    c = (c - b) & _MASK
    c ^= _rol32(b, 8)
    b = (b + a) & _MASK
    a = (a - c) & _MASK
    a ^= _rol32(c, 16)
    c = (c + b) & _MASK
    b = (b - a) & _MASK
    b ^= _rol32(a, 19)
    a = (a + c) & _MASK
    c = (c - b) & _MASK
    c ^= _rol32(b, 4)
    b = (b + a) & _MASK
    return a, b, c


def _final(a: int, b: int, c: int) -> tuple[int, int, int]:
    c ^= b
    c = (c - _rol32(b, 14)) & _MASK
    a ^= c
    a = (a - _rol32(c, 11)) & _MASK
    b ^= a
    b = (b - _rol32(a, 25)) & _MASK
    c ^= b
    c = (c - _rol32(b, 16)) & _MASK
    a ^= c
    a = (a - _rol32(c, 4)) & _MASK
    b ^= a
    b = (b - _rol32(a, 14)) & _MASK
    c ^= b
    c = (c - _rol32(b, 24)) & _MASK
    return a, b, c


def jhash(key: bytes, initval: int) -> int:
    """The kernel's ``jhash(key, len(key), initval)``."""
    length = len(key)
    a = b = c = (JHASH_INITVAL + length + initval) & _MASK
    k = 0
    while length > 12:
        a = (a + int.from_bytes(key[k : k + 4], "little")) & _MASK
        b = (b + int.from_bytes(key[k + 4 : k + 8], "little")) & _MASK
        c = (c + int.from_bytes(key[k + 8 : k + 12], "little")) & _MASK
        a, b, c = _mix(a, b, c)
        length -= 12
        k += 12
    if length == 0:
        return c
    # The tail switch of jhash.h adds byte i of each word shifted by 8*i,
    # i.e. a little-endian read of the zero-padded rest.
    tail = key[k:] + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & _MASK
    b = (b + int.from_bytes(tail[4:8], "little")) & _MASK
    c = (c + int.from_bytes(tail[8:12], "little")) & _MASK
    a, b, c = _final(a, b, c)
    return c


def nft_jhash_mod(key: bytes, modulus: int, seed: int, offset: int = 0) -> int:
    """What nft ``jhash <key> mod <modulus> seed <seed> offset <offset>`` yields."""
    if modulus < 1:
        raise ValueError("modulus must be at least 1")
    return ((jhash(key, seed) * modulus) >> 32) + offset


def computable(mark_map: NftMarkMap) -> bool:
    """True when the map's mark for a source address can be computed offline."""
    if not mark_map.hash:  # a constant mark
        return len(mark_map.marks) == 1
    return (
        mark_map.hash == "jhash"
        and mark_map.seed is not None
        and mark_map.modulus > 0
        and mark_map.family in (4, 6)
        and bool(mark_map.entries)
    )


def mark_for(mark_map: NftMarkMap, src: str) -> tuple[int | None, int | None]:
    """(hash value, mark) the map gives a packet from ``src``; (None, None) when not computable.

    The mark is None also when the hash lands on a value the map has no entry
    for (nft then sets no mark at all).
    """
    if not computable(mark_map):
        return None, None
    if not mark_map.hash:
        return None, mark_map.marks[0]
    assert mark_map.seed is not None
    index = nft_jhash_mod(
        ipaddress.ip_address(src).packed, mark_map.modulus, mark_map.seed, mark_map.offset
    )
    return index, dict(mark_map.entries).get(index)
