"""The agent in a real namespace, reached by the CLI through the local runtime.

Everything here runs the real code path a user runs: ``meridio-debug`` as a
process, which starts the agent inside the namespace (forked by the agent
launcher, tests/netns/test_launcher.py) and talks gRPC over a unix socket.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

CLI = [sys.executable, "-m", "meridio_debug.controller.cli"]
NS = f"mdt-ag-{os.getpid()}"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    sh("ip", "netns", "add", NS)
    try:
        sh("ip", "-n", NS, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        sh("ip", "-n", NS, "link", "set", "v0", "up")
        sh("ip", "-n", NS, "link", "set", "v1", "up")
        sh("ip", "-n", NS, "addr", "add", "10.77.0.1/24", "dev", "v0")
        sh("ip", "-n", NS, "rule", "add", "fwmark", "5001", "lookup", "5001")
        sh("ip", "-n", NS, "route", "add", "default", "via", "10.77.0.2", "table", "5001")
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False)


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], check=False, capture_output=True, text=True, timeout=timeout
    )


def test_snapshot_json_has_every_section_and_the_fwmark_table(netns: str) -> None:
    res = run_cli("snapshot", "--netns", netns, "-o", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    (pod,) = doc["pods"]
    for key in (
        "links",
        "addresses",
        "rules",
        "routes",
        "neighbours",
        "fdb",
        "sysctls",
        "nftables",
        "sockets",
        "processes",
        "bird",
        "nfqlb",
    ):
        assert key in pod
    status = {s["name"]: s["state"] for s in pod["section_status"]}
    for key in ("links", "addresses", "rules", "routes", "neighbours", "sysctls"):
        assert status[key] == "OK", pod["section_status"]
    assert status["bird"] == "ABSENT" and status["nfqlb"] == "ABSENT"
    assert {"name": "v0"}.items() <= next(lk for lk in pod["links"] if lk["name"] == "v0").items()
    rule = next(r for r in pod["rules"] if r["fwmark"] == 5001)
    assert rule["table"] == 5001
    route = next(r for r in pod["routes"] if r["table"] == 5001)
    assert route["dst"] == "default" and route["gateway"] == "10.77.0.2"
    assert isinstance(pod["links"][0]["stats"]["rx_bytes"], int)


def test_snapshot_table_is_readable(netns: str) -> None:
    res = run_cli("snapshot", "--netns", netns, "--section", "rules", "--section", "routes")
    assert res.returncode == 0, res.stderr
    assert "fwmark 0x1389 lookup 5001" in res.stdout
    assert "table 5001 v4:" in res.stdout and "default via 10.77.0.2" in res.stdout


def test_missing_namespace_is_one_line_and_not_created() -> None:
    name = f"mdt-none-{os.getpid()}"
    res = run_cli("snapshot", "--netns", name)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0]
    assert not Path(f"/run/netns/{name}").exists()


def test_unknown_section_is_usage_error(netns: str) -> None:
    res = run_cli("snapshot", "--netns", netns, "--section", "bogus")
    assert res.returncode == 2  # found by the CLI, before any agent starts
    assert "invalid choice: 'bogus'" in res.stderr and res.stderr.count("\n") == 1


def test_no_target_is_usage_error() -> None:
    res = run_cli("snapshot")
    assert res.returncode == 2 and "exactly one of --lab" in res.stderr


def test_watch_streams_changes_in_order(netns: str) -> None:
    with subprocess.Popen(
        [*CLI, "watch", "--netns", netns, "-o", "json", "--duration", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stderr is not None and proc.stdout is not None
        try:
            line = proc.stderr.readline()  # "watching ... (Ctrl-C to stop)" once subscribed
            assert "watching" in line, line
            sh("ip", "-n", netns, "route", "add", "10.88.0.0/24", "via", "10.77.0.2", "table", "77")
            sh("ip", "-n", netns, "route", "del", "10.88.0.0/24", "table", "77")
            events = []
            deadline = time.monotonic() + 10
            while len(events) < 2 and time.monotonic() < deadline:
                out = proc.stdout.readline()
                if not out:
                    break
                ev = json.loads(out)
                if ev["kind"] == "route" and ev["object"]["table"] == 77:
                    events.append(ev)
            assert [e["action"] for e in events] == ["new", "del"]
            assert events[0]["object"]["dst"] == "10.88.0.0/24"
            assert events[0]["seq"] < events[1]["seq"]
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(10)
    assert proc.returncode == 0


def test_watch_fdb_shows_bridge_port_changes(netns: str) -> None:
    """A proxy's bridge learning or losing a target's MAC is an fdb event (``bridge monitor fdb``)."""
    sh("ip", "-n", netns, "link", "add", "mdtbr0", "type", "bridge")
    try:
        sh("ip", "-n", netns, "link", "set", "v1", "master", "mdtbr0")
        with subprocess.Popen(
            [*CLI, "watch", "--netns", netns, "--kind", "fdb", "-o", "json", "--duration", "20"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            assert proc.stderr is not None and proc.stdout is not None
            try:
                assert "watching" in proc.stderr.readline()
                mac = "02:00:00:00:77:01"
                sh("bridge", "-n", netns, "fdb", "add", mac, "dev", "v1", "master", "static")
                sh("bridge", "-n", netns, "fdb", "del", mac, "dev", "v1", "master", "static")
                events = []
                deadline = time.monotonic() + 10
                while len(events) < 2 and time.monotonic() < deadline:
                    ev = json.loads(proc.stdout.readline())
                    assert ev["kind"] == "fdb", ev
                    if mac in ev["summary"]:
                        events.append(ev)
                assert [e["action"] for e in events] == ["new", "del"]
                assert "dev v1 master mdtbr0 static" in events[0]["summary"]
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(10)
        assert proc.returncode == 0
    finally:
        sh("ip", "-n", netns, "link", "del", "mdtbr0")


def test_agent_start_to_serving_and_section_timings_are_reported(netns: str) -> None:
    res = run_cli("snapshot", "--netns", netns, "-o", "json")
    pod = json.loads(res.stdout)["pods"][0]
    assert pod["agent"]["protocol_version"] >= 1
    assert {c["name"] for c in pod["agent"]["collectors"]} >= {"links", "routes", "bird"}
    assert all(s["duration_ms"] >= 0 for s in pod["section_status"])


def test_nftables_in_process_is_what_the_nft_binary_prints(netns: str) -> None:
    """The agent reads the ruleset through libnftables; it must equal ``nft -j list ruleset``."""
    from meridio_debug.agent.collectors import nftables
    from meridio_debug.protos import agent_pb2 as pb

    if nftables.libnftables() is None or nftables.find_nft() is None:
        pytest.skip("needs libnftables and the nft binary")
    sh("ip", "netns", "exec", netns, "nft", "add table inet mdt-lib")
    sh("ip", "netns", "exec", netns, "nft", "add set inet mdt-lib vips { type ipv4_addr; }")
    sh("ip", "netns", "exec", netns, "nft", "add element inet mdt-lib vips { 20.0.0.1 }")
    script = (
        "from meridio_debug.agent.collectors import nftables as n;"
        "from meridio_debug.protos import agent_pb2 as pb;"
        "import sys;"
        "lib, binary = pb.Snapshot(), pb.Snapshot();"
        "n.NftablesCollector().collect(lib);"
        "n.NftablesCollector(nft=n.find_nft()).collect(binary);"
        "sys.stdout.buffer.write(lib.SerializeToString() + b'|||' + binary.SerializeToString())"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", script],
        check=True,
        capture_output=True,
    ).stdout
    lib_bytes, bin_bytes = out.split(b"|||")
    lib, binary = pb.Snapshot.FromString(lib_bytes), pb.Snapshot.FromString(bin_bytes)
    assert lib.nftables == binary.nftables
    assert "mdt-lib" in str(lib.nftables)
    sh("ip", "netns", "exec", netns, "nft", "delete table inet mdt-lib")
