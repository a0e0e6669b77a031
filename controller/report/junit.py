"""``-o junit``: findings as JUnit XML, so CI (Jenkins, GitLab, GitHub) shows them as tests.

Why this mapping: a pipeline reader asks "which pod, which check, did it
pass?". So one ``testsuite`` per pod, one ``testcase`` per check that ran for
that pod (``AnalysisResult.runs``), ``<failure>`` when the check found an error
(and a warning with ``--fail-on warning``), ``<skipped>`` when the check could
not judge the pod (unreachable, section not collected). Findings that do not
fail (info, warnings by default) are listed in the suite's ``system-out`` so
they are still visible.

The output validates against the Ant/Jenkins JUnit schema (windyroad
JUnit.xsd, the one Jenkins' xunit plugin documents): ``testsuites`` holding
``testsuite`` elements with ``package`` and ``id``, each with ``properties``,
``system-out`` and ``system-err``, at most one of failure/skipped per
testcase, timestamps without a time zone. Several findings of one check on
one pod become one failure whose text lists them all.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from meridio_debug.controller.analysis import Finding
from meridio_debug.controller.report._model import (
    CheckOutcome,
    Report,
    check_runs,
    evidence_lines,
    failing,
)

_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")
TRENCH_SUITE = "(trench)"


def _finding_text(f: Finding) -> str:
    lines = [f"[{f.severity.label}] {f.code} {f.pod or TRENCH_SUITE}: {f.summary}"]
    lines += [f"  {line}" for line in evidence_lines(dict(f.evidence))]
    if f.hint:
        lines.append(f"  hint: {f.hint}")
    return "\n".join(lines)


def _timestamp(created: str) -> str:
    m = _TIMESTAMP.match(created)
    return m.group(0) if m else "1970-01-01T00:00:00"


def render(report: Report) -> str:
    outcomes = check_runs(report.result, report.state)
    by_pod: dict[str, list[CheckOutcome]] = {}
    for name in report.pod_names():
        by_pod[name] = []
    for o in outcomes:
        by_pod.setdefault(o.pod, []).append(o)

    # The Ant schema allows no attributes on <testsuites>: totals are per suite.
    root = ET.Element("testsuites")
    for suite_id, (pod, items) in enumerate(by_pod.items()):
        role = report.role_of(pod)
        suite_name = pod or TRENCH_SUITE
        failures = 0
        skipped = 0
        suite = ET.SubElement(
            root,
            "testsuite",
            name=suite_name,
            package=f"meridio-debug.{role}",
            id=str(suite_id),
            timestamp=_timestamp(report.created),
            hostname=report.hostname or "localhost",
            tests=str(len(items)),
            failures="0",
            errors="0",
            skipped="0",
            time="0",
        )
        props = ET.SubElement(suite, "properties")
        for key, value in (
            ("role", role),
            ("source", report.source),
            ("fail-on", report.fail_on.label if report.fail_on is not None else "never"),
            ("meridio-debug-version", report.tool_version),
        ):
            if value:
                ET.SubElement(props, "property", name=key, value=value)
        notes: list[str] = []
        for o in items:
            case = ET.SubElement(
                suite,
                "testcase",
                name=f"{o.code} {o.title}",
                classname=f"meridio-debug.{role}.{suite_name}",
                time="0",
            )
            failed = [f for f in o.findings if failing(f, report.fail_on)]
            if failed:
                failures += 1
                first = failed[0]
                more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
                fail = ET.SubElement(
                    case,
                    "failure",
                    message=f"{first.summary}{more}",
                    type=f"{first.code} {first.severity.label}",
                )
                fail.text = "\n\n".join(_finding_text(f) for f in failed)
            elif o.skipped:
                skipped += 1
                ET.SubElement(case, "skipped", message=o.skipped)
            notes += [_finding_text(f) for f in o.findings if not failing(f, report.fail_on)]
        suite.set("failures", str(failures))
        suite.set("skipped", str(skipped))
        out = ET.SubElement(suite, "system-out")
        out.text = "\n\n".join(notes)
        ET.SubElement(suite, "system-err")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
