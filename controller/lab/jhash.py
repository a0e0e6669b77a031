"""Offline prediction of the lab's load-balancing: a port of the kernel's jhash.

Why: the lab marks packets with nft ``jhash ip saddr mod N seed S map {...}``
(the stand-in for nfqlb's Maglev). With the seed fixed, which target gets a
client source is a pure function, so tests, ``traffic`` and the analysis can
say which target *should* answer without sending anything, and a wrong
answer points at the LB, not at the client.

The port follows include/linux/jhash.h (Bob Jenkins' lookup3, ``jhash()``
over a byte string) and net/netfilter/nft_hash.c: the source address
register (4 or 16 bytes, network order) is hashed with the seed, then
``reciprocal_scale(hash, N)`` = ``(hash * N) >> 32`` picks the map index.
Words are read little-endian (``__get_unaligned_cpu32`` on x86/arm64), which
is what the kernels this runs on use.
"""

from __future__ import annotations

import ipaddress

from meridio_debug.controller.lab.spec import LabSpec

_MASK = 0xFFFFFFFF
JHASH_INITVAL = 0xDEADBEEF


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
