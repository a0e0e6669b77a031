"""The capture's C loops and their Python twins give the same bytes, and a file reads right.

agent/blocks.py and controller/packets/merge.py each run a C extension where it
was built and a Python twin where it was not; these tests feed both the same
input (TPACKET_V3 blocks made here, batches of several pods with frames out of
order, VLAN tags, odd lengths, limits, byte budgets) and compare the output byte
for byte, so the fallback cannot drift from what users normally run. The last
test reads a merged file back with tshark: interfaces, order and frames; an agent of
another capture protocol is named, not misread.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from meridio_debug.agent import blocks
from meridio_debug.controller.packets import merge
from meridio_debug.controller.packets.pcapng import Interface, Writer
from meridio_debug.controller.services.capture import FLAGS

HDR = struct.Struct("<IIIIIIHHIIHH8xHHiHBB")


def test_the_extensions_are_built_here() -> None:
    # scripts/setup builds them; without them the capture silently costs ~5x more CPU.
    assert blocks.ENGINE == "c"
    assert merge.ENGINE == "c"


def test_agent_and_controller_agree_on_the_frame_record() -> None:
    assert blocks.FRAME_META.format == merge.FRAME_META.format
    assert blocks.FRAME_META.size == 24


def make_block(rng: random.Random, packets: int, t0: int) -> tuple[bytes, list[bytes]]:
    """A retired TPACKET_V3 block as the kernel lays it out, and the frames it holds."""
    body = b""
    first = 48
    frames = []
    pos = first
    entries = []
    for i in range(packets):
        snap = rng.choice([0, 5, 12, 13, 60, 64, 99, 1500])
        frame = rng.randbytes(snap)
        vlan = rng.random() < 0.3
        status = 1 | ((1 << 4) if vlan else 0) | ((1 << 6) if vlan and rng.random() < 0.5 else 0)
        hatype = 1 if rng.random() < 0.9 else 65534
        mac = 80
        nxt = (mac + snap + 15) & ~15
        ts = t0 + rng.randrange(0, 10_000_000) + i * 1000
        hdr = HDR.pack(
            nxt if i < packets - 1 else 0,
            ts // 1_000_000_000,
            ts % 1_000_000_000,
            snap,
            snap + rng.randrange(0, 100),
            status,
            mac,
            mac,
            0,
            rng.randrange(0, 4096),
            0x88A8,
            0,
            17,
            0x0300,
            rng.choice([2, 3, 7]),
            hatype,
            rng.randrange(0, 8),
            6,
        )
        entry = hdr + b"\0" * (mac - len(hdr)) + frame
        entry += b"\0" * (nxt - len(entry))
        entries.append(entry)
        frames.append(frame)
        pos += nxt
    body = b"".join(entries)
    head = struct.pack("<IIIIII", 3, 0, 1, packets, first, first + len(body))
    return head + b"\0" * (first - len(head)) + body, frames


@pytest.mark.parametrize("seed", range(6))
def test_block_parsing_c_and_python_give_the_same_bytes(seed: int) -> None:
    rng = random.Random(seed)
    ring = b""
    offsets = []
    for b in range(4):
        block, _ = make_block(rng, rng.randrange(0, 40), 1_700_000_000_000_000_000 + b)
        offsets.append(len(ring))
        ring += block + b"\0" * (-len(block) % 4096)
    assert blocks.parse_native is not None
    for max_packets, max_bytes in [(-1, -1), (7, -1), (-1, 900), (0, -1), (3, 100)]:
        c = blocks.parse_native(ring, offsets, max_packets, max_bytes)
        py = blocks.parse_python(ring, offsets, max_packets, max_bytes)
        assert c == py
        data, meta, counts, _last, _stop = c
        assert sum(counts.values()) == len(meta) // 24
        assert sum(cap for _t, _i, cap, _o, _p in blocks.FRAME_META.iter_unpack(meta)) == len(data)


def test_vlan_tags_are_put_back_like_libpcap() -> None:
    rng = random.Random(1)
    block, frames = make_block(rng, 30, 1_700_000_000_000_000_000)
    data, meta, _counts, _last, _stop = blocks.parse(block, [0], -1, -1)
    off = 0
    for (_ts, _ix, cap, _orig, _pt), frame in zip(
        blocks.FRAME_META.iter_unpack(meta), frames, strict=True
    ):
        got = data[off : off + cap]
        off += cap
        assert got == frame or (cap == len(frame) + 4 and got[:12] + got[16:] == frame)


def batches(rng: random.Random, pods: int) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(pods * 3):
        n = rng.randrange(0, 50)
        frames = [rng.randbytes(rng.randrange(0, 130)) for _ in range(n)]
        base = 1_700_000_000_000_000_000 + rng.randrange(0, 5_000)
        meta = b"".join(
            blocks.FRAME_META.pack(
                base + rng.randrange(0, 3_000),  # out of order, with ties
                rng.choice([2, 5]),
                len(f),
                len(f) + rng.randrange(0, 9),
                rng.randrange(0, 8),
            )
            for f in frames
        )
        out.append((b"".join(frames), meta))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_merging_into_epbs_c_and_python_give_the_same_bytes(seed: int) -> None:
    rng = random.Random(seed)
    ifids = {2: 0, 5: 1}
    runs = []
    for data, meta in batches(rng, 3):
        assert merge._ext.ifindexes(meta) == merge.ifindexes_python(meta)
        recs = merge._ext.prepare(data, meta, ifids, FLAGS)
        assert recs == merge.prepare_python(data, meta, ifids, FLAGS)
        runs.append((data, recs, rng.randrange(0, 3)))
    marks = [merge.EVERYTHING, 1_700_000_000_000_000_000 + 4_000, 0]
    for mark in marks:
        for max_packets, budget, force in [
            (-1, -1, False),
            (10, -1, False),
            (-1, 2000, False),
            (-1, 0, True),
        ]:
            counts_c, counts_py = [0, 0], [0, 0]
            c = merge._ext.merge(runs, mark, max_packets, budget, force, counts_c)
            py = merge.merge_python(runs, mark, max_packets, budget, force, counts_py)
            assert c == py
            assert counts_c == counts_py
            assert sum(counts_c) == c[2]


def test_bad_batches_are_refused_not_read_out_of_bounds() -> None:
    meta = blocks.FRAME_META.pack(1, 2, 100, 100, 0)
    for impl in (merge._ext.prepare, merge.prepare_python):
        with pytest.raises(ValueError, match="more bytes"):
            impl(b"short", meta, {2: 0}, FLAGS)
        with pytest.raises(KeyError):
            impl(b"x" * 100, meta, {3: 0}, FLAGS)
        with pytest.raises(ValueError, match="whole number"):
            impl(b"", meta[:10], {2: 0}, FLAGS)
    for ifindexes in (merge._ext.ifindexes, merge.ifindexes_python):
        assert ifindexes(meta + meta) == [2]
        with pytest.raises(ValueError, match="whole number"):
            ifindexes(meta + meta[:10])  # a batch from the network cut short: refused, not read


def test_a_block_claiming_more_packets_than_it_can_hold_is_refused() -> None:
    block, _ = make_block(random.Random(1), 3, 1_700_000_000_000_000_000)
    lying = block[:12] + struct.pack("<I", 0xFFFFFFFF) + block[16:]  # num_pkts: 2^32 - 1
    assert blocks.parse_native is not None
    for parse in (blocks.parse_native, blocks.parse_python):
        with pytest.raises(ValueError, match="more packets than it can hold"):
            parse(lying, [0], -1, -1)


@pytest.mark.skipif(not shutil.which("tshark"), reason="needs tshark (scripts/setup installs it)")
def test_two_pods_merged_read_back_in_time_order_with_their_interfaces(tmp_path: Path) -> None:
    path = tmp_path / "two.pcapng"
    writer = Writer(str(path))
    a = writer.add_interface(Interface(1, 262144, "pod-a/eth0", "pod a"))
    b = writer.add_interface(Interface(1, 262144, "pod-b/eth1", "pod b"))
    t0 = 1_700_000_000_000_000_000
    frame = bytes.fromhex("020202020202040404040404") + b"\x08\x00" + b"\x45" + b"\0" * 45

    def run(ifid: int, times: list[int]) -> merge.Run:
        meta = b"".join(blocks.FRAME_META.pack(t0 + t, 9, len(frame), len(frame), 4) for t in times)
        return merge.Run(
            frame * len(times), merge.prepare(frame * len(times), meta, {9: ifid}, FLAGS)
        )

    runs = [run(a, [30, 10, 50]), run(b, [20, 40, 60])]
    assert writer.write_runs(runs, t0 + 45) == 4  # up to the watermark only
    assert writer.write_runs(runs, merge.EVERYTHING) == 2
    writer.close()
    out = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "frame.time_epoch", "-e", "frame.interface_name",
         "-e", "frame.p2p_dir"],
        capture_output=True, text=True, check=True,
    ).stdout.split("\n")  # fmt: skip
    rows = [line.split("\t") for line in out if line]
    assert [r[1] for r in rows] == [
        "pod-a/eth0",
        "pod-b/eth1",
        "pod-a/eth0",
        "pod-b/eth1",
        "pod-a/eth0",
        "pod-b/eth1",
    ]
    stamps = [int(r[0].replace(".", "")) for r in rows]
    assert stamps == sorted(stamps) and stamps[0] % 1000 == 10
    assert {r[2] for r in rows} == {"0"}  # sll_pkttype 4 = outgoing: EPB direction "sent"


class _FakeAgent:
    """Answers Capture like an agent of protocol ``version`` would (a fake, not a mock)."""

    def __init__(self, version: int, frames: int, cut: int = 0) -> None:
        self.version, self.frames, self.pod = version, frames, "old-pod"
        self.cut = cut  # bytes cut off the batch's meta: a malformed batch

    async def capture(self, request: object):
        from meridio_debug.protos import agent_pb2 as pb

        yield pb.CaptureChunk(
            start=pb.CaptureStart(
                capture_id="c1", points=["any"], snaplen=262144, protocol_version=self.version
            )
        )
        frame = b"\x02" * 12 + b"\x08\x00" + b"\x45" + b"\0" * 45
        meta = b"".join(
            blocks.FRAME_META.pack(1_700_000_000_000_000_000 + i, 2, len(frame), len(frame), 0)
            for i in range(self.frames)
        )
        chunk = pb.CaptureChunk()
        chunk.batch.data, chunk.batch.meta = frame * self.frames, meta[: len(meta) - self.cut]
        yield chunk
        yield pb.CaptureChunk(stats=pb.CaptureStats(final=True, packets=self.frames))

    async def stop_capture(self, capture_id: str) -> bool:
        return True


class _FakeRuntime:
    def __init__(self, agent: _FakeAgent) -> None:
        self.agent = agent

    def pods(self):
        from meridio_debug.controller.runtime import PodRef

        return [PodRef("old-pod", "target", "ns-x", "local")]

    def open(self, pod: object):
        import contextlib

        @contextlib.asynccontextmanager
        async def opened():
            yield self.agent

        return opened()


@pytest.mark.parametrize(("version", "written"), [(2, 5), (1, 0)])
def test_an_agent_of_another_capture_protocol_is_named_not_misread(
    version: int, written: int
) -> None:
    import asyncio
    import io

    from meridio_debug.controller.services.capture import Capture, Options, PcapngSink

    out = io.BytesIO()
    sink = PcapngSink(Writer(None, stream=out))
    cap = Capture(_FakeRuntime(_FakeAgent(version, 5)), Options(), sink, lambda _line: None)
    (state,) = asyncio.run(cap.run(lambda _states: None))
    assert sink.packets == written
    if version != 2:
        assert "old-pod: the agent speaks capture protocol 1, this controller 2" in state.error
        assert "--image" in state.error
    else:
        assert state.error == ""


def test_a_malformed_batch_ends_that_pods_capture_with_a_reason() -> None:
    import asyncio
    import io

    from meridio_debug.controller.services.capture import Capture, Options, PcapngSink

    sink = PcapngSink(Writer(None, stream=io.BytesIO()))
    cap = Capture(_FakeRuntime(_FakeAgent(2, 5, cut=10)), Options(), sink, lambda _line: None)
    (state,) = asyncio.run(cap.run(lambda _states: None))
    assert sink.packets == 0
    assert "old-pod: the agent sent a malformed packet batch" in state.error
