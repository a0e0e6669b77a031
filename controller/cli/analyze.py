"""``meridio-debug analyze`` and ``meridio-debug collect``: findings for people and pipelines.

Why both live here: they are two halves of one flow. ``collect`` freezes the
evidence (every pod's snapshot at one moment) into a versioned bundle;
``analyze`` turns evidence -- live from ``--lab``/``--netns``/``-n`` or replayed
``--from`` a bundle -- into coded findings through the very same code path
(services/analyze.py; istioctl analyze for the flags, Hubble's ``--input-file``
for the replay).

Exit codes: 0 no finding at or above ``--fail-on`` (default error), 3 some,
1 an error (unreadable bundle, lab not up), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from meridio_debug.controller.analysis import CHECKS, AnalysisResult, Severity, analyze
from meridio_debug.controller.cli.arguments import add_target_args, make_runtime
from meridio_debug.controller.errors import MeridioDebugError, UsageError
from meridio_debug.controller.model import TrenchConfig, TrenchState
from meridio_debug.controller.runtime import Runtime
from meridio_debug.controller.services.analyze import (
    HealthOptions,
    cluster_config,
    gather_async,
    lab_evidence_source,
    make_report,
    tool_version,
)
from meridio_debug.controller.services.bundle import (
    Evidence,
    read_bundle,
    trench_state,
    write_bundle,
)

EXIT_OK, EXIT_ERROR, EXIT_FINDINGS = 0, 1, 3

ANALYZE_EPILOG = """examples:
  meridio-debug analyze --lab
  meridio-debug analyze --lab -o junit --report report.html --fail-on warning
  meridio-debug analyze --from bundle.tar.gz -o json --suppress MDB116=lb-fe-b
  meridio-debug analyze --list-checks
  meridio-debug analyze --lab --wait --timeout 60      # until the trench has settled
  meridio-debug analyze --lab --watch 30               # flaps during 30 s (MDB7xx)

exit codes: 0 nothing at or above --fail-on, 1 error, 2 usage, 3 findings at or above --fail-on"""

COLLECT_EPILOG = """examples:
  meridio-debug collect --lab -o bundle.tar.gz
  meridio-debug analyze --from bundle.tar.gz -o junit --report report.html"""


def evidence_from_args(args: argparse.Namespace) -> Evidence:
    """Evidence for the target flags: a bundle (--from), the lab, or namespaces.

    ``--config FILE`` (Meridio CRs or the ConfigMap as YAML) replaces the trench's
    configuration wherever the evidence came from, a bundle included.
    """
    evidence = _evidence(args)
    config_file = getattr(args, "config", None)
    if config_file:
        from meridio_debug.controller.model.meridio_config import read_config_file

        meridio = read_config_file(config_file)
        base = evidence.config or TrenchConfig(name=meridio.trench)
        vips = base.vips or tuple(v.address for v in meridio.vips)
        evidence = replace(
            evidence,
            config=replace(base, meridio=meridio, vips=vips, name=base.name or meridio.trench),
        )
    return evidence


def _evidence(args: argparse.Namespace) -> Evidence:
    bundle = getattr(args, "from_bundle", None)
    if bundle:
        if args.lab or args.netns or args.netns_pid or args.pods or cluster_flags(args):
            raise UsageError("--from BUNDLE replays saved evidence: drop --lab/--netns/-n/POD")
        return read_bundle(bundle)
    runtime, config, source, health = live_source(args)
    seconds = float(getattr(args, "watch", 0) or 0)
    if seconds > 0:
        return asyncio.run(watched_evidence(runtime, config, source, health, seconds))
    return asyncio.run(gather_async(runtime, config, source, health))


def live_source(
    args: argparse.Namespace,
) -> tuple[Runtime, TrenchConfig | None, str, HealthOptions | None]:
    """The runtime for the target flags, the trench's configuration and a source label."""

    if args.lab and not args.netns and not args.netns_pid:
        runtime, config, source = lab_evidence_source(args.prefix, args.pods)
        return runtime, config, source, None
    runtime = make_runtime(args)  # validates the combination of flags
    if cluster_flags(args):
        health = HealthOptions(
            log_lines=0 if args.no_logs else args.log_lines,
            log_bytes=args.log_bytes,
            since_unix=args.since_ns / 1e9 if getattr(args, "since_ns", 0) else 0.0,
        )
        intent = None if getattr(args, "config", None) else cluster_config(runtime)
        return runtime, intent, f"namespace {runtime.namespace}", health
    where = args.netns or [f"pid:{p}" for p in args.netns_pid]
    return runtime, None, f"netns {','.join(map(str, where))}", None


async def watched_evidence(
    runtime: Runtime,
    config: TrenchConfig | None,
    source: str,
    health: HealthOptions | None,
    seconds: float,
) -> Evidence:
    """``analyze --watch S``: S seconds of events and bird samples, then the snapshot."""
    from meridio_debug.controller.runtime.reuse import ReusingRuntime
    from meridio_debug.controller.services.bundle import Recording
    from meridio_debug.controller.services.snapshot import record_all

    async with ReusingRuntime(runtime) as shared:
        print(f"watching every pod for {seconds:g} s ...", file=sys.stderr, flush=True)
        start = time.time_ns()
        events, samples, errors = await record_all(shared, seconds)
        end = time.time_ns()
        evidence = await gather_async(shared, config, source, health)
    print(
        f"watched {seconds:g} s: {len(events)} events, {len(samples)} bird samples",
        file=sys.stderr,
    )
    recording = Recording(start, end, tuple(events), tuple(samples), tuple(errors))
    return replace(evidence, recording=recording)


def cluster_flags(args: argparse.Namespace) -> bool:
    """Whether the Kubernetes runtime was asked for (-n, --context, ...; see cli_kube)."""
    from meridio_debug.controller.cli.kube import wants_cluster

    return wants_cluster(args)


def add_parser(sub: Any) -> None:
    from meridio_debug.controller.report import FORMATS

    p = sub.add_parser(
        "analyze",
        help="snapshot every pod at once and report coded findings (MDBxxx)",
        description="Snapshot every pod of the trench at once (or read a bundle), run every "
        "check of the findings catalog, and print the findings grouped by pod.",
        epilog=ANALYZE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target_args(p)
    p.add_argument(
        "--from",
        dest="from_bundle",
        metavar="BUNDLE",
        help="analyse a bundle written by `collect` instead of live pods",
    )
    p.add_argument(
        "-o",
        "--output",
        choices=list(FORMATS),
        default="table",
        help="output format (default table)",
    )
    p.add_argument(
        "--report",
        metavar="FILE",
        help="also write a report to FILE, format by extension (.json, .xml = junit, .html, .txt)",
    )
    p.add_argument(
        "--fail-on",
        choices=["error", "warning", "info", "never"],
        default="error",
        help="exit 3 when findings at or above this severity exist (default error)",
    )
    p.add_argument(
        "--suppress",
        action="append",
        default=[],
        metavar="CODE[=POD]",
        help="drop findings of CODE (on POD); globs allowed, e.g. MDB116=lb-fe-*; repeatable",
    )
    p.add_argument(
        "--list-checks", action="store_true", help="print every check (code, severity, title)"
    )
    add_config_arg(p)
    p.add_argument(
        "--wait",
        action="store_true",
        help="poll until no finding at or above --fail-on (exit 0) or --timeout (exit 3 with "
        "the last findings); progress on stderr",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="with --wait: give up after S seconds (default 120)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=2.0,
        metavar="S",
        help="with --wait: seconds between two analyses (default 2)",
    )
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "collect",
        help="save every pod's snapshot into a versioned evidence bundle (tar.gz)",
        description="Snapshot every pod at once and write an evidence bundle that "
        "`analyze --from` replays offline.",
        epilog=COLLECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target_args(p)
    p.add_argument(
        "-o", "--output", required=True, metavar="BUNDLE", help="bundle file to write (.tar.gz)"
    )
    add_config_arg(p)
    p.set_defaults(func=cmd_collect)


def add_config_arg(p: Any) -> None:
    g = p.add_argument_group("Kubernetes state (with -n/--context/...)")
    g.add_argument(
        "--log-lines",
        type=int,
        default=100,
        metavar="N",
        help="keep the last N log lines of each container, current and previous (default 100)",
    )
    g.add_argument(
        "--log-bytes",
        type=int,
        default=32 * 1024,
        metavar="B",
        help="at most B bytes of log per container instance (default 32768)",
    )
    g.add_argument("--no-logs", action="store_true", help="read no container logs")
    p.add_argument(
        "--watch",
        type=float,
        default=0.0,
        metavar="S",
        help="first record S seconds of netlink events and bird/BFD state in every pod and "
        "report flaps (MDB7xx); the events go into the bundle",
    )
    g.add_argument(
        "--since-ns",
        type=int,
        default=0,
        metavar="UNIX_NS",
        help="count container restarts after this time only (an e2e spec's start)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="the trench's Meridio configuration: a YAML file of CRs (Trench, Flow, Vip, ...) "
        "or the ConfigMap meridio-configuration-<trench>; enables the MDB6xx checks",
    )


def _fail_on(text: str) -> Severity | None:
    return None if text == "never" else Severity.parse(text)


def _color(stream: Any) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)() and not os.environ.get("NO_COLOR"))


def list_checks_text() -> str:
    rows = [(c.code, c.severity.label, ",".join(c.roles) or "any", c.title) for c in CHECKS]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    head = ("CODE", "SEVERITY", "ROLES", "TITLE")
    widths = [max(w, len(h)) for w, h in zip(widths, head[:3], strict=True)]
    lines = []
    for row in (head, *rows):
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
        )
    return "\n".join(lines) + "\n"


def cmd_analyze(args: argparse.Namespace) -> int:
    from meridio_debug.controller.report import format_for_path, render

    if args.list_checks:
        sys.stdout.write(list_checks_text())
        return EXIT_OK
    report_fmt = None
    if args.report:
        report_fmt = format_for_path(args.report)
        if report_fmt is None:
            raise UsageError(
                f"--report {args.report}: unknown extension (use .json, .xml, .html or .txt)"
            )
    for item in args.suppress:
        if not item.partition("=")[0].strip():
            raise UsageError(f"--suppress {item!r}: give CODE or CODE=POD")
    if not (args.from_bundle or args.lab or args.netns or args.netns_pid or cluster_flags(args)):
        raise UsageError(
            "say where the pods are: --lab, --netns NAME, --netns-pid PID, -n NAMESPACE, "
            "or --from BUNDLE"
        )
    fail_on = _fail_on(args.fail_on)
    if args.watch and (args.watch < 0 or args.watch > 3600 or args.watch != args.watch):
        raise UsageError("--watch S: give seconds between 0 and 3600")
    if args.watch and (args.from_bundle or args.wait):
        raise UsageError("--watch records live pods: not with --from BUNDLE or --wait")
    if args.wait:
        if args.from_bundle:
            raise UsageError("--wait polls live pods: it does not go with --from BUNDLE")
        if args.timeout <= 0 or args.interval <= 0:
            raise UsageError("--timeout and --interval must be positive seconds")
        evidence, state, result = wait_until_settled(args, fail_on)
    else:
        evidence = evidence_from_args(args)
        state = trench_state(evidence)
        result = analyze(state, suppress=args.suppress)
    report = make_report(evidence, result, state, fail_on)
    print_health_summary(evidence)
    sys.stdout.write(render(args.output, report, color=_color(sys.stdout)))
    sys.stdout.flush()
    if args.report and report_fmt is not None:
        try:
            Path(args.report).write_text(render(report_fmt, report))
        except OSError as exc:
            raise MeridioDebugError(
                f"cannot write report {args.report}: {exc.strerror or exc}"
            ) from exc
    return EXIT_FINDINGS if report.failed else EXIT_OK


def print_health_summary(evidence: Evidence) -> None:
    """The pods' Kubernetes health, one line per group, on stderr (cluster evidence only)."""
    if evidence.kube is None:
        return
    from meridio_debug.controller.analysis.health import summary_lines

    for line in summary_lines(evidence.kube):
        print(line, file=sys.stderr)


def _blocking(result: AnalysisResult, fail_on: Severity | None) -> list[str]:
    if fail_on is None:
        return []
    return [f"{f.code} {f.pod}" for f in result.at_least(fail_on)]


def wait_until_settled(
    args: argparse.Namespace, fail_on: Severity | None
) -> tuple[Evidence, TrenchState, AnalysisResult]:
    """``analyze --wait``: analyse every --interval until nothing blocks or --timeout passes.

    Progress goes to stderr, one line per round that still has blocking findings; the
    caller renders the last analysis (exit 0 when settled, 3 at the timeout).
    """
    started = time.monotonic()
    deadline = started + args.timeout
    rounds = 0
    while True:
        rounds += 1
        evidence = evidence_from_args(args)
        state = trench_state(evidence)
        result = analyze(state, suppress=args.suppress)
        blocking = _blocking(result, fail_on)
        elapsed = time.monotonic() - started
        if not blocking:
            print(f"✔ settled after {rounds} analyses ({elapsed:.1f} s)", file=sys.stderr)
            return evidence, state, result
        left = deadline - time.monotonic()
        shown = ", ".join(blocking[:4]) + (f" (+{len(blocking) - 4})" if len(blocking) > 4 else "")
        if left <= 0:
            print(
                f"✘ not settled after {args.timeout:g} s ({rounds} analyses): {shown}",
                file=sys.stderr,
            )
            return evidence, state, result
        print(f"… waiting ({elapsed:.0f} s, {left:.0f} s left): {shown}", file=sys.stderr)
        sys.stderr.flush()
        time.sleep(min(args.interval, left))


def cmd_collect(args: argparse.Namespace) -> int:
    if args.watch and (args.watch < 0 or args.watch > 3600 or args.watch != args.watch):
        raise UsageError("--watch S: give seconds between 0 and 3600")
    if not (args.lab or args.netns or args.netns_pid or cluster_flags(args)):
        raise UsageError(
            "say where the pods are: --lab, --netns NAME, --netns-pid PID or -n NAMESPACE"
        )
    evidence = evidence_from_args(args)
    print_health_summary(evidence)
    meta = write_bundle(
        evidence,
        args.output,
        command_line=["meridio-debug", *sys.argv[1:]],
        tool_version=tool_version(),
    )
    unreachable = [p["name"] for p in meta["pods"] if not p["reachable"]]
    note = f" ({len(unreachable)} unreachable: {', '.join(unreachable)})" if unreachable else ""
    print(
        f"wrote {args.output}: {len(meta['pods'])} pods{note}, format version "
        f"{meta['format_version']}",
        file=sys.stderr,
    )
    return EXIT_OK
