"""Local runtime: agents in network namespaces on this host, over unix sockets.

For each pod an agent runs inside the pod's network namespace. Given an
``EphemeralTarget`` for the pod (the lab gives one for every pod), it joins
the pod as the kubelet starts an ephemeral container with
``targetContainerName``: the target container's PID namespace only, a mount
namespace of its own with /proc, /sys and the pod's /dev/shm (agent/
ephemeral.py); without one only the network namespace changes (a bare
``--netns``). Either way the agent still sees this host's files, so its unix
socket, in a private directory, is reachable from here. The agents are
forked by one launcher process per command (agent/launcher.py: it pays the
Python and gRPC imports once instead of once per pod, which on 2 cores is the
difference between ~1 s and ~8 s for a 49-pod trench). Each agent is stopped
and its directory removed when the caller is done, also on errors and Ctrl-C;
the launcher stops with the last agent, and if the controller dies the
launcher sees its stdin close and stops every agent itself.

Commands that need nothing from a pod but its snapshot (``snapshot``, ``analyze``,
``collect``) use one-shot agents instead (``snapshot_once``): the launcher forks a
child that joins the pod the same way, writes the Snapshot RPC's answer to a file
in the controller's private directory and exits; at most ONE_SHOT_PARALLEL live at
once. Chosen by measurement (perf and cProfile over a 168-pod lab, 2 cores): a
serving agent spent ~3/4 of its CPU on what a snapshot does not need (gRPC server
and its threads, event loop, argument parsing, readiness polling: 20 GetInfo calls
per pod), and 1,000 of them alive at once would hold ~1,000 processes' memory.
One process serving several namespaces cannot be an ephemeral container of each
pod: a process cannot change its own PID namespace (``setns`` of a PID namespace
applies to its children), and ``setns`` of a mount namespace refuses a process with
threads, as any gRPC server is; a fork per pod is also what bounds each agent's
memory and isolates a pod's failure. What a one-shot agent still costs is the fork
(~1 ms: the launcher's page tables), its copy-on-write faults (~1,900 per pod) and
the collectors (bench/gather_scale_bench.py).

Namespaces are never created here: a missing one is ``PodNotFound`` (pyroute2
would create it silently, which is why the existence check is explicit).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from meridio_debug.controller.errors import (
    AgentCallError,
    PodNotFound,
    RuntimeUnavailable,
    UsageError,
)
from meridio_debug.controller.runtime import PodRef
from meridio_debug.controller.runtime.workdirs import mark_owner, sweep
from meridio_debug.controller.wire.client import (
    CHANNEL_OPTIONS,
    AgentClient,
    Snapshot,
    decode_snapshot,
)

NETNS_DIR = Path("/run/netns")
LAUNCHER_MODULE = "meridio_debug.agent.launcher"
LAUNCHER_START_S = 20.0
LAUNCHER_STOP_S = 5.0
ONE_SHOT_TIMEOUT_S = 60.0  # as long as the Snapshot RPC may take (wire/client.py)
# One-shot agents alive at once: each is CPU-bound for ~10-20 ms (collectors, a nft
# run), so a few per core keep every core busy while one waits on nft or bird;
# more would only add memory (each is a fork of the launcher) and contention.
ONE_SHOT_PARALLEL = max(2, 2 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class EphemeralTarget:
    """The container an agent targets, as ``targetContainerName`` names it in a cluster.

    ``pid``: a host pid of that container (its PID 1): the agent shares that
    PID namespace and no other. ``shm``: the host directory that is the pod's
    /dev/shm (bound there in the agent's own mount namespace), "" to keep the
    host's. ``container``/``pod_containers``: names the agent puts on its
    snapshot's sections (which container each came from).
    """

    container: str
    pid: int
    shm: str = ""
    pod_containers: tuple[str, ...] = ()

    def request(self) -> dict[str, Any]:
        """The launcher's request fields for this target (agent/launcher.py)."""
        return {
            "target_pid": self.pid,
            "shm": self.shm,
            "container": self.container,
            "pod_containers": list(self.pod_containers),
        }


def netns_path(pod: PodRef) -> str:
    """The namespace file the agent joins for ``pod``; PodNotFound when it does not exist."""
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


class AgentLauncher:
    """The controller's end of one ``meridio_debug.agent.launcher`` process.

    Started on the first agent a runtime needs and stopped after the last one
    stops, so a command pays the agent's imports once however many pods it
    opens. Requests are JSON lines; a reader task routes answers to waiting
    callers and records every child's exit.
    """

    def __init__(self, python: str) -> None:
        self._python = python
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._ready: asyncio.Future[int] | None = None
        self._stderr: asyncio.Task[None] | None = None
        self._last_error = ""
        self._next = 0
        self._users = 0
        self._lock = asyncio.Lock()
        self._files = 0
        self.workdir = ""  # private (0700), one per launcher run: sockets, logs, snapshots
        self.loop: asyncio.AbstractEventLoop | None = None
        # One-shot snapshots at once (see LocalRuntime.snapshot_once).
        self.slots = asyncio.Semaphore(ONE_SHOT_PARALLEL)

    async def acquire(self) -> None:
        async with self._lock:
            if self._proc is None:
                await self._start()
            self._users += 1

    async def release(self) -> None:
        async with self._lock:
            self._users -= 1
            if self._users == 0 and self._proc is not None:
                await self._stop()

    def paths(self, *suffixes: str) -> list[str]:
        """Fresh file names in the launcher's private directory, one per suffix."""
        self._files += 1
        return [os.path.join(self.workdir, f"{self._files}.{s}") for s in suffixes]

    async def _start(self) -> None:
        self.loop = asyncio.get_running_loop()
        sweep()  # directories of runs that died with their launcher (runtime/workdirs.py)
        self.workdir = tempfile.mkdtemp(prefix="meridio-debug-agent-")
        mark_owner(self.workdir)
        self._ready = self.loop.create_future()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self._python,
                "-m",
                LAUNCHER_MODULE,
                self.workdir,  # the launcher removes it too, if we die
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = ""
            raise RuntimeUnavailable(
                f"cannot start the agent launcher with {self._python}: {exc.strerror}"
            ) from None
        self._reader = asyncio.create_task(self._read())
        self._stderr = asyncio.create_task(self._read_stderr())
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), LAUNCHER_START_S)
        except (TimeoutError, RuntimeUnavailable):
            await self._stop()
            raise RuntimeUnavailable(
                f"the agent launcher ({self._python} -m {LAUNCHER_MODULE}) did not start: "
                f"{self._last_error or 'no output'}"
            ) from None

    async def _read_stderr(self) -> None:
        """Keep the launcher's last stderr line (its one-line reason when it fails)."""
        assert self._proc is not None and self._proc.stderr is not None
        stderr = self._proc.stderr
        while line := await stderr.readline():
            text = line.decode(errors="replace").strip()
            if text:
                self._last_error = text

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        while True:
            line = await stdout.readline()
            if not line:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "ready" in msg and self._ready is not None and not self._ready.done():
                self._ready.set_result(int(msg["ready"]))
            elif "exited" in msg:
                self._exit_future(int(msg["exited"])).set_result(int(msg["code"]))
            else:
                fut = self._pending.pop(str(msg.get("id", "")), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        gone = RuntimeUnavailable("the agent launcher exited")
        waiting: list[asyncio.Future[Any]] = [*self._pending.values()]
        if self._ready is not None:
            waiting.append(self._ready)
        for waiter in waiting:
            if not waiter.done():
                waiter.set_exception(gone)
        self._pending.clear()
        for exit_fut in self._exits.values():
            if not exit_fut.done():
                exit_fut.set_result(-signal.SIGKILL)

    def _exit_future(self, pid: int) -> asyncio.Future[int]:
        fut = self._exits.get(pid)
        if fut is None:
            assert self.loop is not None
            fut = self._exits[pid] = self.loop.create_future()
        return fut

    async def _request(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self._proc is None or self._proc.stdin is None or self.loop is None:
            raise RuntimeUnavailable("the agent launcher is not running")
        self._next += 1
        rid = str(self._next)
        fut: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self._pending[rid] = fut
        try:
            self._proc.stdin.write((json.dumps({"id": rid, **msg}) + "\n").encode())
            await self._proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            self._pending.pop(rid, None)
            raise RuntimeUnavailable("the agent launcher exited") from None
        reply = await fut
        if "error" in reply:
            raise RuntimeUnavailable(str(reply["error"]))
        return reply

    async def spawn(
        self,
        netns: str,
        log_path: str,
        args: Sequence[str],
        target: EphemeralTarget | None = None,
    ) -> int:
        """Fork an agent in ``netns`` (joining ``target``'s container when given); its pid."""
        request = {"netns": netns, "log": log_path, "args": list(args)}
        reply = await self._request({**request, **(target.request() if target else {})})
        pid = int(reply["pid"])
        self._exit_future(pid)
        return pid

    async def snapshot(
        self,
        netns: str,
        log_path: str,
        out: str,
        sections: Sequence[str],
        target: EphemeralTarget | None,
    ) -> int:
        """Fork a one-shot agent that writes one Snapshot to ``out`` and exits; its pid."""
        request = {"netns": netns, "log": log_path, "snapshot": list(sections), "out": out}
        reply = await self._request({**request, **(target.request() if target else {})})
        pid = int(reply["pid"])
        self._exit_future(pid)
        return pid

    async def wait(self, pid: int) -> int:
        """The exit code of child ``pid``, once the launcher reaped it."""
        code = await asyncio.shield(self._exit_future(pid))
        self._exits.pop(pid, None)
        return code

    def exited(self, pid: int) -> int | None:
        """The agent's exit code once it has ended, else None."""
        fut = self._exits.get(pid)
        return fut.result() if fut is not None and fut.done() else None

    async def stop_agent(self, pid: int, grace: float = 3.0) -> None:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL; returns once the launcher reaped it."""
        done = self._exit_future(pid)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
            if done.done():
                break
            with contextlib.suppress(RuntimeUnavailable):
                await self._request({"signal": int(sig), "pid": pid})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), wait)
        self._exits.pop(pid, None)

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), LAUNCHER_STOP_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        for task in (self._reader, self._stderr):
            if task is not None:
                await task
        self._reader = self._stderr = None
        self._exits.clear()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = ""


class LocalRuntime:
    """Starts an agent per pod inside its namespace on this host (through one launcher)."""

    def __init__(
        self,
        pods: Sequence[PodRef],
        python: str = sys.executable,
        start_timeout: float = 15.0,
        idle_timeout: float = 600.0,
        targets: Mapping[str, EphemeralTarget] | None = None,
    ) -> None:
        """``targets``: pod name -> the container its agent joins (see EphemeralTarget)."""
        self._pods = list(pods)
        self._targets = dict(targets or {})
        self._python = python
        self._start_timeout = start_timeout
        self._idle_timeout = idle_timeout
        self._launcher: AgentLauncher | None = None

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

    def agent_args(self, socket_path: str) -> list[str]:
        """The agent's own command line (after the launcher joined the namespace)."""
        return [
            "--listen",
            f"unix:{socket_path}",
            "--idle-timeout",
            str(self._idle_timeout),
            "--log-level",
            "WARNING",
        ]

    def _launcher_for_loop(self) -> AgentLauncher:
        loop = asyncio.get_running_loop()
        if self._launcher is None or self._launcher.loop not in (None, loop):
            self._launcher = AgentLauncher(self._python)
        return self._launcher

    @contextlib.asynccontextmanager
    async def open(self, pod: PodRef) -> AsyncIterator[AgentClient]:
        if os.geteuid() != 0:
            raise RuntimeUnavailable(
                f"{pod.name}: entering a network namespace needs root (run as root or with sudo)"
            )
        netns = netns_path(pod)
        launcher = self._launcher_for_loop()
        await launcher.acquire()  # first: a launcher that cannot start leaves no directory
        workdir = tempfile.mkdtemp(prefix="meridio-debug-agent-")
        socket_path = os.path.join(workdir, "agent.sock")
        log_path = os.path.join(workdir, "agent.log")
        pid: int | None = None
        channel: grpc.aio.Channel | None = None
        try:
            pid = await launcher.spawn(
                netns, log_path, self.agent_args(socket_path), self._targets.get(pod.name)
            )
            channel = grpc.aio.insecure_channel(f"unix:{socket_path}", options=CHANNEL_OPTIONS)
            client = AgentClient(channel, pod.name)
            await self._wait_ready(
                pod,
                launcher=launcher,
                pid=pid,
                client=client,
                socket_path=socket_path,
                log_path=log_path,
            )
            yield client
        finally:
            try:
                if channel is not None:
                    await channel.close(grace=None)
                if pid is not None:
                    await launcher.stop_agent(pid)
            finally:
                await launcher.release()
                shutil.rmtree(workdir, ignore_errors=True)

    async def snapshot_once(self, pod: PodRef, sections: Sequence[str] = ()) -> Snapshot:
        """``pod``'s snapshot from a one-shot agent: forked, joined, snapshot written, gone.

        For commands that need nothing from a pod but its snapshot (``snapshot``,
        ``analyze``, gather): no agent serves, so nothing waits for a socket, no
        gRPC server starts, and at most ONE_SHOT_PARALLEL agents live at once
        whatever the number of pods (a 1,000-target lab would otherwise hold
        1,000 agents and their memory at the same time). The answer is the
        Snapshot RPC's own (agent/launcher.py ``snapshot_child``).
        """
        if os.geteuid() != 0:
            raise RuntimeUnavailable(
                f"{pod.name}: entering a network namespace needs root (run as root or with sudo)"
            )
        netns = netns_path(pod)
        launcher = self._launcher_for_loop()
        # Held while waiting for a slot too: the launcher stays up between slots.
        await launcher.acquire()
        out = log_path = ""
        try:
            async with launcher.slots:
                out, log_path = launcher.paths("snapshot", "log")
                pid = await launcher.snapshot(
                    netns, log_path, out, sections, self._targets.get(pod.name)
                )
                try:
                    code = await asyncio.wait_for(launcher.wait(pid), ONE_SHOT_TIMEOUT_S)
                except asyncio.CancelledError:
                    await launcher.stop_agent(pid, grace=0.5)
                    raise
                except TimeoutError:
                    await launcher.stop_agent(pid, grace=0.5)
                    raise RuntimeUnavailable(
                        f"{pod.name}: the agent took no snapshot within {ONE_SHOT_TIMEOUT_S:.0f} s "
                        f"({last_line(log_path) or 'no output'})"
                    ) from None
                if code != 0:
                    raise RuntimeUnavailable(
                        f"{pod.name}: agent exited with code {code} before its snapshot: "
                        f"{last_line(log_path) or 'no output'}"
                    )
                with open(out, "rb") as f:
                    data = f.read()
            return decode_snapshot(data, pod.name)
        finally:
            for path in (out, log_path):
                if path:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            await launcher.release()

    async def _wait_ready(
        self,
        pod: PodRef,
        *,
        launcher: AgentLauncher,
        pid: int,
        client: AgentClient,
        socket_path: str,
        log_path: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout
        while True:
            code = launcher.exited(pid)
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
