"""``-o json``: the findings document, a contract for other tools (findings-catalog.md).

Shape (kind ``meridio-debug/analysis``, version 1)::

    {"kind", "version", "source", "created", "fail_on", "failed",
     "findings":   [{code, severity, pod, role, summary, evidence{}, hint, pods[]}],
     "summary":    {"error": n, "warning": n, "info": n},
     "checks_run": [{code, pod, title, status: ok|findings|skipped, skipped_reason, findings}],
     "suppressed": [finding, ...],
     "pods":       [{pod, role, reachable, error}]}

``findings`` and ``summary`` are exactly the catalog's output contract; the
rest is extra and may grow (new keys only).
"""

from __future__ import annotations

import json
from typing import Any

from meridio_debug.controller.report._model import Report, check_runs

KIND = "meridio-debug/analysis"
VERSION = 1


def document(report: Report) -> dict[str, Any]:
    """The JSON document as plain data."""
    result = report.result
    return {
        "kind": KIND,
        "version": VERSION,
        "source": report.source,
        "created": report.created,
        "fail_on": report.fail_on.label if report.fail_on is not None else "never",
        "failed": report.failed,
        "findings": [f.to_dict() for f in result.findings],
        "summary": result.summary(),
        "checks_run": [
            {
                "code": o.code,
                "pod": o.pod,
                "title": o.title,
                "status": o.status,
                "skipped_reason": o.skipped or None,
                "findings": len(o.findings),
            }
            for o in check_runs(result, report.state)
        ],
        "suppressed": [f.to_dict() for f in result.suppressed],
        "pods": [
            {
                "pod": p.pod,
                "role": p.effective_role,
                "reachable": p.reachable,
                "error": p.error or None,
            }
            for p in report.state.pods
        ],
    }


def render(report: Report) -> str:
    return json.dumps(document(report), indent=2) + "\n"
