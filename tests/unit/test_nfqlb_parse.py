"""Parsing nfqlb output, against outputs published by Meridio and nfqlb themselves.

nfqlb is not packaged on this machine, so the test data are real outputs
copied from the projects' documentation (sources named above each one), plus
inputs built from nfqlb's printing code where no published output exists.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path

import pytest

from meridio_debug.agent import ephemeral
from meridio_debug.agent.collectors import nfqlb
from meridio_debug.agent.errors import CollectorError, SectionAbsent
from meridio_debug.protos import agent_pb2 as pb

# Nordix/Meridio docs/dataplane/stateless-lb-frontend.md ("List flows"), Meridio v1.x.
FLOW_LIST_DATAPLANE_DOC = """\
[{
  "name": "tshm-stream-a-i-flow-a-z-tcp",
  "priority": 1,
  "protocols": [ "tcp" ],
  "dests": [
    "::ffff:20.0.0.1/128",
    "2000::1/128"
  ],
  "dports": [
    "4000"
  ],
  "matches_count": 0,
  "user_ref": "tshm-stream-a-i"
}]
"""

# Same document ("List registered targets in stream-a-i"). The first line is
# printed as "m:" in the doc (the "Sh" of "Shm:" is cut off there).
SHOW_DATAPLANE_DOC = """\
m: tshm-stream-a-i
  Fw: own=0
  Maglev: M=9973, N=100
   Lookup: 68 68 68 72 43 61 43 61 72 61 61 72 43 68 61 61 43 43 43 61 72 68 61 43 43...
   Active: 5044(43) 5062(61) 5069(68) 5073(72)
"""

# Nordix/Meridio docs/trouble-shooting/README.md ("Nfqlb"), pre-v0.9 fwmarks.
FLOW_LIST_TROUBLESHOOTING_DOC = """\
[{
  "name": "tshm-stream1-flow1",
  "priority": 0,
  "protocols": [ "tcp" ],
  "dests": [
    "::ffff:10.0.0.1/128",
    "1000::1:a00:1/128"
  ],
  "dports": [
    "5000-5003"
  ],
  "matches_count": 540,
  "user_ref": "tshm-stream1"
}]
"""

SHOW_TROUBLESHOOTING_DOC = """\
Shm: tshm-stream1
  Fw: own=0
  Maglev: M=9973, N=100
   Lookup: 57 57 57 57 57 57 66 89 57 57 66 57 89 57 66 57 57 89 66 89 57 66 66 57 89...
   Active: 48(47) 58(57) 67(66) 90(89)
"""

# Nordix/nfqueue-loadbalancer test/ovl/nfqlb/test-functions.md ("Load-balancer tier").
SHOW_LB_TIER = """\
Shm: nfqlbLb
  Fw: own=203
  Maglev: M=397, N=10
   Lookup: 2 1 1 1 1 0 0 1 1 0 1 0 1 1 2 0 1 0 2 1 0 0 0 2 0...
   Active: 201(0) 202(1) 203(2)
"""

# Nordix/nfqueue-loadbalancer flow.md ("Udp encapsulated sctp"): an older
# nfqlb without matches_count; the "#sctp" flow is added by nfqlb itself.
FLOW_LIST_SCTP_UDPENCAP = """\
[{
  "name": "#sctp",
  "priority": 100,
  "protocols": [ "udp" ],
  "dests": [
    "::ffff:10.0.0.0/128",
    "1000::/128"
  ],
  "dports": [
    "9899"
  ],
  "udpencap": 9899,
  "user_ref": "NULL"
},
{
  "name": "sctp",
  "priority": 100,
  "protocols": [ "sctp" ],
  "dests": [
    "::ffff:10.0.0.0/128",
    "1000::/128"
  ],
  "dports": [
    "6000"
  ],
  "udpencap": 9899,
  "user_ref": "nfqlb"
}]
"""

# Built from nfqueue-loadbalancer src/lib/flow.c printFlow() (nfqlb 1.1+):
# srcs/sports/match arrays, matches_count always printed. No published
# output with byte matches exists; this is what that code prints.
FLOW_LIST_ALL_FIELDS = """\
[{
  "name": "tshm-stream-b-flow-x",
  "priority": 7,
  "protocols": [ "tcp", "udp" ],
  "dests": [
    "::ffff:20.0.0.0/120",
    "2000::/112"
  ],
  "dports": [
    "4000-4003",
    "5001"
  ],
  "srcs": [
    "::ffff:200.100.0.0/112",
    "::/0"
  ],
  "sports": [
    "1024-65535"
  ],
  "match": [
    "tcp[2:2] = 5001",
    "tcp[0:4] & 0x0000ffff = 5001"
  ],
  "matches_count": 4294967295,
  "user_ref": "tshm-stream-b"
}]
"""


# --------------------------------------------------------------------------
# addresses


@pytest.mark.parametrize(
    ("printed", "normal"),
    [
        ("::ffff:20.0.0.1/128", "20.0.0.1/32"),
        ("::ffff:20.0.0.0/120", "20.0.0.0/24"),
        ("::ffff:0.0.0.0/96", "0.0.0.0/0"),
        ("2000::1/128", "2000::1/128"),
        ("1000::1:a00:1/128", "1000::1:a00:1/128"),
        ("::/0", "::/0"),
        ("::ffff:0:0/80", "::ffff:0:0/80"),  # wider than the mapped range: left alone
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_normalise_cidr(printed: str, normal: str):
    assert nfqlb.normalise_cidr(printed) == normal


# --------------------------------------------------------------------------
# flow-list


def test_flow_list_from_meridio_dataplane_doc():
    (flow,) = nfqlb.parse_flow_list(FLOW_LIST_DATAPLANE_DOC)
    assert flow.name == "tshm-stream-a-i-flow-a-z-tcp"
    assert flow.priority == 1
    assert list(flow.protocols) == ["tcp"]
    assert list(flow.dests) == ["20.0.0.1/32", "2000::1/128"]
    assert list(flow.dports) == ["4000"]
    assert list(flow.srcs) == [] and list(flow.sports) == []
    assert flow.matches_count == 0
    assert flow.user_ref == "tshm-stream-a-i"
    assert flow.match == "" and not flow.udpencap


def test_flow_list_from_meridio_troubleshooting_doc():
    (flow,) = nfqlb.parse_flow_list(FLOW_LIST_TROUBLESHOOTING_DOC)
    assert list(flow.dests) == ["10.0.0.1/32", "1000::1:a00:1/128"]
    assert list(flow.dports) == ["5000-5003"]
    assert flow.matches_count == 540


def test_flow_list_with_udpencap_and_no_matches_count():
    flows = nfqlb.parse_flow_list(FLOW_LIST_SCTP_UDPENCAP)
    assert [f.name for f in flows] == ["#sctp", "sctp"]
    assert all(f.udpencap for f in flows)
    assert flows[0].user_ref == "NULL"
    assert flows[1].matches_count == 0
    assert list(flows[1].dests) == ["10.0.0.0/32", "1000::/128"]


def test_flow_list_every_field():
    (flow,) = nfqlb.parse_flow_list(FLOW_LIST_ALL_FIELDS)
    assert list(flow.protocols) == ["tcp", "udp"]
    assert list(flow.dests) == ["20.0.0.0/24", "2000::/112"]
    assert list(flow.dports) == ["4000-4003", "5001"]
    assert list(flow.srcs) == ["200.100.0.0/16", "::/0"]
    assert list(flow.sports) == ["1024-65535"]
    assert flow.match == "tcp[2:2] = 5001, tcp[0:4] & 0x0000ffff = 5001"
    assert flow.matches_count == 4294967295


@pytest.mark.parametrize("empty", ["", "[]\n", "\n"])
def test_flow_list_empty(empty: str):
    assert nfqlb.parse_flow_list(empty) == []


def test_flow_list_single_object_for_name_query():
    one = FLOW_LIST_DATAPLANE_DOC.strip()[1:-1]  # `flow-list --name=` prints a bare object
    assert [f.name for f in nfqlb.parse_flow_list(one)] == ["tshm-stream-a-i-flow-a-z-tcp"]


@pytest.mark.parametrize(
    ("text", "match"),
    [("FAIL: action unknown", "FAIL: action unknown"), ("[{", "invalid JSON"), ("[1]", "flow")],
)
def test_flow_list_errors(text: str, match: str):
    with pytest.raises(CollectorError, match=match):
        nfqlb.parse_flow_list(text)


# --------------------------------------------------------------------------
# show --shm


def test_show_from_meridio_dataplane_doc():
    shm = nfqlb.parse_show(SHOW_DATAPLANE_DOC, "tshm-stream-a-i")
    assert (shm.name, shm.m, shm.n) == ("tshm-stream-a-i", 9973, 100)
    assert [(a.fwmark, a.index) for a in shm.active] == [
        (5044, 43),
        (5062, 61),
        (5069, 68),
        (5073, 72),
    ]
    assert shm.raw == SHOW_DATAPLANE_DOC


def test_show_takes_name_from_output_when_not_given():
    assert nfqlb.parse_show(SHOW_TROUBLESHOOTING_DOC).name == "tshm-stream1"
    assert nfqlb.parse_show(SHOW_DATAPLANE_DOC).name == "tshm-stream-a-i"


def test_show_troubleshooting_and_lb_tier():
    shm = nfqlb.parse_show(SHOW_TROUBLESHOOTING_DOC, "tshm-stream1")
    assert [a.fwmark for a in shm.active] == [48, 58, 67, 90]
    assert [a.index for a in shm.active] == [47, 57, 66, 89]
    tier = nfqlb.parse_show(SHOW_LB_TIER, "nfqlbLb")
    assert (tier.m, tier.n) == (397, 10)
    assert [(a.fwmark, a.index) for a in tier.active] == [(201, 0), (202, 1), (203, 2)]


def test_show_no_targets_has_empty_active():
    text = "Shm: tshm-s\n  Fw: own=0\n  Maglev: M=9973, N=100\n   Lookup: -1 -1...\n   Active:\n"
    assert list(nfqlb.parse_show(text, "tshm-s").active) == []


def test_show_old_format_bare_values_use_position_as_index():
    # nfqlb 0.x (src/nfqlb/cmdShm.c before maglevdyn) printed every slot with %u.
    text = "Shm: nfqlb\n  Fw: own=0, offset=100\n  Maglev: M=997, N=4\n   Active: 101 4294967295 103 4294967295\n"
    shm = nfqlb.parse_show(text)
    assert [(a.fwmark, a.index) for a in shm.active] == [(101, 0), (103, 2)]


def test_show_without_maglev_line_is_an_error():
    with pytest.raises(CollectorError, match="Maglev"):
        nfqlb.parse_show("Failed to open shared mem; tshm-x\n", "tshm-x")


def test_show_bad_active_token_is_an_error():
    with pytest.raises(CollectorError, match="Active"):
        nfqlb.parse_show("  Maglev: M=3, N=1\n   Active: 5(x)\n")


# --------------------------------------------------------------------------
# shm decoding (fallback when the binary cannot run)


DATA = Path(__file__).parent / "data" / "nfqlb"


def real_shm() -> bytes:
    """/dev/shm/tshm-stream-a written by nfqlb 1.2.0: init --M=400 --N=4, indexes 0, 2, 3 active."""
    return (DATA / "tshm-stream-a.bin").read_bytes()


def test_decode_shm_of_real_nfqlb_matches_its_show():
    shm = nfqlb.decode_shm(real_shm(), "tshm-stream-a")
    shown = nfqlb.parse_show((DATA / "show-tshm-stream-a.txt").read_text(), "tshm-stream-a")
    assert (shm.m, shm.n, shm.own_fwmark) == (shown.m, shown.n, 0) == (397, 4, 0)
    assert [(a.fwmark, a.index) for a in shm.active] == [(5001, 0), (5003, 2), (5004, 3)]
    assert list(shm.active) == list(shown.active)
    # show prints the first 25 lookup slots; the file holds all M of them
    printed = shown.raw.split("Lookup:")[1].split("...")[0].split()
    assert [str(v) for v in shm.lookup[:25]] == printed
    assert len(shm.lookup) == 397 and set(shm.lookup) == {0, 2, 3}
    # raw is in show's format, so it parses back to the same thing
    again = nfqlb.parse_show(shm.raw, shm.name)
    assert list(again.active) == list(shm.active) and (again.m, again.n) == (397, 4)


def test_decode_shm_ignores_page_padding():
    shm = nfqlb.decode_shm(real_shm() + b"\0" * 4096, "tshm-x")
    assert [a.fwmark for a in shm.active] == [5001, 5003, 5004]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01" * 64,
        struct.pack("=iIII", 0, 5, 9, 0),
        # the layout before nfqlb 1.x this agent once guessed (no permutation rows)
        struct.pack("=iIII", 0, 397, 4, 24 + 4 * 401) + b"\0" * (4 * 401),
    ],
)
def test_decode_shm_rejects_unknown_layouts(data: bytes):
    with pytest.raises(CollectorError, match="layout"):
        nfqlb.decode_shm(data, "tshm-x")


def test_decode_shm_rejects_truncated_and_corrupt_files():
    data = real_shm()
    with pytest.raises(CollectorError, match="truncated"):
        nfqlb.decode_shm(data[:-20], "tshm-x")
    corrupt = data[:16] + struct.pack("=i", 7) + data[20:]
    with pytest.raises(CollectorError, match="outside"):
        nfqlb.decode_shm(corrupt, "tshm-x")


def test_read_shm_reads_the_tables_only_and_says_what_decode_says(tmp_path: Path):
    """A 1,000-target stream's shm is 400 MB of permutations the agent never reads."""
    path = tmp_path / "tshm-stream-a"
    path.write_bytes(real_shm() + b"\0" * 4096)
    assert nfqlb.read_shm(str(path), "tshm-stream-a") == nfqlb.decode_shm(
        real_shm(), "tshm-stream-a"
    )
    # M=99991, N=1000 as nfqlb lays it out, sparse: only the header and the tables written
    m, n = 99991, 1000
    active_at = 16 + 4 * m + 4 * m * n
    big = tmp_path / "tshm-big"
    with big.open("wb") as f:
        f.write(struct.pack("=iIII", 0, m, n, 12 + 4 * (3 + m * n) + 4 * (m + n)))
        f.write(struct.pack(f"={m}i", *(i % n for i in range(m))))
        f.seek(active_at)
        f.write(struct.pack(f"={n}i", *(5001 + i for i in range(n))))
    shm = nfqlb.read_shm(str(big), "tshm-big")
    assert (shm.m, shm.n, len(shm.lookup)) == (m, n, m)
    assert [a.fwmark for a in shm.active] == [5001 + i for i in range(n)]
    path.write_bytes(real_shm()[:-20])
    with pytest.raises(CollectorError, match="truncated"):
        nfqlb.read_shm(str(path), "tshm-x")


# --------------------------------------------------------------------------
# the flow socket


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({}, "nfqlb"),
        ({"NFQLB_FLOW_ADDRESS": "unix:lb-1"}, "lb-1"),
        ({"NFQLB_FLOW_ADDRESS": "tcp:127.0.0.1:7000"}, None),
    ],
)
def test_flow_socket_name(env: dict[str, str], name: str | None):
    assert nfqlb.flow_socket_name(env) == name


def test_request_flow_list_speaks_nfqlbs_protocol():
    """One request on the abstract socket, JSON back, connection closed (nfqlb.h)."""
    name = f"mdt-nfqlb-{os.getpid()}-{threading.get_ident()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0" + name)
    server.listen(1)
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while not data.endswith(b"eoc:\n"):
                data += conn.recv(100)
            received.append(data)
            conn.sendall(FLOW_LIST_DATAPLANE_DOC.encode())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        text = nfqlb.request_flow_list(name, timeout=2)
    finally:
        t.join(2)
        server.close()
    assert received == [b"action:list\neoc:\n"]
    assert [f.name for f in nfqlb.parse_flow_list(text)] == ["tshm-stream-a-i-flow-a-z-tcp"]


def test_request_flow_list_times_out_on_a_silent_server():
    name = f"mdt-nfqlb-silent-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0" + name)
    server.listen(1)
    try:
        with pytest.raises(CollectorError, match="no complete flow list"):
            nfqlb.request_flow_list(name, timeout=0.3)
    finally:
        server.close()


def test_shm_names_include_flow_user_refs(tmp_path):
    flows = nfqlb.parse_flow_list(FLOW_LIST_SCTP_UDPENCAP + "")
    flows += nfqlb.parse_flow_list(FLOW_LIST_DATAPLANE_DOC)
    names = nfqlb.shm_names(999999999, flows, proc=str(tmp_path))
    assert "tshm-stream-a-i" in names and "nfqlb" in names and "NULL" not in names


# --------------------------------------------------------------------------
# the collector, here: no nfqlb on this machine


def test_collector_absent_without_nfqlb():
    collector = nfqlb.NfqlbCollector()
    ok, reason = collector.available()
    assert not ok
    assert reason.startswith(nfqlb.NO_NFQLB) and "@nfqlb" in reason
    with pytest.raises(SectionAbsent, match="nfqlb not running") as info:
        collector.collect(pb.Snapshot())
    # What was looked for and where: the process, the netns-scoped socket. (/dev/shm is
    # only the pod's when the agent runs as a container of it: then it is looked at too.)
    for where in ("agent's PID namespace", "@nfqlb in the pod's network namespace"):
        assert where in str(info.value)


# --------------------------------------------------------------------------
# nfqlb in another container of the pod


UNIX = """\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 4242 @nfqlb
0000000000000000: 00000002 00000000 00000000 0001 03 4243 @nfqlb
0000000000000000: 00000002 00000000 00010000 0001 01 4244 /run/bird.ctl
"""


def test_abstract_listening_reads_proc_net_unix(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "unix").write_text(UNIX)
    assert nfqlb.abstract_listening("nfqlb", proc=str(tmp_path))
    assert not nfqlb.abstract_listening("other", proc=str(tmp_path))
    # A connected socket of that name is not a listener.
    (tmp_path / "net" / "unix").write_text(UNIX.splitlines()[0] + "\n" + UNIX.splitlines()[2])
    assert not nfqlb.abstract_listening("nfqlb", proc=str(tmp_path))


@pytest.mark.parametrize(
    ("target", "pod", "want"),
    [
        ("frontend", "", "stateless-lb"),
        ("fe", "", "load-balancer"),
        ("frontend", "stateless-lb,frontend,nsc", "stateless-lb"),
        ("proxy", "", ""),
        ("", "", ""),
        ("frontend", "frontend,sidecar", ""),
    ],
)
def test_nfqlb_container_by_meridios_pod_layout(monkeypatch, target, pod, want):
    monkeypatch.setenv(ephemeral.TARGET_CONTAINER_ENV, target)
    monkeypatch.setenv(ephemeral.POD_CONTAINERS_ENV, pod)
    assert nfqlb.nfqlb_container() == want
