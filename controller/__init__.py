"""The meridio-debug controller: the Python API that pipelines use, and the CLI on top of it.

Everything the ``meridio-debug`` commands do is callable from Python, through the same code
(no subprocess): gather every pod's snapshot, analyze it into coded findings, render a
report, write or replay a bundle, trace a flow (static or active), capture. A runtime says
where the agents run: the local lab or network namespaces, or a Kubernetes cluster::

    from meridio_debug.controller import analyze_evidence, gather, lab_evidence_source

    runtime, config, source = lab_evidence_source("mdl-", [])
    result = analyze_evidence(gather(runtime, config, source))
    for finding in result.findings:
        print(finding.code, finding.pod, finding.summary)

The names are loaded on first use (PEP 562), so ``import meridio_debug.controller`` stays
cheap and the Kubernetes client is imported only by code that asks for KubernetesRuntime.
Layers, top down (import-linter checks them): cli -> services -> report -> runtime ->
wire | lab -> trace -> analysis -> model | packets; only wire/ touches protobuf, only
runtime/kubernetes.py imports kubernetes. It never imports pyroute2 or the agent.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meridio_debug.controller.analysis import AnalysisResult, Finding, Severity, analyze
    from meridio_debug.controller.errors import MeridioDebugError
    from meridio_debug.controller.model import TrenchConfig, TrenchState
    from meridio_debug.controller.packets.pcapng import Writer as PcapngWriter
    from meridio_debug.controller.report import Report, render
    from meridio_debug.controller.runtime import PodRef, Runtime
    from meridio_debug.controller.runtime.kubernetes import KubeOptions, KubernetesRuntime
    from meridio_debug.controller.runtime.lab import lab_runtime
    from meridio_debug.controller.runtime.local import LocalRuntime
    from meridio_debug.controller.runtime.reuse import ReusingRuntime
    from meridio_debug.controller.services.active_trace import (
        ActiveOptions,
        ActiveRun,
        active_trace,
        active_trace_async,
    )
    from meridio_debug.controller.services.analyze import (
        HealthOptions,
        analyze_evidence,
        cluster_config,
        gather,
        gather_async,
        lab_evidence_source,
        make_report,
    )
    from meridio_debug.controller.services.bundle import (
        Evidence,
        read_bundle,
        trench_state,
        write_bundle,
    )
    from meridio_debug.controller.services.capture import Options as CaptureOptions
    from meridio_debug.controller.services.capture import PcapngSink, run_capture
    from meridio_debug.controller.services.snapshot import snapshot_all, watch_all
    from meridio_debug.controller.services.trace import (
        TraceRun,
        lab_trace_source,
        trace_async,
        trace_runtime,
    )
    from meridio_debug.controller.trace import Flow, TraceResult, parse_flow

_C = "meridio_debug.controller."
# public name -> (module, attribute)
_API: dict[str, tuple[str, str]] = {
    # gather and analyze (analyze / collect)
    "gather": (_C + "services.analyze", "gather"),
    "gather_async": (_C + "services.analyze", "gather_async"),
    "HealthOptions": (_C + "services.analyze", "HealthOptions"),
    "analyze_evidence": (_C + "services.analyze", "analyze_evidence"),
    "lab_evidence_source": (_C + "services.analyze", "lab_evidence_source"),
    "cluster_config": (_C + "services.analyze", "cluster_config"),
    "make_report": (_C + "services.analyze", "make_report"),
    "analyze": (_C + "analysis", "analyze"),
    "AnalysisResult": (_C + "analysis", "AnalysisResult"),
    "Finding": (_C + "analysis", "Finding"),
    "Severity": (_C + "analysis", "Severity"),
    "Report": (_C + "report", "Report"),
    "render": (_C + "report", "render"),
    # bundles
    "Evidence": (_C + "services.bundle", "Evidence"),
    "read_bundle": (_C + "services.bundle", "read_bundle"),
    "write_bundle": (_C + "services.bundle", "write_bundle"),
    "trench_state": (_C + "services.bundle", "trench_state"),
    # snapshot and watch
    "snapshot_all": (_C + "services.snapshot", "snapshot_all"),
    "watch_all": (_C + "services.snapshot", "watch_all"),
    # trace
    "parse_flow": (_C + "trace", "parse_flow"),
    "Flow": (_C + "trace", "Flow"),
    "TraceResult": (_C + "trace", "TraceResult"),
    "TraceRun": (_C + "services.trace", "TraceRun"),
    "trace_runtime": (_C + "services.trace", "trace_runtime"),
    "trace_async": (_C + "services.trace", "trace_async"),
    "lab_trace_source": (_C + "services.trace", "lab_trace_source"),
    "ActiveOptions": (_C + "services.active_trace", "ActiveOptions"),
    "ActiveRun": (_C + "services.active_trace", "ActiveRun"),
    "active_trace": (_C + "services.active_trace", "active_trace"),
    "active_trace_async": (_C + "services.active_trace", "active_trace_async"),
    # capture
    "CaptureOptions": (_C + "services.capture", "Options"),
    "PcapngSink": (_C + "services.capture", "PcapngSink"),
    "run_capture": (_C + "services.capture", "run_capture"),
    "PcapngWriter": (_C + "packets.pcapng", "Writer"),
    # runtimes
    "Runtime": (_C + "runtime", "Runtime"),
    "PodRef": (_C + "runtime", "PodRef"),
    "LocalRuntime": (_C + "runtime.local", "LocalRuntime"),
    "ReusingRuntime": (_C + "runtime.reuse", "ReusingRuntime"),
    "lab_runtime": (_C + "runtime.lab", "lab_runtime"),
    "KubeOptions": (_C + "runtime.kubernetes", "KubeOptions"),
    "KubernetesRuntime": (_C + "runtime.kubernetes", "KubernetesRuntime"),
    # model and errors
    "TrenchConfig": (_C + "model", "TrenchConfig"),
    "TrenchState": (_C + "model", "TrenchState"),
    "MeridioDebugError": (_C + "errors", "MeridioDebugError"),
}

__all__ = [
    "ActiveOptions",
    "ActiveRun",
    "AnalysisResult",
    "CaptureOptions",
    "Evidence",
    "Finding",
    "Flow",
    "HealthOptions",
    "KubeOptions",
    "KubernetesRuntime",
    "LocalRuntime",
    "MeridioDebugError",
    "PcapngSink",
    "PcapngWriter",
    "PodRef",
    "Report",
    "ReusingRuntime",
    "Runtime",
    "Severity",
    "TraceResult",
    "TraceRun",
    "TrenchConfig",
    "TrenchState",
    "active_trace",
    "active_trace_async",
    "analyze",
    "analyze_evidence",
    "cluster_config",
    "gather",
    "gather_async",
    "lab_evidence_source",
    "lab_runtime",
    "lab_trace_source",
    "make_report",
    "parse_flow",
    "read_bundle",
    "render",
    "run_capture",
    "snapshot_all",
    "trace_async",
    "trace_runtime",
    "trench_state",
    "watch_all",
    "write_bundle",
]


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _API[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
