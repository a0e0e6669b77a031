"""Agent start as a kubelet starts it: a fresh process, to serving, and its idle RSS.

Why: every injected ephemeral container pays the agent's start (issue 16:
target < 0.5 s to serving, RSS idle < 60 MB), and the launcher's fork (local
runtime) hides it, so this bench execs a new interpreter each time, like a
container runtime does. Baselines, measured in the same run and printed as
ratios so a loaded machine does not fake a regression or a gain:

- ``python -c pass``: the interpreter's own start (the floor);
- ``import grpc.aio`` + the generated agent protos: what any gRPC agent in
  Python must load.

Measured per start (median of ``--repeats``):

- unix socket (the local runtime's form), in an empty network namespace the
  bench creates (``mdbstart<pid>``, deleted at the end): until GetInfo
  answers; the agent's CPU until then and for its first full snapshot (what
  each injected agent costs its node: on a first run with 48 pods that CPU,
  not the wall time of one start, decides the command's time on 2 cores);
- tcp + mutual TLS with ``--tls-client-ca-env`` (the form an ephemeral
  container runs; a fresh self-signed key and certificate each start):
  until the ``ready`` line on stderr, i.e. the server listens;
- RSS and PSS of the idle agent 1 s after it serves.

Needs root (the namespace). Also prints ``-X importtime``'s ten costliest top-level imports of one start.

    .venv/bin/python bench/agent_start_bench.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from meridio_debug.controller.runtime.tls import create_ca
from meridio_debug.protos import agent_pb2 as pb
from meridio_debug.protos import agent_pb2_grpc as pb_grpc

AGENT = [sys.executable, "-m", "meridio_debug.agent.main"]
# gRPC's default reconnect backoff (1 s, growing) would time the client's wait, not the
# agent's start: a first connect before the socket exists is the normal case here.
FAST_RETRY = [
    ("grpc.initial_reconnect_backoff_ms", 5),
    ("grpc.min_reconnect_backoff_ms", 5),
    ("grpc.max_reconnect_backoff_ms", 20),
]
DEPS = "import grpc.aio; from meridio_debug.protos import agent_pb2_grpc, probe_pb2_grpc"


def run_to_exit(code: str) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of ``python -c code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has run, all its threads, ended ones too.

    /proc/PID/stat, in clock ticks (10 ms): schedstat has nanoseconds but per
    thread, and the snapshot's collectors run in threads that end.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr:
        proc.stderr.close()


@dataclass
class UnixStart:
    seconds: float  # until GetInfo answers
    rss: float  # MiB, idle, 1 s after serving
    pss: float
    cpu_serving: float  # CPU seconds from exec to GetInfo answered
    cpu_snapshot: float  # CPU seconds of the first full snapshot


def start_unix(netns: str) -> UnixStart:
    """A fresh agent in ``netns`` on a unix socket: until serving, idle memory, first snapshot."""
    private = tempfile.mkdtemp(prefix="mdb-start-")
    path = f"{private}/agent.sock"
    cmd = ["ip", "netns", "exec", netns, *AGENT, "--listen", f"unix:{path}",
           "--idle-timeout", "60", "--log-level", "WARNING"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with grpc.insecure_channel(f"unix:{path}", options=FAST_RETRY) as channel:
            stub = pb_grpc.AgentStub(channel)
            while True:
                if proc.poll() is not None:
                    raise SystemExit("the agent exited before serving")
                try:
                    stub.GetInfo(pb.InfoRequest(), timeout=1)
                    break
                except grpc.RpcError:
                    if time.perf_counter() - start > 30:
                        raise SystemExit("the agent did not answer within 30 s") from None
                    time.sleep(0.002)
            elapsed = time.perf_counter() - start
            serving = cpu_s(proc.pid)
            time.sleep(1.0)
            rss, pss = rss_mib(proc.pid), pss_mib(proc.pid)
            before = cpu_s(proc.pid)
            stub.Snapshot(pb.SnapshotRequest(), timeout=30)
            snapshot = cpu_s(proc.pid) - before
        return UnixStart(elapsed, rss, pss, serving, snapshot)
    finally:
        stop(proc)
        Path(path).unlink(missing_ok=True)
        Path(private).rmdir()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_tls(ca_pem: bytes) -> tuple[float, float, float]:
    """Seconds until a tcp+mTLS agent prints ``ready``; its idle RSS and PSS (MiB) 1 s later."""
    env = dict(os.environ, MDB_BENCH_CA=ca_pem.decode())
    cmd = [*AGENT, "--listen", f"tcp:127.0.0.1:{free_port()}", "--tls-client-ca-env",
           "MDB_BENCH_CA", "--idle-timeout", "60"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith(b"ready "):
                break
        else:
            raise SystemExit("the tls agent exited before serving")
        elapsed = time.perf_counter() - start
        time.sleep(1.0)
        return elapsed, rss_mib(proc.pid), pss_mib(proc.pid)
    finally:
        stop(proc)


def importtime_top(n: int = 10) -> list[str]:
    private = tempfile.mkdtemp(prefix="mdb-start-")
    path = f"{private}/agent.sock"
    cmd = [sys.executable, "-X", "importtime", "-m", "meridio_debug.agent.main",
           "--listen", f"unix:{path}", "--idle-timeout", "0.5"]  # fmt: skip
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=30, check=False).stderr.decode()
    finally:
        Path(path).unlink(missing_ok=True)
        Path(private).rmdir()
    rows = []
    for line in out.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) <= 1:  # top level: imported by the agent's start itself
            rows.append((int(m.group(1)), m.group(3)))
    rows.sort(reverse=True)
    return [f"{us / 1000:7.1f} ms  {name}" for us, name in rows[:n]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    ca_pem, _ = create_ca()
    netns = f"mdbstart{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        runs = measure(args.repeats, netns, ca_pem)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=True)
    report(args.repeats, runs)
    return 0


def measure(repeats: int, netns: str, ca_pem: bytes) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {}
    for _ in range(repeats):  # interleaved: load changes hit every series alike
        wall, cpu = run_to_exit("pass")
        sample = {"floor": wall, "floor_cpu": cpu}
        sample["deps"], sample["deps_cpu"] = run_to_exit(DEPS)
        u = start_unix(netns)
        sample |= {"unix": u.seconds, "rss_unix": u.rss, "pss_unix": u.pss,
                   "cpu_serving": u.cpu_serving, "cpu_snapshot": u.cpu_snapshot}  # fmt: skip
        sample["tls"], sample["rss_tls"], sample["pss_tls"] = start_tls(ca_pem)
        for key, value in sample.items():
            runs.setdefault(key, []).append(value)
    return runs


def report(repeats: int, runs: dict[str, list[float]]) -> None:
    med = {k: statistics.median(v) for k, v in runs.items()}
    ms = {k: v * 1000 for k, v in med.items()}
    load = os.getloadavg()[0]
    print(f"agent start, fresh process, median of {repeats} (load average {load:.1f}, "
          f"{os.cpu_count()} cores)")  # fmt: skip
    print(f"  baseline python -c pass             {ms['floor']:7.0f} ms")
    print(f"  baseline grpc.aio + agent protos    {ms['deps']:7.0f} ms  "
          f"({ms['deps'] / ms['floor']:.2f}x the interpreter)")  # fmt: skip
    for key, label in (("unix", "agent unix, GetInfo answers"),
                       ("tls", "agent tcp+mTLS, ready (kubelet form)")):  # fmt: skip
        print(f"  {label:<36}{ms[key]:7.0f} ms  ({ms[key] / ms['floor']:.2f}x the "
              f"interpreter, {ms[key] / ms['deps']:.2f}x its imports; target < 500 ms)")  # fmt: skip
    print(f"  CPU (what each injected agent costs its node): interpreter {ms['floor_cpu']:.0f} ms, "
          f"imports {ms['deps_cpu']:.0f} ms; agent to serving {ms['cpu_serving']:.0f} ms "
          f"({ms['cpu_serving'] / ms['floor_cpu']:.2f}x the interpreter), its first full "
          f"snapshot of an empty netns {ms['cpu_snapshot']:.0f} ms")  # fmt: skip
    print(f"  RSS idle: unix {med['rss_unix']:.0f} MiB, tcp+mTLS {med['rss_tls']:.0f} MiB "
          f"(target < 60 MB); PSS {med['pss_unix']:.0f} / {med['pss_tls']:.0f} MiB")  # fmt: skip
    print("  (RSS counts every mapped page of the shared libraries that is resident: it is a few")
    print("   MiB higher when their files are hot in the page cache (fault-around), PSS is not)")
    print("  costliest top-level imports of one start (-X importtime, cumulative):")
    for row in importtime_top():
        print("   ", row)


if __name__ == "__main__":
    sys.exit(main())
