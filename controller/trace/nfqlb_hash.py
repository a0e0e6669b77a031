"""Which target nfqlb 1.2.0 gives a packet: its flow hash and its Maglev table, in Python.

Why: with real nfqlb the fwmark of a packet is not in any nft rule; ``nfqlb flowlb`` computes
it. To predict the target (static trace, ``lab traffic``) this module redoes what nfqlb does,
from its source (Nordix/nfqueue-loadbalancer 1.2.0):

- the key (``lib/iputils.c`` ``getHashKey``, ``lib/conntrack.h`` ``struct ctKey``): source and
  destination as 16-byte IPv6 (IPv4 as ``::ffff:a.b.c.d``), then 8 bytes
  ``{u16 user_defined = 0; u16 proto (host order); u16 sport, dport (network order)}``; for
  ICMP echo the 8 bytes are the echo identifier (as stored) with proto over bytes 2-3, for
  other L4 protocols only the addresses and proto;
- the hash (``hashKey`` with ``--hash_mode=0``, Meridio's setting): djb2 over those 40 bytes
  (``lib/hash.c``), 32-bit;
- the lookup (``cmdFlowLb.c``): ``lookup[hash % M]`` is an index, ``active[index]`` the fwmark
  (-1: no target, nfqlb then drops);
- the table (``lib/maglevdyn.c``): each of the N rows is a permutation
  ``(offset + j * skip) % M`` with ``offset = rand() % M`` and ``skip = rand() % (M-1) + 1``,
  drawn row after row by ``nfqlb init``, which never seeds ``rand()``: glibc's ``random()``
  with seed 1, reproduced here. Populating walks the active rows in index order, each
  taking its next free slot, until all M are taken.

The lookup table is therefore a pure function of M, N and the active indices; when a snapshot
holds the table itself (read from the shm) that one is used and this reconstruction is only
a cross-check. Fragments other than the first (hashed on addresses only, and possibly
forwarded to another LB) and nfqlb built with another libc are outside what this predicts.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from meridio_debug.controller.model import NfqlbShm

PROTOCOLS: Mapping[str, int] = {"icmp": 1, "tcp": 6, "udp": 17, "sctp": 132, "icmpv6": 58}
_MASK32 = 0xFFFFFFFF


def glibc_rand(count: int, seed: int = 1) -> list[int]:
    """The first ``count`` values of glibc's ``rand()`` after ``srand(seed)`` (TYPE_3)."""
    r = [0] * (34 + 310 + count)
    r[0] = seed & _MASK32
    for i in range(1, 31):
        # 16807 * r mod (2^31 - 1), Schrage's method with signed 32-bit words as glibc does.
        hi, lo = divmod(_signed(r[i - 1]), 127773)
        word = 16807 * lo - 2836 * hi
        if word < 0:
            word += 2147483647
        r[i] = word & _MASK32
    for i in range(31, 34):
        r[i] = r[i - 31]
    for i in range(34, len(r)):
        r[i] = (r[i - 31] + r[i - 3]) & _MASK32
    return [r[i] >> 1 for i in range(344, 344 + count)]


def _signed(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


@lru_cache(maxsize=16)
def permutations(m: int, n: int) -> tuple[tuple[int, int], ...]:
    """(offset, skip) of each of the ``n`` rows ``nfqlb init --M=m --N=n`` draws."""
    draws = glibc_rand(2 * n)
    return tuple((draws[2 * i] % m, draws[2 * i + 1] % (m - 1) + 1) for i in range(n))


def maglev_lookup(m: int, n: int, active: Sequence[int]) -> tuple[int, ...]:
    """nfqlb's lookup table (index per slot, -1 everywhere when nothing is active).

    ``m`` is the M nfqlb reports (already a prime), ``active`` the active indices.
    """
    return _maglev_lookup(m, n, tuple(sorted({i for i in active if 0 <= i < n})))


@lru_cache(maxsize=32)
def _maglev_lookup(m: int, n: int, rows: tuple[int, ...]) -> tuple[int, ...]:
    lookup = [-1] * m
    if not rows:
        return tuple(lookup)
    perms = permutations(m, n)
    nxt = dict.fromkeys(rows, 0)
    filled = 0
    while True:
        for i in rows:
            offset, skip = perms[i]
            c = (offset + nxt[i] * skip) % m
            while lookup[c] >= 0:
                nxt[i] += 1
                c = (offset + nxt[i] * skip) % m
            lookup[c] = i
            nxt[i] += 1
            filled += 1
            if filled == m:
                return tuple(lookup)


def djb2(data: bytes) -> int:
    """nfqlb's ``djb2_hash`` (``hash * 33 + c`` from 5381, 32-bit)."""
    h = 5381
    for byte in data:
        h = (h * 33 + byte) & _MASK32
    return h


def _as_v6(address: str) -> bytes:
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return b"\0" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def flow_key(
    src: str, dst: str, proto: str | int, *, sport: int = 0, dport: int = 0, echo_id: int = 0
) -> bytes:
    """The 40-byte ``struct ctKey`` nfqlb hashes for a packet of this flow (first fragment)."""
    number = PROTOCOLS[proto] if isinstance(proto, str) else proto
    if number in (1, 58):
        tail = struct.pack("!H", echo_id) + struct.pack("<H", number) + b"\0" * 4
    elif number in (6, 17, 132):
        tail = b"\0\0" + struct.pack("<H", number) + struct.pack("!HH", sport, dport)
    else:
        tail = b"\0\0" + struct.pack("<H", number) + b"\0" * 4
    return _as_v6(src) + _as_v6(dst) + tail


def flow_hash(
    src: str, dst: str, proto: str | int, *, sport: int = 0, dport: int = 0, echo_id: int = 0
) -> int:
    """``hashKey(key, hash_mode=0)`` for the flow."""
    return djb2(flow_key(src, dst, proto, sport=sport, dport=dport, echo_id=echo_id))


@dataclass(frozen=True)
class NfqlbChoice:
    """What nfqlb does with a packet: the slot, the index there and its fwmark (None: drop)."""

    hash: int
    slot: int
    index: int
    fwmark: int | None


def choose(
    lookup: Sequence[int],
    active: Mapping[int, int],
    src: str,
    dst: str,
    proto: str | int,
    *,
    sport: int = 0,
    dport: int = 0,
    echo_id: int = 0,
) -> NfqlbChoice:
    """nfqlb's pick for the flow, given the shm's lookup table and index -> fwmark."""
    h = flow_hash(src, dst, proto, sport=sport, dport=dport, echo_id=echo_id)
    slot = h % len(lookup)
    index = lookup[slot]
    return NfqlbChoice(h, slot, index, active.get(index) if index >= 0 else None)


def prime_below(n: int) -> int:
    """nfqlb's ``primeBelow``: the largest prime <= ``n`` (what ``init`` makes of --M)."""
    n = min(n, 994009)
    if n < 4:
        return max(n, 2)
    if n % 2 == 0:
        n -= 1
    while any(n % d == 0 for d in range(3, int(n**0.5) + 1, 2)):
        n -= 2
    return n


@dataclass(frozen=True)
class MarkPrediction:
    """nfqlb's mark for a flow (exact), or why it cannot be computed (``exact`` False)."""

    exact: bool
    mark: int | None  # None with exact: the slot's target is not Active, nfqlb drops
    how: str


def predict_mark(
    shm: NfqlbShm, src: str, dst: str, proto: str, *, sport: int = 0, dport: int = 0
) -> MarkPrediction:
    """The fwmark nfqlb gives the first packet (and every later one) of the flow via ``shm``.

    Uses the shm's own lookup table when the snapshot has it, else rebuilds it from M, N and
    the Active indexes (what ``nfqlb init`` + ``activate`` compute; see the module docstring).
    """
    if proto == "icmp":
        return MarkPrediction(
            False, None, "nfqlb hashes the ICMP echo identifier, which the flow does not give"
        )
    if not shm.m or not shm.active or len(shm.indexes) != len(shm.active):
        return MarkPrediction(False, None, f"shm {shm.name}: no Maglev state in the snapshot")
    if len(shm.lookup) == shm.m:
        table, source = tuple(shm.lookup), "its lookup table"
    else:
        table = maglev_lookup(shm.m, shm.n, shm.indexes)
        source = "the lookup table rebuilt from M, N and Active"
    choice = choose(
        table, dict(zip(shm.indexes, shm.active, strict=True)), src, dst, proto,
        sport=sport, dport=dport,
    )  # fmt: skip
    how = (
        f"nfqlb hash {choice.hash:#010x} of the 5-tuple, slot {choice.slot} of {shm.m} in "
        f"{shm.name} ({source}) -> index {choice.index}"
    )
    if choice.fwmark is None:
        return MarkPrediction(True, None, how + ": no Active target there, nfqlb drops")
    return MarkPrediction(True, choice.fwmark, f"{how} -> mark {choice.fwmark}")
