"""Capture in real namespaces, read back by real consumers (tshark, capinfos).

Two namespaces joined by a veth; numbered UDP packets go from A to B. The
capture runs through the product's own path (``meridio-debug capture`` ->
agent in each namespace -> gRPC -> pcapng) and the file is checked with
Wireshark's tools: every packet once, in order, on ``POD/IFACE``, with the
right direction. Then the agent's bounds: a stalled client at a high rate, a
hundred disconnects, and bad requests.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meridio_debug.agent import capture
from meridio_debug.controller.errors import AgentCallError
from meridio_debug.controller.runtime.local import LocalRuntime
from meridio_debug.protos import agent_pb2 as pb

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark to read the file back"),
]

CLI = [sys.executable, "-m", "meridio_debug.controller.cli"]
NS_A = f"mdt-cap-{os.getpid()}-a"
NS_B = f"mdt-cap-{os.getpid()}-b"
ADDR_A, ADDR_B = "10.231.0.1", "10.231.0.2"
PORT = 9999


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[str, str]]:
    try:
        sh("ip", "netns", "add", NS_A)
        sh("ip", "netns", "add", NS_B)
        sh(
            "ip",
            "-n",
            NS_A,
            "link",
            "add",
            "va",
            "type",
            "veth",
            "peer",
            "name",
            "vb",
            "netns",
            NS_B,
        )
        sh("ip", "-n", NS_A, "addr", "add", f"{ADDR_A}/24", "dev", "va")
        sh("ip", "-n", NS_B, "addr", "add", f"{ADDR_B}/24", "dev", "vb")
        for ns, dev in ((NS_A, "va"), (NS_B, "vb")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # A static neighbour: no ARP in the way of the first packet.
        mac_b = subprocess.run(
            ["ip", "-n", NS_B, "-br", "link", "show", "vb"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[2]
        sh("ip", "-n", NS_A, "neigh", "replace", ADDR_B, "lladdr", mac_b, "dev", "va")
        yield NS_A, NS_B
    finally:
        subprocess.run(["ip", "netns", "del", NS_A], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", NS_B], check=False, capture_output=True)


def send_udp(ns: str, count: int, start: int = 0, port: int = PORT) -> None:
    """Numbered UDP datagrams ``seq=NNNNNN`` from namespace ``ns`` (A) to B."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"for i in range({start},{start + count}): s.sendto(b'seq=%06d'%i,('{ADDR_B}',{port}))\n"
    )
    sh("ip", "netns", "exec", ns, sys.executable, "-c", code)


class CaptureProcess:
    """``meridio-debug capture`` running in the background, stderr collected."""

    def __init__(self, *args: str, stdout: int | None = subprocess.DEVNULL) -> None:
        self.proc = subprocess.Popen(
            [*CLI, "capture", *args], stdout=stdout, stderr=subprocess.PIPE, text=False
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if "capturing in" in line:
                self.ready.set()
        self.ready.set()

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.ready.wait(timeout), self.stderr
        assert self.proc.poll() is None, self.stderr

    def wait(self, timeout: float = 30.0) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)
            assert self.proc.stderr is not None
            self.proc.stderr.close()
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


def tshark_rows(path: str) -> list[tuple[str, int, str]]:
    """(interface name, direction 1 in / 2 out, udp payload text) per packet, file order."""
    res = subprocess.run(
        ["tshark", "-r", path, "-T", "fields", "-e", "frame.interface_name",
         "-e", "frame.packet_flags_direction", "-e", "data.data"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = []
    for line in res.stdout.splitlines():
        name, direction, data = line.split("\t")
        rows.append((name, int(direction, 16), bytes.fromhex(data).decode()))
    return rows


def capinfos(path: str) -> str:
    return subprocess.run(["capinfos", path], capture_output=True, text=True, check=True).stdout


def expected(n: int, start: int = 0) -> list[str]:
    return [f"seq={i:06d}" for i in range(start, start + n)]


def test_two_pods_into_one_file_every_packet_once_in_order(
    pair: tuple[str, str], tmp_path: Path
) -> None:
    a, b = pair
    out = str(tmp_path / "two.pcapng")
    n = 300
    cap = CaptureProcess(
        "--netns", a, "--netns", b, "-f", f"udp port {PORT}", "-c", str(2 * n), "-w", out
    )
    cap.wait_ready()
    send_udp(a, n)
    assert cap.wait() == 0, cap.stderr
    rows = tshark_rows(out)
    assert len(rows) == 2 * n
    sent_a = [p for name, d, p in rows if name == f"{a}/va" and d == 2]  # outbound in A
    got_b = [p for name, d, p in rows if name == f"{b}/vb" and d == 1]  # inbound in B
    assert sent_a == expected(n)
    assert got_b == expected(n)
    info = capinfos(out)
    assert "Strict time order:   True" in info
    assert "pcapng" in info
    # interface statistics at the end, and the per-pod report on stderr
    assert "Number of stat entries = 1" in info
    assert f"{a}: {n} packets captured; dropped: 0 by the kernel" in cap.stderr
    assert f"{b}: {n} packets captured" in cap.stderr


def test_named_interface_and_stdout_stream_into_tshark(pair: tuple[str, str]) -> None:
    a, _ = pair
    n = 100
    cap = CaptureProcess(
        "--netns", a, "-i", "va", "-f", "udp", "-c", str(n), "-w", "-", stdout=subprocess.PIPE
    )
    assert cap.proc.stdout is not None
    reader = subprocess.Popen(
        ["tshark", "-r", "-", "-T", "fields", "-e", "frame.interface_name", "-e", "data.data"],
        stdin=cap.proc.stdout, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    cap.proc.stdout.close()  # the reader owns the pipe now
    cap.wait_ready()
    send_udp(a, n)
    assert cap.wait() == 0, cap.stderr
    out, _ = reader.communicate(timeout=30)
    assert reader.returncode == 0
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == [f"{a}/va"] * n
    assert [bytes.fromhex(r[1]).decode() for r in rows] == expected(n)


def test_sigint_mid_capture_leaves_a_valid_file(pair: tuple[str, str], tmp_path: Path) -> None:
    a, _ = pair
    out = str(tmp_path / "int.pcapng")
    cap = CaptureProcess("--netns", a, "-f", f"udp port {PORT}", "-w", out)
    cap.wait_ready()
    send_udp(a, 50)
    time.sleep(0.5)
    cap.proc.send_signal(signal.SIGINT)
    assert cap.wait() == 0, cap.stderr
    assert [p for _, _, p in tshark_rows(out)] == expected(50)
    info = capinfos(out)
    assert "Number of packets:   50" in info and "Number of stat entries = 1" in info
    assert "ended: stopped" in cap.stderr


def test_print_decodes_one_line_per_packet(pair: tuple[str, str]) -> None:
    a, _ = pair
    cap = CaptureProcess(
        "--netns", a, "-f", f"udp port {PORT}", "-c", "3", "--print", stdout=subprocess.PIPE
    )
    cap.wait_ready()
    send_udp(a, 3)
    assert cap.proc.stdout is not None
    lines = cap.proc.stdout.read().decode().splitlines()
    cap.proc.stdout.close()
    assert cap.wait() == 0, cap.stderr
    assert len(lines) == 3
    assert f"{a}/va Out IP {ADDR_A}." in lines[0]
    assert f"> {ADDR_B}.{PORT}: UDP, length 10" in lines[0]


def test_rotate_keeps_a_ring_of_valid_files(pair: tuple[str, str], tmp_path: Path) -> None:
    a, _ = pair
    base = str(tmp_path / "ring.pcapng")
    cap = CaptureProcess(
        "--netns",
        a,
        "-f",
        f"udp port {PORT}",
        "-c",
        "400",
        "--rotate",
        "3",
        "--max-bytes",
        "4000",
        "-w",
        base,
    )
    cap.wait_ready()
    send_udp(a, 400)
    assert cap.wait() == 0, cap.stderr
    files = sorted(tmp_path.glob("ring*.pcapng"))
    assert [f.name for f in files] == ["ring0.pcapng", "ring1.pcapng", "ring2.pcapng"]
    payloads = []
    for f in files:
        assert f.stat().st_size <= 4000  # statistics included
        assert "Number of stat entries = 1" in capinfos(str(f)), f.name
        payloads += [p for _, _, p in tshark_rows(str(f))]
    # the ring kept the newest packets, each once
    assert len(payloads) == len(set(payloads))
    assert "seq=000399" in payloads and "seq=000000" not in payloads


# --- the agent's bounds, through the controller's client ----------------------------


def agent_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def flood(ns: str, frames: int, port: int, seconds: float = 30.0) -> int:
    """At least ``frames`` raw Ethernet/IPv4/UDP frames as fast as Python goes, from ``ns`` on va.

    Counted, not timed: on a loaded machine a timed flood may send fewer frames than the
    agent's ring and queue hold, and then nothing is dropped. ``seconds`` only bounds a
    sender that cannot keep up at all. Returns how many were sent.
    """
    code = f"""
import socket, struct, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("va", 0))
ip = bytes.fromhex("4500003200004000401100000ae700010ae70002")
frame = b"\\x02" * 6 + b"\\x02\\x00\\x00\\x00\\x00\\x01\\x08\\x00" + ip + struct.pack("!HHHH", 1234, {port}, 30, 0) + b"A" * 22
n, end = 0, time.monotonic() + {seconds}
while n < {frames} and time.monotonic() < end:
    for _ in range(1000):
        s.send(frame)
    n += 1000
print(n)
"""
    res = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(res.stdout)


def test_stalled_client_bounded_memory_exact_drops_and_resume(pair: tuple[str, str]) -> None:
    a, _ = pair
    port = 7777

    async def scenario() -> None:
        runtime = LocalRuntime.for_netns([a])
        (pod,) = runtime.pods()
        async with runtime.open(pod) as client:
            pid = (await client.get_info()).pid
            stream = client.capture(
                pb.CaptureRequest(interfaces=["va"], filter=f"udp dst port {port}")
            )
            start = await anext(stream)
            assert start.HasField("start")
            # The client stops reading while ~1 M frames/s try to get through.
            # More frames than the ring (RING_BYTES) and the queue together can hold
            # at 64 bytes each, so some must be dropped whatever the machine's speed.
            holdable = (capture.RING_BYTES + capture.QUEUE_BYTES) // 64
            sent = await asyncio.to_thread(flood, a, holdable + 200_000, port)
            hwm_mb = int(agent_status(pid)["VmHWM"].split()[0]) / 1024
            assert hwm_mb < 150, f"agent peak RSS {hwm_mb:.0f} MB"
            received = 0
            # Resume: everything queued comes through, then new packets arrive.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                chunk = await asyncio.wait_for(anext(stream), 10)
                received += len(chunk.batch.meta) // 24
                if chunk.HasField("stats") and received and chunk.stats.packets == received:
                    break
            await asyncio.to_thread(send_udp, a, 20, 0, port)
            await asyncio.sleep(0.3)
            await client.stop_capture(start.start.capture_id)
            final = None
            async for chunk in stream:
                received += len(chunk.batch.meta) // 24
                if chunk.HasField("stats") and chunk.stats.final:
                    final = chunk.stats
            assert final is not None and final.end_reason == "stopped"
            total = sent + 20
            drops = final.agent_drops + final.kernel_drops
            assert drops > 0, "the stalled client should have caused drops"
            # exact accounting: every frame is either delivered or counted as dropped
            assert final.packets == received
            assert received + drops == total, (sent, received, final)
            assert final.kernel_packets == total

    asyncio.run(scenario())


def test_hundred_disconnects_leave_nothing_behind(pair: tuple[str, str]) -> None:
    a, _ = pair

    async def scenario() -> None:
        runtime = LocalRuntime.for_netns([a])
        (pod,) = runtime.pods()
        async with runtime.open(pod) as client:
            pid = (await client.get_info()).pid
            stop = threading.Event()

            def background() -> None:  # traffic, so every capture is mid-stream
                while not stop.is_set():
                    send_udp(a, 50)
                    time.sleep(0.01)

            async def one() -> None:
                stream = client.capture(pb.CaptureRequest(filter=f"udp port {PORT}"))
                await anext(stream)
                await asyncio.sleep(0.02)
                await stream.aclose()  # the client goes away mid-capture

            for _ in range(3):  # warm-up: the agent's worker threads exist from here on
                await one()
            await asyncio.sleep(0.5)
            fds, threads = fd_count(pid), int(agent_status(pid)["Threads"])
            sender = threading.Thread(target=background, daemon=True)
            sender.start()
            try:
                for _ in range(100):
                    await one()
            finally:
                stop.set()
                await asyncio.to_thread(sender.join, 10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                now = (fd_count(pid), int(agent_status(pid)["Threads"]))
                if now == (fds, threads):
                    break
                await asyncio.sleep(0.2)
            assert (fd_count(pid), int(agent_status(pid)["Threads"])) == (fds, threads)
            assert (await client.get_info()).pid == pid

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("request_kwargs", "code", "text"),
    [
        ({"filter": "udp port"}, "INVALID_ARGUMENT", "syntax error"),
        ({"filter": "hst 10.0.0.1"}, "INVALID_ARGUMENT", "invalid filter"),
        ({"interfaces": ["nope0"]}, "NOT_FOUND", "it has: lo, va"),
        ({"interfaces": ["any", "va"]}, "INVALID_ARGUMENT", "'any'"),
        ({"duration_s": -1}, "INVALID_ARGUMENT", "duration_s"),
        ({"duration_s": 1e9}, "INVALID_ARGUMENT", "duration_s"),
        ({"snaplen": 10_000_000}, "INVALID_ARGUMENT", "snaplen"),
        ({"max_bytes": 1 << 50}, "INVALID_ARGUMENT", "max_bytes"),
        ({"block_timeout_ms": 5000}, "INVALID_ARGUMENT", "block_timeout_ms must be at most 1000"),
    ],
)
def test_bad_requests_get_precise_statuses_and_the_agent_serves_on(
    pair: tuple[str, str], request_kwargs: dict[str, object], code: str, text: str
) -> None:
    a, _ = pair

    async def scenario() -> None:
        runtime = LocalRuntime.for_netns([a])
        (pod,) = runtime.pods()
        async with runtime.open(pod) as client:
            with pytest.raises(AgentCallError) as err:
                async for _ in client.capture(pb.CaptureRequest(**request_kwargs)):  # type: ignore[arg-type]
                    pass
            assert f"Capture failed: {code}" in str(err.value)
            assert text in str(err.value)
            info = await client.get_info()
            assert "capture" in info.capabilities
            # and it still captures
            stream = client.capture(pb.CaptureRequest(duration_s=0.2))
            chunks = [c async for c in stream]
            assert chunks[0].HasField("start") and chunks[-1].stats.end_reason == "duration"

    asyncio.run(scenario())
