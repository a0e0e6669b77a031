"""Time from ``meridio-debug analyze -n NS`` starting to the analysis being done, in a cluster.

Why: the Kubernetes runtime adds discovery, injection (a PATCH, the kubelet
starting the agent), waiting for the container and a port-forward stream per
pod on top of the local runtime. A user runs ``analyze`` in an incident; for a
48-pod trench (4 LBs, 4 proxies, 40 targets) it must answer in < 3 s with the
agents already running (warm), and in < 8 s on the first run, injection of 48
ephemeral agents included (image pulls excluded: the test kubelet starts the
agent at once).

Measured end to end, as a user would: the CLI as a process, as deploy/rbac.yaml's
service account, against the real kube-apiserver + etcd of tests/cluster
(scripts/build-kube), port-forward through the API server to the test kubelet
and the real agent inside the lab's namespaces. Baseline in the same run:
``analyze --lab`` on the same lab (local runtime, agents started as child
processes), printed as a ratio.

Everything runs on this one machine, so each run also says where the CPU went
(seconds of CPU during the command): the CLI, kube-apiserver, etcd, our node
side (tests/cluster/kubelet.py: this process's own CPU; a real kubelet is Go on
each node) and the agents it started (their start-up is the agent image's real
cost, but on a real cluster it is spread over the trench's nodes).

    .venv/bin/python bench/k8s_bench.py [--repeats 2] [--lbs 4 --proxies 4 --targets-per-proxy 10]
        [--profile DIR]   # cProfile of the last round's CLI runs (first, warm) into DIR

(root: it builds a lab with a pid-unique prefix and removes it at the end)
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from kubernetes import client as k8s_client  # noqa: E402

from meridio_debug.controller import lab  # noqa: E402
from tests.cluster.kube import ControlPlane, find_binaries  # noqa: E402
from tests.cluster.kubelet import Kubelet  # noqa: E402
from tests.cluster.pods import meridio_pod  # noqa: E402

CLI = [sys.executable, "-m", "meridio_debug.controller.cli"]
TARGET_FIRST_S = 8.0
TARGET_WARM_S = 3.0
TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int | str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (0 when it is gone)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / TICK if fields else 0.0


def session_cpu(sessions: set[int]) -> float:
    """CPU seconds of every live process in these sessions (an agent and the child it forks)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(entry)
            if fields and int(fields[3]) in sessions:
                total += (int(fields[11]) + int(fields[12])) / TICK
    return total


PHASES = ("injecting", "running", "connected")  # the CLI's per-pod progress on stderr


@dataclass
class Sample:
    wall: float
    cpu: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # when the last pod reached each


class Meter:
    """Wall time of a CLI run and the CPU each party spent meanwhile."""

    def __init__(self, plane: ControlPlane | None, kubelet: Kubelet | None) -> None:
        self.plane = plane
        self.kubelet = kubelet

    def _cpu(self) -> dict[str, float]:
        out: dict[str, float] = {}
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        out["cli"] = kids.ru_utime + kids.ru_stime
        me = resource.getrusage(resource.RUSAGE_SELF)
        out["node side"] = me.ru_utime + me.ru_stime
        if self.plane is not None:
            out["kube-apiserver"] = (
                proc_cpu(self.plane.apiserver.pid) if self.plane.apiserver else 0
            )
            out["etcd"] = proc_cpu(self.plane.etcd.pid) if self.plane.etcd else 0
        if self.kubelet is not None:
            out["agents"] = session_cpu({p.pid for p in list(self.kubelet.procs.values())})
        return out

    def run(self, args: list[str], profile: Path | None = None) -> Sample:
        argv = [*CLI, *args]
        if profile is not None:
            argv = [sys.executable, "-m", "cProfile", "-o", str(profile), *argv[1:]]
        before = self._cpu()
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        phases: dict[str, float] = {}
        err: list[str] = []

        def read_stderr() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                err.append(line)
                state = line.split(": ")[2].strip() if line.count(": ") >= 2 else ""
                if state in PHASES:
                    phases[state] = time.monotonic() - t0

        reader = threading.Thread(target=read_stderr)
        reader.start()
        assert proc.stdout is not None
        proc.stdout.read()
        code = proc.wait()
        wall = time.monotonic() - t0
        reader.join()
        after = self._cpu()
        if code not in (0, 3):
            raise SystemExit(f"{' '.join(args)} failed ({code}): {''.join(err[-20:]).strip()}")
        return Sample(wall, {k: after[k] - before.get(k, 0.0) for k in after}, phases)


def node_of(lab_name: str, prefix: str) -> str:
    """The lab's pods spread over one Node per letter (lb-fe-a, proxy-a, target-a7 -> node-a)."""
    return f"{prefix}node-{lab_name.rsplit('-', 1)[-1][0]}"


def create_round(
    plane: ControlPlane,
    kubelet: Kubelet,
    spec: Any,
    rbac: list[dict[str, Any]],
    ns: str,
    sa_ns: str,
) -> list[str]:
    """A new namespace with the lab's Meridio pods as Pods bound to our Nodes, all Running."""
    core = k8s_client.CoreV1Api(plane.admin)
    plane.namespace(ns)
    docs = [copy.deepcopy(d) for d in rbac if d["kind"] in ("Role", "RoleBinding")]
    for d in docs:
        for s in d.get("subjects") or []:
            s["namespace"] = sa_ns
    plane.apply(docs, namespace=ns)
    names = []
    for p in spec.pods:
        if p.role == "gateway":
            continue
        m = meridio_pod(ns, p.name, p.role, node_of(p.name, spec.prefix))
        kubelet.netns[(ns, m["metadata"]["name"])] = p.netns
        core.create_namespaced_pod(ns, m)
        names.append(m["metadata"]["name"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        phases = [x.status.phase for x in core.list_namespaced_pod(ns).items]
        if len(phases) == len(names) and set(phases) == {"Running"}:
            return names
        time.sleep(0.2)
    raise SystemExit(f"namespace {ns}: the pods did not all become Running within 60 s")


def report(pods: int, version: str, runs: dict[str, list[Sample]], load: tuple[float, ...]) -> None:
    med = {k: statistics.median(s.wall for s in v) for k, v in runs.items()}
    base = med["lab"]
    n = len(runs["lab"])
    print(
        f"analyze of {pods} pods through kube-apiserver {version} and port-forward "
        f"(median of {n}; load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
        f"after {' '.join(f'{x:.2f}' for x in os.getloadavg())}):"
    )
    rows = [
        ("lab", "baseline  analyze --lab (local runtime)", None),
        ("first", "first run (injection included)", TARGET_FIRST_S),
        ("warm", "agents already running (warm)", TARGET_WARM_S),
    ]
    for key, label, target in rows:
        line = f"  {label:<44} {med[key]:6.2f} s  {med[key] / base:4.2f}x"
        if target is not None:
            line += f"  target < {target:g} s: {'ok' if med[key] < target else 'MISSED'}"
        print(line)
    print("  when the last pod was (s since start, median): injected / running / connected / done")
    for key, label, _target in rows[1:]:
        cells = [
            statistics.median(s.phases.get(p, float("nan")) for s in runs[key]) for p in PHASES
        ]
        print(
            f"    {label:<36}"
            + "".join(f"{c:9.2f}" for c in cells)
            + f"{statistics.median(s.wall for s in runs[key]):9.2f}"
        )
    print("  CPU seconds during the run (median):")
    parties = ["cli", "kube-apiserver", "etcd", "node side", "agents"]
    print("    " + " " * 36 + "".join(f"{p:>15}" for p in parties))
    for key, label, _target in rows:
        cells = [statistics.median(s.cpu.get(p, 0.0) for s in runs[key]) for p in parties]
        print(f"    {label:<36}" + "".join(f"{c:15.2f}" for c in cells))
    # Everything runs on this machine: no run can be faster than its CPU spread over all cores
    # (a cluster spreads the agents' start over the trench's nodes).
    cores = os.cpu_count() or 1
    print(f"  floor on this machine's {cores} cores (CPU seconds / cores, median):")
    for key, label, _target in rows[1:]:
        total = statistics.median(sum(s.cpu.values()) for s in runs[key])
        agents = statistics.median(s.cpu.get("agents", 0.0) for s in runs[key])
        print(
            f"    {label:<36} {total / cores:6.2f} s, of which the agents {agents / cores:6.2f} s"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lbs", type=int, default=4)
    parser.add_argument("--proxies", type=int, default=4)
    parser.add_argument("--targets-per-proxy", type=int, default=10)
    parser.add_argument("--profile", type=Path, help="cProfile the last round's CLI runs into DIR")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (it builds a lab)", file=sys.stderr)
        return 2
    bins = find_binaries()
    if bins is None:
        print("no kube-apiserver: run scripts/build-kube", file=sys.stderr)
        return 1
    load = os.getloadavg()
    prefix = f"mkb{os.getpid() % 1000}-"
    spec = lab.build_spec(prefix, args.lbs, args.proxies, args.targets_per_proxy)
    work = Path(tempfile.mkdtemp(prefix="k8s-bench-"))
    # the CLI's certificate pins go with the bench's cluster, not into ~/.cache
    os.environ["XDG_CACHE_HOME"] = str(work / "cache")
    plane = ControlPlane(bins, work / "kube")
    kubelet: Kubelet | None = None
    rbac = [d for d in yaml.safe_load_all((ROOT / "deploy/rbac.yaml").read_text()) if d]
    try:
        lab.up(spec)
        plane.start()
        kubelet = Kubelet(plane, work)
        kubelet.start()
        for node in sorted({node_of(p.name, prefix) for p in spec.pods if p.role != "gateway"}):
            kubelet.add_node(node)
        sa_ns = f"{prefix}sa"
        plane.namespace(sa_ns)
        plane.apply([d for d in rbac if d["kind"] == "ServiceAccount"], namespace=sa_ns)
        kubeconfig = plane.kubeconfig_for(
            work / "kubeconfig", plane.token(sa_ns, "meridio-debug"), None
        )
        core = k8s_client.CoreV1Api(plane.admin)
        meter = Meter(plane, kubelet)
        lab_meter = Meter(None, None)
        runs: dict[str, list[Sample]] = {"lab": [], "first": [], "warm": []}
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        for i in range(args.repeats):
            ns = f"{prefix}r{i}"  # a new namespace and new pods: new agents every round
            names = create_round(plane, kubelet, spec, rbac, ns, sa_ns)
            last = args.profile if args.profile and i == args.repeats - 1 else None
            cl = ["analyze", "-n", ns, "--kubeconfig", str(kubeconfig), "-o", "json"]
            runs["first"].append(meter.run(cl, last / "first.pstats" if last else None))
            runs["warm"].append(meter.run(cl, last / "warm.pstats" if last else None))
            lab_args = ["analyze", "--lab", "--prefix", prefix, "-o", "json"]
            runs["lab"].append(lab_meter.run(lab_args))
            for n in names:  # the kubelet stops the round's agents
                core.delete_namespaced_pod(n, ns, grace_period_seconds=0)
        pods = len([p for p in spec.pods if p.role != "gateway"])
        report(pods, plane.version, runs, load)
    finally:
        if kubelet is not None:
            kubelet.stop()
        plane.stop()
        lab.down(prefix)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
