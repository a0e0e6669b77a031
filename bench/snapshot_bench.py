"""Full netlink snapshot vs iproute2 on the same namespace, and agent start-to-serving.

Why: a snapshot must stay within 2x of what ``ip``/``bridge`` need for the
same dumps (the agent is asked for snapshots repeatedly, also on large LBs),
and the agent must serve soon after it is injected.

What runs, interleaved ``--repeat`` times in one namespace with ``--routes``
routes in ``--tables`` tables (IPv4 and IPv6, some multipath) and ``--rules``
rules plus a few links, addresses, neighbours and fdb entries:

- ours: the six netlink collectors (links, addresses, rules, routes of all
  tables both families, neighbours, fdb) filling a fresh Snapshot, timed inside
  a long-lived process in the namespace (the agent is long-lived too);
- baseline: ``ip -n NS -j -batch`` (route show table all -- both families, as
  the family is unspecified --, rule show, address show, link show, neigh
  show), plus ``ip -n NS -6 -j rule show`` (iproute2's batch mode cannot
  switch family per line) and ``bridge -n NS -j fdb show``; wall time of the
  three processes, output to /dev/null.

Prints medians, the ratio ours/iproute2, and the agent's start-to-serving time
(process start in the namespace until GetInfo answers over its unix socket),
a Snapshot RPC end to end and the agent's resident memory.

With ``--netns NAME`` the same runs in an existing namespace instead (e.g. a lab
LB/FE pod: ``meridio-debug lab up`` then ``--netns mdl-lb-fe-a``); nothing is
built in it or deleted.

Also printed: the first probe packet built in a fresh process (``build_packet``,
which loads scapy on first use) and the next one.

    .venv/bin/python bench/snapshot_bench.py [--routes 2000 --tables 200 --rules 200 --repeat 20]
    .venv/bin/python bench/snapshot_bench.py --netns mdl-lb-fe-a
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys, time
from meridio_debug.agent.collectors import run_collectors
from meridio_debug.agent.collectors.netlink import netlink_collectors
from meridio_debug.protos import agent_pb2 as pb
collectors = netlink_collectors()
for line in sys.stdin:
    if line.strip() == "pyroute2":
        import socket
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            start = time.perf_counter()
            n = sum(1 for f in (socket.AF_INET, socket.AF_INET6) for _ in ipr.get_routes(family=f))
            print(f"{(time.perf_counter() - start) * 1000:.3f} {n}", flush=True)
        continue
    if line.strip() == "probe":
        from meridio_debug.agent.probe import build_packet, marks_for
        times = []
        for i in range(2):
            start = time.perf_counter()
            build_packet("tcp", src="10.0.0.1", dst="10.0.0.2", sport=40000, dport=4000,
                         marks=marks_for("tcp", 4, 0x12345678, i))
            times.append((time.perf_counter() - start) * 1000)
        print(f"{times[0]:.3f} {times[1]:.3f}", flush=True)
        continue
    snap = pb.Snapshot()
    start = time.perf_counter()
    run_collectors(collectors, snap)
    elapsed = (time.perf_counter() - start) * 1000
    ser_start = time.perf_counter()
    size = len(snap.SerializeToString())
    ser = (time.perf_counter() - ser_start) * 1000
    sections = ",".join(f"{s.name}={s.duration_ms:.3f}" for s in snap.sections)
    bad = [s.name for s in snap.sections if s.state != pb.SectionStatus.OK]
    print(f"{elapsed:.3f} {ser:.3f} {size} {len(snap.routes)} {len(snap.rules)} {sections} "
          f"{','.join(bad) or '-'}", flush=True)
"""

BATCH = "route show table all\nrule show\naddress show\nlink show\nneigh show\n"


def sh(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:6])} ... failed: {proc.stderr.strip()}")
    return proc.stdout


def build(ns: str, routes: int, tables: int, rules: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    base = [
        "link set lo up",
        "link add v0 type veth peer name v1",
        "link add br0 type bridge",
        "link add p0 type veth peer name p0p",
        "link add p1 type veth peer name p1p",
        "link set p0 master br0",
        "link set p1 master br0",
        *(f"link set {d} up" for d in ("v0", "v1", "br0", "p0", "p0p", "p1", "p1p")),
        "addr add 10.0.0.1/16 dev v0",
        "addr add fd00::1/64 dev v0 nodad",
        "addr add 172.16.1.1/24 dev br0",
        "addr add fd00:1::1/64 dev br0 nodad",
        *(
            f"neigh add 10.0.0.{i} lladdr 02:00:00:00:00:{i:02x} dev v0 nud permanent"
            for i in range(2, 12)
        ),
        *(
            f"neigh add fd00::{i:x} lladdr 02:00:00:00:01:{i:02x} dev v0 nud stale"
            for i in range(2, 7)
        ),
    ]
    sh("ip", "-n", ns, "-batch", "-", stdin="\n".join(base) + "\n")
    fdb = [f"fdb add 02:00:00:00:02:{i:02x} dev p{i % 2} master static" for i in range(10)]
    sh("bridge", "-n", ns, "-batch", "-", stdin="\n".join(fdb) + "\n")
    v4: list[str] = []
    v6: list[str] = []
    per_table = max(1, routes // tables)
    for t in range(tables):
        table = 5000 + t
        for i in range(per_table):
            family = 4 if i % 2 == 0 else 6
            gw = (
                f"10.0.{rng.randint(0, 3)}.{rng.randint(2, 250)}"
                if family == 4
                else f"fd00::{rng.randint(2, 999):x}"
            )
            gw2 = (
                f"10.0.0.{rng.randint(2, 250)}"
                if family == 4
                else f"fd00::{rng.randint(1000, 1999):x}"
            )
            dst = f"10.{t % 250}.{i}.0/24" if family == 4 else f"fd{t % 250:02x}:{i:x}::/64"
            if i == 0:
                dst = "default"
            if i % 5 == 4:
                line = f"route add {dst} table {table} nexthop via {gw} dev v0 weight 2 nexthop via {gw2} dev v0"
            elif i % 7 == 6:
                line = f"route add blackhole {dst} table {table}"
            else:
                line = f"route add {dst} via {gw} dev v0 table {table} proto {rng.choice(['static', 'bird'])} metric {i}"
            (v4 if family == 4 else v6).append(line)
    for r in range(rules):
        table = 5000 + r % tables
        line = f"rule add fwmark {table} lookup {table} pref {1000 + r}"
        (v4 if r % 2 == 0 else v6).append(line)
    sh("ip", "-n", ns, "-4", "-batch", "-", stdin="\n".join(v4) + "\n")
    sh("ip", "-n", ns, "-6", "-batch", "-", stdin="\n".join(v6) + "\n")


def baseline_once(ns: str, batch_file: str) -> float:
    start = time.perf_counter()
    for cmd in (
        ["ip", "-n", ns, "-j", "-batch", batch_file],
        ["ip", "-n", ns, "-6", "-j", "rule", "show"],
        ["bridge", "-n", ns, "-j", "fdb", "show"],
    ):
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return (time.perf_counter() - start) * 1000


def measure_agent_start(ns: str, repeat: int = 5) -> str:
    """Median ms from starting the agent in ``ns`` until GetInfo answers on its unix socket."""
    try:
        import grpc

        from meridio_debug.protos import agent_pb2 as pb
        from meridio_debug.protos import agent_pb2_grpc as pb_grpc
    except ImportError as exc:
        return f"not measured ({exc})"
    starts: list[float] = []
    snapshots: list[float] = []
    rss: list[float] = []
    for i in range(repeat):
        private = tempfile.mkdtemp(prefix="mdt-bench-")  # 0700: the agent refuses others
        path = f"{private}/agent-{i}.sock"
        code = "import sys; from meridio_debug.agent.main import main; sys.exit(main())"
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-c", code, "--listen", f"unix:{path}",
               "--idle-timeout", "60", "--log-level", "WARNING"]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            # Short reconnect backoff: gRPC's default (1 s, growing) after the first
            # connect, made before the socket exists, timed the client, not the agent.
            fast_retry = [
                ("grpc.initial_reconnect_backoff_ms", 5),
                ("grpc.min_reconnect_backoff_ms", 5),
                ("grpc.max_reconnect_backoff_ms", 20),
            ]
            with grpc.insecure_channel(f"unix:{path}", options=fast_retry) as channel:
                stub = pb_grpc.AgentStub(channel)
                deadline = start + 30
                while True:
                    if proc.poll() is not None:
                        err = proc.stderr.read().decode() if proc.stderr else ""
                        return f"not measured (the agent exited: {err.strip()[-300:]})"
                    try:
                        stub.GetInfo(pb.InfoRequest(), timeout=1)
                        break
                    except grpc.RpcError:
                        if time.perf_counter() > deadline:
                            return "not measured (no answer within 30 s)"
                        time.sleep(0.005)
                starts.append((time.perf_counter() - start) * 1000)
                request = pb.SnapshotRequest(
                    sections=["links", "addresses", "rules", "routes", "neighbours", "fdb"]
                )
                stub.Snapshot(request, timeout=30)  # first call imports the collectors
                t = time.perf_counter()
                stub.Snapshot(request, timeout=30)
                snapshots.append((time.perf_counter() - t) * 1000)
                rss.append(rss_mib(proc.pid))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()
            Path(path).unlink(missing_ok=True)
            Path(private).rmdir()
    return (
        f"{statistics.median(starts):.0f} ms median start-to-serving over {repeat} starts "
        f"(min {min(starts):.0f}, max {max(starts):.0f}; via `ip netns exec`); "
        f"netlink Snapshot RPC end-to-end {statistics.median(snapshots):.1f} ms; "
        f"RSS after two snapshots {statistics.median(rss):.0f} MiB"
    )


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` (``ip netns exec`` execs the agent, so it is the agent's)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=2000)
    parser.add_argument("--tables", type=int, default=200)
    parser.add_argument("--rules", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-agent", action="store_true", help="skip agent start-to-serving")
    parser.add_argument(
        "--netns", default="", help="measure in this existing namespace (built and deleted: none)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.netns and not Path(f"/run/netns/{args.netns}").exists():
        print(f"--netns {args.netns}: no such namespace (see `ip netns list`)", file=sys.stderr)
        return 2
    ns = args.netns or f"mdt-bench-{os.getpid()}"
    if not args.netns:
        sh("ip", "netns", "add", ns)
    child: subprocess.Popen[str] | None = None
    try:
        if args.netns:
            print(f"namespace {ns} (existing)")
        else:
            t = time.perf_counter()
            build(ns, args.routes, args.tables, args.rules)
            print(f"namespace {ns} built in {(time.perf_counter() - t) * 1000:.0f} ms")
        with tempfile.NamedTemporaryFile("w", suffix=".batch") as batch:
            batch.write(BATCH)
            batch.flush()
            child = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", CHILD],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert child.stdin is not None and child.stdout is not None

            def ours() -> list[str]:
                assert child is not None and child.stdin is not None and child.stdout is not None
                child.stdin.write("snap\n")
                child.stdin.flush()
                return child.stdout.readline().split()

            cold = ours()
            first_ms = float(cold[0])
            baseline_once(ns, batch.name)  # warm the page cache for ip too
            ours_ms: list[float] = []
            ser_ms: list[float] = []
            base_ms: list[float] = []
            sections: dict[str, list[float]] = {}
            for _ in range(args.repeat):
                fields = ours()
                ours_ms.append(float(fields[0]))
                ser_ms.append(float(fields[1]))
                for item in fields[5].split(","):
                    name, ms = item.split("=")
                    sections.setdefault(name, []).append(float(ms))
                base_ms.append(baseline_once(ns, batch.name))
            size, n_routes, n_rules, bad = fields[2], fields[3], fields[4], fields[6]
            child.stdin.write("pyroute2\n")
            child.stdin.flush()
            p2 = child.stdout.readline().split()
            child.stdin.write("probe\n")
            child.stdin.flush()
            probe = child.stdout.readline().split()
            child.stdin.close()
            child.wait(timeout=30)
        ip_routes = len(json.loads(sh("ip", "-n", ns, "-j", "route", "show", "table", "all")))
        ours_med, base_med = statistics.median(ours_ms), statistics.median(base_ms)
        print(f"state: {n_routes} routes (ip -j: {ip_routes}), {n_rules} rules, "
              f"snapshot {int(size) / 1024:.0f} KiB serialized; failed sections: {bad}")  # fmt: skip
        print(f"ours     (6 netlink collectors, in-process): median {ours_med:.2f} ms "
              f"(min {min(ours_ms):.2f}, max {max(ours_ms):.2f}); first call {first_ms:.2f} ms; "
              f"+ SerializeToString {statistics.median(ser_ms):.2f} ms")  # fmt: skip
        print("  per section: " + ", ".join(
            f"{name} {statistics.median(v):.2f}" for name, v in sections.items()))  # fmt: skip
        print(f"iproute2 (ip -j -batch + ip -6 -j rule + bridge -j fdb): median {base_med:.2f} ms "
              f"(min {min(base_ms):.2f}, max {max(base_ms):.2f})")  # fmt: skip
        print(
            f"ratio ours/iproute2: {ours_med / base_med:.2f} (target: <= 2 on a lab pod, <= 5 on the stress)"
        )
        if len(p2) == 2:
            print(f"for reference, pyroute2 IPRoute.get_routes (both families): "
                  f"{float(p2[0]):.1f} ms for {p2[1]} routes")  # fmt: skip
        if len(probe) == 2:
            print(f"probe packet: first build_packet {float(probe[0]):.1f} ms "
                  f"(loads what it needs), next {float(probe[1]):.3f} ms")  # fmt: skip
        if not args.no_agent:
            print(f"agent: {measure_agent_start(ns)}")
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        if not args.netns:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
