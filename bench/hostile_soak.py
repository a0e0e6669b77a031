"""Soak: the agent under hostile load keeps bounded memory, no leaked fds or threads, no crash.

Why: an agent is injected into a production pod and never restarted; a
broken or hostile client must not be able to grow it without bound or take it
down (issue 13). One agent runs in a namespace of its own (a veth pair, lo);
this script is its only client and prints the agent's RSS, open fds and
threads before, during (peak, sampled every 50 ms) and after each phase:

1. 10,000 hostile requests from 8 threads: random bytes to every method, NUL
   and control characters in strings, NaN/inf durations, a 1 MB interface
   name, a 100 KB filter, invalid filters, unknown sections;
2. 50 concurrent streams (captures and watches) held for 3 s while traffic
   flows, beyond the agent's caps (the rest must be RESOURCE_EXHAUSTED);
3. 100 disconnects: a stream opened, its first message read, the connection
   dropped;

then waits 5 s and measures again. The baseline is the same agent after
GetInfo and one Snapshot, in the same run; the after/baseline ratio is
printed. Statuses are counted: UNKNOWN or INTERNAL, or the agent gone, is a
failure (exit 1).

    .venv/bin/python bench/hostile_soak.py [--requests 10000] [--streams 50] [--disconnects 100]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil

from meridio_debug.protos import agent_pb2 as pb
from meridio_debug.protos import agent_pb2_grpc as pb_grpc
from meridio_debug.protos import probe_pb2 as ppb
from meridio_debug.protos import probe_pb2_grpc as ppb_grpc

NS = f"mdb-soak-{os.getpid()}"
MIB = 1024 * 1024
RAW_METHODS = [
    ("/meridio_debug.v1.Agent/GetInfo", False),
    ("/meridio_debug.v1.Agent/Snapshot", False),
    ("/meridio_debug.v1.Agent/Watch", True),
    ("/meridio_debug.v1.Agent/Capture", True),
    ("/meridio_debug.v1.Agent/StopCapture", False),
    ("/meridio_debug.v1.Probe/RouteGet", False),
    ("/meridio_debug.v1.Probe/SendProbes", False),
]


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class Sampler:
    """Samples the agent's RSS, fds and threads every 50 ms; keeps the peaks."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = (0, 0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> tuple[int, int, int]:
        return self.proc.memory_info().rss, self.proc.num_fds(), self.proc.num_threads()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss, fds, threads = self.now()
            except psutil.Error:
                return
            self.peak = (max(self.peak[0], rss), max(self.peak[1], fds), max(self.peak[2], threads))
            time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _socket_families(pid: int) -> dict[str, str]:
    """socket inode -> family (unix, netlink, packet, tcp, udp), as the agent's netns sees them."""
    families: dict[str, str] = {}
    for family in ("unix", "netlink", "packet", "tcp", "tcp6", "udp", "udp6", "raw", "raw6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{family}") as f:
            next(f)
            for line in f:
                fields = line.split()
                inode = {"unix": 6, "netlink": 9, "packet": 8}.get(family, 9)
                if len(fields) > inode:
                    families[fields[inode]] = family
    return families


def fd_kinds(pid: int) -> Counter[str]:
    """The agent's open fds by kind (pipe, a path, socket by family...)."""
    kinds: Counter[str] = Counter()
    families = _socket_families(pid)
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            kind, _, rest = target.partition(":[")
            if kind == "socket":
                kind = f"socket ({families.get(rest.rstrip(']'), '?')})"
            kinds[kind] += 1
    return kinds


def fmt(sample: tuple[int, int, int]) -> str:
    return f"rss {sample[0] / MIB:7.1f} MiB  fds {sample[1]:4d}  threads {sample[2]:3d}"


def status(fn: Callable[[], object]) -> str:
    try:
        result = fn()
        if isinstance(result, grpc.Call) or hasattr(result, "__next__"):
            for _ in result:  # type: ignore[attr-defined]
                break
    except grpc.RpcError as exc:
        return exc.code().name  # type: ignore[no-any-return]
    return "OK"


def hostile_calls(channel: grpc.Channel, rng: random.Random) -> list[Callable[[], object]]:
    agent, probe = pb_grpc.AgentStub(channel), ppb_grpc.ProbeStub(channel)
    method, streaming = rng.choice(RAW_METHODS)
    body = rng.randbytes(rng.randrange(1, 200))
    raw: Callable[[], object] = (
        (lambda: channel.unary_stream(method)(body, timeout=10))
        if streaming
        else (lambda: channel.unary_unary(method)(body, timeout=10))
    )
    return [
        raw,
        lambda: probe.RouteGet(
            ppb.RouteGetRequest(queries=[ppb.RouteQuery(dst="10.0.0.1", iif="v0\0x")]), timeout=10
        ),
        lambda: probe.SendProbes(
            ppb.SendProbesRequest(proto="udp", src="10.0.0.1", dst="10.0.0.2", iif="a\0b"),
            timeout=10,
        ),
        lambda: agent.Watch(pb.WatchRequest(duration_s=math.nan), timeout=10),
        lambda: agent.Capture(pb.CaptureRequest(duration_s=math.inf), timeout=10),
        lambda: agent.Capture(pb.CaptureRequest(filter="udp\0 and and garbage"), timeout=10),
        lambda: agent.Capture(pb.CaptureRequest(filter="udp and and", duration_s=1), timeout=10),
        lambda: agent.Snapshot(pb.SnapshotRequest(sections=["bogus\n"]), timeout=10),
        lambda: agent.Capture(pb.CaptureRequest(interfaces=["x" * 1_000_000]), timeout=10),
        lambda: agent.Capture(pb.CaptureRequest(filter=" or ".join(["udp"] * 25_000)), timeout=10),
    ]


def phase_requests(sock: str, n: int, codes: Counter[str]) -> None:
    weights = [40, 8, 8, 8, 8, 8, 4, 8, 4, 4]  # raw bodies most; the big ones least

    def worker(seed: int, count: int) -> Counter[str]:
        rng = random.Random(seed)
        out: Counter[str] = Counter()
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            for _ in range(count):
                call = rng.choices(hostile_calls(channel, rng), weights)[0]
                out[status(call)] += 1
        return out

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for result in pool.map(worker, range(8), [n // 8] * 8):
            codes.update(result)


def phase_streams(sock: str, n: int, codes: Counter[str], ns: str) -> None:
    channel = grpc.insecure_channel(f"unix:{sock}")
    agent = pb_grpc.AgentStub(channel)
    calls: list[grpc.Call] = []
    for i in range(n):
        if i % 2:
            call = agent.Watch(pb.WatchRequest(duration_s=30))
        else:
            call = agent.Capture(pb.CaptureRequest(duration_s=30, interfaces=["v0"]))
        calls.append(call)
    for i, call in enumerate(calls):
        try:
            call.initial_metadata()
            if not i % 2:
                next(call)  # type: ignore[call-overload]  # a capture's start
            codes["stream OK"] += 1
        except grpc.RpcError as exc:
            codes[f"stream {exc.code().name}"] += 1
        except StopIteration:
            codes["stream ended"] += 1
    # traffic while they run: pings over the veth
    subprocess.run(
        ["ip", "netns", "exec", ns, "ping", "-q", "-i", "0.01", "-c", "250", "-s", "1400",
         "10.88.0.2"],
        capture_output=True, check=False,
    )  # fmt: skip
    time.sleep(3)
    for call in calls:
        call.cancel()
    channel.close()


def phase_disconnects(sock: str, n: int, codes: Counter[str]) -> None:
    for i in range(n):
        channel = grpc.insecure_channel(f"unix:{sock}")
        agent = pb_grpc.AgentStub(channel)
        call = (
            agent.Capture(pb.CaptureRequest(duration_s=30))
            if i % 2
            else agent.Watch(pb.WatchRequest(duration_s=30))
        )
        try:
            call.initial_metadata()
            codes["disconnect OK"] += 1
        except grpc.RpcError as exc:
            codes[f"disconnect {exc.code().name}"] += 1
        channel.close()  # drop the connection mid-stream


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--disconnects", type=int, default=100)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("hostile_soak: needs root (a network namespace)", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="mdb-soak-")
    sock, log = f"{workdir}/agent.sock", Path(workdir) / "agent.log"
    sh("ip", "netns", "add", NS)
    proc: subprocess.Popen[bytes] | None = None
    try:
        sh("ip", "-n", NS, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        for dev in ("lo", "v0", "v1"):
            sh("ip", "-n", NS, "link", "set", dev, "up")
        sh("ip", "-n", NS, "addr", "add", "10.88.0.1/24", "dev", "v0")
        sh("ip", "-n", NS, "neigh", "add", "10.88.0.2", "lladdr", "02:00:00:00:00:02", "dev", "v0")
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", NS, sys.executable, "-m", "meridio_debug.agent.main",
                 "--listen", f"unix:{sock}", "--idle-timeout", "0", "--log-level", "WARNING"],
                stdout=f, stderr=f,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"hostile_soak: the agent did not start: {log.read_text()}", file=sys.stderr)
                return 1
            time.sleep(0.05)
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            stub = pb_grpc.AgentStub(channel)
            stub.GetInfo(pb.InfoRequest(), timeout=30, wait_for_ready=True)
            stub.Snapshot(pb.SnapshotRequest(), timeout=60)
        sampler_pid = proc.pid
        base = Sampler(sampler_pid).now()
        base_fds = fd_kinds(sampler_pid)
        print(f"baseline                              {fmt(base)}")
        codes: Counter[str] = Counter()
        phases: list[tuple[str, Callable[[], None]]] = [
            (f"{args.requests} hostile requests", lambda: phase_requests(sock, args.requests, codes)),
            (f"{args.streams} concurrent streams", lambda: phase_streams(sock, args.streams, codes, NS)),
            (f"{args.disconnects} disconnects", lambda: phase_disconnects(sock, args.disconnects, codes)),
        ]  # fmt: skip
        overall_peak = base
        for name, run in phases:
            t0 = time.monotonic()
            with Sampler(sampler_pid) as s:
                run()
            after = s.now()
            overall_peak = tuple(max(a, b) for a, b in zip(overall_peak, s.peak, strict=True))  # type: ignore[assignment]
            print(f"{name:<30} {time.monotonic() - t0:5.1f} s")
            print(f"  peak during                         {fmt(s.peak)}")
            print(f"  right after                         {fmt(after)}")
        time.sleep(5)
        end = Sampler(sampler_pid).now()
        print(f"after 5 s idle                        {fmt(end)}")
        extra = fd_kinds(sampler_pid) - base_fds
        if extra:
            print("  fds beyond the baseline: " + ", ".join(f"{k} {v}" for k, v in extra.items()))
        print(f"peak over all phases                  {fmt(overall_peak)}")
        print(
            f"ratios to baseline: peak rss {overall_peak[0] / base[0]:.2f}x, "
            f"final rss {end[0] / base[0]:.2f}x, fds {end[1] - base[1]:+d}, "
            f"threads {end[2] - base[2]:+d}"
        )
        print("statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(codes.items())))
        alive = proc.poll() is None
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            pb_grpc.AgentStub(channel).GetInfo(pb.InfoRequest(), timeout=10)
        tracebacks = log.read_text(errors="replace").count("Traceback")
        print(f"agent alive: {alive}; tracebacks in its log: {tracebacks}")
        bad = codes["UNKNOWN"] + codes["INTERNAL"] + tracebacks
        return 0 if alive and not bad else 1
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        subprocess.run(["ip", "netns", "del", NS], check=False)
        subprocess.run(["rm", "-rf", workdir], check=False)


if __name__ == "__main__":
    sys.exit(main())
