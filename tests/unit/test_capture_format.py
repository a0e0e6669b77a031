"""The controller's pcapng writer and packet summaries, without root or tshark.

The netns tier reads real captures back with tshark; here the block layout is
checked byte by byte (lengths, alignment, flags, rotation) and the decoder is
fed odd frames, because --print must never raise on what the wire brings.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest

from meridio_debug.controller.packets import dissect as packets
from meridio_debug.controller.packets.pcapng import (
    EPB_TYPE,
    IDB_TYPE,
    ISB_TYPE,
    SHB_TYPE,
    Interface,
    Writer,
    flags_for,
)


def blocks(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        btype, length = struct.unpack_from("<II", data, pos)
        assert length % 4 == 0 and struct.unpack_from("<I", data, pos + length - 4)[0] == length
        out.append((btype, data[pos + 8 : pos + length - 4]))
        pos += length
    assert pos == len(data)
    return out


def udp_frame(payload: bytes = b"hello") -> bytes:
    udp = struct.pack("!HHHH", 1234, 9, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        17,
        0,
        bytes([10, 0, 0, 1]),
        bytes([10, 0, 0, 2]),
    )
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp


def test_stream_has_shb_idb_epb_isb_with_direction_and_ns_timestamps() -> None:
    out = io.BytesIO()
    w = Writer(None, out)
    ifid = w.add_interface(Interface(1, 262144, "pod-a/eth0", "test"))
    frame = udp_frame(b"abc")  # odd length: padded
    w.write([(1_700_000_000_123_456_789, ifid, flags_for(4), frame, 99)])
    w.close([(ifid, 1_700_000_001_000_000_000, 1_700_000_000_000_000_000, 10, 2)])
    kinds = [(t, body) for t, body in blocks(out.getvalue())]
    assert [t for t, _ in kinds] == [SHB_TYPE, IDB_TYPE, EPB_TYPE, ISB_TYPE]
    idb = kinds[1][1]
    assert b"pod-a/eth0" in idb and struct.pack("<HH", 9, 1) + b"\x09" in idb
    epb = kinds[2][1]
    _, hi, lo, caplen, origlen = struct.unpack_from("<IIIII", epb)
    assert (hi << 32 | lo, caplen, origlen) == (1_700_000_000_123_456_789, len(frame), 99)
    assert epb[20 : 20 + caplen] == frame
    flags_opt = epb[20 + caplen + (-caplen & 3) :][:8]
    assert struct.unpack("<HHI", flags_opt) == (2, 4, 2)  # outbound
    isb = kinds[3][1]
    assert struct.pack("<HHQ", 4, 8, 10) in isb and struct.pack("<HHQ", 5, 8, 2) in isb


def test_direction_and_reception_type_from_pkttype() -> None:
    assert flags_for(0) == 1 | 1 << 2  # host: inbound unicast
    assert flags_for(1) & 3 == 1 and flags_for(4) == 2
    assert flags_for(7) == 0


def test_rotation_repeats_interfaces_and_respects_the_size(tmp_path: Path) -> None:
    w = Writer(str(tmp_path / "r.pcapng"), max_bytes=2000, rotate=2)
    ifid = w.add_interface(Interface(1, 65535, "p/x", ""))
    w.write([(i, ifid, 1, udp_frame(b"%04d" % i), 50) for i in range(100)])
    w.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["r0.pcapng", "r1.pcapng"]
    for f in files:
        data = f.read_bytes()
        assert len(data) <= 2000
        assert [t for t, _ in blocks(data)][:2] == [SHB_TYPE, IDB_TYPE]


def test_every_rotated_file_ends_with_statistics(tmp_path: Path) -> None:
    """Agents' counters when they have reported; else the packets delivered so far, no drops."""
    w = Writer(str(tmp_path / "s.pcapng"), max_bytes=1500, rotate=9)
    a = w.add_interface(Interface(1, 65535, "p/a", ""))
    b = w.add_interface(Interface(1, 65535, "p/b", ""))
    w.write([(i + 1, i % 2, 1, udp_frame(b"%04d" % i), 50) for i in range(20)])
    w.stats_source = lambda: [(a, 99, 1, 500, 7)]  # the agent has reported for a only
    w.write([(i + 1, i % 2, 1, udp_frame(b"%04d" % i), 50) for i in range(20, 40)])
    w.close([(a, 100, 1, 600, 8), (b, 100, 1, 20, 0)])
    files = sorted(tmp_path.iterdir())
    assert len(files) > 2
    first = files[0].read_bytes()
    assert len(first) <= 1500
    isbs = [body for t, body in blocks(first) if t == ISB_TYPE]
    epbs = [body for t, body in blocks(first) if t == EPB_TYPE]
    assert len(isbs) == 2  # one per interface
    for ifid, isb in enumerate(isbs):
        seen = sum(1 for e in epbs if struct.unpack_from("<I", e)[0] == ifid)
        assert struct.unpack_from("<I", isb)[0] == ifid
        assert struct.pack("<HHQ", 4, 8, seen) in isb  # delivered so far (first file)
        assert struct.pack("<HH", 5, 8) not in isb  # drops: not known yet
    later = [body for t, body in blocks(files[-2].read_bytes()) if t == ISB_TYPE]
    assert struct.pack("<HHQ", 4, 8, 500) in later[0] and struct.pack("<HHQ", 5, 8, 7) in later[0]
    assert struct.unpack_from("<I", later[1])[0] == b and struct.pack("<HH", 5, 8) not in later[1]


def test_max_bytes_without_rotation_stops_writing() -> None:
    out = io.BytesIO()
    w = Writer(None, out, max_bytes=1000)
    ifid = w.add_interface(Interface(1, 65535, "p/x", ""))
    n = w.write([(i, ifid, 1, udp_frame(), 50) for i in range(100)])
    assert 0 < n < 100 and w.full and len(out.getvalue()) <= 1000


@pytest.mark.parametrize(
    ("frame", "text"),
    [
        (udp_frame(b"hello"), "IP 10.0.0.1.1234 > 10.0.0.2.9: UDP, length 5"),
        (udp_frame()[:12] + b"\x81\x00\x00\x64" + udp_frame()[12:], "vlan 100, IP 10.0.0.1.1234"),
        (
            b"\x02" * 12
            + b"\x08\x06"
            + bytes.fromhex("0001080006040001")
            + b"\x02" * 6
            + bytes([10, 0, 0, 1])
            + b"\0" * 6
            + bytes([10, 0, 0, 2]),
            "ARP, Request who-has 10.0.0.2 tell 10.0.0.1",
        ),
        (b"\x02" * 12 + b"\x08\x00" + b"\x45", "IP (truncated)"),
        (b"\x02" * 5, "truncated frame"),
    ],
)
def test_summaries(frame: bytes, text: str) -> None:
    assert text in packets.summarize(frame)


def test_tcp_and_icmp6_summaries() -> None:
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x02, 1024, 0, 0)
    ip6 = struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + bytes(15) + b"\x01" + bytes(15) + b"\x02"
    assert (
        packets.summarize(ip6 + tcp, packets.LINKTYPE_RAW)
        == "IP6 ::1.40000 > ::2.80: Flags [S], seq 1, length 0"
    )
    icmp6 = bytes([128, 0, 0, 0])
    ip6 = struct.pack("!IHBB", 6 << 28, 4, 58, 64) + bytes(15) + b"\x01" + bytes(15) + b"\x02"
    assert packets.summarize(b"\x02" * 12 + b"\x86\xdd" + ip6 + icmp6).endswith(
        "ICMP6 echo request"
    )


def test_ipv6_extension_headers_in_summary_and_trace_decode() -> None:
    """One decoder: --print and the active trace read past the same extension headers."""
    udp = struct.pack("!HHHH", 5000, 4000, 12, 0) + b"ping"
    hbh = bytes([17, 0]) + bytes(6)  # hop-by-hop options, next header UDP
    frag = struct.pack("!BBHI", 17, 0, 0, 7)  # fragment header, offset 0 (the first)
    for ext, first in ((hbh, 0), (frag, 44)):
        ip6 = struct.pack("!IHBB", 6 << 28, len(ext) + len(udp), first or 0, 64)
        ip6 += bytes(15) + b"\x01" + bytes(15) + b"\x02"
        frame = ip6 + ext + udp
        assert (
            packets.summarize(frame, packets.LINKTYPE_RAW)
            == "IP6 ::1.5000 > ::2.4000: UDP, length 4"
        )
        p = packets.decode(frame, packets.LINKTYPE_RAW)
        assert p is not None and (p.proto, p.sport, p.dport, p.payload) == (17, 5000, 4000, b"ping")
    later = struct.pack("!BBHI", 17, 0, 185 << 3, 7)  # offset 185 * 8: not the first fragment
    ip6 = struct.pack("!IHBB", 6 << 28, 8 + len(udp), 44, 64) + bytes(15) + b"\x01" + bytes(15)
    frame = ip6 + b"\x02" + later + udp
    assert packets.summarize(frame, packets.LINKTYPE_RAW).endswith("fragment offset 1480, proto 17")
    p = packets.decode(frame, packets.LINKTYPE_RAW)
    assert p is not None and (p.proto, p.sport) == (17, 0)
