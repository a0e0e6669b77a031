"""Analyze and collect as a Python API: gather evidence, analyze it, make a report.

Why apart from the CLI: a CI job, a test or a benchmark gathers and analyses without a
subprocess, through the very code path of ``meridio-debug analyze`` (live from a runtime
or replayed from a bundle: bundle.trench_state -> analysis.analyze -> report.render), so
a failure analysed tomorrow says exactly what it said live::

    evidence = gather(runtime, config)            # live, every pod at once
    result = analyze_evidence(evidence, suppress=["MDB003"])
    write_bundle(evidence, "bundle.tar.gz")
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from meridio_debug.controller.analysis import AnalysisResult, Severity, analyze
from meridio_debug.controller.model import TrenchConfig, TrenchState
from meridio_debug.controller.report import Report
from meridio_debug.controller.runtime import Runtime
from meridio_debug.controller.services.bundle import (
    Evidence,
    trench_state,
)
from meridio_debug.controller.services.snapshot import snapshot_all


@dataclass(frozen=True)
class HealthOptions:
    """How much Kubernetes state to read beside the snapshots (cluster runtime only)."""

    log_lines: int = 100
    log_bytes: int = 32 * 1024
    since_unix: float = 0.0


async def gather_async(
    runtime: Runtime,
    config: TrenchConfig | None = None,
    source: str = "",
    health: HealthOptions | None = None,
) -> Evidence:
    """Snapshot every pod of ``runtime`` at once; unreachable pods stay in as errors.

    A runtime that can read pod status (Kubernetes) also gives the pods' health and log
    tails, read while the snapshots are taken.
    """
    created = time.time_ns()
    read_health = getattr(runtime, "read_health", None)
    kube_task = None
    if read_health is not None:
        opts = health or HealthOptions()
        kube_task = asyncio.get_running_loop().run_in_executor(
            None, lambda: read_health(opts.log_lines, opts.log_bytes, opts.since_unix)
        )
    items = await snapshot_all(runtime)
    kube = await kube_task if kube_task is not None else None
    runtimes = sorted({i.pod.runtime for i in items})
    return Evidence(
        items=tuple(items),
        config=config,
        source=source,
        runtime=",".join(runtimes),
        created_unix_ns=created,
        kube=kube,
    )


def gather(runtime: Runtime, config: TrenchConfig | None = None, source: str = "") -> Evidence:
    return asyncio.run(gather_async(runtime, config, source))


def analyze_evidence(evidence: Evidence, suppress: Iterable[str] = ()) -> AnalysisResult:
    """The analysis of ``evidence`` (live or from a bundle: same code)."""
    return analyze(trench_state(evidence), suppress=suppress)


def lab_evidence_source(prefix: str, names: Sequence[str]) -> tuple[Runtime, TrenchConfig, str]:
    """Runtime over the lab's Meridio pods plus what the lab contract says the trench is."""
    # imported here: the lab package: only with --lab (startup of other commands)
    from meridio_debug.controller.lab import load_spec  # noqa: PLC0415
    from meridio_debug.controller.runtime.lab import lab_runtime  # noqa: PLC0415

    runtime = lab_runtime(prefix, names)
    spec = load_spec(prefix)
    config = None
    if spec is not None:
        # imported here: the lab package: only with --lab (startup of other commands)
        from meridio_debug.controller.lab.trench_crs import lab_config  # noqa: PLC0415

        ext = spec.frontends[0].ext_ifname if spec.frontends else ""
        config = TrenchConfig(
            name=spec.trench,
            vips=tuple(spec.vips),
            external_interface=ext,
            meridio=lab_config(spec),
        )
    return runtime, config or TrenchConfig(), f"lab {prefix}"


def cluster_config(runtime: Any) -> TrenchConfig | None:
    """The trench's Meridio objects read from the cluster (CRs, else the ConfigMap).

    Which trench: --trench, else the one the discovered pods name; several trenches
    in one namespace without --trench: not guessed (the MDB6xx checks do not run).
    """
    trenches = {p.trench for p in runtime.meridio_pods() if p.trench}
    trench = runtime.opts.trench or (trenches.pop() if len(trenches) == 1 else "")
    if not trench:
        print(
            "meridio-debug: configuration not read (no single trench; give --trench); "
            "MDB6xx checks skipped",
            file=sys.stderr,
        )
        return None
    meridio, why = runtime.read_config(trench)
    if meridio is None:
        print(
            f"meridio-debug: configuration not read: {why}; MDB6xx checks skipped", file=sys.stderr
        )
        return TrenchConfig(name=trench)
    return TrenchConfig(name=trench, vips=tuple(v.address for v in meridio.vips), meridio=meridio)


def _iso(unix_ns: int) -> str:
    when = datetime.datetime.fromtimestamp(unix_ns / 1e9, tz=datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S")


def tool_version() -> str:
    try:
        return version("meridio-debug")
    except PackageNotFoundError:
        return "unknown"


def make_report(
    evidence: Evidence,
    result: AnalysisResult,
    state: TrenchState,
    fail_on: Severity | None,
) -> Any:
    return Report(
        result=result,
        state=state,
        fail_on=fail_on,
        source=evidence.source,
        created=_iso(evidence.created_unix_ns or time.time_ns()),
        hostname=socket.gethostname() or "localhost",
        tool_version=tool_version(),
    )
