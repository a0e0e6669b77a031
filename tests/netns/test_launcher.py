"""The agent launcher (fork server) and the local runtime's use of it.

What a user would notice if it were wrong: an agent answering from the wrong
namespace, agents left running after the command (or after the controller is
killed), a failing agent reported as a hang or a traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meridio_debug.controller.errors import RuntimeUnavailable
from meridio_debug.controller.runtime import PodRef
from meridio_debug.controller.runtime.local import EphemeralTarget, LocalRuntime

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

NS = [f"mdt-la{i}-{os.getpid()}" for i in range(3)]


@pytest.fixture(scope="module")
def namespaces() -> Iterator[list[str]]:
    made: list[str] = []
    try:
        for name in NS:
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
        yield made
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


def pod(ns: str) -> PodRef:
    return PodRef(name=ns, role="unknown", location=ns, runtime="local")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_each_agent_serves_from_its_own_namespace(namespaces: list[str]) -> None:
    runtime = LocalRuntime([pod(n) for n in namespaces])

    async def go() -> dict[str, tuple[str, int]]:
        async def one(p: PodRef) -> tuple[str, str, int]:
            async with runtime.open(p) as client:
                info = await client.get_info()
                return p.name, info.netns, info.pid

        return {
            name: (ns, pid) for name, ns, pid in await asyncio.gather(*map(one, runtime.pods()))
        }

    seen = asyncio.run(go())
    for name in namespaces:
        inode = os.stat(f"/run/netns/{name}").st_ino
        assert seen[name][0] == f"net:[{inode}]"
    pids = [pid for _, pid in seen.values()]
    assert len(set(pids)) == len(namespaces)
    assert not any(alive(p) for p in pids)  # all stopped when the command is done


def test_an_agent_that_fails_is_one_line_with_its_reason(
    namespaces: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the agent's workdir goes
    runtime = LocalRuntime([pod(namespaces[0])], idle_timeout=-1, start_timeout=10)

    async def go() -> None:
        async with runtime.open(pod(namespaces[0])):
            pass

    with pytest.raises(RuntimeUnavailable) as info:
        asyncio.run(go())
    message = str(info.value)
    assert "agent exited with code 2 before serving" in message
    assert "--idle-timeout must be >= 0" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # its socket directory is gone


def test_a_launcher_that_cannot_start_is_one_line(
    namespaces: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    runtime = LocalRuntime([pod(namespaces[0])], python="/nonexistent/python3")

    async def go() -> None:
        async with runtime.open(pod(namespaces[0])):
            pass

    with pytest.raises(RuntimeUnavailable, match="cannot start the agent launcher") as info:
        asyncio.run(go())
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # its private directory is gone


class Launcher:
    """The launcher driven by hand over its JSON-lines protocol, as the controller does."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meridio_debug.agent.launcher"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,  # unbuffered: a line the launcher sent is never hidden from select()
        )
        self.events: list[dict[str, Any]] = []
        assert "ready" in self.read()

    def read(self, timeout: float = 20.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the launcher did not answer"
        line = self.proc.stdout.readline()
        assert line, "the launcher closed its stdout"
        msg: dict[str, Any] = json.loads(line)
        return msg

    def close(self) -> int:
        """Close our end (as a controller that is done or died does) and wait for the exit."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        code = self.proc.wait(10)
        self.proc.stdout.close()
        return code

    def ask(self, req: dict[str, Any] | str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        text = req if isinstance(req, str) else json.dumps(req)
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        while True:
            msg = self.read()
            if "exited" in msg:
                self.events.append(msg)
                continue
            return msg


def test_closing_the_launchers_stdin_stops_every_agent(namespaces: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        launcher = Launcher()
        pids = []
        for i, name in enumerate(namespaces[:2]):
            sock = os.path.join(tmp, f"a{i}.sock")
            reply = launcher.ask(
                {
                    "id": str(i),
                    "netns": f"/run/netns/{name}",
                    "log": os.path.join(tmp, f"a{i}.log"),
                    "args": ["--listen", f"unix:{sock}", "--idle-timeout", "0"],
                }
            )
            assert reply["id"] == str(i)
            pids.append(int(reply["pid"]))
        deadline = time.monotonic() + 20
        while not all(os.path.exists(os.path.join(tmp, f"a{i}.sock")) for i in range(2)):
            assert time.monotonic() < deadline, "agents did not start"
            time.sleep(0.05)
        assert all(alive(p) for p in pids)
        # The controller dies (or is done): its end of the pipe closes.
        assert launcher.close() == 0
        assert not any(alive(p) for p in pids)
        assert not any(os.path.exists(os.path.join(tmp, f"a{i}.sock")) for i in range(2))


def test_bad_requests_get_an_error_and_the_launcher_goes_on(namespaces: list[str]) -> None:
    launcher = Launcher()
    try:
        assert "bad request line" in launcher.ask("not json")["error"]
        missing = launcher.ask(
            {"id": "m", "netns": "/run/netns/mdt-no-such", "log": "/dev/null", "args": []}
        )
        assert missing["id"] == "m" and "No such file" in missing["error"]
        # Only its own unreaped children can be signalled: never an arbitrary pid.
        refused = launcher.ask({"id": "k", "signal": int(signal.SIGTERM), "pid": os.getpid()})
        assert "not a live agent" in refused["error"]
        assert launcher.ask({"id": "x", "netns": 5})["error"].startswith("malformed request")
        # Still serving: an agent that exits at once is reported with its code.
        with tempfile.TemporaryDirectory() as tmp:
            reply = launcher.ask(
                {
                    "id": "e",
                    "netns": f"/run/netns/{namespaces[0]}",
                    "log": os.path.join(tmp, "log"),
                    "args": ["--listen", "not-an-address"],
                }
            )
            pid = int(reply["pid"])
            while not any(e.get("exited") == pid for e in launcher.events):
                launcher.events.append(launcher.read())
            (event,) = [e for e in launcher.events if e.get("exited") == pid]
            assert event["code"] == 1
            with open(os.path.join(tmp, "log")) as f:
                assert "expected unix:/path/to/agent.sock" in f.read()
    finally:
        launcher.close()


def test_reusing_runtime_starts_one_agent_per_pod_and_stops_it(namespaces: list[str]) -> None:
    from meridio_debug.controller.runtime.reuse import ReusingRuntime

    async def go() -> tuple[set[int], list[int]]:
        async with ReusingRuntime(LocalRuntime([pod(n) for n in namespaces[:2]])) as runtime:

            async def pid_of(p: PodRef) -> int:
                async with runtime.open(p) as client:
                    return (await client.get_info()).pid

            # four callers per pod at once, then again: still one agent each
            first = await asyncio.gather(*(pid_of(p) for p in runtime.pods() for _ in range(4)))
            again = await asyncio.gather(*(pid_of(p) for p in runtime.pods()))
            assert set(again) <= set(first)
            return set(first), list(first)

    pids, _ = asyncio.run(go())
    assert len(pids) == 2
    assert not any(alive(p) for p in pids)


def test_one_shot_snapshot_answers_as_the_serving_agent_and_leaves_nothing(
    namespaces: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``snapshot``/``analyze`` take snapshots from one-shot agents: same answer, no leftovers."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the launcher's files go
    subprocess.run(
        ["ip", "-n", namespaces[1], "link", "add", "oneshot0", "type", "bridge"], check=True
    )
    runtime = LocalRuntime([pod(n) for n in namespaces[:2]])

    async def go() -> tuple[list[Any], Any]:
        once = await asyncio.gather(*(runtime.snapshot_once(p) for p in runtime.pods()))
        async with runtime.open(pod(namespaces[1])) as client:
            served = await client.snapshot()
        return once, served

    try:
        once, served = asyncio.run(go())
    finally:
        subprocess.run(["ip", "-n", namespaces[1], "link", "del", "oneshot0"], check=False)
    inodes = [os.stat(f"/run/netns/{n}").st_ino for n in namespaces[:2]]
    assert [s.info.netns for s in once] == [f"net:[{i}]" for i in inodes]
    assert "oneshot0" not in {link.name for link in once[0].links}
    assert "oneshot0" in {link.name for link in once[1].links}
    assert [(s.name, s.state) for s in once[1].sections] == [
        (s.name, s.state) for s in served.sections
    ]
    assert sorted(link.name for link in once[1].links) == sorted(x.name for x in served.links)
    assert not any(alive(s.info.pid) for s in once)
    assert list(tmp_path.iterdir()) == []  # snapshot files, logs and directory are gone


def test_one_shot_that_cannot_join_is_one_line(namespaces: list[str]) -> None:
    runtime = LocalRuntime(
        [pod(namespaces[0])],
        targets={namespaces[0]: EphemeralTarget(container="app", pid=2**22 + 7)},
    )
    with pytest.raises(RuntimeUnavailable, match="target container pid") as info:
        asyncio.run(runtime.snapshot_once(pod(namespaces[0])))
    assert "\n" not in str(info.value)


def test_one_shot_request_for_an_unknown_section_is_refused(namespaces: list[str]) -> None:
    launcher = Launcher()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            reply = launcher.ask(
                {
                    "id": "s",
                    "netns": f"/run/netns/{namespaces[0]}",
                    "log": os.path.join(tmp, "log"),
                    "out": os.path.join(tmp, "snap"),
                    "snapshot": ["links", "bogus"],
                }
            )
            assert reply == {
                "id": "s",
                "error": "malformed request: ValueError('unknown section(s) bogus')",
            }
            assert not os.path.exists(os.path.join(tmp, "snap"))
    finally:
        launcher.close()
