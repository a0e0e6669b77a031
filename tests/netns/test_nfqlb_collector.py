"""The nfqlb collector against a stand-in nfqlb in a throw-away namespace.

nfqlb is not packaged here, so a small script named ``nfqlb`` plays the LB:
it serves nfqlb's flow protocol on the abstract socket ``@nfqlb`` of its
namespace and owns a ``tshm-*`` file laid out like nfqlb 1.x's. Its
/proc/PID/exe is the Python interpreter, which cannot answer ``flow-list``
or ``show``, so this exercises the paths a real pod takes when the LB's
binary cannot run in the agent: the flow socket and the shm decoder, found
through process discovery in the pod's netns.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

FAKE_NFQLB = """\
#!{python}
import socket, sys
flows = open(sys.argv[2]).read().encode()
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind("\\0nfqlb")
srv.listen(8)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    data = b""
    while not data.endswith(b"eoc:\\n"):
        chunk = conn.recv(100)
        if not chunk:
            break
        data += chunk
    if data.startswith(b"action:list\\n"):
        conn.sendall(flows)
    else:
        conn.sendall(b"FAIL: read-only test double\\0")
    conn.close()
"""

COLLECT = """\
from google.protobuf.json_format import MessageToJson
from meridio_debug.agent.collectors import run_collectors
from meridio_debug.agent.collectors.nfqlb import NfqlbCollector
from meridio_debug.protos import agent_pb2 as pb
snap = pb.Snapshot()
run_collectors([NfqlbCollector(timeout=3.0)], snap)
print(MessageToJson(snap))
"""


def shm_bytes(m: int, n: int, active: dict[int, int]) -> bytes:
    length = 24 + 4 * (m + n)
    body = struct.pack("=III", m, n, length) + struct.pack(f"={m}i", *([-1] * m))
    body += struct.pack(f"={n}i", *[active.get(i, -1) for i in range(n)])
    return struct.pack("=ii", 0, 0) + body + b"\0" * (length - len(body))


def collect_in(ns: str) -> dict:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", COLLECT],
        capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    return json.loads(done.stdout)


def test_nfqlb_collector_in_pod_netns():
    tag = f"mdt-nfqlb-{os.getpid()}"
    ns, other = f"{tag}-a", f"{tag}-b"
    stream = f"tshm-{tag}-stream-a"
    shm = Path("/dev/shm") / stream
    proc: subprocess.Popen[bytes] | None = None
    created: list[str] = []
    with tempfile.TemporaryDirectory(prefix=tag) as tmp:
        try:
            for name in (ns, other):
                subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
                created.append(name)
            flows = [
                {
                    "name": f"{stream}-flow-a",
                    "priority": 1,
                    "protocols": ["tcp", "udp"],
                    "dests": ["::ffff:20.0.0.1/128", "2000::1/128"],
                    "dports": ["4000-4003"],
                    "matches_count": 17,
                    "user_ref": stream,
                }
            ]
            (Path(tmp) / "flows.json").write_text(json.dumps(flows))
            shm.write_bytes(shm_bytes(997, 32, {0: 5001, 1: 5002}))
            script = Path(tmp) / "nfqlb"
            script.write_text(FAKE_NFQLB.format(python=sys.executable))
            script.chmod(0o755)
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, str(script), "flowlb", str(Path(tmp) / "flows.json")],
                stdout=subprocess.PIPE,
            )
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"

            start = time.monotonic()
            snap = collect_in(ns)
            assert time.monotonic() - start < 20
            section = next(s for s in snap["sections"] if s["name"] == "nfqlb")
            assert section["state"] == "OK", section
            out = snap["nfqlb"]
            assert out["pid"] == proc.pid
            assert out["cmdline"][-2] == "flowlb"
            (flow,) = out["flows"]
            assert flow["dests"] == ["20.0.0.1/32", "2000::1/128"]
            assert flow["matchesCount"] == "17"
            shms = {s["name"]: s for s in out["shms"]}
            got = shms[stream]
            assert (got["m"], got["n"]) == (997, 32)
            assert got["active"] == [{"fwmark": 5001}, {"fwmark": 5002, "index": 1}]

            # Another namespace on the same host: its nfqlb is not ours.
            snap = collect_in(other)
            section = next(s for s in snap["sections"] if s["name"] == "nfqlb")
            assert section["state"] == "ABSENT"
            assert "nfqlb not running" in section["message"]
        finally:
            if proc is not None:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=5)
                if proc.stdout is not None:
                    proc.stdout.close()
            shm.unlink(missing_ok=True)
            for name in created:
                subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 missing")
def test_no_leftovers():
    """Namespaces of this module are gone once its tests ran."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert f"mdt-nfqlb-{os.getpid()}" not in out.stdout
