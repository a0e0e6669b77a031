"""Packet dissection by scapy (controller/packets/dissect.py) against tcpdump on the same frames.

Why: ``capture --print`` and the active trace dissect packets with scapy, which
is imported on the first frame and dissects each frame in Python. This prints
what the first frame costs (the scapy import) in a fresh process, the cost per
frame of a summary line and of the trace's decode, and, as the baseline of the
same run, ``tcpdump -nr`` printing the same frames from a pcap file (process
start included, so it favours scapy on few frames).

    .venv/bin/python bench/packets_bench.py [--frames 3000]
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys, time
frames = [bytes.fromhex(line) for line in sys.stdin.read().split()]
start = time.perf_counter()
from meridio_debug.controller.packets import dissect as packets
packets.summarize(frames[0])
first = time.perf_counter() - start
start = time.perf_counter()
for f in frames:
    packets.summarize(f)
summ = time.perf_counter() - start
start = time.perf_counter()
for f in frames:
    packets.decode(f)
dec = time.perf_counter() - start
print(first * 1000, summ * 1000, dec * 1000)
"""


def frames(n: int) -> list[bytes]:
    """Ethernet frames of the kinds a trace captures: TCP SYN, UDP and ICMP, v4 and v6."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests" / "unit"))
    from test_probe_packets import EXPECTED

    out = []
    for packet in (bytes.fromhex(h) for h in EXPECTED.values()):
        ethertype = b"\x08\x00" if packet[0] >> 4 == 4 else b"\x86\xdd"
        out.append(b"\x02" * 6 + b"\x04" * 6 + ethertype + packet)
    return (out * (n // len(out) + 1))[:n]


def write_pcap(path: str, data: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i, frame in enumerate(data):
            f.write(struct.pack("<IIII", i, 0, len(frame), len(frame)) + frame)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=3000)
    args = parser.parse_args()
    if args.frames < 1:
        print("--frames: at least 1", file=sys.stderr)
        return 2
    data = frames(args.frames)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        input="\n".join(f.hex() for f in data),
        capture_output=True,
        text=True,
        check=True,
    )
    first_ms, summ_ms, dec_ms = (float(x) for x in proc.stdout.split())
    n = len(data)
    print(f"{n} frames (TCP SYN, UDP, ICMP echo; IPv4 and IPv6)")
    print(f"first frame in a fresh process (imports scapy): {first_ms:.0f} ms")
    print(f"summary line (capture --print): {summ_ms * 1000 / n:.0f} us/frame")
    print(f"decode (active trace): {dec_ms * 1000 / n:.0f} us/frame")
    tcpdump = shutil.which("tcpdump")
    if tcpdump:
        with tempfile.NamedTemporaryFile(suffix=".pcap") as pcap:
            write_pcap(pcap.name, data)
            start = time.perf_counter()
            subprocess.run([tcpdump, "-nr", pcap.name], capture_output=True, check=True)
            base_ms = (time.perf_counter() - start) * 1000
        print(f"tcpdump -nr, same frames, process included: {base_ms * 1000 / n:.0f} us/frame; "
              f"ratio summary/tcpdump {summ_ms / base_ms:.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
