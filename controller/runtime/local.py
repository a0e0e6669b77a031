"""Local runtime: agents in network namespaces on this host, over unix sockets.

For each pod the agent is started as a child process inside the namespace
(``nsenter --net=...``: only the network namespace changes, so the agent still
sees this host's files and its unix socket is reachable from here) and
reached over a unix socket in a private directory. The agent is stopped and
its directory removed when the caller is done, also on errors and Ctrl-C.

Namespaces are never created here: a missing one is ``PodNotFound`` (pyroute2
would create it silently, which is why the existence check is explicit).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc

from meridio_debug.controller.client import CHANNEL_OPTIONS, AgentClient
from meridio_debug.controller.errors import (
    AgentCallError,
    PodNotFound,
    RuntimeUnavailable,
    UsageError,
)
from meridio_debug.controller.runtime import PodRef

NETNS_DIR = Path("/run/netns")
AGENT_MODULE = "meridio_debug.agent.main"


def netns_path(pod: PodRef) -> str:
    """The namespace file nsenter joins for ``pod``; PodNotFound when it does not exist."""
    if pod.location.startswith("pid:"):
        pid = pod.location[4:]
        path = f"/proc/{pid}/ns/net"
        if not os.path.exists(path):
            raise PodNotFound(f"{pod.name}: no process with pid {pid} (cannot join its namespace)")
        return path
    path = str(NETNS_DIR / pod.location)
    if not os.path.exists(path):
        raise PodNotFound(
            f"{pod.name}: network namespace {pod.location!r} does not exist "
            "(`ip netns list` shows the names)"
        )
    return path


class LocalRuntime:
    """Starts an agent per pod inside its namespace on this host."""

    def __init__(
        self,
        pods: Sequence[PodRef],
        python: str = sys.executable,
        start_timeout: float = 15.0,
        idle_timeout: float = 600.0,
    ) -> None:
        self._pods = list(pods)
        self._python = python
        self._start_timeout = start_timeout
        self._idle_timeout = idle_timeout

    @classmethod
    def for_netns(cls, names: Sequence[str]) -> LocalRuntime:
        return cls([PodRef(name=n, role="unknown", location=n, runtime="local") for n in names])

    @classmethod
    def for_pids(cls, pids: Sequence[int]) -> LocalRuntime:
        return cls(
            [
                PodRef(name=f"pid-{p}", role="unknown", location=f"pid:{p}", runtime="local")
                for p in pids
            ]
        )

    def pods(self) -> list[PodRef]:
        return list(self._pods)

    def agent_argv(self, pod: PodRef, socket_path: str) -> list[str]:
        nsenter = shutil.which("nsenter")
        if nsenter is None:
            raise RuntimeUnavailable("nsenter not found: install util-linux")
        return [
            nsenter,
            f"--net={netns_path(pod)}",
            "--",
            self._python,
            "-m",
            AGENT_MODULE,
            "--listen",
            f"unix:{socket_path}",
            "--idle-timeout",
            str(self._idle_timeout),
            "--log-level",
            "WARNING",
        ]

    @contextlib.asynccontextmanager
    async def open(self, pod: PodRef) -> AsyncIterator[AgentClient]:
        if os.geteuid() != 0:
            raise RuntimeUnavailable(
                f"{pod.name}: entering a network namespace needs root (run as root or with sudo)"
            )
        workdir = tempfile.mkdtemp(prefix="meridio-debug-agent-")
        socket_path = os.path.join(workdir, "agent.sock")
        log_path = os.path.join(workdir, "agent.log")
        proc: subprocess.Popen[bytes] | None = None
        channel: grpc.aio.Channel | None = None
        try:
            argv = self.agent_argv(pod, socket_path)
            with open(log_path, "wb") as log_file:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log_file,
                    start_new_session=True,
                )
            channel = grpc.aio.insecure_channel(f"unix:{socket_path}", options=CHANNEL_OPTIONS)
            client = AgentClient(channel, pod.name)
            await self._wait_ready(pod, proc, client, socket_path, log_path)
            yield client
        finally:
            if channel is not None:
                await channel.close(grace=None)
            if proc is not None:
                await asyncio.to_thread(stop_process, proc)
            shutil.rmtree(workdir, ignore_errors=True)

    async def _wait_ready(
        self,
        pod: PodRef,
        proc: subprocess.Popen[bytes],
        client: AgentClient,
        socket_path: str,
        log_path: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise RuntimeUnavailable(
                    f"{pod.name}: agent exited with code {code} before serving: {last_line(log_path)}"
                )
            if os.path.exists(socket_path):
                try:
                    await client.get_info(timeout=1.0)
                    return
                except AgentCallError:
                    pass
            if loop.time() > deadline:
                raise RuntimeUnavailable(
                    f"{pod.name}: agent did not serve within {self._start_timeout:.0f} s "
                    f"({last_line(log_path) or 'no output'})"
                )
            await asyncio.sleep(0.02)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL; always reaps."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def last_line(path: str) -> str:
    """The last non-empty line of a log file (the agent's one-line error), or ''."""
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def select_pods(available: Sequence[PodRef], names: Sequence[str]) -> list[PodRef]:
    """The pods named (all when none), in the order given; UsageError for an unknown name."""
    if not names:
        return list(available)
    by_name = {p.name: p for p in available}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UsageError(f"unknown pod(s) {', '.join(unknown)}; this lab has: {', '.join(by_name)}")
    return [by_name[n] for n in names]
