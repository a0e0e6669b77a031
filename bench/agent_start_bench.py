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

- unix socket (the local runtime's form): until GetInfo answers;
- tcp + mutual TLS with ``--tls-client-ca-env`` (the form an ephemeral
  container runs; a fresh self-signed key and certificate each start):
  until the ``ready`` line on stderr, i.e. the server listens;
- RSS of the idle agent 1 s after it serves, and the modules it imported.

Also prints ``-X importtime``'s ten costliest top-level imports of one start.

    .venv/bin/python bench/agent_start_bench.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
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


def run_to_exit(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


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


def start_unix() -> tuple[float, float]:
    """Seconds until GetInfo answers on a unix socket; RSS (MiB) 1 s later, idle."""
    private = tempfile.mkdtemp(prefix="mdb-start-")
    path = f"{private}/agent.sock"
    cmd = [*AGENT, "--listen", f"unix:{path}", "--idle-timeout", "60", "--log-level", "WARNING"]
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
        time.sleep(1.0)
        return elapsed, rss_mib(proc.pid)
    finally:
        stop(proc)
        Path(path).unlink(missing_ok=True)
        Path(private).rmdir()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_tls(ca_pem: bytes) -> tuple[float, float]:
    """Seconds until a tcp+mTLS agent prints ``ready``; its idle RSS (MiB) 1 s later."""
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
        return elapsed, rss_mib(proc.pid)
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
    floor, deps, unix, tls, rss_unix, rss_tls = [], [], [], [], [], []
    for _ in range(args.repeats):  # interleaved: load changes hit every series alike
        floor.append(run_to_exit("pass"))
        deps.append(run_to_exit(DEPS))
        t, r = start_unix()
        unix.append(t)
        rss_unix.append(r)
        t, r = start_tls(ca_pem)
        tls.append(t)
        rss_tls.append(r)
    med = {k: statistics.median(v) * 1000 for k, v in
           {"floor": floor, "deps": deps, "unix": unix, "tls": tls}.items()}  # fmt: skip
    load = os.getloadavg()[0]
    print(f"agent start, fresh process, median of {args.repeats} (load average {load:.1f}, "
          f"{os.cpu_count()} cores)")  # fmt: skip
    print(f"  baseline python -c pass             {med['floor']:7.0f} ms")
    print(f"  baseline grpc.aio + agent protos    {med['deps']:7.0f} ms  "
          f"({med['deps'] / med['floor']:.2f}x the interpreter)")  # fmt: skip
    for key, label in (("unix", "agent unix, GetInfo answers"),
                       ("tls", "agent tcp+mTLS, ready (kubelet form)")):  # fmt: skip
        print(f"  {label:<36}{med[key]:7.0f} ms  ({med[key] / med['floor']:.2f}x the "
              f"interpreter, {med[key] / med['deps']:.2f}x its imports; target < 500 ms)")  # fmt: skip
    print(f"  RSS idle: unix {statistics.median(rss_unix):.0f} MiB, tcp+mTLS "
          f"{statistics.median(rss_tls):.0f} MiB (target < 60 MB)")  # fmt: skip
    print("  costliest top-level imports of one start (-X importtime, cumulative):")
    for row in importtime_top():
        print("   ", row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
