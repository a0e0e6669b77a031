"""The lab with real nfqlb: what it costs to build, and how well the static trace predicts it.

Why: issue 11 replaced the lab's nft jhash marking by real nfqlb 1.2.0 (a process per LB, its
shm, its flow, queue rules). This measures, in one run against a baseline measured in the same
run:

- ``lab up`` (and ``down``) of the default lab and of a scaled one with nfqlb, against the
  same lab built with ``--marking nft-jhash`` (the baseline, ratio 1.00x);
- predicted vs answering target: ``lab traffic`` sends N flows (TCP and UDP, both families,
  kernel-chosen source ports); for each, the static trace of the same 5-tuple (warm agents)
  names a target from nfqlb's hash and the shm's Maglev table read by the agent, and
  ``predict_target`` names one offline from the spec; both are compared with the target that
  answered.

Needs root, bird2, nft and nfqlb (scripts/setup); builds its own labs (prefix ``mnb<pid>x-``)
and removes them.

    .venv/bin/python bench/nfqlb_bench.py [--repeats 3] [--flows 100] [--scaled 4x4x10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable

from meridio_debug.controller.lab import build_spec, down, predict_target, traffic, up
from meridio_debug.controller.lab.spec import LabSpec
from meridio_debug.controller.runtime.local import LocalRuntime
from meridio_debug.controller.runtime.reuse import ReusingRuntime
from meridio_debug.controller.services.trace import lab_trace_source, trace_async
from meridio_debug.controller.trace import parse_flow


def up_down(make: Callable[[], LabSpec], repeats: int) -> tuple[float, float]:
    """Median ``up`` and ``down`` seconds of ``repeats`` fresh labs."""
    ups, downs = [], []
    for _ in range(repeats):
        spec = make()
        try:
            start = time.perf_counter()
            up(spec)
            ups.append(time.perf_counter() - start)
        finally:
            start = time.perf_counter()
            down(spec.prefix)
            downs.append(time.perf_counter() - start)
    return statistics.median(ups), statistics.median(downs)


async def predictions(spec: LabSpec, flows: int) -> tuple[int, int, int, int]:
    """(flows answered, trace == answer, predict_target == answer, trace without one target)."""
    result = traffic(spec, connections=flows // 2)
    answered = [r for r in result.results if r.ok and r.sport is not None]
    texts = []
    for r in answered:
        p = r.probe
        src, dst = (f"[{p.src}]", f"[{p.dst}]") if p.family == 6 else (p.src, p.dst)
        texts.append(f"{p.proto} {src}:{r.sport} -> {dst}:{p.port}")
    runtime, config = lab_trace_source(spec.prefix)
    assert isinstance(runtime, LocalRuntime)
    warm = ReusingRuntime(runtime)
    try:
        traced = await trace_async(warm, [parse_flow(t) for t in texts], config)
    finally:
        await warm.aclose()
    same_trace = same_offline = no_target = 0
    for r, t in zip(answered, traced.results, strict=True):
        if t.chosen is None:
            no_target += 1
        elif t.chosen.target == r.answer:
            same_trace += 1
        p = r.probe
        offline = predict_target(spec, p.src, proto=p.proto, sport=r.sport, dport=p.port)
        same_offline += offline == r.answer
    return len(answered), same_trace, same_offline, no_target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flows", type=int, default=100)
    ap.add_argument("--scaled", default="4x4x10", help="LBSxPROXIESxTARGETS-PER-PROXY")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("nfqlb_bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    lbs, proxies, per = (int(x) for x in args.scaled.split("x"))
    counter = iter(range(1000))

    def prefix() -> str:
        return f"mnb{os.getpid() % 1000}{chr(97 + next(counter) % 26)}-"

    print(f"lab up/down, median of {args.repeats} (baseline: the same lab marking with nft jhash)")
    for label, sizes in (
        ("default 2x2x2", (2, 2, 2)),
        (f"scaled {args.scaled}", (lbs, proxies, per)),
    ):
        base_up, base_down = up_down(
            lambda s=sizes: build_spec(prefix(), *s, marking="nft-jhash"), args.repeats
        )
        nfq_up, nfq_down = up_down(lambda s=sizes: build_spec(prefix(), *s), args.repeats)
        print(f"  {label:14} nft-jhash  up {base_up:5.2f} s   down {base_down:5.2f} s   1.00x")
        print(
            f"  {label:14} nfqlb      up {nfq_up:5.2f} s   down {nfq_down:5.2f} s   "
            f"{nfq_up / base_up:.2f}x"
        )

    spec = build_spec(prefix())
    try:
        up(spec)
        n, by_trace, offline, none = asyncio.run(predictions(spec, args.flows))
    finally:
        down(spec.prefix)
    print(f"predicted vs answering target, {n} flows through real nfqlb (default lab):")
    print(f"  static trace (agent's shm table)   {by_trace}/{n} agree   ({none} without a target)")
    print(f"  predict_target (offline, the spec) {offline}/{n} agree")
    return 0 if by_trace == offline == n else 1


if __name__ == "__main__":
    sys.exit(main())
