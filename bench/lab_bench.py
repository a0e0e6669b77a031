"""``lab up`` with pods as pods: whole-lab time, and what containers cost per process.

Why: every lab pod now has containers (own PID and mount namespaces, /proc and
/sys remounted, the pod's /dev/shm bound), started by one forking helper per
``up`` (lab/_container_start.py). This measures ``up`` and ``down`` of the
default lab and of the scaled one, and, in the same run on the same
namespaces, the cost of starting N containers against the baseline of how
the lab started each process before: ``ip netns exec NS PROGRAM`` (the
network namespace only), N of them in parallel threads as ``up`` did. The
programs are ``sleep`` in both, so the ratio is the price of the container
machinery alone. And the agents: every Meridio pod's agent started at once
until all serve, joined as ephemeral containers (the target container's PID
namespace, own mounts) against the netns-only join of a bare ``--netns``.

    .venv/bin/python bench/lab_bench.py [--repeats 3] [--scaled-only|--default-only]

Needs root, bird2, nft; builds its own labs (prefix ``mlb<pid>-``) and removes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from meridio_debug.controller.lab import _system as system
from meridio_debug.controller.lab import build_spec, containers, down, up
from meridio_debug.controller.lab.state import state_dir
from meridio_debug.controller.runtime.local import LocalRuntime


def start_plain(netnses: list[str]) -> list[subprocess.Popen[bytes]]:
    """The baseline: ``ip netns exec NS sleep`` per process, in parallel threads."""

    def one(ns: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "600"])

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, netnses))


def bench_start(prefix: str, count: int) -> tuple[float, float]:
    """Seconds to start ``count`` containers, and ``count`` plain netns processes."""
    spec = build_spec(prefix=prefix)
    pods = [p for p in spec.pods for _ in range(count // len(spec.pods) + 1)][:count]
    directory = state_dir(prefix)
    specs = [containers.idle(directory, p.name, f"bench-{i}", p.netns) for i, p in enumerate(pods)]
    t0 = time.perf_counter()
    pids = containers.start(specs, directory)
    t_containers = time.perf_counter() - t0
    system.kill(pids)
    t0 = time.perf_counter()
    procs = start_plain([p.netns for p in pods])
    t_plain = time.perf_counter() - t0
    for proc in procs:
        proc.kill()
        proc.wait()
    return t_containers, t_plain


def open_all(prefix: str, ephemeral: bool) -> float:
    """Seconds until an agent serves in every Meridio pod of the lab, all opened at once."""
    from meridio_debug.controller.runtime.lab import lab_runtime

    runtime = lab_runtime(prefix, [])
    if not ephemeral:
        runtime = LocalRuntime(runtime.pods())  # the netns only, as before containers

    async def go() -> float:
        async with contextlib.AsyncExitStack() as stack:
            t0 = time.perf_counter()
            await asyncio.gather(
                *(stack.enter_async_context(runtime.open(p)) for p in runtime.pods())
            )
            return time.perf_counter() - t0

    return asyncio.run(go())


def bench_layout(name: str, repeats: int, **sizes: int) -> None:
    prefix = f"mlb{os.getpid() % 1000}-"
    spec = build_spec(prefix=prefix, **sizes)
    n_containers = sum(len(containers.CONTAINERS[p.role]) for p in spec.pods)
    ups, downs = [], []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            up(spec)
            ups.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            down(prefix)
            downs.append(time.perf_counter() - t0)
        up(spec)
        starts = [bench_start(prefix, n_containers) for _ in range(repeats)]
        agents = [(open_all(prefix, True), open_all(prefix, False)) for _ in range(repeats)]
    finally:
        down(prefix)
    t_c = statistics.median(s[0] for s in starts)
    t_p = statistics.median(s[1] for s in starts)
    print(
        f"{name}: {len(spec.pods)} pods, {n_containers} containers: "
        f"lab up {statistics.median(ups):.2f} s, lab down {statistics.median(downs):.2f} s "
        f"(median of {repeats})"
    )
    print(
        f"  start {n_containers} containers {t_c * 1000:.0f} ms vs baseline "
        f"{n_containers} x ip netns exec {t_p * 1000:.0f} ms: ratio {t_c / t_p:.2f}"
    )
    a_e = statistics.median(a[0] for a in agents)
    a_n = statistics.median(a[1] for a in agents)
    pods = len(spec.pods) - 1
    print(
        f"  {pods} agents serving, as ephemeral containers {a_e * 1000:.0f} ms vs baseline "
        f"netns only {a_n * 1000:.0f} ms: ratio {a_e / a_n:.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--default-only", action="store_true")
    only.add_argument("--scaled-only", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("bird") is None:
        parser.error("needs root and bird2 (run scripts/setup)")
    if not args.scaled_only:
        bench_layout("default lab", args.repeats)
    if not args.default_only:
        bench_layout("scaled lab 4x4x10", args.repeats, lbs=4, proxies=4, targets_per_proxy=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
