"""How ``analyze --lab`` grows with the trench: 48, 168 and ~1,000 pods, time and memory.

Why: a trench may have thousands of targets (a Meridio stream allows 10,000), and
``analyze`` is what a person or a CI hook runs under a deadline. Targets (issue 16):
the 168-pod lab (4 LBs, 4 proxies, 160 targets) analysed end to end in < 5 s,
1,000 targets in < 20 s with stated memory, growth no worse than linear.

For each size it builds a lab (prefix ``mdg<pid>-``, timing ``lab up``), then runs
as a user does, ``--repeats`` times each:

- ``snapshot --lab -o json`` (baseline): the same one-shot agents and snapshots,
  rendered as JSON, without analysis;
- ``analyze --lab -o json``: the whole command, wall time and the CPU time of
  the command and every process it started (load-independent: on a shared
  machine the wall time is what the other jobs leave);

then one more ``analyze`` while a sampler thread walks the command's process tree
(controller, launcher, one-shot agents) every 10 ms and keeps the peak of the
summed PSS and RSS and the most processes alive at once. It prints, per size, the
medians, the ratio analyze/snapshot, the time per pod and its ratio to the
smallest size's time per pod (linear growth: ratio <= ~1), then the targets.
Removes each lab after measuring it. Needs root, bird2, nft, ~6 GiB free for 1,000
targets (each target's application is a small Python server, ~6 MiB).

    .venv/bin/python bench/gather_scale_bench.py [--repeats 3] [--sizes 4x4x10,4x4x40,4x10x100]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from meridio_debug.controller.lab import build_spec, down, up

CLI = str(Path(sys.executable).with_name("meridio-debug"))
SAMPLE_S = 0.01


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's ``children`` list), [] when it is gone."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


def tree(pid: int) -> list[int]:
    out, i = [pid], 0
    while i < len(out):
        out += children(out[i])
        i += 1
    return out


def pss_rss_kib(pid: int) -> tuple[int, int]:
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return pss, rss


@dataclass
class Peak:
    pss_kib: int = 0
    rss_kib: int = 0
    processes: int = 0
    samples: int = 0
    stop: threading.Event = field(default_factory=threading.Event)


def sample(root: int, peak: Peak) -> None:
    """Until ``peak.stop``: the summed PSS/RSS of ``root``'s process tree, and its size."""
    while not peak.stop.is_set():
        pids = tree(root)
        pss = rss = 0
        for pid in pids:
            p, r = pss_rss_kib(pid)
            pss += p
            rss += r
        peak.pss_kib = max(peak.pss_kib, pss)
        peak.rss_kib = max(peak.rss_kib, rss)
        peak.processes = max(peak.processes, len(pids))
        peak.samples += 1
        peak.stop.wait(SAMPLE_S)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cli(argv: list[str], peak: Peak | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and every process it started)."""
    cpu = children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [CLI, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    sampler = None
    if peak is not None:
        sampler = threading.Thread(target=sample, args=(proc.pid, peak), daemon=True)
        sampler.start()
    _, err = proc.communicate()
    elapsed = time.perf_counter() - start
    if sampler is not None and peak is not None:
        peak.stop.set()
        sampler.join()
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(argv)} failed: {err.strip()}")
    return elapsed, children_cpu() - cpu


@dataclass
class Row:
    size: str
    pods: int
    targets: int
    up_s: float
    snapshot_s: float
    analyze_s: float
    analyze_cpu_s: float
    peak: Peak
    load: float


def measure(size: str, repeats: int) -> Row:
    lbs, proxies, per_proxy = (int(x) for x in size.split("x"))
    prefix = f"mdg{os.getpid() % 10000}-"[:8]
    spec = build_spec(prefix, lbs, proxies, per_proxy)
    pods = len(spec.pods) - 1  # the gateway is not a Meridio pod
    started = time.perf_counter()
    up(spec, ready_timeout=max(30.0, pods * 0.1))
    up_s = time.perf_counter() - started
    try:
        lab = ["--lab", "--prefix", prefix]
        snap = [run_cli(["snapshot", *lab, "-o", "json"])[0] for _ in range(repeats)]
        analyze = [run_cli(["analyze", *lab, "-o", "json"]) for _ in range(repeats)]
        # Memory in a run of its own: sampling /proc costs CPU the timed runs must not lose.
        peak = Peak()
        run_cli(["analyze", *lab, "-o", "json"], peak)
        load = os.getloadavg()[0]
    finally:
        down(prefix)
    return Row(
        size,
        pods,
        len(spec.targets),
        up_s,
        statistics.median(snap),
        statistics.median(a[0] for a in analyze),
        statistics.median(a[1] for a in analyze),
        peak,
        load,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--sizes",
        default="4x4x10,4x4x40,4x10x100",
        help="LBSxPROXIESxTARGETS-PER-PROXY, comma-separated, smallest first (the baseline)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    rows: list[Row] = []
    for size in args.sizes.split(","):
        row = measure(size.strip(), args.repeats)
        rows.append(row)
        print(
            f"{row.size}: {row.pods} pods ({row.targets} targets), lab up {row.up_s:.1f} s, "
            f"load {row.load:.1f}",
            flush=True,
        )
    base = rows[0].analyze_s / rows[0].pods
    print(
        f"\nmedians of {args.repeats} runs, {os.cpu_count()} cores; CPU: user+sys of the command "
        "and all it started; memory: peak of the summed PSS (RSS) of its process tree "
        "(controller, launcher, agents) in one more run"
    )
    print(
        f"  {'pods':>5} {'lab up':>7} {'snapshot':>9} {'analyze':>8} {'ratio':>6} "
        f"{'per pod':>8} {'vs ' + str(rows[0].pods):>7} {'CPU':>7} {'CPU/pod':>8} "
        f"{'peak PSS (RSS)':>16} {'procs':>5} {'load':>5}"
    )
    for r in rows:
        per_pod = r.analyze_s / r.pods
        print(
            f"  {r.pods:5d} {r.up_s:6.1f}s {r.snapshot_s:8.2f}s {r.analyze_s:7.2f}s "
            f"{r.analyze_s / r.snapshot_s:5.2f}x {per_pod * 1000:6.1f}ms {per_pod / base:6.2f}x "
            f"{r.analyze_cpu_s:6.1f}s {r.analyze_cpu_s / r.pods * 1000:6.1f}ms "
            f"{r.peak.pss_kib / 1024:6.0f} ({r.peak.rss_kib / 1024:5.0f}) MiB "
            f"{r.peak.processes:5d} {r.load:5.1f}"
        )
    print("\ntargets:")
    for r in rows:
        if r.targets == 160:
            verdict = "ok" if r.analyze_s < 5 else "MISSED"
            print(f"  160 targets ({r.pods} pods) < 5 s: {verdict} ({r.analyze_s:.2f} s)")
        if r.targets >= 1000:
            verdict = "ok" if r.analyze_s < 20 else "MISSED"
            print(
                f"  {r.targets} targets ({r.pods} pods) < 20 s: {verdict} ({r.analyze_s:.2f} s, "
                f"peak {r.peak.pss_kib / 1024:.0f} MiB PSS)"
            )
    worst = max(r.analyze_s / r.pods / base for r in rows)
    print(
        f"  growth no worse than linear (time per pod <= 1.25x the {rows[0].pods}-pod one): "
        f"{'ok' if worst <= 1.25 else 'MISSED'} (worst {worst:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
