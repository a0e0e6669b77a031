"""Beyond the data plane, on the real lab: configuration vs nfqlb/bird, the e2e hook, --wait.

One lab per module (pid-unique prefix, always removed). What a user notices:
the lab's own CRs (``lab crs``) judge its pods clean; a Flow whose ports differ
from the LB's real nfqlb flow is MDB602 on that LB only; ``e2e-hook
on_failure --lab`` writes the four files and its bundle replays with the same
findings; ``analyze --wait`` returns 0 once a break is repaired, 3 at its
timeout while it lasts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from meridio_debug.controller import cli
from meridio_debug.controller.lab import build_spec, down, up
from meridio_debug.controller.lab.spec import LabSpec

pytestmark = [
    pytest.mark.netns,
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="bird2 not installed"),
]


@pytest.fixture(scope="module")
def lab(lab_prefix: Callable[[], str]) -> Iterator[LabSpec]:
    spec = build_spec(prefix=lab_prefix())
    try:
        up(spec)
        yield spec
    finally:
        down(spec.prefix)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _findings(out: str) -> set[tuple[str, str]]:
    return {(f["code"], f["pod"]) for f in json.loads(out)["findings"] if f["severity"] != "info"}


def _lab_crs(lab: LabSpec, capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    rc, out, _ = _cli(["lab", "crs", "--prefix", lab.prefix], capsys)
    assert rc == 0
    return [d for d in yaml.safe_load_all(out) if d]


def test_lab_crs_judge_the_healthy_lab_clean(
    lab: LabSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crs = tmp_path / "trench.yaml"
    crs.write_text(yaml.safe_dump_all(_lab_crs(lab, capsys)))
    rc, out, _ = _cli(
        ["analyze", "--lab", "--prefix", lab.prefix, "--config", str(crs), "-o", "json"], capsys
    )
    assert (rc, _findings(out)) == (0, set())
    ran = {c["code"] for c in json.loads(out)["checks_run"] if not c.get("skipped")}
    assert {"MDB611", "MDB621", "MDB633"} <= ran


def test_flow_ports_differing_from_the_lbs_nfqlb_flow_is_mdb602(
    lab: LabSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The trench says 4000-4003; lb-fe-b's nfqlb flow is moved to 5000: MDB602 on lb-fe-b."""
    lb = lab.frontends[1].pod
    rc, out, _ = _cli(["snapshot", "--lab", "--prefix", lab.prefix, lb, "-o", "json"], capsys)
    pod = json.loads(out)["pods"][0]
    flows = (pod.get("nfqlb") or {}).get("flows") or []
    if not flows:
        pytest.skip("the lab runs no real nfqlb yet (nft jhash marking): no flow to compare")
    flow = flows[0]
    # nfqlb's flow commands run where the LB's flowlb runs: its netns and mount ns (its shm)
    from meridio_debug.controller.lab.prereq import find_nfqlb
    from meridio_debug.controller.lab.state import read_state

    state = read_state(lab.prefix)
    assert state is not None
    pid = next(p.pid for p in state.processes if p.kind == "nfqlb" and p.pod == lb)
    enter = ["nsenter", f"--target={pid}", "--net", "--mount", "--", find_nfqlb()]

    def flow_set(ports: str) -> None:
        cmd = [
            *enter,
            "flow-set",
            f"--name={flow['name']}",
            f"--target={flow['user_ref']}",
            f"--prio={flow['priority']}",
            f"--protocols={','.join(flow['protocols'])}",
            f"--dsts={','.join(flow['dests'])}",
            f"--dports={ports}",
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    flow_set("5000")
    try:
        rc, out, _ = _cli(["analyze", "--lab", "--prefix", lab.prefix, "-o", "json"], capsys)
        assert _findings(out) == {("MDB602", lb)}
        (finding,) = [f for f in json.loads(out)["findings"] if f["code"] == "MDB602"]
        assert finding["evidence"]["differs"]["dports"]["nfqlb"] == ["5000"]
        assert rc == 3
    finally:
        flow_set(",".join(flow["dports"]))


def test_e2e_hook_on_failure_writes_four_files_that_replay(
    lab: LabSpec,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out_dir = tmp_path / "_output"
    monkeypatch.setenv("OUTPUT_PATH", str(out_dir))
    monkeypatch.setenv("OUTPUT_ID", "spec-42")
    broken = _break_neighbour(lab)  # a real break, so the reports have something to say
    try:
        rc, _out, err = _cli(
            ["e2e-hook", "on_failure", "1700000000000000000", "--lab", "--prefix", lab.prefix],
            capsys,
        )
    finally:
        _repair_neighbour(*broken)
    assert rc == 0, err
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == [f"meridio-debug-spec-42.{e}" for e in ("html", "json", "tar.gz", "xml")]
    hook = json.loads((out_dir / "meridio-debug-spec-42.json").read_text())
    assert ("MDB112", lab.frontends[0].pod) in {(f["code"], f["pod"]) for f in hook["findings"]}
    rc, out, _ = _cli(
        ["analyze", "--from", str(out_dir / "meridio-debug-spec-42.tar.gz"), "-o", "json"], capsys
    )
    assert json.loads(out)["findings"] == hook["findings"]
    from junitparser import JUnitXml

    xml = JUnitXml.fromfile(str(out_dir / "meridio-debug-spec-42.xml"))
    assert sum(suite.failures for suite in xml) >= 1
    assert "<html" in (out_dir / "meridio-debug-spec-42.html").read_text()[:500].lower()


def test_e2e_hook_that_can_write_nothing_exits_1_with_one_line(
    lab: LabSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, _out, err = _cli(
        [
            "e2e-hook",
            "on_failure",
            "--lab",
            "--prefix",
            lab.prefix,
            "--output-path",
            str(blocker / "sub"),
        ],
        capsys,
    )
    assert rc == 1
    assert err.count("\n") == 1 and "nothing written" in err


def _break_neighbour(lab: LabSpec) -> tuple[str, str, str]:
    """lb-fe-a's neighbour for its first target gets a wrong permanent MAC (MDB112)."""
    netns = lab.netns(lab.frontends[0].pod)
    target_ip = lab.targets[0].ipv4.split("/")[0]
    dev = next(c.ifname for c in lab.frontends[0].conduits if c.node == lab.targets[0].node)
    subprocess.run(
        [
            "ip",
            "-n",
            netns,
            "neigh",
            "replace",
            target_ip,
            "dev",
            dev,
            "lladdr",
            "02:00:00:00:00:99",
            "nud",
            "permanent",
        ],
        check=True,
    )
    return netns, target_ip, dev


def _repair_neighbour(netns: str, target_ip: str, dev: str) -> None:
    subprocess.run(["ip", "-n", netns, "neigh", "del", target_ip, "dev", dev], check=False)


def test_analyze_wait_returns_0_once_repaired(
    lab: LabSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _break_neighbour(lab)
    timer = threading.Timer(3.0, _repair_neighbour, broken)
    timer.start()
    started = time.monotonic()
    try:
        rc, out, err = _cli(
            [
                "analyze",
                "--lab",
                "--prefix",
                lab.prefix,
                "--wait",
                "--timeout",
                "60",
                "--interval",
                "0.5",
                "-o",
                "json",
            ],
            capsys,
        )
    finally:
        timer.cancel()
        _repair_neighbour(*broken)
    assert rc == 0, err
    assert _findings(out) == set()
    assert f"MDB112 {lab.frontends[0].pod}" in err and "settled" in err
    assert 3.0 <= time.monotonic() - started < 60


def test_analyze_wait_times_out_with_exit_3_and_the_findings(
    lab: LabSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _break_neighbour(lab)
    started = time.monotonic()
    try:
        rc, out, err = _cli(
            [
                "analyze",
                "--lab",
                "--prefix",
                lab.prefix,
                "--wait",
                "--timeout",
                "3",
                "--interval",
                "1",
                "-o",
                "json",
            ],
            capsys,
        )
    finally:
        _repair_neighbour(*broken)
    assert rc == 3
    assert _findings(out) == {("MDB112", lab.frontends[0].pod)}
    assert "not settled after 3 s" in err
    assert time.monotonic() - started < 15


def test_analyze_watch_reports_the_flaps_of_the_window(
    lab: LabSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bridge port flaps and lb-fe-a's v4 BGP session drops and comes back while watched:
    MDB701 on the proxy, MDB703 and MDB702 (VIP egress default withdrawn, back) on the LB;
    the final state is healthy, and the bundle replays the same flap findings."""
    from meridio_debug.controller.lab.state import bird_paths, state_dir

    lb, target = lab.frontends[0].pod, lab.targets[0]
    proxy_ns = lab.netns(lab.nodes[0].proxy)
    ctl = str(bird_paths(state_dir(lab.prefix), lb)["ctl"])
    bundle = tmp_path / "watched.tar.gz"

    def breaks() -> None:  # while the main thread watches (the CLI wants the main thread)
        time.sleep(3)
        run = subprocess.run
        run(["ip", "-n", proxy_ns, "link", "set", target.proxy_ifname, "down"], check=True)
        run(
            ["birdc", "-s", ctl, "disable", f'"{lab.bgp.protocol4}"'],
            check=True,
            capture_output=True,
        )
        time.sleep(1.5)
        run(["ip", "-n", proxy_ns, "link", "set", target.proxy_ifname, "up"], check=True)
        run(
            ["birdc", "-s", ctl, "enable", f'"{lab.bgp.protocol4}"'],
            check=True,
            capture_output=True,
        )

    thread = threading.Thread(target=breaks)
    thread.start()
    try:
        rc = cli.main(
            ["collect", "--lab", "--prefix", lab.prefix, "--watch", "8", "-o", str(bundle)]
        )
    finally:
        thread.join(30)
    assert rc == 0
    capsys.readouterr()
    _rc, out, _ = _cli(["analyze", "--from", str(bundle), "-o", "json"], capsys)
    flaps = {(f["code"], f["pod"]) for f in json.loads(out)["findings"] if f["code"][:4] == "MDB7"}
    # the target's end of the veth loses its carrier with the proxy's port: it flaps too
    assert flaps == {
        ("MDB701", lab.nodes[0].proxy),
        ("MDB701", target.pod),
        ("MDB703", lb),
        ("MDB702", lb),
    }
    by = {(f["code"], f["pod"]): f for f in json.loads(out)["findings"]}
    port = by[("MDB701", lab.nodes[0].proxy)]["evidence"]
    assert port["interface"] == target.proxy_ifname and port["up_at_end"] is True
    by = {f["code"]: f for f in json.loads(out)["findings"] if f["code"][:4] == "MDB7"}
    assert by["MDB702"]["evidence"]["purpose"] == "VIP egress"
    assert f"BGP {lab.bgp.protocol4}" == by["MDB703"]["evidence"]["session"]
