"""``meridio-debug e2e-hook init|end|on_failure [SPEC_START_NS]``: Meridio's e2e script contract.

Why a command of its own: Meridio's e2e suite (Ginkgo) calls a script with
``init``, ``end`` and ``on_failure <spec start in unix ns>`` (test/e2e/
test.sh, meridio-reference.md §8); the stock script runs log_collector.sh with
``OUTPUT_PATH``, ``OUTPUT_ID``, ``EXEC_NAMESPACE`` and
``EXEC_{STATELESS_LB_FRONTEND,PROXY,TARGETS}_LABELS``. This hook reads the
same variables (or ``--lab`` locally) and, on a failure, freezes the evidence
first (a bundle), then analyses *the bundle* -- so the artifact replays with
the findings the CI showed -- and writes::

    <OUTPUT_PATH>/meridio-debug-<OUTPUT_ID>.tar.gz   the bundle (analyze --from)
    <OUTPUT_PATH>/meridio-debug-<OUTPUT_ID>.xml      JUnit, one testsuite per pod
    <OUTPUT_PATH>/meridio-debug-<OUTPUT_ID>.json     the findings (output contract)
    <OUTPUT_PATH>/meridio-debug-<OUTPUT_ID>.html     the report page

A debugging aid must never be the reason an e2e run fails: findings, an
unreachable pod or a collection that times out still exit 0 (the failure is
said on stderr and in the reports); only when nothing at all could be written
does it exit 1, with one line saying why. Collection is bounded by
``--timeout`` (default 120 s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from meridio_debug.controller.cli.kube import add_cluster_args
from meridio_debug.controller.errors import MeridioDebugError
from meridio_debug.controller.model import TrenchConfig

EPILOG = """environment (as Meridio's test.sh passes it to log_collector.sh):
  OUTPUT_PATH       directory for the files (default ./_output)
  OUTPUT_ID         file name id (default SPEC_START_NS, else the current time)
  EXEC_NAMESPACE    the trench's namespace (cluster mode)
  EXEC_STATELESS_LB_FRONTEND_LABELS, EXEC_PROXY_LABELS, EXEC_TARGETS_LABELS
                    recorded in the bundle; the pods are found by Meridio's own labels

Meridio test.sh, one line in on_failure():
  meridio-debug e2e-hook on_failure "$2" || true

exit codes: 0 always when something was written (findings do not fail the e2e run),
1 nothing could be written (one line says why), 2 usage"""

_EXEC_VARS = (
    "EXEC_STATELESS_LB_FRONTEND_LABELS",
    "EXEC_PROXY_LABELS",
    "EXEC_TARGETS_LABELS",
)


def add_parser(sub: Any) -> None:

    p = sub.add_parser(
        "e2e-hook",
        help="Meridio e2e script hook: on_failure collects, analyses, writes bundle+JUnit+JSON+HTML",
        description="The init/end/on_failure contract of Meridio's e2e test.sh. on_failure "
        "collects a bundle of every pod, analyses it and writes the reports beside it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=["init", "end", "on_failure"], help="the hook being called")
    p.add_argument(
        "spec_start_ns",
        nargs="?",
        default="",
        metavar="SPEC_START_NS",
        help="unix ns when the failed spec started (Ginkgo passes it to on_failure)",
    )
    p.add_argument("--lab", action="store_true", help="the local lab instead of a cluster")
    p.add_argument("--prefix", default="mdl-", help="lab namespace prefix (default mdl-)")
    p.add_argument("--output-path", help="directory for the files (default $OUTPUT_PATH)")
    p.add_argument("--output-id", help="file name id (default $OUTPUT_ID)")
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="bound for collecting the evidence, seconds (default 120)",
    )
    add_cluster_args(p)
    p.set_defaults(func=cmd_e2e_hook, netns=[], netns_pid=[], pods=[])


def output_files(directory: Path, output_id: str) -> dict[str, Path]:
    base = f"meridio-debug-{output_id}"
    return {ext: directory / f"{base}.{ext}" for ext in ("tar.gz", "xml", "json", "html")}


def _output_id(args: argparse.Namespace) -> str:
    raw = args.output_id or os.environ.get("OUTPUT_ID") or args.spec_start_ns
    raw = raw or time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)


def _gather(args: argparse.Namespace) -> Any:
    """Every pod's snapshot, bounded by --timeout; a failure is an empty evidence + why."""
    from meridio_debug.controller.services.analyze import (
        HealthOptions,
        cluster_config,
        gather_async,
        lab_evidence_source,
    )
    from meridio_debug.controller.services.bundle import Evidence

    config: TrenchConfig | None = None
    try:
        if args.lab:
            runtime, config, source = lab_evidence_source(args.prefix, [])
        else:
            from meridio_debug.controller.cli.kube import cluster_runtime

            if not args.namespace and os.environ.get("EXEC_NAMESPACE"):
                args.namespace = os.environ["EXEC_NAMESPACE"]
            runtime = cluster_runtime(args, progress=False)
            config = cluster_config(runtime)
            source = f"namespace {runtime.namespace}"

        since = int(args.spec_start_ns) / 1e9 if args.spec_start_ns.isdigit() else 0.0
        health = HealthOptions(since_unix=since)

        async def bounded() -> Evidence:
            return await asyncio.wait_for(
                gather_async(runtime, config, source, health), args.timeout
            )

        return asyncio.run(bounded()), ""
    except TimeoutError:
        why = f"collection did not finish within --timeout {args.timeout:g} s"
    except MeridioDebugError as exc:
        why = str(exc)
    except Exception as exc:  # the hook must not take the e2e run down with it
        why = f"{type(exc).__name__}: {exc}"
    return Evidence(
        items=(), source=f"collection failed: {why}", created_unix_ns=time.time_ns()
    ), why


def cmd_e2e_hook(args: argparse.Namespace) -> int:
    if args.action in ("init", "end"):
        print(f"meridio-debug e2e-hook {args.action}: ok", file=sys.stderr)
        return 0
    directory = Path(args.output_path or os.environ.get("OUTPUT_PATH") or "_output")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(
            f"meridio-debug e2e-hook: cannot create OUTPUT_PATH {directory}: "
            f"{exc.strerror or exc}; nothing written",
            file=sys.stderr,
        )
        return 1
    files = output_files(directory, _output_id(args))
    started = time.monotonic()
    evidence, why = _gather(args)
    if why:
        print(f"meridio-debug e2e-hook: {why}", file=sys.stderr)
    return _write(args, evidence, files, started)


def _write(args: argparse.Namespace, evidence: Any, files: dict[str, Path], started: float) -> int:
    from meridio_debug.controller.analysis import analyze
    from meridio_debug.controller.report import render
    from meridio_debug.controller.services.analyze import make_report
    from meridio_debug.controller.services.bundle import read_bundle, trench_state, write_bundle

    written: list[str] = []
    env = {k: os.environ[k] for k in ("EXEC_NAMESPACE", *_EXEC_VARS) if k in os.environ}
    command = ["meridio-debug", "e2e-hook", args.action, args.spec_start_ns]
    command += [f"{k}={v}" for k, v in env.items()]
    try:
        write_bundle(evidence, files["tar.gz"], command_line=command)
        written.append(files["tar.gz"].name)
        evidence = read_bundle(files["tar.gz"])  # analyse what the artifact holds
    except MeridioDebugError as exc:
        print(f"meridio-debug e2e-hook: {exc}", file=sys.stderr)
    state = trench_state(evidence)
    result = analyze(state)
    from meridio_debug.controller.analysis import Severity

    report = make_report(evidence, result, state, Severity.ERROR)
    for ext, fmt in (("xml", "junit"), ("json", "json"), ("html", "html")):
        try:
            files[ext].write_text(render(fmt, report))
            written.append(files[ext].name)
        except OSError as exc:
            print(
                f"meridio-debug e2e-hook: cannot write {files[ext]}: {exc.strerror or exc}",
                file=sys.stderr,
            )
    if not written:
        print("meridio-debug e2e-hook: nothing could be written", file=sys.stderr)
        return 1
    counts = ", ".join(f"{n} {sev}" for sev, n in result.summary().items())
    print(
        f"meridio-debug e2e-hook: {len(state.pods)} pods, {counts}; wrote "
        f"{', '.join(written)} in {files['xml'].parent} ({time.monotonic() - started:.1f} s)",
        file=sys.stderr,
    )
    return 0
