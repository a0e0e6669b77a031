"""``meridio-debug analyze --lab`` end to end on a scaled lab (4 LBs, 4 proxies, 40 targets).

Why: ``analyze`` is what a person runs first and what a CI ``on_failure``
hook runs under a deadline; it must answer in a few seconds for a big trench
(target: whole command < 5 s, the pure analysis < 0.5 s). The pure analysis
at 25/50/100 synthetic targets is bench/analysis_bench.py; this one measures
the real thing on real namespaces, phase by phase, so a regression points at
its layer:

- ``snapshot CLI`` (baseline): ``meridio-debug snapshot --lab -o json``, the
  same agents and the same snapshots without analysis;
- ``analyze CLI``: ``meridio-debug analyze --lab -o json``, as a user runs it;
- in-process phases of one analyze: gather (agents started, every pod
  snapshotted at once), convert (proto -> model), analyze (all checks),
  render (table, json, junit, html), bundle write + read.

Prints medians of ``--repeats`` runs and the ratio analyze/snapshot (the
price of analysis on top of collecting the evidence). Needs root, bird2, nft;
builds its own lab (prefix ``mdb<pid>-``) and removes it.

    .venv/bin/python bench/analyze_bench.py [--repeats 5] [--lbs 4 --proxies 4 --targets-per-proxy 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meridio_debug.controller.analysis import Severity, analyze
from meridio_debug.controller.lab import build_spec, down, up
from meridio_debug.controller.report import render
from meridio_debug.controller.services.analyze import gather_async, lab_evidence_source, make_report
from meridio_debug.controller.services.bundle import read_bundle, trench_state, write_bundle

CLI = str(Path(sys.executable).with_name("meridio-debug"))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def run_cli(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([CLI, *argv], capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.decode().strip()}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lbs", type=int, default=4)
    ap.add_argument("--proxies", type=int, default=4)
    ap.add_argument("--targets-per-proxy", type=int, default=10)
    ap.add_argument("--html", metavar="FILE", help="also write the last run's HTML report here")
    ap.add_argument(
        "--marking",
        choices=["nfqlb", "nft-jhash"],
        default="nfqlb",
        help="the LBs' load-balancing (nft-jhash: the lab before real nfqlb)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    prefix = f"mdb{os.getpid() % 10000}-"[:8]
    spec = build_spec(prefix, args.lbs, args.proxies, args.targets_per_proxy, marking=args.marking)
    started = time.perf_counter()
    up(spec)
    print(
        f"lab {prefix}: {args.lbs} LBs, {args.proxies} proxies, {len(spec.targets)} targets, "
        f"{len(spec.pods) - 1} Meridio pods; up in {time.perf_counter() - started:.1f} s"
    )
    try:
        lab = ["--lab", "--prefix", prefix]
        snap_cli = [run_cli(["snapshot", *lab, "-o", "json"]) for _ in range(args.repeats)]
        analyze_cli = [run_cli(["analyze", *lab, "-o", "json"]) for _ in range(args.repeats)]

        phases: dict[str, list[float]] = {}

        def add(name: str, seconds: float) -> None:
            phases.setdefault(name, []).append(seconds)

        findings = 0
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeats):
                t, (runtime, config, source) = timed(lambda: lab_evidence_source(prefix, []))
                add("lab spec + runtime (per run)", t)
                t, evidence = timed(lambda: asyncio.run(gather_async(runtime, config, source)))  # noqa: B023
                add("gather (agents + snapshots)", t)
                t, state = timed(lambda: trench_state(evidence))  # noqa: B023
                add("convert (proto -> model)", t)
                t, result = timed(lambda: analyze(state))  # noqa: B023
                add("analyze (all checks)", t)
                findings = len(result.at_least(Severity.WARNING))
                report = make_report(evidence, result, state, None)
                for fmt in ("table", "json", "junit", "html"):
                    t, _ = timed(lambda: render(fmt, report))  # noqa: B023
                    add(f"render {fmt}", t)
                path = Path(tmp) / "bundle.tar.gz"
                t, _ = timed(lambda: write_bundle(evidence, path, ["bench"]))  # noqa: B023
                add("bundle write", t)
                t, _ = timed(lambda: read_bundle(path))  # noqa: B023
                add("bundle read", t)
                size = path.stat().st_size

        print(
            f"\nmedians of {args.repeats} runs (load average {os.getloadavg()[0]:.1f}, "
            f"{os.cpu_count()} cores):"
        )
        snap_ms, analyze_ms = median_ms(snap_cli), median_ms(analyze_cli)
        print(f"  {'snapshot CLI (baseline)':<30} {snap_ms:8.0f} ms")
        print(
            f"  {'analyze CLI':<30} {analyze_ms:8.0f} ms   ratio to baseline {analyze_ms / snap_ms:.2f}x"
        )
        for name, samples in phases.items():
            print(f"  {name:<30} {median_ms(samples):8.1f} ms")
        pure = median_ms(phases["convert (proto -> model)"]) + median_ms(
            phases["analyze (all checks)"]
        )
        print(
            f"  bundle size {size / 1024:.0f} KiB; warnings+errors on the healthy lab: {findings}"
        )
        per_pod = median_ms(phases["gather (agents + snapshots)"]) / (len(spec.pods) - 1)
        print(
            f"  gather per pod: {per_pod:.1f} ms (one-shot agents, at most 2 per CPU at once, "
            f"{os.cpu_count()} CPUs)"
        )
        if args.html:
            Path(args.html).write_text(render("html", report))
        print(
            f"\ntargets: whole analyze < 5000 ms: {'ok' if analyze_ms < 5000 else 'MISSED'} "
            f"({analyze_ms:.0f} ms); convert+analysis < 500 ms: "
            f"{'ok' if pure < 500 else 'MISSED'} ({pure:.0f} ms)"
        )
    finally:
        down(prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
