"""The bird collector against a real bird2 pair in two throw-away namespaces.

An FE namespace (bird with the Meridio frontend's BGP+BFD configuration,
modelled on shared/lab-examples/bird-fe.conf) peers over a veth with a
gateway namespace (bird-gw.conf). The collector runs *inside* the FE
namespace through the real code path (``ip netns exec NS python``), with a
second bird (the gateway's) running on the same host: it must pick its own.

Run as a script to re-record the unit tests' bird fixtures:

    python tests/netns/test_bird_collector.py --record tests/unit/data/bird
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="bird2 not installed"),
]

GOOD_AS = 4248829953
BAD_AS = 4248829954

FE_CONF = """\
router id 169.254.100.2;
protocol device {{}}
filter cluster_breakout {{ if net ~ [0.0.0.0/0] then accept; if net ~ [::/0] then accept;
  if source = RTS_BGP then accept; reject; }}
filter cluster_access {{ if net ~ [0.0.0.0/0] then reject; if net ~ [::/0] then reject;
  if source = RTS_STATIC && dest != RTD_BLACKHOLE then accept; reject; }}
protocol static VIP4 {{ ipv4 {{ preference 110; }}; route 20.0.0.1/32 via "lo"; }}
protocol static VIP6 {{ ipv6 {{ preference 110; }}; route 2000::1/128 via "lo"; }}
protocol kernel {{ ipv4 {{ import none; export filter cluster_breakout; }};
  kernel table 4096; merge paths on; scan time 10; }}
protocol kernel {{ ipv6 {{ import none; export filter cluster_breakout; }};
  kernel table 4096; merge paths on; scan time 10; }}
template bgp LINK {{
  interface "ext-vlan0"; direct; hold time 24; graceful restart off;
  connect delay time 1; connect retry time 2; error wait time 1, 5;
  local port 10179 as 8103;
  bfd {{ min rx interval 300 ms; min tx interval 300 ms; multiplier 5; }};
}}
protocol bgp 'NBR-gateway-v4-a' from LINK {{
  neighbor 169.254.100.150 port 10179 as {v4_as};
  ipv4 {{ import filter cluster_breakout; export filter cluster_access; next hop self; }};
}}
protocol bgp 'NBR-gateway-v6-a' from LINK {{
  neighbor 100:100::150 port 10179 as {v6_as};
  ipv6 {{ import filter cluster_breakout; export filter cluster_access; next hop self; }};
}}
protocol bfd 'NBR-BFD' {{ accept direct; interface "ext-vlan0" {{}}; }}
"""

GW_CONF = """\
router id 169.254.100.150;
protocol device {}
protocol bfd { interface "*" { passive on; }; }
protocol static DEFAULT4 { ipv4 { preference 110; }; route 0.0.0.0/0 blackhole; }
protocol static DEFAULT6 { ipv6 { preference 110; }; route ::/0 blackhole; }
filter gw_kernel_export { if source = RTS_STATIC && dest = RTD_BLACKHOLE then reject; accept; }
filter bgp_announce { if net ~ [0.0.0.0/0] then accept; if net ~ [::/0] then accept; reject; }
protocol kernel { ipv4 { import none; export filter gw_kernel_export; }; merge paths on; }
protocol kernel { ipv6 { import none; export filter gw_kernel_export; }; merge paths on; }
template bgp GWT { direct; hold time 24; bfd on; graceful restart off;
  connect delay time 1; error wait time 1, 5; local port 10179 as 4248829953; }
protocol bgp GW4 from GWT {
  neighbor range 169.254.100.0/24 port 10179 as 8103; dynamic name "GW4_";
  ipv4 { import all; export filter bgp_announce; next hop self; };
}
protocol bgp GW6 from GWT {
  neighbor range 100:100::/64 port 10179 as 8103; dynamic name "GW6_";
  ipv6 { import all; export filter bgp_announce; next hop self; };
}
"""

# Runs inside the FE namespace: the collector exactly as the agent runs it.
COLLECT = """\
import sys
from google.protobuf.json_format import MessageToJson
from meridio_debug.agent.collectors import run_collectors
from meridio_debug.agent.collectors.bird import BirdCollector
from meridio_debug.protos import agent_pb2 as pb
snap = pb.Snapshot()
run_collectors([BirdCollector(timeout=5.0)], snap)
print(MessageToJson(snap))
"""


def _run(*argv: str, timeout: float = 10.0) -> None:
    subprocess.run(list(argv), check=True, timeout=timeout, capture_output=True)


class BirdPair:
    """Two namespaces, a veth, and a bird in each; everything undone by stop()."""

    def __init__(self, workdir: Path, tag: str = "") -> None:
        base = f"mdt-bird-{os.getpid()}{tag}"
        self.fe, self.gw, self.empty = f"{base}-a", f"{base}-b", f"{base}-c"
        self.dir = workdir
        self.fe_sock = str(workdir / "fe.ctl")
        self.gw_sock = str(workdir / "gw.ctl")
        self.fe_conf = workdir / "fe.conf"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.namespaces: list[str] = []

    def start(self) -> None:
        for ns in (self.fe, self.gw, self.empty):
            _run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "link", "add", "ext-vlan0", "netns", self.fe, "type", "veth",
             "peer", "name", "vlan0", "netns", self.gw)  # fmt: skip
        for ns, dev, v4, v6 in (
            (self.fe, "ext-vlan0", "169.254.100.2/24", "100:100::2/64"),
            (self.gw, "vlan0", "169.254.100.150/24", "100:100::150/64"),
        ):
            _run("ip", "-n", ns, "addr", "add", v4, "dev", dev)
            _run("ip", "-n", ns, "addr", "add", v6, "dev", dev, "nodad")
            _run("ip", "-n", ns, "link", "set", dev, "up")
        self.write_fe_conf(GOOD_AS)
        (self.dir / "gw.conf").write_text(GW_CONF)
        self.start_bird("gw")
        self.start_bird("fe")

    def write_fe_conf(self, v4_as: int) -> None:
        self.fe_conf.write_text(FE_CONF.format(v4_as=v4_as, v6_as=GOOD_AS))

    def start_bird(self, which: str) -> None:
        ns = self.fe if which == "fe" else self.gw
        # ip netns exec execs bird, so the Popen pid is bird's own pid.
        self.procs[which] = subprocess.Popen(
            ["ip", "netns", "exec", ns, "bird", "-f",
             "-c", str(self.dir / f"{which}.conf"),
             "-s", str(self.dir / f"{which}.ctl"),
             "-P", str(self.dir / f"{which}.pid")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop_bird(self, which: str) -> None:
        proc = self.procs.pop(which, None)
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)

    def reconfigure_fe(self, v4_as: int) -> None:
        self.write_fe_conf(v4_as)
        _run("birdc", "-s", self.fe_sock, "configure")

    def stop(self) -> None:
        for which in list(self.procs):
            try:
                self.stop_bird(which)
            except Exception as exc:  # keep cleaning up
                print(f"cleanup: bird {which}: {exc}", file=sys.stderr)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)
        self.namespaces.clear()

    def raw(self, which: str, command: str) -> list[str]:
        from meridio_debug.agent.collectors.bird import BirdClient

        with BirdClient(self.fe_sock if which == "fe" else self.gw_sock, timeout=5) as c:
            return [c.greeting] if command == "greeting" else c.raw(command)

    def wait_for(self, predicate: str, timeout: float = 15.0) -> None:
        """Wait until every NBR-* protocol's Info satisfies ``predicate`` ('Established' or not)."""
        from meridio_debug.agent.collectors.bird import BirdClient, parse_protocols

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                with BirdClient(self.fe_sock, timeout=2) as c:
                    protos = parse_protocols(c.command("show protocols all"))
                    sessions = c.raw("show bfd sessions")
            except OSError as exc:
                last = str(exc)
            else:
                nbr = {p.name: p for p in protos if p.name.startswith("NBR-gateway")}
                last = str({n: p.info for n, p in nbr.items()})
                up = [n for n, p in nbr.items() if "Established" in p.info]
                bfd_up = sum(" Up " in line for line in sessions)
                if predicate == "Established" and len(up) == 2 and bfd_up == 2:
                    return
                if predicate == "v4-broken" and nbr and "NBR-gateway-v4-a" not in up:
                    v4 = nbr["NBR-gateway-v4-a"]
                    if "Bad peer AS" in v4.last_error:
                        return
                if predicate == "gw-down" and not up:
                    return
            time.sleep(0.2)
        raise AssertionError(f"bird did not reach {predicate} in {timeout} s: {last}")

    def collect_in(self, ns: str) -> dict[str, object]:
        done = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", COLLECT],
            capture_output=True, timeout=20, check=True,
        )  # fmt: skip
        return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def bird_pair():
    with tempfile.TemporaryDirectory(prefix="mdt-bird-") as tmp:
        pair = BirdPair(Path(tmp))
        try:
            pair.start()
            yield pair
        finally:
            pair.stop()


def _section(snap: dict, name: str) -> dict:
    return next(s for s in snap["sections"] if s["name"] == name)


def _protocols(snap: dict) -> dict[str, dict]:
    return {p["name"]: p for p in snap["bird"]["protocols"]}


def test_collector_reports_established_then_bad_peer_as(bird_pair: BirdPair):
    bird_pair.wait_for("Established")
    snap = bird_pair.collect_in(bird_pair.fe)

    assert _section(snap, "bird")["state"] == "OK"
    bird = snap["bird"]
    # The FE's bird, not the gateway's (both run on this host).
    assert bird["pid"] == bird_pair.procs["fe"].pid
    assert bird["socket"].endswith("/fe.ctl")
    assert bird["version"].startswith("2.")
    protos = _protocols(snap)
    for name, addr in (
        ("NBR-gateway-v4-a", "169.254.100.150"),
        ("NBR-gateway-v6-a", "100:100::150"),
    ):
        p = protos[name]
        assert (p["proto"], p["state"], p["bgpState"]) == ("BGP", "up", "Established")
        assert p["info"] == "Established"
        assert p["neighborAddress"] == addr
        assert p["neighborAs"] == str(GOOD_AS)
        assert p["localAs"] == "8103"
        assert p["bfd"] is True
    assert protos["NBR-gateway-v4-a"]["channel"] == "ipv4"
    assert protos["NBR-BFD"]["proto"] == "BFD"
    sessions = {s["address"]: s for s in bird["bfdSessions"]}
    assert set(sessions) == {"169.254.100.150", "100:100::150"}
    for s in sessions.values():
        assert (s["state"], s["interface"], s["protocol"]) == ("Up", "ext-vlan0", "NBR-BFD")

    bird_pair.reconfigure_fe(BAD_AS)
    bird_pair.wait_for("v4-broken")
    snap = bird_pair.collect_in(bird_pair.fe)
    protos = _protocols(snap)
    v4 = protos["NBR-gateway-v4-a"]
    assert v4["state"] != "up" or "Established" not in v4["info"]
    assert v4.get("bgpState") != "Established"
    assert v4["neighborAs"] == str(BAD_AS)
    assert "Bad peer AS" in v4["lastError"]
    assert protos["NBR-gateway-v6-a"]["bgpState"] == "Established"


def test_collector_absent_without_bird_in_netns(bird_pair: BirdPair):
    snap = bird_pair.collect_in(bird_pair.empty)
    section = _section(snap, "bird")
    assert section["state"] == "ABSENT"
    assert section["message"].startswith("no bird process in the agent's PID namespace")
    assert "network namespace" in section["message"]


def test_collector_error_names_the_paths_when_socket_unreachable(bird_pair: BirdPair):
    moved = bird_pair.fe_sock + ".moved"
    deadline = time.monotonic() + 5
    while not os.path.exists(bird_pair.fe_sock) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.rename(bird_pair.fe_sock, moved)
    try:
        snap = bird_pair.collect_in(bird_pair.fe)
    finally:
        os.rename(moved, bird_pair.fe_sock)
    section = _section(snap, "bird")
    assert section["state"] == "ERROR"
    pid = bird_pair.procs["fe"].pid
    assert f"bird pid {pid} runs but its control socket is unreachable" in section["message"]
    assert f"/proc/{pid}/root{bird_pair.fe_sock}: no such socket" in section["message"]


# --------------------------------------------------------------------------
# fixture recorder


def record(outdir: Path) -> None:
    """Record the replies the unit tests parse, in three states."""
    outdir.mkdir(parents=True, exist_ok=True)
    commands = {
        "show_protocols_all": "show protocols all",
        "show_protocols": "show protocols",
        "show_bfd_sessions": "show bfd sessions",
    }

    def save(prefix: str, which: str) -> None:
        for stem, command in commands.items():
            lines = pair.raw(which, command)
            (outdir / f"{prefix}_{stem}.txt").write_text("\n".join(lines) + "\n")

    with tempfile.TemporaryDirectory(prefix="mdt-bird-") as tmp:
        pair = BirdPair(Path(tmp), tag="-rec")
        try:
            pair.start()
            pair.wait_for("Established")
            (outdir / "greeting.txt").write_text(pair.raw("fe", "greeting")[0] + "\n")
            save("fe_established", "fe")
            save("gw_established", "gw")
            pair.reconfigure_fe(BAD_AS)
            pair.wait_for("v4-broken")
            save("fe_bad_peer_as", "fe")
            pair.reconfigure_fe(GOOD_AS)
            pair.wait_for("Established")
            pair.stop_bird("gw")
            pair.wait_for("gw-down")
            time.sleep(2)  # let BFD time out (5 x 300 ms) and BGP retry
            save("fe_gateway_down", "fe")
        finally:
            pair.stop()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--record":
        record(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
