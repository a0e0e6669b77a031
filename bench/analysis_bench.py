"""How ``analyze`` scales with the trench: 25, 50, 100 targets.

Why: analysis runs on every ``analyze`` call and in CI hooks on failure; it
must stay well under a second for a large trench and grow linearly (every
rule indexes each pod once, cross-pod maps are built once). The synthetic
trench is the lab fixture scaled up (2 LBs, 5 proxies, N/5 targets each), so
every rule has real work: 2 x N fwmark rules and tables per LB, N targets
with VIPs and policy routes, proxies with N/5 + 2 ports.

Prints the median of repeats per size and the growth ratio against the
25-target baseline measured in the same run (never absolute assertions):

    .venv/bin/python bench/analysis_bench.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "unit"))

from lab_fixture import build_lab

from meridio_debug.controller.analysis import Severity, analyze
from meridio_debug.controller.model import TrenchState

LBS = 2
PROXIES = 5
SIZES = (25, 50, 100)
LIMIT_MS = 500.0


def build(targets: int) -> TrenchState:
    per_proxy = -(-targets // PROXIES)
    return build_lab(LBS, PROXIES, per_proxy)


def median_ms(state: TrenchState, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        # A fresh (equal) state each time so the per-state index cache is not reused.
        fresh = TrenchState(pods=state.pods, config=state.config)
        gc.collect()
        gc.disable()  # a collection landing in one size's runs is noise, not growth
        try:
            start = time.perf_counter()
            result = analyze(fresh)
            times.append((time.perf_counter() - start) * 1000.0)
        finally:
            gc.enable()
        if result.at_least(Severity.WARNING):
            raise SystemExit(
                f"synthetic trench is not healthy: {result.at_least(Severity.WARNING)[:3]}"
            )
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    results: list[tuple[int, int, float]] = []
    for targets in SIZES:
        state = build(targets)
        analyze(state)  # warm-up (imports, caches of ipaddress)
        results.append((targets, len(state.pods), median_ms(state, args.repeats)))
    base_targets, _pods, base_ms = results[0]
    print(f"analyze(): {LBS} LBs, {PROXIES} proxies, median of {args.repeats}")
    print(f"{'targets':>8} {'pods':>5} {'ms':>9} {'x time':>7} {'x size':>7}")
    print(f"{base_targets:>8} {results[0][1]:>5} {base_ms:>9.1f} {1:>7.2f} {1:>7.2f}")
    worst_growth = 0.0
    for targets, pods, ms in results[1:] if len(results) > 1 else results:
        size_ratio = targets / base_targets
        time_ratio = ms / base_ms
        worst_growth = max(worst_growth, time_ratio / size_ratio)
        print(f"{targets:>8} {pods:>5} {ms:>9.1f} {time_ratio:>7.2f} {size_ratio:>7.2f}")
    largest_ms = results[-1][2]
    linear = worst_growth <= 1.25
    print(
        f"time growth / size growth (worst): {worst_growth:.2f} ({'ok' if linear else 'SUPERLINEAR'}); "
        f"{results[-1][0]} targets in {largest_ms:.1f} ms "
        f"({'ok' if largest_ms < LIMIT_MS else 'OVER'} < {LIMIT_MS:.0f} ms)"
    )
    return 0 if linear and largest_ms < LIMIT_MS else 1


if __name__ == "__main__":
    raise SystemExit(main())
