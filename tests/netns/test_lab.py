"""The lab on the real kernel: what a user of `lab up/status/traffic/down` would notice.

One default lab (unique prefix) is built for the module and always removed;
tests that must build or break their own lab use their own prefix. Nothing
here mocks the kernel: prerequisite failures are provoked by handing ``up``
a tool that does not exist.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meridio_debug.controller.errors import LabError
from meridio_debug.controller.lab import (
    build_spec,
    check_prerequisites,
    down,
    load_spec,
    status,
    traffic,
    up,
)
from meridio_debug.controller.lab._system import lab_namespaces, pid_alive, pids_in_namespaces
from meridio_debug.controller.lab.containers import MARKER_ENV, exec_argv
from meridio_debug.controller.lab.state import STATE_ROOT, read_state, state_dir

needs_root = [
    pytest.mark.netns,
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="bird2 not installed"),
]


def root_test(fn):
    for mark in reversed(needs_root):
        fn = mark(fn)
    return fn


def ip_json(*args: str):
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


def namespaces() -> set[str]:
    return {n["name"] for n in ip_json("netns", "list")}


@pytest.fixture(scope="module")
def lab(lab_prefix):
    prefix = lab_prefix()
    spec = build_spec(prefix=prefix)
    try:
        up(spec)
        yield spec
    finally:
        down(prefix)
        assert not lab_namespaces(prefix)


@root_test
def test_every_namespace_exists(lab):
    assert set(lab.namespaces) <= namespaces()
    assert len(lab.namespaces) == 9


@root_test
def test_both_fes_have_v4_and_v6_sessions_established(lab):
    deadline = time.monotonic() + 20
    while True:
        st = status(lab.prefix)
        if all(st.established(f.pod) for f in lab.frontends) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    got = {(s.pod, s.protocol): s.info for s in st.sessions if s.kind == "bgp"}
    bfd = {(s.pod, s.protocol): s.state for s in st.sessions if s.kind == "bfd"}
    assert bfd == {
        (fe, f"BFD {gw}"): "Up"
        for fe in ("lb-fe-a", "lb-fe-b")
        for gw in ("169.254.100.150", "100:100::150")
    }
    assert got == {
        (fe, proto): "Established"
        for fe in ("lb-fe-a", "lb-fe-b")
        for proto in ("NBR-gateway-v4-a", "NBR-gateway-v6-a")
    }
    assert st.healthy, st.problems
    assert json.loads(json.dumps(st.to_dict()))["healthy"] is True


@root_test
@pytest.mark.parametrize("family", ["-4", "-6"])
def test_lbs_have_fwmark_and_vip_rules(lab, family):
    vip = lab.vip4 if family == "-4" else lab.vip6
    for fe in lab.frontends:
        rules = ip_json(family, "-n", lab.netns(fe.pod), "rule")
        marks = {(int(r["fwmark"], 0), str(r["table"])) for r in rules if "fwmark" in r}
        assert marks == {(m, str(m)) for m in (5001, 5002, 5003, 5004)}
        vip_rules = {(r["priority"], r["table"]) for r in rules if r.get("src") == vip}
        assert vip_rules == {(100, "4096"), (101, "4097")}
        # Meridio adds fwmark rules without a priority after the VIP rules: 99, 98, ...
        assert sorted(r["priority"] for r in rules if "fwmark" in r) == [96, 97, 98, 99]


@root_test
def test_traffic_is_answered_by_the_predicted_target(lab):
    result = traffic(lab.prefix, connections=64)
    assert len(result.results) == 128
    assert not result.failures, [(r.probe, r.error) for r in result.failures[:5]]
    assert not result.mispredicted, [(r.probe, r.answer, r.expected) for r in result.mispredicted]
    for family in (4, 6):
        got = {r.answer for r in result.results if r.probe.family == family}
        assert got == {t.pod for t in lab.targets}, f"IPv{family}: not every target answered"
    assert {r.probe.proto for r in result.results} == {"tcp", "udp"}
    assert result.healthy
    assert json.loads(json.dumps(result.to_dict()))["probes"] == 128


def nfqlb_in(pid: int, *args: str) -> str:
    """Run the lab's nfqlb with ``args`` inside the container whose PID 1 is flowlb ``pid``."""
    argv = exec_argv("nsenter", pid, [os.readlink(f"/proc/{pid}/exe"), *args])
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout


@root_test
def test_each_lb_runs_nfqlb_as_meridio_does(lab):
    flowlbs = [p for p in read_state(lab.prefix).processes if p.kind == "nfqlb"]
    assert sorted(p.pod for p in flowlbs) == [f.pod for f in lab.frontends]
    for p in flowlbs:
        argv = Path(f"/proc/{p.pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        assert [a.decode() for a in argv[1:]] == [
            "flowlb", "--promiscuous_ping", "--queue=0:3", "--qlength=1024", "--hash_mode=0"
        ]  # fmt: skip
        show = nfqlb_in(p.pid, "show", "--shm=tshm-stream-a")
        assert "Maglev: M=9973, N=100" in show
        assert "Active: 5001(0) 5002(1) 5003(2) 5004(3)" in show
        flows = json.loads(nfqlb_in(p.pid, "flow-list"))
        assert [(f["name"], f["user_ref"], f["dports"]) for f in flows] == [
            ("tshm-stream-a-flow-a", "tshm-stream-a", ["4000-4003"])
        ]
        assert sorted(f["protocols"] for f in flows)[0] == ["tcp", "udp"]
        assert not Path("/dev/shm/tshm-stream-a").exists()  # private to the pod
        # the stateless-lb container: a PID namespace of its own, not bird's, not the host's
        bird = next(
            r.pid for r in read_state(lab.prefix).processes if r.pod == p.pod and r.kind == "bird"
        )
        pidns = {os.readlink(f"/proc/{x}/ns/pid") for x in (p.pid, bird, os.getpid())}
        assert len(pidns) == 3
    # each LB has its own shm: deactivating in one leaves the other alone
    a, b = flowlbs
    try:
        nfqlb_in(a.pid, "deactivate", "--index=1", "--shm=tshm-stream-a")
        assert "5002(1)" not in nfqlb_in(a.pid, "show", "--shm=tshm-stream-a")
        assert "5002(1)" in nfqlb_in(b.pid, "show", "--shm=tshm-stream-a")
    finally:
        nfqlb_in(a.pid, "activate", "--index=1", "--shm=tshm-stream-a", "5002")


@root_test
def test_vip_traffic_is_queued_to_nfqlb(lab):
    fe = lab.frontends[0]
    before = _nft_queue_packets(lab.netns(fe.pod))
    sent = traffic(lab.prefix, connections=8, family=4)
    assert not sent.failures and not sent.mispredicted
    after = _nft_queue_packets(lab.netns(fe.pod))
    assert sum(after.values()) >= sum(before.values())  # (ECMP may pick the other FE)
    assert set(after) == {("nfqlb", 4), ("nfqlb", 6), ("nfqlb-local", 4), ("nfqlb-local", 6)}


def _nft_queue_packets(netns: str) -> dict[tuple[str, int], int]:
    """Packets counted by each queue rule of meridio-nfqlb, by (chain, family)."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "inet", "meridio-nfqlb"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    counts: dict[tuple[str, int], int] = {}
    for obj in json.loads(out)["nftables"]:
        rule = obj.get("rule")
        if not rule or rule["chain"] == "snat-local":
            continue
        exprs = rule["expr"]
        if not any("queue" in e or e.get("xt", {}).get("name") == "NFQUEUE" for e in exprs):
            continue
        family = 6 if "ip6" in json.dumps(exprs) else 4
        packets = next(e["counter"]["packets"] for e in exprs if "counter" in e)
        counts[(rule["chain"], family)] = packets
    return counts


@root_test
def test_load_spec_returns_the_running_lab(lab):
    assert load_spec(lab.prefix) == lab


@root_test
def test_second_up_changes_nothing(lab):
    state_file = state_dir(lab.prefix) / "lab.json"
    before = state_file.read_bytes()
    ns_ids = {ns: os.stat(f"/run/netns/{ns}").st_ino for ns in lab.namespaces}
    links = ip_json("-n", lab.netns("proxy-a"), "link")
    up(lab)
    assert state_file.read_bytes() == before
    assert {ns: os.stat(f"/run/netns/{ns}").st_ino for ns in lab.namespaces} == ns_ids
    assert ip_json("-n", lab.netns("proxy-a"), "link") == links


@root_test
def test_another_layout_with_the_same_prefix_is_refused(lab):
    with pytest.raises(LabError) as info:
        up(build_spec(prefix=lab.prefix, lbs=1))
    assert "\n" not in str(info.value)
    assert "lab down" in str(info.value)
    assert status(lab.prefix).healthy


@root_test
def test_half_built_lab_is_rebuilt(lab):
    state = read_state(lab.prefix)
    victim = next(p for p in state.processes if p.pod == "target-b1")
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pid_alive(victim.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    broken = status(lab.prefix)
    assert not broken.healthy
    assert any("target-b1" in p for p in broken.problems)

    up(lab)

    assert status(lab.prefix).healthy
    again = traffic(lab.prefix, connections=16)
    assert not again.failures and not again.mispredicted
    new = next(p for p in read_state(lab.prefix).processes if p.pod == "target-b1")
    assert new.pid != victim.pid


@root_test
def test_failed_up_is_one_line_and_leaves_nothing(lab_prefix):
    prefix = lab_prefix()
    tools = dataclasses.replace(check_prerequisites(), bird="/nonexistent/bird")
    with pytest.raises(LabError) as info:
        up(build_spec(prefix=prefix), tools=tools)
    assert "\n" not in str(info.value)
    assert "bird" in str(info.value)
    assert not lab_namespaces(prefix)
    assert not state_dir(prefix).exists()


@root_test
def test_down_removes_namespaces_processes_and_state(lab_prefix):
    prefix = lab_prefix()
    spec = build_spec(prefix=prefix)
    try:
        up(spec)
        processes = read_state(prefix).processes
        pids = [p.pid for p in processes]
        # gateway, 2 x (stateless-lb, frontend), 2 x proxy, 4 x (example-target, tapa)
        assert len(pids) == 1 + 2 * 2 + 2 + 4 * 2
        assert sorted(p.kind for p in processes).count("nfqlb") == 2  # stateless-lb runs nfqlb
        assert all(pid_alive(p) for p in pids)
        # What runs inside the containers (bird, the servers) dies with them.
        inner = list(pids_in_namespaces(spec.namespaces))
        assert marked_pids(prefix)
        shm_before = set(os.listdir("/dev/shm"))
    finally:
        down(prefix)
    assert not set(spec.namespaces) & namespaces()
    assert not [p for p in pids + inner if pid_alive(p)]
    # nfqlb's shms lived in the pods' own /dev/shm: nothing on the host's, before or after
    assert not {n for n in shm_before | set(os.listdir("/dev/shm")) if n.startswith("tshm-")}
    assert not state_dir(prefix).exists()
    assert not status(prefix).exists
    down(prefix)  # nothing left: still fine


def test_target_server_answers_and_exits_cleanly_on_sigterm(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pidfile = tmp_path / "t.pid"
    argv = [sys.executable, "-m", "meridio_debug.controller.lab.target_server"]
    argv += ["--name", "target-x1", "--address", "127.0.0.1", "--ports", str(port)]
    argv += ["--pidfile", str(pidfile)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        try:
            deadline = time.monotonic() + 10
            while not pidfile.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                assert c.makefile().readline() == "target-x1\n"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.settimeout(5)
                u.sendto(b"?", ("127.0.0.1", port))
                assert u.recv(100) == b"target-x1\n"
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
    assert "stopped after 2 answers" in out
    assert not pidfile.exists()


@root_test
@pytest.mark.slow
def test_scaled_lab_carries_traffic(lab_prefix):
    prefix = lab_prefix()
    spec = build_spec(prefix=prefix, lbs=4, proxies=4, targets_per_proxy=10)
    try:
        up(spec)
        st = status(prefix)
        assert st.healthy, st.problems
        # nfqlb hashes the 5-tuple (kernel-chosen source ports): 512 flows miss one of the 40
        # targets with a probability of about 1e-4.
        result = traffic(prefix, connections=256)
        assert not result.failures, [(r.probe, r.error) for r in result.failures[:5]]
        assert not result.mispredicted
        assert len(result.counts) == 40
        assert not result.unreached
    finally:
        down(prefix)
    assert not lab_namespaces(prefix)


def test_state_root_is_under_run():
    # Other tools (analysis, CLI) find running labs here; keep it stable.
    assert Path("/run/meridio-debug/lab") == STATE_ROOT


# --- pods as pods: containers ---------------------------------------------------------------


def ns_id(pid: int, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def containers_of(prefix: str) -> dict[tuple[str, str], int]:
    return {(r.pod, r.container): r.pid for r in read_state(prefix).processes}


def in_container(pid: int, *argv: str) -> str:
    done = subprocess.run(
        ["nsenter", "-t", str(pid), "-n", "-m", "-p", "--", *argv],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


@root_test
def test_pods_have_meridios_containers_each_with_its_own_pid_and_mount_namespace(lab):
    got = containers_of(lab.prefix)
    assert {c for pod, c in got if pod == "lb-fe-a"} == {"stateless-lb", "frontend"}
    assert {c for pod, c in got if pod == "proxy-a"} == {"proxy"}
    assert {c for pod, c in got if pod == "target-a1"} == {"example-target", "tapa"}
    lb, fe = got[("lb-fe-a", "stateless-lb")], got[("lb-fe-a", "frontend")]
    # One network namespace per pod; PID and mount namespaces per container, none the host's.
    assert (
        ns_id(lb, "net") == ns_id(fe, "net") == os.stat(f"/run/netns/{lab.netns('lb-fe-a')}").st_ino
    )
    host_pid, host_mnt = ns_id(os.getpid(), "pid"), ns_id(os.getpid(), "mnt")
    assert len({ns_id(lb, "pid"), ns_id(fe, "pid"), host_pid}) == 3
    assert len({ns_id(lb, "mnt"), ns_id(fe, "mnt"), host_mnt}) == 3
    # Each container sees its own processes only, with a real PID 1 (bird in frontend).
    ps = in_container(fe, "ps", "-e", "-o", "pid=,comm=")
    rows = {tuple(line.split()) for line in ps.splitlines()}
    assert ("1", "bird") in rows
    assert not any(comm in ("stateless-lb", "tapa", "proxy", "python") for _, comm in rows)
    assert in_container(got[("target-a1", "tapa")], "cat", "/proc/1/comm").strip() == "tapa"


@root_test
def test_dev_shm_is_shared_by_a_pods_containers_and_private_to_the_pod(lab):
    got = containers_of(lab.prefix)
    a_lb, a_fe = got[("lb-fe-a", "stateless-lb")], got[("lb-fe-a", "frontend")]
    b_lb = got[("lb-fe-b", "stateless-lb")]
    name = f"tshm-test-{os.getpid()}"
    in_container(a_lb, "touch", f"/dev/shm/{name}")
    try:
        assert name in in_container(a_fe, "ls", "/dev/shm").split()
        assert name not in in_container(b_lb, "ls", "/dev/shm").split()
        assert not Path(f"/dev/shm/{name}").exists()  # not the host's either
    finally:
        in_container(a_lb, "rm", "-f", f"/dev/shm/{name}")


@root_test
def test_status_shows_containers(lab):
    argv = [sys.executable, "-m", "meridio_debug.controller.cli", "lab", "status"]
    out = subprocess.run(
        [*argv, "--prefix", lab.prefix],
        check=False,
        capture_output=True,
        text=True,
    ).stdout
    lines = [line.split() for line in out.splitlines()]
    assert ["lb-fe-b", "frontend", "bird"] in [row[:3] for row in lines]
    assert ["target-b2", "tapa", "idle"] in [row[:3] for row in lines]


def marked_pids(prefix: str) -> list[int]:
    """Host pids whose environment carries this lab's container marker."""
    wanted = f"{MARKER_ENV}={state_dir(prefix)}/".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if any(item.startswith(wanted) for item in env.split(b"\0")):
                found.append(int(entry))
    return found


@root_test
def test_failed_up_removes_the_containers_it_started(lab_prefix):
    """``up`` fails after every container started (birdc missing: BGP cannot be checked)."""
    prefix = lab_prefix()
    tools = dataclasses.replace(check_prerequisites(), birdc="/nonexistent/birdc")
    with pytest.raises(LabError) as info:
        up(build_spec(prefix=prefix), tools=tools, ready_timeout=1)
    assert "not ready" in str(info.value)
    assert not lab_namespaces(prefix)
    assert not state_dir(prefix).exists()
    assert not marked_pids(prefix)
