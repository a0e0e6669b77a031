"""The nftables, processes and sockets collectors, without root.

nft runs here as a fake executable (a script replaying a real recording) so
the collector's real subprocess path is exercised; the recordings are
``nft -j list ruleset`` of nftables 1.0.6 with shared/lab-examples/lb.nft
loaded in a scratch namespace (data/nft/).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict

from meridio_debug.agent.collectors import nftables, procs, sockdiag
from meridio_debug.agent.errors import CollectorError
from meridio_debug.protos import agent_pb2 as pb

DATA = Path(__file__).parent / "data" / "nft"

# Recorded: `setpriv --reuid=65534 --regid=65534 --clear-groups nft -j list ruleset`
# on nftables 1.0.6 (exit status 1).
NFT_EPERM_STDERR = (
    "Operation not permitted (you must be root)\n"
    "netlink: Error: cache initialization failed: Operation not permitted\n"
)


def fake_nft(tmp_path: Path, body: str) -> str:
    """An executable standing in for nft; it logs its argv to argv.log."""
    script = tmp_path / "nft"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/argv.log\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


# --------------------------------------------------------------------------
# nftables


def test_lb_ruleset_lands_in_the_struct(tmp_path: Path):
    recorded = DATA / "lb_ruleset.json"
    nft = fake_nft(tmp_path, f"cat {recorded}")
    snap = pb.Snapshot()
    nftables.NftablesCollector(nft=nft).collect(snap)

    assert (tmp_path / "argv.log").read_text() == "-j list ruleset\n"  # read-only command
    items = snap.nftables["nftables"]
    tables = [i["table"]["name"] for i in items if "table" in i]
    assert tables == ["meridio-nfqlb", "meridio-defrag"]
    sets = {i["set"]["name"]: list(i["set"]["elem"]) for i in items if "set" in i}
    assert sets == {"ipv4-vips": ["20.0.0.1"], "ipv6-vips": ["2000::1"]}
    chains = {(i["chain"]["table"], i["chain"]["name"]) for i in items if "chain" in i}
    assert ("meridio-defrag", "pre-defrag") in chains
    # the Struct holds the recorded JSON as it is (numbers as doubles compare equal)
    assert MessageToDict(snap.nftables) == json.loads(recorded.read_text())


def test_empty_ruleset(tmp_path: Path):
    nft = fake_nft(tmp_path, f"cat {DATA / 'empty_ruleset.json'}")
    snap = pb.Snapshot()
    nftables.NftablesCollector(nft=nft).collect(snap)
    assert [dict(i).keys() for i in snap.nftables["nftables"]] == [{"metainfo": 0}.keys()]


def test_no_output_is_an_empty_ruleset():
    assert nftables.parse_ruleset_json("") == {"nftables": []}


@pytest.mark.parametrize(("text", "match"), [("{", "invalid JSON"), ("[]", "'nftables' array")])
def test_bad_json(text: str, match: str):
    with pytest.raises(CollectorError, match=match):
        nftables.parse_ruleset_json(text)


def test_permission_denied_says_what_is_needed(tmp_path: Path):
    stderr = tmp_path / "stderr.txt"
    stderr.write_text(NFT_EPERM_STDERR)
    nft = fake_nft(tmp_path, f"cat {stderr} >&2; exit 1")
    with pytest.raises(CollectorError) as info:
        nftables.NftablesCollector(nft=nft).collect(pb.Snapshot())
    assert "permission denied" in str(info.value)
    assert "CAP_NET_ADMIN" in str(info.value)
    assert "cache initialization failed" in str(info.value)


def test_missing_nft_says_install_it(tmp_path: Path):
    collector = nftables.NftablesCollector(nft=str(tmp_path / "no-such-nft"))
    with pytest.raises(
        CollectorError, match=r"^nft not found: install nftables in the agent image$"
    ):
        collector.collect(pb.Snapshot())


def test_missing_nft_on_path(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(nftables, "find_nft", lambda: None)
    monkeypatch.setattr(nftables, "libnftables", lambda: None)
    collector = nftables.NftablesCollector()
    assert collector.available() == (False, nftables.NFT_NOT_FOUND)
    with pytest.raises(CollectorError, match="nft not found"):
        collector.collect(pb.Snapshot())


def test_hanging_nft_times_out(tmp_path: Path):
    nft = fake_nft(tmp_path, "exec sleep 30")
    with pytest.raises(CollectorError, match="no answer within"):
        nftables.NftablesCollector(nft=nft, timeout=0.3).collect(pb.Snapshot())


# --------------------------------------------------------------------------
# netns filtering


def test_select_same_netns_keeps_own_namespace_without_the_agent():
    candidates = [(1, 100), (2, 200), (3, 100), (4, None), (5, 100)]
    assert procs.select_same_netns(candidates, own_inode=100, own_pid=3) == [1, 5]
    assert procs.select_same_netns(candidates, own_inode=None, own_pid=3) == []


def test_netns_inode_of_self_and_of_a_missing_pid():
    assert procs.netns_inode() == os.stat("/proc/self/ns/net").st_ino
    assert procs.netns_inode(2**30) is None


# --------------------------------------------------------------------------
# processes


def test_processes_lists_a_child_but_not_the_agent():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        snap = pb.Snapshot()
        procs.ProcessesCollector().collect(snap)
    finally:
        child.kill()
        child.wait()
    by_pid = {p.pid: p for p in snap.processes}
    assert os.getpid() not in by_pid
    mine = by_pid[child.pid]
    assert mine.ppid == os.getpid()
    assert mine.cmdline[-1] == "import time; time.sleep(30)"
    assert mine.rss_mb > 0 and mine.create_time > 0
    assert mine.exe and mine.user


def test_process_to_pb_tolerates_denied_fields():
    msg = procs.process_to_pb(
        {"pid": 7, "ppid": 1, "name": "bird", "cmdline": None, "exe": None,
         "username": None, "memory_info": None, "create_time": None}
    )  # fmt: skip
    assert (msg.pid, msg.ppid, msg.name, list(msg.cmdline), msg.exe) == (7, 1, "bird", [], "")


# --------------------------------------------------------------------------
# sockets


def _diag_message(
    family: int, state: int, src: str, sport: int, dst: str, dport: int, inode: int
) -> bytes:
    """One SOCK_DIAG_BY_FAMILY answer as the kernel lays it out (inet_diag_msg)."""

    def addr(text: str) -> bytes:
        return socket.inet_pton(family, text).ljust(16, b"\0")

    body = struct.pack("=BBBB", family, state, 0, 0) + struct.pack(">HH", sport, dport)
    body += addr(src) + addr(dst) + struct.pack("=I8sIIIII", 0, b"", 0, 0, 0, 0, inode)
    return struct.pack("=IHHII", 16 + len(body), sockdiag.SOCK_DIAG_BY_FAMILY, 2, 1, 0) + body


@pytest.mark.parametrize(
    ("family", "sock_type", "message", "expected"),
    [
        (socket.AF_INET, socket.SOCK_STREAM,
         _diag_message(socket.AF_INET, 1, "169.254.100.2", 10179, "169.254.100.150", 40000, 7),
         sockdiag.RawSocket(socket.AF_INET, socket.SOCK_STREAM, "169.254.100.2", 10179,
                            "169.254.100.150", 40000, "ESTABLISHED", 7)),
        (socket.AF_INET6, socket.SOCK_STREAM,
         _diag_message(socket.AF_INET6, 10, "::", 10179, "::", 0, 8),
         sockdiag.RawSocket(socket.AF_INET6, socket.SOCK_STREAM, "::", 10179, "", 0,
                            "LISTEN", 8)),
        (socket.AF_INET6, socket.SOCK_DGRAM,
         _diag_message(socket.AF_INET6, 7, "2000::1", 4000, "::", 0, 9),
         sockdiag.RawSocket(socket.AF_INET6, socket.SOCK_DGRAM, "2000::1", 4000, "", 0,
                            "NONE", 9)),
    ],
)  # fmt: skip
def test_sock_diag_answers_read_as_psutil_showed_them(family, sock_type, message, expected):
    done = struct.pack("=IHHIIi", 20, sockdiag.NLMSG_DONE, 2, 1, 0, 0)
    assert sockdiag.parse_inet(message + done, sock_type) == ([expected], True)


def test_sock_diag_kernel_error_is_a_collector_error():
    error = struct.pack("=IHHIIi", 36, sockdiag.NLMSG_ERROR, 0, 1, 0, -errno.EPERM) + bytes(16)
    with pytest.raises(CollectorError, match="not permitted"):
        sockdiag.parse_inet(error, socket.SOCK_STREAM)


def test_sockets_include_our_listeners_with_owner(tmp_path: Path):
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        port = tcp.getsockname()[1]
        path = str(tmp_path / "agent-test.sock")
        unix.bind(path)
        unix.listen(1)
        snap = pb.Snapshot()
        procs.SocketsCollector().collect(snap)
    finally:
        tcp.close()
        unix.close()
    listener = [s for s in snap.sockets if s.type == "tcp" and s.lport == port]
    assert len(listener) == 1
    assert (listener[0].family, listener[0].laddr, listener[0].status) == (
        "inet",
        "127.0.0.1",
        "LISTEN",
    )
    assert listener[0].pid == os.getpid()
    assert listener[0].process
    assert any(s.family == "unix" and s.laddr == path for s in snap.sockets)


def test_one_scan_reads_proc_once_per_snapshot(tmp_path):
    """Four collectors ask for the netns's pids; inside one snapshot /proc is scanned once."""
    (tmp_path / "self" / "ns").mkdir(parents=True)
    own = tmp_path / "self" / "ns" / "net"
    own.write_text("")
    member = tmp_path / "1" / "ns"
    member.mkdir(parents=True)
    os.link(own, member / "net")  # same inode: pid 1 "shares our netns"

    with procs.one_scan():
        assert procs.pids_in_own_netns(str(tmp_path)) == [1]
        (member / "net").unlink()  # pid 1 leaves: not seen until the next snapshot
        assert procs.pids_in_own_netns(str(tmp_path)) == [1]
    assert procs.pids_in_own_netns(str(tmp_path)) == []
