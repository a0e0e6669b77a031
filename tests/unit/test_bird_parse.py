"""Parsing BIRD control-socket replies recorded from a real bird 2.0.12 (data/bird/README.md)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from meridio_debug.agent.collectors import bird
from meridio_debug.agent.errors import CollectorError

DATA = Path(__file__).parent / "data" / "bird"


def reply(name: str) -> list[bird.ReplyLine]:
    return bird.parse_reply((DATA / f"{name}.txt").read_text().splitlines())


def protocols(name: str) -> dict[str, object]:
    return {p.name: p for p in bird.parse_protocols(reply(name))}


# --------------------------------------------------------------------------
# wire format


def test_greeting_gives_version():
    assert bird.parse_version((DATA / "greeting.txt").read_text()) == "2.0.12"
    assert bird.parse_version("garbage") == ""


@pytest.mark.parametrize(
    ("line", "final"),
    [("0000 ", True), ("0001 BIRD 2.0.12 ready.", True), ("1002-device1 ...", False),
     (" VIP4  Static", False), ("", False), ("12 x", False)],
)  # fmt: skip
def test_final_line_is_code_and_space(line: str, final: bool):
    assert bird.is_final(line) is final


def test_continuation_lines_inherit_the_code():
    lines = bird.parse_reply(["2002-Name  Proto", "1002-device1 Device", " VIP4 Static", "0000 "])
    assert [(r.code, r.text) for r in lines] == [
        (2002, "Name  Proto"),
        (1002, "device1 Device"),
        (1002, "VIP4 Static"),
        (0, ""),
    ]


@pytest.mark.parametrize("line", ["8003 No protocols match", "9001 syntax error, unexpected END"])
def test_error_codes_raise_with_bird_message(line: str):
    with pytest.raises(bird.BirdProtocolError, match=line[5:]):
        bird.parse_reply([line])


def test_line_without_code_raises():
    with pytest.raises(bird.BirdProtocolError, match="unexpected line"):
        bird.parse_reply(["hello"])


# --------------------------------------------------------------------------
# show protocols all


def test_established_fe_protocols():
    protos = protocols("fe_established_show_protocols_all")
    assert list(protos) == [
        "device1", "VIP4", "VIP6", "kernel1", "kernel2",
        "NBR-gateway-v4-a", "NBR-gateway-v6-a", "NBR-BFD",
    ]  # fmt: skip
    v4 = protos["NBR-gateway-v4-a"]
    assert (v4.proto, v4.table, v4.state, v4.info) == ("BGP", "---", "up", "Established")
    assert v4.bgp_state == "Established"
    assert v4.neighbor_address == "169.254.100.150"  # "%ext-vlan0" scope dropped
    assert (v4.neighbor_as, v4.local_as) == ("4248829953", "8103")
    assert v4.last_error == ""
    assert v4.channel == "ipv4"
    assert len(v4.since) == len("23:26:11.557")
    v6 = protos["NBR-gateway-v6-a"]
    assert (v6.neighbor_address, v6.channel) == ("100:100::150", "ipv6")
    assert protos["VIP4"].channel == "ipv4"
    assert protos["NBR-BFD"].proto == "BFD"
    assert protos["device1"].info == ""


def test_bad_peer_as_shows_error_and_wrong_neighbor_as():
    protos = protocols("fe_bad_peer_as_show_protocols_all")
    v4 = protos["NBR-gateway-v4-a"]
    assert v4.state == "start"
    assert v4.bgp_state == "Idle"
    assert "Established" not in v4.info
    assert v4.info.endswith("BGP Error: Bad peer AS")
    assert v4.last_error == "BGP Error: Bad peer AS"
    assert v4.neighbor_as == "4248829954"
    assert protos["NBR-gateway-v6-a"].bgp_state == "Established"


def test_gateway_down_shows_connection_refused():
    protos = protocols("fe_gateway_down_show_protocols_all")
    for name in ("NBR-gateway-v4-a", "NBR-gateway-v6-a"):
        p = protos[name]
        assert (p.state, p.bgp_state) == ("start", "Active")
        assert p.last_error == "Socket: Connection refused"
        assert "Socket: Connection refused" in p.info


def test_short_listing_has_rows_as_continuation_lines():
    """'show protocols' sends one 1002 code line and the other rows as continuations."""
    protos = protocols("fe_bad_peer_as_show_protocols")
    assert len(protos) == 8
    assert protos["NBR-gateway-v4-a"].info.endswith("BGP Error: Bad peer AS")
    assert protos["NBR-gateway-v6-a"].info == "Established"
    assert protos["NBR-gateway-v6-a"].bgp_state == ""  # no details in the short form


def test_gateway_side_dynamic_protocols():
    protos = protocols("gw_established_show_protocols_all")
    assert protos["GW4"].info == "Passive"
    assert protos["GW4_1"].bgp_state == "Established"
    assert protos["GW4_1"].neighbor_as == "8103"


def test_iso_long_since_keeps_date_and_time():
    lines = bird.parse_reply(
        ["1002-NBR-x BGP ---  start  2024-05-01 10:00:00  Active        Socket: Connection refused",
         "0000 "]
    )  # fmt: skip
    (p,) = bird.parse_protocols(lines)
    assert p.since == "2024-05-01 10:00:00"
    assert p.info.startswith("Active") and p.info.endswith("Socket: Connection refused")


# --------------------------------------------------------------------------
# show bfd sessions


def test_bfd_sessions_up():
    sessions = bird.parse_bfd_sessions(reply("fe_established_show_bfd_sessions"))
    assert {s.address for s in sessions} == {"169.254.100.150", "100:100::150"}
    for s in sessions:
        assert (s.interface, s.state, s.protocol) == ("ext-vlan0", "Up", "NBR-BFD")
        assert (s.interval, s.timeout) == ("0.300", "1.500")


def test_bfd_sessions_down_when_gateway_gone():
    sessions = bird.parse_bfd_sessions(reply("fe_gateway_down_show_bfd_sessions"))
    assert [s.state for s in sessions] == ["Down", "Down"]


def test_bfd_owner_on_gateway_side():
    sessions = bird.parse_bfd_sessions(reply("gw_established_show_bfd_sessions"))
    assert {(s.address, s.protocol) for s in sessions} == {
        ("100:100::2", "bfd1"),
        ("169.254.100.2", "bfd1"),
    }


def test_link_bfd_marks_bgp_with_a_session():
    protos = bird.parse_protocols(reply("fe_established_show_protocols_all"))
    sessions = bird.parse_bfd_sessions(reply("fe_established_show_bfd_sessions"))
    bird.link_bfd(protos, sessions[:1])
    marked = {p.name for p in protos if p.bfd}
    assert marked == {
        "NBR-gateway-v4-a" if sessions[0].address == "169.254.100.150" else "NBR-gateway-v6-a"
    }


# --------------------------------------------------------------------------
# finding the socket


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bird", "-d", "-c", "/etc/bird/bird-fe-meridio.conf"], None),
        (["bird", "-s", "/tmp/x.ctl", "-f"], "/tmp/x.ctl"),
        (["bird", "-s/tmp/y.ctl"], "/tmp/y.ctl"),
        (["bird", "-s"], None),
    ],
)
def test_option_value(argv: list[str], expected: str | None):
    assert bird.option_value(argv, "-s") == expected


def test_socket_candidates_explicit_path_through_proc_root():
    got = bird.socket_candidates(42, ["bird", "-s", "/run/x/bird.ctl"], proc="/proc")
    assert got == ["/proc/42/root/run/x/bird.ctl", "/run/x/bird.ctl"]


def test_socket_candidates_defaults():
    got = bird.socket_candidates(42, ["bird", "-c", "/etc/bird/bird-fe-meridio.conf"])
    assert got[:2] == ["/proc/42/root/var/run/bird/bird.ctl", "/proc/42/root/run/bird/bird.ctl"]
    assert "/var/run/bird/bird.ctl" in got


def test_socket_candidates_relative_path_is_relative_to_birds_cwd():
    assert bird.socket_candidates(7, ["bird", "-s", "bird.ctl"]) == ["/proc/7/cwd/bird.ctl"]


# --------------------------------------------------------------------------
# the client against a scripted server speaking the recorded replies


class FakeBird:
    """A unix-socket server that replays recorded replies (and records commands)."""

    def __init__(self, path: str, replies: dict[str, str]) -> None:
        self.path = path
        self.replies = replies
        self.commands: list[str] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.server.accept()
        with conn, conn.makefile("rb") as rfile:
            conn.sendall((DATA / "greeting.txt").read_bytes())
            for raw in rfile:
                command = raw.decode().strip()
                self.commands.append(command)
                conn.sendall(self.replies.get(command, "9001 syntax error\n").encode())

    def close(self) -> None:
        self.server.close()


def test_client_reads_recorded_replies_over_a_socket(tmp_path: Path):
    path = str(tmp_path / "bird.ctl")
    fake = FakeBird(
        path,
        {
            "show protocols all": (DATA / "fe_established_show_protocols_all.txt").read_text(),
            "show bfd sessions": (DATA / "fe_established_show_bfd_sessions.txt").read_text(),
        },
    )
    try:
        with bird.BirdClient(path, timeout=2) as client:
            state = bird.read_bird(client)
    finally:
        fake.close()
    assert state.version == "2.0.12"
    assert fake.commands == ["show protocols all", "show bfd sessions"]
    by_name = {p.name: p for p in state.protocols}
    assert by_name["NBR-gateway-v4-a"].bfd and by_name["NBR-gateway-v6-a"].bfd
    assert len(state.sessions) == 2


def test_client_refuses_non_show_commands(tmp_path: Path):
    path = str(tmp_path / "bird.ctl")
    fake = FakeBird(path, {})
    try:
        with bird.BirdClient(path, timeout=2) as client:
            for command in ("configure", "disable NBR-gateway-v4-a", "show x\nconfigure"):
                with pytest.raises(ValueError, match="read-only"):
                    client.command(command)
    finally:
        fake.close()
    assert fake.commands == []


def test_client_times_out_on_a_silent_socket(tmp_path: Path):
    path = str(tmp_path / "silent.ctl")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    try:
        with pytest.raises(CollectorError, match="no complete reply"):
            bird.BirdClient(path, timeout=0.3).connect()
    finally:
        server.close()


def test_client_reaches_a_socket_path_longer_than_sun_path(tmp_path: Path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = str(deep / "bird.ctl")
    assert len(path) > 108
    fake = FakeBird.__new__(FakeBird)
    # bind through the same O_PATH trick the client uses to connect
    dirfd = os.open(str(deep), os.O_PATH | os.O_DIRECTORY)
    try:
        fake.path, fake.replies, fake.commands = path, {}, []
        fake.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fake.server.bind(f"/proc/self/fd/{dirfd}/bird.ctl")
        fake.server.listen(1)
        fake.thread = threading.Thread(target=fake.serve, daemon=True)
        fake.thread.start()
    finally:
        os.close(dirfd)
    try:
        with bird.BirdClient(path, timeout=2) as client:
            assert client.greeting.startswith("0001 BIRD")
    finally:
        fake.close()
