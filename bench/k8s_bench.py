"""Time from ``meridio-debug analyze -n red`` starting to the analysis being done, in a cluster.

Why: the Kubernetes runtime adds discovery, injection (a PATCH, the kubelet
starting the agent), status polling and a port-forward stream per pod on top
of the local runtime. A user runs ``analyze`` in an incident; with agents
already running it must feel instant (target < 2 s), and even the first run,
injection included, should stay under 5 s (image pulls excluded: the stand-in
kubelet starts the agent at once).

Measured end to end, as a user would: the CLI as a process against the
stand-in API server of tests/cluster (real HTTP, the websocket port-forward
protocol, the real agent inside the lab's namespaces), for the lab's 8 Meridio
pods. Baseline in the same run: ``analyze --lab`` (local runtime, agents
started as child processes), printed as a ratio.

    sudo .venv/bin/python bench/k8s_bench.py [--repeats 3]

(root: it builds a lab with a pid-unique prefix and removes it at the end)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meridio_debug.controller import lab  # noqa: E402
from tests.cluster.apiserver import StandInApiServer  # noqa: E402

CLI = [sys.executable, "-m", "meridio_debug.controller.cli"]
TARGET_FIRST_S = 5.0
TARGET_REUSE_S = 2.0


def timed(args: list[str]) -> float:
    t0 = time.monotonic()
    res = subprocess.run([*CLI, *args], capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - t0
    if res.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (it builds a lab)", file=sys.stderr)
        return 2
    prefix = f"mkb{os.getpid() % 1000}-"
    spec = lab.build_spec(prefix)
    work = Path(tempfile.mkdtemp(prefix="k8s-bench-"))
    server = StandInApiServer(work)
    try:
        lab.up(spec)
        server.start()
        kubeconfig = server.kubeconfig(work / "kubeconfig")
        cluster = ["-n", "red", "--kubeconfig", str(kubeconfig), "-o", "json"]
        first, again, local = [], [], []
        for i in range(args.repeats):
            ns = f"red{i}"
            server.add_lab([(p.name, p.role, p.netns) for p in spec.pods], ns)
            image = f"ghcr.io/nordix/meridio-debug-agent:bench{i}"  # new agents every round
            cl = ["-n", ns, *cluster[2:], "--image", image]
            first.append(timed(["analyze", *cl]))
            again.append(timed(["analyze", *cl]))
            local.append(timed(["analyze", "--lab", "--prefix", prefix, "-o", "json"]))
            # the round's agents keep running (idle timeout); stop them before the next round
            for key in [k for k in server.procs if k[0] == ns]:
                proc = server.procs.pop(key)
                proc.terminate()
                proc.wait(5)
        f, a, loc = statistics.median(first), statistics.median(again), statistics.median(local)
        pods = len([p for p in spec.pods if p.role != "gateway"])
        print(
            f"analyze of {pods} pods through the stand-in API server and port-forward "
            f"(median of {args.repeats}):"
        )
        print(f"  baseline  analyze --lab (local runtime)        {loc:6.2f} s  1.00x")
        print(
            f"  first run (injection included)                 {f:6.2f} s  {f / loc:4.2f}x  "
            f"target < {TARGET_FIRST_S:g} s: {'ok' if f < TARGET_FIRST_S else 'MISSED'}"
        )
        print(
            f"  agents already running (reuse)                 {a:6.2f} s  {a / loc:4.2f}x  "
            f"target < {TARGET_REUSE_S:g} s: {'ok' if a < TARGET_REUSE_S else 'MISSED'}"
        )
    finally:
        server.stop()
        lab.down(prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
