"""Commands leave nothing behind: signals, kill -9, and captures that could not start.

Each run gets a TMPDIR of its own, so "nothing left" is exact: no agent
directory in it, and no process whose command line names it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

CLI = [sys.executable, "-m", "meridio_debug.controller.cli"]
NS = f"mdt-hcli-{os.getpid()}"


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        subprocess.run(["ip", "-n", NS, "link", "set", "lo", "up"], check=True)
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False)


def start(args: list[str], tmp: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
        cwd=tmp,
    )


def wait_for_line(proc: subprocess.Popen[str], word: str, timeout: float = 60) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if word in line:
            return
        assert line or proc.poll() is None, "the command ended before it was ready"
    raise AssertionError(f"no {word!r} within {timeout} s")


def leftovers(tmp: Path) -> tuple[list[str], list[int]]:
    """Agent directories in ``tmp``, and live processes whose command line names ``tmp``."""
    dirs = sorted(p.name for p in tmp.iterdir() if p.name.startswith("meridio-debug-"))
    procs = []
    for p in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            env = p.info["environ"] or {}
        except psutil.Error:
            continue
        if env.get("TMPDIR") == str(tmp) and p.pid != os.getpid():
            procs.append(p.pid)
    return dirs, procs


def gone(tmp: Path, timeout: float = 15) -> tuple[list[str], list[int]]:
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers(tmp)
        if left == ([], []) or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


CASES = [
    ("watch", ["watch", "--netns", NS], "watching"),
    ("capture", ["capture", "--netns", NS, "-w", "out.pcapng"], "capturing"),
]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("name,args,ready", CASES, ids=[c[0] for c in CASES])
def test_a_signal_stops_cleanly_and_leaves_nothing(
    netns: str, tmp_path: Path, sig: int, name: str, args: list[str], ready: str
) -> None:
    proc = start(args, tmp_path)
    try:
        wait_for_line(proc, ready)
        proc.send_signal(sig)
        assert proc.wait(20) in (0, 130), proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert gone(tmp_path) == ([], [])
    if name == "capture":  # partial results written and closed: header plus interface statistics
        assert (tmp_path / "out.pcapng").stat().st_size > 100


def test_kill_9_of_the_controller_leaves_nothing(netns: str, tmp_path: Path) -> None:
    proc = start(["watch", "--netns", netns], tmp_path)
    wait_for_line(proc, "watching")
    assert leftovers(tmp_path)[0], "the agent's directory exists while it runs"
    proc.kill()
    proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()
    # the launcher sees its stdin close: stops the agent and removes its directory
    assert gone(tmp_path) == ([], [])


def test_a_capture_that_cannot_start_leaves_no_file(netns: str, tmp_path: Path) -> None:
    for extra in (["-f", "udp and and"], ["-i", "nope0"]):
        res = subprocess.run(
            [*CLI, "capture", "--netns", netns, "--duration", "1", "-w", "out.pcapng", *extra],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={**os.environ, "TMPDIR": str(tmp_path)},
            check=False,
        )
        assert res.returncode == 1
        assert res.stderr.count("\n") == 1, res.stderr
        assert not (tmp_path / "out.pcapng").exists()
    assert gone(tmp_path) == ([], [])


def test_a_later_run_sweeps_directories_of_dead_runs(netns: str, tmp_path: Path) -> None:
    stale = tmp_path / "meridio-debug-agent-dead"
    stale.mkdir(mode=0o700)
    (stale / "agent.log").write_text("x")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    res = subprocess.run(
        [*CLI, "snapshot", "--netns", netns, "--section", "links"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert gone(tmp_path) == ([], [])


@pytest.fixture(scope="module")
def lab(lab_prefix: Callable[[], str]) -> Iterator[str]:
    from meridio_debug.controller.lab import build_spec, down, up

    spec = build_spec(lab_prefix())
    try:
        up(spec)
        yield spec.prefix
    finally:
        down(spec.prefix)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_trace_active_stops_at_once_on_a_signal_and_writes_what_it_has(
    lab: str, tmp_path: Path, sig: int
) -> None:
    proc = subprocess.Popen(
        [*CLI, "trace", "--lab", "--prefix", lab, "--active", "--duration", "10",
         "-w", "trace.pcapng", "-o", "json", "--flow", "udp 200.100.0.7:40000 -> 20.0.0.1:4000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    try:
        wait_for_line(proc, "capturing")
        t0 = time.monotonic()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert took < 5, f"{took:.1f} s after the signal (the capture lasts 10 s)"
    notes = json.loads(out)["active"]["notes"]
    assert any("stopped early by a signal" in n for n in notes), notes
    assert (tmp_path / "trace.pcapng").stat().st_size > 0
    assert gone(tmp_path) == ([], [])
