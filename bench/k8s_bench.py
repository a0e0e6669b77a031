"""Time from ``meridio-debug analyze -n NS`` starting to the analysis being done, in a cluster.

Why: the Kubernetes runtime adds discovery, injection (a PATCH, the kubelet
starting the agent), waiting for the container and a port-forward stream per
pod on top of the local runtime. A user runs ``analyze`` in an incident; with
agents already running it must feel instant (target < 2 s), and even the first
run, injection included, should stay under 5 s (image pulls excluded: the test
kubelet starts the agent at once).

Measured end to end, as a user would: the CLI as a process, as deploy/rbac.yaml's
service account, against the real kube-apiserver + etcd of tests/cluster
(scripts/build-kube), port-forward through the API server to the test kubelet
and the real agent inside the lab's namespaces, for the lab's 8 Meridio pods.
Baseline in the same run: ``analyze --lab`` (local runtime, agents started as
child processes), printed as a ratio.

    sudo .venv/bin/python bench/k8s_bench.py [--repeats 3]

(root: it builds a lab with a pid-unique prefix and removes it at the end)
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from kubernetes import client as k8s_client  # noqa: E402

from meridio_debug.controller import lab  # noqa: E402
from tests.cluster.kube import ControlPlane, find_binaries  # noqa: E402
from tests.cluster.kubelet import Kubelet  # noqa: E402
from tests.cluster.pods import meridio_pod  # noqa: E402

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
    bins = find_binaries()
    if bins is None:
        print("no kube-apiserver: run scripts/build-kube", file=sys.stderr)
        return 1
    prefix = f"mkb{os.getpid() % 1000}-"
    spec = lab.build_spec(prefix)
    work = Path(tempfile.mkdtemp(prefix="k8s-bench-"))
    plane = ControlPlane(bins, work / "kube")
    kubelet: Kubelet | None = None
    rbac = [d for d in yaml.safe_load_all((ROOT / "deploy/rbac.yaml").read_text()) if d]
    try:
        lab.up(spec)
        plane.start()
        kubelet = Kubelet(plane, work)
        kubelet.start()
        for node in ("a", "b"):
            kubelet.add_node(f"{prefix}node-{node}")
        sa_ns = f"{prefix}sa"
        plane.namespace(sa_ns)
        plane.apply([d for d in rbac if d["kind"] == "ServiceAccount"], namespace=sa_ns)
        kubeconfig = plane.kubeconfig_for(
            work / "kubeconfig", plane.token(sa_ns, "meridio-debug"), None
        )
        core = k8s_client.CoreV1Api(plane.admin)
        first, again, local = [], [], []
        for i in range(args.repeats):
            ns = f"{prefix}r{i}"  # a new namespace and new pods: new agents every round
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
                m = meridio_pod(ns, p.name, p.role, f"{prefix}node-{p.name.rsplit('-', 1)[-1][0]}")
                core.create_namespaced_pod(ns, m)
                kubelet.netns[(ns, m["metadata"]["name"])] = p.netns
                names.append(m["metadata"]["name"])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                phases = {x.status.phase for x in core.list_namespaced_pod(ns).items}
                if phases == {"Running"}:
                    break
                time.sleep(0.1)
            cl = ["-n", ns, "--kubeconfig", str(kubeconfig), "-o", "json"]
            first.append(timed(["analyze", *cl]))
            again.append(timed(["analyze", *cl]))
            local.append(timed(["analyze", "--lab", "--prefix", prefix, "-o", "json"]))
            for n in names:  # the kubelet stops the round's agents
                core.delete_namespaced_pod(n, ns, grace_period_seconds=0)
        f, a, loc = statistics.median(first), statistics.median(again), statistics.median(local)
        pods = len([p for p in spec.pods if p.role != "gateway"])
        print(
            f"analyze of {pods} pods through kube-apiserver {plane.version} and port-forward "
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
        if kubelet is not None:
            kubelet.stop()
        plane.stop()
        lab.down(prefix)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
